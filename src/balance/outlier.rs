//! Passive outlier detection, with Envoy's and Finagle's semantics.
//!
//! Every completed request is classified (see [`Classify`](super::Classify)). An endpoint
//! that fails `consecutive_failures` times in a row is ejected: not picked for
//! `base_ejection_time x times ejected`, capped at `max_ejection_time`. At most
//! `max_ejection_percent` of the endpoints are ejected at once; further endpoints keep
//! serving. When an ejection ends, the next pick sends a single probe request to it: success
//! returns the endpoint (and resets its multiplier), failure ejects it again for longer, and
//! a probe that ends without an outcome (its caller gave up, or the handle was dropped before
//! the call) is released so that the next pick probes again.
//!
//! All state is per-endpoint atomics plus shared counts: the endpoints ejected, and the
//! earliest time an ejection ends. The pick path reads one extra word per candidate and
//! takes the time only while something is ejected.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

/// Passive outlier detection settings, with Envoy's and Finagle's semantics.
///
/// Every completed request is classified (see [`Classify`](super::Classify)). An endpoint
/// that fails `consecutive_failures` times in a row is ejected: not picked for
/// `base_ejection_time x times ejected`, capped at `max_ejection_time`. At most
/// `max_ejection_percent` of the endpoints are ejected at once; further endpoints keep
/// serving. When an ejection ends, the next pick sends a single probe request to it: success
/// returns the endpoint (and resets its multiplier), failure ejects it again for longer. When
/// fewer than the balancer's panic threshold are usable, ejections are ignored (see
/// [`PanicMode`](super::PanicMode)).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_sd::balance::{Balance, OutlierDetection};
///
/// let builder = Balance::builder().outlier_detection(Some(
///     OutlierDetection::default()
///         .consecutive_failures(3)
///         .base_ejection_time(Duration::from_secs(10)),
/// ));
/// # drop(builder);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint (default 5).
    pub consecutive_failures: u32,
    /// Ejection time for a first ejection; multiplied by the times ejected (default 30 s).
    pub base_ejection_time: Duration,
    /// The longest ejection (default 300 s).
    pub max_ejection_time: Duration,
    /// At most this percentage of endpoints is ejected at once (default 50).
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl OutlierDetection {
    /// Sets [`consecutive_failures`](Self::consecutive_failures) (at least 1).
    #[must_use]
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = failures.max(1);
        self
    }

    /// Sets [`base_ejection_time`](Self::base_ejection_time).
    #[must_use]
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.base_ejection_time = time;
        self
    }

    /// Sets [`max_ejection_time`](Self::max_ejection_time).
    #[must_use]
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.max_ejection_time = time;
        self
    }

    /// Sets [`max_ejection_percent`](Self::max_ejection_percent) (at most 100).
    #[must_use]
    pub fn max_ejection_percent(mut self, percent: u8) -> Self {
        self.max_ejection_percent = percent.min(100);
        self
    }

    fn ejection_time(&self, times: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(times.max(1))
            .min(self.max_ejection_time)
    }
}

/// What the endpoints of one balancer share for outlier detection.
pub(crate) struct Detector {
    pub(crate) config: OutlierDetection,
    pub(crate) service: String,
    epoch: Instant,
    /// Endpoints of the current snapshot that are ejected (including those being probed).
    pub(crate) ejected: AtomicUsize,
    /// Ejections and returns so far: whether the set of ejected endpoints changed, in one
    /// load.
    pub(crate) changes: AtomicU64,
    /// Endpoints in the current snapshot.
    pub(crate) total: AtomicUsize,
    /// The earliest time (ns since the epoch) an ejection ends and its probe is due;
    /// `u64::MAX` when none is.
    next_probe: AtomicU64,
    requests: crate::metrics::Requests,
}

impl Detector {
    pub(crate) fn new(config: OutlierDetection, service: String, epoch: Instant) -> Self {
        Self {
            config,
            requests: crate::metrics::Requests::new(&service),
            service,
            epoch,
            ejected: AtomicUsize::new(0),
            changes: AtomicU64::new(0),
            total: AtomicUsize::new(0),
            next_probe: AtomicU64::new(u64::MAX),
        }
    }

    /// Nanoseconds since the balancer's epoch (never 0, which means "not ejected").
    pub(crate) fn now(&self) -> u64 {
        let nanos = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }

