//! What a running [`ConsulRegistry`](super::ConsulRegistry) reads: its [`Settings`] and
//! the [`HealthCheck`] it registers instances with.

use std::path::PathBuf;
use std::time::Duration;

use crate::registry::Secret;

/// Consul raises a `DeregisterCriticalServiceAfter` below this to it, with a warning.
pub(crate) const CONSUL_MIN_DEREGISTER: Duration = Duration::from_secs(60);
/// Consul's longest blocking-query wait.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(600);

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

/// The settings of a [`ConsulRegistry`](super::ConsulRegistry), as its builder set them.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) address: String,
    pub(crate) datacenter: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) token: Option<Secret>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) wait: Duration,
    pub(crate) stale: bool,
    /// With `stale`, the oldest answer taken (`X-Consul-LastContact`); `None`: any age.
    pub(crate) max_stale: Option<Duration>,
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
    /// The `Connect` block of every registration.
    pub(crate) mesh: Option<super::MeshRegistration>,
    /// Discover through `/v1/health/connect/:service` (mesh endpoints).
    pub(crate) mesh_discovery: bool,
    /// How often a watch of the nearest datacenters reads their order again.
    pub(crate) datacenters_refresh: Duration,
    /// The failover of queries that give none.
    pub(crate) failover: crate::instance::Failover,
    /// How often a prepared query is executed again (it does not block).
    pub(crate) poll_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            address: "http://127.0.0.1:8500".to_owned(),
            datacenter: None,
            namespace: None,
            token: None,
            ca_file: None,
            wait: Duration::from_secs(300),
            stale: false,
            max_stale: None,
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
            mesh: None,
            mesh_discovery: false,
            datacenters_refresh: Duration::from_secs(60),
            failover: crate::instance::Failover::None,
            poll_interval: Duration::from_secs(10),
        }
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
