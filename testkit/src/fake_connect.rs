//! The fake agent's Connect CA and intentions (`api-docs/agent/connect.mdx`,
//! `connect/ca/index.mdx`, `connect/intentions/index.mdx`), served by [`FakeConsul`]:
//!
//! - `GET /v1/agent/connect/ca/roots`: every root the CA has had (the active one marked), the
//!   trust domain, `X-Consul-Index`, blocking with `index` and `wait`. No ACL needed.
//! - `GET /v1/agent/connect/ca/leaf/:service`: a leaf issued by the active root with the
//!   SPIFFE URI SAN of the service and both TLS usages; `CertPEM` holds the leaf, then the
//!   active root cross-signed by the previous one (after a rotation with cross-signing).
//!   Blocking like the roots. Needs `service:write`. Like the agent, it renews a leaf at
//!   seven tenths of its lifetime, and issues new leaves when the root rotates.
//! - `POST /v1/agent/connect/authorize`: evaluates intentions by Consul's precedence (exact
//!   source and destination, then a wildcard source, then a wildcard destination, then
//!   both), else the default (allow, as with ACLs off, or deny). Needs `service:write`;
//!   `ClientCertURI` must be a service identity (400 otherwise). As Consul does, it does not
//!   compare the trust domain.
//!
//! Test controls: [`FakeConsul::rotate_leaf`], [`FakeConsul::rotate_root`] (with or
//! without cross-signing), [`FakeConsul::freeze_roots`] (the roots endpoint keeps answering
//! the old set, as an agent whose roots watch lags would), [`FakeConsul::impersonate`]
//! (leaves for one service name another), leaf lifetimes, intentions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::fake_consul::{Caller, FakeConsul};

pub const TRUST_DOMAIN: &str = "11111111-2222-3333-4444-555555555555.consul";

/// The SPIFFE ID the CA gives `service`.
pub fn spiffe(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/{service}")
}

struct Root {
    id: String,
    name: String,
    params: CertificateParams,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    active: bool,
}

struct Leaf {
    serial: String,
    cert_pem: String,
    key_pem: String,
    not_before: SystemTime,
    not_after: SystemTime,
    index: u64,
}

pub struct Connect {
    roots: Vec<Root>,
    /// The active root, cross-signed by the previous one.
    cross_signed: Option<String>,
    /// Roots of other CAs listed (inactive) beside this CA's own.
    foreign_roots: Vec<String>,
    roots_index: u64,
    /// What the roots endpoint answers while frozen.
    frozen: Option<(Value, u64)>,
    leaves: HashMap<String, Leaf>,
    leaf_lifetime: Duration,
    /// Service name -> the service its leaves name instead.
    impersonate: HashMap<String, String>,
    /// (source, destination, allow).
    intentions: Vec<(String, String, bool)>,
    default_allow: bool,
    authorizations: u64,
    /// Whether leaves are renewed at seven tenths of their lifetime.
    renewal: bool,
    /// What every authorize call meets, while set.
    authorize_fault: Option<super::fake_consul::Fault>,
}

impl Default for Connect {
    fn default() -> Self {
        Self {
            roots: vec![new_root(1)],
            cross_signed: None,
            foreign_roots: Vec::new(),
            roots_index: 1,
            frozen: None,
            leaves: HashMap::new(),
            leaf_lifetime: Duration::from_secs(72 * 3600),
            impersonate: HashMap::new(),
            intentions: Vec::new(),
            default_allow: true,
            authorizations: 0,
            renewal: true,
            authorize_fault: None,
        }
    }
}

fn new_root(n: u32) -> Root {
    let name = format!("Consul CA Root Cert {n}");
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, &name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names.push(SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}").try_into().unwrap(),
    ));
    let key = KeyPair::generate().unwrap();
    let cert_pem = params.self_signed(&key).unwrap().pem();
    Root {
        id: format!("root-{n}"),
        name,
        params: params.clone(),
        cert_pem,
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
        active: true,
    }
}

fn colon_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let hex: Vec<String> = bytes[start..].iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

impl Connect {
    fn active(&self) -> &Root {
        self.roots.iter().rev().find(|r| r.active).unwrap()
    }

