//! Distributions that tell a right balancer from a wrong one, on paused time: weights at
//! every concurrency, P2C against random picking, and slow start's ramp.
//!
//! The wrong implementations each test fails: weights ignored when endpoints are idle (1:9
//! splits 50:50), weights applied only through load (the heavy one takes every idle
//! request), random picking (a slow endpoint keeps 25%), no ramp (a new endpoint takes its
//! full share at once).

use tower_sd_testkit as support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};
use tower_sd::balance::{Balance, BalanceBuilder, LoadMetric};
use tower_sd::endpoint::Endpoint;

type Svc = BoxCloneSyncService<(), usize, Infallible>;
type Feed = support::feed::Feed<usize, Svc>;

/// An endpoint answering its id after `latency(request number)` of (paused) time, counting
/// the requests it got.
fn endpoint(
    id: usize,
    served: &Arc<Vec<AtomicUsize>>,
    latency: impl Fn(u64) -> Duration + Send + Sync + Clone + 'static,
) -> Svc {
    let served = Arc::clone(served);
    let n = Arc::new(AtomicUsize::new(0));
    BoxCloneSyncService::new(tower::service_fn(move |()| {
        served[id].fetch_add(1, Ordering::SeqCst);
        let delay = latency(n.fetch_add(1, Ordering::Relaxed) as u64);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(id)
        }
    }))
}

/// A balancer over endpoints of these weights, each answering after `latency(id, n)`.
async fn weighted(
    builder: BalanceBuilder,
    weights: &[u32],
    latency: impl Fn(usize, u64) -> Duration + Send + Sync + Clone + 'static,
) -> (Balance<Svc, usize>, Arc<Vec<AtomicUsize>>, Feed) {
    let served: Arc<Vec<AtomicUsize>> =
        Arc::new((0..weights.len()).map(|_| AtomicUsize::new(0)).collect());
    let (feed, fed) = support::feed::feed();
    for (id, &weight) in weights.iter().enumerate() {
        let latency = latency.clone();
        let service = endpoint(id, &served, move |n| latency(id, n));
        feed.insert_endpoint(id, Endpoint::new(service).weight(weight));
    }
    let balance = builder.build(fed);
    support::until("every endpoint is listed", || {
        balance.endpoints().len() == weights.len()
    })
    .await;
    (balance, served, feed)
}

/// Each endpoint's share of what was served, in percent.
fn shares(served: &[AtomicUsize]) -> Vec<f64> {
    let counts: Vec<usize> = served.iter().map(|s| s.load(Ordering::SeqCst)).collect();
    let total: usize = counts.iter().sum();
    counts
        .iter()
        .map(|&c| 100.0 * c as f64 / total as f64)
        .collect()
}

fn assert_shares(got: &[f64], want: &[f64], tolerance: f64, what: &str) {
    eprintln!("{what}: {got:.1?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tolerance,
            "{what}: shares {got:.1?}, want {want:?} +- {tolerance}"
        );
    }
}

