//! Load metrics: how the pick compares two endpoints.
//!
//! - [`LoadMetric::PendingRequests`] (default): requests in flight, divided by weight. Free
//!   to read, and good enough whenever endpoints are alike.
//! - [`LoadMetric::PeakEwma`]: a peak-sensitive exponentially weighted moving average of
//!   response latency, times (in flight + 1), divided by weight, as in Finagle's and tower's
//!   `PeakEwma`. It reacts at once to a latency spike (the estimate jumps to any larger
//!   sample) and forgets it gradually (samples below the estimate are averaged in, and the
//!   estimate decays while idle), so a slow endpoint sheds traffic quickly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How the balancer measures an endpoint's load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum LoadMetric {
    /// Requests in flight (the default).
    #[default]
    PendingRequests,
    /// Peak EWMA of latency x (requests in flight + 1).
    PeakEwma {
        /// The estimate a new endpoint starts with, before it has answered anything.
        default_rtt: Duration,
        /// How quickly old samples lose weight: after `decay`, a sample counts 1/e as much.
        decay: Duration,
    },
}

impl LoadMetric {
    /// Peak EWMA with tower's and Finagle's usual settings: a 30 ms default RTT and a 10 s
    /// decay.
    pub const fn peak_ewma() -> Self {
        Self::PeakEwma {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

/// Per-endpoint peak-EWMA state in two atomics: the estimate (f64 nanoseconds, as bits) and
/// when it was last updated (nanoseconds since the balancer's epoch).
///
/// Updates are plain loads and stores, not compare-and-swap: two completions racing may lose
/// one sample, which a moving average tolerates, and the pick path stays wait-free.
#[derive(Debug)]
pub(crate) struct Load {
    estimate: AtomicU64,
    stamp: AtomicU64,
    epoch: Instant,
    decay_ns: f64,
}

impl Load {
    pub(crate) fn new(initial: Duration, decay: Duration, epoch: Instant, now: Instant) -> Self {
        Self {
            estimate: AtomicU64::new((initial.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(Self::nanos(epoch, now)),
            epoch,
            decay_ns: (decay.as_nanos() as f64).max(1.0),
        }
    }

    fn nanos(epoch: Instant, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The weight an old value keeps after `elapsed_ns`.
    fn keep(&self, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        (-elapsed / self.decay_ns).exp()
    }

    /// The estimate in nanoseconds at `now`, decayed for the time since the last sample.
    pub(crate) fn estimate(&self, now: Instant) -> f64 {
        let estimate = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        estimate * self.keep(Self::nanos(self.epoch, now))
    }

    /// Now, as a request's start stamp: nanoseconds since the epoch (one word, cheaper to
    /// carry than an `Instant`).
    pub(crate) fn stamp(&self) -> u64 {
        Self::nanos(self.epoch, Instant::now())
    }

    /// Records the response time of a request [stamped](Self::stamp) `started`.
    pub(crate) fn observe_since(&self, started: u64) {
        let now = self.stamp();
        self.record(now.saturating_sub(started) as f64, now);
    }

    /// Records a response time.
    #[cfg(test)]
    fn observe(&self, rtt: Duration, now: Instant) {
        self.record(rtt.as_nanos() as f64, Self::nanos(self.epoch, now));
    }

    /// Records a response time of `rtt` nanoseconds, ending `now` (on the latency clock).
    fn record(&self, rtt: f64, now: u64) {
        let previous = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let next = if rtt > previous {
            rtt
        } else {
            let keep = self.keep(now);
            previous * keep + rtt * (1.0 - keep)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.stamp.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_jumps_up_and_decays_down() {
        let epoch = Instant::now();
        let at = |ns: u64| epoch + Duration::from_nanos(ns);
        let load = Load::new(
            Duration::from_millis(30),
            Duration::from_secs(10),
            epoch,
            epoch,
        );
        assert_eq!(load.estimate(at(0)), 30e6);

        // A slower sample replaces the estimate at once.
        load.observe(Duration::from_millis(100), at(1));
        assert_eq!(load.estimate(at(1)), 100e6);

        // A faster one is averaged in, weighted by the time since the last sample.
        load.observe(Duration::from_millis(10), at(10_000_000_001));
        let e = std::f64::consts::E;
        let expected = 100e6 / e + 10e6 * (1.0 - 1.0 / e);
        assert!((load.estimate(at(10_000_000_001)) - expected).abs() < 1.0);

        // Idle time decays it.
        assert!(load.estimate(at(20_000_000_001)) < expected / 2.0);
    }

    /// Catches a stamp that is not the current time, and a response time measured from
    /// anything but the stamp.
    #[tokio::test(start_paused = true)]
    async fn a_stamped_request_is_timed_from_its_stamp() {
        let _limit = tower_sd_testkit::time_limit(10);
        let epoch = Instant::now();
        let load = Load::new(
            Duration::from_millis(30),
            Duration::from_secs(10),
            epoch,
            epoch,
        );
        tokio::time::advance(Duration::from_millis(5)).await;
        let started = load.stamp();
        assert_eq!(started, 5_000_000);
        tokio::time::advance(Duration::from_millis(70)).await;
        load.observe_since(started);
        // 70 ms is above the 30 ms estimate, so it replaces it exactly.
        assert_eq!(load.estimate(Instant::now()), 70e6);
    }
}
