//! [`DnsRegistry`]: a service's instances from DNS: SRV records (gRPC's `_grpc._tcp.name`,
//! Consul DNS, Kubernetes headless services) or A/AAAA records on a fixed port, re-resolved
//! on the records' TTL.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_sd::registry::dns::DnsRegistry;
//! use tower_sd::{ServiceQuery, ServiceRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_sd::Error> {
//! let dns = DnsRegistry::builder()                       // the system's name servers
//!     .min_ttl(Duration::from_secs(5))
//!     .max_ttl(Duration::from_secs(300))
//!     .build()?;
//! // SRV: address, port and weight from the records.
//! let srv = dns.discover(&ServiceQuery::new("_grpc._tcp.greeter.example.com")).await?;
//! // A and AAAA on a fixed port: `host:port`.
//! let plain = dns.discover(&ServiceQuery::new("greeter.example.com:50051")).await?;
//! # drop((srv, plain));
//! # Ok(())
//! # }
//! ```

mod lookup;
mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tracing::warn;

use super::{ServiceRegistry, WatchStream};
use crate::error::{Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};
use lookup::{Outcome, Target};

/// The shortest `min_ttl`: re-resolving more often than this is a loop, not a watch.
const MIN_TTL_FLOOR: Duration = Duration::from_secs(1);

const REGISTRY: &str = "dns";

/// Which records a query name without a port resolves, and how a name with one does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordKind {
    /// SRV records (the default). A query `host:port` resolves A and AAAA instead.
    #[default]
    Srv,
    /// A records (IPv4) on a fixed port.
    A,
    /// AAAA records (IPv6) on a fixed port.
    Aaaa,
    /// A and AAAA records on a fixed port.
    Ip,
}

impl FromStr for RecordKind {
    type Err = Error;

    /// `srv`, `a`, `aaaa` or `ip` (A and AAAA), in any case.
    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "srv" => Ok(Self::Srv),
            "a" => Ok(Self::A),
            "aaaa" => Ok(Self::Aaaa),
            "ip" => Ok(Self::Ip),
            other => Err(Error::InvalidConfig {
                key: "registry.dns.record".into(),
                source: format!("unknown record kind `{other}`; valid: srv, a, aaaa, ip").into(),
            }),
        }
    }
}

/// A [`ServiceRegistry`] over DNS.
///
/// A query's name is the DNS name: `_grpc._tcp.greeter.example.com` resolves SRV records
/// (with the default [`RecordKind::Srv`]), `greeter.example.com:50051` resolves A and AAAA
/// records on port 50051. With [`RecordKind::A`], [`Aaaa`](RecordKind::Aaaa) or
/// [`Ip`](RecordKind::Ip), names resolve those records on the name's port, else the
/// configured [`port`](DnsBuilder::port). Instance ids are `address:port`; SRV instances
/// carry their target and priority in metadata, and their weight.
///
/// - `watch` re-resolves when the records' TTL runs out, kept between the
///   [`min_ttl`](DnsBuilder::min_ttl) and [`max_ttl`](DnsBuilder::max_ttl), and emits a set when it changes. A name that
///   does not exist (NXDOMAIN) or has no records becomes an empty set only when that
///   repeats ([`empty_after`](DnsBuilder::empty_after) lookups in a row, re-checked at the
///   TTL floor): one missing answer keeps the last set. Failures (timeouts, refused) are
///   yielded, with backoff, and keep the last set too.
/// - `discover` resolves once; a missing name is an empty set.
/// - `register`, `deregister` and `health` are [`Error::Unsupported`]: DNS records are
///   published by whoever owns the zone, and say nothing about health.
#[derive(Clone)]
pub struct DnsRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: TokioResolver,
    config: DnsBuilder,
}

/// Configures a [`DnsRegistry`]; see [`DnsRegistry::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct DnsBuilder {
    nameservers: Vec<SocketAddr>,
    record: RecordKind,
    port: Option<u16>,
    min_ttl: Duration,
    max_ttl: Duration,
    empty_after: u32,
    timeout: Duration,
    retry_base: Duration,
    retry_max: Duration,
}

// ===== impl DnsBuilder =====

impl DnsBuilder {
    /// Name servers to ask, `ip:port` (default: the system's, from `/etc/resolv.conf`).
    pub fn nameservers(mut self, servers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.nameservers = servers.into_iter().collect();
        self
    }

    /// Which records names resolve (default SRV).
    pub fn record(mut self, kind: RecordKind) -> Self {
        self.record = kind;
        self
    }

    /// The port of A/AAAA instances when the query name has none.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Re-resolve no sooner than this after a lookup, whatever the records' TTL says
    /// (default 5 s, at least 1 s: a TTL of 0, which Consul's DNS answers with by default,
    /// must not make the watch resolve in a loop); also the interval at which a missing name
    /// is checked again.
    pub fn min_ttl(mut self, min: Duration) -> Self {
        self.min_ttl = min;
        self
    }

    /// Re-resolve no later than this after a lookup, whatever the records' TTL says
    /// (default 5 min).
    pub fn max_ttl(mut self, max: Duration) -> Self {
        self.max_ttl = max;
        self
    }

    /// How many missing answers in a row empty the set (default 2).
    pub fn empty_after(mut self, lookups: u32) -> Self {
        self.empty_after = lookups.max(1);
        self
    }

