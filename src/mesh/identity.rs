//! Who a certificate names: Consul's SPIFFE service IDs
//! (`spiffe://<trust domain>/ns/<namespace>/dc/<datacenter>/svc/<service>`, with
//! `/ap/<partition>` first in Consul Enterprise), and the few certificate fields the mesh
//! reads (URI SAN, serial, validity), parsed with x509-parser.

use std::fmt;
use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A Consul service identity, as the URI SAN of its leaf certificate carries it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SpiffeId {
    /// The trust domain, `<cluster id>.consul`.
    pub trust_domain: String,
    /// The admin partition (Consul Enterprise); `default` when the ID names none.
    pub partition: String,
    /// The namespace (`default` in Consul CE).
    pub namespace: String,
    /// The datacenter.
    pub datacenter: String,
    /// The service.
    pub service: String,
}

/// Why a certificate's identity is not the one expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate could not be parsed.
    #[error("the certificate could not be parsed")]
    Unparsable,
    /// The certificate carries no `spiffe://` URI SAN of a Consul service.
    #[error("the certificate names no Consul service (no spiffe://…/svc/… URI SAN)")]
    NoServiceId,
    /// The certificate names another service, namespace, partition or datacenter.
    #[error("the certificate names `{got}`, expected `{expected}`")]
    Mismatch {
        /// What the certificate names.
        got: String,
        /// The identity expected, any trust domain: `spiffe://*/ns/<ns>/dc/<dc>/svc/<service>`.
        expected: String,
    },
}

impl SpiffeId {
    /// Parses `spiffe://<trust domain>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>`.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let segments: Vec<&str> = path.split('/').collect();
        let (partition, segments) = match segments.as_slice() {
            ["ap", partition, rest @ ..] => (*partition, rest),
            all => ("default", all),
        };
        let ["ns", namespace, "dc", datacenter, "svc", service] = segments else {
            return None;
        };
        let parts = [trust_domain, partition, namespace, datacenter, service];
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(Self {
            trust_domain: trust_domain.to_owned(),
            partition: partition.to_owned(),
            namespace: (*namespace).to_owned(),
            datacenter: (*datacenter).to_owned(),
            service: (*service).to_owned(),
        })
    }

    /// Whether `other` names `service` in this ID's partition, namespace and datacenter.
    ///
    /// The trust domain is not compared, as Consul's own Go SDK does not: only the CA roots
    /// decide which trust domains are accepted (so a trust-domain migration keeps working).
    pub(crate) fn check_peer(&self, other: &SpiffeId, service: &str) -> Result<(), IdentityError> {
        let expected = SpiffeId {
            trust_domain: "*".to_owned(),
            service: service.to_owned(),
            ..self.clone()
        };
        expected.check(other)
    }

    /// Whether `other` names the service, namespace and datacenter of `target` (Consul's
    /// service SNI, `<service>.<namespace>.<datacenter>.internal.<trust domain>`), in this
    /// ID's partition, as Consul's Go SDK checks a server against the catalog entry it
    /// dialled; `None` when `target` is no such name.
    pub(crate) fn check_peer_at(
        &self,
        other: &SpiffeId,
        target: &str,
    ) -> Option<Result<(), IdentityError>> {
        let labels: Vec<&str> = target.split('.').collect();
        let [service, namespace, datacenter, "internal", _, ..] = labels.as_slice() else {
            return None;
        };
        let expected = SpiffeId {
            trust_domain: "*".to_owned(),
            partition: self.partition.clone(),
            namespace: (*namespace).to_owned(),
            datacenter: (*datacenter).to_owned(),
            service: (*service).to_owned(),
        };
        Some(expected.check(other))
    }

    /// Whether `other` is this ID, in any trust domain (names compared without regard to
    /// case, as Consul's are).
    fn check(&self, other: &SpiffeId) -> Result<(), IdentityError> {
        let same = other.service.eq_ignore_ascii_case(&self.service)
            && other.namespace.eq_ignore_ascii_case(&self.namespace)
            && other.partition.eq_ignore_ascii_case(&self.partition)
            && other.datacenter.eq_ignore_ascii_case(&self.datacenter);
        if same {
            Ok(())
        } else {
            Err(IdentityError::Mismatch {
                got: other.to_string(),
                expected: self.to_string(),
            })
        }
    }

    /// Consul's server name for `service` in `namespace` and `datacenter`, which
    /// [`check_peer_at`](Self::check_peer_at) reads back; `None` when a part would not make
    /// a DNS label.
    pub(crate) fn service_sni(
        &self,
        service: &str,
        namespace: &str,
        datacenter: &str,
    ) -> Option<String> {
        let label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let parts = [service, namespace, datacenter];
        let domain = &self.trust_domain;
        parts
            .iter()
            .all(|p| label(p))
            .then(|| format!("{service}.{namespace}.{datacenter}.internal.{domain}"))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.trust_domain)?;
        if self.partition != "default" {
            write!(f, "/ap/{}", self.partition)?;
        }
        write!(
            f,
            "/ns/{}/dc/{}/svc/{}",
            self.namespace, self.datacenter, self.service
        )
    }
}

