//! Service registries: the [`ServiceRegistry`] trait and its backends.
//!
//! Every backend gives the same guarantees, so the rest of the crate (and your code) can be
//! written once against `Arc<dyn ServiceRegistry>`:
//!
//! - [`discover`](ServiceRegistry::discover) returns the healthy instances (passing or
//!   warning) that match the query, sorted by id.
//! - [`watch`](ServiceRegistry::watch) yields that same set first, then a new full set on every
//!   change, never the same set twice in a row. A slow consumer gets the latest set, not a
//!   backlog. A transient failure is yielded as an `Err` item and the stream goes on (after a
//!   backoff); the first set after an error is always yielded, changed or not, so that a
//!   follower knows the registry answers again. The stream ends only when the registry
//!   itself is gone.
//! - Instance ids are unique within a set: everything downstream (the discover adapter, the
//!   cache, the balancer) is keyed by them. Where a registry's own ids are not (Consul's are
//!   unique per agent only), the backend qualifies them.
//! - Backends that cannot register (a static list, Kubernetes, DNS) return
//!   [`Error::Unsupported`], never a silent success.
//!
//! Always available: [`MemoryRegistry`] (the embedded default, with health states and TTL
//! checks), [`StaticRegistry`] (a fixed list), and two wrappers that are registries
//! themselves: [`CachedRegistry`] (last known good sets) and [`FallbackRegistry`] (an ordered
//! chain).
//!
//! # Resilience
//!
//! - `CachedRegistry` serves the last good set of a query while the registry fails (for up to
//!   `max_stale`), reports it as stale in `stats()` and the logs, and can persist the sets to a
//!   file and seed from it at start, so a client starts while the registry is down; a saved set
//!   older than `max_stale` is not used, and one that is used is said to come from the file.
//!   Its watch never drops to an empty set because of a registry error. It keeps at most
//!   `max_entries` queries (unwatched, idle ones go first). The file is written off the
//!   runtime's threads, atomically (a unique temporary file, fsynced, renamed, its directory
//!   fsynced), readable by its owner only, and under a lock that merges what other processes
//!   sharing the path wrote, so none erases another's queries.
//! - `FallbackRegistry` discovers from the first registry that answers, follows the primary's
//!   watch, switches to the next after `failover_after` of failures and back as soon as the
//!   primary answers, even with the same set as before (every watch sends its first set after
//!   an error, and Consul's first query after one does not block on the old index), with no
//!   empty set in between. Registration goes to the primary.
//! - Every retry loop backs off (exponential, full jitter, capped, reset on success), and
//!   Consul's watch adds a token bucket: a registry that always fails sees a bounded trickle of
//!   requests (tested: at most 15 queries in a 2-second outage).

mod cached;
#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "dns")]
pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;
mod fallback;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
mod memory;
mod static_list;
mod subset;
#[cfg(any(
    feature = "consul",
    feature = "kubernetes",
    feature = "etcd",
    feature = "dns"
))]
mod watch;

pub use cached::{CacheStats, CachedRegistry, CachedRegistryBuilder};
pub use fallback::{FallbackRegistry, FallbackRegistryBuilder};
pub use memory::{MemoryRegistry, MemoryRegistryBuilder};
pub use static_list::{StaticRegistry, StaticRegistryBuilder};
pub use subset::{Subset, SubsetRegistry};

use std::sync::Arc;

use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;

use crate::error::{Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};

/// A stream of full healthy instance sets, as returned by [`ServiceRegistry::watch`].
pub type WatchStream = BoxStream<'static, Result<Vec<ServiceInstance>>>;

/// A service registry: where instances register and where clients discover them.
///
/// The trait is object safe; backends are usually held as `Arc<dyn ServiceRegistry>`, which
/// implements the trait too.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use tower_sd::{MemoryRegistry, ServiceInstance, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_sd::Error> {
/// let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
/// registry.register(ServiceInstance::new("a", "greeter", "10.0.0.1", 50051)).await?;
/// let instances = registry.discover(&"greeter".into()).await?;
/// assert_eq!(instances.len(), 1);
/// # Ok(())
/// # }
/// ```
pub trait ServiceRegistry: Send + Sync + std::fmt::Debug {
    /// A short name for the backend, e.g. `memory` or `consul`, used in errors and logs.
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// Registers an instance, replacing any instance with the same id.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInstance`] when the instance does not [validate]; an
    /// [`Error::Unsupported`] from registries that do not take registrations; the
    /// backend's transport errors.
    ///
    /// [validate]: ServiceInstance::validate
    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>>;