    /// The limit on each query to a name server (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Backoff between failed lookups: full jitter from `base`, doubling up to `max`
    /// (default 100 ms to 30 s).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max = max;
        self
    }

    /// What a query's name asks for.
    fn target(&self, name: &str) -> Result<Target> {
        let invalid = |why: String| Error::InvalidConfig {
            key: "query".into(),
            source: why.into(),
        };
        let (host, port) = match name.rsplit_once(':') {
            // `host:port`, but not a bare IPv6 address.
            Some((host, port)) if !host.contains(':') => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| invalid(format!("`{name}`: `{port}` is not a port")))?;
                (host, Some(port))
            }
            _ => (name, None),
        };
        match (self.record, port.or(self.port)) {
            (RecordKind::Srv, None) => Ok(Target::Srv(host.to_owned())),
            (RecordKind::Srv, Some(port)) => Ok(Target::Addresses {
                host: host.to_owned(),
                port,
                kind: RecordKind::Ip,
            }),
            (kind, Some(port)) => Ok(Target::Addresses {
                host: host.to_owned(),
                port,
                kind,
            }),
            (kind, None) => Err(invalid(format!(
                "`{name}`: {kind:?} records carry no port; query `host:port` or set a port"
            ))),
        }
    }

    /// Builds the registry.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the TTL floor exceeds the ceiling, a name server has
    /// port 0, or (with no name servers given) the system's configuration cannot be read.
    pub fn build(mut self) -> Result<DnsRegistry> {
        let invalid = |key: &str, why: String| Error::InvalidConfig {
            key: format!("registry.dns.{key}"),
            source: why.into(),
        };
        if self.min_ttl < MIN_TTL_FLOOR {
            warn!(min_ttl = ?self.min_ttl, floor = ?MIN_TTL_FLOOR, "min_ttl below the floor; using the floor");
            self.min_ttl = MIN_TTL_FLOOR;
            self.max_ttl = self.max_ttl.max(MIN_TTL_FLOOR);
        }
        if self.min_ttl > self.max_ttl {
            return Err(invalid(
                "min_ttl",
                format!("{:?} is above max_ttl {:?}", self.min_ttl, self.max_ttl),
            ));
        }
        if let Some(server) = self.nameservers.iter().find(|s| s.port() == 0) {
            return Err(invalid("nameservers", format!("`{server}` has port 0")));
        }
        let provider = TokioRuntimeProvider::default();
        let mut builder = if self.nameservers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| invalid("nameservers", format!("no system name servers: {e}")))?
        } else {
            let servers = self
                .nameservers
                .iter()
                .map(|server| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = server.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = server.port();
                    NameServerConfig::new(server.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let options = builder.options_mut();
        // The watch schedules lookups by TTL itself; a cache would only hide changes.
        options.cache_size = 0;
        options.timeout = self.timeout;
        let resolver = builder
            .build()
            .map_err(|e| invalid("nameservers", e.to_string()))?;
        Ok(DnsRegistry {
            inner: Arc::new(Inner {
                resolver,
                config: self,
            }),
        })
    }
}

// ===== impl DnsRegistry =====

impl DnsRegistry {
    /// A builder: the system's name servers, SRV records, TTL between 5 s and 5 min.
    pub fn builder() -> DnsBuilder {
        DnsBuilder {
            nameservers: Vec::new(),
            record: RecordKind::Srv,
            port: None,
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            empty_after: 2,
            timeout: Duration::from_secs(5),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
        }
    }
}

impl Inner {
    fn target(&self, name: &str) -> Result<Target> {
        self.config.target(name)
    }

    /// The re-resolve delay for a TTL.
    fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.config.min_ttl, self.config.max_ttl)
    }
}

impl fmt::Debug for DnsRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsRegistry")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn unsupported(operation: &'static str) -> Error {
    Error::unsupported(
        REGISTRY,
        operation,
        "DNS records are published by the zone's owner and carry no health",
    )
}

impl ServiceRegistry for DnsRegistry {
    fn kind(&self) -> &'static str {
        REGISTRY
    }

    fn register(&self, _instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        async { Err(unsupported("register")) }.boxed()
    }

    fn deregister<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<()>> {
        async { Err(unsupported("deregister")) }.boxed()
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        async move {
            let target = self.inner.target(&query.name)?;
            match lookup::resolve(&self.inner.resolver, &target, &query.name).await? {
                Outcome::Found { mut instances, .. } => {
                    instances.retain(|instance| query.matches(instance));
                    Ok(instances)
                }
                Outcome::Missing => Ok(Vec::new()),
            }
        }
        .boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        watch::stream(Arc::clone(&self.inner), query.clone()).boxed()
    }

    fn health<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        async { Err(unsupported("health")) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_choose_the_records() {
        let srv = DnsRegistry::builder();
        assert_eq!(
            srv.target("_grpc._tcp.greeter.example.com").unwrap(),
            Target::Srv("_grpc._tcp.greeter.example.com".into())
        );
        let addresses = |host: &str, port, kind| Target::Addresses {
            host: host.into(),
            port,
            kind,
        };
        assert_eq!(
            srv.target("greeter.example.com:50051").unwrap(),
            addresses("greeter.example.com", 50051, RecordKind::Ip)
        );
        let a = DnsRegistry::builder().record(RecordKind::A).port(8080);
        assert_eq!(
            a.target("web").unwrap(),
            addresses("web", 8080, RecordKind::A)
        );
        assert_eq!(
            a.target("web:9090").unwrap(),
            addresses("web", 9090, RecordKind::A)
        );
        for bad in ["web:0", "web:http", "web:70000"] {
            assert!(
                matches!(srv.target(bad), Err(Error::InvalidConfig { .. })),
                "{bad}"
            );
        }
        let aaaa = DnsRegistry::builder().record(RecordKind::Aaaa);
        assert!(aaaa.target("web").is_err(), "no port anywhere");
    }
}
