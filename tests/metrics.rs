//! The balancer's metrics, captured with a debugging recorder.
#![cfg(feature = "metrics")]

use tower_sd_testkit as support;

use std::convert::Infallible;

use futures_util::stream;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower::discover::Change;
use tower_sd::balance::{Balance, OutlierDetection};

#[test]
fn requests_ejections_and_updates_are_counted() {
    let _limit = support::time_limit(60);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // A current-thread runtime keeps every task on this thread, under the local recorder.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let good = tower::service_fn(|()| async { Ok::<_, &'static str>(()) });
            let bad = tower::service_fn(|()| async { Err::<(), _>("boom") });
            let changes = vec![
                Ok::<_, Infallible>(Change::Insert(
                    0usize,
                    tower::util::BoxCloneSyncService::new(good),
                )),
                Ok(Change::Insert(
                    1,
                    tower::util::BoxCloneSyncService::new(bad),
                )),
            ];
            let balance = Balance::builder()
                .service_name("metered")
                .outlier_detection(Some(OutlierDetection::default().consecutive_failures(2)))
                .build(tower_sd::endpoint::Endpoints::new(stream::iter(changes)));
            support::until("both endpoints are listed", || {
                balance.endpoints().len() == 2
            })
            .await;
            for _ in 0..50 {
                let _ = balance.clone().oneshot(()).await;
            }
        });
    });

    let mut values = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        values.insert(format!("{} {}", key.key().name(), labels.join(",")), value);
    }
    let counter = |name: &str| match values.get(name) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!(
            "{name}: {other:?} in {:?}",
            values.keys().collect::<Vec<_>>()
        ),
    };
    assert_eq!(counter("tower_sd_ejections_total service=metered"), 1);
    assert_eq!(
        counter("tower_sd_requests_total service=metered,outcome=failure"),
        2
    );
    assert_eq!(
        counter("tower_sd_requests_total service=metered,outcome=success"),
        48
    );
    assert!(counter("tower_sd_updates_total service=metered") >= 1);
    assert!(values.contains_key("tower_sd_last_update_seconds service=metered"));
    assert!(values.contains_key("tower_sd_endpoints service=metered,state=ready"));
}

/// Every metric the snapshot holds, as `name label=value,...` to its value.
fn snapshot(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> std::collections::HashMap<String, DebugValue> {
    let mut values = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let mut labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        values.insert(format!("{} {}", key.key().name(), labels.join(",")), value);
    }
    values
}

#[cfg(feature = "consul")]
#[test]
fn registry_metrics_say_what_fails_what_is_served_and_what_is_followed() {
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::StreamExt;
    use support::fake_consul::{FakeConsul, Fault};
    use tower_sd::registry::consul::ConsulRegistry;
    use tower_sd::registry::{CachedRegistry, FallbackRegistry};
    use tower_sd::{ServiceInstance, ServiceRegistry, StaticRegistry};

    let _limit = support::time_limit(60);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let fake = FakeConsul::start(None).await;
            let consul: Arc<dyn ServiceRegistry> = Arc::new(
                ConsulRegistry::builder()
                    .address(fake.url())
                    .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
                    .requests_per_second(50.0)
                    .build()
                    .unwrap(),
            );
            consul
                .register(ServiceInstance::new("a", "api", "10.0.0.1", 80))
                .await
                .unwrap();
            let cached: Arc<dyn ServiceRegistry> =
                Arc::new(CachedRegistry::builder(consul.clone()).build());
            let last_resort = StaticRegistry::builder()
                .instances(vec![ServiceInstance::new("s", "api", "10.0.0.9", 80)])
                .build()
                .unwrap();
            let chain = FallbackRegistry::builder()
                .then(cached)
                .then(last_resort)
                .failover_after(Duration::from_millis(200))
                .build()
                .unwrap();
            let mut watch = chain.watch(&"api".into());
            assert!(watch.next().await.unwrap().is_ok());
            // A snapshot takes what was recorded since the last one: one per phase.
            let gauge =
                |values: &std::collections::HashMap<String, DebugValue>, name: &str| match values
                    .get(name)
                {
                    Some(DebugValue::Gauge(v)) => v.into_inner(),
                    other => panic!(
                        "{name}: {other:?} in {:?}",
                        values.keys().collect::<Vec<_>>()
                    ),
                };
            let values = snapshot(&snapshotter);
            assert_eq!(
                gauge(
                    &values,
                    "tower_sd_fallback_active registry=consul,service=api"
                ),
                0.0
            );
            assert!(
                gauge(
                    &values,
                    "tower_sd_registry_last_answer_seconds registry=consul,service=api"
                ) > 0.0
            );

            for _ in 0..100_000 {
                fake.inject(Fault::Status(500));
            }
            consul
                .register(ServiceInstance::new("a", "api", "10.0.0.1", 80))
                .await
                .unwrap();
            // Errors until the chain follows the static list.
            loop {
                if let Some(Ok(set)) = watch.next().await
                    && set[0].id == "s"
                {
                    break;
                }
            }
            let values = snapshot(&snapshotter);
            match values
                .get("tower_sd_registry_errors_total kind=status,registry=consul,service=api")
            {
                Some(DebugValue::Counter(n)) => assert!(*n >= 1),
                other => panic!("{other:?} in {:?}", values.keys().collect::<Vec<_>>()),
            }
            assert_eq!(
                gauge(
                    &values,
                    "tower_sd_cache_serving registry=consul,service=api"
                ),
                1.0
            );
            assert_eq!(
                gauge(
                    &values,
                    "tower_sd_fallback_active registry=static,service=api"
                ),
                1.0
            );

            fake.clear_faults();
            loop {
                if let Some(Ok(set)) = watch.next().await
                    && set[0].id != "s"
                {
                    break;
                }
            }
            let values = snapshot(&snapshotter);
            assert_eq!(
                gauge(
                    &values,
                    "tower_sd_cache_serving registry=consul,service=api"
                ),
                0.0
            );
            assert_eq!(
                gauge(
                    &values,
                    "tower_sd_fallback_active registry=consul,service=api"
                ),
                0.0
            );
        });
    });
}

