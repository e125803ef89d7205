//! Power of two choices: sample two distinct endpoints at random and take the less loaded.
//!
//! Mitzenmacher showed that choosing the better of two random candidates cuts the maximum
//! load exponentially compared with one random choice, while costing two samples whatever
//! the number of endpoints ("The Power of Two Choices in Randomized Load Balancing", 2001).
//! Finagle and tower balance this way; this module does it without locks, on an immutable
//! snapshot, with a per-thread RNG.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::endpoint::Endpoint;
use super::outlier::{Detector, Usable};

thread_local! {
    // `const` keeps the access a plain TLS load; the seed is drawn on first use.
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A per-thread seed from std's randomly keyed hasher.
#[cold]
fn seed() -> u64 {
    RandomState::new().hash_one(std::thread::current().id()) | 1
}

/// wyrand: one multiply per number, good statistical quality, no shared state.
#[inline]
fn next_u64() -> u64 {
    RNG.with(|state| {
        let mut s = state.get();
        if s == 0 {
            s = seed();
        }
        let s = s.wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A uniform index in `0..n` by multiply-shift (no division; bias below 2^-32 * n).
#[inline]
fn below(r: u32, n: usize) -> usize {
    ((u64::from(r) * n as u64) >> 32) as usize
}

/// Two distinct uniform indices in `0..n`, `n >= 2`.
#[inline]
pub(crate) fn pair(n: usize) -> (usize, usize) {
    debug_assert!(n >= 2);
    let r = next_u64();
    let a = below(r as u32, n);
    let b = below((r >> 32) as u32, n - 1);
    (a, if b >= a { b + 1 } else { b })
}

/// How the pick compares two endpoints.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cost {
    /// In flight / weight.
    Pending,
    /// Peak EWMA x (in flight + 1) / weight, at `now`.
    PeakEwma { now: Instant },
}

impl Cost {
    /// Whether `a` is at most as loaded as `b`.
    #[inline]
    fn prefers<S, K>(self, a: &Endpoint<S, K>, b: &Endpoint<S, K>) -> bool {
        match self {
            Self::Pending => {
                // Cross-multiplied to compare in_flight/weight without division.
                u128::from(a.in_flight()) * u128::from(b.weight)
                    <= u128::from(b.in_flight()) * u128::from(a.weight)
            }
            Self::PeakEwma { now } => {
                let cost = |e: &Endpoint<S, K>| {
                    let estimate = e.ewma.as_ref().map_or(0.0, |l| l.estimate(now));
                    estimate * (e.in_flight() + 1) as f64 / e.weight as f64
                };
                cost(a) <= cost(b)
            }
        }
    }
}

/// Random draws before giving up on finding two usable endpoints by sampling.
const DRAWS: usize = 4;

/// The outcome of a pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pick {
    /// This index of the snapshot.
    Endpoint(usize),
    /// The snapshot is empty.
    Empty,
    /// Too few endpoints are usable and the panic mode is to fail.
    Panic,
}

/// What constrains a pick beyond load: outlier ejection, the panic threshold, slow start and
/// zone preference.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules<'a> {
    pub(crate) detector: Option<&'a Detector>,
    /// Below this percentage of usable endpoints, ejections are ignored (or the pick fails).
    pub(crate) panic_threshold: u8,
    pub(crate) fail_in_panic: bool,
    /// Ramp-up time of new endpoints, with the current time.
    pub(crate) slow_start: Option<(Duration, Instant)>,
}

/// Picks an endpoint among `candidates` (indices into `endpoints`).
///
/// The fast path samples two distinct candidates and compares their loads; it touches no
/// clock and no shared counter. Anything unusual (a failed or ejected candidate) takes the
/// cold path, which applies the panic threshold, claims probes, and scans for usable
/// endpoints when sampling keeps hitting unusable ones.
#[inline]
pub(crate) fn pick<S, K>(
    endpoints: &[Arc<Endpoint<S, K>>],
    candidates: Candidates<'_>,
    cost: Cost,
    rules: &Rules<'_>,
) -> Pick {
    let n = candidates.len(endpoints);
    if n == 0 {
        return Pick::Empty;
    }
    if n >= 2 {
        let (a, b) = pair(n);
        let (a, b) = (candidates.at(a), candidates.at(b));
        let (ea, eb) = (&endpoints[a], &endpoints[b]);
        if plainly_usable(ea) && plainly_usable(eb) {
            return Pick::Endpoint(choose(endpoints, a, b, cost, rules));
        }
    } else if plainly_usable(&endpoints[candidates.at(0)]) {
        return Pick::Endpoint(candidates.at(0));
    }
    pick_unusual(endpoints, candidates, cost, rules)
}

#[inline]
fn plainly_usable<S, K>(endpoint: &Endpoint<S, K>) -> bool {
    !endpoint.is_failed() && !endpoint.health.is_ejected()
}

/// The less loaded of two usable endpoints, with slow start applied.
#[inline]
fn choose<S, K>(
    endpoints: &[Arc<Endpoint<S, K>>],
    a: usize,
    b: usize,
    cost: Cost,
    rules: &Rules<'_>,
) -> usize {
    let (mut win, mut lose) = if cost.prefers(&endpoints[a], &endpoints[b]) {
        (a, b)
    } else {
        (b, a)
    };
    if let Some((window, now)) = rules.slow_start {
        // A young winner keeps the request only with probability age / window, so its share
        // ramps up over the window instead of jumping to full (it has no load yet).
        let age = now.saturating_duration_since(endpoints[win].inserted);
        if age < window {
            let ramp = age.as_secs_f64() / window.as_secs_f64();
            if (next_u64() >> 11) as f64 / (1u64 << 53) as f64 >= ramp {
                std::mem::swap(&mut win, &mut lose);
            }
        }
    }
    win
}

/// Which endpoints a pick may choose from: all of them, or a subset (the local zone).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Candidates<'a> {
    All,
    Only(&'a [usize]),
}

impl Candidates<'_> {
    #[inline]
    fn len<T>(&self, endpoints: &[T]) -> usize {
        match self {
            Self::All => endpoints.len(),
            Self::Only(indices) => indices.len(),
        }
    }

    #[inline]
    fn at(&self, i: usize) -> usize {
        match self {
            Self::All => i,
            Self::Only(indices) => indices[i],
        }
    }
}