/// `callers` tasks sending `each` requests one after another.
async fn concurrent(balance: &Balance<Svc, usize>, callers: usize, each: usize) {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let balance = balance.clone();
            tokio::spawn(async move {
                for _ in 0..each {
                    balance.clone().oneshot(()).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Latencies between 0.5 and 1.5 ms that differ from request to request (a fixed hash of
/// the endpoint and request number), so concurrent callers do not march in lockstep.
fn jittered(id: usize, n: u64) -> Duration {
    let mut x =
        (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    Duration::from_micros(500 + x % 1000)
}

const ONE_TO_NINE: ([u32; 2], [f64; 2]) = ([1, 9], [10.0, 90.0]);
const ONE_ONE_ONE_FIVE: ([u32; 4], [f64; 4]) = ([1, 1, 1, 5], [12.5, 12.5, 12.5, 62.5]);

#[tokio::test(start_paused = true)]
async fn sequential_traffic_follows_weights() {
    let _limit = support::time_limit(60);
    for metric in [LoadMetric::PendingRequests, LoadMetric::peak_ewma()] {
        let builder = || Balance::builder().load(metric);
        let (weights, want) = ONE_TO_NINE;
        let (balance, served, _feed) = weighted(builder(), &weights, jittered).await;
        concurrent(&balance, 1, 10_000).await;
        assert_shares(
            &shares(&served),
            &want,
            3.0,
            &format!("1:9 sequential, {metric:?}"),
        );

        let (weights, want) = ONE_ONE_ONE_FIVE;
        let (balance, served, _feed) = weighted(builder(), &weights, |_, _| Duration::ZERO).await;
        concurrent(&balance, 1, 10_000).await;
        assert_shares(
            &shares(&served),
            &want,
            3.0,
            &format!("1:1:1:5 sequential, {metric:?}"),
        );
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_traffic_follows_weights() {
    let _limit = support::time_limit(60);
    for callers in [2, 8] {
        let (weights, want) = ONE_TO_NINE;
        let (balance, served, _feed) = weighted(Balance::builder(), &weights, jittered).await;
        concurrent(&balance, callers, 10_000 / callers).await;
        let what = format!("1:9, {callers} callers");
        assert_shares(&shares(&served), &want, 3.0, &what);
    }
    // With four endpoints and only two requests out, a light endpoint that is busy hands its
    // next request to an idle one, as a load balancer should, which lifts the heavy one to
    // about 66%; from 8 callers on, the shares are back within 3 points of the weights.
    let (weights, want) = ONE_ONE_ONE_FIVE;
    let (balance, served, _feed) = weighted(Balance::builder(), &weights, jittered).await;
    concurrent(&balance, 8, 10_000 / 8).await;
    assert_shares(&shares(&served), &want, 3.0, "1:1:1:5, 8 callers");
}

#[tokio::test(start_paused = true)]
async fn held_requests_follow_weights() {
    let _limit = support::time_limit(60);
    // 400 requests all in flight at once (none completes until the gate opens): the load
    // per weight levels out, so in-flight counts follow weights.
    let gate = Arc::new(Semaphore::new(0));
    let hold = Arc::clone(&gate);
    let (weights, want) = ONE_ONE_ONE_FIVE;
    let served: Arc<Vec<AtomicUsize>> = Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
    let (feed, fed) = support::feed::feed::<usize, Svc>();
    for (id, &weight) in weights.iter().enumerate() {
        let (hold, served) = (Arc::clone(&hold), Arc::clone(&served));
        let service = BoxCloneSyncService::new(tower::service_fn(move |()| {
            served[id].fetch_add(1, Ordering::SeqCst);
            let hold = Arc::clone(&hold);
            async move {
                hold.acquire().await.unwrap().forget();
                Ok::<_, Infallible>(id)
            }
        }));
        feed.insert_endpoint(id, Endpoint::new(service).weight(weight));
    }
    let balance = Balance::builder().build(fed);
    support::until("listed", || balance.endpoints().len() == 4).await;
    let mut requests = Vec::new();
    for _ in 0..400 {
        let mut handle = balance.clone();
        handle.ready().await.unwrap();
        requests.push(tokio::spawn(handle.call(())));
    }
    assert_shares(&shares(&served), &want, 3.0, "1:1:1:5, 400 held");
    gate.add_permits(400);
    for request in requests {
        request.await.unwrap().unwrap();
    }
    assert!(balance.endpoints().iter().all(|e| e.in_flight == 0));

    let (weights, want) = ONE_TO_NINE;
    let gate = Arc::new(Semaphore::new(0));
    let (balance, served, _feed) = weighted(Balance::builder(), &weights, |_, _| {
        Duration::from_secs(3600)
    })
    .await;
    let mut requests = Vec::new();
    for _ in 0..400 {
        let mut handle = balance.clone();
        handle.ready().await.unwrap();
        requests.push(handle.call(()));
    }
    assert_shares(&shares(&served), &want, 3.0, "1:9, 400 held");
    drop((requests, gate));
}

#[tokio::test(start_paused = true)]
async fn p2c_sends_little_to_a_slow_endpoint_where_random_sends_a_quarter() {
    let _limit = support::time_limit(60);
    // One endpoint 10x slower than the other three, 8 callers: random picking gives it 25%.
    let slow = |id: usize, n: u64| {
        let base = jittered(id, n);
        if id == 3 { base * 10 } else { base }
    };
    for metric in [LoadMetric::PendingRequests, LoadMetric::peak_ewma()] {
        let builder = Balance::builder().load(metric);
        let (balance, served, _feed) = weighted(builder, &[1, 1, 1, 1], slow).await;
        concurrent(&balance, 8, 1_000).await;
        let shares = shares(&served);
        assert!(
            shares[3] < 10.0,
            "{metric:?}: the slow endpoint took {shares:.1?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_a_new_endpoint_up_over_its_window() {
    let _limit = support::time_limit(60);
    let window = Duration::from_secs(100);
    let builder = Balance::builder().slow_start(window);
    let (balance, served, feed) = weighted(builder, &[1, 1, 1], |_, _| Duration::ZERO).await;
    // Long past the others' windows, a fourth endpoint arrives.
    tokio::time::advance(window * 2).await;
    let new = endpoint(
        3,
        &Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect()),
        |_| Duration::ZERO,
    );
    let new_served = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&new_served);
    let new = BoxCloneSyncService::new(new.map_response(move |id| {
        counter.fetch_add(1, Ordering::SeqCst);
        id
    }));
    feed.insert_endpoint(3, Endpoint::new(new));
    support::until("the new endpoint is listed", || {
        balance.endpoints().len() == 4
    })
    .await;
    let inserted = tokio::time::Instant::now();
    // Sequential requests at 10%, 50% and 100% of the window: a share of age / window of the
    // new endpoint's full 25%.
    for (fraction, want) in [(0.1, 2.5), (0.5, 12.5), (1.0, 25.0)] {
        tokio::time::advance((inserted + window.mul_f64(fraction)) - tokio::time::Instant::now())
            .await;
        let before_new = new_served.load(Ordering::SeqCst);
        let before_old: usize = served.iter().map(|s| s.load(Ordering::SeqCst)).sum();
        concurrent(&balance, 1, 4_000).await;
        let new = new_served.load(Ordering::SeqCst) - before_new;
        let old: usize = served
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .sum::<usize>()
            - before_old;
        let share = 100.0 * new as f64 / (new + old) as f64;
        assert!(
            (share - want).abs() <= 5.0,
            "at {fraction} of the window the new endpoint took {share:.1}%, want {want}% +- 5"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_weighted_pick_with_one_dominant_weight_stays_cheap_and_right() {
    let _limit = support::time_limit(60);
    // One weight dwarfs the others: drawing a second candidate unlike the first must not
    // loop, and the shares still follow the weights.
    let (balance, served, _feed) =
        weighted(Balance::builder(), &[1, 1, 1_000], |_, _| Duration::ZERO).await;
    concurrent(&balance, 1, 20_000).await;
    let shares = shares(&served);
    assert!(
        shares[2] > 99.0 && shares[0] < 0.5 && shares[1] < 0.5,
        "{shares:.2?}"
    );
}

/// The service type check: `Service` is what the balancer is, whatever the response.
#[allow(dead_code)]
fn is_service(b: Balance<Svc, usize>) -> impl Service<(), Response = usize> {
    b
}