    /// Whether some ejection has ended and its probe is due at `now`.
    #[inline]
    pub(crate) fn probe_due(&self, now: u64) -> bool {
        self.next_probe.load(Ordering::SeqCst) <= now
    }

    /// Starts a scan for due probes: forgets the earliest due time, which the scan then
    /// rebuilds with [`probe_at`](Self::probe_at) from every ejection it does not probe.
    /// An ejection made meanwhile lowers it again, so none is lost.
    pub(crate) fn rescan(&self) {
        self.next_probe.store(u64::MAX, Ordering::SeqCst);
    }

    /// A probe is due at `at`.
    pub(crate) fn probe_at(&self, at: u64) {
        self.next_probe.fetch_min(at, Ordering::SeqCst);
    }

    /// One more endpoint is ejected (`true`) or one fewer.
    fn count_ejected(&self, more: bool) {
        if more {
            self.ejected.fetch_add(1, Ordering::SeqCst);
        } else {
            self.ejected.fetch_sub(1, Ordering::SeqCst);
        }
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    fn may_eject(&self) -> bool {
        let total = self.total.load(Ordering::Relaxed);
        let limit = total * usize::from(self.config.max_ejection_percent) / 100;
        self.ejected.load(Ordering::Relaxed) < limit
    }

    fn until(&self, time: Duration) -> u64 {
        self.now()
            .saturating_add(u64::try_from(time.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Per-endpoint outlier state.
#[derive(Debug, Default)]
pub(crate) struct Health {
    consecutive: AtomicU32,
    /// When the ejection ends (ns since the epoch); 0 when not ejected.
    ejected_until: AtomicU64,
    times_ejected: AtomicU32,
    /// A probe request is out after the ejection ended.
    probing: AtomicBool,
}

/// What recording an outcome did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    Nothing,
    /// The endpoint was ejected (or ejected again after its probe failed).
    Ejected,
}

impl Health {
    /// Whether the endpoint is ejected at all (one load; no clock).
    #[inline]
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Claims the probe of an endpoint whose ejection ended by `now`; only one claim wins.
    pub(crate) fn claim_probe(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::SeqCst);
        until != 0
            && until <= now
            && self
                .probing
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// Tells the detector when this endpoint's probe is due, if it is ejected and no probe
    /// is out (a probe out tells it again if it ends without an outcome).
    pub(crate) fn schedule(&self, detector: &Detector) {
        let until = self.ejected_until.load(Ordering::SeqCst);
        if until != 0 && !self.probing.load(Ordering::SeqCst) {
            detector.probe_at(until);
        }
    }

    /// A claimed probe ended without an outcome: the next pick probes again.
    pub(crate) fn release_probe(&self, detector: &Detector) {
        if self.probing.swap(false, Ordering::SeqCst) && self.is_ejected() {
            detector.probe_at(detector.now());
        }
    }

    /// Ends any ejection (the endpoint left discovery), keeping the shared count right:
    /// whoever swaps a non-zero deadline out counts it out.
    pub(crate) fn clear(&self, detector: &Detector) {
        self.probing.store(false, Ordering::SeqCst);
        if self.ejected_until.swap(0, Ordering::SeqCst) != 0 {
            detector.count_ejected(false);
        }
    }

    /// Records a success that changes nothing (no failures in a row to reset): one load.
    /// `false` when there is something to record the slow way.
    #[inline]
    pub(crate) fn quiet_success(&self, detector: &Detector) -> bool {
        let quiet = self.consecutive.load(Ordering::Relaxed) == 0;
        if quiet {
            detector.requests.record(false);
        }
        quiet
    }

    /// Records one classified outcome; `probe` when this request was the endpoint's probe.
    pub(crate) fn record<K: fmt::Debug>(
        &self,
        detector: &Detector,
        key: &K,
        failure: bool,
        probe: bool,
    ) -> Recorded {
        detector.requests.record(failure);
        if probe {
            return self.record_probe(detector, key, failure);
        }
        if !failure {
            // Load first: the common case then costs no write.
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            return Recorded::Nothing;
        }
        let config = &detector.config;
        let failures = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < config.consecutive_failures || self.is_ejected() || !detector.may_eject() {
            return Recorded::Nothing;
        }
        let times = self.times_ejected.load(Ordering::Relaxed).saturating_add(1);
        let time = config.ejection_time(times);
        let until = detector.until(time);
        if self
            .ejected_until
            .compare_exchange(0, until, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Recorded::Nothing;
        }
        self.times_ejected.store(times, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        detector.count_ejected(true);
        detector.probe_at(until);
        warn!(service = %detector.service, endpoint = ?key, failures, ?time, times, "endpoint ejected");
        crate::metrics::ejected(&detector.service);
        Recorded::Ejected
    }

    fn record_probe<K: fmt::Debug>(&self, detector: &Detector, key: &K, failure: bool) -> Recorded {
        self.probing.store(false, Ordering::SeqCst);
        let until = self.ejected_until.load(Ordering::SeqCst);
        if until == 0 {
            // Retired while the probe was out: nothing to decide.
            return Recorded::Nothing;
        }
        if !failure {
            self.times_ejected.store(0, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
            if self.ejected_until.swap(0, Ordering::SeqCst) != 0 {
                detector.count_ejected(false);
                info!(service = %detector.service, endpoint = ?key, "probe succeeded; endpoint returns");
                crate::metrics::returned(&detector.service);
            }
            return Recorded::Nothing;
        }
        let times = self
            .times_ejected
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let time = detector.config.ejection_time(times);
        let next = detector.until(time);
        // From the deadline read above: a retirement meanwhile (which swaps it to 0) wins.
        if self
            .ejected_until
            .compare_exchange(until, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Recorded::Nothing;
        }
        detector.probe_at(next);
        warn!(service = %detector.service, endpoint = ?key, ?time, times, "probe failed; endpoint ejected again");
        crate::metrics::ejected(&detector.service);
        Recorded::Ejected
    }

    /// The remaining ejection, for statistics.
    pub(crate) fn ejected_for(&self, detector: &Detector) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0).then(|| Duration::from_nanos(until.saturating_sub(detector.now())))
    }
}

#[cfg(test)]
mod tests {
    //! The probe schedule: the pick path scans the endpoints only when `probe_due` says so,
    //! so a schedule that is due too early costs a scan on every request, and one never due
    //! leaves an ejected endpoint out for good. Wrong implementations these catch: a scan
    //! that never forgets the due time, a healthy endpoint that schedules a probe, a released
    //! non-probe that makes one due now.
    use super::*;

    fn detector() -> Detector {
        let config = OutlierDetection::default()
            .consecutive_failures(1)
            .max_ejection_percent(100);
        let detector = Detector::new(config, "svc".into(), Instant::now());
        detector.total.store(2, Ordering::Relaxed);
        detector
    }

    /// Ejects `health` with one failure; returns when the ejection ends.
    fn eject(health: &Health, detector: &Detector) -> u64 {
        assert_eq!(health.record(detector, &0, true, false), Recorded::Ejected);
        health.ejected_until.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_is_due_at_the_end_of_the_ejection_and_not_before() {
        let _limit = tower_sd_testkit::time_limit(10);
        let detector = detector();
        assert!(!detector.probe_due(u64::MAX - 1), "nothing ejected");
        let health = Health::default();
        let until = eject(&health, &detector);
        assert!(!detector.probe_due(until - 1));
        assert!(detector.probe_due(until));

        // A scan forgets the due time and rebuilds it from the ejections it leaves alone.
        detector.rescan();
        assert!(!detector.probe_due(until), "forgotten");
        health.schedule(&detector);
        assert!(detector.probe_due(until), "rebuilt");
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_that_need_no_probe_schedule_none() {
        let _limit = tower_sd_testkit::time_limit(10);
        let detector = detector();
        let healthy = Health::default();
        healthy.schedule(&detector);
        assert!(!detector.probe_due(u64::MAX - 1), "a healthy endpoint");

        let ejected = Health::default();
        let until = eject(&ejected, &detector);
        detector.rescan();
        assert!(ejected.claim_probe(until));
        ejected.schedule(&detector);
        assert!(!detector.probe_due(u64::MAX - 1), "its probe is out");

        // Releasing an endpoint with no probe out changes nothing...
        let other = Health::default();
        let other_until = eject(&other, &detector);
        detector.rescan();
        other.release_probe(&detector);
        assert!(!detector.probe_due(other_until - 1), "no probe was out");
        // ...while releasing the probe out makes the next pick probe again.
        ejected.release_probe(&detector);
        assert!(detector.probe_due(detector.now()));
    }
}
