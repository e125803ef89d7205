//! `Balance`: readiness, the empty set, drain on removal, unready endpoints, weights, peak
//! EWMA, the updater's lifetime, and a churn stress test.

use tower_sd_testkit as support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt, stream};
use tokio::sync::Semaphore;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::discover::Change;
use tower::{Service, ServiceExt};
use tower_sd::balance::{Balance, EndpointState, LoadMetric};
use tower_sd::endpoint::{Connectivity, Endpoint, Endpoints, Readiness};
use tower_sd::{Error, MemoryRegistry, ServiceInstance, ServiceRegistry};

type Feed<S> = support::feed::Feed<usize, S>;

/// A discover fed by hand, and a balancer over it.
fn fed<S>(builder: tower_sd::balance::BalanceBuilder) -> (Feed<S>, Balance<S, usize>)
where
    S: Send + Sync + 'static,
{
    let (feed, discover) = support::feed::feed();
    (feed, builder.build(discover))
}

/// Waits until the balancer has published `n` snapshots.
async fn published<S, K>(balance: &Balance<S, K>, n: u64) {
    support::until(&format!("{n} snapshots are published"), || {
        balance.updates() >= n
    })
    .await;
}

/// Waits until the balancer lists an endpoint with this key.
async fn listed<S, K: PartialEq + Clone>(balance: &Balance<S, K>, key: K) {
    support::until("the endpoint is listed", || {
        balance.endpoints().iter().any(|e| e.key == key)
    })
    .await;
}

/// A test endpoint: answers with its id, counts its live clones, and can be told to fail
/// `poll_ready` or to hold responses until a gate opens.
#[derive(Clone)]
struct Probe {
    id: usize,
    clones: Arc<AtomicUsize>,
    fail_ready: Arc<AtomicBool>,
    gate: Option<Arc<Semaphore>>,
}

impl Probe {
    fn new(id: usize) -> Self {
        Self {
            id,
            clones: Arc::new(AtomicUsize::new(1)),
            fail_ready: Arc::new(AtomicBool::new(false)),
            gate: None,
        }
    }

    fn gated(id: usize, gate: &Arc<Semaphore>) -> Self {
        Self {
            gate: Some(Arc::clone(gate)),
            ..Self::new(id)
        }
    }
}

struct Counted(Probe);

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.clones.fetch_add(1, Ordering::SeqCst);
        Self(self.0.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.clones.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<()> for Counted {
    type Response = usize;
    type Error = &'static str;
    type Future = Pin<Box<dyn Future<Output = Result<usize, &'static str>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.0.fail_ready.load(Ordering::SeqCst) {
            Poll::Ready(Err("not ready"))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let id = self.0.id;
        let gate = self.0.gate.clone();
        let clones = Arc::clone(&self.0.clones);
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            assert!(
                clones.load(Ordering::SeqCst) > 0,
                "endpoint service dropped mid-request"
            );
            Ok(id)
        })
    }
}

fn insert(feed: &Feed<Counted>, probe: &Probe) {
    feed.insert(probe.id, Counted(probe.clone()));
}

#[tokio::test(start_paused = true)]
async fn empty_set_fails_after_wait_for_endpoints() {
    let _limit = support::time_limit(60);
    let builder = Balance::builder()
        .service_name("greeter")
        .wait_for_endpoints(Duration::from_secs(2));
    let (_feed, balance) = fed::<Counted>(builder);
    let started = tokio::time::Instant::now();
    let error = balance.oneshot(()).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    match error.downcast_ref::<Error>() {
        Some(Error::NoEndpoints { service, .. }) => assert_eq!(service, "greeter"),
        other => panic!("expected NoEndpoints, got {other:?}"),
    }
    assert!(error.to_string().contains("greeter"));
}

