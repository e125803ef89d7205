//! [`CachedRegistry`]: the last known good sets, served while the registry fails.

mod persist;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{IntoRegistry, ServiceRegistry, WatchStream};
use crate::error::{Chain, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};
use persist::Writer;

/// Wraps a registry and remembers the last good set of every query, so a failing registry
/// does not take the service down with it (go-micro #215, spring-cloud-commons #1215).
///
/// - [`discover`](ServiceRegistry::discover) answers from the cache when the registry fails,
///   for up to `max_stale` (default: for ever), and logs that it did.
/// - [`watch`](ServiceRegistry::watch) starts with the cached set when there is one no older
///   than `max_stale` (e.g. seeded from the file while the registry is down), then follows
///   the registry; a registry error is passed on as an error item and never replaces the
///   set. A set served from the cache, or seeded from the file, is said so in the logs and
///   in [`stats`](CachedRegistry::stats).
/// - With [`persist_to`](CachedRegistryBuilder::persist_to), the good sets are written to a
///   JSON file on every change (off the runtime's threads, atomically, durably, readable by
///   the owner only) and read back at start, so a client can start while the registry is
///   down. Processes sharing the file keep each other's queries.
/// - At most [`max_entries`](CachedRegistryBuilder::max_entries) queries are kept (default
///   1,024): queries no watch follows and not asked for
///   [`idle_after`](CachedRegistryBuilder::idle_after) (default 1 hour) go first, then the
///   least recently used.
/// - Everything else (register, deregister, health, heartbeat, maintenance) goes to the
///   registry.
///
/// With the `metrics` feature, `tower_sd_cache_serving{registry, service}` is 1 while a
/// cached set is served because the registry fails, and `tower_sd_cache_age_seconds` is the
/// served set's age.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tower_sd::registry::CachedRegistry;
/// use tower_sd::MemoryRegistry;
///
/// let cached = CachedRegistry::builder(Arc::new(MemoryRegistry::new()))
///     .max_stale(Duration::from_secs(600))
///     .build();
/// assert!(cached.stats().is_empty());
/// ```
#[derive(Clone)]
pub struct CachedRegistry {
    inner: Arc<dyn ServiceRegistry>,
    state: Arc<State>,
}

/// Configures a [`CachedRegistry`].
#[derive(Debug)]
#[must_use]
pub struct CachedRegistryBuilder {
    inner: Arc<dyn ServiceRegistry>,
    max_stale: Option<Duration>,
    persist: Option<PathBuf>,
    max_entries: usize,
    idle_after: Duration,
}

/// What the cache holds for one query, from [`CachedRegistry::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// The query.
    pub query: ServiceQuery,
    /// Instances in the cached set.
    pub instances: usize,
    /// Time since the registry last answered this query.
    pub age: Duration,
    /// Whether the last answer came from the cache because the registry failed.
    pub stale: bool,
    /// Whether the set was read from the file at start, and the registry has not answered
    /// this query since.
    pub from_file: bool,
}

struct State {
    /// The registry's kind, for metric labels.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    registry: &'static str,
    max_stale: Option<Duration>,
    max_entries: usize,
    idle_after: Duration,
    writer: Option<Arc<Writer>>,
    table: Mutex<Table>,
}

/// The cached sets, and how many watches follow each query.
#[derive(Default)]
struct Table {
    entries: HashMap<ServiceQuery, Entry>,
    watchers: HashMap<ServiceQuery, usize>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    query: ServiceQuery,
    instances: Vec<ServiceInstance>,
    /// Unix time of the registry's answer (system time: it survives restarts).
    fetched_unix_ms: u64,
    #[serde(skip)]
    stale: bool,
    /// Read from the file; the registry has not answered since.
    #[serde(skip)]
    from_file: bool,
    /// When the query was last asked for or watched.
    #[serde(skip, default = "Instant::now")]
    used: Instant,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Entry {
    fn age(&self) -> Duration {
        Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(self.fetched_unix_ms))
    }
}

impl CachedRegistryBuilder {
    /// Serve a cached set at most this long after the registry's last good answer
    /// (default: without limit). A set read from the file is not used once it is older.
    pub fn max_stale(mut self, max_stale: Duration) -> Self {
        self.max_stale = Some(max_stale);
        self
    }

