//! `Registration`: retries, TTL heartbeats, and the graceful drain, on the in-memory registry
//! (paused time) and on the fake Consul agent.

use tower_sd_testkit as support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::unreliable::Unreliable;
use tokio::time::advance;
use tower_sd::registration::Registration;
use tower_sd::{Error, HealthStatus, MemoryRegistry, ServiceInstance, ServiceRegistry};

fn instance() -> ServiceInstance {
    ServiceInstance::new("api-1", "api", "127.0.0.1", 8080)
}

#[tokio::test(start_paused = true)]
async fn registration_retries_with_backoff_until_accepted() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(Unreliable::default());
    registry.register_failures.store(4, Ordering::SeqCst);
    let registration = Registration::builder(registry.clone(), instance())
        .retry_backoff(Duration::from_millis(100), Duration::from_secs(2))
        .build();
    registration
        .registered(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(registry.register_attempts.load(Ordering::SeqCst), 5);
    assert_eq!(registry.discover(&"api".into()).await.unwrap().len(), 1);

    // The waits between attempts: full jitter under a ceiling that doubles from 100 ms.
    // A hot retry loop waits 0; a fixed delay waits the same every time.
    let times = registry.register_times.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (n, gap) in gaps.iter().enumerate() {
        let ceiling = Duration::from_millis(100 << n);
        assert!(*gap <= ceiling, "wait {n} was {gap:?}, above {ceiling:?}");
    }
    let waited: Duration = gaps.iter().sum();
    assert!(waited >= Duration::from_millis(50), "{gaps:?}");
    let distinct: std::collections::HashSet<_> = gaps.iter().collect();
    assert!(distinct.len() > 1, "the waits are jittered: {gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_ttl_instance_passing_and_shutdown_drains() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(
        MemoryRegistry::builder()
            .ttl(Duration::from_secs(3))
            .build(),
    );
    let registration = Registration::builder(registry.clone(), instance())
        .heartbeat(Duration::from_secs(1))
        .drain_delay(Duration::from_secs(10))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    for _ in 0..30 {
        advance(Duration::from_secs(1)).await;
        assert_eq!(
            registry.health("api-1").await.unwrap(),
            HealthStatus::Passing
        );
    }

    let probe = registration.health();
    assert!(probe.is_serving());
    let shutdown = tokio::spawn(registration.shutdown());
    tokio::task::yield_now().await;
    advance(Duration::from_millis(10)).await;
    // Draining: the health check fails and the instance is in maintenance, out of discovery,
    // but still registered.
    assert!(!probe.is_serving());
    assert_eq!(
        registry.health("api-1").await.unwrap(),
        HealthStatus::Maintenance
    );
    assert!(registry.discover(&"api".into()).await.unwrap().is_empty());
    advance(Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shutdown ends")
        .unwrap()
        .unwrap();
    assert_eq!(
        registry.health("api-1").await.unwrap(),
        HealthStatus::Unknown
    );
}

#[tokio::test(start_paused = true)]
async fn an_invalid_instance_is_not_retried() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(Unreliable::default());
    let bad = ServiceInstance::new("x", "api", "not a host", 80);
    let registration = Registration::builder(registry.clone(), bad).build();
    let started = tokio::time::Instant::now();
    assert!(matches!(
        registration.registered(Duration::from_secs(5)).await,
        Err(Error::InvalidInstance {
            field: "address",
            ..
        })
    ));
    assert_eq!(started.elapsed(), Duration::ZERO, "the refusal, at once");
    // A minute later, still the one attempt the registry rejected.
    advance(Duration::from_secs(60)).await;
    assert_eq!(registry.register_attempts.load(Ordering::SeqCst), 1);
}

