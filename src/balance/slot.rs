//! [`Slot`]: the balancer's own record of an endpoint, with the hot per-endpoint counters
//! a pick reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::load::Load;
use super::outlier::{Detector, Health};
use super::stats::{EndpointState, EndpointStats};
use crate::endpoint::{Companion, Connectivity, Endpoint, Readiness, ReadinessError, Signal};

/// Counts shared by the slots of one balancer, so pickers can tell in one load whether any
/// endpoint is unusable.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Slots whose service's `poll_ready` failed, not yet ready again or retired.
    pub(crate) failed: AtomicUsize,
    /// Failures and recoveries so far: whether the set of failed slots changed, in one load.
    pub(crate) changes: AtomicU64,
}

impl Tally {
    /// One more slot failed (`true`) or one fewer.
    fn count_failed(&self, more: bool) {
        if more {
            self.failed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.failed.fetch_sub(1, Ordering::SeqCst);
        }
        self.changes.fetch_add(1, Ordering::AcqRel);
    }
}

/// An endpoint as the balancer holds it: what the snapshots list, each its own `Slot` (a
/// clone), all sharing one state.
///
/// The state lives behind an `Arc` held by each slot (the updater's, and one per snapshot
/// that lists the endpoint) and by each request in flight; the state counts its slots
/// (`listed`), so the `Arc`'s reference count less that is the in-flight count. A request
/// then costs two atomic operations on its endpoint (the clone at the pick, the drop at
/// completion) rather than four (a reference count and a separate in-flight counter, up and
/// down), a pick reads a candidate's state straight from the snapshot (one dependent load,
/// not two), and the state, with its service, lives until the last request on it completes.
///
/// While a snapshot is being built or dropped, a slot's clone or drop and the count of
/// slots change one after the other, so a pick at that moment may count one request more
/// or fewer on the endpoint (never below 0); once both have changed, the count is exact.
pub(crate) struct Slot<S, K> {
    inner: Arc<SlotState<S, K>>,
}

impl<S, K> Clone for Slot<S, K> {
    fn clone(&self) -> Self {
        let inner = Arc::clone(&self.inner);
        inner.listed.fetch_add(1, Ordering::Relaxed);
        Self { inner }
    }
}

