//! Conformance with gRPC C-core's server (Python `grpcio`), which nobody here wrote: GOAWAY at
//! `max_connection_age`, its keepalive policy (ping strikes and GOAWAY `too_many_pings`),
//! small stream limits, a server killed under load, and one whose calls fail. Each test
//! sets the server's own options and counts what the server saw, not only what the client
//! got.
#![cfg(feature = "tonic")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::grpc::Callers;
use support::grpcio::GrpcIo;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::MemoryRegistry;
use tower_sd::tonic::LoadBalancedChannel;

const SERVICE: &str = "health";

/// `n` servers with these options, registered as `{prefix}{i}`; `None` when grpcio is
/// missing (the test is skipped, saying so).
async fn servers(
    registry: &MemoryRegistry,
    prefix: &str,
    n: usize,
    options: &[(&str, i64)],
) -> Option<Vec<GrpcIo>> {
    GrpcIo::registered(registry, SERVICE, prefix, n, options).await
}

async fn channel(registry: &Arc<MemoryRegistry>) -> LoadBalancedChannel {
    LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .connect(Duration::from_secs(5))
        .await
        .unwrap()
}

/// A task that ends as soon as the channel reports an instance failing
/// (`TransientFailure`), checking every millisecond.
fn watch_for_failures(channel: &LoadBalancedChannel) -> tokio::task::JoinHandle<()> {
    let channel = channel.clone();
    tokio::spawn(async move {
        loop {
            let endpoints = channel.endpoints();
            if endpoints
                .iter()
                .any(|e| e.connectivity == Some(tower_sd::endpoint::Connectivity::TransientFailure))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Catches a GOAWAY at the server's connection age treated as a failure (backoff, an
/// instance reported failing and out of the picks, outlier ejections) and requests it
/// refused reaching the caller: C-core closes each connection after 300 ms, and every call
/// must succeed with neither instance ever reported failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_at_the_connection_age_under_load_fails_no_call() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let options = [
        ("grpc.max_connection_age_ms", 300),
        ("grpc.max_connection_age_grace_ms", 10_000),
    ];
    let Some(servers) = servers(&registry, "age", 2, &options).await else {
        return;
    };
    let channel = channel(&registry).await;
    let failing = watch_for_failures(&channel);
    let running = Callers::start(&channel, 8);
    running.succeed(500).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.succeed(500).await;
    let ejected = channel.ejected();
    let (ok, failed) = running.stop().await;
    failing.abort();
    assert!(
        failing.await.is_err(),
        "an instance was reported failing after a graceful GOAWAY"
    );
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
    assert_eq!(ejected, 0, "nothing failed, so nothing is ejected");
    let mut connections = 0;
    for server in &servers {
        connections += server.seen().await.connections;
    }
    assert!(
        connections >= 6,
        "the servers closed connections every 300 ms for over 2 s: {connections} seen"
    );
}

/// Catches callers overfilling a connection (each passes the room check before any has
/// sent), the overflow queued inside a full connection behind streams that never end, and
/// a waiter starved by newcomers: C-core allows 2 streams per connection, 5 of the 8 slots
/// of the instance's 4 connections are held by quiet `Watch` streams, and 6 unary callers
/// share the other 3. Every one of them must make progress, and none may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_stream_limit_starves_no_caller_and_fails_no_call() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = servers(
        &registry,
        "narrow",
        1,
        &[("grpc.max_concurrent_streams", 2)],
    )
    .await
    else {
        return;
    };
    let channel = channel(&registry).await;
    let mut watches = Vec::new();
    for _ in 0..5 {
        let mut client = HealthClient::new(channel.clone());
        let mut stream = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("the first status");
        watches.push(stream);
    }
    let running = Callers::start(&channel, 6);
    running.succeed(1_500).await;
    let each = running.each();
    let (ok, failed) = running.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
    let fewest = *each.iter().min().unwrap();
    assert!(
        fewest * 6 * 4 >= ok,
        "a caller was starved: {each:?} (each should get about a sixth)"
    );
    let seen = servers[0].seen().await;
    assert!(
        seen.max_in_flight <= 8,
        "over the 4 connections' 8 streams: {seen:?}"
    );
    assert_eq!(seen.watches, 5, "{seen:?}");
    drop(watches);
}

/// Catches an instance still picked after its server died (its calls would fail until the
/// registry notices) and failures beyond the calls in flight on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_at_most_the_calls_in_flight() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(mut servers) = servers(&registry, "kill", 2, &[]).await else {
        return;
    };
    let channel = channel(&registry).await;
    let running = Callers::start(&channel, 8);
    running.succeed(300).await;
    servers[0].kill();
    running.succeed(1_000).await;
    let (_, failed) = running.stop().await;
    assert!(
        failed.len() <= 8,
        "at most the 8 calls in flight on the killed server: {} failed: {:?}",
        failed.len(),
        failed.first()
    );
    for status in &failed {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
}

