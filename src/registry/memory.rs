//! [`MemoryRegistry`]: the embedded default registry.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, stream};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::{ServiceRegistry, WatchStream};
use crate::error::{Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};

/// An in-process registry with the full [`ServiceRegistry`] semantics.
///
/// It is the default for demos, tests and single-process deployments. Clones share one
/// registry. Besides the trait it offers what a real registry's health checks would do:
///
/// - [`set_health`](Self::set_health) marks an instance critical, in maintenance or passing
///   again; only passing and warning instances are discovered and watched.
/// - TTL checks, as in Consul: an instance registered with a TTL (for all instances with
///   [`MemoryRegistryBuilder::ttl`], or one by one with
///   [`register_with_ttl`](Self::register_with_ttl)) must be renewed with
///   [`heartbeat`](ServiceRegistry::heartbeat) within the TTL, or it turns critical. With
///   [`MemoryRegistryBuilder::deregister_critical_after`], an instance that stays critical
///   that long is removed.
///
/// Time is tokio's, so tests can drive TTLs with `tokio::time::pause()`. No background task
/// is spawned: health is evaluated when read, and watchers sleep until the next deadline.
///
/// A query naming a datacenter or namespace other than the registry's own (see the
/// [builder](MemoryRegistryBuilder)) matches nothing.
///
/// # Examples
///
/// ```
/// use futures_util::StreamExt;
/// use tower_sd::{HealthStatus, MemoryRegistry, ServiceInstance, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_sd::Error> {
/// let registry = MemoryRegistry::new();
/// let mut watch = registry.watch(&"greeter".into());
/// assert!(watch.next().await.unwrap()?.is_empty());
///
/// registry.register(ServiceInstance::new("g-1", "greeter", "10.0.0.1", 50051)).await?;
/// assert_eq!(watch.next().await.unwrap()?.len(), 1);
///
/// registry.set_health("g-1", HealthStatus::Critical)?;
/// assert!(watch.next().await.unwrap()?.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

/// Configures a [`MemoryRegistry`].
#[derive(Clone, Debug)]
pub struct MemoryRegistryBuilder {
    datacenter: String,
    namespace: String,
    ttl: Option<Duration>,
    deregister_critical_after: Option<Duration>,
}

struct Inner {
    datacenter: String,
    namespace: String,
    ttl: Option<Duration>,
    deregister_critical_after: Option<Duration>,
    state: Mutex<BTreeMap<String, Entry>>,
    /// Bumped on every change; watchers hold receivers, so a slow one only sees the latest.
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct Entry {
    instance: ServiceInstance,
    /// Status set by registration or [`MemoryRegistry::set_health`].
    status: HealthStatus,
    /// When `status` became critical.
    critical_since: Option<Instant>,
    ttl: Option<Duration>,
    /// When the TTL check runs out unless renewed.
    ttl_deadline: Option<Instant>,
}

// ===== impl MemoryRegistryBuilder =====

impl Default for MemoryRegistryBuilder {
    fn default() -> Self {
        Self {
            datacenter: "dc1".to_owned(),
            namespace: "default".to_owned(),
            ttl: None,
            deregister_critical_after: None,
        }
    }
}

impl MemoryRegistryBuilder {
    /// The datacenter this registry is (default `dc1`).
    #[must_use]
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = datacenter.into();
        self
    }

    /// The namespace this registry is (default `default`).
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Gives every registered instance a TTL check (default: none).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Removes an instance once it has been critical this long (Consul
    /// `DeregisterCriticalServiceAfter`; default: never).
    #[must_use]
    pub fn deregister_critical_after(mut self, after: Duration) -> Self {
        self.deregister_critical_after = Some(after);
        self
    }

    /// Builds the registry.
    pub fn build(self) -> MemoryRegistry {
        MemoryRegistry {
            inner: Arc::new(Inner {
                datacenter: self.datacenter,
                namespace: self.namespace,
                ttl: self.ttl,
                deregister_critical_after: self.deregister_critical_after,
                state: Mutex::new(BTreeMap::new()),
                changed: watch::Sender::new(0),
            }),
        }
    }
}

// ===== impl MemoryRegistry =====

impl MemoryRegistry {
    /// An empty registry in datacenter `dc1`, namespace `default`, without TTL checks.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for a registry with another datacenter, namespace or TTL checks.
    pub fn builder() -> MemoryRegistryBuilder {
        MemoryRegistryBuilder::default()
    }

    /// Registers an instance with its own TTL check, whatever the registry's default.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInstance`] when the instance does not validate.
    pub fn register_with_ttl(&self, instance: ServiceInstance, ttl: Duration) -> Result<()> {
        self.inner.insert(instance, Some(ttl))
    }

    /// Sets the health of an instance, as its checks would. Critical and maintenance
    /// instances leave the healthy set; passing or warning ones return to it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownInstance`] when no instance has this id.
    pub fn set_health(&self, id: &str, status: HealthStatus) -> Result<()> {
        let now = Instant::now();
        self.inner.update(id, |entry| {
            if status != HealthStatus::Critical {
                entry.critical_since = None;
            } else if entry.status != HealthStatus::Critical {
                entry.critical_since = Some(now);
            }
            entry.status = status;
        })
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("datacenter", &self.inner.datacenter)
            .field("namespace", &self.inner.namespace)
            .field("instances", &self.inner.lock().len())
            .finish_non_exhaustive()
    }
}

impl ServiceRegistry for MemoryRegistry {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        let result = self.inner.insert(instance, self.inner.ttl);
        async move { result }.boxed()
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        if self.inner.lock().remove(id).is_some() {
            self.inner.notify();
        }
        async { Ok(()) }.boxed()
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        let (set, _) = self.inner.healthy(query, Instant::now());
        async move { Ok(set) }.boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        let state = WatchState {
            inner: Arc::clone(&self.inner),
            changed: self.inner.changed.subscribe(),
            query: query.clone(),
            last: None,
        };
        stream::unfold(state, WatchState::next).boxed()
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        self.inner.reap(&mut state, now);
        let status = state
            .get(id)
            .map_or(HealthStatus::Unknown, |entry| entry.status_at(now));
        async move { Ok(status) }.boxed()
    }