    /// Keep the good sets in this JSON file, and seed the cache from it at start.
    pub fn persist_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.persist = Some(path.into());
        self
    }

    /// Keep at most this many queries (default 1,024; at least 1).
    pub fn max_entries(mut self, entries: usize) -> Self {
        self.max_entries = entries.max(1);
        self
    }

    /// A query that no watch follows and that was not asked for this long may be evicted
    /// (default 1 hour).
    pub fn idle_after(mut self, idle: Duration) -> Self {
        self.idle_after = idle;
        self
    }

    /// Builds the cache, seeded from the file when there is one. A missing file is an empty
    /// cache; an unreadable or corrupt one is logged and ignored, so it never stops a start.
    pub fn build(self) -> CachedRegistry {
        let entries = self
            .persist
            .as_deref()
            .map(persist::load)
            .unwrap_or_default()
            .into_iter()
            .map(|mut entry| {
                entry.from_file = true;
                // The file is outside input, checked as a registry's answers are.
                let dialable = |i: &ServiceInstance| crate::registry::dialable("cache file", i);
                entry.instances.retain(dialable);
                (entry.query.clone(), entry)
            })
            .collect();
        let state = State {
            registry: self.inner.kind(),
            max_stale: self.max_stale,
            max_entries: self.max_entries,
            idle_after: self.idle_after,
            writer: self.persist.map(|path| Arc::new(Writer::new(path))),
            table: Mutex::new(Table {
                entries,
                watchers: HashMap::new(),
            }),
        };
        state.lock().evict(state.max_entries, state.idle_after);
        CachedRegistry {
            inner: self.inner,
            state: Arc::new(state),
        }
    }
}

impl CachedRegistry {
    /// A builder wrapping `inner`.
    pub fn builder(inner: impl IntoRegistry) -> CachedRegistryBuilder {
        CachedRegistryBuilder {
            inner: inner.into_registry(),
            max_stale: None,
            persist: None,
            max_entries: 1024,
            idle_after: Duration::from_secs(3600),
        }
    }

    /// Waits until every change so far is written to the cache file (at once without
    /// one): before a planned exit, say.
    pub async fn persisted(&self) {
        if let Some(writer) = &self.state.writer {
            writer.written().await;
        }
    }

    /// What is cached, per query.
    pub fn stats(&self) -> Vec<CacheStats> {
        self.state
            .lock()
            .entries
            .values()
            .map(|entry| CacheStats {
                query: entry.query.clone(),
                instances: entry.instances.len(),
                age: entry.age(),
                stale: entry.stale,
                from_file: entry.from_file,
            })
            .collect()
    }
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a good answer; persists when the set changed.
    fn remember(&self, query: &ServiceQuery, instances: &[ServiceInstance]) {
        let mut table = self.lock();
        let previous = table.entries.remove(query);
        let changed = previous
            .as_ref()
            .is_none_or(|entry| entry.instances != instances || entry.from_file);
        table.entries.insert(
            query.clone(),
            Entry {
                query: query.clone(),
                instances: instances.to_vec(),
                fetched_unix_ms: unix_ms(SystemTime::now()),
                stale: false,
                from_file: false,
                used: Instant::now(),
            },
        );
        table.evict(self.max_entries, self.idle_after);
        crate::metrics::cache_serving(self.registry, &query.name, None);
        if changed && let Some(writer) = &self.writer {
            writer.write(table.entries.values().cloned().collect());
        }
    }

    /// The cached set, if fresh enough; marks it stale.
    fn fallback(&self, query: &ServiceQuery) -> Option<Vec<ServiceInstance>> {
        let mut table = self.lock();
        let entry = table.entries.get_mut(query)?;
        entry.used = Instant::now();
        let age = entry.age();
        if self.max_stale.is_some_and(|max| age > max) {
            return None;
        }
        entry.stale = true;
        crate::metrics::cache_serving(self.registry, &query.name, Some(age));
        Some(entry.instances.clone())
    }

