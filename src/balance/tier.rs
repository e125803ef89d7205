//! Priority tiers: the endpoints of each priority, and the share of traffic each takes.
//!
//! Endpoints carry a priority (0 is the most preferred); each distinct priority is a tier.
//! Traffic goes by Envoy's rule for priority levels: a tier's *health* is the share of its
//! endpoints that are healthy (pickable, not failed, not ejected) times the overprovisioning
//! factor 1.4, capped at 100%; the best tier takes its health's worth of traffic, the next
//! takes its own health's worth of what is left, and so on. So a tier with at least 72% of
//! its endpoints healthy takes everything, and below that traffic spills to the next tier
//! gradually, not all at once. When the tiers' health adds up to less than 100%, each
//! takes its health's share of the sum; when no tier has a healthy endpoint, the best tier
//! takes everything. A tier is in *panic* (its ejections ignored, or the pick failing with
//! [`PanicMode::Fail`](super::PanicMode::Fail)) only when the health of all tiers adds up
//! to less than 100% and its own healthy share is below the panic threshold, as in Envoy.
//!
//! Computing the shares scans every endpoint, so a snapshot keeps them ([`Shares`]), with
//! the count of health changes they were computed at; `route.rs` draws a tier from them.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::pool::Pool;
use super::slot::Slot;

/// Envoy's default overprovisioning factor, in percent.
const OVERPROVISIONING: usize = 140;
/// The bit of a share that says its tier is in panic.
const PANIC: u8 = 0x80;

/// The endpoints of one priority, with the local zone's among them.
pub(crate) struct Tier {
    pub(crate) priority: u16,
    pub(crate) all: Pool,
    /// Its endpoints in the local zone, with zone preference.
    pub(crate) local: Option<Pool>,
}

/// The share of traffic each tier takes, kept with the health changes it was computed at.
pub(crate) struct Shares {
    /// The balancer's count of health changes when the shares were computed, plus one; 0
    /// before the first computation.
    seen: AtomicU64,
    /// Per tier: the percentage it takes, and [`PANIC`].
    each: Box<[AtomicU8]>,
}

impl Shares {
    pub(crate) fn new(tiers: usize) -> Self {
        Self {
            seen: AtomicU64::new(0),
            each: (0..tiers).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// Makes the shares those of `changes`, the balancer's count of health changes: keeps
    /// them if they are, else computes them from `slots` and returns them, for the caller
    /// to report.
    pub(crate) fn refresh<S, K>(
        &self,
        changes: u64,
        tiers: &[Tier],
        slots: &[Slot<S, K>],
        panic_threshold: u8,
    ) -> Option<Vec<(u8, bool)>> {
        let mut computed = None;
        if self.seen.load(Ordering::Acquire) != changes {
            let healthy: Vec<(usize, usize)> = tiers
                .iter()
                .map(|tier| {
                    let pool = &tier.all;
                    let healthy = (0..pool.len())
                        .filter(|&i| slots[pool.at(i)].is_healthy())
                        .count();
                    (healthy, pool.len())
                })
                .collect();
            let fresh = shares(&healthy, panic_threshold);
            for (cell, &(share, panic)) in self.each.iter().zip(&fresh) {
                cell.store(share | if panic { PANIC } else { 0 }, Ordering::Relaxed);
            }
            self.seen.store(changes, Ordering::Release);
            computed = Some(fresh);
        }
        computed
    }

    /// Each tier's kept share: a percentage, with [`PANIC`] when in panic.
    pub(crate) fn each(&self) -> impl Iterator<Item = u8> + '_ {
        self.each.iter().map(|cell| cell.load(Ordering::Relaxed))
    }
}

/// The percentage in a kept share.
pub(crate) fn percent(share: u8) -> u8 {
    share & !PANIC
}

/// Whether a kept share says its tier is in panic.
pub(crate) fn in_panic(share: u8) -> bool {
    share & PANIC != 0
}

/// Envoy's priority load: from each tier's (healthy, total) endpoints, the percentage of
/// traffic it takes and whether it is in panic. The percentages add up to 100.
pub(crate) fn shares(tiers: &[(usize, usize)], panic_threshold: u8) -> Vec<(u8, bool)> {
    let health: Vec<usize> = tiers
        .iter()
        .map(|&(healthy, total)| (OVERPROVISIONING * healthy / total.max(1)).min(100))
        .collect();
    let total_health = health.iter().sum::<usize>().min(100);
    let in_panic = |&(healthy, total): &(usize, usize)| {
        total_health < 100 && healthy * 100 < usize::from(panic_threshold) * total
    };
    let mut shares: Vec<(u8, bool)> = tiers.iter().map(|t| (0, in_panic(t))).collect();
    if total_health == 0 {
        shares[0].0 = 100;
        return shares;
    }
    let mut left = 100;
    for (share, health) in shares.iter_mut().zip(&health) {
        let take = (health * 100 / total_health).min(left);
        share.0 = take as u8;
        left -= take;
    }
    // Rounding: what is left goes to the best tier that has health.
    if let Some(first) = health.iter().position(|&h| h > 0) {
        shares[first].0 += left as u8;
    }
    shares
}

/// One priority tier as [`Balance::tiers`](super::Balance::tiers) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierShare {
    /// The priority of its endpoints (lower is preferred).
    pub priority: u16,
    /// Its endpoints.
    pub endpoints: usize,
    /// The percentage of picks that go to it.
    pub percent: u8,
    /// Whether it is in panic: its ejections are ignored (or, with
    /// [`PanicMode::Fail`](super::PanicMode::Fail), its picks fail).
    pub panic: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percents(tiers: &[(usize, usize)]) -> Vec<u8> {
        shares(tiers, 50).into_iter().map(|(p, _)| p).collect()
    }