    fn issue(&self, service: &str, index: u64) -> Leaf {
        let named = self
            .impersonate
            .get(service)
            .map_or(service, String::as_str);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, named);
        params
            .subject_alt_names
            .push(SanType::URI(spiffe(named).try_into().unwrap()));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        // Start back a little for clock skew, as Consul does (a minute, or a tenth of a
        // short test lifetime).
        let not_before = now - (self.leaf_lifetime / 10).min(Duration::from_secs(60));
        let not_after = now + self.leaf_lifetime;
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        // A positive, minimally encoded DER integer: the first byte 0x01..=0x7f.
        let mut serial = fastrand::u64(..).to_be_bytes().to_vec();
        serial[0] = fastrand::u8(1..0x80);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.active().issuer).unwrap();
        let mut cert_pem = cert.pem();
        if let Some(cross) = &self.cross_signed {
            cert_pem.push_str(cross);
        }
        Leaf {
            serial: colon_hex(&serial),
            cert_pem,
            key_pem: key.serialize_pem(),
            not_before,
            not_after: now + self.leaf_lifetime,
            index,
        }
    }

    fn roots_json(&self) -> Value {
        let own = self.roots.iter().map(|r| {
            json!({"ID": r.id, "Name": r.name, "RootCert": r.cert_pem,
                   "IntermediateCerts": null, "Active": r.active})
        });
        let foreign = self.foreign_roots.iter().enumerate().map(|(n, pem)| {
            json!({"ID": format!("foreign-{n}"), "Name": "foreign", "RootCert": pem,
                   "IntermediateCerts": null, "Active": false})
        });
        let roots: Vec<Value> = own.chain(foreign).collect();
        json!({"ActiveRootID": self.active().id, "TrustDomain": TRUST_DOMAIN, "Roots": roots})
    }

    /// Renews leaves past seven tenths of their lifetime; returns whether any was.
    pub(super) fn renew_due(&mut self, index: u64) -> bool {
        if !self.renewal {
            return false;
        }
        let now = SystemTime::now();
        let due: Vec<String> = self
            .leaves
            .iter()
            .filter(|(_, l)| {
                let lifetime = l.not_after.duration_since(l.not_before).unwrap_or_default();
                now >= l.not_before + lifetime.mul_f64(0.7)
            })
            .map(|(s, _)| s.clone())
            .collect();
        for service in &due {
            let leaf = self.issue(service, index);
            self.leaves.insert(service.clone(), leaf);
        }
        !due.is_empty()
    }

    /// The earliest renewal point of an issued leaf.
    fn next_renewal(&self) -> Option<SystemTime> {
        if !self.renewal {
            return None;
        }
        self.leaves
            .values()
            .map(|l| {
                let lifetime = l.not_after.duration_since(l.not_before).unwrap_or_default();
                l.not_before + lifetime.mul_f64(0.7)
            })
            .min()
    }

    fn decide(&self, source: &str, destination: &str) -> (bool, String) {
        let score = |(s, d, _): &&(String, String, bool)| {
            let source = if s == source {
                2
            } else if s == "*" {
                1
            } else {
                0
            };
            let destination = if d == destination {
                2
            } else if d == "*" {
                1
            } else {
                0
            };
            (source > 0 && destination > 0).then_some(destination * 3 + source)
        };
        match self
            .intentions
            .iter()
            .filter_map(|i| score(&i).map(|s| (s, i)))
            .max_by_key(|(s, _)| *s)
        {
            Some((_, (s, d, allow))) => {
                let action = if *allow { "allow" } else { "deny" };
                (
                    *allow,
                    format!("Matched L4 intention: {s} => {d} ({action})"),
                )
            }
            None => (
                self.default_allow,
                "Default behavior configured by ACLs".to_owned(),
            ),
        }
    }
}

impl FakeConsul {
    /// Issues a new leaf for `service` now (the agent's blocking queries return it).
    pub fn rotate_leaf(&self, service: &str) {
        let mut connect = self.connect.lock().unwrap();
        let index = self.next_connect_index();
        let leaf = connect.issue(service, index);
        connect.leaves.insert(service.to_owned(), leaf);
        drop(connect);
        self.connect_changed();
    }

