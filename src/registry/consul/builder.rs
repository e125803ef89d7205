//! [`ConsulRegistryBuilder`]: the setters, and the checks that turn them into a running
//! [`ConsulRegistry`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::client::Client;
use super::settings::{CONSUL_MIN_DEREGISTER, HealthCheck, MAX_WAIT, Settings};
use super::{ConsulRegistry, MeshRegistration};
use crate::error::{Error, Result};
use crate::registry::Secret;

/// Configures a [`ConsulRegistry`]; see [`ConsulRegistry::builder`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct ConsulRegistryBuilder {
    settings: Settings,
}

impl ConsulRegistryBuilder {
    /// Reads `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` when set, as Consul's own tools do.
    pub fn from_env(mut self) -> Self {
        if let Ok(address) = std::env::var("CONSUL_HTTP_ADDR")
            && !address.is_empty()
        {
            self.settings.address = address;
        }
        if let Ok(token) = std::env::var("CONSUL_HTTP_TOKEN")
            && !token.is_empty()
        {
            self.settings.token = Some(Secret(token));
        }
        self
    }

    /// The agent's address: `host:port` (http) or a URL with `http` or `https`.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.settings.address = address.into();
        self
    }

    /// The datacenter to query (default: the agent's).
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.settings.datacenter = Some(datacenter.into());
        self
    }

    /// The namespace (Consul Enterprise).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.settings.namespace = Some(namespace.into());
        self
    }

    /// The ACL token, sent as `X-Consul-Token`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.settings.token = Some(Secret(token.into()));
        self
    }

    /// A PEM file with the CA that signed the agent's certificate (for `https`).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.settings.ca_file = Some(path.into());
        self
    }

    /// How long a blocking query may wait (default 5 minutes, at most Consul's 10).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.settings.wait = wait;
        self
    }

    /// Allow any server to answer reads (`stale`). An answer from a server that knows no
    /// leader (`X-Consul-KnownLeader: false`) is then an [`Error::Stale`](crate::Error::Stale)
    /// the watch reports, keeping the last set.
    pub fn stale(mut self, stale: bool) -> Self {
        self.settings.stale = stale;
        self
    }

    /// Reads `stale`, taking no answer from a server that last heard from its leader more
    /// than `max_stale` ago (`X-Consul-LastContact`): such an answer is an
    /// [`Error::Stale`](crate::Error::Stale) the watch reports, keeping the last set.
    pub fn max_stale(mut self, max_stale: Duration) -> Self {
        self.settings.stale = true;
        self.settings.max_stale = Some(max_stale);
        self
    }

    /// Use the agent's cache for reads (`cached`).
    pub fn cached(mut self, cached: bool) -> Self {
        self.settings.cached = cached;
        self
    }

    /// Time limit of non-blocking requests (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// The health check registered with each instance.
    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.settings.check = check;
        self
    }

    /// The service- or node-metadata key holding an instance's zone (default `zone`).
    pub fn zone_key(mut self, key: impl Into<String>) -> Self {
        self.settings.zone_key = key.into();
        self
    }

    /// Dial this `TaggedAddresses` entry (e.g. `wan`) when an instance has it.
    pub fn tagged_address(mut self, key: impl Into<String>) -> Self {
        self.settings.tagged_address = Some(key.into());
        self
    }

    /// The largest response body read (default 16 MiB).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.settings.max_body_bytes = bytes;
        self
    }

    /// Backoff bounds after a failed watch request (default 250 ms to 30 s, full jitter).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.retry_base = base;
        self.settings.retry_max = max;
        self
    }

    /// The most blocking queries one watch sends per second, on average (default 5; a burst
    /// of that many is allowed), so index churn cannot make it spin.
    pub fn requests_per_second(mut self, rate: f64) -> Self {
        self.settings.requests_per_second = rate;
        self
    }

    /// The datacenters every query that names none follows after its first (see
    /// [`Failover`](crate::Failover); default none).
    pub fn failover(mut self, failover: crate::Failover) -> Self {
        self.settings.failover = failover;
        self
    }

    /// How often a watch of a prepared query (a query named `<name>.query`) executes it
    /// again: every `every` on average, each wait drawn between half of it and all of it
    /// (default 10 s; at least 100 ms). Prepared queries do not block.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.settings.poll_interval = every.max(Duration::from_millis(100));
        self
    }

    /// How often a watch of the nearest datacenters
    /// ([`Failover::Nearest`](crate::Failover::Nearest)) reads their order from
    /// `/v1/catalog/datacenters` again (default 60 s; at least 100 ms).
    pub fn datacenters_refresh(mut self, every: Duration) -> Self {
        self.settings.datacenters_refresh = every.max(Duration::from_millis(100));
        self
    }

    /// Whether requests (and so the ACL token) may go through the system's proxy settings
    /// (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`). By default they do, except to an agent on
    /// a loopback address (`localhost`, `127.0.0.0/8`, `::1`), which is always dialled
    /// directly. Redirects are never followed, whatever this says.
    pub fn system_proxy(mut self, use_it: bool) -> Self {
        self.settings.system_proxy = Some(use_it);
        self
    }

    /// Registers every instance into the service mesh this way: Connect-native, or with a
    /// sidecar proxy the agent runs next to it (see [`MeshRegistration`] for the service
    /// definition each produces). Deregistering an instance also removes its sidecar: the
    /// agent deregisters a sidecar registered through `SidecarService` with its parent.
    pub fn mesh_registration(mut self, mesh: MeshRegistration) -> Self {
        self.settings.mesh = Some(mesh);
        self
    }

    /// Discovers mesh endpoints: `discover` and `watch` read `/v1/health/connect/:service`
    /// instead of `/v1/health/service/:service`, which answers with the Connect-capable
    /// instances of the service: each sidecar proxy's address and port, or a Connect-native
    /// instance's own. Instances keep the queried service's name; their ids are the
    /// proxy's (`{node}/{proxy service ID}`). The blocking-query rules are the same.
    pub fn mesh_discovery(mut self, connect: bool) -> Self {
        self.settings.mesh_discovery = connect;
        self
    }

    /// Builds the registry.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the key: an address that is not a URL or
    /// `host:port`, an unsupported scheme, an unreadable CA file, a zero rate.
    pub fn build(self) -> Result<ConsulRegistry> {
        let mut settings = self.settings;
        if settings.wait > MAX_WAIT {
            warn!(wait = ?settings.wait, "Consul caps blocking waits at 10 minutes; using that");
            settings.wait = MAX_WAIT;
        }
        if settings.check.deregister_after < CONSUL_MIN_DEREGISTER {
            warn!(
                deregister_after = ?settings.check.deregister_after,
                "Consul's minimum DeregisterCriticalServiceAfter is 1m; the agent will raise it"
            );
        }
        if settings.requests_per_second.is_nan() || settings.requests_per_second <= 0.0 {
            return Err(Error::InvalidConfig {
                key: "requests_per_second".to_owned(),
                source: "must be greater than zero".into(),
            });
        }
        if let Some(MeshRegistration::Sidecar(sidecar)) = &settings.mesh
            && sidecar.port == Some(0)
        {
            return Err(Error::InvalidConfig {
                key: "mesh_registration".to_owned(),
                source: "a sidecar port of 0 cannot be dialled; use `None` to let the agent pick"
                    .into(),
            });
        }
        Ok(ConsulRegistry {
            client: Arc::new(Client::new(settings)?),
        })
    }
}
