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
//!
//! SRV records give address (targets resolved to their addresses), port, weight and
//! priority: every priority is used, each a [tier](crate::balance#priority-tiers), so the
//! balancer stays on the lowest number while enough of it is reachable and spills to the
//! higher ones as it is not (RFC 2782), with the weights applying within a tier. A TTL floor of 1 s (`min_ttl` is
//! raised to it, with a warning) keeps a TTL of 0, Consul DNS's default, from becoming a
//! query loop. An NXDOMAIN or empty answer empties the set only when it repeats
//! (`empty_after`, default 2 lookups in a row): one missing answer keeps the last set, as does a
//! failed lookup (which is yielded, with backoff). `register` and `health` return
//! `Unsupported`. Tested against a real dnsmasq with several SRV targets and weights, A and
//! AAAA, records changed mid-test through its `hostsdir`, NXDOMAIN, and a silent server.

mod builder;
mod lookup;
mod watch;

pub use builder::DnsRegistryBuilder;
use builder::Settings;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use hickory_resolver::TokioResolver;

use super::{ServiceRegistry, WatchStream};
use crate::error::{Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};
use lookup::Outcome;

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
                key: "record".into(),
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
/// configured [`port`](DnsRegistryBuilder::port). Instance ids are `address:port`; SRV instances
/// carry their target and priority in metadata, their weight, and their priority as their
/// [`priority`](ServiceInstance::priority) tier (an address listed at two priorities is kept
/// at the lower).
///
/// - `watch` re-resolves when the records' TTL runs out, kept between the
///   [`min_ttl`](DnsRegistryBuilder::min_ttl) and [`max_ttl`](DnsRegistryBuilder::max_ttl), and emits a set when it changes. A name that
///   does not exist (NXDOMAIN) or has no records becomes an empty set only when that
///   repeats ([`empty_after`](DnsRegistryBuilder::empty_after) lookups in a row, re-checked at the
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
    settings: Settings,
}

// ===== impl DnsRegistry =====

impl DnsRegistry {
    /// A builder: the system's name servers, SRV records, TTL between 5 s and 5 min.
    pub fn builder() -> DnsRegistryBuilder {
        DnsRegistryBuilder::default()
    }

    fn with(resolver: TokioResolver, settings: Settings) -> Self {
        Self {
            inner: Arc::new(Inner { resolver, settings }),
        }
    }
}

impl Inner {
    /// Resolves `name` once: the target it asks for, then its records. A lookup that timed
    /// out is an [`Error::Timeout`] naming the configured limit.
    async fn resolve(&self, name: &str) -> Result<Outcome> {
        let target = self.settings.target(name)?;
        let resolved = lookup::resolve(&self.resolver, &target, name).await;
        resolved.map_err(|error| match error {
            Error::Timeout { registry, .. } => Error::Timeout {
                registry,
                source: crate::error::Elapsed(self.settings.timeout),
            },
            other => other,
        })
    }

    /// The re-resolve delay for a TTL.
    fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.settings.min_ttl, self.settings.max_ttl)
    }
}

impl fmt::Debug for DnsRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsRegistry")
            .field("settings", &self.inner.settings)
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
            match self.inner.resolve(&query.name).await? {
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
