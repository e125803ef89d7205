//! `LoadBalancedChannel` end to end: real tonic servers on 127.0.0.1, the generated
//! `grpc.health.v1` client, and the in-memory registry.
#![cfg(feature = "tonic")]

use tower_sd_testkit as support;

use support::grpc::{Callers, check, checks, until_endpoints};

use std::sync::Arc;
use std::time::Duration;

use support::servers::TestServer;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{MemoryRegistry, ServiceRegistry};

const SERVICE: &str = "health";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_requests_over_four_servers() {
    let _limit = support::time_limit(120);
    support::trace_init();
    let registry = Arc::new(MemoryRegistry::new());
    let mut servers = Vec::new();
    for n in 0..4 {
        let server = TestServer::grpc(&format!("s{n}")).await;
        registry.register(server.instance(SERVICE)).await.unwrap();
        servers.push(server);
    }
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .connect(Duration::from_secs(5))
        .await
        .unwrap();

    checks(&channel, 8, 1_250).await;
    support::servers::assert_even_spread(&servers, 10_000);
}

/// Registers `n` fresh servers named `{prefix}{i}`.
async fn start(registry: &MemoryRegistry, prefix: &str, n: usize) -> Vec<TestServer> {
    support::servers::register_servers(registry, SERVICE, prefix, n, |name| async move {
        TestServer::grpc(&name).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_churn_under_load_fails_nothing() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let mut live = start(&registry, "a", 2).await;
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let running = Callers::start(&channel, 2);

    for round in 0..4 {
        // Add one server, then remove the oldest the graceful way: deregister, wait until
        // the balancer has dropped it, let its requests finish, then stop it.
        let added = TestServer::grpc(&format!("r{round}")).await;
        registry.register(added.instance(SERVICE)).await.unwrap();
        live.push(added);
        let names: Vec<String> = live.iter().map(|s| s.name.clone()).collect();
        until_endpoints(
            &channel,
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        running.succeed(20).await;

        let leaving = live.remove(0);
        registry.deregister(&leaving.name).await.unwrap();
        let names: Vec<String> = live.iter().map(|s| s.name.clone()).collect();
        until_endpoints(
            &channel,
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        leaving.drain_and_stop().await;
        assert!(
            leaving.served() > 0,
            "{} took traffic while it was live",
            leaving.name
        );
    }
    let (ok, failed) = running.stop().await;
    assert!(
        failed.is_empty(),
        "graceful churn failed requests: {failed:?}"
    );
    assert!(ok >= 80, "only {ok} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_fails_only_until_discovery_removes_it() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "c", 4).await;
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let running = Callers::start(&channel, 2);
    running.succeed(100).await;

    servers[0].crash();
    running.succeed(20).await;
    // Its health check fails: the registry marks it critical and discovery removes it.
    registry
        .set_health("c0", tower_sd::HealthStatus::Critical)
        .unwrap();
    until_endpoints(&channel, &["c1", "c2", "c3"]).await;
    // Only the requests in flight on c0 when it crashed can have failed (one per caller):
    // its connection closing takes it out of the picks before discovery does, and a broken
    // connection is `unavailable`.
    let (_, failed) = running.stop().await;
    assert!(failed.len() <= 2, "{} failed: {failed:?}", failed.len());
    for status in &failed {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let failed_before = failed.len();

    // Once removed it gets no traffic, and nothing fails.
    let crashed_served = servers[0].served();
    let running = Callers::start(&channel, 2);
    running.succeed(200).await;
    let (_, failed) = running.stop().await;
    assert!(failed.is_empty(), "failures after removal: {failed:?}");
    assert_eq!(servers[0].served(), crashed_served);
    eprintln!("failed while the crashed server was still listed: {failed_before}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_steers_away_from_a_slow_server() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "e", 4).await;
    for server in &servers {
        server.set_delay(Duration::from_millis(5));
    }
    // 10x slower; the delays are long enough that scheduling noise on a busy 2-core machine
    // (other tests run in parallel) does not look like latency.
    servers[3].set_delay(Duration::from_millis(50));
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .load(tower_sd::balance::LoadMetric::PeakEwma {
            default_rtt: Duration::from_millis(5),
            decay: Duration::from_secs(10),
        })
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    checks(&channel, 8, 250).await;
    let served: Vec<usize> = servers.iter().map(TestServer::served).collect();
    let total: usize = served.iter().sum();
    assert!(served[3] * 10 < total, "the slow server served {served:?}");
}

#[tokio::test]
async fn no_instances_fails_unavailable_within_the_wait() {
    let _limit = support::time_limit(120);
    let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
    let channel = LoadBalancedChannel::builder(registry, SERVICE)
        .wait_for_endpoints(Duration::from_millis(200))
        .build();
    let mut client = HealthClient::new(channel);
    let started = tokio::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), check(&mut client))
        .await
        .expect("never hangs")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains(SERVICE), "{status:?}");
    // It waited the whole wait, and not much more.
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(200)..Duration::from_secs(2)).contains(&waited),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_keeps_a_handed_over_registry_alive() {
    let _limit = support::time_limit(120);
    let registry = MemoryRegistry::new();
    let server = TestServer::grpc("only").await;
    registry.register(server.instance(SERVICE)).await.unwrap();
    // The caller keeps no reference of its own.
    let channel = LoadBalancedChannel::builder(Arc::new(registry), SERVICE)
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    check(&mut HealthClient::new(channel)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_checks_the_configured_server_name_not_the_dialled_ip() {
    let _limit = support::time_limit(120);
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    use tower_sd::connection::TlsConfig;

    let key = rcgen::generate_simple_self_signed(vec!["health.internal".to_owned()]).unwrap();
    let identity = Identity::from_pem(key.cert.pem(), key.signing_key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        Some((listener.accept().await.map(|(stream, _)| stream), listener))
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(health)
            .serve_with_incoming(incoming),
    );

    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(tower_sd::ServiceInstance::new(
            "tls-1",
            SERVICE,
            "127.0.0.1",
            port,
        ))
        .await
        .unwrap();
    let tls = TlsConfig::with_ca_pem(key.cert.pem().as_bytes()).unwrap();

    // The certificate names `health.internal`; we dial 127.0.0.1 and check that name.
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .tls(tls.clone().server_name("health.internal"))
        .build();
    check(&mut HealthClient::new(channel)).await.unwrap();

    // By default the name checked is the service name, which this certificate does not carry.
    let channel = LoadBalancedChannel::builder(registry, SERVICE)
        .tls(tls)
        .wait_for_endpoints(Duration::from_secs(2))
        .build();
    let status = check(&mut HealthClient::new(channel)).await.unwrap_err();
    assert!(
        format!("{status:?}").to_lowercase().contains("certificate"),
        "expected a certificate name mismatch: {status:?}"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_unavailable_is_ejected() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "u", 4).await;
    let detection = tower_sd::balance::OutlierDetection::default()
        .consecutive_failures(5)
        .base_ejection_time(Duration::from_secs(2));
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .outlier_detection(Some(detection))
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let running = Callers::start(&channel, 2);
    running.succeed(100).await;

    servers[0].set_unavailable(true);
    let before = servers[0].served();
    // 300 more successes: with u0 still picked, a quarter of them would have gone to it.
    running.succeed(300).await;
    let during = servers[0].served() - before;
    let (_, statuses) = running.stop().await;
    for status in &statuses {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let failed = statuses.len();
    // At most the threshold, plus what the two callers had in flight on it.
    assert!((5..=5 + 2).contains(&failed), "{failed} failures");
    assert!(during <= 5 + 2, "it kept receiving traffic: {during}");
    let state = channel
        .endpoints()
        .into_iter()
        .find(|e| e.key == "u0")
        .unwrap()
        .state;
    assert_eq!(state, tower_sd::balance::EndpointState::Ejected);
}

/// Catches a deadline kept only until the response headers, against a server that ignores
/// `grpc-timeout` and leaves its response open: the body must end with `DEADLINE_EXCEEDED`
/// when the channel's deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_ends_a_response_body_the_server_leaves_open() {
    let _limit = support::time_limit(30);
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    let mut server = support::raw_h2::RawH2::start(100).await;
    let registry = Arc::new(MemoryRegistry::new());
    let instance = tower_sd::ServiceInstance::new("raw", SERVICE, "127.0.0.1", server.port);
    registry.register(instance).await.unwrap();
    let mut channel = LoadBalancedChannel::builder(registry, SERVICE)
        .timeout(Duration::from_millis(500))
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let request = http::Request::post("/grpc.health.v1.Health/Watch")
        .body(tonic::body::Body::empty())
        .unwrap();
    let call = channel.ready().await.unwrap().call(request);
    let seen = server
        .request(Duration::from_secs(5))
        .await
        .expect("the request");
    server.respond_open(seen);
    let response = call.await.unwrap();
    let frame = response
        .into_body()
        .frame()
        .await
        .expect("a frame, or its error");
    let status = frame.expect_err("the deadline ends the body");
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        (Duration::from_millis(450)..Duration::from_secs(3)).contains(&took),
        "after {took:?}"
    );
}
