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
//! Each instance gets its own HTTP/2 connection (see [`connection`]),
//! opened as soon as the instance is discovered and reported to the balancer, which picks
//! only connected instances while one is; a [`Balance`] picks one per request, and a request
//! goes straight to the chosen connection. When there are no endpoints, or none connects,
//! the call fails with `Status::unavailable` naming the service (after
//! `wait_for_endpoints`). A request the server provably did not process (its connection
//! closed first, `REFUSED_STREAM`, a GOAWAY below it) is sent once more on another
//! instance, unseen by the caller.
//!
//! # Retries, hedging and health checks
//!
//! [`LoadBalancedChannelBuilder::service_config`] takes gRPC's service config
//! ([`ServiceConfig`]), and the channel applies it as grpc-go's does:
//!
//! - **`retryPolicy`** (gRFC A6): a trailers-only answer with a retryable code is sent again
//!   after A6's backoff (full jitter; grpc-go draws 0.8-1.2 of the ceiling instead), honouring
//!   the server's `grpc-retry-pushback-ms`, with `grpc-previous-rpc-attempts`, up to
//!   `maxAttempts` (at most 5). Any other response headers commit the call, as does a body
//!   that outgrows the retry buffer (64 KiB per call; 16 MiB for the channel's calls
//!   together, see [`ConnectionSettings::retry_buffer_total`]). Streaming calls retry while
//!   not committed, replaying what they sent. **Every retry goes to an instance the call has
//!   not tried while another is usable**; grpc-go leaves that to its picker.
//! - **`retryThrottling`**: A6's token bucket per channel; no retries or hedges while the
//!   tokens are at or below half.
//! - **`hedgingPolicy`**: a new attempt every `hedgingDelay` (at once after a non-fatal
//!   answer) to an untried instance; the first final answer wins and the others are reset
//!   (`RST_STREAM` `CANCEL`) at once. A call is hedged only when its request body is at hand
//!   whole when it starts (a unary call's is); other calls go out once.
//! - **`timeout`** and **`waitForReady`**: the method's deadline (the caller's shorter one
//!   wins), and whether a call waits, until its deadline, for an instance to be ready.
//! - **`healthCheckConfig`** (gRFC A17): each instance's `grpc.health.v1.Health/Watch`;
//!   a not-serving instance gets no calls while its connection stays open (see the health
//!   module docs in `src/tonic/health.rs` for where we differ from A17: a broken Watch keeps
//!   the instance's last answer).
//! - **`loadBalancingConfig`**: the first policy tower-sd has (`least_request_experimental`,
//!   its P2C default, or `peak_ewma`); a config naming none of them keeps P2C, with a
//!   warning, where gRPC would reject the config.
//!
//! A call's error says how many attempts it made (`... (3 attempts)`). Metrics:
//! `tower_sd_retries_total`, `tower_sd_retries_throttled_total`, `tower_sd_call_attempts`,
//! `tower_sd_hedges_total`, `tower_sd_hedges_won_total`, `tower_sd_health_changes_total`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, Scheme};
use tonic::body::Body;
use tower::Service;

mod health;
mod service_config;

pub use service_config::{
    Codes, HedgingPolicy, MethodConfig, RetryPolicy, RetryThrottling, ServiceConfig,
    ServiceConfigError,
};

use crate::balance::{self, Balance, EndpointStats, LoadMetric, OutlierDetection};
use crate::classify::{HttpStatus, ResponseBody};
use crate::connection::hedge::HedgeFuture;
use crate::connection::policy::{CallPolicy, Throttle, grpc_status};
use crate::connection::replay::{Budget, Read};
use crate::connection::retry::{Retry, RetryFuture, not_ready};
use crate::connection::{
    self, Connection, ConnectionError, ConnectionSettings, Connector, TlsConfig,
};
use crate::discover::RegistryDiscover;
use crate::error::{BoxError, Error};
use crate::instance::ServiceQuery;
use crate::registry::{IntoRegistry, ServiceRegistry};

/// The balancer under a channel: one connection per instance.
type ChannelBalance = Balance<Connection<Body>, String, HttpStatus>;

