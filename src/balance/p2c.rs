//! Power of two choices: draw two distinct endpoints at random and take the less loaded.
//!
//! Mitzenmacher showed that choosing the better of two random candidates cuts the maximum
//! load exponentially compared with one random choice, while costing two samples whatever
//! the number of endpoints ("The Power of Two Choices in Randomized Load Balancing", 2001).
//! Finagle and tower balance this way; this module does it without locks, on an immutable
//! snapshot, with a per-thread RNG.
//!
//! # Weights
//!
//! With equal weights both candidates are drawn uniformly and the less loaded wins (ties go
//! to the first), exactly as in tower's P2C. When weights differ, comparing load per weight
//! alone does not make shares follow weights: idle endpoints all have load 0, so the first
//! candidate wins whatever its weight. So here both candidates are drawn in proportion to
//! their weights (an alias table built once per snapshot), the first is kept on ties, and the
//! second takes the request only if it is less loaded per weight than the first by a random
//! quarter to whole request. With equal latencies, shares then follow weights whether
//! traffic is sequential, lightly concurrent or heavily concurrent; a loaded or slow endpoint
//! still sheds its traffic.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use tokio::time::Instant;

use super::config::{Config, PanicMode};
use super::outlier::Detector;
use super::pool::{Pool, below};
use super::slot::Slot;

thread_local! {
    // `const` keeps the access a plain TLS load; the seed is drawn on first use.
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A per-thread seed from std's randomly keyed hasher.
#[cold]
fn seed() -> u64 {
    RandomState::new().hash_one(std::thread::current().id())
}

/// One step of wyrand (final v4.2 constants, as fastrand uses): one multiply per number,
/// good statistical quality.
#[inline]
fn wyrand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x2d35_8dcc_aa6c_78a5);
    let t = u128::from(*state) * u128::from(*state ^ 0x8bb8_4b93_962e_acc9);
    ((t >> 64) as u64) ^ (t as u64)
}

/// The next number of this thread's wyrand stream: no shared state, seeded on first use
/// (a state of 0 means "not yet").
#[inline]
pub(crate) fn next_u64() -> u64 {
    RNG.with(|cell| {
        let mut state = cell.get();
        if state == 0 {
            state = seed();
        }
        let number = wyrand(&mut state);
        cell.set(state);
        number
    })
}

/// Two distinct uniform positions in `0..n`, `n >= 2`.
#[inline]
pub(crate) fn pair(n: usize) -> (usize, usize) {
    debug_assert!(n >= 2);
    let r = next_u64();
    let a = below(r as u32, n);
    let b = below((r >> 32) as u32, n - 1);
    (a, if b >= a { b + 1 } else { b })
}

/// Two distinct positions of `pool`, `len >= 2`: uniform, or in proportion to weight.
#[inline]
fn candidates(pool: &Pool) -> (usize, usize) {
    if !pool.is_weighted() {
        return pair(pool.len());
    }
    weighted_pair(pool)
}

/// The first candidate in proportion to weight; the second too, among the others (two
/// draws, then uniform among the others, so a dominant weight cannot loop).
#[cold]
fn weighted_pair(pool: &Pool) -> (usize, usize) {
    let n = pool.len();
    let a = pool.weighted(next_u64());
    for _ in 0..2 {
        let b = pool.weighted(next_u64());
        if b != a {
            return (a, b);
        }
    }
    let b = below(next_u64() as u32, n - 1);
    (a, if b >= a { b + 1 } else { b })
}

/// How the pick compares two endpoints.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cost {
    /// In flight / weight.
    Pending,
    /// Peak EWMA x (1 + in flight / weight), at `now`: with weight 1, tower's and Finagle's
    /// peak EWMA x (in flight + 1).
    PeakEwma { now: Instant },
}