    fn set_maintenance<'a>(
        &'a self,
        id: &'a str,
        enable: bool,
        _reason: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let status = if enable {
            HealthStatus::Maintenance
        } else {
            HealthStatus::Passing
        };
        let result = self.set_health(id, status);
        async move { result }.boxed()
    }

    fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        let now = Instant::now();
        let result = self.inner.update(id, |entry| {
            // A TTL past the clock's range never runs out.
            entry.ttl_deadline = entry.ttl.and_then(|ttl| now.checked_add(ttl));
        });
        async move { result }.boxed()
    }
}

// ===== impl Inner =====

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // The map is consistent after every statement, so a panic elsewhere cannot leave it
        // half-updated: keep serving rather than propagate the poison.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    fn insert(&self, instance: ServiceInstance, ttl: Option<Duration>) -> Result<()> {
        instance.validate()?;
        let now = Instant::now();
        let entry = Entry {
            status: HealthStatus::Passing,
            critical_since: None,
            ttl,
            ttl_deadline: ttl.and_then(|ttl| now.checked_add(ttl)),
            instance,
        };
        self.lock().insert(entry.instance.id.clone(), entry);
        self.notify();
        Ok(())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) -> Result<()> {
        let mut state = self.lock();
        self.reap(&mut state, Instant::now());
        let entry = state.get_mut(id).ok_or_else(|| Error::UnknownInstance {
            registry: "memory",
            id: id.to_owned(),
        })?;
        f(entry);
        drop(state);
        self.notify();
        Ok(())
    }

    /// Drops instances that have been critical longer than `deregister_critical_after`.
    fn reap(&self, state: &mut BTreeMap<String, Entry>, now: Instant) {
        if let Some(after) = self.deregister_critical_after {
            state.retain(|_, entry| {
                let reaped_at = |since: Instant| since.checked_add(after);
                let critical = entry.critical_since_at(now);
                critical.is_none_or(|since| reaped_at(since).is_none_or(|at| now < at))
            });
        }
    }

    /// The healthy instances matching `query` at `now`, sorted by id, and the next instant at
    /// which the answer may change without a write (a TTL running out, a reap).
    fn healthy(
        &self,
        query: &ServiceQuery,
        now: Instant,
    ) -> (Vec<ServiceInstance>, Option<Instant>) {
        let foreign =
            |asked: &Option<String>, own: &str| asked.as_deref().is_some_and(|a| a != own);
        let mut state = self.lock();
        self.reap(&mut state, now);
        let next_deadline = state
            .values()
            .flat_map(|entry| {
                let reap = entry
                    .critical_since_at(now)
                    .zip(self.deregister_critical_after)
                    .and_then(|(since, after)| since.checked_add(after));
                [entry.ttl_deadline, reap]
            })
            .flatten()
            .filter(|&t| t > now)
            .min();
        if foreign(&query.datacenter, &self.datacenter)
            || foreign(&query.namespace, &self.namespace)
        {
            return (Vec::new(), next_deadline);
        }
        let set = state
            .values()
            .filter(|entry| entry.status_at(now).is_serving() && query.matches(&entry.instance))
            .map(|entry| entry.instance.clone())
            .collect();
        (set, next_deadline)
    }
}

// ===== impl Entry =====

impl Entry {
    fn ttl_expired(&self, now: Instant) -> bool {
        self.ttl_deadline.is_some_and(|deadline| deadline <= now)
    }

    fn status_at(&self, now: Instant) -> HealthStatus {
        match self.status {
            HealthStatus::Maintenance => HealthStatus::Maintenance,
            _ if self.ttl_expired(now) => HealthStatus::Critical,
            status => status,
        }
    }

    /// Since when the instance has been critical, by its status or its TTL.
    fn critical_since_at(&self, now: Instant) -> Option<Instant> {
        if self.status == HealthStatus::Maintenance {
            return None;
        }
        let by_ttl = self.ttl_deadline.filter(|_| self.ttl_expired(now));
        match (self.critical_since, by_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

// ===== watch =====

struct WatchState {
    /// The registry: a watch keeps it alive, so a balancer built from a handle that was
    /// handed over goes on following it (and TTL checks go on expiring).
    inner: Arc<Inner>,
    changed: watch::Receiver<u64>,
    query: ServiceQuery,
    last: Option<Vec<ServiceInstance>>,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            let (set, deadline) = {
                self.changed.borrow_and_update();
                self.inner.healthy(&self.query, Instant::now())
            };
            if self.last.as_ref() != Some(&set) {
                self.last = Some(set.clone());
                return Some((Ok(set), self));
            }
            let changed = match deadline {
                Some(deadline) => tokio::select! {
                    changed = self.changed.changed() => changed,
                    () = sleep_until(deadline) => Ok(()),
                },
                None => self.changed.changed().await,
            };
            // The sender lives in `Inner`, which this watch keeps: it never errs.
            changed.ok()?;
        }
    }
}