/// The response body of a [`LoadBalancedChannel`]: the connection's, kept in flight by the
/// balancer until it ends, with transport errors as gRPC statuses, and ended with
/// `DEADLINE_EXCEEDED` when the call's deadline passes before it does.
pub struct ChannelBody {
    inner: Option<ResponseBody<connection::Body>>,
    /// The call's deadline, with its length for the message.
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// The channel's retry throttle, told when the call ends in success.
    throttle: Option<Arc<Throttle>>,
}

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            if let (Some(throttle), Some(Ok(frame))) = (&this.throttle, &frame)
                && frame.trailers_ref().and_then(grpc_status) == Some(0)
            {
                throttle.success();
            }
            return Poll::Ready(
                frame.map(|frame| frame.map_err(|error| status_of_transport(&error))),
            );
        }
        if let Some((limit, sleep)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            let status = deadline_exceeded(*limit);
            // Dropping the body resets its stream.
            this.inner = None;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

impl fmt::Debug for ChannelBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBody")
            .field("ended", &self.inner.is_none())
            .field("deadline", &self.deadline.as_ref().map(|(limit, _)| limit))
            .finish()
    }
}

fn deadline_exceeded(limit: Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("the call's deadline of {limit:?} passed"))
}

/// A `Clone`able tonic channel that balances every request over the healthy instances of one
/// service, following the registry.
///
/// Build it with [`LoadBalancedChannel::builder`]. Clones share one balancer; each clone
/// picks on its own, without a lock.
#[derive(Clone)]
pub struct LoadBalancedChannel {
    retry: Retry<ChannelBalance, Body>,
    /// The time limit of each request, when set.
    timeout: Option<Duration>,
    /// A failure from `poll_ready`, returned by the next `call`: generated clients turn
    /// readiness errors into `Status::unknown`, so the error waits for the call, where it
    /// keeps its own status (`unavailable` for no endpoints). With it, whether it says
    /// only that no instance is ready (a call that waits for ready waits on).
    failed: Option<(tonic::Status, bool)>,
    /// The service config's method configurations and the retry throttle, when set.
    policy: Option<Arc<ChannelPolicy>>,
}

/// What a channel applies of its service config.
#[derive(Debug)]
struct ChannelPolicy {
    config: ServiceConfig,
    throttle: Option<Arc<Throttle>>,
    /// The load metric of its load-balancing policy, when it names one tower-sd has.
    metric: Option<LoadMetric>,
}

impl ChannelPolicy {
    fn new(config: ServiceConfig, service: &str) -> Self {
        let metric = config.load_metric().unwrap_or_else(|names| {
            tracing::warn!(service, ?names, "the service config names no load-balancing policy tower-sd has; balancing with P2C by requests in flight");
            None
        });
        let throttle = config.retry_throttling().map(|throttling| {
            Arc::new(Throttle::new(
                throttling.max_milli_tokens,
                throttling.milli_token_ratio,
            ))
        });
        Self {
            config,
            throttle,
            metric,
        }
    }
}

/// Configures a [`LoadBalancedChannel`]: the tonic settings applied to every endpoint it
/// creates, and the balancer's.
#[must_use]
pub struct LoadBalancedChannelBuilder {
    registry: Arc<dyn ServiceRegistry>,
    query: ServiceQuery,
    connections: ConnectionSettings,
    timeout: Option<Duration>,
    balance: balance::BalanceBuilder,
    service_config: Option<ServiceConfig>,
}

// ===== impl LoadBalancedChannel =====

impl LoadBalancedChannel {
    /// A builder for a channel to the instances of `query` in `registry`.
    pub fn builder(
        registry: impl IntoRegistry,
        query: impl Into<ServiceQuery>,
    ) -> LoadBalancedChannelBuilder {
        let query = query.into();
        LoadBalancedChannelBuilder {
            balance: Balance::builder()
                .service_name(query.name.clone())
                .keep_clones(16),
            registry: registry.into_registry(),
            query,
            connections: ConnectionSettings::default().user_agent(HeaderValue::from_static(
                concat!("tower-sd/", env!("CARGO_PKG_VERSION")),
            )),
            timeout: None,
            service_config: None,
        }
    }

    fn balance(&self) -> &ChannelBalance {
        self.retry.get_ref()
    }

    /// Each endpoint's load, state and connectivity, as
    /// [`Balance::endpoints`](crate::balance::Balance::endpoints) reports them.
    pub fn endpoints(&self) -> Vec<EndpointStats<String>> {
        self.balance().endpoints()
    }

