//! The shared state of a balancer and the updater task that publishes it.
//!
//! Pickers only ever read an immutable [`Snapshot`] through `ArcSwap::load`, which takes no
//! lock and bumps no shared reference count. One updater task per balancer owns discovery:
//! it drains every change that is ready, applies the batch to its own list, and publishes a
//! new snapshot once per batch. Endpoints that stay are carried over as the same
//! `Arc<Endpoint>`, so they keep their slot order and their counters.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tower::discover::{Change, Discover};
use tracing::{debug, warn};

use super::endpoint::{Endpoint, Meta};
use super::load::{Load, LoadMetric};
use super::outlier::{Detector, OutlierDetection};
use super::{PanicMode, ZonePreference};
use crate::error::BoxError;

/// Changes applied in one batch at most, so a discovery stream that is always ready cannot
/// keep the updater from publishing (or from yielding to the runtime).
const MAX_BATCH: usize = 4096;

/// Backoff after a discovery error, doubling up to the cap; reset by a good batch.
const ERROR_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

/// An immutable set of endpoints, as pickers see it.
pub(crate) struct Snapshot<S, K> {
    pub(crate) endpoints: Box<[Arc<Endpoint<S, K>>]>,
    /// Indices of the endpoints in the local zone (empty without zone preference).
    pub(crate) local: Box<[usize]>,
}

/// Settings every handle and the updater read.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) service: String,
    pub(crate) metric: LoadMetric,
    pub(crate) wait_for_endpoints: Duration,
    pub(crate) outlier: Option<OutlierDetection>,
    pub(crate) panic_threshold: u8,
    pub(crate) panic_mode: PanicMode,
    pub(crate) slow_start: Option<Duration>,
    pub(crate) zone: Option<ZonePreference>,
    /// Service clones each handle keeps for reuse.
    pub(crate) keep_clones: usize,
}

/// What all clones of one `Balance` share.
pub(crate) struct Shared<S, K> {
    pub(crate) snapshot: ArcSwap<Snapshot<S, K>>,
    /// Woken on every publish: for callers waiting on an empty set, or on a pending endpoint
    /// that may be removed.
    pub(crate) published: Notify,
    /// Snapshots published so far.
    pub(crate) updates: AtomicU64,
    pub(crate) config: Config,
    pub(crate) epoch: Instant,
    /// Outlier-detection state shared with every endpoint; `None` when detection is off.
    pub(crate) detector: Option<Arc<Detector>>,
    /// Dropped with the last handle, which tells the updater to stop.
    _alive: oneshot::Sender<()>,
}

impl<S, K> Shared<S, K> {
    /// The shared state and the receiver that resolves once it is dropped.
    pub(crate) fn new(config: Config) -> (Self, oneshot::Receiver<()>) {
        let (alive, gone) = oneshot::channel();
        let epoch = Instant::now();
        let detector = config
            .outlier
            .map(|outlier| Arc::new(Detector::new(outlier, config.service.clone(), epoch)));
        let shared = Self {
            snapshot: ArcSwap::from_pointee(Snapshot {
                endpoints: Box::default(),
                local: Box::default(),
            }),
            detector,
            published: Notify::new(),
            updates: AtomicU64::new(0),
            config,
            epoch,
            _alive: alive,
        };
        (shared, gone)
    }