    /// A watch starts following `query`: the cached set to start from, if it is fresh
    /// enough.
    fn watch_started(&self, query: &ServiceQuery) -> Option<Vec<ServiceInstance>> {
        let mut table = self.lock();
        *table.watchers.entry(query.clone()).or_default() += 1;
        let entry = table.entries.get_mut(query)?;
        entry.used = Instant::now();
        let age = entry.age();
        if self.max_stale.is_some_and(|max| age > max) {
            warn!(service = %query, ?age, "the cached set is older than max_stale; not starting from it");
            return None;
        }
        if entry.from_file {
            info!(service = %query, ?age, instances = entry.instances.len(), "starting from the set saved in the cache file");
        }
        Some(entry.instances.clone())
    }

    fn watch_ended(&self, query: &ServiceQuery) {
        let mut table = self.lock();
        if let Some(count) = table.watchers.get_mut(query) {
            *count -= 1;
            if *count == 0 {
                table.watchers.remove(query);
            }
        }
        if let Some(entry) = table.entries.get_mut(query) {
            entry.used = Instant::now();
        }
    }
}

impl Table {
    /// Keeps at most `max` entries: idle queries no watch follows go first, then the least
    /// recently used of those no watch follows.
    fn evict(&mut self, max: usize, idle_after: Duration) {
        if self.entries.len() <= max {
            return;
        }
        let now = Instant::now();
        let watchers = &self.watchers;
        self.entries.retain(|query, entry| {
            watchers.contains_key(query) || now.saturating_duration_since(entry.used) < idle_after
        });
        while self.entries.len() > max {
            let oldest = self
                .entries
                .values()
                .filter(|entry| !watchers.contains_key(&entry.query))
                .min_by_key(|entry| entry.used)
                .map(|entry| entry.query.clone());
            match oldest {
                Some(query) => {
                    debug!(service = %query, "evicting a cached query");
                    self.entries.remove(&query);
                }
                None => break,
            }
        }
    }
}

/// Counts a watch of its query for as long as it lives.
struct Watching {
    state: Arc<State>,
    query: ServiceQuery,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.state.watch_ended(&self.query);
    }
}

impl fmt::Debug for CachedRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedRegistry")
            .field("inner", &self.inner)
            .field("queries", &self.state.lock().entries.len())
            .field("max_stale", &self.state.max_stale)
            .field("persist", &self.state.writer.as_ref().map(|w| w.path()))
            .finish_non_exhaustive()
    }
}

impl ServiceRegistry for CachedRegistry {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        self.inner.register(instance)
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.deregister(id)
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        async move {
            match self.inner.discover(query).await {
                Ok(set) => {
                    self.state.remember(query, &set);
                    Ok(set)
                }
                Err(error) => match self.state.fallback(query) {
                    Some(set) => {
                        warn!(service = %query, error = %Chain(&error), "registry failed; serving the cached set");
                        Ok(set)
                    }
                    None => Err(error),
                },
            }
        }
        .boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        let seed = self.state.watch_started(query);
        let watching = Watching {
            state: Arc::clone(&self.state),
            query: query.clone(),
        };
        let state = Arc::clone(&self.state);
        let query = query.clone();
        let mut last = seed.clone();
        let live = self.inner.watch(&query).filter_map(move |item| {
            let _watching = &watching;
            let item = match item {
                Ok(set) => {
                    let after_error = state.lock().entries.get(&query).is_some_and(|e| e.stale);
                    state.remember(&query, &set);
                    // Unchanged sets are not sent again, except the first after an error
                    // (the registry answers again), as every watch does.
                    if last.as_ref() == Some(&set) && !after_error {
                        None
                    } else {
                        last = Some(set.clone());
                        Some(Ok(set))
                    }
                }
                Err(error) => {
                    debug!(service = %query, error = %Chain(&error), "registry watch failed; the cached set stands");
                    if let Some(entry) = state.lock().entries.get_mut(&query) {
                        entry.stale = true;
                        crate::metrics::cache_serving(state.registry, &query.name, Some(entry.age()));
                    }
                    Some(Err(error))
                }
            };
            std::future::ready(item)
        });
        stream::iter(seed.map(Ok)).chain(live).boxed()
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        self.inner.health(id)
    }

    fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.heartbeat(id)
    }

    fn set_maintenance<'a>(
        &'a self,
        id: &'a str,
        enable: bool,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.set_maintenance(id, enable, reason)
    }
}