impl Cost {
    /// Whether `b` should take the request from `a`, of the same weight: strictly less
    /// loaded.
    #[inline]
    fn prefers_second<S, K>(self, a: &Slot<S, K>, b: &Slot<S, K>) -> bool {
        match self {
            Self::Pending => b.in_flight() < a.in_flight(),
            Self::PeakEwma { now } => {
                let cost = |e: &Slot<S, K>| {
                    let estimate = e.ewma.as_ref().map_or(0.0, |l| l.estimate(now));
                    estimate * (e.in_flight() + 1) as f64
                };
                cost(b) < cost(a)
            }
        }
    }

    /// Whether `b` should take the request from `a` when weights differ; `margin` is how
    /// much less loaded per weight `b` must be, in sixteenths of a request.
    #[inline]
    fn prefers_second_weighted<S, K>(self, a: &Slot<S, K>, b: &Slot<S, K>, margin: u64) -> bool {
        let (la, lb) = (u128::from(a.in_flight()), u128::from(b.in_flight()));
        let (wa, wb) = (u128::from(a.weight), u128::from(b.weight));
        let margin = u128::from(margin);
        match self {
            // Cross-multiplied: (16 lb + margin) / 16 wb < la / wa, without division.
            Self::Pending => (16 * lb + margin) * wa < 16 * la * wb,
            Self::PeakEwma { now } => {
                let estimate = |e: &Slot<S, K>| e.ewma.as_ref().map_or(0.0, |l| l.estimate(now));
                let cost = |estimate: f64, load: u128, weight: u128| {
                    estimate * (weight * 16 + load) as f64 / (weight * 16) as f64
                };
                cost(estimate(b), 16 * lb + margin, wb) < cost(estimate(a), 16 * la, wa)
            }
        }
    }
}

/// A random margin of 4 to 15 sixteenths of a request (see the module docs).
#[inline]
fn margin() -> u64 {
    4 + (((next_u64() & 0xffff) * 12) >> 16)
}

/// The outcome of a pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pick {
    /// This index of the snapshot; `probe` when the request is the endpoint's outlier probe.
    Endpoint { index: usize, probe: bool },
    /// The snapshot is empty.
    Empty,
    /// Every endpoint's owner says it is not ready (connecting, or failing to connect).
    NotReady,
    /// Too few endpoints are usable and the panic mode is to fail.
    Panic,
}

/// What constrains a pick beyond load: outlier ejection, the panic threshold and slow start
/// (two references, so that a pick copies nothing it does not read).
#[derive(Clone, Copy)]
pub(crate) struct Rules<'a> {
    pub(crate) detector: Option<&'a Detector>,
    /// The panic threshold and mode, and the slow-start window.
    pub(crate) config: &'a Config,
    /// Whether the pool's tier is in panic, when it has tiers; `None`: decided from the
    /// balancer's ejection count against the threshold.
    pub(crate) panic: Option<bool>,
}

/// Random draws before giving up on finding two usable endpoints by sampling.
const DRAWS: usize = 4;

/// Picks an endpoint of `pool` (whose positions index `slots`).
///
/// The fast path draws two candidates and compares their loads; it touches no clock and no
/// shared counter. An outlier probe that is due goes first; anything unusual (a failed or
/// ejected candidate) takes the cold path, which applies the panic threshold and scans for
/// usable endpoints when sampling keeps hitting unusable ones.
#[inline]
pub(crate) fn pick<S, K>(slots: &[Slot<S, K>], pool: &Pool, cost: Cost, rules: &Rules<'_>) -> Pick {
    let n = pool.len();
    if n == 0 {
        return Pick::Empty;
    }
    if let Some(index) = rules
        .detector
        .and_then(|detector| due_probe(slots, detector))
    {
        return Pick::Endpoint { index, probe: true };
    }
    if n >= 2 {
        let (a, b) = candidates(pool);
        let (a, b) = (pool.at(a), pool.at(b));
        if slots[a].plainly_usable() && slots[b].plainly_usable() {
            let index = choose(slots, a, b, pool.is_weighted(), cost, rules);
            return Pick::Endpoint {
                index,
                probe: false,
            };
        }
    } else if slots[pool.at(0)].plainly_usable() {
        return Pick::Endpoint {
            index: pool.at(0),
            probe: false,
        };
    }
    pick_unusual(slots, pool, cost, rules)
}

