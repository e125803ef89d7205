//! gRFC A6 hedging through `LoadBalancedChannel`'s service config, against gRPC C-core
//! servers (Python `grpcio`): the tail it cuts, and the attempts it cancels, counted on
//! the servers.
#![cfg(feature = "tonic")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::grpcio::GrpcIo;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::MemoryRegistry;
use tower_sd::tonic::{LoadBalancedChannel, ServiceConfig};

const SERVICE: &str = "health";

/// The tests of this file run one at a time: the tail test measures latency, which the
/// other's servers would disturb on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn hedging(max_attempts: u32, delay: &str, non_fatal: &[&str]) -> ServiceConfig {
    json!({
        "methodConfig": [{
            "name": [{ "service": "grpc.health.v1.Health" }],
            "hedgingPolicy": {
                "maxAttempts": max_attempts, "hedgingDelay": delay,
                "nonFatalStatusCodes": non_fatal
            }
        }]
    })
    .to_string()
    .parse()
    .unwrap()
}

async fn channel(
    registry: &Arc<MemoryRegistry>,
    config: Option<ServiceConfig>,
) -> LoadBalancedChannel {
    let mut builder = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        // The slow server fails nothing: nothing is ejected either way.
        .outlier_detection(None);
    if let Some(config) = config {
        builder = builder.service_config(config);
    }
    builder.connect(Duration::from_secs(5)).await.unwrap()
}

/// One call tagged `id`; how long it took.
async fn timed_check(channel: &LoadBalancedChannel, id: &str) -> Result<Duration, tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    request
        .metadata_mut()
        .insert("call-id", id.parse().unwrap());
    let started = tokio::time::Instant::now();
    HealthClient::new(channel.clone()).check(request).await?;
    Ok(started.elapsed())
}

/// `calls` calls from 4 tasks; their latencies, sorted.
async fn latencies(channel: &LoadBalancedChannel, prefix: &str, calls: usize) -> Vec<Duration> {
    let tasks: Vec<_> = (0..4)
        .map(|task| {
            let channel = channel.clone();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut times = Vec::new();
                for i in 0..calls / 4 {
                    let id = format!("{prefix}-{task}-{i}");
                    times.push(timed_check(&channel, &id).await.unwrap());
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    all
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() * 99 / 100]
}

/// Catches hedging that does not cut the tail (one of four servers answers in 200 ms, the
/// rest at once: with a 10 ms hedging delay the p99 must be under 50 ms, against some
/// 200 ms without), a losing attempt not cancelled on its server (the slow server must see
/// a cancellation for each hedge that won against it), and a hedge sent back to the
/// instance that is slow on the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_tail_of_a_slow_server_and_cancels_the_losers() {
    let _limit = support::time_limit(180);
    let _alone = ONE_AT_A_TIME.lock().await;
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "h", 4, &[]).await else {
        return;
    };
    servers[3].set(json!({"delay_ms": 200})).await;
    let plain = channel(&registry, None).await;
    let hedged = channel(&registry, Some(hedging(3, "0.01s", &[]))).await;
    const CALLS: usize = 400;
    let unhedged = latencies(&plain, "plain", CALLS).await;
    let before = servers[3].seen().await;
    let with_hedging = latencies(&hedged, "hedged", CALLS).await;
    // The resets reach the server a moment after the winners reach the callers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut after = servers[3].seen().await;
    while after.in_flight > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = servers[3].seen().await;
    }
    eprintln!(
        "p99 without hedging {:?}, with {:?}; p50 {:?} / {:?}",
        p99(&unhedged),
        p99(&with_hedging),
        unhedged[CALLS / 2],
        with_hedging[CALLS / 2]
    );
    assert!(
        p99(&unhedged) >= Duration::from_millis(200),
        "the slow server is slow"
    );
    assert!(
        p99(&with_hedging) < Duration::from_millis(50),
        "p99 {:?}",
        p99(&with_hedging)
    );
    let slow_calls = after.checks - before.checks;
    let cancelled = after.cancelled - before.cancelled;
    assert!(slow_calls > 0, "the slow server was tried");
    assert_eq!(
        cancelled, slow_calls,
        "every attempt left on the slow server was cancelled"
    );
    let mut retried_on_slow = 0;
    for attempt in servers[3].attempts().await {
        if attempt.call.starts_with("hedged") && attempt.previous.is_some() {
            retried_on_slow += 1;
        }
    }
    // A hedge avoids the instance its call tried; the slow one gets hedges only of calls
    // that started elsewhere.
    assert!(retried_on_slow <= slow_calls);
}

/// Catches a non-fatal answer that ends the call (the next attempt must go at once, to
/// another instance), and a fatal one that does not (no further attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_fatal_answer_sends_the_next_attempt_at_once() {
    let _limit = support::time_limit(120);
    let _alone = ONE_AT_A_TIME.lock().await;
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "n", 2, &[]).await else {
        return;
    };
    servers[0].set(json!({"fail_rate": 1.0})).await;
    let hedged = channel(&registry, Some(hedging(2, "10s", &["UNAVAILABLE"]))).await;
    for i in 0..20 {
        let took = timed_check(&hedged, &format!("nf-{i}")).await.unwrap();
        assert!(
            took < Duration::from_secs(5),
            "waited for the hedging delay: {took:?}"
        );
    }
    let failed_first = servers[0].attempts().await.len();
    assert!(failed_first > 0, "s0 got first attempts");
    assert_eq!(
        servers[1].attempts().await.len(),
        20,
        "every call ended on s1, at once after s0's UNAVAILABLE"
    );
    // INTERNAL is fatal: the call ends with it.
    servers[0]
        .set(json!({"fail_rate": 1.0, "fail_code": "INTERNAL"}))
        .await;
    servers[1]
        .set(json!({"fail_rate": 1.0, "fail_code": "INTERNAL"}))
        .await;
    let status = timed_check(&hedged, "fatal").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    let mut attempts = 0;
    for server in &servers {
        attempts += server
            .attempts()
            .await
            .iter()
            .filter(|a| a.call == "fatal")
            .count();
    }
    assert_eq!(attempts, 1);
}
