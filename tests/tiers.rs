//! Priority tiers on paused time: the best tier while it is healthy, a gradual spill by
//! Envoy's rule as its health drops, and the way back.
//!
//! The wrong implementations these fail: a picker that ignores priorities (tier 1 gets half
//! the traffic), one that spills all at once when one endpoint fails (or never, until the
//! whole tier is down), shares that are never recomputed after a recovery, and panic applied
//! to a tier the others make up for.

use tower_sd_testkit as support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_sd::balance::{Balance, BalanceBuilder, OutlierDetection, PanicMode, TierShare};
use tower_sd::endpoint::{Connectivity, Endpoint, Readiness};

type Svc = BoxCloneSyncService<(), usize, Infallible>;

/// A balancer over endpoints of these priorities, each with a readiness the test sets.
async fn tiered(
    builder: BalanceBuilder,
    priorities: &[u16],
) -> (
    Balance<Svc, usize>,
    Vec<Readiness>,
    support::feed::Feed<usize, Svc>,
) {
    let (feed, fed) = support::feed::feed();
    let mut cells = Vec::new();
    for (id, &priority) in priorities.iter().enumerate() {
        let readiness = Readiness::new(Connectivity::Ready);
        let service = BoxCloneSyncService::new(tower::service_fn(move |()| async move {
            Ok::<_, Infallible>(id)
        }));
        let endpoint = Endpoint::new(service)
            .priority(priority)
            .readiness(readiness.clone());
        feed.insert_endpoint(id, endpoint);
        cells.push(readiness);
    }
    let balance = builder.build(fed);
    support::until("every endpoint is listed", || {
        balance.endpoints().len() == priorities.len()
    })
    .await;
    (balance, cells, feed)
}

/// How many of `n` requests each tier served, by the endpoints' priorities.
async fn served_by_tier(balance: &Balance<Svc, usize>, priorities: &[u16], n: usize) -> [usize; 3] {
    let mut tiers = [0; 3];
    for _ in 0..n {
        let id = balance.clone().oneshot(()).await.expect("served");
        tiers[usize::from(priorities[id])] += 1;
    }
    tiers
}

fn percents(tiers: &[TierShare]) -> Vec<(u16, u8)> {
    tiers.iter().map(|t| (t.priority, t.percent)).collect()
}

/// Ten endpoints in tier 0, ten in tier 1 (priority 1), four in tier 2.
const PRIORITIES: [u16; 24] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2,
];

#[tokio::test(start_paused = true)]
async fn traffic_stays_in_the_best_tier_and_spills_gradually_as_it_fails() {
    let _limit = support::time_limit(60);
    let (balance, cells, _feed) = tiered(Balance::builder(), &PRIORITIES).await;
    assert_eq!(percents(&balance.tiers()), [(0, 100), (1, 0), (2, 0)]);
    let stats = balance.endpoints();
    assert!(stats.iter().all(|e| e.priority == PRIORITIES[e.key]));

    // All healthy: tier 0 takes everything.
    assert_eq!(
        served_by_tier(&balance, &PRIORITIES, 2_000).await,
        [2_000, 0, 0]
    );

    // 8 of 10 healthy: 80% x 1.4 is over 100%, so tier 0 still takes everything.
    cells[0].set(Connectivity::TransientFailure);
    cells[1].set(Connectivity::TransientFailure);
    assert_eq!(percents(&balance.tiers()), [(0, 100), (1, 0), (2, 0)]);
    assert_eq!(
        served_by_tier(&balance, &PRIORITIES, 1_000).await,
        [1_000, 0, 0]
    );

    // 5 of 10 healthy: 70% stays, 30% spills to tier 1, none to tier 2.
    for cell in &cells[2..5] {
        cell.set(Connectivity::Connecting);
    }
    assert_eq!(percents(&balance.tiers()), [(0, 70), (1, 30), (2, 0)]);
    let served = served_by_tier(&balance, &PRIORITIES, 4_000).await;
    assert!(
        (2_650..=2_950).contains(&served[0]) && served[2] == 0,
        "70/30/0 of 4000: {served:?}"
    );

    // Tier 0 down and tier 1 at 5 of 10: tier 1 takes 70%, tier 2 the rest.
    for cell in &cells[5..15] {
        cell.set(Connectivity::TransientFailure);
    }
    assert_eq!(percents(&balance.tiers()), [(0, 0), (1, 70), (2, 30)]);
    let served = served_by_tier(&balance, &PRIORITIES, 4_000).await;
    assert!(
        served[0] == 0 && (2_650..=2_950).contains(&served[1]),
        "0/70/30 of 4000: {served:?}"
    );

    // Back: every endpoint ready again, tier 0 takes everything again.
    for cell in &cells {
        cell.set(Connectivity::Ready);
    }
    assert_eq!(percents(&balance.tiers()), [(0, 100), (1, 0), (2, 0)]);
    assert_eq!(
        served_by_tier(&balance, &PRIORITIES, 1_000).await,
        [1_000, 0, 0]
    );
}