/// Catches an `await_endpoints` that returns before there is an endpoint (or never), and
/// a service name that is not the configured one.
#[tokio::test(start_paused = true)]
async fn await_endpoints_waits_for_the_first_one_and_no_longer_than_asked() {
    let _limit = support::time_limit(60);
    let (feed, balance) = fed::<Counted>(Balance::builder().service_name("greeter"));
    assert_eq!(balance.service_name(), "greeter");
    let started = tokio::time::Instant::now();
    let error = balance
        .await_endpoints(Duration::from_secs(3))
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert!(matches!(error, Error::NoEndpoints { ref service, .. } if service == "greeter"));

    let waiting = tokio::spawn({
        let balance = balance.clone();
        async move { balance.await_endpoints(Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "returned with no endpoint");
    insert(&feed, &Probe::new(1));
    waiting.await.unwrap().unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn zero_wait_fails_at_once() {
    let _limit = support::time_limit(60);
    let builder = Balance::builder().wait_for_endpoints(Duration::ZERO);
    let (_feed, mut balance) = fed::<Counted>(builder);
    let mut task = tokio_test::task::spawn(());
    let poll = task.enter(|cx, _| balance.poll_ready(cx));
    let error = assert_ready!(poll).unwrap_err();
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::NoEndpoints { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_caller_is_woken_when_an_endpoint_arrives() {
    let _limit = support::time_limit(60);
    let builder = Balance::builder().wait_for_endpoints(Duration::from_secs(60));
    let (feed, mut balance) = fed::<Counted>(builder);
    let mut task = tokio_test::task::spawn(());
    assert_pending!(task.enter(|cx, _| balance.poll_ready(cx)));

    insert(&feed, &Probe::new(7));
    published(&balance, 1).await;
    assert!(
        task.is_woken(),
        "the arrival wakes the waiting caller, no polling"
    );
    assert_ready_ok!(task.enter(|cx, _| balance.poll_ready(cx)));
    assert_eq!(balance.call(()).await.unwrap(), 7);
    assert_eq!(tokio::time::Instant::now().elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn call_uses_the_endpoint_chosen_in_poll_ready() {
    let _limit = support::time_limit(60);
    let (feed, mut balance) = fed(Balance::builder());
    insert(&feed, &Probe::new(1));
    published(&balance, 1).await;
    balance.ready().await.unwrap();

    // The set changes completely between poll_ready and call (tower #856).
    feed.remove(1);
    insert(&feed, &Probe::new(2));
    published(&balance, 2).await;
    assert_eq!(balance.call(()).await.unwrap(), 1);
    assert_eq!(balance.oneshot(()).await.unwrap(), 2);
}

/// Catches load counted only from `call`: two handles that poll ready at once would then
/// both see two idle endpoints and land on the same one half the time, where a pick that
/// claims its endpoint at once makes the second handle take the other.
#[tokio::test]
async fn handles_readied_together_take_different_endpoints_and_a_dropped_one_releases_its_claim() {
    let _limit = support::time_limit(60);
    let (feed, balance) = fed(Balance::builder());
    insert(&feed, &Probe::new(1));
    insert(&feed, &Probe::new(2));
    listed(&balance, 1).await;
    listed(&balance, 2).await;
    let in_flight = |balance: &Balance<Counted, usize>| -> u64 {
        balance.endpoints().iter().map(|e| e.in_flight).sum()
    };
    for round in 0..200 {
        let (mut first, mut second) = (balance.clone(), balance.clone());
        first.ready().await.unwrap();
        assert_eq!(in_flight(&balance), 1, "round {round}: the pick is a claim");
        second.ready().await.unwrap();
        let (a, b) = (
            first.call(()).await.unwrap(),
            second.call(()).await.unwrap(),
        );
        assert_ne!(a, b, "round {round}: both handles took endpoint {a}");
        assert_eq!(in_flight(&balance), 0, "round {round}: completed");

        // A handle dropped between poll_ready and call gives its claim back.
        let mut idle = balance.clone();
        idle.ready().await.unwrap();
        drop(idle);
        assert_eq!(in_flight(&balance), 0, "round {round}: the dropped claim");
    }
}

#[tokio::test]
async fn a_pending_endpoint_is_called_only_once_ready() {
    let _limit = support::time_limit(60);
    let (mock, mut handle) = tower_test::mock::pair::<(), &'static str>();
    handle.allow(0);
    let (feed, mut balance) = fed(Balance::builder());
    feed.insert(1, mock);
    published(&balance, 1).await;

    let mut task = tokio_test::task::spawn(());
    assert_pending!(task.enter(|cx, _| balance.poll_ready(cx)));
    handle.allow(1);
    assert!(task.is_woken());
    assert_ready_ok!(task.enter(|cx, _| balance.poll_ready(cx)));
    let response = balance.call(());
    let ((), send) = handle.next_request().await.unwrap();
    send.send_response("done");
    assert_eq!(response.await.unwrap(), "done");
}

#[tokio::test]
async fn a_caller_waiting_on_a_pending_endpoint_moves_on_when_it_is_removed() {
    let _limit = support::time_limit(60);
    let (stuck, mut stuck_handle) = tower_test::mock::pair::<(), &'static str>();
    stuck_handle.allow(0);
    let (feed, mut balance) = fed(Balance::builder());
    feed.insert(1, stuck);
    published(&balance, 1).await;
    let mut task = tokio_test::task::spawn(());
    assert_pending!(task.enter(|cx, _| balance.poll_ready(cx)));

    let (fresh, mut fresh_handle) = tower_test::mock::pair::<(), &'static str>();
    fresh_handle.allow(1);
    feed.remove(1);
    feed.insert(2, fresh);
    listed(&balance, 2).await;
    assert!(task.is_woken(), "the publish wakes the caller");
    assert_ready_ok!(task.enter(|cx, _| balance.poll_ready(cx)));
    let response = balance.call(());
    let ((), send) = fresh_handle.next_request().await.unwrap();
    send.send_response("fresh");
    assert_eq!(response.await.unwrap(), "fresh");
    assert!(
        !matches!(stuck_handle.next_request().now_or_never(), Some(Some(_))),
        "never called"
    );
}

#[tokio::test]
async fn an_idle_handle_releases_a_removed_service_at_its_next_use() {
    let _limit = support::time_limit(60);
    let probe = Probe::new(1);
    let (feed, mut balance) = fed(Balance::builder());
    insert(&feed, &probe);
    published(&balance, 1).await;
    assert_eq!((&mut balance).oneshot(()).await.unwrap(), 1);

    feed.remove(1);
    insert(&feed, &Probe::new(2));
    listed(&balance, 2).await;
    assert_eq!(
        probe.clones.load(Ordering::SeqCst),
        1,
        "the idle handle's snapshot holds it"
    );
    assert_eq!((&mut balance).oneshot(()).await.unwrap(), 2);
    assert_eq!(
        probe.clones.load(Ordering::SeqCst),
        0,
        "released at the next use"
    );
}

#[tokio::test]
async fn removal_drains_in_flight_requests_then_drops_the_service() {
    let _limit = support::time_limit(60);
    let gate = Arc::new(Semaphore::new(0));
    let probe = Probe::gated(1, &gate);
    let (feed, balance) = fed(Balance::builder());
    insert(&feed, &probe);
    published(&balance, 1).await;

    let requests: Vec<_> = (0..3)
        .map(|_| tokio::spawn(balance.clone().oneshot(())))
        .collect();
    support::until("3 requests are in flight", || {
        balance.endpoints().first().map(|e| e.in_flight) == Some(3)
    })
    .await;
    feed.remove(1);
    published(&balance, 2).await;
    assert!(balance.endpoints().is_empty());
    assert!(probe.clones.load(Ordering::SeqCst) > 0, "still draining");

    gate.add_permits(3);
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap(), 1);
    }
    assert_eq!(
        probe.clones.load(Ordering::SeqCst),
        0,
        "dropped after the last request"
    );
}

#[tokio::test]
async fn an_endpoint_failing_poll_ready_is_not_picked() {
    let _limit = support::time_limit(60);
    let (feed, balance) = fed(Balance::builder());
    let bad = Probe::new(1);
    bad.fail_ready.store(true, Ordering::SeqCst);
    insert(&feed, &bad);
    insert(&feed, &Probe::new(2));
    published(&balance, 1).await;

    for _ in 0..200 {
        assert_eq!(balance.clone().oneshot(()).await.unwrap(), 2);
    }
    let states: HashMap<usize, EndpointState> = balance
        .endpoints()
        .into_iter()
        .map(|e| (e.key, e.state))
        .collect();
    assert_eq!(states[&1], EndpointState::Failed);
    assert_eq!(states[&2], EndpointState::Ready);

    // It recovers when its poll_ready succeeds again (tried once nothing else is usable).
    bad.fail_ready.store(false, Ordering::SeqCst);
    feed.remove(2);
    published(&balance, 2).await;
    assert_eq!(balance.clone().oneshot(()).await.unwrap(), 1);
    assert_eq!(balance.endpoints()[0].state, EndpointState::Ready);

    // With every endpoint failing, the caller gets the error rather than a hang.
    bad.fail_ready.store(true, Ordering::SeqCst);
    let error = balance.oneshot(()).await.unwrap_err();
    assert_eq!(error.to_string(), "not ready");
}

#[tokio::test]
async fn weights_scale_the_share_of_in_flight_requests() {
    let _limit = support::time_limit(60);
    let gate = Arc::new(Semaphore::new(0));
    let registry = MemoryRegistry::new();
    registry
        .register(ServiceInstance::new("light", "svc", "127.0.0.1", 1))
        .await
        .unwrap();
    registry
        .register(ServiceInstance::new("heavy", "svc", "127.0.0.1", 2).with_weight(3))
        .await
        .unwrap();
    let probes: HashMap<u16, Probe> =
        [(1, Probe::gated(1, &gate)), (2, Probe::gated(2, &gate))].into();
    let balance = Balance::builder().build(tower_sd::RegistryDiscover::new(
        &registry,
        "svc",
        move |instance| Ok::<_, Infallible>(Counted(probes[&instance.port].clone())),
    ));
    published(&balance, 1).await;

    let mut requests = Vec::new();
    for _ in 0..400 {
        let mut handle = balance.clone();
        handle.ready().await.unwrap();
        requests.push(tokio::spawn(handle.call(())));
    }
    let in_flight: HashMap<String, u64> = balance
        .endpoints()
        .into_iter()
        .map(|e| (e.key, e.in_flight))
        .collect();
    assert_eq!(in_flight["light"] + in_flight["heavy"], 400);
    // P2C with in-flight/weight keeps the loads within one request of 100 : 300.
    assert!((99..=101).contains(&in_flight["light"]), "{in_flight:?}");
    gate.add_permits(400);
    for request in requests {
        request.await.unwrap().unwrap();
    }
    assert!(balance.endpoints().iter().all(|e| e.in_flight == 0));
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_sends_less_to_a_slow_endpoint() {
    let _limit = support::time_limit(60);
    let (tx, fed) = support::feed::feed();
    for (id, latency_ms) in [(0usize, 1u64), (1, 1), (2, 1), (3, 10)] {
        let service = tower::service_fn(move |()| async move {
            tokio::time::sleep(Duration::from_millis(latency_ms)).await;
            Ok::<_, Infallible>(id)
        });
        tx.insert(id, service);
    }
    let balance = Balance::builder()
        .load(LoadMetric::PeakEwma {
            default_rtt: Duration::from_millis(1),
            decay: Duration::from_secs(10),
        })
        .build(fed);
    published(&balance, 1).await;

    let served = served_by_eight_callers(&balance).await;
    let total: usize = served.iter().sum();
    assert!(served[3] * 10 < total, "slow endpoint served {served:?}");
    let ewma = balance.endpoints()[3].ewma.unwrap();
    assert!(ewma >= Duration::from_millis(5), "{ewma:?}");
}

#[tokio::test]
async fn updater_stops_when_the_last_handle_is_dropped() {
    let _limit = support::time_limit(60);
    let (feed, balance) = fed::<Counted>(Balance::builder());
    let clone = balance.clone();
    drop(balance);
    tokio::task::yield_now().await;
    assert!(!feed.is_closed(), "a handle is still alive");
    drop(clone);
    tokio::time::timeout(Duration::from_secs(5), feed.closed())
        .await
        .expect("the updater task dropped the discovery stream");
}

#[tokio::test]
async fn discovery_end_and_errors_keep_the_current_endpoints() {
    let _limit = support::time_limit(60);
    let changes = vec![
        Ok(Change::Insert(1usize, Counted(Probe::new(1)))),
        Err("registry hiccup"),
        Ok(Change::Insert(2, Counted(Probe::new(2)))),
    ];
    let balance = Balance::builder().build(Endpoints::new(stream::iter(changes)));
    support::until("the error is skipped and the later change applied", || {
        balance.endpoints().len() == 2
    })
    .await;
    // The stream has ended; the balancer goes on with what it had.
    for _ in 0..10 {
        balance.clone().oneshot(()).await.unwrap();
    }
}

/// 8 tasks x 100k requests while the set churns at random: every request lands on an
/// endpoint whose removal had not been published when the request started, in-flight
/// counters return to zero, and no endpoint service is dropped under a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_churn() {
    let _limit = support::time_limit(60);
    const TASKS: usize = 8;
    const REQUESTS: usize = 100_000;
    const IDS: usize = 32;

    /// Shared by all clones of one endpoint's service: it is gone when the last clone is.
    struct Token;

    #[derive(Clone)]
    struct Checked {
        id: usize,
        token: Arc<Token>,
        removed_at: Arc<Vec<AtomicU64>>,
    }
    impl Service<u64> for Checked {
        type Response = ();
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, started: u64) -> Self::Future {
            let (id, removed) = (self.id, self.removed_at[self.id].load(Ordering::SeqCst));
            assert!(
                started < removed,
                "request from epoch {started} reached {id}, removed at {removed}"
            );
            // Only a weak reference: the balancer must keep the service alive until the
            // response completes.
            let token = Arc::downgrade(&self.token);
            Box::pin(async move {
                tokio::task::yield_now().await;
                assert!(
                    token.upgrade().is_some(),
                    "endpoint {id} dropped under a request"
                );
                Ok(())
            })
        }
    }

    // Epoch at which each endpoint's removal was seen published; u64::MAX while it is live.
    let removed_at: Arc<Vec<AtomicU64>> =
        Arc::new((0..IDS).map(|_| AtomicU64::new(u64::MAX)).collect());
    let epoch = Arc::new(AtomicU64::new(0));
    let (feed, fed) = support::feed::feed();
    let balance = Balance::builder().build(fed);
    let mut live = [false; IDS];
    let insert = |id: usize, live: &mut [bool; IDS]| {
        live[id] = true;
        removed_at[id].store(u64::MAX, Ordering::SeqCst);
        let service = Checked {
            id,
            token: Arc::new(Token),
            removed_at: Arc::clone(&removed_at),
        };
        feed.insert(id, service);
    };
    for id in 0..IDS / 2 {
        insert(id, &mut live);
    }
    support::until("half the endpoints are listed", || {
        balance.endpoints().len() >= IDS / 2
    })
    .await;

    let callers: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut handle = balance.clone();
            let epoch = Arc::clone(&epoch);
            tokio::spawn(async move {
                for _ in 0..REQUESTS {
                    let started = epoch.load(Ordering::SeqCst);
                    handle.ready().await.unwrap();
                    handle.call(started).await.unwrap();
                }
            })
        })
        .collect();

    // Churn: remove or add a random endpoint, keeping at least one, until the callers finish.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut churns = 0u64;
    while !callers.iter().all(|caller| caller.is_finished()) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let id = (seed % IDS as u64) as usize;
        if live[id] && live.iter().filter(|&&l| l).count() > 1 {
            live[id] = false;
            let before = balance.updates();
            feed.remove(id);
            // Published means counted in `updates()`: pickers switch snapshots on that count.
            support::until("the removal is published", || {
                balance.updates() > before && !balance.endpoints().iter().any(|e| e.key == id)
            })
            .await;
            // Published: requests that start from now on must not reach it. (The removal is
            // stamped after publication, so requests racing it are allowed, as they must be.)
            removed_at[id].store(epoch.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        } else if !live[id] {
            insert(id, &mut live);
            // Wait for it to be published, so a later removal is stamped only once it is out.
            listed(&balance, id).await;
        }
        churns += 1;
        tokio::task::yield_now().await;
    }
    for caller in callers {
        caller.await.unwrap();
    }
    assert!(churns > 100, "the set churned {churns} times");
    assert!(balance.endpoints().iter().all(|e| e.in_flight == 0));
}

#[tokio::test]
async fn kept_clones_are_reused_and_released_with_the_snapshot() {
    let _limit = support::time_limit(60);
    let probe = Probe::new(1);
    let (feed, mut balance) = fed(Balance::builder().keep_clones(4));
    insert(&feed, &probe);
    published(&balance, 1).await;
    for _ in 0..10 {
        assert_eq!((&mut balance).oneshot(()).await.unwrap(), 1);
    }
    // The balancer's own copy plus the one clone this handle keeps and reuses.
    assert_eq!(probe.clones.load(Ordering::SeqCst), 2);

    feed.remove(1);
    insert(&feed, &Probe::new(2));
    listed(&balance, 2).await;
    assert_eq!((&mut balance).oneshot(()).await.unwrap(), 2);
    assert_eq!(
        probe.clones.load(Ordering::SeqCst),
        0,
        "released with the old snapshot"
    );
}

type EndpointFeed = Feed<Counted>;

/// A balancer over endpoints that carry a [`Readiness`], fed by hand.
fn fed_endpoints(
    builder: tower_sd::balance::BalanceBuilder,
) -> (EndpointFeed, Balance<Counted, usize>) {
    fed(builder)
}

fn insert_with(feed: &EndpointFeed, probe: &Probe, readiness: &Readiness) {
    let endpoint = Endpoint::new(Counted(probe.clone())).readiness(readiness.clone());
    feed.insert_endpoint(probe.id, endpoint);
}

/// Catches a picker that ignores the connectivity its owner reports (the service's own
/// `poll_ready` says ready here): a connecting or failed endpoint would take about a third
/// of the requests each.
#[tokio::test]
async fn an_endpoint_that_is_not_connected_is_not_picked_while_another_is() {
    let _limit = support::time_limit(60);
    let (feed, balance) = fed_endpoints(Balance::builder());
    let connecting = Readiness::new(Connectivity::Connecting);
    let failed = Readiness::new(Connectivity::Ready);
    failed.fail(Arc::new(std::io::Error::other("connection refused")));
    let ready = Readiness::new(Connectivity::Ready);
    insert_with(&feed, &Probe::new(1), &connecting);
    insert_with(&feed, &Probe::new(2), &failed);
    insert_with(&feed, &Probe::new(3), &ready);
    published(&balance, 1).await;

    for _ in 0..300 {
        assert_eq!(balance.clone().oneshot(()).await.unwrap(), 3);
    }
    let states: HashMap<usize, EndpointState> = balance
        .endpoints()
        .into_iter()
        .map(|e| (e.key, e.state))
        .collect();
    assert_eq!(states[&1], EndpointState::Connecting);
    assert_eq!(states[&2], EndpointState::Failed);
    assert_eq!(states[&3], EndpointState::Ready);

    // Once connected it takes its share again, with no new snapshot.
    connecting.set(Connectivity::Ready);
    let mut to_first = 0;
    for _ in 0..300 {
        if balance.clone().oneshot(()).await.unwrap() == 1 {
            to_first += 1;
        }
    }
    assert!((100..=200).contains(&to_first), "{to_first} of 300");
}

/// Catches failing at once while every endpoint is connecting (the first requests after
/// start would all fail), and a wait that is not woken by the connect (it would take the
/// whole `wait_for_endpoints`).
#[tokio::test(start_paused = true)]
async fn a_caller_waits_for_the_first_endpoint_to_connect() {
    let _limit = support::time_limit(60);
    let (feed, mut balance) =
        fed_endpoints(Balance::builder().wait_for_endpoints(Duration::from_secs(30)));
    let connecting = Readiness::new(Connectivity::Connecting);
    insert_with(&feed, &Probe::new(1), &connecting);
    published(&balance, 1).await;

    let mut task = tokio_test::task::spawn(());
    assert_pending!(task.enter(|cx, _| balance.poll_ready(cx)));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_pending!(task.enter(|cx, _| balance.poll_ready(cx)));
    connecting.set(Connectivity::Ready);
    tokio::task::yield_now().await;
    assert!(task.is_woken(), "the connect wakes the waiting caller");
    assert_ready_ok!(task.enter(|cx, _| balance.poll_ready(cx)));
    assert_eq!(balance.call(()).await.unwrap(), 1);
}

/// Catches a wait without a bound while no endpoint connects, and an error that hides why:
/// the caller gets `NoReadyEndpoints` after `wait_for_endpoints`, with the last connect
/// error.
#[tokio::test(start_paused = true)]
async fn no_endpoint_connecting_fails_after_the_wait_with_the_reason() {
    let _limit = support::time_limit(60);
    let builder = Balance::builder()
        .service_name("greeter")
        .wait_for_endpoints(Duration::from_secs(2));
    let (feed, balance) = fed_endpoints(builder);
    let failed = Readiness::new(Connectivity::Connecting);
    failed.fail(Arc::new(std::io::Error::other("connection refused")));
    insert_with(&feed, &Probe::new(1), &failed);
    published(&balance, 1).await;

    let started = tokio::time::Instant::now();
    let error = balance.oneshot(()).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    match error.downcast_ref::<Error>() {
        Some(Error::NoReadyEndpoints {
            service,
            total,
            last_error,
            ..
        }) => {
            assert_eq!((service.as_str(), *total), ("greeter", 1));
            let reason = last_error.as_ref().expect("the connect error").to_string();
            assert_eq!(reason, "connection refused");
        }
        other => panic!("expected NoReadyEndpoints, got {other:?}"),
    }
}

/// A service that answers its id after `latency`; with a gate, only once a permit is added.
fn timed_service(
    id: usize,
    latency: Duration,
    gate: Option<Arc<Semaphore>>,
) -> tower::util::BoxCloneSyncService<(), usize, Infallible> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |()| {
        let gate = gate.clone();
        async move {
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(latency).await;
            Ok::<_, Infallible>(id)
        }
    }))
}

