//! [`FallbackRegistry`]: an ordered chain of registries, e.g. Consul, then Kubernetes, then a
//! static list.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, stream};
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use super::{IntoRegistry, ServiceRegistry, WatchStream};
use crate::error::{Chain, Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};

/// Asks an ordered chain of registries.
///
/// - `discover` returns the first successful answer down the chain.
/// - `watch` follows the primary; once the primary has failed for `failover_after`
///   (default 30 s) it follows the next registry (and the one after, should that fail too),
///   and it switches back as soon as the primary answers again. Only sets from the registry
///   being followed are emitted, so no empty set appears in between; errors are passed on.
/// - Registration, deregistration, heartbeats and maintenance go to the primary; `health`
///   asks down the chain.
/// - With the `metrics` feature, `tower_sd_fallback_active{service, registry}` is the
///   position in the chain of the registry followed (0 for the primary).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_sd::registry::FallbackRegistry;
/// use tower_sd::{MemoryRegistry, ServiceInstance, StaticRegistry};
///
/// # fn main() -> Result<(), tower_sd::Error> {
/// let last_resort = StaticRegistry::builder()
///     .instance(ServiceInstance::new("a", "api", "10.0.0.1", 80))
///     .build()?;
/// let chain = FallbackRegistry::builder()
///     .then(MemoryRegistry::new())
///     .then(last_resort)
///     .failover_after(Duration::from_secs(10))
///     .build()?;
/// # drop(chain);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct FallbackRegistry {
    chain: Arc<[Arc<dyn ServiceRegistry>]>,
    failover_after: Duration,
}

/// Builds a [`FallbackRegistry`]: the registries in the order they are asked, primary
/// first.
#[derive(Debug, Default)]
#[must_use]
pub struct FallbackRegistryBuilder {
    chain: Vec<Arc<dyn ServiceRegistry>>,
    failover_after: Option<Duration>,
}

impl FallbackRegistry {
    /// A builder with an empty chain.
    pub fn builder() -> FallbackRegistryBuilder {
        FallbackRegistryBuilder::default()
    }

    fn primary(&self) -> &Arc<dyn ServiceRegistry> {
        &self.chain[0]
    }
}

impl FallbackRegistryBuilder {
    /// The next registry of the chain (the first is the primary).
    pub fn then(mut self, registry: impl IntoRegistry) -> Self {
        self.chain.push(registry.into_registry());
        self
    }

    /// How long the registry being followed must fail before the next one is used
    /// (default 30 s; a huge one means never).
    pub fn failover_after(mut self, after: Duration) -> Self {
        self.failover_after = Some(after);
        self
    }

    /// The registry.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an empty chain.
    pub fn build(self) -> Result<FallbackRegistry> {
        if self.chain.is_empty() {
            return Err(Error::InvalidConfig {
                key: "chain".to_owned(),
                source: "the chain needs at least one registry".into(),
            });
        }
        Ok(FallbackRegistry {
            chain: self.chain.into(),
            failover_after: self.failover_after.unwrap_or(Duration::from_secs(30)),
        })
    }
}

impl fmt::Debug for FallbackRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackRegistry")
            .field("chain", &self.chain)
            .field("failover_after", &self.failover_after)
            .finish()
    }
}

/// A watch of the chain: the primary's watch always (its first answer switches back to it),
/// and what is followed.
struct FallbackWatch {
    chain: Arc<[Arc<dyn ServiceRegistry>]>,
    query: ServiceQuery,
    failover_after: Duration,
    primary: WatchStream,
    followed: Followed,
}

/// The registry a [`FallbackWatch`] follows, as kube-runtime's watcher writes its states.
enum Followed {
    /// The primary; failing since then, if it is.
    Primary { failing_since: Option<Instant> },
    /// `chain[index]`, through its own watch, since the one before it failed for the
    /// failover time; failing since then, if it is.
    Fallback {
        index: usize,
        watch: WatchStream,
        failing_since: Option<Instant>,
    },
}

/// What woke a [`FallbackWatch`].
enum Woken {
    Primary(Option<Result<Vec<ServiceInstance>>>),
    Fallback(Option<Result<Vec<ServiceInstance>>>),
    /// The registry followed has failed for the failover time.
    FailedOver,
}

impl Followed {
    fn index(&self) -> usize {
        match self {
            Self::Primary { .. } => 0,
            Self::Fallback { index, .. } => *index,
        }
    }

