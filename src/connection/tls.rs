//! [`TlsConfig`]: how connections dial over TLS, as a rustls client configuration with the
//! ring provider (never a process-wide provider) and ALPN `h2`.

use std::fmt;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{BoxError, Error, Result};

/// Where a [`TlsConfig`]'s client configurations come from: fixed, or asked for at every
/// dial (so that a rotated certificate applies to new connections, and open ones stay).
pub trait ClientConfigSource: Send + Sync + 'static {
    /// The configuration for the next connection. It must offer ALPN `h2`.
    fn client_config(&self) -> Arc<ClientConfig>;
}

impl ClientConfigSource for Arc<ClientConfig> {
    fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(self)
    }
}

/// TLS for every connection: the roots to trust, an optional client certificate (mutual
/// TLS), and the server name checked against the server's certificate.
///
/// The server name is [`server_name`](Self::server_name) when set, else the one the
/// integration chooses (the service name for
/// [`LoadBalancedChannel`](crate::tonic::LoadBalancedChannel)), never the dialled IP address.
///
/// # Examples
///
/// ```no_run
/// use tower_sd::connection::TlsConfig;
///
/// # fn main() -> Result<(), tower_sd::Error> {
/// let ca = std::fs::read("ca.pem").unwrap();
/// let (cert, key) = (std::fs::read("client.pem").unwrap(), std::fs::read("client.key").unwrap());
/// let tls = TlsConfig::with_ca_pem(&ca)?.identity_pem(&cert, &key)?;
/// # drop(tls);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    source: Arc<dyn ClientConfigSource>,
    server_name: Option<String>,
    /// The server name for an instance, when it says more than its service (the mesh's:
    /// the datacenter and namespace the server's identity must name).
    name_of_instance: Option<NameOfInstance>,
    /// A server that negotiates no ALPN speaks HTTP/2 (prior knowledge).
    http2_without_alpn: bool,
    /// Kept to rebuild the configuration with a client certificate.
    roots: Option<Arc<rustls::RootCertStore>>,
}

/// The server name to dial an instance with, when there is one for it.
pub(crate) type NameOfInstance =
    Arc<dyn Fn(&crate::instance::ServiceInstance) -> Option<String> + Send + Sync>;

fn invalid(key: &str, source: impl Into<BoxError>) -> Error {
    Error::InvalidConfig {
        key: key.to_owned(),
        source: source.into(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn with_alpn(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

impl TlsConfig {
    /// Trusts the platform's certificate store (rustls-platform-verifier).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the platform verifier cannot be set up.
    pub fn with_platform_roots() -> Result<Self> {
        use rustls_platform_verifier::BuilderVerifierExt;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("tls", e))?
            .with_platform_verifier()
            .map_err(|e| invalid("tls", e))?
            .with_no_client_auth();
        Ok(Self::from_source(Arc::new(with_alpn(config))))
    }

    /// Trusts only the CA certificates in this PEM (a private CA).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the PEM holds no certificate or one that is not valid.
    pub fn with_ca_pem(pem: &[u8]) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| invalid("ca_certificate", e))?;
            roots.add(cert).map_err(|e| invalid("ca_certificate", e))?;
        }
        if roots.is_empty() {
            return Err(invalid("ca_certificate", "the PEM holds no certificate"));
        }
        let roots = Arc::new(roots);
        let config = Self::builder(&roots)?.with_no_client_auth();
        Ok(Self {
            source: Arc::new(with_alpn(config)),
            server_name: None,
            name_of_instance: None,
            http2_without_alpn: false,
            roots: Some(roots),
        })
    }

    /// This rustls configuration, fixed. ALPN is set to `h2` on a copy.
    pub fn from_rustls(config: ClientConfig) -> Self {
        Self::from_source(Arc::new(with_alpn(config)))
    }

    /// Configurations asked for at every dial, e.g. one whose certificate rotates. Each must
    /// offer ALPN `h2`.
    pub fn from_source(source: Arc<dyn ClientConfigSource>) -> Self {
        Self {
            source,
            server_name: None,
            name_of_instance: None,
            http2_without_alpn: false,
            roots: None,
        }
    }

    /// Presents this client certificate chain and key (PEM) for mutual TLS. Only for a
    /// configuration made with [`with_ca_pem`](Self::with_ca_pem).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the PEMs do not hold a certificate and its key, or the
    /// configuration did not come from `with_ca_pem`.
    pub fn identity_pem(self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Self> {
        let Some(roots) = &self.roots else {
            return Err(invalid(
                "identity",
                "a client certificate needs a configuration made with `with_ca_pem`; \
                 set it on a rustls configuration with `from_rustls` instead",
            ));
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("identity", e))?;
        if chain.is_empty() {
            return Err(invalid("identity", "the PEM holds no certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid("identity", e))?;
        let config = Self::builder(roots)?
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid("identity", e))?;
        Ok(Self {
            source: Arc::new(with_alpn(config)),
            ..self
        })
    }

    /// The name checked against the server's certificate (and sent as SNI), instead of the
    /// one the integration chooses.
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Takes a server that negotiates no ALPN protocol at all to speak HTTP/2 (prior
    /// knowledge), instead of failing the dial with
    /// [`DialError::NoHttp2`](super::DialError::NoHttp2) (the default, since such a server
    /// usually speaks HTTP/1.1). A server that negotiates another protocol still fails it.
    ///
    /// Envoy sidecars in a Consul service mesh negotiate `h2` only for services whose
    /// protocol is `http2` or `grpc`; for the default protocol, `tcp`, they proxy the bytes
    /// to the service and negotiate no ALPN, so
    /// [`ConsulConnect::client_tls`](crate::mesh::ConsulConnect::client_tls) turns this on.
    #[must_use]
    pub fn http2_without_alpn(mut self, enabled: bool) -> Self {
        self.http2_without_alpn = enabled;
        self
    }

    /// Whether the negotiated ALPN protocol (`None`: none) lets the connection speak
    /// HTTP/2.
    pub(crate) fn speaks_http2(&self, alpn: Option<&[u8]>) -> bool {
        match alpn {
            Some(protocol) => protocol == b"h2",
            None => self.http2_without_alpn,
        }
    }

    fn builder(
        roots: &Arc<rustls::RootCertStore>,
    ) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("tls", e))?
            .with_root_certificates(Arc::clone(roots)))
    }

    /// Names each instance's server by `name_of` when it returns a name (unless a
    /// [`server_name`](Self::server_name) is set).
    #[cfg_attr(not(feature = "consul-connect"), allow(dead_code))]
    pub(crate) fn name_instances(mut self, name_of: NameOfInstance) -> Self {
        self.name_of_instance = Some(name_of);
        self
    }

    /// The server name `instance` is to be dialled with, when one is set for it.
    pub(crate) fn instance_name(
        &self,
        instance: &crate::instance::ServiceInstance,
    ) -> Option<String> {
        self.name_of_instance
            .as_ref()
            .and_then(|name_of| name_of(instance))
    }

    /// The server name, or `default` when none is set.
    pub(crate) fn name_or(&self, default: &str) -> Result<ServerName<'static>> {
        let name = self.server_name.as_deref().unwrap_or(default);
        ServerName::try_from(name.to_owned()).map_err(|e| invalid("tls_server_name", e))
    }

    pub(crate) fn client_config(&self) -> Arc<ClientConfig> {
        self.source.client_config()
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .field("http2_without_alpn", &self.http2_without_alpn)
            .finish_non_exhaustive()
    }
}