#[cold]
fn pick_unusual<S, K>(
    endpoints: &[Arc<Endpoint<S, K>>],
    candidates: Candidates<'_>,
    cost: Cost,
    rules: &Rules<'_>,
) -> Pick {
    let n = candidates.len(endpoints);
    let now = rules.detector.map_or(0, Detector::now);
    let mut respect_ejection = true;
    if let Some(detector) = rules.detector {
        let total = endpoints.len();
        let ejected = detector.ejected.load(Ordering::Relaxed).min(total);
        if (total - ejected) * 100 < usize::from(rules.panic_threshold) * total {
            if rules.fail_in_panic {
                return Pick::Panic;
            }
            // Envoy's panic mode: too few are healthy, so balance across all of them.
            respect_ejection = false;
            #[cfg(feature = "metrics")]
            super::metrics::panic_pick(&detector.service);
        }
    }
    // Whether an endpoint may take this request; claims the probe of an ejection that ended.
    let take = |i: usize| -> bool {
        let endpoint = &endpoints[i];
        if endpoint.is_failed() {
            return false;
        }
        if !respect_ejection {
            return true;
        }
        match endpoint.health.usable(now) {
            Usable::Yes => true,
            Usable::Probe => endpoint.health.claim_probe(),
            Usable::No => false,
        }
    };
    let usable = |i: usize| {
        let endpoint = &endpoints[i];
        !endpoint.is_failed() && (!respect_ejection || endpoint.health.usable(now) != Usable::No)
    };
    if n >= 2 {
        for _ in 0..DRAWS {
            let (a, b) = pair(n);
            let (a, b) = (candidates.at(a), candidates.at(b));
            match (usable(a), usable(b)) {
                (true, true) => {
                    let win = choose(endpoints, a, b, cost, rules);
                    let lose = if win == a { b } else { a };
                    if take(win) {
                        return Pick::Endpoint(win);
                    }
                    if take(lose) {
                        return Pick::Endpoint(lose);
                    }
                }
                (true, false) if take(a) => return Pick::Endpoint(a),
                (false, true) if take(b) => return Pick::Endpoint(b),
                _ => {}
            }
        }
    }
    let start = below(next_u64() as u32, n);
    let mut scan = (0..n)
        .map(|i| candidates.at((start + i) % n))
        .filter(|&i| usable(i));
    match (scan.next(), scan.next()) {
        (Some(a), Some(b)) => {
            let win = choose(endpoints, a, b, cost, rules);
            let lose = if win == a { b } else { a };
            if take(win) {
                Pick::Endpoint(win)
            } else if take(lose) {
                Pick::Endpoint(lose)
            } else {
                Pick::Endpoint(candidates.at(start))
            }
        }
        (Some(a), None) if take(a) => Pick::Endpoint(a),
        // Nothing usable: let the endpoint's own readiness decide.
        _ => Pick::Endpoint(candidates.at(start)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_000))]

        #[test]
        fn pair_is_distinct_and_in_range(n in 2usize..100_000) {
            for _ in 0..16 {
                let (a, b) = pair(n);
                prop_assert!(a < n && b < n && a != b);
            }
        }
    }

    #[test]
    fn pair_is_roughly_uniform() {
        let n = 8;
        let mut counts = [0u32; 8];
        for _ in 0..80_000 {
            let (a, b) = pair(n);
            counts[a] += 1;
            counts[b] += 1;
        }
        for count in counts {
            assert!((18_000..22_000).contains(&count), "{counts:?}");
        }
    }
}
