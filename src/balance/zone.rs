//! Zone preference: the pool a pick draws from, the local zone's while it has enough
//! usable endpoints.

use std::sync::atomic::Ordering;

use super::snapshot::{Pool, Shared, Snapshot};

/// The local zone's pool while it has enough usable endpoints, else all of them. Counting
/// the usable ones scans the zone only while some endpoint is failed or ejected.
#[inline]
pub(super) fn pool<'a, S, K>(snapshot: &'a Snapshot<S, K>, shared: &Shared<S, K>) -> &'a Pool {
    let (Some(zone), Some(local)) = (&shared.config.zone, &snapshot.local) else {
        return &snapshot.all;
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
    let share = (snapshot.slots.len() * usize::from(zone.min_share_percent)).div_ceil(100);
    if usable >= zone.min_endpoints.max(share).max(1) {
        local
    } else {
        &snapshot.all
    }
}
