//! gRFC A6 retry policies through `LoadBalancedChannel`'s service config, against gRPC
//! C-core servers (Python `grpcio`) that fail on request. Each test counts attempts where
//! the server sees them (each call carries a `call-id`), not only what the caller got.
#![cfg(feature = "tonic")]

use tower_sd_testkit as support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::grpcio::{Attempt, GrpcIo};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::tonic::{LoadBalancedChannel, ServiceConfig};
use tower_sd::{MemoryRegistry, ServiceRegistry};

const SERVICE: &str = "health";

/// A retry policy for `Check`: UNAVAILABLE retried, `max_attempts` in all, quick backoffs;
/// with `throttling` as the JSON of `retryThrottling`, when given.
fn retrying(max_attempts: u32, throttling: Option<serde_json::Value>) -> ServiceConfig {
    let mut config = json!({
        "methodConfig": [{
            "name": [{ "service": "grpc.health.v1.Health", "method": "Check" }],
            "retryPolicy": {
                "maxAttempts": max_attempts, "initialBackoff": "0.001s", "maxBackoff": "0.01s",
                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
            }
        }]
    });
    if let Some(throttling) = throttling {
        config["retryThrottling"] = throttling;
    }
    config.to_string().parse().unwrap()
}

async fn channel(registry: &Arc<MemoryRegistry>, config: ServiceConfig) -> LoadBalancedChannel {
    LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .service_config(config)
        // Retries alone: nothing ejected, so every instance stays usable.
        .outlier_detection(None)
        .connect(Duration::from_secs(5))
        .await
        .unwrap()
}

/// One `Check` call tagged `id`.
async fn check(channel: &LoadBalancedChannel, id: &str) -> Result<(), tonic::Status> {
    check_with(channel, id, String::new()).await
}

async fn check_with(
    channel: &LoadBalancedChannel,
    id: &str,
    service: String,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest { service });
    request
        .metadata_mut()
        .insert("call-id", id.parse().unwrap());
    HealthClient::new(channel.clone())
        .check(request)
        .await
        .map(drop)
}

/// Every attempt the servers saw, by call: (server index, attempt), in attempt order.
async fn attempts_by_call(servers: &[GrpcIo]) -> HashMap<String, Vec<(usize, Attempt)>> {
    let mut calls: HashMap<String, Vec<(usize, Attempt)>> = HashMap::new();
    for (index, server) in servers.iter().enumerate() {
        for attempt in server.attempts().await {
            calls
                .entry(attempt.call.clone())
                .or_default()
                .push((index, attempt));
        }
    }
    for attempts in calls.values_mut() {
        attempts.sort_by_key(|(_, attempt)| attempt.previous.unwrap_or(0));
    }
    calls
}

/// Catches a policy that does not retry (about 2,000 of 10,000 calls would fail), retries
/// that go back to the instance that just failed them (each call's first three attempts
/// must reach three different servers: no instance is ejected, so all three stay usable),
/// and a wrong `grpc-previous-rpc-attempts`. Three C-core servers fail 20% of calls with
/// UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_unavailable_is_retried_on_other_instances() {
    let _limit = support::time_limit(300);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "s", 3, &[]).await else {
        return;
    };
    for server in &servers {
        server.set(json!({"fail_rate": 0.2})).await;
    }
    let channel = channel(&registry, retrying(5, None)).await;
    const CALLS: usize = 10_000;
    const TASKS: usize = 8;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..CALLS / TASKS {
                if let Err(status) = check(&channel, &format!("{task}-{i}")).await {
                    failed.push(status);
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for task in tasks {
        failed.extend(task.await.unwrap());
    }
    assert!(
        failed.len() * 1000 <= CALLS,
        "{} of {CALLS} calls failed (at most 0.1% may): {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        failed.iter().all(|s| s.message().contains("(5 attempts)")),
        "a failed call says its attempts: {:?}",
        failed.first()
    );
    let calls = attempts_by_call(&servers).await;
    assert_eq!(calls.len(), CALLS, "every call reached a server");
    let mut attempts = 0;
    for (call, tried) in &calls {
        attempts += tried.len();
        let previous: Vec<Option<u32>> = tried.iter().map(|(_, a)| a.previous).collect();
        let expected: Vec<Option<u32>> = (0..tried.len() as u32)
            .map(|n| (n > 0).then_some(n))
            .collect();
        assert_eq!(previous, expected, "call {call}");
        let servers: Vec<usize> = tried.iter().take(3).map(|(s, _)| *s).collect();
        let mut distinct = servers.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            servers.len(),
            "call {call} went back: {servers:?}"
        );
        let last = tried.len() - 1;
        assert!(
            tried[..last].iter().all(|(_, a)| a.failed),
            "call {call}: only a failed attempt is retried"
        );
    }
    eprintln!(
        "{CALLS} calls, {attempts} attempts, {} failed",
        failed.len()
    );
}