/// Catches a peak-EWMA cost that adds latency and load instead of multiplying them, and
/// one that leaves out the request being placed: the pick compares latency x (in flight
/// + 1). A (1.2 ms, its requests held) against B (3 ms, idle): with one request on A,
/// A costs 2.4 ms and takes the next; with two, A costs 3.6 ms and B takes it.
#[tokio::test(start_paused = true)]
async fn peak_ewma_weighs_latency_by_the_requests_in_flight() {
    let _limit = support::time_limit(60);
    let (tx, fed) = support::feed::feed();
    let balance = Balance::builder()
        .load(LoadMetric::PeakEwma {
            default_rtt: Duration::from_micros(1_200),
            decay: Duration::from_secs(10),
        })
        .build(fed);
    // B alone first, so its estimate is its latency.
    let b = timed_service(1, Duration::from_millis(3), None);
    tx.insert(1usize, b);
    published(&balance, 1).await;
    assert_eq!(balance.clone().oneshot(()).await.unwrap(), 1);
    let gate = Arc::new(Semaphore::new(0));
    let a = timed_service(0, Duration::from_millis(1), Some(Arc::clone(&gate)));
    tx.insert(0, a);
    published(&balance, 2).await;
    let in_flight_on_a = |balance: &Balance<_, usize>| {
        balance
            .endpoints()
            .iter()
            .find(|e| e.key == 0)
            .map_or(0, |e| e.in_flight)
    };

    let mut held = Vec::new();
    for expected in 1..=2 {
        held.push(tokio::spawn(balance.clone().oneshot(())));
        support::until(&format!("{expected} in flight on A"), || {
            in_flight_on_a(&balance) == expected
        })
        .await;
    }
    // Two on A: 1.2 ms x 3 > 3 ms x 1.
    let third = tokio::time::timeout(Duration::from_secs(1), balance.clone().oneshot(()));
    assert_eq!(third.await.expect("B answers in 3 ms").unwrap(), 1);
    assert_eq!(in_flight_on_a(&balance), 2);
    gate.add_permits(2);
    for request in held {
        assert_eq!(request.await.unwrap().unwrap(), 0);
    }
}