/// An ejected endpoint whose probe is due, claimed for this request. The check costs one
/// load while something is ejected; the scan runs only when a probe is due.
#[inline]
fn due_probe<S, K>(slots: &[Slot<S, K>], detector: &Detector) -> Option<usize> {
    if detector.ejected.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        return None;
    }
    let now = detector.now();
    if !detector.probe_due(now) {
        return None;
    }
    claim_due_probe(slots, detector, now)
}

#[cold]
fn claim_due_probe<S, K>(slots: &[Slot<S, K>], detector: &Detector, now: u64) -> Option<usize> {
    detector.rescan();
    let mut claimed = None;
    for (index, slot) in slots.iter().enumerate() {
        // A failed endpoint is probed only once its readiness retry is due too.
        let ready = slot.is_pickable() && (!slot.is_failed() || slot.retry_due());
        if claimed.is_none() && ready && slot.health.claim_probe(now) {
            if slot.is_failed() {
                slot.defer_retry();
            }
            claimed = Some(index);
        } else {
            slot.health.schedule(detector);
        }
    }
    claimed
}

/// The less loaded of two usable endpoints, with slow start applied.
#[inline]
fn choose<S, K>(
    slots: &[Slot<S, K>],
    a: usize,
    b: usize,
    weighted: bool,
    cost: Cost,
    rules: &Rules<'_>,
) -> usize {
    let second = if weighted {
        cost.prefers_second_weighted(&slots[a], &slots[b], margin())
    } else {
        cost.prefers_second(&slots[a], &slots[b])
    };
    let (mut win, mut lose) = if second { (b, a) } else { (a, b) };
    if let Some(window) = rules.config.slow_start {
        // A young winner keeps the request only with probability age / window, so its share
        // ramps up over the window instead of jumping to full (it has no load yet).
        let age = Instant::now().saturating_duration_since(slots[win].inserted);
        if age < window {
            let ramp = age.as_secs_f64() / window.as_secs_f64();
            if (next_u64() >> 11) as f64 / (1u64 << 53) as f64 >= ramp {
                std::mem::swap(&mut win, &mut lose);
            }
        }
    }
    win
}

#[cold]
fn pick_unusual<S, K>(slots: &[Slot<S, K>], pool: &Pool, cost: Cost, rules: &Rules<'_>) -> Pick {
    let n = pool.len();
    let mut respect_ejection = true;
    if let Some(detector) = rules.detector {
        let total = slots.len();
        let panic = rules.panic.unwrap_or_else(|| {
            let ejected = detector
                .ejected
                .load(std::sync::atomic::Ordering::Relaxed)
                .min(total);
            (total - ejected) * 100 < usize::from(rules.config.panic_threshold) * total
        });
        if panic {
            if rules.config.panic_mode == PanicMode::Fail {
                return Pick::Panic;
            }
            // Envoy's panic mode: too few are healthy, so balance across all of them.
            respect_ejection = false;
            crate::metrics::panic_pick(&detector.service);
        }
    }
    // A failed endpoint whose retry is due counts as usable: the pick that takes it pushes
    // its next retry back, so it is tried again, not hammered.
    let usable = |i: usize| {
        let slot = &slots[i];
        slot.has_room()
            && (!slot.is_failed() || slot.retry_due())
            && (!respect_ejection || !slot.health.is_ejected())
    };
    let endpoint = |index: usize| {
        if slots[index].is_failed() {
            slots[index].defer_retry();
        }
        Pick::Endpoint {
            index,
            probe: false,
        }
    };
    if n >= 2 {
        for _ in 0..DRAWS {
            let (a, b) = candidates(pool);
            let (a, b) = (pool.at(a), pool.at(b));
            match (usable(a), usable(b)) {
                (true, true) => {
                    return endpoint(choose(slots, a, b, pool.is_weighted(), cost, rules));
                }
                (true, false) => return endpoint(a),
                (false, true) => return endpoint(b),
                (false, false) => {}
            }
        }
    }
    let start = below(next_u64() as u32, n);
    let mut scan = (0..n)
        .map(|i| pool.at((start + i) % n))
        .filter(|&i| usable(i));
    match (scan.next(), scan.next()) {
        (Some(a), Some(b)) => endpoint(choose(slots, a, b, pool.is_weighted(), cost, rules)),
        (Some(a), None) => endpoint(a),
        // Nothing usable: let the service's own readiness decide, for an endpoint whose owner
        // does not say it is unready (a saturated one queues the request for a stream:
        // the less loaded of two); when every owner says so, wait for one to be ready.
        (None, _) => {
            let mut pickable = (0..n)
                .map(|i| pool.at((start + i) % n))
                .filter(|&i| slots[i].is_pickable());
            match (pickable.next(), pickable.next()) {
                (Some(a), Some(b)) => {
                    endpoint(choose(slots, a, b, pool.is_weighted(), cost, rules))
                }
                (Some(a), None) => endpoint(a),
                (None, _) => Pick::NotReady,
            }
        }
    }
}

