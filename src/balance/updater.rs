//! The updater task: one per balancer, it owns the `Discover` stream and publishes snapshots.
//!
//! It drains every change that is ready, applies the batch to its own list, and publishes a
//! new snapshot once per batch, whether or not requests arrive. Endpoints that stay are
//! carried over as clones of the same `Slot` (one shared state), so they keep their slot
//! order and their counters.
//! It ends when discovery ends (the last endpoints stay in use) or the last handle is
//! dropped. If it panics, the panic is logged and the balancer fails its picks rather than
//! serve a set that no longer follows discovery.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::discover::{Change, Discover};
use tracing::{debug, error, warn};

use super::load::{Load, LoadMetric};
use super::slot::Slot;
use super::snapshot::{Shared, Snapshot};
use crate::backoff::Backoff;
use crate::endpoint::Endpoint;
use crate::error::BoxError;

/// Changes applied in one batch at most, so a discovery stream that is always ready cannot
/// keep the updater from publishing (or from yielding to the runtime).
const MAX_BATCH: usize = 4096;

/// Backoff after a discovery error; reset by a good batch.
const ERROR_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

/// Spawns the updater of `shared` on the current runtime.
pub(crate) fn spawn<D, S>(discover: D, shared: &Arc<Shared<S, D::Key>>, gone: oneshot::Receiver<()>)
where
    D: Discover<Service = Endpoint<S>> + Unpin + Send + 'static,
    D::Key: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
    D::Error: Into<BoxError> + Send,
    S: Send + Sync + 'static,
{
    let weak = Arc::downgrade(shared);
    let service = shared.config.service.clone();
    tokio::spawn(async move {
        let run = AssertUnwindSafe(run(discover, weak.clone(), gone));
        if let Err(panic) = run.catch_unwind().await {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            error!(%service, panic = %message, "the balancer's updater panicked; picks fail from now on");
            if let Some(shared) = weak.upgrade() {
                shared.updater_failed.store(true, Ordering::SeqCst);
                shared.published.notify_waiters();
            }
        }
    });
}

/// The updater's own view: the current endpoints in slot order and where each key sits.
struct Endpoints<S, K> {
    list: Vec<Slot<S, K>>,
    places: HashMap<K, usize>,
}

impl<S, K: Hash + Eq + Clone + fmt::Debug> Endpoints<S, K> {
    /// Applies one batch; returns whether anything changed.
    fn apply(
        &mut self,
        batch: Vec<Change<K, Endpoint<S>>>,
        make: impl Fn(K, Endpoint<S>) -> Slot<S, K>,
    ) -> bool {
        let mut changed = false;
        let mut removed = false;
        for change in batch {
            match change {
                Change::Insert(key, endpoint) => {
                    let slot = make(key.clone(), endpoint);
                    changed = true;
                    match self.places.get(&key) {
                        Some(&place) => {
                            // A replacement takes the old one's place; the old one drains.
                            debug!(endpoint = ?key, "endpoint replaced; the old one drains");
                            self.list[place].retire();
                            self.list[place] = slot;
                        }
                        None => {
                            debug!(endpoint = ?key, "endpoint inserted");
                            self.places.insert(key, self.list.len());
                            self.list.push(slot);
                        }
                    }
                }
                Change::Remove(key) => {
                    if let Some(place) = self.places.remove(&key) {
                        debug!(endpoint = ?key, "endpoint removed; it drains");
                        self.list[place].retire();
                        changed = true;
                        removed = true;
                    }
                }
            }
        }
        if removed {
            self.list.retain(|slot| !slot.is_removed());
            self.places = self
                .list
                .iter()
                .enumerate()
                .map(|(place, slot)| (slot.key.clone(), place))
                .collect();
        }
        changed
    }
}

/// One batch read from discovery.
struct Batch<C, E> {
    changes: Vec<C>,
    error: Option<E>,
    ended: bool,
}

/// Reads every change that is ready (up to [`MAX_BATCH`]); waits only when none is.
async fn next_batch<D: Discover + Unpin>(
    discover: &mut D,
) -> Batch<Change<D::Key, D::Service>, D::Error> {
    let mut changes = Vec::new();
    std::future::poll_fn(|cx| {
        loop {
            let batch = |changes: &mut Vec<_>, error, ended| {
                Poll::Ready(Batch {
                    changes: std::mem::take(changes),
                    error,
                    ended,
                })
            };
            match Pin::new(&mut *discover).poll_discover(cx) {
                Poll::Ready(Some(Ok(change))) => {
                    changes.push(change);
                    if changes.len() >= MAX_BATCH {
                        return batch(&mut changes, None, false);
                    }
                }
                Poll::Ready(Some(Err(error))) => return batch(&mut changes, Some(error), false),
                Poll::Ready(None) => return batch(&mut changes, None, true),
                Poll::Pending if changes.is_empty() => return Poll::Pending,
                Poll::Pending => return batch(&mut changes, None, false),
            }
        }
    })
    .await
}

/// Runs until discovery ends or the last handle is dropped.
async fn run<D, S>(
    mut discover: D,
    shared: Weak<Shared<S, D::Key>>,
    mut gone: oneshot::Receiver<()>,
) where
    D: Discover<Service = Endpoint<S>> + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Debug,
    D::Error: Into<BoxError>,
{
    let mut endpoints = Endpoints {
        list: Vec::new(),
        places: HashMap::new(),
    };
    let mut backoff = Backoff::new(ERROR_BACKOFF.0, ERROR_BACKOFF.1);
    loop {
        let batch = tokio::select! {
            biased;
            _ = &mut gone => {
                debug!("balancer dropped; updater stops");
                return;
            }
            batch = next_batch(&mut discover) => batch,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let changes = batch.changes.into_iter();
        let make = |key, endpoint| {
            let load = match shared.config.metric {
                LoadMetric::PendingRequests => None,
                LoadMetric::PeakEwma { default_rtt, decay } => {
                    Some(Load::new(default_rtt, decay, shared.epoch, Instant::now()))
                }
            };
            let detector = shared.detector.clone();
            let tally = Arc::clone(&shared.tally);
            Slot::new(key, endpoint, load, detector, tally, &shared.published)
        };
        if endpoints.apply(changes.collect(), make) {
            publish(&shared, &endpoints.list);
        }
        let service = shared.config.service.clone();
        drop(shared);
        if batch.ended {
            debug!(%service, "discovery ended; keeping the last endpoints");
            return;
        }
        match batch.error {
            None => backoff.reset(),
            Some(error) => {
                let error: BoxError = error.into();
                let pause = backoff.next_delay();
                warn!(%service, %error, ?pause, "discovery failed; keeping the current endpoints");
                tokio::select! {
                    _ = &mut gone => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Stores the snapshot of `list` and wakes whoever waits for one.
fn publish<S, K>(shared: &Shared<S, K>, list: &[Slot<S, K>]) {
    let next = Snapshot::new(list.to_vec(), shared.config.zone.as_ref());
    let count = next.slots.len();
    if let Some(detector) = &shared.detector {
        detector.total.store(count, Ordering::Relaxed);
    }
    crate::metrics::published(
        &shared.config.service,
        count,
        shared
            .detector
            .as_ref()
            .map_or(0, |d| d.ejected.load(Ordering::Relaxed)),
    );
    shared.snapshot.store(Arc::new(next));
    shared.updates.fetch_add(1, Ordering::Release);
    debug!(service = %shared.config.service, endpoints = count, "published endpoints");
    shared.published.notify_waiters();
}