/// Catches a scan that does not visit every endpoint when the random draws find nothing
/// usable: with one connected endpoint among ten, wherever it sits, every request gets it.
#[tokio::test]
async fn the_one_connected_endpoint_of_ten_is_found_wherever_it_is() {
    let _limit = support::time_limit(60);
    for ready in 0..10usize {
        let (feed, balance) = fed_endpoints(Balance::builder().wait_for_endpoints(Duration::ZERO));
        for id in 0..10 {
            let state = if id == ready {
                Connectivity::Ready
            } else {
                Connectivity::Connecting
            };
            insert_with(&feed, &Probe::new(id), &Readiness::new(state));
        }
        published(&balance, 1).await;
        support::until("all ten are listed", || balance.endpoints().len() == 10).await;
        for _ in 0..100 {
            assert_eq!(balance.clone().oneshot(()).await.unwrap(), ready);
        }
    }
}

/// Catches weighted peak-EWMA picks that ignore latency (traffic would follow the weights
/// alone, 40% to the slow one here): unequal weights take the weighted cost path.
#[tokio::test(start_paused = true)]
async fn peak_ewma_sends_less_to_a_slow_endpoint_when_weights_differ() {
    let _limit = support::time_limit(60);
    let (tx, fed) = support::feed::feed();
    for (id, latency_ms, weight) in [(0usize, 1u64, 1u32), (1, 1, 1), (2, 1, 1), (3, 10, 2)] {
        let service = timed_service(id, Duration::from_millis(latency_ms), None);
        let endpoint = Endpoint::new(service).weight(weight);
        tx.insert_endpoint(id, endpoint);
    }
    let balance = Balance::builder()
        .load(LoadMetric::PeakEwma {
            default_rtt: Duration::from_millis(1),
            decay: Duration::from_secs(10),
        })
        .build(fed);
    published(&balance, 1).await;

    let served = served_by_eight_callers(&balance).await;
    let total: usize = served.iter().sum();
    assert!(served[3] * 10 < total, "slow endpoint served {served:?}");
}

