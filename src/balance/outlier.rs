//! Passive outlier detection, with Envoy's and Finagle's semantics.
//!
//! Every completed request is classified (see [`Classify`](super::Classify)). An endpoint
//! that fails `consecutive_failures` times in a row is ejected: not picked for
//! `base_ejection_time x times ejected`, capped at `max_ejection_time`. At most
//! `max_ejection_percent` of the endpoints are ejected at once; further endpoints keep
//! serving. When an ejection ends, a single probe request decides: success returns the
//! endpoint (and resets its multiplier), failure ejects it again for longer.
//!
//! All state is per-endpoint atomics plus one shared count of ejected endpoints; the pick
//! path reads one extra word per candidate and takes the time only while something is
//! ejected.

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
/// serving. When an ejection ends, a single probe request decides: success returns the
/// endpoint (and resets its multiplier), failure ejects it again for longer. When fewer than
/// the balancer's panic threshold are usable, ejections are ignored (see
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
#[derive(Debug)]
pub(crate) struct Detector {
    pub(crate) config: OutlierDetection,
    pub(crate) service: String,
    epoch: Instant,
    /// Endpoints currently ejected (including those being probed).
    pub(crate) ejected: AtomicUsize,
    /// Endpoints in the current snapshot.
    pub(crate) total: AtomicUsize,
    #[cfg(feature = "metrics")]
    requests: super::metrics::Requests,
}

impl Detector {
    pub(crate) fn new(config: OutlierDetection, service: String, epoch: Instant) -> Self {
        Self {
            config,
            #[cfg(feature = "metrics")]
            requests: super::metrics::Requests::new(&service),
            service,
            epoch,
            ejected: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
        }
    }

    /// Nanoseconds since the balancer's epoch (never 0, which means "not ejected").
    pub(crate) fn now(&self) -> u64 {
        let nanos = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }

    fn may_eject(&self) -> bool {
        let total = self.total.load(Ordering::Relaxed);
        let limit = total * usize::from(self.config.max_ejection_percent) / 100;
        self.ejected.load(Ordering::Relaxed) < limit
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

/// Whether an endpoint can take a request now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Usable {
    Yes,
    /// Its ejection has ended; the first picker to claim the probe sends it.
    Probe,
    No,
}

impl Health {
    /// Whether the endpoint is ejected at all (one load; no clock).
    #[inline]
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn usable(&self, now: u64) -> Usable {
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => Usable::Yes,
            until if until <= now && !self.probing.load(Ordering::Relaxed) => Usable::Probe,
            _ => Usable::No,
        }
    }

    /// Claims the probe of an endpoint whose ejection ended; only one picker wins.
    pub(crate) fn claim_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Ends any ejection (the endpoint left discovery); keeps the shared count right.
    pub(crate) fn clear(&self, detector: &Detector) {
        if self.ejected_until.swap(0, Ordering::AcqRel) != 0 {
            detector.ejected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Records one classified outcome.
    pub(crate) fn record<K: std::fmt::Debug>(&self, detector: &Detector, key: &K, failure: bool) {
        #[cfg(feature = "metrics")]
        detector.requests.record(failure);
        if !failure {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            // Load first: the common case (no probe out) then costs no write.
            if self.probing.load(Ordering::Relaxed) && self.probing.swap(false, Ordering::AcqRel) {
                self.times_ejected.store(0, Ordering::Relaxed);
                if self.ejected_until.swap(0, Ordering::AcqRel) != 0 {
                    detector.ejected.fetch_sub(1, Ordering::AcqRel);
                    info!(service = %detector.service, endpoint = ?key, "probe succeeded; endpoint returns");
                    #[cfg(feature = "metrics")]
                    super::metrics::returned(&detector.service);
                }
            }
            return;
        }
        let config = &detector.config;
        if self.probing.swap(false, Ordering::AcqRel) {
            let times = self.times_ejected.fetch_add(1, Ordering::AcqRel) + 1;
            let time = config.ejection_time(times);
            self.ejected_until
                .store(detector.now() + duration_ns(time), Ordering::Release);
            warn!(service = %detector.service, endpoint = ?key, ?time, times, "probe failed; endpoint ejected again");
            #[cfg(feature = "metrics")]
            super::metrics::ejected(&detector.service);
            return;
        }
        let failures = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < config.consecutive_failures || self.is_ejected() || !detector.may_eject() {
            return;
        }
        let times = self.times_ejected.load(Ordering::Relaxed) + 1;
        let time = config.ejection_time(times);
        let until = detector.now() + duration_ns(time);
        if self
            .ejected_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.times_ejected.store(times, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
            detector.ejected.fetch_add(1, Ordering::AcqRel);
            warn!(service = %detector.service, endpoint = ?key, failures, ?time, times, "endpoint ejected");
            #[cfg(feature = "metrics")]
            super::metrics::ejected(&detector.service);
        }
    }

    /// The remaining ejection, for statistics.
    pub(crate) fn ejected_for(&self, detector: &Detector) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0).then(|| Duration::from_nanos(until.saturating_sub(detector.now())))
    }
}

fn duration_ns(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX / 2)
}
