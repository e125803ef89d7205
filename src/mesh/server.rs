//! The server side of Connect-native mTLS: serve the leaf, require a client certificate
//! from the current roots, and authorize every new connection with the agent.
//!
//! Authorization needs the agent (`POST /v1/agent/connect/authorize`), which a rustls
//! verifier cannot wait for, so it happens right after the handshake, before any request is
//! read. A denied connection is not served: over HTTP/2 every request on it is answered
//! with gRPC status `PERMISSION_DENIED` (7) and the agent's reason as `grpc-message` (HTTP
//! 403 for a request that is not gRPC), so the caller learns why; other connections are
//! closed. An agent that cannot be asked gives `UNAVAILABLE` (14) the same way: nothing is
//! served unauthorized.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::DistinguishedName;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::Keeper;
use super::certs::provider;
use super::client::{LeafResolver, identity_error, not_ready};
use super::identity::{CertFacts, SpiffeId};
use crate::error::Elapsed;
use crate::registry::consul::client::Client;

/// Checks a client's certificate against the current roots (and that it names a service).
#[derive(Debug)]
struct ClientVerifier {
    keeper: Arc<Keeper>,
    /// Made once: the verifier is asked for them at every handshake.
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the roots rotate under this verifier.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self.keeper.store.roots.load_full().ok_or_else(not_ready)?;
        roots
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        CertFacts::read(end_entity).map_err(identity_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server configuration: the current leaf, a client certificate required from the
/// current roots, ALPN `h2` and `http/1.1`, and no session resumption (a resumed session
/// would skip the check against the current roots).
pub(crate) fn server_config(keeper: &Arc<Keeper>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = ClientVerifier {
        keeper: Arc::clone(keeper),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(LeafResolver(Arc::clone(keeper))));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// What the agent said about a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Authorization {
    /// An intention (or the default policy) allows it.
    Allowed,
    /// An intention (or the default policy) denies it; the agent's reason.
    Denied(String),
    /// The agent could not be asked; the connection is not served.
    Unavailable(String),
}

/// A connection that completed the mTLS handshake, and the agent's decision on it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Accepted<IO> {
    /// The TLS stream.
    pub stream: TlsStream<IO>,
    /// The client's service identity.
    pub client: SpiffeId,
    /// Whether it may be served.
    pub authorization: Authorization,
}

/// Why a connection was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The TLS handshake failed (no client certificate, one the roots do not trust, one
    /// that names no service, a protocol error).
    #[error("mTLS handshake failed")]
    Handshake(#[source] std::io::Error),
    /// The handshake did not finish in time.
    #[error("mTLS handshake timed out")]
    Timeout(#[source] Elapsed),
}

/// Answers of the authorize endpoint, kept for a short time.
#[derive(Debug)]
pub(crate) struct Authorizer {
    client: Arc<Client>,
    target: String,
    answers: Mutex<Answers>,
}

/// The agent's answers by client certificate (URI, serial), each kept for `ttl`; at most
/// `capacity` of them (when full, the expired ones go, and if none has, all go).
#[derive(Debug)]
struct Answers {
    ttl: Duration,
    capacity: usize,
    by_client: HashMap<(String, String), (Instant, Authorization)>,
}

impl Answers {
    fn get(&self, key: &(String, String), now: Instant) -> Option<Authorization> {
        let (at, answer) = self.by_client.get(key)?;
        (now.saturating_duration_since(*at) < self.ttl).then(|| answer.clone())
    }

    fn put(&mut self, key: (String, String), answer: Authorization, now: Instant) {
        if self.by_client.len() >= self.capacity {
            let ttl = self.ttl;
            self.by_client
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            if self.by_client.len() >= self.capacity {
                self.by_client.clear();
            }
        }
        self.by_client.insert(key, (now, answer));
    }
}

impl Authorizer {
    pub(crate) fn new(client: Arc<Client>, target: String, ttl: Duration) -> Self {
        Self {
            client,
            target,
            answers: Mutex::new(Answers {
                ttl,
                capacity: 4096,
                by_client: HashMap::new(),
            }),
        }
    }

    /// Asks the agent whether `client` (its URI SAN and serial) may call the target, or
    /// answers from the cache. Failures to ask are not cached.
    pub(crate) async fn authorize(&self, uri: &str, serial: &str) -> Authorization {
        let key = (uri.to_owned(), serial.to_owned());
        if let Some(answer) = self.lock().get(&key, Instant::now()) {
            return answer;
        }
        match self
            .client
            .connect_authorize(&self.target, uri, serial)
            .await
        {
            Ok((allowed, reason)) => {
                let answer = if allowed {
                    Authorization::Allowed
                } else {
                    Authorization::Denied(reason)
                };
                self.lock().put(key, answer.clone(), Instant::now());
                answer
            }
            Err(error) => Authorization::Unavailable(crate::error::Chain(&error).to_string()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Completes the handshake within `limit` and authorizes the client.
pub(crate) async fn accept<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    authorizer: &Authorizer,
    io: IO,
    limit: Duration,
) -> Result<Accepted<IO>, AcceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stream = tokio::time::timeout(limit, acceptor.accept(io))
        .await
        .map_err(|_| AcceptError::Timeout(Elapsed(limit)))?
        .map_err(AcceptError::Handshake)?;
    let facts = {
        let (_, connection) = stream.get_ref();
        let end_entity = connection.peer_certificates().and_then(|c| c.first());
        // The verifier required a certificate that names a service.
        let facts = end_entity.map(|cert| CertFacts::read(cert));
        match facts {
            Some(Ok(facts)) => facts,
            _ => {
                return Err(AcceptError::Handshake(std::io::Error::other(
                    "the client presented no service certificate",
                )));
            }
        }
    };
    let authorization = authorizer.authorize(&facts.uri, &facts.serial).await;
    Ok(Accepted {
        stream,
        client: facts.id,
        authorization,
    })
}

/// Serves a connection that may not be served: over HTTP/2, every request is answered
/// with the decision (gRPC status 7 or 14, or HTTP 403 or 503); otherwise it is closed.
pub(crate) async fn refuse<IO>(stream: TlsStream<IO>, authorization: Authorization)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    if !h2 {
        return;
    }
    let (grpc_status, http_status, reason) = match authorization {
        Authorization::Denied(reason) => ("7", http::StatusCode::FORBIDDEN, reason),
        Authorization::Unavailable(reason) => ("14", http::StatusCode::SERVICE_UNAVAILABLE, reason),
        Authorization::Allowed => return,
    };
    let message = format!("Consul Connect: connection not authorized: {reason}");
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let grpc = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let response = if grpc {
                http::Response::builder()
                    .status(http::StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header("grpc-status", grpc_status)
                    .header("grpc-message", percent_encode(&message))
                    .body(String::new())
            } else {
                http::Response::builder()
                    .status(http_status)
                    .body(message.clone())
            };
            std::future::ready(response)
        });
    let connection = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    // A refused client gets a bounded time to read its answers.
    let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
}

/// gRPC's `grpc-message` encoding: percent-encode bytes outside printable ASCII and `%`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> (String, String) {
        (
            format!("spiffe://td/ns/default/dc/dc1/svc/s{n}"),
            format!("{n:02x}"),
        )
    }

