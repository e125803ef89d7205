//! Exponential backoff with full jitter, shared by every backend's retry loop.
//!
//! Each failure doubles the ceiling (from `base` up to `max`) and the wait is drawn uniformly
//! from `[0, ceiling]` ("full jitter", AWS Architecture Blog, 2015), so many clients failing
//! together do not retry in lockstep. A success resets it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

/// Exponential backoff with full jitter.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
    /// Draws so far, never reset, so the jitter does not repeat after a reset.
    draws: u64,
    random: RandomState,
}

impl Backoff {
    /// Starts at `base` and never waits longer than `max`.
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
            draws: 0,
            random: RandomState::new(),
        }
    }

    /// The ceiling for the next wait: `base x 2^failures`, capped at `max`.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait after one more failure: uniform in `[0, ceiling]`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        self.draws = self.draws.wrapping_add(1);
        ceiling.mul_f64(unit(&self.random, self.draws))
    }

    /// Failures since the last reset.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Back to `base` after a success.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in `[0, 1)` drawn from `random` for the `n`-th draw.
fn unit(random: &RandomState, n: u64) -> f64 {
    (random.hash_one(n) >> 11) as f64 / (1u64 << 53) as f64
}

/// A number drawn uniformly from `[0, 1)`, for a one-off jittered wait.
#[cfg(feature = "_connections")]
pub(crate) fn unit_draw() -> f64 {
    unit(&RandomState::new(), 0)
}

/// A wait drawn uniformly from `[ceiling / 2, ceiling]` ("equal jitter"): for one pause that
/// must not be cut to nothing, where [`Backoff`]'s full jitter may draw zero.
#[cfg_attr(
    not(any(feature = "tonic", feature = "http", feature = "consul")),
    allow(dead_code)
)]
pub(crate) fn equal_jitter(ceiling: Duration) -> Duration {
    let half = ceiling / 2;
    half + half.mul_f64(unit(&RandomState::new(), 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_jitter_keeps_to_the_upper_half() {
        let ceiling = Duration::from_millis(8);
        let draws: Vec<Duration> = (0..200).map(|_| equal_jitter(ceiling)).collect();
        assert!(
            draws.iter().all(|d| (ceiling / 2..=ceiling).contains(d)),
            "{draws:?}"
        );
        assert!(draws.iter().any(|d| *d != draws[0]), "jittered: {draws:?}");
    }

    #[test]
    fn ceiling_doubles_up_to_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<u64> = (0..6)
            .map(|_| {
                let ceiling = backoff.ceiling();
                let delay = backoff.next_delay();
                assert!(delay <= ceiling);
                ceiling.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_jittered() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
