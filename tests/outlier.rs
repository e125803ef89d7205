//! Outlier detection on paused time: ejection after consecutive failures, its growth and
//! cap, the max-ejection percentage, and the probe that ends an ejection, on every path a
//! request can take (answered, dropped, abandoned, its endpoint not ready or removed).

use tower_sd_testkit as support;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::fleet::{Fleet, detection};
use tokio::time::advance;
use tower::{Service, ServiceExt};
use tower_sd::balance::{Balance, BalanceBuilder, EndpointState, OutlierDetection, PanicMode};

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

/// 300 requests over a simulated minute; returns how many endpoint `id` served. Catches a
/// probe that is not sent again, or whose end ejects the endpoint once more (#33 item 12:
/// a second 10 s ejection still served more than 50): `id` serves within the first 25
/// requests (5 s; random picks miss it that long once in 25,000 runs) and is never ejected
/// again once it has served.
async fn minute_of_traffic(fleet: &Fleet, id: usize) -> usize {
    let mut served = 0;
    for n in 0..300 {
        if fleet
            .balance
            .clone()
            .oneshot(())
            .await
            .is_ok_and(|got| got == id)
        {
            served += 1;
        }
        // Until its probe answers it still shows as ejected; after, never again.
        let ejected = fleet.state(id).0 == EndpointState::Ejected;
        assert!(served == 0 || !ejected, "ejected again at {n}");
        assert!(n < 25 || served > 0, "endpoint {id} unused for 25 requests");
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
