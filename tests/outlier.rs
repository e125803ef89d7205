//! Production balancing on paused time: outlier ejection and its growth and cap, probes,
//! the max-ejection percentage, panic mode, slow start, zone preference, and retries.

use tower_sd_testkit as support;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::advance;
use tower::{BoxError, Service, ServiceExt};
use tower_sd::balance::{
    Balance, BalanceBuilder, EndpointState, OutlierDetection, PanicMode, ZonePreference,
};

/// An endpoint that answers its id, or fails while its switch is on; counts its calls. Its
/// answers can also be held back for ever (`hang`), and its `poll_ready` made to fail.
#[derive(Clone)]
struct Flaky {
    id: usize,
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    hang: Arc<AtomicBool>,
    unready: Arc<AtomicBool>,
    /// `poll_ready` calls answered "not ready".
    refusals: Arc<AtomicUsize>,
}

impl Flaky {
    fn new(id: usize, failing: Arc<AtomicBool>, calls: Arc<AtomicUsize>) -> Self {
        Self {
            id,
            failing,
            calls,
            hang: Arc::default(),
            unready: Arc::default(),
            refusals: Arc::default(),
        }
    }
}

impl Service<()> for Flaky {
    type Response = usize;
    type Error = &'static str;
    type Future = futures_util::future::BoxFuture<'static, Result<usize, &'static str>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(if self.unready.load(Ordering::SeqCst) {
            self.refusals.fetch_add(1, Ordering::SeqCst);
            Err("not ready")
        } else {
            Ok(())
        })
    }

    fn call(&mut self, (): ()) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = |failing: &AtomicBool, id| {
            if failing.load(Ordering::SeqCst) {
                Err("boom")
            } else {
                Ok(id)
            }
        };
        if !self.hang.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(answer(&self.failing, self.id)));
        }
        // Held until the switch is turned off, then answered as the endpoint is then.
        let (hang, failing, id) = (Arc::clone(&self.hang), Arc::clone(&self.failing), self.id);
        Box::pin(async move {
            while hang.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            answer(&failing, id)
        })
    }
}

struct Fleet {
    switches: Vec<Arc<AtomicBool>>,
    calls: Vec<Arc<AtomicUsize>>,
    hangs: Vec<Arc<AtomicBool>>,
    unready: Vec<Arc<AtomicBool>>,
    refusals: Vec<Arc<AtomicUsize>>,
    feed: support::feed::Feed<usize, Flaky>,
    balance: Balance<Flaky, usize>,
}

impl Fleet {
    async fn new(n: usize, builder: BalanceBuilder) -> Self {
        let (feed, fed) = support::feed::feed();
        let balance = builder.build(fed);
        let mut fleet = Self {
            switches: Vec::new(),
            calls: Vec::new(),
            hangs: Vec::new(),
            unready: Vec::new(),
            refusals: Vec::new(),
            feed,
            balance,
        };
        for _ in 0..n {
            fleet.add().await;
        }
        fleet
    }

    async fn add(&mut self) -> usize {
        let id = self.switches.len();
        let flaky = Flaky::new(id, Arc::default(), Arc::default());
        self.switches.push(Arc::clone(&flaky.failing));
        self.calls.push(Arc::clone(&flaky.calls));
        self.hangs.push(Arc::clone(&flaky.hang));
        self.unready.push(Arc::clone(&flaky.unready));
        self.refusals.push(Arc::clone(&flaky.refusals));
        self.feed.insert(id, flaky);
        support::until("the endpoint is listed", || {
            self.balance.endpoints().iter().any(|e| e.key == id)
        })
        .await;
        id
    }

    /// Calls the endpoint has received, successful or not.
    fn calls(&self, id: usize) -> usize {
        self.calls[id].load(Ordering::SeqCst)
    }

    fn fail(&self, id: usize, failing: bool) {
        self.switches[id].store(failing, Ordering::SeqCst);
    }

    /// Sends `n` requests; returns successes per endpoint and the number of failures.
    async fn send(&self, n: usize) -> (HashMap<usize, usize>, usize) {
        let (mut served, mut failed) = (HashMap::new(), 0);
        for _ in 0..n {
            match self.balance.clone().oneshot(()).await {
                Ok(id) => *served.entry(id).or_default() += 1,
                Err(_) => failed += 1,
            }
        }
        (served, failed)
    }