/// Catches outlier detection that does not see C-core's trailers-only `UNAVAILABLE`: the
/// failing server keeps its share of the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_failing_its_calls_is_ejected() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = servers(&registry, "fail", 3, &[]).await else {
        return;
    };
    servers[0]
        .set(json!({"fail_rate": 1.0, "fail_code": "UNAVAILABLE"}))
        .await;
    let channel = channel(&registry).await;
    let running = Callers::start(&channel, 4);
    running.succeed(2_000).await;
    let (ok, failed) = running.stop().await;
    let bad = servers[0].seen().await;
    assert_eq!(
        bad.failed as usize,
        failed.len(),
        "every failure is the bad server's"
    );
    assert!(
        failed.len() * 20 < ok,
        "ejected after a few failures: {} failed, {ok} succeeded",
        failed.len()
    );
    for status in &failed {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
}

/// Catches keepalive that ignores the server's GOAWAY `too_many_pings` (gRFC A8: the
/// interval doubles for new connections, or every connection dies the same way) and a
/// doubling that does not hold. C-core here allows a ping every 15 s while it sends no
/// data, and closes the connection at the second strike: pings every 10 s (the floor) on a
/// quiet `Watch` end the first connection after about 30 s, and the next one, pinging
/// every 20 s, holds its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_pings_doubles_the_keepalive_interval() {
    let _limit = support::time_limit(150);
    let registry = Arc::new(MemoryRegistry::new());
    let options = [
        ("grpc.http2.min_ping_interval_without_data_ms", 15_000),
        ("grpc.http2.max_ping_strikes", 1),
    ];
    let Some(servers) = servers(&registry, "pings", 1, &options).await else {
        return;
    };
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .http2_keep_alive_interval(Some(Duration::from_secs(10)))
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let mut client = HealthClient::new(channel.clone());
    let request = || HealthCheckRequest {
        service: String::new(),
    };
    let mut first = client.watch(request()).await.unwrap().into_inner();
    first.message().await.unwrap().expect("SERVING");
    let ended = tokio::time::timeout(Duration::from_secs(60), first.message())
        .await
        .expect("the server ends the pinging connection within a minute");
    let status = ended.expect_err("ended by the server's GOAWAY");
    println!("the first stream ended: {status:?}");

    let mut second = client.watch(request()).await.unwrap().into_inner();
    second.message().await.unwrap().expect("SERVING");
    let held = tokio::time::timeout(Duration::from_secs(45), second.message()).await;
    assert!(
        held.is_err(),
        "the stream on a connection pinging every 20 s holds: {held:?}"
    );
    let seen = servers[0].seen().await;
    assert_eq!(seen.connections, 2, "{seen:?}");
}

/// The defaults against C-core's own ping policy (one ping per 5 minutes without data, two
/// strikes): a quiet stream is held for 6 minutes, past three strikes of pings every 30 s
/// (the old default, which ended such a stream after 150 s), and ends only when the client
/// ends it. Slow: run by `.ci/run` with `--ignored`, not by the README's test command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: holds a quiet stream 6 minutes against C-core's default ping policy"]
async fn a_quiet_stream_outlives_the_default_ping_policy() {
    let _limit = support::time_limit(420);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = servers(&registry, "quiet", 1, &[]).await else {
        return;
    };
    let channel = channel(&registry).await;
    let mut client = HealthClient::new(channel);
    let mut stream = client
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("SERVING");
    let held = tokio::time::timeout(Duration::from_secs(360), stream.message()).await;
    assert!(held.is_err(), "the quiet stream ended: {held:?}");
    assert_eq!(servers[0].seen().await.connections, 1);
}

/// Catches a deadline that stops at the response headers (tonic's `Endpoint::timeout` does:
/// a server stream then runs past it, gRPC's interop case `timeout_on_sleeping_server`) and
/// one the server is not told of: a quiet `Watch` through a channel with a 1 s timeout
/// ends with `DEADLINE_EXCEEDED` at about 1 s, and C-core saw `grpc-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_deadline_covers_a_whole_server_stream() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = servers(&registry, "deadline", 1, &[]).await else {
        return;
    };
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .timeout(Duration::from_secs(1))
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut stream = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("SERVING");
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the deadline ends the stream");
    let status = ended.expect_err("ended by its deadline");
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
        "ended after {took:?}"
    );
    let told = servers[0]
        .seen()
        .await
        .deadline
        .expect("grpc-timeout was sent");
    assert!(
        told <= Duration::from_secs(1) && told > Duration::from_millis(500),
        "{told:?}"
    );
}
