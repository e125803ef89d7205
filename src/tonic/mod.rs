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
//! Each instance gets its own HTTP/2 connection (see [`connection`](crate::connection)),
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
//!   together, see [`ConnectionSettings::retry_buffer_total`](crate::connection::ConnectionSettings::retry_buffer_total)). Streaming calls retry while
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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tower::Service;

mod builder;
mod deadline;
mod health;
mod response;
mod service_config;
mod status;

pub use builder::LoadBalancedChannelBuilder;
pub use response::{ChannelBody, ResponseFuture};
pub use service_config::{
    Codes, HedgingPolicy, MethodConfig, RetryPolicy, RetryThrottling, ServiceConfig,
    ServiceConfigError,
};

use crate::balance::{Balance, EndpointStats};
use crate::classify::HttpStatus;
use crate::connection::Connection;
use crate::connection::hedge::HedgeFuture;
use crate::connection::policy::{CallPolicy, Throttle};
use crate::connection::replay::Read;
use crate::connection::retry::{Retry, not_ready};
use crate::error::BoxError;
use crate::instance::ServiceQuery;
use crate::registry::IntoRegistry;
use builder::ChannelPolicy;
use deadline::deadline;
use response::Attempts;
use status::status_of;

/// The balancer under a channel: one connection per instance.
type ChannelBalance = Balance<Connection<Body>, String, HttpStatus>;

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

// ===== impl LoadBalancedChannel =====

impl LoadBalancedChannel {
    /// A builder for a channel to the instances of `query` in `registry`.
    pub fn builder(
        registry: impl IntoRegistry,
        query: impl Into<ServiceQuery>,
    ) -> LoadBalancedChannelBuilder {
        LoadBalancedChannelBuilder::new(registry.into_registry(), query.into())
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

    /// The priority tiers and the share of calls each takes now, as
    /// [`Balance::tiers`](crate::balance::Balance::tiers) reports them.
    pub fn tiers(&self) -> Vec<crate::balance::TierShare> {
        self.balance().tiers()
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
                let rules = method.as_ref().and_then(|m| m.rules.clone());
                let policy = CallPolicy::new(rules, throttle.clone(), true);
                Ok(Attempts::Retry(
                    self.retry.wait_then_call(request, Box::new(policy)),
                ))
            }
            Some((status, _)) => Err(status),
        };
        match sent {
            Ok(attempts) => ResponseFuture::sent(attempts, limit, throttle),
            Err(status) => ResponseFuture::failed(status),
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

impl fmt::Debug for LoadBalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancedChannel")
            .field("service", &self.balance().service_name())
            .finish_non_exhaustive()
    }
}