#[cfg(feature = "consul")]
#[tokio::test]
async fn consul_ttl_heartbeats_and_drain() {
    let _limit = support::time_limit(60);
    use support::fake_consul::FakeConsul;
    use tower_sd::registry::consul::{ConsulRegistry, HealthCheck, HealthCheckKind};

    let fake = FakeConsul::start(None).await;
    let consul: Arc<dyn ServiceRegistry> = Arc::new(
        ConsulRegistry::builder()
            .address(fake.url())
            // Real time, against an in-process agent: a TTL 15 heartbeats long, so only a
            // heartbeat loop that stopped (not a busy machine) lets it lapse.
            .health_check(HealthCheck::new(HealthCheckKind::Ttl(Duration::from_secs(
                3,
            ))))
            .build()
            .unwrap(),
    );
    let registration = Registration::builder(Arc::clone(&consul), instance())
        .heartbeat(Duration::from_millis(200))
        .drain_delay(Duration::from_secs(2))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    // Past the TTL, the heartbeats have kept it passing.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            consul.discover(&"api".into()).await.unwrap().len(),
            1,
            "kept passing"
        );
    }
    let shutdown = tokio::spawn(registration.shutdown());
    // Within the 2 s drain: in maintenance (out of discovery), still registered.
    support::until_async("the instance is in maintenance", || async {
        consul.health("api-1").await.unwrap() == HealthStatus::Maintenance
    })
    .await;
    assert!(!shutdown.is_finished(), "deregistered only after the drain");
    assert!(consul.discover(&"api".into()).await.unwrap().is_empty());
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shutdown ends")
        .unwrap()
        .unwrap();
    assert_eq!(consul.health("api-1").await.unwrap(), HealthStatus::Unknown);
}