/// Catches a last-resort scan that does not visit every endpoint: when nothing is usable,
/// the one endpoint whose owner does not call it unready is asked (its own `poll_ready`
/// decides), wherever it sits, rather than failing as if no endpoint were ready.
#[tokio::test]
async fn with_nothing_usable_the_only_pickable_endpoint_is_asked_wherever_it_is() {
    let _limit = support::time_limit(60);
    for pickable in 0..10usize {
        let (feed, balance) = fed_endpoints(Balance::builder().wait_for_endpoints(Duration::ZERO));
        for id in 0..10 {
            let probe = Probe::new(id);
            let state = if id == pickable {
                probe.fail_ready.store(true, Ordering::SeqCst);
                Connectivity::Ready
            } else {
                Connectivity::Connecting
            };
            insert_with(&feed, &probe, &Readiness::new(state));
        }
        published(&balance, 1).await;
        support::until("all ten are listed", || balance.endpoints().len() == 10).await;
        // The first request finds it failing; after that it is failed and not due for a
        // retry, so only the last-resort scan reaches it.
        for _ in 0..3 {
            let error = balance.clone().oneshot(()).await.unwrap_err();
            assert_eq!(error.to_string(), "not ready", "at {pickable}: {error}");
        }
    }
}

/// Catches a scan of the usable endpoints that does not visit every one: with nine
/// endpoints failed (and not yet due a retry) and one healthy, wherever it sits, every
/// request gets the healthy one, also when the random draws miss it.
#[tokio::test(start_paused = true)]
async fn the_one_healthy_endpoint_among_failed_ones_is_found_wherever_it_is() {
    let _limit = support::time_limit(60);
    for healthy in 0..10usize {
        let (feed, balance) = fed_endpoints(Balance::builder().wait_for_endpoints(Duration::ZERO));
        for id in 0..10 {
            let probe = Probe::new(id);
            probe.fail_ready.store(id != healthy, Ordering::SeqCst);
            insert_with(&feed, &probe, &Readiness::new(Connectivity::Ready));
        }
        published(&balance, 1).await;
        support::until("all ten are listed", || balance.endpoints().len() == 10).await;
        let failed = |balance: &Balance<Counted, usize>| {
            balance
                .endpoints()
                .iter()
                .filter(|e| e.state == EndpointState::Failed)
                .count()
        };
        for _ in 0..1_000 {
            if failed(&balance) == 9 {
                break;
            }
            let _ = balance.clone().oneshot(()).await;
        }
        assert_eq!(
            failed(&balance),
            9,
            "the nine failing ones are marked failed"
        );
        for _ in 0..100 {
            let answer = balance.clone().oneshot(()).await;
            assert_eq!(answer.ok(), Some(healthy), "healthy at {healthy}");
        }
    }
}

