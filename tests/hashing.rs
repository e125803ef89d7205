//! Keyed routing on paused time: consistent hashing with bounded load over a real
//! `Balance`.
//!
//! The wrong implementations these fail: a hash that ignores the key (or picks at random),
//! one that remaps every key when an endpoint leaves, bounded load that is not bounded (a hot
//! key piles onto one endpoint), a walk that sends a key to an endpoint that is not ready,
//! a key that does not come back once its endpoint recovers, and keyless requests that all
//! land on one endpoint.

use tower_sd_testkit as support;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};
use tower_sd::balance::{Balance, key_hash};
use tower_sd::endpoint::{Connectivity, Endpoint, Readiness};

/// A request: its key, if any.
type Req = Option<u32>;
type Svc = BoxCloneSyncService<Req, usize, Infallible>;

/// Endpoint `id`, answering its id after `delay`, counting what it holds in flight and the
/// most it ever held.
fn endpoint(id: usize, delay: Duration, held: Arc<(AtomicUsize, AtomicUsize)>) -> Svc {
    BoxCloneSyncService::new(tower::service_fn(move |_: Req| {
        let held = Arc::clone(&held);
        async move {
            let now = held.0.fetch_add(1, Ordering::SeqCst) + 1;
            held.1.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            held.0.fetch_sub(1, Ordering::SeqCst);
            Ok(id)
        }
    }))
}

struct Fleet {
    balance: Balance<Svc, usize>,
    feed: support::feed::Feed<usize, Svc>,
    cells: Vec<Readiness>,
    held: Vec<Arc<(AtomicUsize, AtomicUsize)>>,
}

async fn fleet(n: usize, delay: Duration) -> Fleet {
    let (feed, fed) = support::feed::feed();
    let mut cells = Vec::new();
    let mut held = Vec::new();
    for id in 0..n {
        let readiness = Readiness::new(Connectivity::Ready);
        let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let service = endpoint(id, delay, Arc::clone(&counts));
        feed.insert_endpoint(id, Endpoint::new(service).readiness(readiness.clone()));
        cells.push(readiness);
        held.push(counts);
    }
    let balance = Balance::builder().build(fed);
    support::until("every endpoint is listed", || {
        balance.endpoints().len() == n
    })
    .await;
    Fleet {
        balance,
        feed,
        cells,
        held,
    }
}

fn by_key(request: &Req) -> Option<u64> {
    request.map(|key| key_hash(&key))
}

/// Where each of `keys` goes, one request at a time.
async fn owners(fleet: &Fleet, keys: std::ops::Range<u32>) -> HashMap<u32, usize> {
    let mut keyed = fleet.balance.clone().keyed(by_key);
    let mut owners = HashMap::new();
    for key in keys {
        let id = keyed.ready().await.unwrap().call(Some(key)).await.unwrap();
        owners.insert(key, id);
    }
    owners
}

#[tokio::test(start_paused = true)]
async fn a_key_sticks_to_its_endpoint_and_only_the_leavers_keys_move() {
    let _limit = support::time_limit(60);
    let fleet = fleet(10, Duration::ZERO).await;
    let first = owners(&fleet, 0..2_000).await;
    assert_eq!(
        owners(&fleet, 0..2_000).await,
        first,
        "the same keys, the same endpoints"
    );
    let used: HashSet<usize> = first.values().copied().collect();
    assert_eq!(used.len(), 10, "the keys spread over every endpoint");
    let most = (0..10)
        .map(|id| first.values().filter(|&&o| o == id).count())
        .max()
        .unwrap();
    assert!(
        most < 400,
        "no endpoint owns twice its share of 200: {most}"
    );

    // Endpoint 3 leaves: its keys move, and no other key does.
    let updates = fleet.balance.updates();
    fleet.feed.remove(3);
    support::until("the removal is published", || {
        fleet.balance.updates() > updates
    })
    .await;
    let after = owners(&fleet, 0..2_000).await;
    let moved: Vec<u32> = (0..2_000).filter(|k| first[k] != after[k]).collect();
    assert!(
        moved.iter().all(|k| first[k] == 3),
        "a key of a staying endpoint moved"
    );
    assert_eq!(moved.len(), first.values().filter(|&&o| o == 3).count());
}

/// Catches bounded load that is not bounded: 40 concurrent requests of one hot key over 4
/// endpoints; with c = 1.25 none may hold more than ceil(1.25 x 40 / 4) = 13 at once, while
/// without the bound all 40 would go to the key's endpoint.
#[tokio::test(start_paused = true)]
async fn a_hot_key_spills_along_the_ring_at_the_load_bound() {
    let _limit = support::time_limit(60);
    let fleet = fleet(4, Duration::from_millis(100)).await;
    let keyed = fleet.balance.clone().keyed(by_key);
    let calls: Vec<_> = (0..40)
        .map(|_| tokio::spawn(keyed.clone().oneshot(Some(7))))
        .collect();
    let mut served = [0usize; 4];
    for call in calls {
        served[call.await.unwrap().unwrap()] += 1;
    }
    let most: Vec<usize> = fleet
        .held
        .iter()
        .map(|h| h.1.load(Ordering::SeqCst))
        .collect();
    assert!(most.iter().all(|&m| m <= 13), "held at once: {most:?}");
    assert!(served.iter().filter(|&&s| s > 0).count() >= 3, "{served:?}");
    // The key's own endpoint took its full bound first.
    assert!(served.iter().any(|&s| s >= 10), "{served:?}");

    // One at a time, the key stays on one endpoint.
    let ids: HashSet<usize> = owners(&fleet, 7..8).await.into_values().collect();
    let again: HashSet<usize> = owners(&fleet, 7..8).await.into_values().collect();
    assert_eq!(ids, again);
}

/// Catches a key sent to an endpoint that is not ready, and one that does not come back to
/// its endpoint once it is ready again.
#[tokio::test(start_paused = true)]
async fn an_unready_endpoint_is_passed_over_and_its_keys_come_back() {
    let _limit = support::time_limit(60);
    let fleet = fleet(5, Duration::ZERO).await;
    let first = owners(&fleet, 0..500).await;
    let owner = first[&0];
    fleet.cells[owner].set(Connectivity::TransientFailure);
    let during = owners(&fleet, 0..500).await;
    assert!(
        during.values().all(|&id| id != owner),
        "a key went to the unready endpoint"
    );
    let moved = (0..500).filter(|k| first[k] != during[k]).count();
    assert_eq!(
        moved,
        first.values().filter(|&&o| o == owner).count(),
        "only its keys moved"
    );
    fleet.cells[owner].set(Connectivity::Ready);
    assert_eq!(owners(&fleet, 0..500).await, first, "its keys are back");
}

/// Catches keyless requests that do not fall back to the balancer (all to one endpoint).
#[tokio::test(start_paused = true)]
async fn requests_without_a_key_are_balanced_as_usual() {
    let _limit = support::time_limit(60);
    let fleet = fleet(4, Duration::ZERO).await;
    let mut keyed = fleet.balance.clone().keyed(by_key);
    let mut seen = HashSet::new();
    for _ in 0..200 {
        seen.insert(keyed.ready().await.unwrap().call(None).await.unwrap());
    }
    assert_eq!(seen.len(), 4);
}
