//! Consul Connect-native mutual TLS (feature `consul-connect`): this process takes part in
//! the Consul service mesh itself, with no sidecar proxy. Enrollment (the `Connect` block of a
//! registration) and discovery of mesh endpoints are the Consul registry's
//! ([`mesh_registration`](crate::registry::consul::ConsulRegistryBuilder::mesh_registration),
//! [`mesh_discovery`](crate::registry::consul::ConsulRegistryBuilder::mesh_discovery)).
//!
//! `mesh::ConsulConnect`
//! fetches the service's leaf certificate and the CA roots from the local agent with blocking
//! queries and keeps them fresh in the background (the leaf is asked for again at nine tenths
//! of its lifetime even if the agent's query has not returned); a rotation applies to new
//! connections, and open ones keep theirs. TLS sessions are never resumed, so every connection
//! is verified against the roots current at its handshake.
//!
//! ```no_run
//! use tower_sd::mesh::ConsulConnect;
//! use tower_sd::registry::consul::{ConsulRegistry, MeshRegistration};
//! use tower_sd::tonic::LoadBalancedChannel;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let consul = ConsulRegistry::builder().from_env()
//!         .mesh_registration(MeshRegistration::Native).mesh_discovery(true).build()?;
//!     // Server: tonic on authorized mTLS connections only.
//!     let api = ConsulConnect::builder(&consul, "api").build().await?;
//!     let listener = tokio::net::TcpListener::bind("0.0.0.0:8443").await?;
//!     let (_, health) = tonic_health::server::health_reporter();
//!     tokio::spawn(tonic::transport::Server::builder().add_service(health)
//!         .serve_with_incoming(api.incoming(listener)));
//!     // Client: present web's leaf, trust Consul's roots, expect the server to be `api`.
//!     let web = ConsulConnect::builder(&consul, "web").build().await?;
//!     let channel = LoadBalancedChannel::builder(consul, "api")
//!         .tls(web.client_tls()?)
//!         .build();
//!     # drop(channel);
//!     Ok(())
//! }
//! ```
//!
//! - **Client** (`client_tls()`, a `TlsConfig` for `LoadBalancedChannel` and
//!   `DiscoveryLayer::over_connections`): presents the current leaf, trusts only the current
//!   roots, and checks that the server's certificate carries
//!   `spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<service>` for the service called (the TLS
//!   server name, which the integrations set to the service name), in this service's namespace
//!   and datacenter. DNS names are not checked; as in Consul's Go SDK, the trust domain is left
//!   to the roots.
//! - **Server** (`incoming(listener)` for tonic's `serve_with_incoming` or hyper; `accept(io)`
//!   for your own loop; `server_config()` for the bare rustls configuration): serves the leaf,
//!   requires a client certificate from the current roots, and authorizes each new connection
//!   with the agent (`Target`, `ClientCertURI`, `ClientCertSerial`), caching answers for 1 s
//!   (`authorization_cache`). **A denied connection is not refused at the handshake** (a rustls
//!   verifier cannot wait for the agent): its handshake completes, then every request on it is
//!   answered with gRPC status `PERMISSION_DENIED` and the agent's reason (`Matched L4
//!   intention: web => api (deny)`), or HTTP 403 for a request that is not gRPC. An agent that
//!   cannot be asked gives `UNAVAILABLE`; nothing is served unauthorized.
//! - **Errors**: [`build`](ConsulConnectBuilder::build) fails with the agent's error when leaf and roots have not both
//!   arrived within [`certificates_within`](ConsulConnectBuilder::certificates_within) (`Error::Unreachable` for an agent that is down, `Error::Status` 403 for a
//!   token without `service:write`), never hangs. A server certificate naming another service
//!   fails the connection with `IdentityError::Mismatch`, which the call's `UNAVAILABLE` message
//!   quotes.
//!
//! **Deprecated upstream.** Consul marks the agent's Connect-native endpoints and its Go SDK for
//! native applications deprecated since 1.18, in favour of a future proxyless integration. They
//! are still served, and many clusters run older versions; that is why the native part has a
//! feature of its own. The endpoints it uses:
//!
//! | endpoint | for | Consul docs |
//! | --- | --- | --- |
//! | `GET /v1/agent/connect/ca/roots` (blocking) | trust anchors, trust domain | `api-docs/agent/connect.mdx`, "List Certificate Authority (CA) Root Certificates" |
//! | `GET /v1/agent/connect/ca/leaf/:service` (blocking; `service:write`) | the leaf and its key | `api-docs/agent/connect.mdx`, "Service Leaf Certificate" |
//! | `POST /v1/agent/connect/authorize` (`service:write`) | intentions, per connection | `api-docs/agent/connect.mdx`, "Authorize" |
//! | `GET /v1/health/connect/:service` (blocking) | mesh endpoints | `api-docs/health.mdx`, "List Service Instances for Mesh-enabled Service" |
//! | `PUT /v1/agent/service/register` with `Connect` | enrollment | `api-docs/agent/service.mdx`, "Connect Structure"; `connect/proxies/deploy-sidecar-services.mdx` |
//!
//! Not supported: L7 intentions (the authorize endpoint treats them as deny), a peer in another
//! datacenter or namespace than the caller's (the SPIFFE check expects the caller's), mesh
//! gateways, cluster peering, and the xDS side of the mesh.
//!
//! Run the example against a dev agent (it enables Connect):
//!
//! ```sh
//! consul agent -dev &
//! cargo run --example consul_connect --features consul-connect,tonic   # three "status: Serving"
//! consul intention create -deny tower-sd-web tower-sd-api
//! cargo run --example consul_connect --features consul-connect,tonic   # PERMISSION_DENIED, with the reason
//! ```
//!
//! The tests (`tests/consul_connect.rs`, `tests/consul_mesh.rs`) run real tonic and hyper servers
//! and clients over real mTLS against the fake agent, whose CA (`testkit/src/fake_connect.rs`)
//! issues rcgen certificates with SPIFFE URI SANs, blocks on roots and leaves, renews leaves,
//! rotates leaves and roots on demand (with or without cross-signing), and evaluates intentions
//! with Consul's precedence and default allow or deny. `CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo test
//! --all-features --test consul_connect --test consul_mesh -- --ignored` runs the real-agent
//! variants.