/// Catches tiers that are not rebuilt when discovery changes an endpoint's priority, and a
/// tier left behind with no endpoints.
#[tokio::test(start_paused = true)]
async fn a_changed_priority_moves_the_endpoint_between_tiers() {
    let _limit = support::time_limit(60);
    let (balance, _cells, feed) = tiered(Balance::builder(), &[0, 1]).await;
    assert_eq!(percents(&balance.tiers()), [(0, 100), (1, 0)]);
    // Endpoint 0 moves to priority 2: endpoint 1 (priority 1) is now the best tier.
    let service =
        BoxCloneSyncService::new(tower::service_fn(|()| async { Ok::<_, Infallible>(0) }));
    let updates = balance.updates();
    feed.insert_endpoint(0, Endpoint::new(service).priority(2));
    support::until("the change is published", || balance.updates() > updates).await;
    assert_eq!(percents(&balance.tiers()), [(1, 100), (2, 0)]);
    for _ in 0..100 {
        assert_eq!(balance.clone().oneshot(()).await.unwrap(), 1);
    }
}

/// Catches panic decided per tier alone: tier 0 with one of four endpoints healthy is below
/// the panic threshold, but tier 1 makes up for it (health adding up to 100%), so tier 0's
/// share goes to its healthy endpoint only, and `PanicMode::Fail` fails nothing; once both
/// tiers are short, both are in panic.
#[tokio::test(start_paused = true)]
async fn a_tier_short_of_health_is_not_in_panic_while_the_next_makes_up_for_it() {
    let _limit = support::time_limit(60);
    let priorities = [0, 0, 0, 0, 1, 1, 1, 1];
    let builder = Balance::builder()
        .outlier_detection(Some(OutlierDetection::default()))
        .panic_threshold(50)
        .panic_mode(PanicMode::Fail);
    let (balance, cells, _feed) = tiered(builder, &priorities).await;
    // One of four healthy in tier 0: 35% stays there, none of it on the three failing.
    for cell in &cells[1..4] {
        cell.set(Connectivity::TransientFailure);
    }
    let tiers = balance.tiers();
    assert_eq!(percents(&tiers), [(0, 35), (1, 65)]);
    assert!(tiers.iter().all(|t| !t.panic), "{tiers:?}");
    let served = AtomicUsize::new(0);
    for _ in 0..1_000 {
        let id = balance.clone().oneshot(()).await.expect("no panic failure");
        assert!(!(1..4).contains(&id), "a failing endpoint served");
        if id == 0 {
            served.fetch_add(1, Ordering::Relaxed);
        }
    }
    let first = served.load(Ordering::Relaxed);
    assert!(
        (280..=420).contains(&first),
        "35% of 1000 on endpoint 0: {first}"
    );

    // Tier 1 down to one of four as well: health 35% + 35% < 100%, so both tiers are in
    // panic, and with `Fail` their picks fail.
    for cell in &cells[5..8] {
        cell.set(Connectivity::TransientFailure);
    }
    let tiers = balance.tiers();
    assert_eq!(percents(&tiers), [(0, 50), (1, 50)]);
    assert!(tiers.iter().all(|t| t.panic), "{tiers:?}");
}

/// A single priority is one tier of everything, whatever its number.
#[tokio::test(start_paused = true)]
async fn one_priority_is_one_tier_taking_everything() {
    let _limit = support::time_limit(60);
    let (balance, cells, _feed) = tiered(Balance::builder(), &[3, 3, 3]).await;
    cells[0].set(Connectivity::TransientFailure);
    let tiers = balance.tiers();
    assert_eq!(percents(&tiers), [(3, 100)]);
    assert_eq!(tiers[0].endpoints, 3);
}
