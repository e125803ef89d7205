//! [`FallbackRegistry`]: an ordered chain of registries, e.g. Consul, then Kubernetes, then a
//! static list.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, stream};
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use super::{ServiceRegistry, WatchStream};
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
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tower_sd::registry::FallbackRegistry;
/// use tower_sd::{MemoryRegistry, ServiceInstance, StaticRegistry};
///
/// # fn main() -> Result<(), tower_sd::Error> {
/// let last_resort = StaticRegistry::new(vec![ServiceInstance::new("a", "api", "10.0.0.1", 80)])?;
/// let chain = FallbackRegistry::new(vec![
///     Arc::new(MemoryRegistry::new()),
///     Arc::new(last_resort),
/// ])?
/// .failover_after(Duration::from_secs(10));
/// # drop(chain);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct FallbackRegistry {
    chain: Arc<[Arc<dyn ServiceRegistry>]>,
    failover_after: Duration,
}

impl FallbackRegistry {
    /// The chain, primary first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an empty chain.
    pub fn new(chain: Vec<Arc<dyn ServiceRegistry>>) -> Result<Self> {
        if chain.is_empty() {
            return Err(Error::InvalidConfig {
                key: "chain".to_owned(),
                source: "the chain needs at least one registry".into(),
            });
        }
        Ok(Self {
            chain: chain.into(),
            failover_after: Duration::from_secs(30),
        })
    }

    /// How long the registry being followed must fail before the next one is used.
    #[must_use]
    pub fn failover_after(mut self, after: Duration) -> Self {
        self.failover_after = after;
        self
    }

    fn primary(&self) -> &Arc<dyn ServiceRegistry> {
        &self.chain[0]
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

struct Follow {
    chain: Arc<[Arc<dyn ServiceRegistry>]>,
    query: ServiceQuery,
    failover_after: Duration,
    primary: WatchStream,
    /// Index of the registry being followed; 0 is the primary.
    active: usize,
    /// The watch of `chain[active]` while a fallback is followed.
    fallback: Option<WatchStream>,
    /// Since when the registry being followed has been failing.
    failing_since: Option<Instant>,
}

impl Follow {
    /// With the `metrics` feature, `tower_sd_fallback_active{service, registry}`: the
    /// position in the chain of the registry followed (0 for the primary).
    fn followed(&self) {
        crate::metrics::fallback_active(
            &self.query.name,
            self.chain[self.active].kind(),
            self.active,
        );
    }

    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            let deadline = self
                .failing_since
                .filter(|_| self.active + 1 < self.chain.len())
                .map(|since| since + self.failover_after);
            let fallback_next = async {
                match &mut self.fallback {
                    Some(watch) => watch.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = self.primary.next() => match item {
                    None => return None,
                    Some(Ok(set)) => {
                        if self.active != 0 {
                            info!(service = %self.query, "primary registry answers again; switching back");
                            self.active = 0;
                            self.fallback = None;
                            self.followed();
                        }
                        self.failing_since = None;
                        return Some((Ok(set), self));
                    }
                    Some(Err(error)) => {
                        if self.active == 0 {
                            self.failing_since.get_or_insert_with(Instant::now);
                        }
                        return Some((Err(error), self));
                    }
                },
                item = fallback_next => match item {
                    Some(Ok(set)) => {
                        self.failing_since = None;
                        return Some((Ok(set), self));
                    }
                    Some(Err(error)) => {
                        self.failing_since.get_or_insert_with(Instant::now);
                        return Some((Err(error), self));
                    }
                    None => self.fallback = None,
                },
                () = async {
                    match deadline {
                        Some(deadline) => sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.active += 1;
                    warn!(
                        service = %self.query, registry = self.chain[self.active].kind(),
                        after = ?self.failover_after, "registry failing; following the next in the chain"
                    );
                    self.fallback = Some(self.chain[self.active].watch(&self.query));
                    self.failing_since = None;
                    self.followed();
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
        let follow = Follow {
            chain: Arc::clone(&self.chain),
            query: query.clone(),
            failover_after: self.failover_after,
            primary: self.primary().watch(query),
            active: 0,
            fallback: None,
            failing_since: None,
        };
        follow.followed();
        stream::unfold(follow, Follow::next).boxed()
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
