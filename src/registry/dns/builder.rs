//! [`DnsRegistryBuilder`] and the [`Settings`] a running [`DnsRegistry`] reads.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tracing::warn;

use super::lookup::Target;
use super::{DnsRegistry, MIN_TTL_FLOOR, RecordKind};
use crate::error::{Error, Result};

/// What a running [`DnsRegistry`] reads: the builder's values, checked.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub(super) nameservers: Vec<SocketAddr>,
    pub(super) record: RecordKind,
    pub(super) port: Option<u16>,
    pub(super) min_ttl: Duration,
    pub(super) max_ttl: Duration,
    pub(super) empty_after: u32,
    pub(super) timeout: Duration,
    pub(super) retry_base: Duration,
    pub(super) retry_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
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

impl Settings {
    /// What a query's name asks for.
    pub(super) fn target(&self, name: &str) -> Result<Target> {
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
}

/// Configures a [`DnsRegistry`]; see [`DnsRegistry::builder`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct DnsRegistryBuilder {
    settings: Settings,
}

// ===== impl DnsRegistryBuilder =====

impl DnsRegistryBuilder {
    /// Name servers to ask, `ip:port` (default: the system's, from `/etc/resolv.conf`).
    pub fn nameservers(mut self, servers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.settings.nameservers = servers.into_iter().collect();
        self
    }

    /// Which records names resolve (default SRV).
    pub fn record(mut self, kind: RecordKind) -> Self {
        self.settings.record = kind;
        self
    }

    /// The port of A/AAAA instances when the query name has none.
    pub fn port(mut self, port: u16) -> Self {
        self.settings.port = Some(port);
        self
    }

    /// Re-resolve no sooner than this after a lookup, whatever the records' TTL says
    /// (default 5 s, at least 1 s: a TTL of 0, which Consul's DNS answers with by default,
    /// must not make the watch resolve in a loop); also the interval at which a missing name
    /// is checked again.
    pub fn min_ttl(mut self, min: Duration) -> Self {
        self.settings.min_ttl = min;
        self
    }

    /// Re-resolve no later than this after a lookup, whatever the records' TTL says
    /// (default 5 min).
    pub fn max_ttl(mut self, max: Duration) -> Self {
        self.settings.max_ttl = max;
        self
    }

    /// How many missing answers in a row empty the set (default 2).
    pub fn empty_after(mut self, lookups: u32) -> Self {
        self.settings.empty_after = lookups.max(1);
        self
    }

    /// The limit on each query to a name server (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Backoff between failed lookups: full jitter from `base`, doubling up to `max`
    /// (default 100 ms to 30 s).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.retry_base = base;
        self.settings.retry_max = max;
        self
    }

    /// Builds the registry.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the TTL floor exceeds the ceiling, a name server has
    /// port 0, or (with no name servers given) the system's configuration cannot be read.
    pub fn build(self) -> Result<DnsRegistry> {
        let mut settings = self.settings;
        let invalid = |key: &str, why: String| Error::InvalidConfig {
            key: key.to_owned(),
            source: why.into(),
        };
        if settings.min_ttl < MIN_TTL_FLOOR {
            warn!(min_ttl = ?settings.min_ttl, floor = ?MIN_TTL_FLOOR, "min_ttl below the floor; using the floor");
            settings.min_ttl = MIN_TTL_FLOOR;
            settings.max_ttl = settings.max_ttl.max(MIN_TTL_FLOOR);
        }
        if settings.min_ttl > settings.max_ttl {
            return Err(invalid(
                "min_ttl",
                format!(
                    "{:?} is above max_ttl {:?}",
                    settings.min_ttl, settings.max_ttl
                ),
            ));
        }
        if let Some(server) = settings.nameservers.iter().find(|s| s.port() == 0) {
            return Err(invalid("nameservers", format!("`{server}` has port 0")));
        }
        let provider = TokioRuntimeProvider::default();
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| invalid("nameservers", format!("no system name servers: {e}")))?
        } else {
            let servers = settings
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
        options.timeout = settings.timeout;
        let resolver = builder
            .build()
            .map_err(|e| invalid("nameservers", e.to_string()))?;
        Ok(DnsRegistry::with(resolver, settings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_choose_the_records() {
        let srv = DnsRegistry::builder().settings;
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
        let a = DnsRegistry::builder()
            .record(RecordKind::A)
            .port(8080)
            .settings;
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
        let aaaa = DnsRegistry::builder().record(RecordKind::Aaaa).settings;
        assert!(aaaa.target("web").is_err(), "no port anywhere");
    }
}
