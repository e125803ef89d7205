//! The sections that need no backend: `registry.memory`, `registry.static` and
//! `registry.cache`, and what they build.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::build::Maybe;
use super::parse::{duration_opt, invalid};
use crate::error::Result;
use crate::instance::ServiceInstance;
use crate::registry::{CachedRegistry, MemoryRegistry, ServiceRegistry, StaticRegistry};

/// `registry.static`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticSection {
    /// The instances.
    pub instances: Vec<ServiceInstance>,
}

/// `registry.memory`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MemorySection {
    /// The registry's datacenter (default `dc1`).
    pub datacenter: Option<String>,
    /// The registry's namespace (default `default`).
    pub namespace: Option<String>,
    /// TTL check for every registration.
    #[serde(default, deserialize_with = "duration_opt")]
    pub ttl: Option<Duration>,
    /// Remove instances critical this long.
    #[serde(default, deserialize_with = "duration_opt")]
    pub deregister_after: Option<Duration>,
}

/// `registry.cache`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheSection {
    /// Serve cached sets at most this long after the last good answer (default: for ever).
    #[serde(default, deserialize_with = "duration_opt")]
    pub max_stale: Option<Duration>,
    /// Persist the good sets to this file and seed from it at start.
    pub persist: Option<PathBuf>,
}

impl MemorySection {
    /// The in-memory registry this section describes.
    pub(super) fn registry(self) -> Arc<dyn ServiceRegistry> {
        let builder = MemoryRegistry::builder()
            .maybe(self.datacenter, |b, v| b.datacenter(v))
            .maybe(self.namespace, |b, v| b.namespace(v))
            .maybe(self.ttl, |b, v| b.ttl(v))
            .maybe(self.deregister_after, |b, v| b.deregister_critical_after(v));
        Arc::new(builder.build())
    }
}

impl StaticSection {
    /// The fixed list this section describes; `path` is where it is in the file.
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        let registry = StaticRegistry::builder()
            .instances(self.instances)
            .build()
            .map_err(|e| invalid(format!("{path}.static.instances"), e))?;
        Ok(Arc::new(registry))
    }
}

impl CacheSection {
    /// `registry`, cached as this section says.
    pub(super) fn around(&self, registry: Arc<dyn ServiceRegistry>) -> Arc<dyn ServiceRegistry> {
        let builder = CachedRegistry::builder(registry)
            .maybe(self.max_stale, |b, v| b.max_stale(v))
            .maybe(self.persist.as_ref(), |b, v| b.persist_to(v));
        Arc::new(builder.build())
    }
}