/// What the mesh reads from a certificate.
#[derive(Clone, Debug)]
pub(crate) struct CertFacts {
    /// The service it names.
    pub(crate) id: SpiffeId,
    /// The URI SAN as written.
    pub(crate) uri: String,
    /// Colon-separated lowercase hex, without leading zero bytes, as Consul writes serials.
    pub(crate) serial: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

impl CertFacts {
    /// Reads a DER certificate.
    pub(crate) fn read(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
        let names = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::Unparsable)?
            .ok_or(IdentityError::NoServiceId)?;
        let (uri, id) = names
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                GeneralName::URI(uri) => SpiffeId::parse(uri).map(|id| ((*uri).to_owned(), id)),
                _ => None,
            })
            .ok_or(IdentityError::NoServiceId)?;
        let time = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs());
        Ok(Self {
            id,
            uri,
            serial: colon_hex(cert.raw_serial()),
            not_before: time(cert.validity().not_before.timestamp()),
            not_after: time(cert.validity().not_after.timestamp()),
        })
    }
}

/// `0x00 0x60 0xa3` as `60:a3`: Go's `connect.HexString(serial.Bytes())`, which Consul's
/// `ClientCertSerial` expects (DER's sign byte dropped).
fn colon_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let hex: Vec<String> = bytes[start..].iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://1111.consul/ns/default/dc/dc1/svc/web";

    /// Catches a server checked against the caller's datacenter or namespace when the
    /// instance dialled is in another (#33 item 9: a call from dc1 to an instance in dc2
    /// refused a genuine server, or took a dc1 server answering for it), and a server name
    /// that is no Consul service name taken for one.
    #[test]
    fn a_server_is_checked_against_the_instance_dialled() {
        let me = SpiffeId::parse(WEB).unwrap();
        let api = |ns: &str, dc: &str| {
            SpiffeId::parse(&format!("spiffe://2222.consul/ns/{ns}/dc/{dc}/svc/api")).unwrap()
        };
        let in_dc2 = me.service_sni("api", "default", "dc2").unwrap();
        assert_eq!(in_dc2, "api.default.dc2.internal.1111.consul");
        assert!(
            me.check_peer_at(&api("default", "dc2"), &in_dc2)
                .unwrap()
                .is_ok()
        );
        assert!(
            me.check_peer_at(&api("default", "dc1"), &in_dc2)
                .unwrap()
                .is_err()
        );
        let in_team = me.service_sni("api", "team", "dc1").unwrap();
        assert!(
            me.check_peer_at(&api("team", "dc1"), &in_team)
                .unwrap()
                .is_ok()
        );
        assert!(
            me.check_peer_at(&api("default", "dc1"), &in_team)
                .unwrap()
                .is_err()
        );
        let other = me.service_sni("billing", "default", "dc2").unwrap();
        assert!(
            me.check_peer_at(&api("default", "dc2"), &other)
                .unwrap()
                .is_err()
        );
        // A plain service name: the caller's datacenter and namespace.
        assert!(me.check_peer_at(&api("default", "dc1"), "api").is_none());
        assert!(me.check_peer(&api("default", "dc1"), "api").is_ok());
        assert!(me.check_peer(&api("default", "dc2"), "api").is_err());
        // Parts that would not make a DNS label make no name.
        assert_eq!(me.service_sni("api", "de.fault", "dc1"), None);
        assert_eq!(me.service_sni("", "default", "dc1"), None);
    }

    #[test]
    fn parses_and_prints_consul_service_ids() {
        let id = SpiffeId::parse(WEB).unwrap();
        assert_eq!(
            (
                &*id.trust_domain,
                &*id.namespace,
                &*id.datacenter,
                &*id.service
            ),
            ("1111.consul", "default", "dc1", "web")
        );
        assert_eq!(id.partition, "default");
        assert_eq!(id.to_string(), WEB);
        let partitioned = "spiffe://1111.consul/ap/team/ns/ns1/dc/dc2/svc/db";
        let id = SpiffeId::parse(partitioned).unwrap();
        assert_eq!((&*id.partition, &*id.service), ("team", "db"));
        assert_eq!(id.to_string(), partitioned);
        for bad in [
            "https://1111.consul/ns/default/dc/dc1/svc/web",
            "spiffe://1111.consul/ns/default/dc/dc1/agent/client",
            "spiffe://1111.consul/ns/default/dc/dc1/svc/",
            "spiffe://1111.consul/ns/default/dc/dc1/svc/web/extra",
            "spiffe://1111.consul",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_peer_must_name_the_service_in_our_namespace_and_datacenter() {
        let me = SpiffeId::parse("spiffe://1111.consul/ns/default/dc/dc1/svc/api").unwrap();
        let web = SpiffeId::parse(WEB).unwrap();
        assert_eq!(me.check_peer(&web, "web"), Ok(()));
        assert_eq!(
            me.check_peer(&web, "WEB"),
            Ok(()),
            "names are case-insensitive"
        );
        let other_domain = SpiffeId::parse("spiffe://2222.consul/ns/default/dc/dc1/svc/web");
        assert_eq!(me.check_peer(&other_domain.unwrap(), "web"), Ok(()));
        for wrong in [
            "spiffe://1111.consul/ns/default/dc/dc1/svc/db",
            "spiffe://1111.consul/ns/other/dc/dc1/svc/web",
            "spiffe://1111.consul/ns/default/dc/dc2/svc/web",
            "spiffe://1111.consul/ap/team/ns/default/dc/dc1/svc/web",
        ] {
            let peer = SpiffeId::parse(wrong).unwrap();
            assert!(
                matches!(
                    me.check_peer(&peer, "web"),
                    Err(IdentityError::Mismatch { .. })
                ),
                "{wrong}"
            );
        }
    }

    #[test]
    fn serials_are_written_as_consul_writes_them() {
        assert_eq!(colon_hex(&[0x00, 0x60, 0xa3, 0x0b]), "60:a3:0b");
        assert_eq!(colon_hex(&[0x7f]), "7f");
        assert_eq!(colon_hex(&[0x00]), "");
    }
}