    /// Removes an instance. Removing an id that is not registered succeeds.
    ///
    /// # Errors
    ///
    /// As for [`register`](ServiceRegistry::register).
    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// The healthy instances matching `query`, sorted by id.
    ///
    /// # Errors
    ///
    /// The backend's transport and protocol errors.
    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>>;

    /// Follows the healthy instances matching `query`: the current set first, then every
    /// different set. See the [module docs](self) for the guarantees.
    fn watch(&self, query: &ServiceQuery) -> WatchStream;

    /// The health of one instance; [`HealthStatus::Unknown`] when the registry does not know
    /// the id.
    ///
    /// # Errors
    ///
    /// The backend's transport and protocol errors.
    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>>;

    /// Puts a registered instance in maintenance (it leaves discovery) or takes it out, as a
    /// drain step before deregistering. Registries without it return
    /// [`Error::Unsupported`].
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] unless the backend has a maintenance mode; the backend's errors.
    fn set_maintenance<'a>(
        &'a self,
        id: &'a str,
        enable: bool,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (id, enable, reason);
        let kind = self.kind();
        Box::pin(async move {
            Err(Error::unsupported(
                kind,
                "set_maintenance",
                "the registry has no maintenance mode",
            ))
        })
    }

    /// Renews the TTL check of a registered instance (Consul `check/pass`), so it stays
    /// passing. Registries without TTL checks return [`Error::Unsupported`].
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] unless the backend has TTL checks; the backend's transport
    /// errors.
    fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        let _ = id;
        let kind = self.kind();
        Box::pin(async move {
            Err(Error::unsupported(
                kind,
                "heartbeat",
                "the registry has no TTL checks",
            ))
        })
    }
}

/// A registry the integrations hold: any [`ServiceRegistry`], by value (registries are
/// cheap to clone, or an `Arc` of one, or an `Arc<dyn ServiceRegistry>`).
///
/// # Examples
///
/// ```
/// use tower_sd::MemoryRegistry;
/// use tower_sd::ServiceRegistry;
/// use tower_sd::registry::IntoRegistry;
///
/// let registry = MemoryRegistry::new();
/// let held = registry.clone().into_registry();
/// assert_eq!(held.kind(), "memory");
/// ```
pub trait IntoRegistry {
    /// The registry, shared.
    fn into_registry(self) -> Arc<dyn ServiceRegistry>;
}

impl<R: ServiceRegistry + 'static> IntoRegistry for R {
    fn into_registry(self) -> Arc<dyn ServiceRegistry> {
        Arc::new(self)
    }
}

macro_rules! forward_registry {
    ($ty:ty) => {
        impl<R: ServiceRegistry + ?Sized> ServiceRegistry for $ty {
            fn kind(&self) -> &'static str {
                (**self).kind()
            }
            fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
                (**self).register(instance)
            }
            fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
                (**self).deregister(id)
            }
            fn discover<'a>(
                &'a self,
                query: &'a ServiceQuery,
            ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
                (**self).discover(query)
            }
            fn watch(&self, query: &ServiceQuery) -> WatchStream {
                (**self).watch(query)
            }
            fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
                (**self).health(id)
            }
            fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
                (**self).heartbeat(id)
            }
            fn set_maintenance<'a>(
                &'a self,
                id: &'a str,
                enable: bool,
                reason: &'a str,
            ) -> BoxFuture<'a, Result<()>> {
                (**self).set_maintenance(id, enable, reason)
            }
        }
    };
}

forward_registry!(Arc<R>);
forward_registry!(Box<R>);

/// Whether an instance read from the network or a file can be dialled (it
/// [validates](ServiceInstance::validate)); one that cannot is logged, for the caller to
/// skip: nothing from outside is dialled unchecked.
pub(crate) fn dialable(source: &str, instance: &ServiceInstance) -> bool {
    match instance.validate() {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(source, id = %instance.id, service = %instance.name, error = %crate::error::Chain(&error), "skipping an instance that cannot be dialled");
            false
        }
    }
}

/// Validates each instance and rejects a repeated id.
pub(crate) fn validate_all(instances: &[ServiceInstance]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for instance in instances {
        instance.validate()?;
        if !seen.insert(instance.id.as_str()) {
            return Err(Error::InvalidInstance {
                field: "id",
                source: crate::error::InvalidValue::Duplicate(instance.id.clone()),
            });
        }
    }
    Ok(())
}

/// A credential (ACL token, password) that never shows in `Debug` output.
#[cfg(any(feature = "consul", feature = "etcd"))]
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) String);

#[cfg(any(feature = "consul", feature = "etcd"))]
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}
