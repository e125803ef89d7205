//! [`CachedRegistry`]: the last known good sets, served while the registry fails.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, stream};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{ServiceRegistry, WatchStream};
use crate::error::{Chain, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};

/// Wraps a registry and remembers the last good set of every query, so a failing registry
/// does not take the service down with it (go-micro #215, spring-cloud-commons #1215).
///
/// - [`discover`](ServiceRegistry::discover) answers from the cache when the registry fails,
///   for up to `max_stale` (default: for ever), and logs that it did.
/// - [`watch`](ServiceRegistry::watch) starts with the cached set when there is one (e.g.
///   seeded from the file while the registry is down), then follows the registry; a registry
///   error is passed on as an error item and never replaces the set.
/// - With [`persist_to`](CachedRegistryBuilder::persist_to), the good sets are written to a
///   JSON file on every change and read back at start, so a client can start while the
///   registry is down.
/// - Everything else (register, deregister, health, heartbeat, maintenance) goes to the
///   registry.
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
}

struct State {
    max_stale: Option<Duration>,
    persist: Option<PathBuf>,
    entries: Mutex<HashMap<ServiceQuery, Entry>>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    query: ServiceQuery,
    instances: Vec<ServiceInstance>,
    /// Unix time of the registry's answer (system time: it survives restarts).
    fetched_unix_ms: u64,
    #[serde(skip)]
    stale: bool,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl CachedRegistryBuilder {
    /// Serve a cached set at most this long after the registry's last good answer
    /// (default: without limit).
    pub fn max_stale(mut self, max_stale: Duration) -> Self {
        self.max_stale = Some(max_stale);
        self
    }

    /// Keep the good sets in this JSON file, and seed the cache from it at start.
    pub fn persist_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.persist = Some(path.into());
        self
    }

    /// Builds the cache, seeded from the file when there is one. A missing file is an empty
    /// cache; an unreadable or corrupt one is logged and ignored, so it never stops a start.
    pub fn build(self) -> CachedRegistry {
        let entries = self
            .persist
            .as_deref()
            .map(load)
            .unwrap_or_default()
            .into_iter()
            .map(|entry| (entry.query.clone(), entry))
            .collect();
        CachedRegistry {
            inner: self.inner,
            state: Arc::new(State {
                max_stale: self.max_stale,
                persist: self.persist,
                entries: Mutex::new(entries),
            }),
        }
    }
}

fn load(path: &Path) -> Vec<Entry> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            warn!(path = %path.display(), %error, "ignoring a corrupt registry cache file");
            Vec::new()
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read the registry cache file");
            Vec::new()
        }
    }
}

impl CachedRegistry {
    /// A builder wrapping `inner`.
    pub fn builder(inner: Arc<dyn ServiceRegistry>) -> CachedRegistryBuilder {
        CachedRegistryBuilder {
            inner,
            max_stale: None,
            persist: None,
        }
    }

    /// What is cached, per query.
    pub fn stats(&self) -> Vec<CacheStats> {
        let now = unix_ms(SystemTime::now());
        self.state
            .lock()
            .values()
            .map(|entry| CacheStats {
                query: entry.query.clone(),
                instances: entry.instances.len(),
                age: Duration::from_millis(now.saturating_sub(entry.fetched_unix_ms)),
                stale: entry.stale,
            })
            .collect()
    }
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceQuery, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a good answer; persists when the set changed.
    fn remember(&self, query: &ServiceQuery, instances: &[ServiceInstance]) {
        let mut entries = self.lock();
        let changed = entries
            .get(query)
            .is_none_or(|entry| entry.instances != instances);
        entries.insert(
            query.clone(),
            Entry {
                query: query.clone(),
                instances: instances.to_vec(),
                fetched_unix_ms: unix_ms(SystemTime::now()),
                stale: false,
            },
        );
        if changed && let Some(path) = &self.persist {
            let snapshot: Vec<&Entry> = entries.values().collect();
            if let Err(error) = write_atomically(path, &snapshot) {
                warn!(path = %path.display(), %error, "cannot write the registry cache file");
            }
        }
    }

    /// The cached set, if fresh enough; marks it stale.
    fn fallback(&self, query: &ServiceQuery) -> Option<Vec<ServiceInstance>> {
        let mut entries = self.lock();
        let entry = entries.get_mut(query)?;
        let age =
            Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(entry.fetched_unix_ms));
        if self.max_stale.is_some_and(|max| age > max) {
            return None;
        }
        entry.stale = true;
        Some(entry.instances.clone())
    }

    fn cached(&self, query: &ServiceQuery) -> Option<Vec<ServiceInstance>> {
        self.lock().get(query).map(|entry| entry.instances.clone())
    }
}

fn write_atomically(path: &Path, entries: &[&Entry]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(entries).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(temporary, path)
}

impl fmt::Debug for CachedRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedRegistry")
            .field("inner", &self.inner)
            .field("queries", &self.state.lock().len())
            .field("max_stale", &self.state.max_stale)
            .field("persist", &self.state.persist)
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
        let seed = self.state.cached(query);
        let state = Arc::clone(&self.state);
        let query = query.clone();
        let mut last = seed.clone();
        let live = self.inner.watch(&query).filter_map(move |item| {
            let item = match item {
                Ok(set) => {
                    state.remember(&query, &set);
                    if last.as_ref() == Some(&set) {
                        None
                    } else {
                        last = Some(set.clone());
                        Some(Ok(set))
                    }
                }
                Err(error) => {
                    debug!(service = %query, error = %Chain(&error), "registry watch failed; the cached set stands");
                    if let Some(entry) = state.lock().get_mut(&query) {
                        entry.stale = true;
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
