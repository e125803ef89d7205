//! The client side of Connect-native mTLS: present the current leaf, trust only the current
//! CA roots, and check that the server's SPIFFE ID names the service being called (the TLS
//! server name, which the integrations set to the service name), in the datacenter and
//! namespace of the instance when Consul said them (then the server name is Consul's
//! `<service>.<namespace>.<datacenter>.internal.<trust domain>`), else in this client's.
//! DNS names are not checked.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use super::Keeper;
use super::certs::provider;
use super::identity::{CertFacts, IdentityError};

/// Checks a server's certificate: chain to the current roots, then its SPIFFE ID.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    keeper: Arc<Keeper>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// A rustls error for an identity that is not the one expected.
pub(crate) fn identity_error(error: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// Before the leaf and the roots arrive, nothing is trusted.
pub(crate) fn not_ready() -> rustls::Error {
    rustls::Error::General("Consul Connect: no leaf and CA roots from the agent yet".to_owned())
}

impl ServerVerifier {
    pub(crate) fn new(keeper: Arc<Keeper>) -> Self {
        Self {
            keeper,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.keeper.store.roots.load_full().ok_or_else(not_ready)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots.store,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let ServerName::DnsName(service) = server_name else {
            return Err(rustls::Error::General(
                "Consul Connect: the TLS server name must be the service called".to_owned(),
            ));
        };
        let me = self.keeper.store.leaf.load_full().ok_or_else(not_ready)?;
        let peer = CertFacts::read(end_entity).map_err(identity_error)?;
        // The instance's own datacenter and namespace when it was dialled by Consul's
        // service name for it, else this client's.
        let target = service.as_ref();
        let checked = me.facts.id.check_peer_at(&peer.id, target);
        checked
            .unwrap_or_else(|| me.facts.id.check_peer(&peer.id, target))
            .map_err(identity_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Presents the current leaf, whatever the server asks for.
#[derive(Debug)]
pub(crate) struct LeafResolver(pub(crate) Arc<Keeper>);

impl LeafResolver {
    pub(crate) fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0
            .store
            .leaf
            .load()
            .as_ref()
            .map(|leaf| Arc::clone(&leaf.key))
    }
}

impl ResolvesClientCert for LeafResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for LeafResolver {
    fn resolve(&self, _client_hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// The client configuration: this verifier and the leaf resolver.
/// Sessions are not resumed: a resumed session would skip the check against the current
/// roots (and long-lived HTTP/2 connections gain nothing from it).
pub(crate) fn client_config(keeper: &Arc<Keeper>) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier::new(Arc::clone(keeper))))
        .with_client_cert_resolver(Arc::new(LeafResolver(Arc::clone(keeper))));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
