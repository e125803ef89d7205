//! [`Readiness`]: what an endpoint's owner tells the balancer about it without being polled,
//! so a pick can pass over an endpoint that is connecting or failing, as grpc-go's picker
//! passes over subchannels that are not READY.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::Notify;

/// The connectivity of an endpoint, as its owner reports it through [`Readiness`] (the
/// states of gRPC's connectivity semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Connectivity {
    /// Not connected and not trying: a lazy connection before its first request. Picked;
    /// the pick starts the connect.
    Idle,
    /// Connecting, for the first time or again. Not picked while another endpoint is ready.
    Connecting,
    /// Ready for requests. Picked.
    Ready,
    /// The last attempt failed and the next one waits for a backoff. Not picked while
    /// another endpoint is ready.
    TransientFailure,
    /// Closed for good. Never picked.
    Shutdown,
}

impl Connectivity {
    const ALL: [Self; 5] = [
        Self::Idle,
        Self::Connecting,
        Self::Ready,
        Self::TransientFailure,
        Self::Shutdown,
    ];

    /// Whether a pick may take an endpoint in this state.
    #[inline]
    pub fn is_pickable(self) -> bool {
        matches!(self, Self::Ready | Self::Idle)
    }
}

/// A shared, cheap to clone cell holding an endpoint's [`Connectivity`].
///
/// The owner of an endpoint's service (a connection) sets it; the balancer reads it on
/// every pick (one atomic load) and passes over endpoints that are not
/// [pickable](Connectivity::is_pickable) while another one is. When no endpoint is, a pick
/// waits for one to become so, at most `wait_for_endpoints`. Give it to the balancer with
/// [`Endpoint::readiness`](super::Endpoint::readiness).
///
/// # Examples
///
/// ```
/// use tower_sd::endpoint::{Connectivity, Readiness};
///
/// let readiness = Readiness::new(Connectivity::Connecting);
/// let seen_by_the_balancer = readiness.clone();
/// readiness.set(Connectivity::Ready);
/// assert_eq!(seen_by_the_balancer.get(), Connectivity::Ready);
/// ```
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

struct Inner {
    /// The [`Connectivity`] in the low bits, and [`SATURATED`].
    state: AtomicU8,
    /// Why the last attempt failed, for errors that say why no endpoint is ready.
    error: Mutex<Option<ReadinessError>>,
    /// The balancers holding this endpoint, woken when it changes.
    listeners: Mutex<Vec<Weak<Signal>>>,
}

/// What a balancer listens to: woken on every publish and every change of an endpoint's
/// readiness, with a count of the changes that made an endpoint usable or unusable (so a
/// picker can tell in one load whether what it computed from them still holds).
#[derive(Debug, Default)]
pub(crate) struct Signal {
    notify: Notify,
    /// Changes of connectivity or serving, of every endpoint listened to.
    pub(crate) changes: AtomicU64,
}

impl std::ops::Deref for Signal {
    type Target = Notify;

    fn deref(&self) -> &Notify {
        &self.notify
    }
}

/// The bit of the state byte that says the endpoint has no room for another request now.
const SATURATED: u8 = 0x80;
/// The bit of the state byte that says the endpoint's health check finds it not serving.
const NOT_SERVING: u8 = 0x40;
/// The bits beside the connectivity.
const FLAGS: u8 = SATURATED | NOT_SERVING;

/// The connectivity in a state byte.
#[inline]
fn connectivity(state: u8) -> Connectivity {
    Connectivity::ALL[usize::from(state & !FLAGS).min(Connectivity::ALL.len() - 1)]
}

/// Why an endpoint is not ready, as its owner reported it with [`Readiness::fail`].
pub type ReadinessError = Arc<dyn std::error::Error + Send + Sync>;

impl Readiness {
    /// A cell in this state.
    pub fn new(state: Connectivity) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: AtomicU8::new(state as u8),
                error: Mutex::new(None),
                listeners: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The current state.
    #[inline]
    pub fn get(&self) -> Connectivity {
        connectivity(self.inner.state.load(Ordering::Acquire))
    }

    /// Whether a pick may take the endpoint now: its connectivity allows it and it is
    /// [serving](Self::is_serving) (it may still be [saturated](Self::is_saturated)).
    #[inline]
    pub fn is_pickable(&self) -> bool {
        let state = self.inner.state.load(Ordering::Acquire);
        state & NOT_SERVING == 0 && connectivity(state).is_pickable()
    }

    /// Whether a pick may take the endpoint now and it has room for the request: pickable
    /// and not saturated, in one load.
    #[inline]
    pub fn is_usable(&self) -> bool {
        let state = self.inner.state.load(Ordering::Acquire);
        state & FLAGS == 0 && connectivity(state).is_pickable()
    }