/// Catches a handle that reuses a kept clone of one endpoint for another (they would be
/// confused if kept clones were not told apart by their endpoint): a single handle making
/// sequential requests spreads them over all four endpoints.
#[tokio::test]
async fn a_handle_keeping_clones_sends_each_request_to_the_endpoint_picked() {
    let _limit = support::time_limit(60);
    let (feed, balance) = fed(Balance::builder().keep_clones(4));
    for id in 0..4 {
        insert(&feed, &Probe::new(id));
    }
    published(&balance, 1).await;
    support::until("4 endpoints are listed", || balance.endpoints().len() == 4).await;
    let mut handle = balance.clone();
    let mut served = [0usize; 4];
    for _ in 0..400 {
        handle.ready().await.unwrap();
        served[handle.call(()).await.unwrap()] += 1;
    }
    assert!(served.iter().all(|&n| n >= 50), "{served:?}");
}

/// 500 requests from each of 8 concurrent callers; how many each of 4 endpoints served.
async fn served_by_eight_callers<S>(balance: &Balance<S, usize>) -> [usize; 4]
where
    Balance<S, usize>:
        Service<(), Response = usize, Error = tower::BoxError> + Clone + Send + 'static,
    <Balance<S, usize> as Service<()>>::Future: Send,
{
    let served = Arc::new(Mutex::new([0usize; 4]));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let balance = balance.clone();
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                for _ in 0..500 {
                    let id = balance.clone().oneshot(()).await.unwrap();
                    served.lock().unwrap()[id] += 1;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    *served.lock().unwrap()
}