/// Catches a throttle that does not stop a retry storm (every server failing: once the
/// bucket drains, attempts per call must fall to at most 1.1) and one that never lets
/// retries resume once the servers recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_failing_drains_the_throttle_and_recovery_refills_it() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "t", 2, &[]).await else {
        return;
    };
    let throttling = json!({ "maxTokens": 10, "tokenRatio": 0.1 });
    let channel = channel(&registry, retrying(5, Some(throttling))).await;
    let set = |behaviour: serde_json::Value| {
        let servers = &servers;
        async move {
            for server in servers {
                server.set(behaviour.clone()).await;
            }
        }
    };
    set(json!({"fail_rate": 1.0})).await;
    for i in 0..200 {
        check(&channel, &format!("storm-{i}")).await.unwrap_err();
    }
    let calls = attempts_by_call(&servers).await;
    let late: usize = (100..200).map(|i| calls[&format!("storm-{i}")].len()).sum();
    assert!(late <= 110, "{late} attempts for the last 100 calls");
    let early = calls["storm-0"].len();
    assert_eq!(early, 5, "a full bucket allows the policy's attempts");

    // Recovery: 100 successes refill the bucket (10 tokens, 0.1 each)...
    set(json!({"fail_rate": 0.0})).await;
    for i in 0..100 {
        check(&channel, &format!("calm-{i}")).await.unwrap();
    }
    // ...and a failing call is retried again.
    set(json!({"fail_rate": 1.0})).await;
    check(&channel, "again").await.unwrap_err();
    let calls = attempts_by_call(&servers).await;
    assert_eq!(calls["again"].len(), 5, "retries resumed");
}

/// Catches pushback ignored (the retry must come no sooner than the server asked) and a
/// retry after a pushback that forbids one (`-1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pushback_sets_the_wait_or_forbids_the_retry() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "p", 1, &[]).await else {
        return;
    };
    let channel = channel(&registry, retrying(2, None)).await;
    servers[0]
        .set(json!({"fail_rate": 1.0, "pushback_ms": 200}))
        .await;
    check(&channel, "wait").await.unwrap_err();
    servers[0]
        .set(json!({"fail_rate": 1.0, "pushback_ms": -1}))
        .await;
    check(&channel, "never").await.unwrap_err();
    let calls = attempts_by_call(&servers).await;
    let wait = &calls["wait"];
    assert_eq!(wait.len(), 2);
    let gap = wait[1].1.at - wait[0].1.at;
    assert!(gap >= Duration::from_millis(200), "retried after {gap:?}");
    assert_eq!(calls["never"].len(), 1, "-1 forbids the retry");
}

/// Catches a committed call retried (the server sent its response headers before failing,
/// so the answer is not trailers-only) and a body larger than the retry buffer replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_calls_and_bodies_past_the_buffer_are_not_retried() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "c", 2, &[]).await else {
        return;
    };
    let channel = channel(&registry, retrying(5, None)).await;
    for server in &servers {
        server
            .set(json!({"fail_rate": 1.0, "headers_first": true}))
            .await;
    }
    let status = check(&channel, "committed").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    for server in &servers {
        server
            .set(json!({"fail_rate": 1.0, "headers_first": false}))
            .await;
    }
    // 100 KiB, past the 64 KiB buffer.
    let big = "x".repeat(100 << 10);
    let status = check_with(&channel, "big", big).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    check_with(&channel, "small", "y".repeat(1 << 10))
        .await
        .unwrap_err();
    let calls = attempts_by_call(&servers).await;
    assert_eq!(calls["committed"].len(), 1);
    assert_eq!(calls["big"].len(), 1);
    assert_eq!(calls["small"].len(), 5, "a body that fits is replayed");
}

/// Catches a method's `timeout` not applied (the call must end at it and the server must
/// see it as `grpc-timeout`), and `waitForReady` not waiting for an instance to appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_timeout_and_wait_for_ready() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(server) = GrpcIo::start(&[]).await else {
        return;
    };
    let config: ServiceConfig = json!({
        "methodConfig": [{
            "name": [{ "service": "grpc.health.v1.Health" }],
            "timeout": "0.3s",
            "waitForReady": true
        }]
    })
    .to_string()
    .parse()
    .unwrap();
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .service_config(config)
        .wait_for_endpoints(Duration::from_millis(20))
        .build();
    // No instance yet: the call waits for one, within its deadline.
    let waiting = tokio::spawn({
        let channel = channel.clone();
        async move { check(&channel, "waits").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    registry
        .register(server.instance("late", SERVICE))
        .await
        .unwrap();
    waiting.await.unwrap().unwrap();

    server.set(json!({"delay_ms": 2000})).await;
    let started = tokio::time::Instant::now();
    let status = check(&channel, "slow").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    let deadline = server.seen().await.deadline.expect("sent as grpc-timeout");
    assert!(
        deadline <= Duration::from_millis(300) && deadline > Duration::from_millis(100),
        "{deadline:?}"
    );
}
