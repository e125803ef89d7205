//! `MemoryRegistry` and `StaticRegistry`: the full `ServiceRegistry` semantics.

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use support::{ids, instance};
use tokio::time::{advance, timeout};
use tower_sd::{
    Error, HealthStatus, MemoryRegistry, ServiceQuery, ServiceRegistry, StaticRegistry,
};

/// Whether the watch yields nothing more within a second of (paused) time.
async fn is_quiet(watch: &mut tower_sd::registry::WatchStream) -> bool {
    timeout(Duration::from_secs(1), watch.next()).await.is_err()
}

#[tokio::test]
async fn register_replaces_by_id_and_deregister_is_idempotent() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::new();
    registry.register(instance("a", "svc", 1)).await.unwrap();
    registry.register(instance("a", "svc", 2)).await.unwrap();
    let set = registry.discover(&"svc".into()).await.unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].port, 2);

    registry.deregister("a").await.unwrap();
    registry.deregister("a").await.unwrap();
    registry.deregister("never-registered").await.unwrap();
    assert!(registry.discover(&"svc".into()).await.unwrap().is_empty());
}

#[tokio::test]
async fn register_rejects_invalid_instances_naming_the_field() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::new();
    let cases = [
        (instance("", "svc", 1), "id"),
        (instance("a", "", 1), "name"),
        (instance("a", "svc", 0), "port"),
        (
            tower_sd::ServiceInstance::new("a", "svc", "bad host!", 1),
            "address",
        ),
    ];
    for (bad, field) in cases {
        match registry.register(bad).await {
            Err(Error::InvalidInstance { field: got, .. }) => assert_eq!(got, field),
            other => panic!("expected an invalid {field}, got {other:?}"),
        }
    }
    assert!(registry.discover(&"svc".into()).await.unwrap().is_empty());
}

#[tokio::test]
async fn discover_honours_every_filter() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::builder()
        .datacenter("dc1")
        .namespace("prod")
        .build();
    registry
        .register(
            instance("a", "svc", 1)
                .with_tag("v2")
                .with_tag("eu")
                .with_metadata("canary", "true"),
        )
        .await
        .unwrap();
    registry
        .register(instance("b", "svc", 2).with_tag("v2"))
        .await
        .unwrap();
    registry
        .register(instance("c", "other", 3).with_tag("v2"))
        .await
        .unwrap();

    let found = |query: ServiceQuery| {
        let registry = registry.clone();
        async move {
            let set = registry.discover(&query).await.unwrap();
            ids(&set).into_iter().map(str::to_owned).collect::<Vec<_>>()
        }
    };
    assert_eq!(found("svc".into()).await, ["a", "b"]);
    assert_eq!(
        found(ServiceQuery::new("svc").with_tag("v2")).await,
        ["a", "b"]
    );
    assert_eq!(
        found(ServiceQuery::new("svc").with_tag("v2").with_tag("eu")).await,
        ["a"]
    );
    assert_eq!(
        found(ServiceQuery::new("svc").with_metadata("canary", "true")).await,
        ["a"]
    );
    assert!(
        found(ServiceQuery::new("svc").with_metadata("canary", "false"))
            .await
            .is_empty()
    );
    assert_eq!(
        found(ServiceQuery::new("svc").with_datacenter("dc1")).await,
        ["a", "b"]
    );
    assert!(
        found(ServiceQuery::new("svc").with_datacenter("dc2"))
            .await
            .is_empty()
    );
    assert_eq!(
        found(ServiceQuery::new("svc").with_namespace("prod")).await,
        ["a", "b"]
    );
    assert!(
        found(ServiceQuery::new("svc").with_namespace("dev"))
            .await
            .is_empty()
    );
    assert!(found("nothing".into()).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn watch_yields_current_set_then_each_change_once() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::new();
    registry.register(instance("a", "svc", 1)).await.unwrap();
    let mut watch = registry.watch(&"svc".into());
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a"]);

    // Changes that leave this query's set equal are not sent.
    registry.register(instance("x", "other", 1)).await.unwrap();
    registry.register(instance("a", "svc", 1)).await.unwrap();
    registry.deregister("nope").await.unwrap();
    assert!(is_quiet(&mut watch).await);

    registry.register(instance("b", "svc", 2)).await.unwrap();
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a", "b"]);
    registry.deregister("a").await.unwrap();
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["b"]);
    assert!(is_quiet(&mut watch).await);
}