/// Catches a retry, a throttle, a hedge or a health change that goes uncounted: a tonic
/// server answering UNAVAILABLE beside a healthy one, under a retry policy, then hedged
/// calls, both servers health-checked.
#[cfg(feature = "tonic")]
#[test]
fn retries_hedges_and_health_changes_are_counted() {
    use std::sync::Arc;
    use std::time::Duration;

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tower_sd::tonic::LoadBalancedChannel;
    use tower_sd::{MemoryRegistry, ServiceRegistry};

    let _limit = support::time_limit(60);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let registry = Arc::new(MemoryRegistry::new());
            let mut servers = Vec::new();
            for name in ["m0", "m1"] {
                let (server, _reporter) = support::servers::TestServer::grpc_reporting(name).await;
                registry.register(server.instance("metered")).await.unwrap();
                servers.push(server);
            }
            let method = r#""name": [{ "service": "grpc.health.v1.Health", "method": "Check" }]"#;
            let retry: tower_sd::tonic::ServiceConfig = format!(
                r#"{{ "methodConfig": [{{ {method}, "retryPolicy": {{ "maxAttempts": 3,
                    "initialBackoff": "0.001s", "maxBackoff": "0.001s", "backoffMultiplier": 1,
                    "retryableStatusCodes": ["UNAVAILABLE"] }} }}],
                   "retryThrottling": {{ "maxTokens": 4, "tokenRatio": 0.1 }},
                   "healthCheckConfig": {{ "serviceName": "" }} }}"#
            )
            .parse()
            .unwrap();
            let channel = LoadBalancedChannel::builder(registry.clone(), "metered")
                .service_config(retry)
                .outlier_detection(None)
                .connect(Duration::from_secs(5))
                .await
                .unwrap();
            support::until("both serving", || {
                channel
                    .endpoints()
                    .iter()
                    .filter(|e| e.state == tower_sd::balance::EndpointState::Ready)
                    .count()
                    == 2
            })
            .await;
            servers[0].set_unavailable(true);
            for _ in 0..20 {
                let mut client = HealthClient::new(channel.clone());
                let _ = client.check(HealthCheckRequest::default()).await;
            }
            let hedged: tower_sd::tonic::ServiceConfig = format!(
                r#"{{ "methodConfig": [{{ {method}, "hedgingPolicy": {{ "maxAttempts": 2,
                    "hedgingDelay": "0.15s" }} }}] }}"#
            )
            .parse()
            .unwrap();
            servers[0].set_unavailable(false);
            // m0 slow: a call that starts there is won by its hedge on m1; one that starts
            // on m1 answers before its hedging delay.
            servers[0].set_delay(Duration::from_millis(300));
            let hedging = LoadBalancedChannel::builder(registry.clone(), "metered")
                .service_config(hedged)
                .connect(Duration::from_secs(5))
                .await
                .unwrap();
            // An odd number of calls: hedges won can equal hedges sent only by counting the
            // calls a hedge won, not those the first attempt won (the rest).
            for _ in 0..21 {
                let mut client = HealthClient::new(hedging.clone());
                client.check(HealthCheckRequest::default()).await.unwrap();
            }
        });
    });
    let values = snapshot(&snapshotter);
    let counter = |name: &str| match values.get(name) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!(
            "{name}: {other:?} in {:?}",
            values.keys().collect::<Vec<_>>()
        ),
    };
    assert!(counter("tower_sd_retries_total code=14,service=metered") >= 1);
    assert!(counter("tower_sd_retries_throttled_total service=metered") >= 1);
    assert_eq!(
        counter("tower_sd_health_changes_total service=metered,status=serving"),
        2
    );
    let hedges = counter("tower_sd_hedges_total service=metered");
    assert!(hedges >= 1, "some calls started on the slow m0");
    assert_eq!(
        counter("tower_sd_hedges_won_total service=metered"),
        hedges,
        "every hedge won against m0"
    );
    match values.get("tower_sd_call_attempts service=metered") {
        Some(DebugValue::Histogram(attempts)) => {
            assert_eq!(attempts.len(), 20, "one per call with a retry policy");
            assert!(attempts.iter().any(|a| a.into_inner() > 1.0));
        }
        other => panic!("tower_sd_call_attempts: {other:?}"),
    }
}