mod agent;
mod certs;
mod client;
mod identity;
mod incoming;
mod server;

pub use identity::{IdentityError, SpiffeId};
pub use server::{AcceptError, Accepted, Authorization};

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

use crate::connection::TlsConfig;
use crate::error::{Elapsed, Error, Result};
use crate::registry::consul::{ConsulRegistry, META_DATACENTER, META_NAMESPACE};
use agent::AgentWatch;
use certs::Store;
use server::Authorizer;

/// Configures a [`ConsulConnect`]; see [`ConsulConnect::builder`].
#[derive(Debug)]
#[must_use]
pub struct ConsulConnectBuilder {
    consul: ConsulRegistry,
    service: String,
    authorization_cache: Duration,
    handshake_timeout: Duration,
    certificates_within: Duration,
}

impl ConsulConnectBuilder {
    /// How long [`build`](Self::build) waits for the agent's leaf certificate and CA roots
    /// (default 10 s).
    pub fn certificates_within(mut self, limit: Duration) -> Self {
        self.certificates_within = limit;
        self
    }

    /// How long an answer of the authorize endpoint is reused for connections from the same
    /// client certificate (default 1 s). The agent answers from its own cache in
    /// microseconds, so this only spares a request per connection under connection churn;
    /// a changed intention applies to new connections after at most this long.
    pub fn authorization_cache(mut self, ttl: Duration) -> Self {
        self.authorization_cache = ttl;
        self
    }

    /// The most an incoming connection's TLS handshake may take (default 5 s).
    pub fn handshake_timeout(mut self, limit: Duration) -> Self {
        self.handshake_timeout = limit;
        self
    }