    fn state(&self, id: usize) -> (EndpointState, Option<Duration>) {
        let e = self
            .balance
            .endpoints()
            .into_iter()
            .find(|e| e.key == id)
            .unwrap();
        (e.state, e.ejected_for)
    }
}

fn detection() -> OutlierDetection {
    OutlierDetection::default()
        .consecutive_failures(3)
        .base_ejection_time(Duration::from_secs(30))
        .max_ejection_time(Duration::from_secs(75))
}

#[tokio::test(start_paused = true)]
async fn ejects_after_consecutive_failures_and_grows_then_caps_the_ejection() {
    let _limit = support::time_limit(60);
    let fleet = Fleet::new(2, Balance::builder().outlier_detection(Some(detection()))).await;
    fleet.fail(0, true);
    let (served, failed) = fleet.send(200).await;
    assert_eq!(
        failed, 3,
        "exactly the threshold failed before the ejection"
    );
    assert_eq!(served[&1], 197);
    assert_eq!(
        fleet.state(0),
        (EndpointState::Ejected, Some(Duration::from_secs(30)))
    );

    // When the ejection ends, one probe decides; it fails, so the ejection doubles...
    // (Each wait goes 1 ms past the end: tokio's paused clock lands a nanosecond short.)
    advance(Duration::from_millis(30_001)).await;
    let (_, failed) = fleet.send(50).await;
    assert_eq!(failed, 1, "a single probe");
    assert_eq!(
        fleet.state(0),
        (EndpointState::Ejected, Some(Duration::from_secs(60)))
    );

    // ...and then is capped at max_ejection_time (3 x 30 s > 75 s).
    advance(Duration::from_millis(60_001)).await;
    let (_, failed) = fleet.send(50).await;
    assert_eq!(failed, 1);
    assert_eq!(
        fleet.state(0),
        (EndpointState::Ejected, Some(Duration::from_secs(75)))
    );
}

#[tokio::test(start_paused = true)]
async fn a_successful_probe_returns_the_endpoint() {
    let _limit = support::time_limit(60);
    let fleet = Fleet::new(2, Balance::builder().outlier_detection(Some(detection()))).await;
    fleet.fail(0, true);
    fleet.send(20).await;
    assert_eq!(fleet.state(0).0, EndpointState::Ejected);

    fleet.fail(0, false);
    advance(Duration::from_secs(29)).await;
    let (served, _) = fleet.send(100).await;
    assert!(!served.contains_key(&0), "still ejected: {served:?}");
    advance(Duration::from_millis(1_001)).await;
    let (served, failed) = fleet.send(400).await;
    assert_eq!(failed, 0);
    assert!(
        served[&0] > 100,
        "back in rotation after the probe: {served:?}"
    );
    assert_eq!(fleet.state(0), (EndpointState::Ready, None));

    // The multiplier was reset: the next ejection is the base time again.
    fleet.fail(0, true);
    fleet.send(100).await;
    assert_eq!(
        fleet.state(0),
        (EndpointState::Ejected, Some(Duration::from_secs(30)))
    );
}

/// "Consecutive" means it: a success in between starts the count again. Catches a count
/// that a success does not reset (the fifth failure overall would eject).
#[tokio::test(start_paused = true)]
async fn a_success_between_failures_starts_the_count_again() {
    let _limit = support::time_limit(60);
    let everything = detection().max_ejection_percent(100);
    let fleet = Fleet::new(1, Balance::builder().outlier_detection(Some(everything))).await;
    for _ in 0..3 {
        fleet.fail(0, true);
        assert_eq!(fleet.send(2).await.1, 2);
        fleet.fail(0, false);
        assert_eq!(fleet.send(1).await.0[&0], 1);
        assert_eq!(fleet.state(0).0, EndpointState::Ready, "never 3 in a row");
    }
    fleet.fail(0, true);
    fleet.send(3).await;
    assert_eq!(fleet.state(0).0, EndpointState::Ejected, "3 in a row");
}

