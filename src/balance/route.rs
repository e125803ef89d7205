//! Where a pick draws from: a priority tier (by the tiers' shares, `tier.rs`), then within
//! it the local zone's endpoints while enough of them are usable (zone preference).
//!
//! With one tier, the pick goes straight to it: no shares, no clock, no scan.

use std::sync::atomic::Ordering;

use super::p2c::next_u64;
use super::pool::{Pool, below};
use super::snapshot::{Shared, Snapshot};
use super::tier::{self, Tier, TierShare};

/// What a pick draws from: a pool, and whether its tier is in panic (`None`: one tier, so
/// the pick decides panic from the balancer's ejection count, as without tiers).
pub(crate) struct Choice<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) panic: Option<bool>,
}

/// The pool this pick draws from: the only tier's, or one drawn by the tiers' shares.
#[inline]
pub(crate) fn choose<'a, S, K>(snapshot: &'a Snapshot<S, K>, shared: &Shared<S, K>) -> Choice<'a> {
    let tiers = &snapshot.tiers;
    if tiers.len() == 1 {
        return Choice {
            pool: zone(&tiers[0], snapshot, shared),
            panic: None,
        };
    }
    choose_tier(snapshot, shared)
}

#[cold]
fn choose_tier<'a, S, K>(snapshot: &'a Snapshot<S, K>, shared: &Shared<S, K>) -> Choice<'a> {
    refresh(snapshot, shared);
    let draw = below(next_u64() as u32, 100);
    let mut sum = 0;
    // The shares add up to 100, unless a picker is storing new ones right now: then the
    // best tier.
    let (chosen, share) = snapshot
        .shares
        .each()
        .enumerate()
        .find(|&(_, share)| {
            sum += usize::from(tier::percent(share));
            draw < sum
        })
        .unwrap_or((0, 0));
    Choice {
        pool: zone(&snapshot.tiers[chosen], snapshot, shared),
        panic: Some(tier::in_panic(share)),
    }
}

/// Makes the snapshot's tier shares those of the balancer's health now: recomputed (and
/// reported) only when it changed.
fn refresh<S, K>(snapshot: &Snapshot<S, K>, shared: &Shared<S, K>) {
    let computed = snapshot.shares.refresh(
        health_changes(shared),
        &snapshot.tiers,
        &snapshot.slots,
        shared.config.panic_threshold,
    );
    for (tier, (percent, _)) in snapshot.tiers.iter().zip(computed.into_iter().flatten()) {
        crate::metrics::tier_share(&shared.config.service, tier.priority, percent);
    }
}

/// The balancer's count of changes to its endpoints' health (readiness, failures,
/// ejections), plus one so that it is never the "not computed" 0.
fn health_changes<S, K>(shared: &Shared<S, K>) -> u64 {
    let readiness = shared.published.changes.load(Ordering::Acquire);
    let failures = shared.tally.changes.load(Ordering::Acquire);
    let ejections = shared
        .detector
        .as_ref()
        .map_or(0, |detector| detector.changes.load(Ordering::Acquire));
    readiness
        .wrapping_add(failures)
        .wrapping_add(ejections)
        .wrapping_add(1)
        .max(1)
}

/// The local zone's pool of `tier` while it has enough usable endpoints, else all of the
/// tier's. Counting the usable ones scans the zone only while some endpoint is failed or
/// ejected.
#[inline]
fn zone<'a, S, K>(tier: &'a Tier, snapshot: &Snapshot<S, K>, shared: &Shared<S, K>) -> &'a Pool {
    let (Some(zone), Some(local)) = (&shared.config.zone, &tier.local) else {
        return &tier.all;
    };
    let ejected = shared
        .detector
        .as_ref()
        .is_some_and(|detector| detector.ejected.load(Ordering::Relaxed) > 0);
    let usable = if ejected || shared.tally.failed.load(Ordering::Relaxed) > 0 {
        (0..local.len())
            .filter(|&i| snapshot.slots[local.at(i)].plainly_usable())
            .count()
    } else {
        local.len()
    };
    let share = (tier.all.len() * usize::from(zone.min_share_percent)).div_ceil(100);
    if usable >= zone.min_endpoints.max(share).max(1) {
        local
    } else {
        &tier.all
    }
}

/// The current share of each tier, best first, for [`Balance::tiers`](super::Balance::tiers).
pub(crate) fn report<S, K>(snapshot: &Snapshot<S, K>, shared: &Shared<S, K>) -> Vec<TierShare> {
    let shares: Vec<u8> = if snapshot.tiers.len() == 1 {
        vec![100]
    } else {
        refresh(snapshot, shared);
        snapshot.shares.each().collect()
    };
    snapshot
        .tiers
        .iter()
        .zip(shares)
        .map(|(tier, share)| TierShare {
            priority: tier.priority,
            endpoints: tier.all.len(),
            percent: tier::percent(share),
            panic: tier::in_panic(share),
        })
        .collect()
}