    /// Answers last their ttl and no longer; a full cache drops the expired ones first,
    /// then everything, and never grows past its capacity.
    #[tokio::test(start_paused = true)]
    async fn answers_expire_and_the_cache_stays_bounded() {
        let _limit = tower_sd_testkit::time_limit(10);
        let mut answers = Answers {
            ttl: Duration::from_secs(1),
            capacity: 3,
            by_client: HashMap::new(),
        };
        let start = Instant::now();
        answers.put(key(1), Authorization::Allowed, start);
        let later = |ms| start + Duration::from_millis(ms);
        assert_eq!(
            answers.get(&key(1), later(999)),
            Some(Authorization::Allowed)
        );
        assert_eq!(
            answers.get(&key(1), later(1_000)),
            None,
            "expired at the ttl"
        );
        assert_eq!(answers.get(&key(2), start), None);

        answers.put(key(2), Authorization::Denied("no".into()), later(500));
        answers.put(key(3), Authorization::Allowed, later(600));
        // Full at 1.2 s: only key 1 has expired, so it alone goes.
        answers.put(key(4), Authorization::Allowed, later(1_200));
        assert_eq!(answers.by_client.len(), 3);
        assert!(!answers.by_client.contains_key(&key(1)));
        assert_eq!(
            answers.get(&key(2), later(1_200)),
            Some(Authorization::Denied("no".into()))
        );
        // Full at 1.3 s with nothing expired: everything goes but the new answer.
        answers.put(key(5), Authorization::Allowed, later(1_300));
        assert_eq!(answers.by_client.len(), 1);
        assert_eq!(
            answers.get(&key(5), later(1_300)),
            Some(Authorization::Allowed)
        );
        // Full at 2.3 s, when key 5 is exactly a ttl old: it is expired (as `get` says), so
        // it alone goes and the younger answers stay.
        answers.put(key(6), Authorization::Allowed, later(1_400));
        answers.put(key(7), Authorization::Allowed, later(1_500));
        answers.put(key(8), Authorization::Allowed, later(2_300));
        assert_eq!(answers.by_client.len(), 3);
        assert!(!answers.by_client.contains_key(&key(5)));
        assert!(answers.by_client.contains_key(&key(6)));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("no: 100% é"), "no: 100%25 %C3%A9");
    }
}
