//! [`LoadBalancedChannel`]: a tonic channel over the healthy instances of a service.
//!
//! Generated clients take it as they take a [`tonic::transport::Channel`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use tower_sd::tonic::LoadBalancedChannel;
//! use tower_sd::{MemoryRegistry, ServiceRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
//! let channel = LoadBalancedChannel::builder(registry, "greeter")
//!     .connect_timeout(std::time::Duration::from_secs(1))
//!     .build();
//! // let mut client = GreeterClient::new(channel);
//! # drop(channel);
//! # Ok(())
//! # }
//! ```
//!
//! Each instance gets its own lazily connecting tonic `Channel`, built with the settings given
//! to the [`LoadBalancedChannelBuilder`]; a [`Balance`] picks one per request. When there are no endpoints, the
//! call fails with `Status::unavailable` naming the service (after `wait_for_endpoints`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Uri};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::Service;

use crate::balance::{self, Balance, HttpStatus, LoadMetric, OutlierDetection, ResponseBody};
use crate::discover::RegistryDiscover;
use crate::error::{BoxError, Error};
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::ServiceRegistry;

/// A `Clone`able tonic channel that balances every request over the healthy instances of one
/// service, following the registry.
///
/// Build it with [`LoadBalancedChannel::builder`]. Clones share one balancer; each clone
/// picks on its own, without a lock.
#[derive(Clone)]
pub struct LoadBalancedChannel {
    balance: Balance<Channel, String, HttpStatus>,
    /// A failure from `poll_ready`, returned by the next `call`: generated clients turn
    /// readiness errors into `Status::unknown`, so the error waits for the call, where it
    /// keeps its own status (`unavailable` for no endpoints).
    failed: Option<tonic::Status>,
}

/// Configures a [`LoadBalancedChannel`]: the tonic settings applied to every endpoint it
/// creates, and the balancer's.
#[must_use]
pub struct LoadBalancedChannelBuilder {
    registry: Arc<dyn ServiceRegistry>,
    query: ServiceQuery,
    settings: Settings,
    tls_server_name: Option<String>,
    balance: balance::BalanceBuilder,
}

/// The tonic settings every endpoint is made with.
#[derive(Clone, Default)]
struct Settings {
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    tcp_keepalive: Option<Duration>,
    http2_keep_alive_interval: Option<Duration>,
    keep_alive_timeout: Option<Duration>,
    keep_alive_while_idle: bool,
    concurrency_limit: Option<usize>,
    tls: Option<ClientTlsConfig>,
    user_agent: Option<HeaderValue>,
    origin: Option<Uri>,
}

// ===== impl LoadBalancedChannel =====

impl LoadBalancedChannel {
    /// A builder for a channel to the instances of `query` in `registry`.
    pub fn builder(
        registry: Arc<dyn ServiceRegistry>,
        query: impl Into<ServiceQuery>,
    ) -> LoadBalancedChannelBuilder {
        let query = query.into();
        LoadBalancedChannelBuilder {
            balance: Balance::builder()
                .service_name(query.name.clone())
                .keep_clones(16),
            registry,
            query,
            settings: Settings::default(),
            tls_server_name: None,
        }
    }

    /// The balancer underneath, for its statistics ([`Balance::endpoints`]).
    pub fn balance(&self) -> &Balance<Channel, String, HttpStatus> {
        &self.balance
    }
}

impl Service<http::Request<Body>> for LoadBalancedChannel {
    type Response = http::Response<ResponseBody<Body>>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.balance.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(error)) => {
                self.failed = Some(status_of(error));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.failed.take() {
            Some(status) => ResponseFuture {
                state: State::Failed {
                    status: Some(status),
                },
            },
            None => ResponseFuture {
                state: State::Balanced {
                    inner: self.balance.call(request),
                },
            },
        }
    }
}

impl fmt::Debug for LoadBalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancedChannel")
            .field("service", &self.balance.service_name())
            .finish_non_exhaustive()
    }
}

/// The gRPC status for a balancer error: [`Error`]s map by kind; other errors (transport)
/// are left for tonic to classify.
fn status_of(error: BoxError) -> tonic::Status {
    match error.downcast::<Error>() {
        Ok(error) => tonic::Status::from(*error),
        Err(error) => tonic::Status::from_error(error),
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::NoEndpoints { .. }
            | Error::NoHealthyEndpoints { .. }
            | Error::DiscoveryStopped { .. }
            | Error::Unreachable { .. }
            | Error::Timeout { .. } => tonic::Status::unavailable(message),
            Error::InvalidConfig { .. } | Error::InvalidInstance { .. } => {
                tonic::Status::invalid_argument(message)
            }
            Error::Unsupported { .. } => tonic::Status::unimplemented(message),
            _ => tonic::Status::internal(message),
        }
    }
}

type ChannelFuture = <Channel as Service<http::Request<Body>>>::Future;