    /// Whether the endpoint's health check, if it has one, finds it serving (gRPC's
    /// `SERVING`; see [`set_serving`](Self::set_serving)).
    #[inline]
    pub fn is_serving(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) & NOT_SERVING == 0
    }

    /// Marks the endpoint serving or not, as its health check finds it: while it is not,
    /// the balancer does not pick it, whatever its connectivity (the connection stays
    /// open). Kept across connectivity changes; a change wakes the balancers holding it.
    pub fn set_serving(&self, serving: bool) {
        let previous = if serving {
            self.inner.state.fetch_and(!NOT_SERVING, Ordering::AcqRel)
        } else {
            self.inner.state.fetch_or(NOT_SERVING, Ordering::AcqRel)
        };
        if (previous & NOT_SERVING == 0) != serving {
            self.wake(true);
        }
    }

    /// Whether the owner says the endpoint has no room for another request now (every
    /// connection at its server's stream limit): the balancer picks it only when no other
    /// endpoint has room.
    #[inline]
    pub fn is_saturated(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) & SATURATED != 0
    }

    /// Sets the state; a change wakes the balancers holding the endpoint, so one waiting for
    /// a ready endpoint picks again. Saturation and serving are kept.
    pub fn set(&self, state: Connectivity) {
        let previous = self
            .inner
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(old & FLAGS | state as u8)
            })
            .unwrap_or_else(|old| old);
        if previous & !FLAGS != state as u8 {
            self.wake(true);
        }
    }

    /// Marks the endpoint saturated, or not (see [`is_saturated`](Self::is_saturated)); the
    /// end of saturation wakes the balancers holding it. Cheap when nothing changes: one
    /// load.
    #[inline]
    pub fn set_saturated(&self, saturated: bool) {
        if self.is_saturated() == saturated {
            return;
        }
        let previous = if saturated {
            self.inner.state.fetch_or(SATURATED, Ordering::AcqRel)
        } else {
            self.inner.state.fetch_and(!SATURATED, Ordering::AcqRel)
        };
        if !saturated && previous & SATURATED != 0 {
            self.wake(false);
        }
    }

    /// Wakes the balancers holding it; `health` when it changed whether the endpoint is
    /// usable at all (not only whether it has room), which they count.
    fn wake(&self, health: bool) {
        let listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for listener in listeners.iter().filter_map(Weak::upgrade) {
            if health {
                listener.changes.fetch_add(1, Ordering::AcqRel);
            }
            listener.notify_waiters();
        }
    }

    /// Sets [`Connectivity::TransientFailure`], with the error that caused it.
    pub fn fail(&self, error: ReadinessError) {
        *self
            .inner
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
        self.set(Connectivity::TransientFailure);
    }

    /// The error of the last [`fail`](Self::fail), if any.
    pub fn last_error(&self) -> Option<ReadinessError> {
        self.inner
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until the endpoint is [`Ready`](Connectivity::Ready) (`true`) or shut down
    /// for good (`false`); `changed` must [`listen`](Self::listen) to it.
    #[cfg_attr(not(any(feature = "tonic", feature = "http")), allow(dead_code))]
    pub(crate) async fn until_ready(&self, changed: &Notify) -> bool {
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.get() {
                Connectivity::Ready => return true,
                Connectivity::Shutdown => return false,
                _ => notified.await,
            }
        }
    }

    /// Wakes `notify` on every change from now on (until it is dropped).
    pub(crate) fn listen(&self, notify: &Arc<Signal>) {
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Balancers that are gone go first, so the list stays as long as the live ones.
        listeners.retain(|listener| listener.strong_count() > 0);
        listeners.push(Arc::downgrade(notify));
    }
}

