//! [`Completion`]: a request's claim on its endpoint, released with the request's outcome
//! (or as abandoned), and what it tells the endpoint when it is.

use std::fmt;
use std::sync::Arc;

use super::load::Load;
use super::slot::SlotState;

/// What a completion tells its endpoint.
pub(crate) trait Track: Send + Sync {
    /// The request ended: classified (`Some(failure)`) or abandoned (`None`: the caller gave
    /// up, which says nothing about the endpoint). `started` is when it was sent, as the
    /// endpoint's latency clock [stamped](super::load::Load::stamp) it (0 when the endpoint
    /// measures no latency); `probe` whether it was the endpoint's outlier probe.
    fn done(&self, outcome: Option<bool>, started: u64, probe: bool);
}

impl<S: Send + Sync, K: fmt::Debug + Send + Sync> Track for SlotState<S, K> {
    #[inline]
    fn done(&self, outcome: Option<bool>, started: u64, probe: bool) {
        // The common case, in a few instructions: a success that was not a probe, with no
        // latency to record and no failures in a row to reset.
        let quiet = outcome == Some(false)
            && !probe
            && self.ewma.is_none()
            && self
                .detector
                .as_ref()
                .is_none_or(|detector| self.health.quiet_success(detector));
        if !quiet {
            self.record(outcome, started, probe);
        }
        // The completion drops its reference next, which ends the request's in-flight count.
    }
}

impl<S, K: fmt::Debug> SlotState<S, K> {
    /// What [`done`](Track::done) does outside its common case.
    #[inline(never)]
    fn record(&self, outcome: Option<bool>, started: u64, probe: bool) {
        if let (Some(_), Some(load)) = (outcome, &self.ewma) {
            load.observe_since(started);
        }
        let Some(detector) = &self.detector else {
            return;
        };
        match outcome {
            Some(failure) => {
                let recorded = self.health.record(detector, &self.key, failure, probe);
                // Removed meanwhile: its ejection must not outlive its place in the
                // snapshot, or the shared count would leak.
                if recorded == super::outlier::Recorded::Ejected && self.is_removed() {
                    self.health.clear(detector);
                }
            }
            None if probe => self.health.release_probe(detector),
            None => {}
        }
    }
}

/// A request's claim on its endpoint: counted in flight (and holding the endpoint, so its
/// service and connection stay alive) until [`complete`](Self::complete)d with an outcome,
/// or dropped, which releases it as abandoned (an outlier probe is then given to the next
/// pick).
///
/// [`Classify`](super::Classify) receives it with each response, so a response whose body streams can keep it
/// until the body ends.
#[must_use = "dropping a completion counts the request as abandoned"]
pub struct Completion {
    slot: Option<Arc<dyn Track>>,
    /// The latency clock's stamp at the start (0 when the endpoint measures no latency): a
    /// plain word, so that moving a completion is cheap.
    started: u64,
    probe: bool,
}

impl Completion {
    #[inline]
    pub(crate) fn start<S, K>(slot: Arc<SlotState<S, K>>, probe: bool) -> Self
    where
        S: Send + Sync + 'static,
        K: fmt::Debug + Send + Sync + 'static,
    {
        let started = slot.ewma.as_ref().map_or(0, Load::stamp);
        let slot: Arc<dyn Track> = slot;
        Self {
            slot: Some(slot),
            started,
            probe,
        }
    }

    /// A completion reporting to `track`, for tests of classifiers.
    #[cfg(test)]
    pub(crate) fn tracked_by(track: Arc<dyn Track>) -> Self {
        Self {
            slot: Some(track),
            started: 0,
            probe: false,
        }
    }

    /// The request is complete; `failure` when it counts against the endpoint.
    #[inline]
    pub fn complete(mut self, failure: bool) {
        if let Some(slot) = self.slot.take() {
            slot.done(Some(failure), self.started, self.probe);
        }
        // Nothing is left for `Drop` to release.
        std::mem::forget(self);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.done(None, self.started, self.probe);
        }
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}