/// The threshold set is the one used: with 1 of 2 ejected (50% usable), the default 50%
/// does not panic, 60% does. Catches a builder that drops the setting.
#[tokio::test(start_paused = true)]
async fn the_panic_threshold_set_is_the_one_used() {
    let _limit = support::time_limit(60);
    for (threshold, panics) in [(None, false), (Some(60), true)] {
        let mut builder = Balance::builder().outlier_detection(Some(detection()));
        if let Some(threshold) = threshold {
            builder = builder.panic_threshold(threshold);
        }
        let fleet = Fleet::new(2, builder).await;
        fleet.fail(0, true);
        fleet.send(50).await;
        assert_eq!(fleet.state(0).0, EndpointState::Ejected);
        fleet.fail(0, false);
        let (served, _) = fleet.send(200).await;
        assert_eq!(
            served.contains_key(&0),
            panics,
            "threshold {threshold:?}: {served:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn at_most_max_ejection_percent_are_ejected() {
    let _limit = support::time_limit(60);
    let builder = Balance::builder()
        .outlier_detection(Some(detection().max_ejection_percent(50)))
        .panic_threshold(0);
    let fleet = Fleet::new(4, builder).await;
    for id in 0..3 {
        fleet.fail(id, true);
    }
    fleet.send(400).await;
    let ejected = (0..4)
        .filter(|&id| fleet.state(id).0 == EndpointState::Ejected)
        .count();
    assert_eq!(ejected, 2, "half of 4");
}

#[tokio::test(start_paused = true)]
async fn panic_mode_balances_across_all_or_fails() {
    let _limit = support::time_limit(60);
    let everything = detection().max_ejection_percent(100);
    let fleet = Fleet::new(4, Balance::builder().outlier_detection(Some(everything))).await;
    for id in 0..3 {
        fleet.fail(id, true);
    }
    fleet.send(400).await;
    assert_eq!(
        (0..4)
            .filter(|&id| fleet.state(id).0 == EndpointState::Ejected)
            .count(),
        3
    );
    // 1 of 4 usable is below the 50% threshold: traffic goes to all four again.
    for id in 0..3 {
        fleet.fail(id, false);
    }
    let (served, _) = fleet.send(400).await;
    assert_eq!(
        served.len(),
        4,
        "panic mode spreads over every endpoint: {served:?}"
    );

    let failing = Balance::builder()
        .outlier_detection(Some(everything))
        .panic_mode(PanicMode::Fail)
        .wait_for_endpoints(Duration::ZERO);
    let fleet = Fleet::new(4, failing).await;
    for id in 0..3 {
        fleet.fail(id, true);
    }
    fleet.send(400).await;
    let error: BoxError = fleet.balance.clone().oneshot(()).await.unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<tower_sd::Error>(),
            Some(tower_sd::Error::NoHealthyEndpoints {
                ejected: 3,
                total: 4,
                ..
            })
        ),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_a_new_endpoint_up() {
    let _limit = support::time_limit(60);
    let builder = Balance::builder()
        .slow_start(Duration::from_secs(10))
        .outlier_detection(None);
    let mut fleet = Fleet::new(1, builder).await;
    advance(Duration::from_secs(60)).await;
    let new = fleet.add().await;
    let share =
        |served: &HashMap<usize, usize>| served.get(&new).copied().unwrap_or(0) as f64 / 4000.0;

    advance(Duration::from_secs(1)).await;
    let early = share(&fleet.send(4000).await.0);
    advance(Duration::from_secs(4)).await;
    let middle = share(&fleet.send(4000).await.0);
    advance(Duration::from_secs(6)).await;
    let done = share(&fleet.send(4000).await.0);
    // With two idle endpoints P2C splits evenly; the new one keeps ramp x its half.
    assert!(early < 0.10, "at 10% of the window: {early}");
    assert!(
        (0.18..0.32).contains(&middle),
        "at half the window: {middle}"
    );
    assert!((0.44..0.56).contains(&done), "after the window: {done}");
}

#[tokio::test(start_paused = true)]
async fn zone_preference_stays_local_then_falls_back() {
    let _limit = support::time_limit(60);
    let registry = tower_sd::MemoryRegistry::new();
    let switches: Vec<Arc<AtomicBool>> = (0..4).map(|_| Arc::new(AtomicBool::new(false))).collect();
    for (id, zone) in ["a", "a", "b", "b"].into_iter().enumerate() {
        let instance =
            tower_sd::ServiceInstance::new(id.to_string(), "svc", "127.0.0.1", 1000 + id as u16)
                .with_zone(zone);
        tower_sd::ServiceRegistry::register(&registry, instance)
            .await
            .unwrap();
    }
    let make_switches = switches.clone();
    let balance = Balance::builder()
        .zone_preference(ZonePreference::new("a").min_endpoints(2))
        .outlier_detection(Some(detection()))
        .build(tower_sd::RegistryDiscover::new(
            &registry,
            "svc",
            move |instance| {
                let id: usize = instance.id.parse().unwrap();
                Ok::<_, Infallible>(Flaky::new(
                    id,
                    Arc::clone(&make_switches[id]),
                    Arc::default(),
                ))
            },
        ));
    support::until("4 endpoints are listed", || balance.endpoints().len() >= 4).await;
    let send = |n: usize| {
        let balance = balance.clone();
        async move {
            let mut served: HashMap<usize, usize> = HashMap::new();
            for _ in 0..n {
                if let Ok(id) = balance.clone().oneshot(()).await {
                    *served.entry(id).or_default() += 1;
                }
            }
            served
        }
    };
    let served = send(400).await;
    assert!(
        served.keys().all(|&id| id < 2),
        "local zone only: {served:?}"
    );

    // One local endpoint ejected: fewer than 2 usable in zone a, so all zones serve.
    switches[0].store(true, Ordering::SeqCst);
    send(50).await;
    let served = send(400).await;
    assert!(
        served.contains_key(&2) && served.contains_key(&3),
        "fell back: {served:?}"
    );
}

/// A retry policy with tower's budget: retries failed requests while the budget allows.
#[derive(Clone)]
struct RetryFailures(Arc<tower::retry::budget::TpsBudget>);

impl tower::retry::Policy<(), usize, BoxError> for RetryFailures {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _: &mut (), result: &mut Result<usize, BoxError>) -> Option<Self::Future> {
        use tower::retry::budget::Budget;
        match result {
            Ok(_) => {
                self.0.deposit();
                None
            }
            Err(_) => self.0.withdraw().then(|| std::future::ready(())),
        }
    }

    fn clone_request(&mut self, (): &()) -> Option<()> {
        Some(())
    }
}

#[tokio::test(start_paused = true)]
async fn retries_with_a_budget_reach_another_endpoint() {
    let _limit = support::time_limit(60);
    // With a single failure ejecting, a retried request cannot land on the endpoint that just
    // failed it: the retry's own pick sees that endpoint ejected.
    let once = OutlierDetection::default().consecutive_failures(1);
    let fleet = Fleet::new(3, Balance::builder().outlier_detection(Some(once))).await;
    fleet.fail(0, true);
    let budget = Arc::new(tower::retry::budget::TpsBudget::new(
        Duration::from_secs(10),
        10,
        0.2,
    ));
    let mut retrying = tower::ServiceBuilder::new()
        .retry(RetryFailures(budget))
        .service(fleet.balance.clone());
    for _ in 0..100 {
        let id = retrying.ready().await.unwrap().call(()).await.unwrap();
        assert_ne!(id, 0);
    }
    // Endpoint 0 failed one request (which the retry then served elsewhere) and was ejected.
    assert_eq!(fleet.calls(0), 1);
    assert_eq!(fleet.state(0).0, EndpointState::Ejected);
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_retry_budget_stops_retrying() {
    let _limit = support::time_limit(60);
    // Every endpoint fails, so every attempt withdraws from the budget and none deposits:
    // its reserve (min_per_sec x ttl = 5 retries; time does not pass) is all the retrying
    // there is, whatever the number of requests.
    let fleet = Fleet::new(3, Balance::builder().outlier_detection(None)).await;
    for id in 0..3 {
        fleet.fail(id, true);
    }
    let budget = Arc::new(tower::retry::budget::TpsBudget::new(
        Duration::from_secs(1),
        5,
        0.0,
    ));
    let mut retrying = tower::ServiceBuilder::new()
        .retry(RetryFailures(budget))
        .service(fleet.balance.clone());
    for _ in 0..20 {
        assert!(retrying.ready().await.unwrap().call(()).await.is_err());
    }
    let attempts: usize = (0..3).map(|id| fleet.calls(id)).sum();
    assert_eq!(
        attempts,
        20 + 5,
        "each request once, plus the budget's 5 retries"
    );
}

// ===== probes and ejections on every path =====

/// One failure ejects, for 10 s; up to half the endpoints.
fn quick() -> BalanceBuilder {
    let detection = OutlierDetection::default()
        .consecutive_failures(1)
        .base_ejection_time(Duration::from_secs(10))
        .max_ejection_time(Duration::from_secs(10));
    Balance::builder().outlier_detection(Some(detection))
}

/// Ejects endpoint 0 of `fleet` with one failed request, then lets the ejection run out.
async fn eject_then_expire(fleet: &Fleet) {
    fleet.fail(0, true);
    support::until_async("endpoint 0 is ejected", || async {
        let _ = fleet.balance.clone().oneshot(()).await;
        fleet.state(0).0 == EndpointState::Ejected
    })
    .await;
    fleet.fail(0, false);
    advance(Duration::from_millis(10_001)).await;
}

/// 300 requests over a simulated minute; returns how many endpoint `id` served.
async fn minute_of_traffic(fleet: &Fleet, id: usize) -> usize {
    let mut served = 0;
    for _ in 0..300 {
        if fleet
            .balance
            .clone()
            .oneshot(())
            .await
            .is_ok_and(|got| got == id)
        {
            served += 1;
        }
        advance(Duration::from_millis(200)).await;
    }
    eprintln!("endpoint {id} served {served} of 300 over the minute");
    served
}

#[tokio::test(start_paused = true)]
async fn a_probe_its_caller_gave_up_on_is_sent_again() {
    let _limit = support::time_limit(60);
    let fleet = Fleet::new(3, quick()).await;
    eject_then_expire(&fleet).await;
    // The first pick after the ejection probes endpoint 0, which now holds its answers: the
    // caller times out and drops the probe.
    fleet.hangs[0].store(true, Ordering::SeqCst);
    let probe = tokio::time::timeout(Duration::from_secs(1), fleet.balance.clone().oneshot(()));
    assert!(
        probe.await.is_err(),
        "the probe went to the hanging endpoint"
    );
    assert_eq!(fleet.calls(0), 2, "one failure, then the probe");
    // It recovers: the next pick probes it again, it answers, and it is back in rotation.
    fleet.hangs[0].store(false, Ordering::SeqCst);
    let served = minute_of_traffic(&fleet, 0).await;
    assert!(
        served > 50,
        "endpoint 0 served {served} of 300 after recovering"
    );
    assert_eq!(fleet.state(0).0, EndpointState::Ready);
}

/// An endpoint whose `poll_ready` fails is asked again after 50 ms, then 100 ms, 200 ms...
/// up to 5 s, however many requests come meanwhile. Catches a schedule that grows in the
/// wrong direction or from the wrong start, and a hot retry on every pick.
#[tokio::test(start_paused = true)]
async fn a_failed_endpoint_is_asked_again_with_a_doubling_backoff() {
    let _limit = support::time_limit(60);
    let fleet = Fleet::new(2, Balance::builder()).await;
    fleet.unready[0].store(true, Ordering::SeqCst);
    support::until_async("endpoint 0 is asked once", || async {
        let _ = fleet.balance.clone().oneshot(()).await;
        fleet.refusals[0].load(Ordering::SeqCst) == 1
    })
    .await;
    let mut asked = 1;
    for backoff_ms in [50, 100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000] {
        advance(Duration::from_millis(backoff_ms - 2)).await;
        fleet.send(100).await;
        assert_eq!(
            fleet.refusals[0].load(Ordering::SeqCst),
            asked,
            "not again before {backoff_ms} ms"
        );
        advance(Duration::from_millis(3)).await;
        fleet.send(100).await;
        asked += 1;
        assert_eq!(
            fleet.refusals[0].load(Ordering::SeqCst),
            asked,
            "again after {backoff_ms} ms"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_endpoint_is_not_ready_is_sent_again_once_it_is() {
    let _limit = support::time_limit(60);
    let fleet = Fleet::new(3, quick()).await;
    eject_then_expire(&fleet).await;
    // The probe's pick finds endpoint 0 not ready: the request goes elsewhere, and the probe
    // is released rather than held by a request that never ran.
    fleet.unready[0].store(true, Ordering::SeqCst);
    let id = fleet.balance.clone().oneshot(()).await.unwrap();
    assert_ne!(id, 0);
    fleet.unready[0].store(false, Ordering::SeqCst);
    let served = minute_of_traffic(&fleet, 0).await;
    assert!(served > 50, "endpoint 0 served {served} of 300 once ready");
    assert_eq!(fleet.state(0).0, EndpointState::Ready);
}

#[tokio::test(start_paused = true)]
async fn a_probe_dropped_between_poll_ready_and_call_is_sent_again() {
    let _limit = support::time_limit(60);
    let fleet = Fleet::new(3, quick()).await;
    eject_then_expire(&fleet).await;
    // A handle picks (the pick is the probe) and is dropped before it calls.
    let mut handle = fleet.balance.clone();
    std::future::poll_fn(|cx| handle.poll_ready(cx))
        .await
        .unwrap();
    drop(handle);
    assert_eq!(fleet.calls(0), 1, "only the failure that ejected it");
    let served = minute_of_traffic(&fleet, 0).await;
    assert!(served > 50, "endpoint 0 served {served} of 300");
    assert_eq!(fleet.state(0).0, EndpointState::Ready);
}

/// A request that was running on an endpoint before it was ejected, abandoned while the
/// endpoint's probe is out, leaves the probe claimed: the endpoint still gets nothing else
/// until the probe answers. Catches releasing the probe for any abandoned request (a second
/// probe would go out while the first is unanswered).
#[tokio::test(start_paused = true)]
async fn an_abandoned_request_that_was_not_the_probe_leaves_the_probe_claimed() {
    let _limit = support::time_limit(60);
    let fleet = Fleet::new(3, quick()).await;
    // One request on each endpoint, its response never polled: each stays in flight, so
    // the loads tie and endpoint 0 is still picked often enough to be ejected.
    let mut held = HashMap::new();
    while held.len() < 3 {
        let mut handle = fleet.balance.clone();
        handle.ready().await.unwrap();
        let before: Vec<usize> = (0..3).map(|id| fleet.calls(id)).collect();
        let response = handle.call(());
        let id = (0..3).find(|&id| fleet.calls(id) > before[id]).unwrap();
        match held.entry(id) {
            Entry::Vacant(slot) => {
                slot.insert(response);
            }
            Entry::Occupied(_) => {
                response.await.unwrap();
            }
        }
    }
    eject_then_expire(&fleet).await;
    // The next pick is the probe; it too is held unanswered.
    let calls = fleet.calls(0);
    let mut handle = fleet.balance.clone();
    handle.ready().await.unwrap();
    let probe = handle.call(());
    assert_eq!(fleet.calls(0), calls + 1, "the next request is the probe");
    drop(held.remove(&0));
    fleet.send(100).await;
    assert_eq!(
        fleet.calls(0),
        calls + 1,
        "no request but the probe while it is out"
    );
    assert_eq!(probe.await.unwrap(), 0, "the probe answers");
    assert_eq!(fleet.state(0).0, EndpointState::Ready);
}

#[tokio::test(start_paused = true)]
async fn an_ejection_ending_is_probed_by_the_next_pick() {
    let _limit = support::time_limit(60);
    // With 50 endpoints, a pick that only probes what it samples would need ~25 picks to
    // find the one whose ejection ended.
    let fleet = Fleet::new(50, quick()).await;
    eject_then_expire(&fleet).await;
    let calls = fleet.calls(0);
    fleet.balance.clone().oneshot(()).await.unwrap();
    assert_eq!(
        fleet.calls(0),
        calls + 1,
        "the very next request is the probe"
    );
    assert_eq!(fleet.state(0).0, EndpointState::Ready);
}

#[tokio::test(start_paused = true)]
async fn failures_on_removed_endpoints_do_not_leak_the_ejected_count() {
    let _limit = support::time_limit(60);
    // Four endpoints, at most half ejected, failing endpoints fail the panic threshold into
    // failing requests: a leaked ejection count would make every pick fail.
    let builder = quick()
        .panic_mode(PanicMode::Fail)
        .wait_for_endpoints(Duration::ZERO);
    let mut fleet = Fleet::new(4, builder).await;
    // Three rolling deploys: a request in flight on the old endpoint fails after discovery
    // removed it (its replacement arrives under a new key).
    for old in 0..3 {
        fleet.hangs[old].store(true, Ordering::SeqCst);
        fleet.fail(old, true);
        let mut requests = Vec::new();
        while fleet.calls(old) == 0 {
            let mut handle = fleet.balance.clone();
            handle.ready().await.unwrap();
            requests.push(tokio::spawn(handle.call(())));
        }
        fleet.feed.remove(old);
        fleet.add().await;
        support::until("removed", || {
            !fleet.balance.endpoints().iter().any(|e| e.key == old)
        })
        .await;
        // The held request completes now, as a failure of the removed endpoint.
        fleet.hangs[old].store(false, Ordering::SeqCst);
        for request in requests {
            let _ = request.await.unwrap();
        }
    }
    // None of the current endpoints is ejected, so requests succeed...
    let (_, failed) = fleet.send(100).await;
    assert_eq!(failed, 0, "no pick failed as if endpoints were ejected");
    // ...and ejection still works: a failing endpoint is ejected.
    let live = fleet.balance.endpoints()[0].key;
    fleet.fail(live, true);
    fleet.send(50).await;
    assert_eq!(fleet.state(live).0, EndpointState::Ejected);
}

#[tokio::test(start_paused = true)]
async fn zone_preference_skips_a_zone_whose_endpoints_are_not_ready() {
    let _limit = support::time_limit(60);
    let registry = tower_sd::MemoryRegistry::new();
    for (id, zone) in ["a", "a", "b", "b"].into_iter().enumerate() {
        let instance =
            tower_sd::ServiceInstance::new(id.to_string(), "svc", "127.0.0.1", 1000 + id as u16)
                .with_zone(zone);
        tower_sd::ServiceRegistry::register(&registry, instance)
            .await
            .unwrap();
    }
    let unready: Vec<Arc<AtomicBool>> = (0..4).map(|_| Arc::default()).collect();
    let make = unready.clone();
    let balance = Balance::builder()
        .zone_preference(ZonePreference::new("a").min_endpoints(2))
        .build(tower_sd::RegistryDiscover::new(
            &registry,
            "svc",
            move |instance| {
                let id: usize = instance.id.parse().unwrap();
                let mut flaky = Flaky::new(id, Arc::default(), Arc::default());
                flaky.unready = Arc::clone(&make[id]);
                Ok::<_, Infallible>(flaky)
            },
        ));
    support::until("4 endpoints are listed", || balance.endpoints().len() == 4).await;
    // The local zone, while it is ready.
    for _ in 0..50 {
        assert!(balance.clone().oneshot(()).await.unwrap() < 2);
    }
    // Both local endpoints stop being ready: once they are known to fail, the other zone
    // serves every request.
    unready[0].store(true, Ordering::SeqCst);
    unready[1].store(true, Ordering::SeqCst);
    let _ = balance.clone().oneshot(()).await;
    let _ = balance.clone().oneshot(()).await;
    for _ in 0..200 {
        let id = balance
            .clone()
            .oneshot(())
            .await
            .expect("the other zone serves");
        assert!(id >= 2, "{id}");
    }
}

/// Catches a minimum share computed wrongly (added instead of multiplied, say): a local
/// zone holding 3 of 10 endpoints is preferred with a 30% minimum share and not with 50%.
#[tokio::test(start_paused = true)]
async fn a_local_zone_below_its_minimum_share_is_not_preferred() {
    let _limit = support::time_limit(60);
    for (percent, local_only) in [(30u8, true), (50, false)] {
        let registry = tower_sd::MemoryRegistry::new();
        for id in 0..10usize {
            let zone = if id < 3 { "a" } else { "b" };
            let instance = tower_sd::ServiceInstance::new(
                id.to_string(),
                "svc",
                "127.0.0.1",
                1000 + id as u16,
            )
            .with_zone(zone);
            tower_sd::ServiceRegistry::register(&registry, instance)
                .await
                .unwrap();
        }
        let balance = Balance::builder()
            .zone_preference(
                ZonePreference::new("a")
                    .min_endpoints(1)
                    .min_share_percent(percent),
            )
            .build(tower_sd::RegistryDiscover::new(
                &registry,
                "svc",
                move |instance| {
                    let id: usize = instance.id.parse().unwrap();
                    Ok::<_, Infallible>(Flaky::new(id, Arc::default(), Arc::default()))
                },
            ));
        support::until("10 endpoints are listed", || {
            balance.endpoints().len() >= 10
        })
        .await;
        let mut remote = 0;
        for _ in 0..300 {
            if balance.clone().oneshot(()).await.unwrap() >= 3 {
                remote += 1;
            }
        }
        if local_only {
            assert_eq!(remote, 0, "{percent}%: 3 of 10 is enough");
        } else {
            assert!(
                remote > 100,
                "{percent}%: only {remote} of 300 left the zone"
            );
        }
    }
}