#[tokio::test(start_paused = true)]
async fn slow_watcher_gets_the_latest_set_not_a_backlog() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::new();
    let mut watch = registry.watch(&"svc".into());
    assert!(watch.next().await.unwrap().unwrap().is_empty());
    for n in 0..10_000u16 {
        registry
            .register(instance(&format!("i{n}"), "svc", n + 1))
            .await
            .unwrap();
        if n % 2 == 1 {
            registry.deregister(&format!("i{}", n - 1)).await.unwrap();
        }
    }
    let set = watch.next().await.unwrap().unwrap();
    assert_eq!(set.len(), 5_000);
    assert!(is_quiet(&mut watch).await);
}

#[tokio::test(start_paused = true)]
async fn set_health_moves_instances_out_of_and_back_into_the_set() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::new();
    registry.register(instance("a", "svc", 1)).await.unwrap();
    registry.register(instance("b", "svc", 2)).await.unwrap();
    let mut watch = registry.watch(&"svc".into());
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a", "b"]);

    registry.set_health("a", HealthStatus::Critical).unwrap();
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["b"]);
    assert_eq!(registry.health("a").await.unwrap(), HealthStatus::Critical);

    registry.set_health("b", HealthStatus::Maintenance).unwrap();
    assert!(watch.next().await.unwrap().unwrap().is_empty());
    assert!(registry.discover(&"svc".into()).await.unwrap().is_empty());

    // Warning still serves (Consul `Weights.Warning`).
    registry.set_health("a", HealthStatus::Warning).unwrap();
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a"]);
    assert_eq!(registry.health("a").await.unwrap(), HealthStatus::Warning);
    assert_eq!(
        registry.health("b").await.unwrap(),
        HealthStatus::Maintenance
    );
    assert_eq!(registry.health("zzz").await.unwrap(), HealthStatus::Unknown);

    assert!(matches!(
        registry.set_health("zzz", HealthStatus::Passing),
        Err(Error::UnknownInstance { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn ttl_not_renewed_turns_critical_then_is_removed() {
    let _limit = support::time_limit(60);
    let ttl = Duration::from_secs(10);
    let reap = Duration::from_secs(60);
    let registry = MemoryRegistry::builder()
        .ttl(ttl)
        .deregister_critical_after(reap)
        .build();
    registry.register(instance("a", "svc", 1)).await.unwrap();
    registry.register(instance("b", "svc", 2)).await.unwrap();
    let mut watch = registry.watch(&"svc".into());
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a", "b"]);

    // Heartbeats keep `a` passing; `b` is never renewed.
    for _ in 0..3 {
        advance(Duration::from_secs(4)).await;
        registry.heartbeat("a").await.unwrap();
    }
    // 12s have passed: b's TTL ran out at 10s, and the watch saw it without any write.
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a"]);
    assert_eq!(registry.health("b").await.unwrap(), HealthStatus::Critical);
    assert_eq!(registry.health("a").await.unwrap(), HealthStatus::Passing);

    // A late heartbeat revives it, as Consul's check/pass would.
    advance(Duration::from_secs(3)).await;
    registry.heartbeat("b").await.unwrap();
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a", "b"]);

    // Now `a` stops heartbeating: critical exactly a TTL after its last heartbeat (at 12 s,
    // so at 22 s: 7 s from now), gone after the reap delay. (An upper bound alone let an
    // instance that turned critical at once pass.)
    let started = tokio::time::Instant::now();
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["b"]);
    assert_eq!(started.elapsed(), Duration::from_secs(7));
    // `b` expires too (it was renewed once, 15s in): the set goes empty.
    assert!(watch.next().await.unwrap().unwrap().is_empty());
    advance(reap).await;
    assert_eq!(registry.health("a").await.unwrap(), HealthStatus::Unknown);
    assert_eq!(registry.health("b").await.unwrap(), HealthStatus::Unknown);
    assert!(matches!(
        registry.heartbeat("a").await,
        Err(Error::UnknownInstance { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn per_instance_ttl_and_manual_critical_reaping() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::builder()
        .deregister_critical_after(Duration::from_secs(60))
        .build();
    registry
        .register_with_ttl(instance("t", "svc", 1), Duration::from_secs(5))
        .unwrap();
    registry.register(instance("m", "svc", 2)).await.unwrap();
    registry.register(instance("p", "svc", 3)).await.unwrap();
    registry.set_health("m", HealthStatus::Critical).unwrap();
    let mut watch = registry.watch(&"svc".into());
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["p", "t"]);
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["p"]);
    advance(Duration::from_secs(61)).await;
    assert_eq!(registry.health("m").await.unwrap(), HealthStatus::Unknown);
    assert_eq!(registry.health("t").await.unwrap(), HealthStatus::Unknown);
    assert_eq!(registry.health("p").await.unwrap(), HealthStatus::Passing);
}

/// Catches a watch that ends with the handle it came from (a balancer built from a
/// registry handed over by value would lose its endpoints): the watch keeps the registry
/// alive, and the registry goes on answering it (a TTL check running out) after its last
/// handle is gone.
#[tokio::test(start_paused = true)]
async fn a_watch_keeps_the_registry_alive() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::new();
    registry
        .register_with_ttl(instance("t", "svc", 1), Duration::from_secs(5))
        .unwrap();
    let mut watch = registry.watch(&"svc".into());
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["t"]);
    drop(registry);
    let set = watch.next().await.expect("the watch goes on").unwrap();
    assert!(
        set.is_empty(),
        "the TTL ran out with no handle left: {set:?}"
    );
}

#[tokio::test]
async fn works_as_a_trait_object() {
    let _limit = support::time_limit(60);
    let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
    registry.register(instance("a", "svc", 1)).await.unwrap();
    assert_eq!(registry.kind(), "memory");
    assert_eq!(registry.discover(&"svc".into()).await.unwrap().len(), 1);
    assert_eq!(registry.health("a").await.unwrap(), HealthStatus::Passing);
}

#[tokio::test(start_paused = true)]
async fn static_registry_is_read_only_and_filters() {
    let _limit = support::time_limit(60);
    let registry = StaticRegistry::builder()
        .instances(vec![
            instance("b", "svc", 2).with_tag("v2"),
            instance("a", "svc", 1),
            instance("c", "other", 3),
        ])
        .build()
        .unwrap();
    assert_eq!(
        ids(&registry.discover(&"svc".into()).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(
        ids(&registry
            .discover(&ServiceQuery::new("svc").with_tag("v2"))
            .await
            .unwrap()),
        ["b"]
    );
    let mut watch = registry.watch(&"svc".into());
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a", "b"]);
    assert!(is_quiet(&mut watch).await);

    for result in [
        registry.register(instance("d", "svc", 4)).await,
        registry.deregister("a").await,
    ] {
        match result {
            Err(error @ Error::Unsupported { .. }) => {
                let source = std::error::Error::source(&error).unwrap().to_string();
                assert!(source.contains("MemoryRegistry"), "{source}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
    assert_eq!(registry.health("a").await.unwrap(), HealthStatus::Passing);
    assert_eq!(registry.health("z").await.unwrap(), HealthStatus::Unknown);
    assert!(matches!(
        registry.heartbeat("a").await,
        Err(Error::Unsupported { .. })
    ));

    let duplicate = StaticRegistry::builder()
        .instances(vec![instance("a", "svc", 1), instance("a", "svc", 2)])
        .build();
    assert!(matches!(
        duplicate,
        Err(Error::InvalidInstance { field: "id", .. })
    ));
    let invalid = StaticRegistry::builder()
        .instances(vec![instance("a", "svc", 0)])
        .build();
    assert!(matches!(
        invalid,
        Err(Error::InvalidInstance { field: "port", .. })
    ));
}

/// Catches a TTL or reap delay added to the clock unchecked (`Duration::MAX` panicked in
/// `register`, `heartbeat` and the watch): such a TTL never runs out, such a reap never
/// comes.
#[tokio::test(start_paused = true)]
async fn huge_ttls_and_reap_delays_never_panic() {
    let _limit = support::time_limit(60);
    let registry = MemoryRegistry::builder()
        .ttl(Duration::MAX)
        .deregister_critical_after(Duration::MAX)
        .build();
    registry.register(instance("a", "svc", 1)).await.unwrap();
    registry
        .register_with_ttl(instance("b", "svc", 2), Duration::MAX)
        .unwrap();
    registry.heartbeat("a").await.unwrap();
    let mut watch = registry.watch(&"svc".into());
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a", "b"]);
    registry.set_health("b", HealthStatus::Critical).unwrap();
    assert_eq!(ids(&watch.next().await.unwrap().unwrap()), ["a"]);
    advance(Duration::from_secs(365 * 24 * 60 * 60)).await;
    assert_eq!(registry.health("a").await.unwrap(), HealthStatus::Passing);
    assert_eq!(registry.health("b").await.unwrap(), HealthStatus::Critical);
}