    fn failing_since(&mut self) -> &mut Option<Instant> {
        match self {
            Self::Primary { failing_since } | Self::Fallback { failing_since, .. } => failing_since,
        }
    }
}

impl FallbackWatch {
    /// With the `metrics` feature, `tower_sd_fallback_active{service, registry}`: the
    /// position in the chain of the registry followed (0 for the primary).
    fn report(&self) {
        let index = self.followed.index();
        crate::metrics::fallback_active(&self.query.name, self.chain[index].kind(), index);
    }

    /// When the registry followed will have failed for the failover time, if it is failing
    /// and a next one exists.
    fn failover_at(&mut self) -> Option<Instant> {
        let after = self.failover_after;
        let next = self.followed.index() + 1;
        let has_next = next < self.chain.len();
        let since = (*self.followed.failing_since())?;
        has_next.then(|| since.checked_add(after)).flatten()
    }

    async fn wake(&mut self) -> Woken {
        let failover_at = self.failover_at();
        let fallback = async {
            match &mut self.followed {
                Followed::Fallback { watch, .. } => watch.next().await,
                Followed::Primary { .. } => std::future::pending().await,
            }
        };
        tokio::select! {
            item = self.primary.next() => Woken::Primary(item),
            item = fallback => Woken::Fallback(item),
            () = async {
                match failover_at {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Woken::FailedOver,
        }
    }

    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            match self.wake().await {
                Woken::Primary(None) => return None,
                Woken::Primary(Some(Ok(set))) => {
                    if let Followed::Fallback { .. } = self.followed {
                        info!(service = %self.query, "primary registry answers again; switching back");
                        self.followed = Followed::Primary {
                            failing_since: None,
                        };
                        self.report();
                    }
                    *self.followed.failing_since() = None;
                    return Some((Ok(set), self));
                }
                Woken::Primary(Some(Err(error))) => {
                    if let Followed::Primary { failing_since } = &mut self.followed {
                        failing_since.get_or_insert_with(Instant::now);
                    }
                    return Some((Err(error), self));
                }
                Woken::Fallback(Some(Ok(set))) => {
                    *self.followed.failing_since() = None;
                    return Some((Ok(set), self));
                }
                Woken::Fallback(Some(Err(error))) => {
                    self.followed
                        .failing_since()
                        .get_or_insert_with(Instant::now);
                    return Some((Err(error), self));
                }
                // The fallback's watch ended: wait on the primary (and the failover time).
                Woken::Fallback(None) => {
                    if let Followed::Fallback { watch, .. } = &mut self.followed {
                        *watch = stream::pending().boxed();
                    }
                }
                Woken::FailedOver => {
                    let index = self.followed.index() + 1;
                    warn!(
                        service = %self.query, registry = self.chain[index].kind(),
                        after = ?self.failover_after, "registry failing; following the next in the chain"
                    );
                    self.followed = Followed::Fallback {
                        index,
                        watch: self.chain[index].watch(&self.query),
                        failing_since: None,
                    };
                    self.report();
                }
            }
        }
    }
}

impl ServiceRegistry for FallbackRegistry {
    fn kind(&self) -> &'static str {
        "fallback"
    }

    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        self.primary().register(instance)
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.primary().deregister(id)
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        async move {
            let mut last = None;
            for registry in self.chain.iter() {
                match registry.discover(query).await {
                    Ok(set) => return Ok(set),
                    Err(error) => {
                        warn!(service = %query, registry = registry.kind(), error = %Chain(&error), "discover failed; asking the next registry");
                        last = Some(error);
                    }
                }
            }
            Err(last.expect("the chain is never empty"))
        }
        .boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        let watch = FallbackWatch {
            chain: Arc::clone(&self.chain),
            query: query.clone(),
            failover_after: self.failover_after,
            primary: self.primary().watch(query),
            followed: Followed::Primary {
                failing_since: None,
            },
        };
        watch.report();
        stream::unfold(watch, FallbackWatch::next).boxed()
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        async move {
            let mut last = None;
            for registry in self.chain.iter() {
                match registry.health(id).await {
                    Ok(status) => return Ok(status),
                    Err(error) => last = Some(error),
                }
            }
            Err(last.expect("the chain is never empty"))
        }
        .boxed()
    }

    fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.primary().heartbeat(id)
    }

    fn set_maintenance<'a>(
        &'a self,
        id: &'a str,
        enable: bool,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        self.primary().set_maintenance(id, enable, reason)
    }
}
