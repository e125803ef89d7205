//! `registry.dns`: [`DnsSection`], and the registry it builds.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::parse::duration_opt;
use crate::error::Result;
use crate::registry::ServiceRegistry;

/// `registry.dns`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DnsSection {
    /// Name servers, `ip:port` (default: the system's).
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Re-resolve no sooner than this.
    #[serde(default, deserialize_with = "duration_opt")]
    pub min_ttl: Option<Duration>,
    /// Re-resolve no later than this.
    #[serde(default, deserialize_with = "duration_opt")]
    pub max_ttl: Option<Duration>,
    /// `srv` (default), `a`, `aaaa` or `ip` (A and AAAA).
    pub record: Option<String>,
    /// Port of A/AAAA instances whose query name has none.
    pub port: Option<u16>,
}

impl DnsSection {
    /// The registry this section describes; `path` is where it is in the file.
    #[cfg(feature = "dns")]
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        use super::build::{Maybe, at};
        use super::parse::invalid;
        use crate::registry::dns::{DnsRegistry, RecordKind};

        let mut servers = Vec::with_capacity(self.nameservers.len());
        for (i, server) in self.nameservers.iter().enumerate() {
            let addr = server.parse::<std::net::SocketAddr>().map_err(|e| {
                invalid(
                    format!("{path}.dns.nameservers[{i}]"),
                    format!("`{server}` is not `ip:port`: {e}"),
                )
            })?;
            servers.push(addr);
        }
        let record = match self.record {
            Some(record) => Some(
                record
                    .parse::<RecordKind>()
                    .map_err(|e| at(e, &format!("{path}.dns")))?,
            ),
            None => None,
        };
        let builder = DnsRegistry::builder()
            .nameservers(servers)
            .maybe(self.min_ttl, |b, v| b.min_ttl(v))
            .maybe(self.max_ttl, |b, v| b.max_ttl(v))
            .maybe(record, |b, v| b.record(v))
            .maybe(self.port, |b, v| b.port(v));
        Ok(Arc::new(
            builder.build().map_err(|e| at(e, &format!("{path}.dns")))?,
        ))
    }

    #[cfg(not(feature = "dns"))]
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        Err(super::build::not_compiled_in("dns", path))
    }
}
