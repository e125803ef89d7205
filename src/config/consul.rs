//! `registry.consul`: [`ConsulSection`], and the registry it builds.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::parse::duration_opt;
use crate::error::Result;
use crate::registry::ServiceRegistry;

/// `registry.consul`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsulSection {
    /// `host:port` or a URL (default `127.0.0.1:8500`).
    pub address: Option<String>,
    /// `http` or `https`, for an address without a scheme.
    pub scheme: Option<String>,
    /// Datacenter to query.
    pub datacenter: Option<String>,
    /// Datacenters to follow after it, in order, each a lower priority tier (for queries
    /// that name none).
    pub failover: Option<Vec<String>>,
    /// Instead of `failover`: the local datacenter and the `n` nearest others.
    pub nearest_datacenters: Option<usize>,
    /// How often the nearest datacenters' order is read again (default 60 s).
    #[serde(default, deserialize_with = "duration_opt")]
    pub datacenters_refresh: Option<Duration>,
    /// Namespace (Consul Enterprise).
    pub namespace: Option<String>,
    /// ACL token (never shown in `Debug`).
    pub token: Option<String>,
    /// CA certificate file for `https`.
    pub ca_file: Option<PathBuf>,
    /// Blocking-query wait.
    #[serde(default, deserialize_with = "duration_opt")]
    pub wait: Option<Duration>,
    /// `stale` reads.
    #[serde(default)]
    pub stale: bool,
    /// `stale` reads, none from a server out of touch with its leader longer than this.
    #[serde(default, deserialize_with = "duration_opt")]
    pub max_stale: Option<Duration>,
    /// `cached` reads.
    #[serde(default)]
    pub cached: bool,
    /// Time limit of non-blocking requests.
    #[serde(default, deserialize_with = "duration_opt")]
    pub request_timeout: Option<Duration>,
    /// Metadata key holding the zone.
    pub zone_key: Option<String>,
    /// The health check registered with each instance.
    pub health_check: Option<HealthCheckSection>,
}

impl fmt::Debug for ConsulSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulSection")
            .field("address", &self.address)
            .field("scheme", &self.scheme)
            .field("datacenter", &self.datacenter)
            .field("failover", &self.failover)
            .field("nearest_datacenters", &self.nearest_datacenters)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("health_check", &self.health_check)
            .finish_non_exhaustive()
    }
}

/// `registry.consul.health_check`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthCheckSection {
    /// `http` (default), `tcp`, `grpc` or `ttl`.
    pub kind: Option<String>,
    /// URL of an `http` check (default `http://{address}:{port}/healthz`).
    pub http: Option<String>,
    /// TTL of a `ttl` check.
    #[serde(default, deserialize_with = "duration_opt")]
    pub ttl: Option<Duration>,
    /// Check interval.
    #[serde(default, deserialize_with = "duration_opt")]
    pub interval: Option<Duration>,
    /// Check timeout.
    #[serde(default, deserialize_with = "duration_opt")]
    pub timeout: Option<Duration>,
    /// `DeregisterCriticalServiceAfter`.
    #[serde(default, deserialize_with = "duration_opt")]
    pub deregister_after: Option<Duration>,
}

impl ConsulSection {
    /// The registry this section describes; `path` is where it is in the file.
    #[cfg(feature = "consul")]
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        use super::build::{Maybe, at};
        use crate::registry::consul::ConsulRegistry;

        let path = &format!("{path}.consul");
        let address = match &self.address {
            Some(address) => Some(consul_url(address, self.scheme.as_deref(), path)?),
            None => None,
        };
        let health_check = match self.health_check {
            Some(check) => Some(check.template(path)?),
            None => None,
        };
        let failover = match (self.failover, self.nearest_datacenters) {
            (Some(_), Some(_)) => {
                return Err(crate::Error::InvalidConfig {
                    key: format!("{path}.nearest_datacenters"),
                    source: "give `failover` or `nearest_datacenters`, not both".into(),
                });
            }
            (Some(list), None) => Some(crate::Failover::Datacenters(list)),
            (None, Some(n)) => Some(crate::Failover::Nearest(n)),
            (None, None) => None,
        };
        let builder = ConsulRegistry::builder()
            .maybe(address, |b, v| b.address(v))
            .maybe(self.datacenter, |b, v| b.datacenter(v))
            .maybe(failover, |b, v| b.failover(v))
            .maybe(self.datacenters_refresh, |b, v| b.datacenters_refresh(v))
            .maybe(self.namespace, |b, v| b.namespace(v))
            .maybe(self.token, |b, v| b.token(v))
            .maybe(self.ca_file, |b, v| b.ca_file(v))
            .maybe(self.wait, |b, v| b.wait(v))
            .maybe(self.request_timeout, |b, v| b.request_timeout(v))
            .maybe(self.zone_key, |b, v| b.zone_key(v))
            .maybe(health_check, |b, v| b.health_check(v))
            .stale(self.stale)
            .maybe(self.max_stale, |b, v| b.max_stale(v))
            .cached(self.cached);
        Ok(Arc::new(builder.build().map_err(|e| at(e, path))?))
    }

    #[cfg(not(feature = "consul"))]
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        Err(super::build::not_compiled_in("consul", path))
    }
}

/// `address` as a URL: `scheme://host:port`; the port is required.
#[cfg(feature = "consul")]
fn consul_url(address: &str, scheme: Option<&str>, path: &str) -> Result<String> {
    let (scheme, rest) = match address.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => (scheme.unwrap_or("http"), address),
    };
    let host_port = rest.split('/').next().unwrap_or_default();
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(super::parse::invalid(
            format!("{path}.address"),
            format!("`{address}` has no port; expected host:port, e.g. localhost:8500"),
        ));
    }
    Ok(format!("{scheme}://{rest}"))
}

#[cfg(feature = "consul")]
impl HealthCheckSection {
    /// The check registered with each instance.
    fn template(self, path: &str) -> Result<crate::registry::consul::HealthCheck> {
        use super::build::Maybe;
        use super::parse::invalid;
        use crate::registry::consul::{HealthCheck, HealthCheckKind};

        let kind = match self.kind.as_deref().unwrap_or("http") {
            "http" => HealthCheckKind::Http(self.http),
            "tcp" => HealthCheckKind::Tcp,
            "grpc" => HealthCheckKind::Grpc,
            "ttl" => HealthCheckKind::Ttl(self.ttl.ok_or_else(|| {
                invalid(
                    format!("{path}.health_check.ttl"),
                    "a ttl check needs `ttl`",
                )
            })?),
            other => {
                return Err(invalid(
                    format!("{path}.health_check.kind"),
                    format!("unknown check kind `{other}`; valid kinds: http, tcp, grpc, ttl"),
                ));
            }
        };
        Ok(HealthCheck::new(kind)
            .maybe(self.interval, |c, v| c.interval(v))
            .maybe(self.timeout, |c, v| c.timeout(v))
            .maybe(self.deregister_after, |c, v| c.deregister_after(v)))
    }
}