    /// How many endpoints outlier detection has ejected, as
    /// [`Balance::ejected`](crate::balance::Balance::ejected) counts them.
    pub fn ejected(&self) -> usize {
        self.balance().ejected()
    }

    /// The service the channel calls.
    pub fn service_name(&self) -> &str {
        self.balance().service_name()
    }
}

impl Service<http::Request<Body>> for LoadBalancedChannel {
    type Response = http::Response<ChannelBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.retry.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(error)) => {
                let waitable = not_ready(&error);
                self.failed = Some((status_of(error), waitable));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let method = self.policy.as_deref().and_then(|policy| {
            let method = policy.config.method(request.uri().path())?;
            Some(Arc::clone(method))
        });
        let limit = deadline(
            &mut request,
            self.timeout,
            method.as_ref().and_then(|m| m.timeout),
        );
        let throttle = self.policy.as_ref().and_then(|p| p.throttle.clone());
        let wait = method
            .as_ref()
            .is_some_and(|m| m.wait_for_ready == Some(true));
        let sent = match self.failed.take() {
            None => self.send(request, method.as_deref(), throttle.as_ref()),
            Some((_, true)) if wait => {
                let policy = CallPolicy::new(None, None, true);
                Ok(Attempts::Retry(
                    self.retry.wait_then_call(request, Box::new(policy)),
                ))
            }
            Some((status, _)) => Err(status),
        };
        match sent {
            Ok(attempts) => ResponseFuture {
                inner: Some(attempts),
                deadline: limit.map(|limit| (limit, Box::pin(tokio::time::sleep(limit)))),
                failed: None,
                throttle,
            },
            Err(status) => ResponseFuture {
                inner: None,
                deadline: None,
                failed: Some(status),
                throttle: None,
            },
        }
    }
}

impl LoadBalancedChannel {
    /// Sends `request` (the channel is ready) under its method's configuration: hedged
    /// when the method has a hedging policy and the request's body is at hand whole, else
    /// under its retry policy, if any.
    fn send(
        &mut self,
        request: http::Request<Body>,
        method: Option<&MethodConfig>,
        throttle: Option<&Arc<Throttle>>,
    ) -> Result<Attempts, tonic::Status> {
        let Some(method) = method else {
            return Ok(Attempts::Retry(self.retry.call_with(request, None)));
        };
        if let Some(rules) = &method.hedge_rules {
            let (parts, body) = request.into_parts();
            let buffer = self.retry.buffer();
            let read = Read::ready(body, buffer)?;
            let bytes: usize = read.frames.iter().map(bytes::Bytes::len).sum();
            if read.rest.is_some() || bytes > buffer {
                return Ok(Attempts::Retry(self.retry.call_read(parts, read, None)));
            }
            let name = Arc::clone(self.retry.service());
            let budget = Arc::clone(self.retry.budget());
            let hedge = HedgeFuture::start(
                self.retry.get_mut(),
                parts,
                read,
                Arc::clone(rules),
                throttle.cloned(),
                budget,
                name,
            );
            return Ok(Attempts::Hedge(Box::new(hedge)));
        }
        let wait = method.wait_for_ready == Some(true);
        let policy = (method.rules.is_some() || wait).then(|| {
            Box::new(CallPolicy::new(
                method.rules.clone(),
                throttle.cloned(),
                wait,
            ))
        });
        Ok(Attempts::Retry(self.retry.call_with(request, policy)))
    }
}

/// The call's deadline: the caller's (`grpc-timeout`), the method's or the channel's,
/// whichever is soonest, for the whole call, and sent to the server as `grpc-timeout`.
fn deadline(
    request: &mut http::Request<Body>,
    channel: Option<Duration>,
    method: Option<Duration>,
) -> Option<Duration> {
    let caller = grpc_timeout(request.headers());
    let ours = [channel, method].into_iter().flatten().min();
    match (caller, ours) {
        (Some(caller), Some(ours)) if ours >= caller => Some(caller),
        (_, Some(ours)) => {
            set_grpc_timeout(request.headers_mut(), ours);
            Some(ours)
        }
        (caller, None) => caller,
    }
}