    /// Starts following the leaf and the roots, and waits for both, up to
    /// [`certificates_within`](Self::certificates_within).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an empty service name or one with `/`. When the leaf
    /// and the roots have not both arrived in time: the agent's last error
    /// ([`Error::Unreachable`] for an agent that is down, [`Error::Status`] 403 for a token
    /// without `service:write`), or [`Error::Timeout`] when no answer came at all. The
    /// background task is stopped.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub async fn build(self) -> Result<ConsulConnect> {
        let limit = self.certificates_within;
        if self.service.is_empty() || self.service.contains('/') {
            return Err(Error::InvalidConfig {
                key: "service".to_owned(),
                source: format!("`{}` is not a Consul service name", self.service).into(),
            });
        }
        let client = self.consul.client();
        let store = Arc::new(Store::new());
        let task = tokio::spawn(certs::refresh(
            Arc::clone(&store),
            AgentWatch::roots(Arc::clone(&client)),
            AgentWatch::leaf(Arc::clone(&client), &self.service),
        ));
        let keeper = Arc::new(Keeper { store, task });
        let mut changes = keeper.store.changes.subscribe();
        let ready = || keeper.store.leaf.load().is_some() && keeper.store.roots.load().is_some();
        let waited = tokio::time::timeout(limit, changes.wait_for(|_| ready())).await;
        if !matches!(waited, Ok(Ok(_))) {
            keeper.task.abort();
            let last = keeper
                .store
                .last_error
                .lock()
                .ok()
                .and_then(|mut e| e.take());
            return Err(last.unwrap_or(Error::Timeout {
                registry: "consul",
                source: Elapsed(limit),
            }));
        }
        let authorizer = Authorizer::new(client, self.service.clone(), self.authorization_cache);
        let server_config = server::server_config(&keeper).map_err(tls_error)?;
        Ok(ConsulConnect {
            inner: Arc::new(Inner {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
                keeper,
                authorizer,
                service: self.service,
                handshake_timeout: self.handshake_timeout,
            }),
        })
    }
}

/// Keeps the refresher running while anything uses its certificates: the
/// [`ConsulConnect`] handles and every TLS configuration made from them hold it.
#[derive(Debug)]
pub(crate) struct Keeper {
    pub(crate) store: Arc<Store>,
    task: JoinHandle<()>,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The service's current leaf certificate, as [`ConsulConnect::leaf`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeafInfo {
    /// The identity it carries.
    pub id: SpiffeId,
    /// Its serial, colon-separated hex as Consul writes it.
    pub serial: String,
    /// When it expires (`ValidBefore`).
    pub not_after: SystemTime,
}

/// A Connect-native service identity: its leaf certificate and the CA roots, kept fresh,
/// and the TLS configurations made from them. Cheap to clone; the background refresh stops
/// when the last handle and the last TLS configuration made from it are dropped.
#[derive(Clone)]
pub struct ConsulConnect {
    inner: Arc<Inner>,
}

struct Inner {
    keeper: Arc<Keeper>,
    /// One server configuration serves every connection: it reads the current leaf and
    /// roots at each handshake.
    acceptor: tokio_rustls::TlsAcceptor,
    authorizer: Authorizer,
    service: String,
    handshake_timeout: Duration,
}

impl fmt::Debug for ConsulConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConnect")
            .field("service", &self.inner.service)
            .field("leaf", &self.leaf().map(|l| l.serial))
            .finish_non_exhaustive()
    }
}

fn tls_error(error: rustls::Error) -> Error {
    Error::InvalidConfig {
        key: "tls".to_owned(),
        source: error.into(),
    }
}

impl ConsulConnect {
    /// A builder for `service`, whose certificates come from `consul`'s agent (its address
    /// and token; the token needs `service:write` on `service`).
    pub fn builder(consul: &ConsulRegistry, service: impl Into<String>) -> ConsulConnectBuilder {
        ConsulConnectBuilder {
            consul: consul.clone(),
            service: service.into(),
            authorization_cache: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            certificates_within: Duration::from_secs(10),
        }
    }

    /// The service this identity is.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The current leaf certificate.
    pub fn leaf(&self) -> Option<LeafInfo> {
        self.inner
            .keeper
            .store
            .leaf
            .load()
            .as_ref()
            .map(|leaf| LeafInfo {
                id: leaf.facts.id.clone(),
                serial: leaf.facts.serial.clone(),
                not_after: leaf.facts.not_after,
            })
    }

    /// The number of CA roots trusted now.
    pub fn roots(&self) -> usize {
        self.inner
            .keeper
            .store
            .roots
            .load()
            .as_ref()
            .map_or(0, |r| r.store.len())
    }

