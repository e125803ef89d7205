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

use super::endpoint::Endpoint;

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
fn below(r: u32, n: usize) -> usize {
    ((u64::from(r) * n as u64) >> 32) as usize
}

/// Two distinct uniform indices in `0..n`, `n >= 2`.
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
    PeakEwma { now: tokio::time::Instant },
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

/// Picks an endpoint, or `None` when there are none.
///
/// Failed endpoints are avoided: a failed candidate loses to a usable one; when many are
/// failed and sampling keeps hitting them, a scan from a random offset finds the usable ones.
/// When every endpoint is failed, one is picked at random, so its `poll_ready` decides.
#[inline]
pub(crate) fn pick<S, K>(endpoints: &[Arc<Endpoint<S, K>>], cost: Cost) -> Option<usize> {
    match endpoints.len() {
        0 => None,
        1 => Some(0),
        n => {
            let (a, b) = pair(n);
            let (ea, eb) = (&endpoints[a], &endpoints[b]);
            if !ea.is_failed() && !eb.is_failed() {
                return Some(if cost.prefers(ea, eb) { a } else { b });
            }
            Some(pick_avoiding_failed(endpoints, cost))
        }
    }
}

#[cold]
fn pick_avoiding_failed<S, K>(endpoints: &[Arc<Endpoint<S, K>>], cost: Cost) -> usize {
    let n = endpoints.len();
    for _ in 0..DRAWS {
        let (a, b) = pair(n);
        let (ea, eb) = (&endpoints[a], &endpoints[b]);
        match (ea.is_failed(), eb.is_failed()) {
            (false, false) => return if cost.prefers(ea, eb) { a } else { b },
            (false, true) => return a,
            (true, false) => return b,
            (true, true) => {}
        }
    }
    let start = below(next_u64() as u32, n);
    let mut usable = (0..n)
        .map(|i| (start + i) % n)
        .filter(|&i| !endpoints[i].is_failed());
    match (usable.next(), usable.next()) {
        (Some(a), Some(b)) => {
            if cost.prefers(&endpoints[a], &endpoints[b]) {
                a
            } else {
                b
            }
        }
        (Some(a), None) => a,
        _ => start,
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