#[cfg(feature = "http")]
#[tokio::test]
async fn the_health_endpoint_turns_503_when_draining() {
    let _limit = support::time_limit(60);
    use tower::ServiceExt;

    let registry = Arc::new(MemoryRegistry::new());
    let registration = Registration::builder(registry, instance())
        .drain_delay(Duration::from_millis(50))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    let app = axum::Router::new().route_service("/healthz", registration.health());
    let get = || {
        http::Request::get("/healthz")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    assert_eq!(app.clone().oneshot(get()).await.unwrap().status(), 200);
    let shutdown = tokio::spawn(registration.shutdown());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(app.clone().oneshot(get()).await.unwrap().status(), 503);
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shutdown ends")
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_registry_that_cannot_register_is_not_retried() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(Unreliable::default());
    registry.read_only.store(true, Ordering::SeqCst);
    let registration = Registration::builder(registry.clone(), instance()).build();
    assert!(matches!(
        registration.registered(Duration::from_secs(5)).await,
        Err(Error::Unsupported {
            operation: "register",
            ..
        })
    ));
    advance(Duration::from_secs(60)).await;
    assert_eq!(registry.register_attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_instance_the_registry_forgot_is_registered_again() {
    let _limit = support::time_limit(60);
    // With heartbeats: the agent restarted, and the next heartbeat finds nothing.
    let registry = Arc::new(
        MemoryRegistry::builder()
            .ttl(Duration::from_secs(3))
            .build(),
    );
    let registration = Registration::builder(registry.clone(), instance())
        .heartbeat(Duration::from_secs(1))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    registry.deregister("api-1").await.unwrap();
    advance(Duration::from_secs(2)).await;
    support::until_async("registered again after a heartbeat", || async {
        registry.health("api-1").await.unwrap() == HealthStatus::Passing
    })
    .await;

    // Without heartbeats: the periodic check finds it missing.
    let registry = Arc::new(Unreliable::default());
    let registration = Registration::builder(registry.clone(), instance())
        .check_every(Duration::from_secs(10))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    registry.inner.deregister("api-1").await.unwrap();
    advance(Duration::from_secs(11)).await;
    support::until_async("registered again after a check", || async {
        registry.health("api-1").await.unwrap() == HealthStatus::Passing
    })
    .await;
    assert_eq!(registry.register_attempts.load(Ordering::SeqCst), 2);
    drop(registration);
}

#[tokio::test(start_paused = true)]
async fn without_maintenance_mode_shutdown_deregisters_first_then_drains() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(Unreliable::default());
    registry.no_maintenance.store(true, Ordering::SeqCst);
    let registration = Registration::builder(registry.clone(), instance())
        .drain_delay(Duration::from_secs(10))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    let probe = registration.health();
    let shutdown = tokio::spawn(registration.shutdown());
    advance(Duration::from_millis(10)).await;
    // Out of discovery at once, while the server keeps serving through the drain.
    assert!(registry.discover(&"api".into()).await.unwrap().is_empty());
    assert!(!probe.is_serving());
    assert!(
        !shutdown.is_finished(),
        "the drain delay runs after deregistering"
    );
    advance(Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shutdown ends")
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_deregistration_is_retried_within_the_shutdown_deadline() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(Unreliable::default());
    registry.deregister_failures.store(2, Ordering::SeqCst);
    let registration = Registration::builder(registry.clone(), instance())
        .drain_delay(Duration::from_secs(1))
        .retry_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    registration.shutdown().await.unwrap();
    assert_eq!(registry.deregister_attempts.load(Ordering::SeqCst), 3);
    assert!(registry.discover(&"api".into()).await.unwrap().is_empty());

    // A registry that never lets go: the deadline ends the shutdown.
    let registry = Arc::new(Unreliable::default());
    registry
        .deregister_failures
        .store(usize::MAX, Ordering::SeqCst);
    let registration = Registration::builder(registry.clone(), instance())
        .drain_delay(Duration::from_secs(1))
        .shutdown_timeout(Duration::from_secs(20))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let error = registration.shutdown().await.unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    assert!(
        registry.deregister_attempts.load(Ordering::SeqCst) > 3,
        "retried meanwhile"
    );
}

#[tokio::test(start_paused = true)]
async fn a_registration_dropped_without_shutdown_leaves_the_registry() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let registration = Registration::builder(registry.clone(), instance()).build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(registry.discover(&"api".into()).await.unwrap().len(), 1);
    drop(registration);
    support::until_async("deregistered in the background", || async {
        registry.discover(&"api".into()).await.unwrap().is_empty()
    })
    .await;
}

/// Catches a shutdown that runs out of time, or is cancelled, mid-drain and leaves the
/// instance registered (in maintenance: out of discovery, but never reaped) until someone
/// cleans up: the rest is done in the background, within the shutdown timeout.
#[tokio::test(start_paused = true)]
async fn a_shutdown_out_of_time_or_cancelled_still_deregisters() {
    let _limit = support::time_limit(60);
    for cancelled in [false, true] {
        let registry = Arc::new(MemoryRegistry::new());
        let registration = Registration::builder(registry.clone(), instance())
            .drain_delay(Duration::from_secs(30))
            .shutdown_timeout(Duration::from_secs(5))
            .build();
        registration
            .registered(Duration::from_secs(5))
            .await
            .unwrap();
        if cancelled {
            let shutdown = tokio::time::timeout(Duration::from_secs(1), registration.shutdown());
            assert!(shutdown.await.is_err(), "cancelled mid-drain");
        } else {
            let error = registration.shutdown().await.unwrap_err();
            assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
        }
        assert_eq!(
            registry.health("api-1").await.unwrap(),
            HealthStatus::Maintenance,
            "still registered when the shutdown ended"
        );
        support::until_async("deregistered in the background", || async {
            registry.health("api-1").await.unwrap() == HealthStatus::Unknown
        })
        .await;
    }
}

#[cfg(feature = "consul")]
#[tokio::test]
async fn a_restarted_consul_agent_gets_the_instance_again() {
    let _limit = support::time_limit(60);
    use support::fake_consul::FakeConsul;
    use tower_sd::registry::consul::{ConsulRegistry, HealthCheck, HealthCheckKind};

    let fake = FakeConsul::start(None).await;
    let consul: Arc<dyn ServiceRegistry> = Arc::new(
        ConsulRegistry::builder()
            .address(fake.url())
            .health_check(HealthCheck::new(HealthCheckKind::Ttl(Duration::from_secs(
                30,
            ))))
            .build()
            .unwrap(),
    );
    let registration = Registration::builder(Arc::clone(&consul), instance())
        .heartbeat(Duration::from_millis(100))
        .build();
    registration
        .registered(Duration::from_secs(5))
        .await
        .unwrap();
    fake.restart_agent();
    // The next heartbeat is answered 404 (unknown check): registered again, and passing.
    support::until_async("registered again on the restarted agent", || async {
        consul.health("api-1").await.unwrap() == HealthStatus::Passing
    })
    .await;
    drop(registration);
}