    /// TLS for calling mesh services: see the [module docs](self). The server name of each
    /// connection (the service name, with the integrations) is the service expected in the
    /// server's SPIFFE ID. A server that negotiates no ALPN is taken to speak HTTP/2, as an
    /// Envoy sidecar of a service of Consul's default protocol (`tcp`) does: it negotiates
    /// `h2` only for `http2` and `grpc` services
    /// ([`TlsConfig::http2_without_alpn`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when rustls cannot be set up (not expected with ring).
    pub fn client_tls(&self) -> Result<TlsConfig> {
        let config = client::client_config(&self.inner.keeper).map_err(tls_error)?;
        // An instance Consul placed in a datacenter and namespace is dialled by its service
        // name there, which the verifier reads back: its server must be in that datacenter
        // and namespace, not the caller's (as Consul's Go SDK checks).
        let keeper = Arc::clone(&self.inner.keeper);
        let name_of = move |instance: &crate::instance::ServiceInstance| {
            let leaf = keeper.store.leaf.load_full()?;
            let meta = |key: &str| instance.metadata.get(key).map(String::as_str);
            let (datacenter, namespace) = (meta(META_DATACENTER)?, meta(META_NAMESPACE)?);
            leaf.facts
                .id
                .service_sni(&instance.name, namespace, datacenter)
        };
        // Envoy sidecars of `tcp` services (Consul's default protocol) negotiate no ALPN.
        Ok(TlsConfig::from_rustls(config)
            .http2_without_alpn(true)
            .name_instances(Arc::new(name_of)))
    }

    /// The rustls server configuration: serves the current leaf, requires a client
    /// certificate from the current roots that names a service, offers ALPN `h2` and
    /// `http/1.1`. It does not authorize: use [`accept`](Self::accept) or
    /// [`incoming`](Self::incoming), or [`authorize`](Self::authorize) yourself.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when rustls cannot be set up (not expected with ring).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        server::server_config(&self.inner.keeper)
            .map(Arc::new)
            .map_err(tls_error)
    }

    /// Asks the agent (or the short cache) whether the client with this certificate URI
    /// and serial may call this service.
    pub async fn authorize(
        &self,
        client_cert_uri: &str,
        client_cert_serial: &str,
    ) -> Authorization {
        self.inner
            .authorizer
            .authorize(client_cert_uri, client_cert_serial)
            .await
    }

    /// Completes the mTLS handshake on `io` and authorizes the client. Serve the stream
    /// only when [`Accepted::authorization`] is [`Authorization::Allowed`].
    ///
    /// # Errors
    ///
    /// [`AcceptError`] when the handshake fails or times out.
    pub async fn accept<IO>(&self, io: IO) -> Result<Accepted<IO>, AcceptError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let inner = &self.inner;
        server::accept(
            &inner.acceptor,
            &inner.authorizer,
            io,
            inner.handshake_timeout,
        )
        .await
    }

    /// The authorized mTLS connections on `listener`, for tonic's
    /// `Server::serve_with_incoming` (tonic implements its `Connected` for this stream type
    /// with its `tls-ring` or `tls-aws-lc` feature) or a hyper server.
    ///
    /// A background task accepts, handshakes and authorizes; a connection that fails its
    /// handshake is logged and closed, a denied one is answered `PERMISSION_DENIED` (see
    /// [`Authorization`]). Handshakes in progress and refused connections each have a
    /// budget of their own, so silent sockets or a denied peer reconnecting cannot keep a
    /// client out (see [`Incoming`]). The task stops when the stream is dropped.
    pub fn incoming(&self, listener: TcpListener) -> Incoming {
        let (sender, receiver) = mpsc::channel(64);
        // The loop ends (and closes the listener) as soon as the receiver is dropped.
        tokio::spawn(incoming::accept_loop(self.clone(), listener, sender));
        Incoming { receiver }
    }
}

/// The authorized connections of [`ConsulConnect::incoming`]. Dropping it stops accepting.
///
/// At most 256 handshakes (TLS, then the agent's answer) are in progress at once, each
/// within the handshake timeout; a new connection past that takes the place of the oldest
/// one still in progress, which is closed: a socket that says nothing cannot hold its place
/// against a client that talks. At most 64 refused connections get their answers at once
/// (for up to 30 s each); past that a refused one is closed at once. Authorized connections
/// are handed over and count against neither.
#[derive(Debug)]
pub struct Incoming {
    receiver: mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>>,
}

impl Stream for Incoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}
