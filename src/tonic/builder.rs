//! [`LoadBalancedChannelBuilder`]: a channel's settings, and what it applies of its
//! service config.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, Scheme};
use tonic::body::Body;

use super::{LoadBalancedChannel, ServiceConfig, health};
use crate::balance::{self, Balance, LoadMetric, OutlierDetection};
use crate::classify::HttpStatus;
use crate::connection::policy::Throttle;
use crate::connection::replay::Budget;
use crate::connection::retry::Retry;
use crate::connection::{Connection, ConnectionSettings, Connector, TlsConfig};
use crate::discover::RegistryDiscover;
use crate::error::{BoxError, Error};
use crate::instance::ServiceQuery;
use crate::registry::ServiceRegistry;

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

/// What a channel applies of its service config.
#[derive(Debug)]
pub(super) struct ChannelPolicy {
    pub(super) config: ServiceConfig,
    pub(super) throttle: Option<Arc<Throttle>>,
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

impl LoadBalancedChannelBuilder {
    pub(super) fn new(registry: Arc<dyn ServiceRegistry>, query: ServiceQuery) -> Self {
        Self {
            balance: Balance::builder()
                .service_name(query.name.clone())
                .keep_clones(16),
            registry,
            query,
            connections: ConnectionSettings::default().user_agent(HeaderValue::from_static(
                concat!("tower-sd/", env!("CARGO_PKG_VERSION")),
            )),
            timeout: None,
            service_config: None,
        }
    }

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
