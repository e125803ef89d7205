//! Panic mode on paused time: below the threshold of usable endpoints, the balancer
//! spreads over all of them, or fails, as configured.

use tower_sd_testkit as support;

use std::time::Duration;

use support::fleet::{Fleet, detection};
use tower::{BoxError, ServiceExt};
use tower_sd::balance::{Balance, EndpointState, PanicMode};

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
