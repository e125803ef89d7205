//! One endpoint as the balancer holds it: the service plus its hot per-endpoint counters.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::load::Load;
use super::outlier::{Detector, Health};

/// Per-endpoint facts that come from the registry rather than from traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) weight: u32,
    pub(crate) zone: Option<String>,
}

impl Default for Meta {
    fn default() -> Self {
        Self {
            weight: 1,
            zone: None,
        }
    }
}

/// An endpoint in a snapshot.
///
/// `repr(C)` keeps the hot atomics first, so they share a cache line with the `Arc`'s own
/// reference count: a request touches one line per endpoint (count up, in-flight up, and
/// back down), and the cold fields (service, key) stay out of the way of pickers on other
/// cores.
#[repr(C)]
pub(crate) struct Endpoint<S, K> {
    /// Requests dispatched and not yet complete.
    pub(crate) in_flight: AtomicU64,
    /// Peak-EWMA state, in that load mode only.
    pub(crate) ewma: Option<Load>,
    /// `poll_ready` failed; skipped by the pick while others are usable.
    pub(crate) failed: AtomicBool,
    /// No longer in the current snapshot; requests in flight finish on it.
    pub(crate) removed: AtomicBool,
    /// Outlier-detection state.
    pub(crate) health: Health,
    /// Shared outlier-detection state; `None` when detection is off.
    pub(crate) detector: Option<std::sync::Arc<Detector>>,
    /// When discovery inserted it (for slow start).
    pub(crate) inserted: tokio::time::Instant,
    /// Static weight (>= 1) from the registry.
    pub(crate) weight: u64,
    pub(crate) zone: Option<String>,
    pub(crate) key: K,
    pub(crate) service: S,
}

impl<S, K> Endpoint<S, K> {
    pub(crate) fn new(
        key: K,
        service: S,
        meta: Meta,
        ewma: Option<Load>,
        detector: Option<std::sync::Arc<Detector>>,
    ) -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            ewma,
            failed: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            health: Health::default(),
            detector,
            inserted: tokio::time::Instant::now(),
            weight: u64::from(meta.weight.max(1)),
            zone: meta.zone,
            key,
            service,
        }
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    pub(crate) fn state(&self) -> EndpointState {
        if self.is_removed() {
            EndpointState::Draining
        } else if self.health.is_ejected() {
            EndpointState::Ejected
        } else if self.is_failed() {
            EndpointState::Failed
        } else {
            EndpointState::Ready
        }
    }
}

impl<S, K: fmt::Debug> fmt::Debug for Endpoint<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("key", &self.key)
            .field("in_flight", &self.in_flight())
            .field("weight", &self.weight)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Whether the balancer picks an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndpointState {
    /// Picked normally.
    Ready,
    /// Its `poll_ready` failed; it is picked only when no other endpoint is usable, and
    /// becomes ready again when a `poll_ready` on it succeeds or discovery replaces it.
    Failed,
    /// Ejected by outlier detection; a single probe decides when the ejection ends.
    Ejected,
    /// Removed by discovery; only requests already in flight still use it.
    Draining,
}

/// A point-in-time view of one endpoint, from [`Balance::endpoints`].
///
/// [`Balance::endpoints`]: super::Balance::endpoints
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EndpointStats<K> {
    /// The discovery key (the instance id, for registry discovery).
    pub key: K,
    /// Requests dispatched to it and not yet complete.
    pub in_flight: u64,
    /// Peak-EWMA latency estimate; `None` unless the balancer uses that load.
    pub ewma: Option<std::time::Duration>,
    /// Static weight from the registry.
    pub weight: u32,
    /// Locality zone from the registry.
    pub zone: Option<String>,
    /// Whether it is picked.
    pub state: EndpointState,
    /// Time left in its ejection, when ejected.
    pub ejected_for: Option<std::time::Duration>,
}