    /// Envoy's documented examples (its "Priority levels" page: overprovisioning 1.4),
    /// which catch a rule without the factor (spilling as soon as one endpoint fails), one
    /// that spills all at once, and one whose shares do not add up to 100.
    #[test]
    fn shares_follow_envoys_table() {
        assert_eq!(percents(&[(10, 10), (10, 10)]), [100, 0]);
        assert_eq!(percents(&[(72, 100), (100, 100)]), [100, 0]);
        assert_eq!(percents(&[(71, 100), (100, 100)]), [99, 1]);
        assert_eq!(percents(&[(50, 100), (100, 100)]), [70, 30]);
        assert_eq!(percents(&[(25, 100), (100, 100)]), [35, 65]);
        assert_eq!(percents(&[(25, 100), (25, 100), (100, 100)]), [35, 35, 30]);
        assert_eq!(percents(&[(0, 100), (0, 100), (100, 100)]), [0, 0, 100]);
        // Health adding up to less than 100: shares in proportion to it (Envoy's
        // "normalized total availability"), 20% and 30% of 1.4 each.
        assert_eq!(percents(&[(20, 100), (30, 100)]), [40, 60]);
        // No tier has a healthy endpoint: the best takes everything.
        assert_eq!(percents(&[(0, 4), (0, 4)]), [100, 0]);
    }

    /// Catches panic decided per tier without looking at the whole (a tier below the
    /// threshold while the others make up for it would balance over its ejected endpoints)
    /// and panic that ignores the threshold.
    #[test]
    fn a_tier_panics_only_when_all_tiers_together_are_short() {
        let panics = |tiers: &[(usize, usize)]| -> Vec<bool> {
            shares(tiers, 50).into_iter().map(|(_, p)| p).collect()
        };
        assert_eq!(panics(&[(30, 100), (100, 100)]), [false, false]);
        assert_eq!(panics(&[(30, 100), (30, 100)]), [true, true]);
        assert_eq!(panics(&[(10, 100), (60, 100)]), [true, false]);
        assert_eq!(panics(&[(0, 4), (0, 4)]), [true, true]);
    }

    /// The shares always add up to 100 and never favour a worse tier that is no healthier.
    #[test]
    fn shares_add_up_to_100() {
        for a in 0..=10 {
            for b in 0..=10 {
                for c in 0..=10 {
                    let got = percents(&[(a, 10), (b, 10), (c, 10)]);
                    let sum: u32 = got.iter().map(|&p| u32::from(p)).sum();
                    assert_eq!(sum, 100, "{a} {b} {c}: {got:?}");
                    if a >= 8 {
                        assert_eq!(got[0], 100, "{a} {b} {c}: {got:?}");
                    }
                }
            }
        }
    }
}