/// A plainly usable endpoint of `pool` that `avoided` does not rule out, the less loaded of
/// two such when there are two: a retry's pick, which passes over the instances its call
/// tried. `None` when every usable endpoint is ruled out.
#[cold]
pub(crate) fn pick_avoiding<S, K>(
    slots: &[Slot<S, K>],
    pool: &Pool,
    cost: Cost,
    rules: &Rules<'_>,
    avoided: impl Fn(&Slot<S, K>) -> bool,
) -> Option<usize> {
    let n = pool.len();
    let start = below(next_u64() as u32, n);
    let mut scan = (0..n)
        .map(|i| pool.at((start + i) % n))
        .filter(|&i| slots[i].plainly_usable() && !avoided(&slots[i]));
    match (scan.next(), scan.next()) {
        (Some(a), Some(b)) => Some(choose(slots, a, b, pool.is_weighted(), cost, rules)),
        (one, _) => one,
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

    /// Catches a fallback second candidate that can be the first again: when one weight
    /// dominates, both weighted draws land on it, and the endpoint would be compared with
    /// itself.
    #[test]
    fn a_weighted_pair_is_two_endpoints_when_one_weight_dominates() {
        for weights in [
            vec![1_000_000, 1],
            vec![1, 1_000_000],
            vec![1_000_000, 1, 1],
        ] {
            let pool = Pool::with_weights(weights.clone());
            for _ in 0..10_000 {
                let (a, b) = weighted_pair(&pool);
                assert!(
                    a != b && a < pool.len() && b < pool.len(),
                    "{weights:?}: ({a}, {b})"
                );
            }
        }
    }

    /// Catches a changed constant, shift or mix, and a stream re-seeded on every call:
    /// fastrand implements the same wyrand, so its numbers are the reference.
    #[test]
    fn the_stream_is_wyrand_from_its_seed() {
        for seed in [1, 42, u64::MAX] {
            RNG.with(|cell| cell.set(seed));
            let mut reference = fastrand::Rng::with_seed(seed);
            for _ in 0..3 {
                assert_eq!(next_u64(), reference.u64(..), "seed {seed}");
            }
        }
    }

    /// Catches one seed for every thread, whose balancers would then pick in lockstep.
    #[test]
    fn threads_draw_different_streams() {
        let firsts: std::collections::HashSet<u64> = (0..8)
            .map(|_| std::thread::spawn(next_u64))
            .map(|thread| thread.join().unwrap())
            .collect();
        assert_eq!(firsts.len(), 8);
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

    #[test]
    fn margins_are_a_quarter_to_almost_a_whole_request() {
        let mut seen = [false; 16];
        for _ in 0..10_000 {
            seen[margin() as usize] = true;
        }
        let seen: Vec<usize> = (0..16).filter(|&m| seen[m]).collect();
        assert_eq!(seen, (4..16).collect::<Vec<_>>());
    }
}
