//! Zone preference on paused time: the local zone while it has enough usable endpoints
//! (a count and a share), else every zone.

use tower_sd_testkit as support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use support::fleet::{Flaky, detection};
use tower::ServiceExt;
use tower_sd::balance::{Balance, ZonePreference};

/// Instances 0 and 1 in zone `a`, 2 and 3 in zone `b`, of service `svc`.
async fn two_zones() -> tower_sd::MemoryRegistry {
    let registry = tower_sd::MemoryRegistry::new();
    for (id, zone) in ["a", "a", "b", "b"].into_iter().enumerate() {
        let instance =
            tower_sd::ServiceInstance::new(id.to_string(), "svc", "127.0.0.1", 1000 + id as u16)
                .with_zone(zone);
        tower_sd::ServiceRegistry::register(&registry, instance)
            .await
            .unwrap();
    }
    registry
}

#[tokio::test(start_paused = true)]
async fn zone_preference_stays_local_then_falls_back() {
    let _limit = support::time_limit(60);
    let registry = two_zones().await;
    let switches: Vec<Arc<AtomicBool>> = (0..4).map(|_| Arc::new(AtomicBool::new(false))).collect();
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

#[tokio::test(start_paused = true)]
async fn zone_preference_skips_a_zone_whose_endpoints_are_not_ready() {
    let _limit = support::time_limit(60);
    let registry = two_zones().await;
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