    /// A new active root. With `cross_sign`, the previous root signs it, and new leaves
    /// carry that cross-signed certificate, so a peer that only trusts the old root still
    /// accepts them. Every leaf is reissued by the new root.
    pub fn rotate_root(&self, cross_sign: bool) {
        let mut connect = self.connect.lock().unwrap();
        let n = u32::try_from(connect.roots.len()).unwrap() + 1;
        let new = new_root(n);
        connect.cross_signed = if cross_sign {
            let key = KeyPair::from_pem(&new.key_pem).unwrap();
            let cert = new
                .params
                .signed_by(&key, &connect.active().issuer)
                .unwrap();
            Some(cert.pem())
        } else {
            None
        };
        for root in &mut connect.roots {
            root.active = false;
        }
        connect.roots.push(new);
        let index = self.next_connect_index();
        connect.roots_index = index;
        let services: Vec<String> = connect.leaves.keys().cloned().collect();
        for service in services {
            let leaf = connect.issue(&service, index);
            connect.leaves.insert(service, leaf);
        }
        drop(connect);
        self.connect_changed();
    }

    /// The active root certificate, PEM.
    pub fn root_pem(&self) -> String {
        self.connect.lock().unwrap().active().cert_pem.clone()
    }

    /// Lists another CA's root beside this CA's own (as a cluster migrating CAs would).
    pub fn trust_root(&self, pem: &str) {
        let mut connect = self.connect.lock().unwrap();
        connect.foreign_roots.push(pem.to_owned());
        connect.roots_index = self.next_connect_index();
        drop(connect);
        self.connect_changed();
    }

    /// While frozen, the roots endpoint answers the set it had when frozen.
    pub fn freeze_roots(&self, frozen: bool) {
        let mut connect = self.connect.lock().unwrap();
        connect.frozen = frozen.then(|| (connect.roots_json(), connect.roots_index));
        drop(connect);
        self.connect_changed();
    }

    /// Leaves issued from now on for `service` name `as_service` instead.
    pub fn impersonate(&self, service: &str, as_service: &str) {
        let mut connect = self.connect.lock().unwrap();
        connect
            .impersonate
            .insert(service.to_owned(), as_service.to_owned());
    }

    /// The lifetime of leaves issued from now on (default 72 hours, Consul's).
    pub fn set_leaf_lifetime(&self, lifetime: Duration) {
        self.connect.lock().unwrap().leaf_lifetime = lifetime;
    }

    /// Whether the agent renews leaves by itself before they expire (default yes).
    pub fn set_leaf_renewal(&self, renew: bool) {
        self.connect.lock().unwrap().renewal = renew;
    }

    /// An intention from `source` to `destination` (either may be `*`).
    pub fn set_intention(&self, source: &str, destination: &str, allow: bool) {
        let mut connect = self.connect.lock().unwrap();
        connect
            .intentions
            .retain(|(s, d, _)| (s.as_str(), d.as_str()) != (source, destination));
        connect
            .intentions
            .push((source.to_owned(), destination.to_owned(), allow));
    }

    /// Makes every authorize call fail with a status, or answer late (`Fault::Status`,
    /// `Fault::Slow`), until `None`.
    pub fn set_authorize_fault(&self, fault: Option<super::fake_consul::Fault>) {
        self.connect.lock().unwrap().authorize_fault = fault;
    }

    /// What happens without a matching intention: allow (ACLs off, the default) or deny.
    pub fn set_default_allow(&self, allow: bool) {
        self.connect.lock().unwrap().default_allow = allow;
    }

    /// The serial of `service`'s current leaf.
    pub fn leaf_serial(&self, service: &str) -> Option<String> {
        let connect = self.connect.lock().unwrap();
        connect.leaves.get(service).map(|l| l.serial.clone())
    }

    /// Authorize requests answered.
    pub fn authorizations(&self) -> u64 {
        self.connect.lock().unwrap().authorizations
    }
}

fn param(raw: &Option<String>, key: &str) -> Option<String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.as_deref().unwrap_or_default()).unwrap_or_default();
    pairs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Waits, as a blocking query does, until `current` (the index of what is asked for)
/// moves past `asked` or `wait` passes; `renew` runs first at every wake-up.
async fn block(fake: &FakeConsul, raw: &Option<String>, current: impl Fn(&FakeConsul) -> u64) {
    let asked: u64 = param(raw, "index")
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    let wait = param(raw, "wait")
        .and_then(|w| super::fake_consul::parse_go_duration(&w))
        .unwrap_or(Duration::from_secs(300));
    let give_up = Instant::now() + wait;
    let mut changes = fake.connect_changes();
    loop {
        fake.renew_leaves();
        if asked == 0 || current(fake) > asked || Instant::now() >= give_up {
            return;
        }
        let renewal = fake.connect.lock().unwrap().next_renewal();
        let until = renewal
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .map_or(give_up, |d| give_up.min(Instant::now() + d));
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep_until(until) => {}
        }
    }
}