/// A call's attempts: retried, or hedged. The hedged call, the rare one, is boxed so the
/// common one costs no allocation.
#[allow(clippy::large_enum_variant)]
enum Attempts {
    Retry(RetryFuture<ChannelBalance, Body>),
    Hedge(Box<HedgeFuture<ChannelBalance, Body>>),
}

impl Attempts {
    fn attempts(&self) -> u32 {
        match self {
            Self::Retry(retry) => retry.attempts(),
            Self::Hedge(hedge) => hedge.attempts(),
        }
    }
}

impl Future for Attempts {
    type Output = Result<http::Response<ResponseBody<connection::Body>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Retry(retry) => Pin::new(retry).poll(cx),
            Self::Hedge(hedge) => Pin::new(&mut **hedge).poll(cx),
        }
    }
}

impl fmt::Debug for LoadBalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancedChannel")
            .field("service", &self.balance().service_name())
            .finish_non_exhaustive()
    }
}

/// The gRPC status for a request's error: [`Error`]s map by kind, connection errors to
/// `UNAVAILABLE` (nothing reached the server) or by their HTTP/2 reset code.
fn status_of(error: BoxError) -> tonic::Status {
    let error = match error.downcast::<Error>() {
        Ok(error) => return tonic::Status::from(*error),
        Err(error) => error,
    };
    match error.downcast::<ConnectionError>() {
        Ok(error) => match *error {
            ConnectionError::Request { source, .. } => status_of_transport(&*source),
            other => tonic::Status::unavailable(crate::error::Chain(&other).to_string()),
        },
        Err(error) => tonic::Status::from_error(error),
    }
}

/// The gRPC status of a transport error, as gRPC maps HTTP/2 reset codes (and tonic does).
fn status_of_transport(error: &(dyn std::error::Error + 'static)) -> tonic::Status {
    use tonic::Code;
    let message = crate::error::Chain(error).to_string();
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && let Some(reason) = h2.reason()
        {
            let code = match reason {
                h2::Reason::REFUSED_STREAM => Code::Unavailable,
                h2::Reason::CANCEL => Code::Cancelled,
                h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
                h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
                _ => Code::Internal,
            };
            return tonic::Status::new(code, message);
        }
        cause = error.source();
    }
    // Connection closed, reset, timed out: the server is not reachable.
    tonic::Status::unavailable(message)
}

/// Sets `grpc-timeout` to `limit`, in the finest unit whose count has at most 8 digits,
/// rounded up (as grpc-go writes it).
fn set_grpc_timeout(headers: &mut http::HeaderMap, limit: Duration) {
    const MAX: u128 = 99_999_999;
    let nanos = limit.as_nanos().max(1);
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    let (count, unit) = units
        .iter()
        .map(|&(size, unit)| (nanos.div_ceil(size), unit))
        .find(|&(count, _)| count <= MAX)
        .unwrap_or((MAX, "H"));
    if let Ok(value) = http::HeaderValue::from_str(&format!("{count}{unit}")) {
        headers.insert("grpc-timeout", value);
    }
}