    /// Resolves once the snapshot has endpoints.
    pub(crate) async fn endpoints_available(&self) {
        loop {
            let notified = self.published.notified();
            tokio::pin!(notified);
            // Register before checking, so a publish in between is not missed.
            notified.as_mut().enable();
            if !self.snapshot.load().endpoints.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

impl<S, K> fmt::Debug for Shared<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("service", &self.config.service)
            .field("endpoints", &self.snapshot.load().endpoints.len())
            .field("updates", &self.updates.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The updater's own view: the current endpoints in slot order and where each key sits.
struct Endpoints<S, K> {
    list: Vec<Arc<Endpoint<S, K>>>,
    slots: HashMap<K, usize>,
}

impl<S, K: Hash + Eq + Clone + fmt::Debug> Endpoints<S, K> {
    /// Applies one batch; returns whether anything changed.
    fn apply(
        &mut self,
        batch: Vec<Change<K, (S, Meta)>>,
        make_load: impl Fn() -> Option<Load>,
        detector: Option<&Arc<Detector>>,
    ) -> bool {
        let mut changed = false;
        let mut removed = false;
        for change in batch {
            match change {
                Change::Insert(key, (service, meta)) => {
                    let endpoint = Arc::new(Endpoint::new(
                        key.clone(),
                        service,
                        meta,
                        make_load(),
                        detector.cloned(),
                    ));
                    changed = true;
                    match self.slots.get(&key) {
                        Some(&slot) => {
                            // A replacement takes the old one's slot; the old one drains.
                            debug!(endpoint = ?key, "endpoint replaced; the old one drains");
                            retire(&self.list[slot], detector);
                            self.list[slot] = endpoint;
                        }
                        None => {
                            debug!(endpoint = ?key, "endpoint inserted");
                            self.slots.insert(key, self.list.len());
                            self.list.push(endpoint);
                        }
                    }
                }
                Change::Remove(key) => {
                    if let Some(slot) = self.slots.remove(&key) {
                        debug!(endpoint = ?key, "endpoint removed; it drains");
                        retire(&self.list[slot], detector);
                        changed = true;
                        removed = true;
                    }
                }
            }
        }
        if removed {
            self.list.retain(|endpoint| !endpoint.is_removed());
            self.slots = self
                .list
                .iter()
                .enumerate()
                .map(|(slot, endpoint)| (endpoint.key.clone(), slot))
                .collect();
        }
        changed
    }
}

/// Marks an endpoint removed (it drains) and ends any ejection it had.
fn retire<S, K>(endpoint: &Endpoint<S, K>, detector: Option<&Arc<Detector>>) {
    endpoint.removed.store(true, Ordering::Relaxed);
    if let Some(detector) = detector {
        endpoint.health.clear(detector);
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

/// The updater task: runs until discovery ends or the last handle is dropped.
pub(crate) async fn run<D, S, F>(
    mut discover: D,
    split: F,
    shared: Weak<Shared<S, D::Key>>,
    mut gone: oneshot::Receiver<()>,
) where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Debug,
    D::Error: Into<BoxError>,
    F: Fn(D::Service) -> (S, Meta),
{
    let mut endpoints = Endpoints {
        list: Vec::new(),
        slots: HashMap::new(),
    };
    let mut backoff = ERROR_BACKOFF.0;
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
        let changes = batch.changes.into_iter().map(|change| match change {
            Change::Insert(key, service) => Change::Insert(key, split(service)),
            Change::Remove(key) => Change::Remove(key),
        });
        let make_load = || match shared.config.metric {
            LoadMetric::PendingRequests => None,
            LoadMetric::PeakEwma { default_rtt, decay } => {
                Some(Load::new(default_rtt, decay, shared.epoch, Instant::now()))
            }
        };
        if endpoints.apply(changes.collect(), make_load, shared.detector.as_ref()) {
            let local = match &shared.config.zone {
                Some(zone) => endpoints
                    .list
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.zone.as_deref() == Some(zone.local.as_str()))
                    .map(|(i, _)| i)
                    .collect(),
                None => Box::default(),
            };
            let next = Snapshot {
                endpoints: endpoints.list.clone().into_boxed_slice(),
                local,
            };
            let count = next.endpoints.len();
            if let Some(detector) = &shared.detector {
                detector.total.store(count, Ordering::Relaxed);
            }
            #[cfg(feature = "metrics")]
            super::metrics::published(
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
        let service = shared.config.service.clone();
        drop(shared);
        if batch.ended {
            debug!(%service, "discovery ended; keeping the last endpoints");
            return;
        }
        match batch.error {
            None => backoff = ERROR_BACKOFF.0,
            Some(error) => {
                let error: BoxError = error.into();
                warn!(%service, %error, ?backoff, "discovery failed; keeping the current endpoints");
                tokio::select! {
                    _ = &mut gone => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ERROR_BACKOFF.1);
            }
        }
    }
}