/// Two handles are equal when they are the same cell.
impl PartialEq for Readiness {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Readiness {}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut tuple = f.debug_tuple("Readiness");
        tuple.field(&self.get());
        if !self.is_serving() {
            tuple.field(&"not serving");
        }
        tuple.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches a listener list that forgets live balancers when another one listens (the
    /// first would then wait out its whole `wait_for_endpoints` after a connect), and one
    /// that keeps the ones that are gone.
    #[tokio::test]
    async fn every_live_listener_is_woken_and_gone_ones_are_dropped() {
        let _limit = tower_sd_testkit::time_limit(10);
        let readiness = Readiness::new(Connectivity::Connecting);
        let first = Arc::new(Signal::default());
        let second = Arc::new(Signal::default());
        readiness.listen(&first);
        readiness.listen(&second);
        let gone = Arc::new(Signal::default());
        readiness.listen(&gone);
        drop(gone);
        readiness.listen(&Arc::clone(&second));

        let (woken_first, woken_second) = (first.notified(), second.notified());
        tokio::pin!(woken_first, woken_second);
        woken_first.as_mut().enable();
        woken_second.as_mut().enable();
        readiness.set(Connectivity::Ready);
        let now = tokio::time::Duration::ZERO;
        tokio::time::timeout(now, woken_first)
            .await
            .expect("the first is woken");
        tokio::time::timeout(now, woken_second)
            .await
            .expect("the second is woken");
        let listeners = readiness.inner.listeners.lock().unwrap().len();
        assert_eq!(listeners, 3, "first, second twice; the dropped one is gone");
    }

    /// Catches a count that misses a change of connectivity or serving (a balancer would
    /// keep routing by stale tier loads) or counts saturation, which changes all the time
    /// under load (it would recompute them on every request).
    #[test]
    fn changes_of_connectivity_and_serving_are_counted_and_saturation_is_not() {
        let readiness = Readiness::new(Connectivity::Connecting);
        let signal = Arc::new(Signal::default());
        readiness.listen(&signal);
        let changes = || signal.changes.load(Ordering::Acquire);
        readiness.set(Connectivity::Ready);
        assert_eq!(changes(), 1);
        readiness.set_saturated(true);
        readiness.set_saturated(false);
        assert_eq!(changes(), 1, "saturation");
        readiness.set_serving(false);
        assert_eq!(changes(), 2);
        readiness.set_serving(true);
        readiness.set(Connectivity::TransientFailure);
        assert_eq!(changes(), 4);
    }

    /// Catches handles that compare equal when they are different cells (an endpoint
    /// update with a new connection would look unchanged) or unequal when they are one, and
    /// a `Debug` that hides the state.
    #[test]
    fn handles_are_equal_when_they_share_the_cell_and_show_the_state() {
        let readiness = Readiness::new(Connectivity::Ready);
        assert_eq!(readiness, readiness.clone());
        assert_ne!(readiness, Readiness::new(Connectivity::Ready));
        assert_eq!(format!("{readiness:?}"), "Readiness(Ready)");
    }

    #[test]
    fn every_state_reads_back_as_set() {
        let readiness = Readiness::new(Connectivity::Idle);
        for state in Connectivity::ALL {
            readiness.set(state);
            assert_eq!(readiness.get(), state);
            let pickable = matches!(state, Connectivity::Idle | Connectivity::Ready);
            assert_eq!(readiness.is_pickable(), pickable);
            assert_eq!(readiness.is_usable(), pickable);
        }
    }

    /// Catches a wake-up for a change that is none (every balancer waiting on the endpoint
    /// would look again for nothing), whether or not the endpoint is saturated.
    #[tokio::test]
    async fn setting_the_same_state_wakes_no_balancer() {
        let _limit = tower_sd_testkit::time_limit(10);
        let readiness = Readiness::new(Connectivity::Ready);
        let balancer = Arc::new(Signal::default());
        readiness.listen(&balancer);
        for saturated in [false, true] {
            readiness.set_saturated(saturated);
            let woken = balancer.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            readiness.set(Connectivity::Ready);
            readiness.set_saturated(saturated);
            let waited = tokio::time::timeout(tokio::time::Duration::ZERO, woken).await;
            assert!(
                waited.is_err(),
                "woken for nothing (saturated: {saturated})"
            );
        }
    }

    /// Catches saturation that hides the connectivity, is lost when the connectivity
    /// changes, leaves the endpoint usable, or ends without waking the balancers that wait
    /// for a usable endpoint.
    #[tokio::test]
    async fn saturation_is_kept_beside_the_state_and_its_end_wakes_the_balancers() {
        let _limit = tower_sd_testkit::time_limit(10);
        let readiness = Readiness::new(Connectivity::Ready);
        let balancer = Arc::new(Signal::default());
        readiness.listen(&balancer);
        readiness.set_saturated(true);
        assert!(readiness.is_saturated() && readiness.is_pickable() && !readiness.is_usable());
        readiness.set(Connectivity::Connecting);
        readiness.set(Connectivity::Ready);
        assert_eq!(readiness.get(), Connectivity::Ready);
        assert!(readiness.is_saturated(), "kept across state changes");

        let woken = balancer.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        readiness.set_saturated(false);
        tokio::time::timeout(tokio::time::Duration::ZERO, woken)
            .await
            .expect("the end of saturation wakes the balancer");
        assert!(readiness.is_usable());
    }

    /// Catches a health verdict that leaves a not-serving endpoint pickable, is lost when
    /// the connectivity changes (a reconnect must not make it serving), hides the
    /// connectivity, or changes without waking the balancers.
    #[tokio::test]
    async fn not_serving_is_kept_beside_the_state_and_keeps_the_endpoint_out() {
        let _limit = tower_sd_testkit::time_limit(10);
        let readiness = Readiness::new(Connectivity::Ready);
        let balancer = Arc::new(Signal::default());
        readiness.listen(&balancer);
        let woken = |readiness: &Readiness, serving| {
            let woken = balancer.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            readiness.set_serving(serving);
            futures_util::FutureExt::now_or_never(woken).is_some()
        };
        assert!(woken(&readiness, false), "going out wakes");
        assert!(!readiness.is_pickable() && !readiness.is_usable() && !readiness.is_serving());
        assert!(!woken(&readiness, false), "no change, no wake");
        readiness.set(Connectivity::Connecting);
        readiness.set(Connectivity::Ready);
        readiness.set_saturated(true);
        readiness.set_saturated(false);
        assert_eq!(readiness.get(), Connectivity::Ready);
        assert!(!readiness.is_pickable(), "kept across changes");
        assert_eq!(
            format!("{readiness:?}"),
            r#"Readiness(Ready, "not serving")"#
        );
        assert!(woken(&readiness, true), "coming back wakes");
        assert!(readiness.is_usable() && readiness.is_serving());
    }
}