/// `grpc-timeout` (a number of at most 8 digits and a unit), as the gRPC protocol defines it.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl From<Error> for tonic::Status {
    /// The status for the error's kind, with the whole chain of causes as its message.
    fn from(error: Error) -> Self {
        let message = crate::error::Chain(&error).to_string();
        match error {
            Error::NoEndpoints { .. }
            | Error::NoReadyEndpoints { .. }
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

/// Says in a failed answer's `grpc-message` how many attempts the call made.
fn note_attempts(headers: &mut http::HeaderMap, attempts: u32) {
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default();
    // `grpc-message` is percent-encoded; what is added needs no encoding.
    let noted = format!("{message} ({attempts} attempts)");
    if let Ok(value) = http::HeaderValue::from_str(noted.trim_start()) {
        headers.insert("grpc-message", value);
    }
}

/// The response future of [`LoadBalancedChannel`].
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    inner: Option<Attempts>,
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    failed: Option<tonic::Status>,
    throttle: Option<Arc<Throttle>>,
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ChannelBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            let status = this.failed.take().expect("polled after completion");
            return Poll::Ready(Err(Box::new(status)));
        };
        if let Poll::Ready(outcome) = Pin::new(&mut *inner).poll(cx) {
            let attempts = inner.attempts();
            this.inner = None;
            return Poll::Ready(match outcome {
                Ok(mut response) => {
                    let status = grpc_status(response.headers());
                    if status == Some(0)
                        && let Some(throttle) = &this.throttle
                    {
                        throttle.success();
                    }
                    if status.is_some_and(|code| code != 0) && attempts > 1 {
                        note_attempts(response.headers_mut(), attempts);
                    }
                    // The deadline goes on with the body.
                    Ok(response.map(|body| ChannelBody {
                        inner: Some(body),
                        deadline: this.deadline.take(),
                        throttle: this.throttle.take(),
                    }))
                }
                Err(error) => {
                    let status = status_of(error);
                    Err(Box::new(if attempts > 1 {
                        tonic::Status::with_details_and_metadata(
                            status.code(),
                            format!("{} ({attempts} attempts)", status.message()),
                            status.details().to_vec().into(),
                            status.metadata().clone(),
                        )
                    } else {
                        status
                    }))
                }
            });
        }
        if let Some((limit, sleep)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            // Dropping the request resets its stream.
            this.inner = None;
            return Poll::Ready(Err(Box::new(deadline_exceeded(*limit))));
        }
        Poll::Pending
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.inner.is_some() {
            "dispatched"
        } else {
            "failed"
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

// ===== impl LoadBalancedChannelBuilder =====

impl LoadBalancedChannelBuilder {
    /// Time limit to establish a connection to an instance (TCP, TLS and HTTP/2; default
    /// 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connections = self.connections.connect_timeout(timeout);
        self
    }

    /// The deadline of each call, as gRPC's: for the whole call, its response body
    /// included (a server stream too), and sent to the server as `grpc-timeout` (a shorter
    /// one the caller set wins). A call past it fails with `DEADLINE_EXCEEDED` and its
    /// stream is reset. tonic's `Endpoint::timeout` stops at the response headers instead.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// TCP keepalive on each connection (default after 60 s idle).
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.connections = self.connections.tcp_keepalive(idle);
        self
    }

    /// HTTP/2 keepalive pings (default off; see
    /// [`ConnectionSettings::http2_keep_alive_interval`]).
    pub fn http2_keep_alive_interval(mut self, interval: Option<Duration>) -> Self {
        self.connections = self.connections.http2_keep_alive_interval(interval);
        self
    }

    /// How long to wait for a keepalive ping's answer (default 20 s).
    pub fn keep_alive_timeout(mut self, timeout: Duration) -> Self {
        self.connections = self.connections.keep_alive_timeout(timeout);
        self
    }

    /// Send keepalive pings on idle connections too.
    pub fn keep_alive_while_idle(mut self, enabled: bool) -> Self {
        self.connections = self.connections.keep_alive_while_idle(enabled);
        self
    }

    /// Requests in flight per endpoint, at most (default unlimited).
    pub fn concurrency_limit(mut self, limit: Option<usize>) -> Self {
        self.connections = self.connections.concurrency_limit(limit);
        self
    }

    /// Dial every instance over TLS with this configuration. The server name checked
    /// against certificates is the configuration's ([`TlsConfig::server_name`]), else the
    /// service name, never the dialled IP address.
    pub fn tls(mut self, config: TlsConfig) -> Self {
        self.connections = self.connections.tls(config);
        self
    }

    /// The `user-agent` header sent with every request that has none (default
    /// `tower-sd/<version>`).
    pub fn user_agent(mut self, user_agent: HeaderValue) -> Self {
        self.connections = self.connections.user_agent(user_agent);
        self
    }

    /// The origin (scheme and authority) requests carry instead of the dialled address.
    pub fn origin(mut self, scheme: Scheme, authority: Authority) -> Self {
        self.connections = self.connections.origin(scheme, authority);
        self
    }

    /// Any other connection setting: eager or lazy connects, connections per instance,
    /// HTTP/2 windows, reconnect backoff, the transparent-retry buffer (see
    /// [`ConnectionSettings`]).
    pub fn connections(
        mut self,
        configure: impl FnOnce(ConnectionSettings) -> ConnectionSettings,
    ) -> Self {
        self.connections = configure(self.connections);
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

    /// gRPC's service config: per method, a retry policy, a deadline and wait-for-ready;
    /// the channel's retry throttle; the load-balancing policy (see [`ServiceConfig`]).
    ///
    /// ```
    /// # use tower_sd::tonic::{LoadBalancedChannel, ServiceConfig};
    /// # use tower_sd::MemoryRegistry;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: ServiceConfig = r#"{
    ///   "methodConfig": [{
    ///     "name": [{ "service": "helloworld.Greeter" }],
    ///     "timeout": "2s",
    ///     "retryPolicy": {
    ///       "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s",
    ///       "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
    ///     }
    ///   }],
    ///   "retryThrottling": { "maxTokens": 10, "tokenRatio": 0.1 }
    /// }"#
    /// .parse()?;
    /// let builder = LoadBalancedChannel::builder(MemoryRegistry::new(), "greeter")
    ///     .service_config(config);
    /// # drop(builder);
    /// # Ok(())
    /// # }
    /// ```
    pub fn service_config(mut self, config: ServiceConfig) -> Self {
        self.service_config = Some(config);
        self
    }

    /// Builds the channel at once; each instance connects as soon as it is discovered
    /// (unless the connection settings make them lazy).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime (the balancer's updater is spawned on it).
    pub fn build(self) -> LoadBalancedChannel {
        let service = self.query.name.clone();
        let policy = self
            .service_config
            .map(|config| Arc::new(ChannelPolicy::new(config, &service)));
        let mut balance_builder = self.balance;
        if let Some(metric) = policy.as_ref().and_then(|p| p.metric) {
            balance_builder = balance_builder.load(metric);
        }
        let buffer = self.connections.retry_buffer_bytes;
        let budget = Budget::new(self.connections.retry_buffer_total_bytes);
        let health = policy
            .as_ref()
            .and_then(|p| p.config.health_check_service())
            .map(|name| {
                Arc::new(health::HealthCheck {
                    name: name.to_owned(),
                    service: service.as_str().into(),
                    backoff: crate::backoff::Backoff::new(
                        self.connections.reconnect_base,
                        self.connections.reconnect_max,
                    ),
                })
            });
        let connector = Connector::new(self.connections).service(service.as_str());
        let discover =
            RegistryDiscover::of_endpoints(&*self.registry, self.query, move |instance| {
                let endpoint = connector.endpoint(instance, Ok::<Connection<Body>, BoxError>)?;
                Ok::<_, BoxError>(match &health {
                    Some(check) => {
                        let companion =
                            health::start(check, endpoint.service.clone(), instance.id.clone());
                        endpoint.companion(companion)
                    }
                    None => endpoint,
                })
            });
        let balance = balance_builder.build(discover).with_classifier(HttpStatus);
        LoadBalancedChannel {
            retry: Retry::new(balance, buffer, budget, &service),
            timeout: self.timeout,
            failed: None,
            policy,
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
        channel.balance().await_endpoints(limit).await?;
        Ok(channel)
    }
}

impl fmt::Debug for LoadBalancedChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancedChannelBuilder")
            .field("query", &self.query)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(limit: Duration) -> String {
        let mut headers = http::HeaderMap::new();
        set_grpc_timeout(&mut headers, limit);
        headers["grpc-timeout"].to_str().unwrap().to_owned()
    }

    /// Catches a unit too coarse (a deadline cut to 0, or rounded down, which would end a
    /// call early), a count past the 8 digits gRPC allows, and a header its reader does
    /// not take back.
    #[test]
    fn grpc_timeout_is_written_in_the_finest_unit_that_fits_and_read_back() {
        let ms = Duration::from_millis;
        assert_eq!(written(ms(1)), "1000000n");
        assert_eq!(written(ms(150)), "150000u");
        assert_eq!(written(Duration::from_secs(100)), "100000m");
        assert_eq!(written(Duration::from_secs(200_000)), "200000S");
        assert_eq!(
            written(Duration::from_nanos(100_000_001)),
            "100001u",
            "rounded up"
        );
        assert_eq!(written(Duration::ZERO), "1n");
        assert_eq!(written(Duration::MAX), "99999999H", "at most 8 digits");
        for limit in [
            ms(1),
            ms(150),
            Duration::from_secs(7),
            Duration::from_secs(90_000),
        ] {
            let mut headers = http::HeaderMap::new();
            set_grpc_timeout(&mut headers, limit);
            assert_eq!(grpc_timeout(&headers), Some(limit), "{limit:?}");
        }
    }
}