impl<S, K> Drop for Slot<S, K> {
    fn drop(&mut self) {
        // Before the reference goes (with the field, right after), while the state is
        // surely alive.
        self.inner.listed.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The state of a [`Slot`], shared with the requests in flight on it.
///
/// `repr(C)` keeps what a pick reads first, right after the `Arc`'s own reference count:
/// the count of slots (the two give the in-flight count), the flags, the owner's readiness,
/// the weight and the ejection, 48 bytes that with the count make one cache line when the
/// allocation starts on one. The cold fields (service, key) stay out of the way of pickers
/// on other cores.
#[repr(C)]
pub(crate) struct SlotState<S, K> {
    /// The [`Slot`]s that share this state: its references that are not requests.
    listed: AtomicU32,
    /// `poll_ready` failed; skipped by the pick while others are usable, except for a retry
    /// once `retry_at` has passed.
    failed: AtomicBool,
    /// No longer in the current snapshot; requests in flight finish on it.
    removed: AtomicBool,
    /// Priority tier (lower is preferred): here, in what would be padding, because every
    /// publish reads it of every endpoint.
    pub(crate) priority: u16,
    /// The owner's view of its connectivity, when it reports one.
    readiness: Option<Readiness>,
    /// Weight (>= 1).
    pub(crate) weight: u64,
    /// Outlier-detection state.
    pub(crate) health: Health,
    /// Peak-EWMA state, in that load mode only.
    pub(crate) ewma: Option<Load>,
    /// `poll_ready` failures in a row.
    failures: AtomicU32,
    /// When a failed endpoint may be tried again (ns since `inserted`).
    retry_at: AtomicU64,
    /// Shared outlier-detection state; `None` when detection is off.
    pub(crate) detector: Option<Arc<Detector>>,
    tally: Arc<Tally>,
    /// When discovery inserted it (for slow start).
    pub(crate) inserted: Instant,
    pub(crate) zone: Option<String>,
    pub(crate) key: K,
    pub(crate) service: S,
    /// What lives as long as the endpoint does (its health check's task).
    _companion: Option<Companion>,
}

impl<S, K> Slot<S, K> {
    pub(crate) fn new(
        key: K,
        endpoint: Endpoint<S>,
        ewma: Option<Load>,
        detector: Option<Arc<Detector>>,
        tally: Arc<Tally>,
        published: &Arc<Signal>,
    ) -> Self {
        if let Some(readiness) = &endpoint.readiness {
            readiness.listen(published);
        }
        let state = SlotState {
            listed: AtomicU32::new(1),
            ewma,
            failed: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            retry_at: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            health: Health::default(),
            detector,
            tally,
            inserted: Instant::now(),
            weight: u64::from(endpoint.weight.max(1)),
            zone: endpoint.zone,
            priority: endpoint.priority,
            readiness: endpoint.readiness,
            key,
            service: endpoint.service,
            _companion: endpoint.companion,
        };
        Self {
            inner: Arc::new(state),
        }
    }

    /// Requests picked for it and not yet complete (a response body still streaming counts):
    /// every reference to the state that is not a slot's is a request's.
    #[inline]
    pub(crate) fn in_flight(&self) -> u64 {
        let listed = self.inner.listed.load(Ordering::Relaxed) as usize;
        Arc::strong_count(&self.inner).saturating_sub(listed) as u64
    }

    /// A request is picked: it holds the state (counted in flight) until it completes.
    #[inline]
    pub(crate) fn start(&self) -> Arc<SlotState<S, K>> {
        Arc::clone(&self.inner)
    }

    /// A point-in-time view, for [`Balance::endpoints`](super::Balance::endpoints).
    pub(crate) fn stats(&self, now: Instant) -> EndpointStats<K>
    where
        K: Clone,
    {
        let state = &*self.inner;
        EndpointStats {
            key: state.key.clone(),
            in_flight: self.in_flight(),
            ewma: state
                .ewma
                .as_ref()
                .map(|load| Duration::from_nanos(load.estimate(now) as u64)),
            weight: u32::try_from(state.weight).unwrap_or(u32::MAX),
            zone: state.zone.clone(),
            priority: state.priority,
            state: state.state(),
            ejected_for: state
                .detector
                .as_ref()
                .and_then(|detector| state.health.ejected_for(detector)),
            connectivity: state.connectivity(),
        }
    }
}

impl<S, K> std::ops::Deref for Slot<S, K> {
    type Target = SlotState<S, K>;

    #[inline]
    fn deref(&self) -> &SlotState<S, K> {
        &self.inner
    }
}

impl<S, K> SlotState<S, K> {
    #[inline]
    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Whether the pick may take it without looking closer: connected (or idle) with room,
    /// not failed, not ejected.
    #[inline]
    pub(crate) fn plainly_usable(&self) -> bool {
        self.has_room() && !self.is_failed() && !self.health.is_ejected()
    }

    /// Whether it counts as healthy for its tier's share of traffic: pickable, not failed,
    /// not ejected (saturation, which comes and goes with load, does not count).
    #[inline]
    pub(crate) fn is_healthy(&self) -> bool {
        self.is_pickable() && !self.is_failed() && !self.health.is_ejected()
    }

    /// Whether its owner says it may be picked (always, when it says nothing), whether or
    /// not it has room.
    #[inline]
    pub(crate) fn is_pickable(&self) -> bool {
        self.readiness.as_ref().is_none_or(Readiness::is_pickable)
    }

    /// Whether its owner says it may be picked and has room for another request.
    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        self.readiness.as_ref().is_none_or(Readiness::is_usable)
    }

    /// What its owner says of its connectivity.
    pub(crate) fn connectivity(&self) -> Option<Connectivity> {
        self.readiness.as_ref().map(Readiness::get)
    }

    /// Why its owner last said it failed.
    pub(crate) fn readiness_error(&self) -> Option<ReadinessError> {
        self.readiness.as_ref().and_then(Readiness::last_error)
    }

    /// Nanoseconds since the slot was inserted.
    fn age_ns(&self) -> u64 {
        let age = Instant::now().saturating_duration_since(self.inserted);
        u64::try_from(age.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Pushes the next retry of a failed endpoint back by its backoff: 50 ms doubling with
    /// each failure in a row, up to 5 s.
    pub(crate) fn defer_retry(&self) {
        let failures = self.failures.load(Ordering::Relaxed).clamp(1, 8);
        let backoff = (50_000_000u64 << (failures - 1)).min(5_000_000_000);
        self.retry_at
            .store(self.age_ns().saturating_add(backoff), Ordering::Relaxed);
    }

    /// Whether a failed endpoint's backoff has passed, so a pick may try it again.
    pub(crate) fn retry_due(&self) -> bool {
        self.age_ns() >= self.retry_at.load(Ordering::Relaxed)
    }

    /// Its `poll_ready` failed. Returns whether it was usable before.
    pub(crate) fn set_failed(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.defer_retry();
        if self.failed.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.tally.count_failed(true);
        // Retired meanwhile: `retire` may have run before the flag was set; whichever of the
        // two swaps the flag back counts it out, so the count never leaks.
        if self.is_removed() && self.failed.swap(false, Ordering::SeqCst) {
            self.tally.count_failed(false);
        }
        true
    }

    /// Its `poll_ready` succeeded. Returns whether it had failed.
    pub(crate) fn clear_failed(&self) -> bool {
        if self.is_failed() && self.failed.swap(false, Ordering::SeqCst) {
            self.failures.store(0, Ordering::Relaxed);
            self.tally.count_failed(false);
            return true;
        }
        false
    }

    /// Leaves the snapshot: marked removed (it drains), with any ejection and failure
    /// counted out.
    pub(crate) fn retire(&self) {
        self.removed.store(true, Ordering::SeqCst);
        if self.failed.swap(false, Ordering::SeqCst) {
            self.tally.count_failed(false);
        }
        if let Some(detector) = &self.detector {
            self.health.clear(detector);
        }
    }

    pub(crate) fn state(&self) -> EndpointState {
        if self.is_removed() {
            EndpointState::Draining
        } else if self.health.is_ejected() {
            EndpointState::Ejected
        } else if self.is_failed() {
            EndpointState::Failed
        } else if self.readiness.as_ref().is_some_and(|r| !r.is_serving()) {
            EndpointState::NotServing
        } else {
            match self.connectivity() {
                Some(Connectivity::Ready) if !self.has_room() => EndpointState::Saturated,
                None | Some(Connectivity::Ready | Connectivity::Idle) => EndpointState::Ready,
                Some(Connectivity::Connecting) => EndpointState::Connecting,
                Some(_) => EndpointState::Failed,
            }
        }
    }
}

/// Slots for unit tests: no service, keyed by strings.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// One slot of weight 1 per key.
    pub(crate) fn slots(keys: &[String]) -> Vec<Slot<(), String>> {
        keys.iter().map(|key| slot(key.clone(), 1)).collect()
    }

    /// One slot per weight, keyed by its position.
    pub(crate) fn weighted(weights: &[u32]) -> Vec<Slot<(), String>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| slot(i.to_string(), weight))
            .collect()
    }

    fn slot(key: String, weight: u32) -> Slot<(), String> {
        let endpoint = Endpoint::new(()).weight(weight);
        Slot::new(key, endpoint, None, None, Arc::default(), &Arc::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches a field moved in front of the ones a pick reads: they must end within the 48
    /// bytes that follow the `Arc`'s two counts in its allocation's first 64.
    #[test]
    fn what_a_pick_reads_fits_beside_the_reference_count() {
        let end = std::mem::offset_of!(SlotState<(), ()>, health) + std::mem::size_of::<Health>();
        assert!(end <= 48, "the pick's fields end at byte {end}");
    }
}
