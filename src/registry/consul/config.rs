//! Configuration of [`ConsulRegistry`](super::ConsulRegistry).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::ConsulRegistry;
use super::client::Client;
use crate::error::{Error, Result};
use crate::registry::Secret;

/// Consul raises a `DeregisterCriticalServiceAfter` below this to it, with a warning.
const CONSUL_MIN_DEREGISTER: Duration = Duration::from_secs(60);
/// Consul's longest blocking-query wait.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// The health check registered with every instance.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthCheck {
    /// What the agent checks.
    pub kind: HealthCheckKind,
    /// How often (default 10 s; not used by TTL checks).
    pub interval: Duration,
    /// Time limit of one check (default 3 s; not used by TTL checks).
    pub timeout: Duration,
    /// Remove the instance after it has been critical this long (default 1 minute, Consul's
    /// minimum: lower values are raised by the agent, and a warning is logged here).
    pub deregister_after: Duration,
}

/// The kind of [`HealthCheck`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthCheckKind {
    /// An HTTP GET; `None` means `http://{address}:{port}/healthz`.
    Http(Option<String>),
    /// A TCP connect to the instance.
    Tcp,
    /// The gRPC health protocol against the instance.
    Grpc,
    /// The instance reports itself with heartbeats within this TTL.
    Ttl(Duration),
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: HealthCheckKind::Http(None),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(3),
            deregister_after: CONSUL_MIN_DEREGISTER,
        }
    }
}

impl HealthCheck {
    /// A check of this kind with the default timings.
    pub fn new(kind: HealthCheckKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    /// Sets [`interval`](Self::interval).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`deregister_after`](Self::deregister_after).
    #[must_use]
    pub fn deregister_after(mut self, after: Duration) -> Self {
        self.deregister_after = after;
        self
    }
}

/// Configures a [`ConsulRegistry`].
#[derive(Clone, Debug)]
#[must_use]
pub struct ConsulBuilder {
    pub(crate) address: String,
    pub(crate) datacenter: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) token: Option<Secret>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) wait: Duration,
    pub(crate) stale: bool,
    pub(crate) cached: bool,
    pub(crate) request_timeout: Duration,
    pub(crate) check: HealthCheck,
    pub(crate) zone_key: String,
    pub(crate) tagged_address: Option<String>,
    pub(crate) max_body_bytes: usize,
    pub(crate) retry_base: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) requests_per_second: f64,
    /// Whether requests may go through the system's proxy (`HTTP_PROXY` and friends);
    /// `None`: not for a loopback agent, else as the system says.
    pub(crate) system_proxy: Option<bool>,
}

impl Default for ConsulBuilder {
    fn default() -> Self {
        Self {
            address: "http://127.0.0.1:8500".to_owned(),
            datacenter: None,
            namespace: None,
            token: None,
            ca_file: None,
            wait: Duration::from_secs(300),
            stale: false,
            cached: false,
            request_timeout: Duration::from_secs(10),
            check: HealthCheck::default(),
            zone_key: "zone".to_owned(),
            tagged_address: None,
            max_body_bytes: 16 << 20,
            retry_base: Duration::from_millis(250),
            retry_max: Duration::from_secs(30),
            requests_per_second: 5.0,
            system_proxy: None,
        }
    }
}

impl ConsulBuilder {
    /// Reads `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` when set, as Consul's own tools do.
    pub fn from_env(mut self) -> Self {
        if let Ok(address) = std::env::var("CONSUL_HTTP_ADDR")
            && !address.is_empty()
        {
            self.address = address;
        }
        if let Ok(token) = std::env::var("CONSUL_HTTP_TOKEN")
            && !token.is_empty()
        {
            self.token = Some(Secret(token));
        }
        self
    }

    /// The agent's address: `host:port` (http) or a URL with `http` or `https`.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// The datacenter to query (default: the agent's).
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = Some(datacenter.into());
        self
    }

    /// The namespace (Consul Enterprise).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The ACL token, sent as `X-Consul-Token`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret(token.into()));
        self
    }

    /// A PEM file with the CA that signed the agent's certificate (for `https`).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// How long a blocking query may wait (default 5 minutes, at most Consul's 10).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Allow any server to answer reads (`stale`).
    pub fn stale(mut self, stale: bool) -> Self {
        self.stale = stale;
        self
    }

    /// Use the agent's cache for reads (`cached`).
    pub fn cached(mut self, cached: bool) -> Self {
        self.cached = cached;
        self
    }

    /// Time limit of non-blocking requests (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The health check registered with each instance.
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.check = check;
        self
    }

    /// The service- or node-metadata key holding an instance's zone (default `zone`).
    pub fn zone_key(mut self, key: impl Into<String>) -> Self {
        self.zone_key = key.into();
        self
    }

    /// Dial this `TaggedAddresses` entry (e.g. `wan`) when an instance has it.
    pub fn tagged_address(mut self, key: impl Into<String>) -> Self {
        self.tagged_address = Some(key.into());
        self
    }

    /// The largest response body read (default 16 MiB).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Backoff bounds after a failed watch request (default 250 ms to 30 s, full jitter).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max = max;
        self
    }

    /// The most blocking queries one watch sends per second, on average (default 5; a burst
    /// of that many is allowed), so index churn cannot make it spin.
    pub fn requests_per_second(mut self, rate: f64) -> Self {
        self.requests_per_second = rate;
        self
    }

    /// Whether requests (and so the ACL token) may go through the system's proxy settings
    /// (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`). By default they do, except to an agent on
    /// a loopback address (`localhost`, `127.0.0.0/8`, `::1`), which is always dialled
    /// directly. Redirects are never followed, whatever this says.
    pub fn system_proxy(mut self, use_it: bool) -> Self {
        self.system_proxy = Some(use_it);
        self
    }

    /// Builds the registry.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the key: an address that is not a URL or
    /// `host:port`, an unsupported scheme, an unreadable CA file, a zero rate.
    pub fn build(mut self) -> Result<ConsulRegistry> {
        if self.wait > MAX_WAIT {
            warn!(wait = ?self.wait, "Consul caps blocking waits at 10 minutes; using that");
            self.wait = MAX_WAIT;
        }
        if self.check.deregister_after < CONSUL_MIN_DEREGISTER {
            warn!(
                deregister_after = ?self.check.deregister_after,
                "Consul's minimum DeregisterCriticalServiceAfter is 1m; the agent will raise it"
            );
        }
        if self.requests_per_second.is_nan() || self.requests_per_second <= 0.0 {
            return Err(Error::InvalidConfig {
                key: "consul.requests_per_second".to_owned(),
                source: "must be greater than zero".into(),
            });
        }
        Ok(ConsulRegistry {
            client: Arc::new(Client::new(self)?),
        })
    }
}

/// Consul's duration syntax: `10s`, `1500ms`.
pub(crate) fn go_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}