pin_project! {
    /// The response future of [`LoadBalancedChannel`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Balanced { #[pin] inner: balance::ResponseFuture<ChannelFuture, HttpStatus> },
        Failed { status: Option<tonic::Status> },
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody<Body>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Balanced { inner } => inner.poll(cx),
            StateProj::Failed { status } => {
                let status = status.take().expect("polled after completion");
                Poll::Ready(Err(Box::new(status)))
            }
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Balanced { .. } => "dispatched",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

// ===== impl LoadBalancedChannelBuilder =====

impl LoadBalancedChannelBuilder {
    /// Time limit to establish a connection to an instance.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = Some(timeout);
        self
    }

    /// Time limit for each request.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = Some(timeout);
        self
    }

    /// TCP keepalive on each connection.
    pub fn tcp_keepalive(mut self, interval: Duration) -> Self {
        self.settings.tcp_keepalive = Some(interval);
        self
    }

    /// HTTP/2 keepalive ping interval.
    pub fn http2_keep_alive_interval(mut self, interval: Duration) -> Self {
        self.settings.http2_keep_alive_interval = Some(interval);
        self
    }

    /// How long to wait for a keepalive ping's answer.
    pub fn keep_alive_timeout(mut self, timeout: Duration) -> Self {
        self.settings.keep_alive_timeout = Some(timeout);
        self
    }

    /// Send keepalive pings on idle connections too.
    pub fn keep_alive_while_idle(mut self, enabled: bool) -> Self {
        self.settings.keep_alive_while_idle = enabled;
        self
    }

    /// Requests in flight per endpoint, at most.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.settings.concurrency_limit = Some(limit);
        self
    }

    /// Dial every instance over TLS with this configuration. The server name checked
    /// against certificates is [`tls_server_name`](Self::tls_server_name), by default the
    /// service name, never the dialled IP address.
    pub fn tls_config(mut self, config: ClientTlsConfig) -> Self {
        self.settings.tls = Some(config);
        self
    }

    /// The TLS server name (SNI and certificate check); default: the service name.
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// The `user-agent` header sent with every request.
    pub fn user_agent(mut self, user_agent: HeaderValue) -> Self {
        self.settings.user_agent = Some(user_agent);
        self
    }

    /// The origin (scheme and authority) requests carry instead of the dialled address.
    pub fn origin(mut self, origin: Uri) -> Self {
        self.settings.origin = Some(origin);
        self
    }

    /// How endpoint load is measured.
    pub fn load(mut self, metric: LoadMetric) -> Self {
        self.balance = self.balance.load(metric);
        self
    }

    /// How long a call waits for an endpoint when there are none (then `unavailable`).
    pub fn wait_for_endpoints(mut self, wait: Duration) -> Self {
        self.balance = self.balance.wait_for_endpoints(wait);
        self
    }

    /// Passive outlier detection (default on); gRPC `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
    /// `RESOURCE_EXHAUSTED`, `INTERNAL`, HTTP 5xx and transport errors count as failures.
    pub fn outlier_detection(mut self, detection: Option<OutlierDetection>) -> Self {
        self.balance = self.balance.outlier_detection(detection);
        self
    }

    /// Any other balancer setting (panic threshold, slow start, zone preference).
    pub fn balancer(
        mut self,
        configure: impl FnOnce(balance::BalanceBuilder) -> balance::BalanceBuilder,
    ) -> Self {
        self.balance = configure(self.balance);
        self
    }

    /// Builds the channel at once; endpoints connect lazily, on their first request.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime (the balancer's updater is spawned on it).
    pub fn build(self) -> LoadBalancedChannel {
        let mut settings = self.settings;
        let server_name = self
            .tls_server_name
            .unwrap_or_else(|| self.query.name.clone());
        settings.tls = settings.tls.map(|tls| tls.domain_name(server_name));
        let registry = self.registry;
        let watched = Arc::clone(&registry);
        let discover = RegistryDiscover::endpoints(&*registry, self.query, move |instance| {
            // Holding the registry here keeps it alive as long as discovery runs, even when
            // the caller handed over its only reference.
            let _alive = &watched;
            settings.endpoint(instance).map(|e| e.connect_lazy())
        });
        let balance = self
            .balance
            .build_endpoints(discover)
            .with_classifier(HttpStatus);
        LoadBalancedChannel {
            balance,
            failed: None,
        }
    }

    /// Builds the channel and waits, at most `limit`, for the first instance to be
    /// discovered.
    ///
    /// # Errors
    ///
    /// [`Error::NoEndpoints`] when none is discovered in time.
    pub async fn connect(self, limit: Duration) -> Result<LoadBalancedChannel, Error> {
        let channel = self.build();
        channel.balance.await_endpoints(limit).await?;
        Ok(channel)
    }
}

impl fmt::Debug for LoadBalancedChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancedChannelBuilder")
            .field("query", &self.query)
            .field("tls", &self.settings.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The tonic endpoint for one instance, with every configured setting.
    fn endpoint(&self, instance: &ServiceInstance) -> Result<Endpoint, BoxError> {
        let b = self;
        let scheme = if b.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", instance.authority()))?
            .tcp_keepalive(b.tcp_keepalive)
            .keep_alive_while_idle(b.keep_alive_while_idle);
        if let Some(timeout) = b.connect_timeout {
            endpoint = endpoint.connect_timeout(timeout);
        }
        if let Some(timeout) = b.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        if let Some(interval) = b.http2_keep_alive_interval {
            endpoint = endpoint.http2_keep_alive_interval(interval);
        }
        if let Some(timeout) = b.keep_alive_timeout {
            endpoint = endpoint.keep_alive_timeout(timeout);
        }
        if let Some(limit) = b.concurrency_limit {
            endpoint = endpoint.concurrency_limit(limit);
        }
        if let Some(tls) = &b.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        if let Some(user_agent) = &b.user_agent {
            endpoint = endpoint.user_agent(user_agent.clone())?;
        }
        if let Some(origin) = &b.origin {
            endpoint = endpoint.origin(origin.clone());
        }
        Ok(endpoint)
    }
}
