//! The shared state of a balancer: the immutable [`Snapshot`] pickers read, and what every
//! handle and the updater share.
//!
//! Pickers only ever read a snapshot through `ArcSwap::load`, which takes no lock and bumps
//! no shared reference count. The updater (see `updater.rs`) builds each snapshot once per
//! batch of discovery changes, with everything a pick needs precomputed: the endpoints by
//! priority tier, each tier's local-zone endpoints and, when weights differ, alias tables for
//! drawing endpoints in proportion to their weights in constant time (`pool.rs`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::config::{Config, ZonePreference};
use super::outlier::Detector;
use super::pool::Pool;
use super::ring::Ring;
use super::slot::{Slot, Tally};
use super::tier::{Shares, Tier};
use crate::endpoint::Signal;

/// An immutable set of endpoints, as pickers see it.
pub(crate) struct Snapshot<S, K> {
    pub(crate) slots: Box<[Slot<S, K>]>,
    /// The endpoints by priority, best first; always at least one (empty when `slots` is).
    pub(crate) tiers: Box<[Tier]>,
    /// The share of traffic each tier takes, when there are several.
    pub(crate) shares: Shares,
    /// The hash ring of keyed routing, built by the first keyed request.
    pub(crate) ring: std::sync::OnceLock<Ring>,
}

impl<S, K> Snapshot<S, K> {
    pub(crate) fn empty() -> Self {
        Self::new(Vec::new(), None)
    }

    /// The snapshot of `slots`, in tiers by priority, each with its local zone's pool when
    /// `zone` is set.
    pub(crate) fn new(slots: Vec<Slot<S, K>>, zone: Option<&ZonePreference>) -> Self {
        let first = slots.first().map_or(0, |slot| slot.priority);
        let one = slots.iter().all(|slot| slot.priority == first);
        let mut priorities: Vec<u16> = Vec::new();
        if !one {
            priorities = slots.iter().map(|slot| slot.priority).collect();
            priorities.sort_unstable();
            priorities.dedup();
        }
        let tier = |priority: Option<u16>| {
            let members = |i: &usize| priority.is_none_or(|p| slots[*i].priority == p);
            let pool = |keep: &dyn Fn(&Slot<S, K>) -> bool| {
                let (indices, weights): (Vec<usize>, Vec<u64>) = (0..slots.len())
                    .filter(members)
                    .filter(|&i| keep(&slots[i]))
                    .map(|i| (i, slots[i].weight))
                    .unzip();
                // A pool of every endpoint needs no indices.
                let all = one && indices.len() == slots.len();
                Pool::new((!all).then(|| indices.into_boxed_slice()), weights)
            };
            let all = if one {
                // Every endpoint, without listing them.
                Pool::new(None, slots.iter().map(|slot| slot.weight).collect())
            } else {
                pool(&|_| true)
            };
            Tier {
                priority: priority.unwrap_or(first),
                all,
                local: zone.map(|zone| {
                    pool(&|slot: &Slot<S, K>| slot.zone.as_deref() == Some(zone.local.as_str()))
                }),
            }
        };
        let tiers: Box<[Tier]> = if one {
            Box::new([tier(None)])
        } else {
            priorities.iter().map(|&p| tier(Some(p))).collect()
        };
        Self {
            ring: std::sync::OnceLock::new(),
            shares: Shares::new(tiers.len()),
            tiers,
            slots: slots.into_boxed_slice(),
        }
    }
}

/// What all clones of one `Balance` share.
pub(crate) struct Shared<S, K> {
    pub(crate) snapshot: ArcSwap<Snapshot<S, K>>,
    /// Woken on every publish and every change of an endpoint's [`Readiness`]: for callers
    /// waiting on an empty set or for a ready endpoint, or on a pending endpoint that may be
    /// removed.
    ///
    /// [`Readiness`]: super::Readiness
    pub(crate) published: Arc<Signal>,
    /// Snapshots published so far.
    pub(crate) updates: AtomicU64,
    /// The updater task died (it panicked): the set is frozen, so picks fail.
    pub(crate) updater_failed: AtomicBool,
    pub(crate) config: Config,
    pub(crate) epoch: Instant,
    /// Outlier-detection state shared with every endpoint; `None` when detection is off.
    pub(crate) detector: Option<Arc<Detector>>,
    pub(crate) tally: Arc<Tally>,
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
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            detector,
            tally: Arc::default(),
            published: Arc::default(),
            updates: AtomicU64::new(0),
            updater_failed: AtomicBool::new(false),
            config,
            epoch,
            _alive: alive,
        };
        (shared, gone)
    }

    /// Resolves once the snapshot has endpoints (or the updater died).
    pub(crate) async fn endpoints_available(&self) {
        self.until(|snapshot| !snapshot.slots.is_empty()).await;
    }

    /// Resolves once an endpoint of the snapshot is pickable by its readiness (or the updater
    /// died).
    pub(crate) async fn endpoint_ready(&self) {
        self.until(|snapshot| snapshot.slots.iter().any(|slot| slot.is_pickable()))
            .await;
    }

    /// Resolves once `holds` is true of the snapshot, re-checked on every publish and
    /// readiness change, or the updater died.
    async fn until(&self, holds: impl Fn(&Snapshot<S, K>) -> bool) {
        loop {
            let notified = self.published.notified();
            tokio::pin!(notified);
            // Register before checking, so a publish in between is not missed.
            notified.as_mut().enable();
            if holds(&self.snapshot.load()) || self.updater_failed.load(Ordering::SeqCst) {
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
            .field("endpoints", &self.snapshot.load().slots.len())
            .field("updates", &self.updates.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
