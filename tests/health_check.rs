//! Active health checking (gRFC A17) through `LoadBalancedChannel`'s service config
//! (`healthCheckConfig.serviceName`), against gRPC C-core servers (Python `grpcio`, whose
//! health service is grpcio's own) and a tonic server (tonic-health's). Each test counts
//! the calls each server saw.
#![cfg(feature = "tonic")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::grpcio::GrpcIo;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::balance::EndpointState;
use tower_sd::tonic::{LoadBalancedChannel, ServiceConfig};
use tower_sd::{MemoryRegistry, ServiceRegistry};

const SERVICE: &str = "health";

fn checking(name: &str) -> ServiceConfig {
    json!({ "healthCheckConfig": { "serviceName": name } })
        .to_string()
        .parse()
        .unwrap()
}

async fn channel(registry: &Arc<MemoryRegistry>, name: &str) -> LoadBalancedChannel {
    LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .service_config(checking(name))
        .build()
}

async fn check(channel: &LoadBalancedChannel) -> Result<(), tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
}

/// The state the channel reports for instance `id`.
fn state(channel: &LoadBalancedChannel, id: &str) -> Option<EndpointState> {
    channel
        .endpoints()
        .into_iter()
        .find(|e| e.key == id)
        .map(|e| e.state)
}

/// Waits (at most 10 s) until instance `id` is in `wanted`.
async fn until_state(channel: &LoadBalancedChannel, id: &str, wanted: EndpointState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while state(channel, id) != Some(wanted) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {wanted:?}: {:?}",
            channel.endpoints()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn checks_seen(server: &GrpcIo) -> u64 {
    server.seen().await.checks
}

/// Catches a health check that does not take a `NOT_SERVING` server out of the picks
/// (once the channel reports it not serving, it must get no call), one that closes its
/// connection or drops it from discovery, one that fails the calls already on it, one
/// that picks a server before its first answer (`SERVICE_UNKNOWN` until the test sets the
/// service's status), and one that never brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_not_serving_gets_no_new_calls_and_keeps_its_connection() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "s", 2, &[]).await else {
        return;
    };
    let channel = channel(&registry, "app").await;
    // "app" is unknown to both servers: neither is picked.
    until_state(&channel, "s0", EndpointState::NotServing).await;
    until_state(&channel, "s1", EndpointState::NotServing).await;
    for server in &servers {
        server.health("app", "SERVING").await;
    }
    until_state(&channel, "s0", EndpointState::Ready).await;
    until_state(&channel, "s1", EndpointState::Ready).await;
    for _ in 0..50 {
        check(&channel).await.unwrap();
    }
    assert!(checks_seen(&servers[0]).await > 0 && checks_seen(&servers[1]).await > 0);

    // Calls in flight on s0 when it turns NOT_SERVING finish there.
    for server in &servers {
        server.set(json!({"delay_ms": 300})).await;
    }
    let in_flight: Vec<_> = (0..8)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(async move { check(&channel).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let on_s0 = servers[0].seen().await.in_flight;
    servers[0].health("app", "NOT_SERVING").await;
    until_state(&channel, "s0", EndpointState::NotServing).await;
    for call in in_flight {
        call.await.unwrap().unwrap();
    }
    assert!(on_s0 > 0, "some calls were on s0 when it went out");
    for server in &servers {
        server.set(json!({"delay_ms": 0})).await;
    }
    let before = checks_seen(&servers[0]).await;
    for _ in 0..100 {
        check(&channel).await.unwrap();
    }
    assert_eq!(checks_seen(&servers[0]).await, before, "s0 got calls");
    let seen = servers[0].seen().await;
    assert_eq!(seen.connections, 1, "its connection stayed open");
    assert_eq!(channel.endpoints().len(), 2, "still discovered");

    servers[0].health("app", "SERVING").await;
    until_state(&channel, "s0", EndpointState::Ready).await;
    for _ in 0..50 {
        check(&channel).await.unwrap();
    }
    assert!(checks_seen(&servers[0]).await > before, "s0 is back");
}

/// Catches a server without the health service (its Watch answers UNIMPLEMENTED) kept out
/// of the picks, and its Watch retried (A17: checking stops for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_health_service_stays_in_use() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(server) = GrpcIo::start(&[]).await else {
        return;
    };
    server.set(json!({"watch_code": "UNIMPLEMENTED"})).await;
    registry
        .register(server.instance("u0", SERVICE))
        .await
        .unwrap();
    let channel = channel(&registry, "app").await;
    until_state(&channel, "u0", EndpointState::Ready).await;
    for _ in 0..20 {
        check(&channel).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.seen().await.watches, 1, "not retried");
}

/// Catches a broken health stream taking the instance out (the server answers SERVING,
/// then fails the stream every 50 ms; or fails it before any answer), and a stream not
/// watched again after it broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_health_stream_does_not_take_the_instance_out() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let Some(servers) = GrpcIo::registered(&registry, SERVICE, "b", 2, &[]).await else {
        return;
    };
    servers[0].set(json!({"watch_break_ms": 50})).await;
    servers[1].set(json!({"watch_code": "INTERNAL"})).await;
    let channel = channel(&registry, "").await;
    until_state(&channel, "b0", EndpointState::Ready).await;
    until_state(&channel, "b1", EndpointState::Ready).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(state(&channel, "b0"), Some(EndpointState::Ready));
        assert_eq!(state(&channel, "b1"), Some(EndpointState::Ready));
        check(&channel).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for server in &servers {
        assert!(checks_seen(server).await > 0, "both in use");
        let watches = server.seen().await.watches;
        assert!(
            (2..200).contains(&watches),
            "watched again, with backoff: {watches}"
        );
    }
}

/// Catches a check that reads tonic-health's answers wrong: a tonic server whose reporter
/// sets the service not serving gets no calls, and gets them again once it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_server_reporting_not_serving_is_passed_over() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let mut reporters = Vec::new();
    let mut servers = Vec::new();
    for id in ["t0", "t1"] {
        let (server, reporter) = support::servers::TestServer::grpc_reporting(id).await;
        reporter
            .set_service_status("app", tonic_health::ServingStatus::Serving)
            .await;
        registry.register(server.instance(SERVICE)).await.unwrap();
        reporters.push(reporter);
        servers.push(server);
    }
    let channel = channel(&registry, "app").await;
    until_state(&channel, "t0", EndpointState::Ready).await;
    until_state(&channel, "t1", EndpointState::Ready).await;
    reporters[0]
        .set_service_status("app", tonic_health::ServingStatus::NotServing)
        .await;
    until_state(&channel, "t0", EndpointState::NotServing).await;
    assert_eq!(state(&channel, "t1"), Some(EndpointState::Ready));
    let before = servers[0].served();
    for _ in 0..20 {
        check(&channel).await.unwrap();
    }
    assert_eq!(servers[0].served(), before, "t0 got calls");
    reporters[0]
        .set_service_status("app", tonic_health::ServingStatus::Serving)
        .await;
    until_state(&channel, "t0", EndpointState::Ready).await;
}
