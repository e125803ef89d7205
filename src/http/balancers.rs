//! The per-service balancers of a [`Discovery`](super::Discovery): a read-mostly map, bounded,
//! with idle balancers evicted on a timer.
//!
//! A request looks its service up in an immutable map loaded through `ArcSwap` (no lock);
//! only a service seen for the first time takes the insertion lock, to build its balancer
//! and publish a new map. A sweeper task, spawned with the first balancer, drops balancers
//! unused for the idle timeout and ends when the last `Discovery` handle is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tracing::debug;

use super::TooManyServices;

/// One service's balancer, and when it was last used.
pub(super) struct Used<B> {
    pub(super) balance: B,
    /// Milliseconds since the map's epoch.
    used_ms: AtomicU64,
}

/// Balancers by service name (lowercase).
pub(super) struct Balancers<B> {
    map: ArcSwap<HashMap<String, Arc<Used<B>>>>,
    /// Serializes insertions and sweeps (requests never take it).
    insert: Mutex<()>,
    max: usize,
    idle: Duration,
    epoch: Instant,
    /// Whether the sweeper task runs.
    sweeping: std::sync::atomic::AtomicBool,
}

impl<B> Balancers<B> {
    pub(super) fn new(max: usize, idle: Duration) -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            insert: Mutex::new(()),
            max,
            idle,
            epoch: Instant::now(),
            sweeping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(
            Instant::now()
                .saturating_duration_since(self.epoch)
                .as_millis(),
        )
        .unwrap_or(u64::MAX)
    }

    /// The services with a balancer, sorted.
    pub(super) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.map.load().keys().cloned().collect();
        names.sort();
        names
    }

    /// The balancer of `service`, if it has one.
    pub(super) fn get(&self, service: &str) -> Option<B>
    where
        B: Clone,
    {
        self.map
            .load()
            .get(service)
            .map(|used| used.balance.clone())
    }
}

impl<B: Clone + Send + Sync + 'static> Balancers<B> {
    /// The balancer of `service` (lowercase), made by `make` when there is none.
    ///
    /// # Errors
    ///
    /// [`TooManyServices`] when the map is full.
    pub(super) fn get_or_make(
        self: &Arc<Self>,
        service: &str,
        make: impl FnOnce() -> B,
    ) -> Result<B, TooManyServices> {
        if let Some(used) = self.map.load().get(service) {
            return Ok(self.touch(used));
        }
        let _insert = self.insert.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.map.load_full();
        if let Some(used) = current.get(service) {
            return Ok(self.touch(used));
        }
        if current.len() >= self.max {
            return Err(TooManyServices { limit: self.max });
        }
        let balance = make();
        let mut next = HashMap::clone(&current);
        next.insert(
            service.to_owned(),
            Arc::new(Used {
                balance: balance.clone(),
                used_ms: AtomicU64::new(self.now_ms()),
            }),
        );
        self.map.store(Arc::new(next));
        self.start_sweeping();
        Ok(balance)
    }

    /// Marks a balancer used (a shared write at most once a second) and clones it.
    fn touch(&self, used: &Used<B>) -> B {
        let now = self.now_ms();
        if now.saturating_sub(used.used_ms.load(Ordering::Relaxed)) >= 1000 {
            used.used_ms.store(now, Ordering::Relaxed);
        }
        used.balance.clone()
    }

    /// Drops the balancers unused for the idle timeout.
    pub(super) fn sweep(&self) {
        let _insert = self.insert.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.now_ms();
        let idle = u64::try_from(self.idle.as_millis()).unwrap_or(u64::MAX);
        let current = self.map.load_full();
        let fresh =
            |used: &Used<B>| now.saturating_sub(used.used_ms.load(Ordering::Relaxed)) < idle;
        if current.values().all(|used| fresh(used)) {
            return;
        }
        let next: HashMap<String, Arc<Used<B>>> = current
            .iter()
            .filter(|(name, used)| {
                let keep = fresh(used);
                if !keep {
                    debug!(service = %name, "dropping an idle balancer");
                }
                keep
            })
            .map(|(name, used)| (name.clone(), Arc::clone(used)))
            .collect();
        self.map.store(Arc::new(next));
    }

    /// Spawns the sweeper, once, on the current runtime (none outside one: idle balancers
    /// then stay until the layer is dropped).
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::SeqCst);
            return;
        };
        let every = (self.idle / 2).max(Duration::from_millis(10));
        runtime.spawn(sweeper(Arc::downgrade(self), every));
    }
}

/// Sweeps every `every` while a handle lives.
async fn sweeper<B: Clone + Send + Sync + 'static>(balancers: Weak<Balancers<B>>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(balancers) = balancers.upgrade() else {
            return;
        };
        balancers.sweep();
    }
}