pub(super) async fn roots(
    State(fake): State<Arc<FakeConsul>>,
    RawQuery(raw): RawQuery,
) -> Response {
    fake.log(format!(
        "GET connect/ca/roots?{}",
        raw.clone().unwrap_or_default()
    ));
    let index_of = |fake: &FakeConsul| {
        let connect = fake.connect.lock().unwrap();
        connect
            .frozen
            .as_ref()
            .map_or(connect.roots_index, |(_, i)| *i)
    };
    block(&fake, &raw, index_of).await;
    let connect = fake.connect.lock().unwrap();
    let (body, index) = match &connect.frozen {
        Some((body, index)) => (body.clone(), *index),
        None => (connect.roots_json(), connect.roots_index),
    };
    ([("X-Consul-Index", index.to_string())], Json(body)).into_response()
}

pub(super) async fn leaf(
    State(fake): State<Arc<FakeConsul>>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Path(service): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    fake.log(format!(
        "GET connect/ca/leaf/{service}?{}",
        raw.clone().unwrap_or_default()
    ));
    if !policy.write {
        return super::fake_consul::denied("service:write");
    }
    {
        let mut connect = fake.connect.lock().unwrap();
        if !connect.leaves.contains_key(&service) {
            let index = fake.next_connect_index();
            let leaf = connect.issue(&service, index);
            connect.leaves.insert(service.clone(), leaf);
        }
    }
    let index_of = |fake: &FakeConsul| {
        let connect = fake.connect.lock().unwrap();
        connect.leaves.get(&service).map_or(0, |l| l.index)
    };
    block(&fake, &raw, index_of).await;
    let connect = fake.connect.lock().unwrap();
    let leaf = &connect.leaves[&service];
    let named = connect.impersonate.get(&service).unwrap_or(&service);
    let body = json!({
        "SerialNumber": leaf.serial, "CertPEM": leaf.cert_pem, "PrivateKeyPEM": leaf.key_pem,
        "Service": service, "ServiceURI": spiffe(named),
        "ValidAfter": time::OffsetDateTime::from(leaf.not_before).to_string(),
        "ValidBefore": time::OffsetDateTime::from(leaf.not_after).to_string(),
        "CreateIndex": leaf.index, "ModifyIndex": leaf.index,
    });
    ([("X-Consul-Index", leaf.index.to_string())], Json(body)).into_response()
}

pub(super) async fn authorize(
    State(fake): State<Arc<FakeConsul>>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Json(body): Json<Value>,
) -> Response {
    // All three are required (`api-docs/agent/connect.mdx`); the serial is colon-hex.
    let serial = body["ClientCertSerial"].as_str().unwrap_or_default();
    let colon_hex = |s: &str| {
        !s.is_empty()
            && s.split(':')
                .all(|byte| byte.len() == 2 && byte.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let (Some(target), Some(uri)) = (body["Target"].as_str(), body["ClientCertURI"].as_str())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "Target and ClientCertURI are required",
        )
            .into_response();
    };
    if !colon_hex(serial) {
        let message = "ClientCertSerial is required, colon-hex encoded";
        return (StatusCode::BAD_REQUEST, message).into_response();
    }
    let fault = fake.connect.lock().unwrap().authorize_fault.clone();
    match fault {
        Some(super::fake_consul::Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap();
            return (status, "injected fault").into_response();
        }
        Some(super::fake_consul::Fault::Slow(delay)) => tokio::time::sleep(delay).await,
        _ => {}
    }
    if !policy.write {
        return super::fake_consul::denied("service:write");
    }
    let source = uri
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once("/ns/"))
        .and_then(|(_, path)| path.rsplit_once("/svc/"))
        .map(|(_, service)| service.to_owned());
    let Some(source) = source else {
        return (
            StatusCode::BAD_REQUEST,
            "ClientCertURI not a valid Connect identifier",
        )
            .into_response();
    };
    let mut connect = fake.connect.lock().unwrap();
    connect.authorizations += 1;
    let (authorized, reason) = connect.decide(&source, target);
    fake.log(format!(
        "POST connect/authorize {source} => {target}: {authorized}"
    ));
    Json(json!({"Authorized": authorized, "Reason": reason})).into_response()
}
