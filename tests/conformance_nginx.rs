//! Conformance with nginx's HTTP/2 server, which nobody here wrote: what it rejects, when it
//! closes connections (GOAWAY after `keepalive_requests`), and its stream limit.
#![cfg(all(feature = "http", feature = "tonic"))]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::grpc::Callers;
use support::nginx::{Config, Nginx};
use support::servers::TestServer;
use tower::ServiceExt;
use tower_sd::connection::{ConnectionSettings, TlsConfig};
use tower_sd::http::{DiscoveryLayer, HostHeader};
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{MemoryRegistry, ServiceRegistry};

async fn get(
    client: &tower_sd::http::ConnectionDiscovery<Empty<Bytes>>,
    uri: &str,
) -> Result<(http::StatusCode, Bytes), tower::BoxError> {
    let request = http::Request::get(uri).body(Empty::new())?;
    let response = client.clone().oneshot(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Catches a `Host` header sent beside `:authority` (nginx answers 400 "client sent
/// duplicate host header" to any such request), and a logical host lost on the way: nginx
/// must see the service name as the host under the default policy, and the instance's
/// address under `HostHeader::Instance`.
#[tokio::test]
async fn nginx_takes_requests_over_connections_with_the_host_in_authority() {
    let _limit = support::time_limit(60);
    let Some(nginx) = Nginx::start(&Config::default()).await else {
        return;
    };
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(nginx.instance("n0", "web"))
        .await
        .unwrap();
    let logical = DiscoveryLayer::new(registry.clone())
        .over_connections::<Empty<Bytes>>(ConnectionSettings::default());
    let (status, body) = get(&logical, "http://web/a").await.unwrap();
    assert_eq!(
        (status, &body[..]),
        (http::StatusCode::OK, &b"ok"[..]),
        "{}",
        nginx.log()
    );

    let instance = DiscoveryLayer::new(registry.clone())
        .host_header(HostHeader::Instance)
        .over_connections::<Empty<Bytes>>(ConnectionSettings::default());
    let (status, _) = get(&instance, "http://web/b").await.unwrap();
    assert_eq!(status, http::StatusCode::OK, "{}", nginx.log());

    let logged = nginx.logged(2).await;
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert_eq!(logged[0].host, "web", "{logged:?}");
    assert_eq!(logged[0].protocol, "HTTP/2.0");
    assert_eq!(logged[1].host, "127.0.0.1", "{logged:?}");
}

/// Catches a TLS dial that checks the certificate against the dialled IP address (the
/// server name defaults to the service name) or an `h2` ALPN nginx does not see, against
/// nginx's TLS listener.
#[tokio::test]
async fn nginx_takes_requests_over_tls() {
    let _limit = support::time_limit(60);
    let ca = support::pki::Ca::new("conformance CA");
    let leaf = ca.leaf(&["web"], &[]);
    let Some(nginx) = Nginx::start(&Config::default().tls(&leaf)).await else {
        return;
    };
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(nginx.instance("n0", "web"))
        .await
        .unwrap();
    let tls = TlsConfig::with_ca_pem(ca.cert_pem.as_bytes()).unwrap();
    let client = DiscoveryLayer::new(registry.clone())
        .over_connections::<Empty<Bytes>>(ConnectionSettings::default().tls(tls));
    for _ in 0..3 {
        let (status, body) = get(&client, "http://web/").await.unwrap();
        assert_eq!(
            (status, &body[..]),
            (http::StatusCode::OK, &b"ok"[..]),
            "{}",
            nginx.log()
        );
    }
    let logged = nginx.logged(3).await;
    assert_eq!(logged.len(), 3, "{logged:?}");
    assert!(
        logged
            .iter()
            .all(|r| r.host == "web" && r.protocol == "HTTP/2.0"),
        "{logged:?}"
    );
    assert_eq!(
        nginx.connections(),
        1,
        "one connection carries them all: {logged:?}"
    );
}

/// Two nginx instances in front of one tonic server, each closing every connection with
/// GOAWAY(NO_ERROR) after 10 requests.
async fn nginx_pair(
    keepalive_requests: u32,
) -> Option<(TestServer, [Nginx; 2], Arc<MemoryRegistry>)> {
    let backend = TestServer::grpc("backend").await;
    let config = Config::grpc_pass(backend.port).keepalive_requests(keepalive_requests);
    let first = Nginx::start(&config).await?;
    let second = Nginx::start(&config).await?;
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(first.instance("n0", "health"))
        .await
        .unwrap();
    registry
        .register(second.instance("n1", "health"))
        .await
        .unwrap();
    Some((backend, [first, second], registry))
}

/// Catches a graceful GOAWAY treated as a failed connect (the instance backs off, and
/// throughput falls to a few requests a second), requests refused by a GOAWAY reaching the
/// caller, and outlier detection ejecting instances for requests that were never
/// processed: nginx closes each connection after 10 requests, and 3,000 calls from 8
/// callers must all succeed, with nothing ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_closing_connections_after_ten_requests_fails_no_call() {
    let _limit = support::time_limit(120);
    let Some((backend, nginx, registry)) = nginx_pair(10).await else {
        return;
    };
    let channel = LoadBalancedChannel::builder(registry, "health")
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let running = Callers::start(&channel, 8);
    running.succeed(3_000).await;
    let ejected = channel.ejected();
    let (ok, failed) = running.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
    assert_eq!(ejected, 0, "nothing failed, so nothing is ejected");
    let connections = nginx[0].connections() + nginx[1].connections();
    assert!(
        connections >= ok / 10,
        "nginx closed a connection every 10 requests: {connections} connections for {ok} calls"
    );
    assert!(backend.served() >= ok);
}

/// `requests` GETs from each of `callers` tasks through `client`; the failures.
async fn load(
    client: &tower_sd::http::ConnectionDiscovery<Empty<Bytes>>,
    callers: usize,
    requests: usize,
) -> Vec<String> {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for _ in 0..requests {
                    match get(&client, "http://web/").await {
                        Ok((http::StatusCode::OK, _)) => {}
                        Ok((status, _)) => failed.push(status.to_string()),
                        Err(error) => failed.push(error.to_string()),
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for task in tasks {
        failed.extend(task.await.unwrap());
    }
    failed
}

/// Catches, over `DiscoveryLayer::over_connections`, what the gRPC test above catches for
/// the channel: nginx closes each connection after 10 requests, and 2,000 GETs from 8
/// callers all succeed, without any instance reported failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_connections_nginx_closing_connections_fails_no_request() {
    let _limit = support::time_limit(120);
    let config = Config::default().keepalive_requests(10);
    let Some(first) = Nginx::start(&config).await else {
        return;
    };
    let Some(second) = Nginx::start(&config).await else {
        return;
    };
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(first.instance("n0", "web"))
        .await
        .unwrap();
    registry
        .register(second.instance("n1", "web"))
        .await
        .unwrap();
    let client = DiscoveryLayer::new(registry.clone())
        .over_connections::<Empty<Bytes>>(ConnectionSettings::default());
    let failed = load(&client, 8, 250).await;
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    // nginx logs a request after it answered: wait for the lines, and a moment more for any
    // request sent twice.
    let served = || first.requests().len() + second.requests().len();
    support::until("nginx logs the requests", || served() >= 2_000).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let served = served();
    assert_eq!(
        served, 2_000,
        "each GET once: nothing lost, nothing sent twice"
    );
    let connections = first.connections() + second.connections();
    assert!(
        connections >= 200,
        "a GOAWAY every 10 requests: {connections} connections"
    );
    assert!(
        client
            .endpoints("web")
            .iter()
            .all(|e| e.state != tower_sd::balance::EndpointState::Failed),
        "{:?}",
        client.endpoints("web")
    );
}

/// Catches callers overfilling nginx's connections (its `http2_max_concurrent_streams`,
/// here 2) and waiters starved behind long streams: 5 quiet `Watch` streams through nginx
/// hold 5 of the 8 slots of the instance's 4 connections, and 6 unary callers share the
/// rest; none may fail and each must make progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_with_two_streams_per_connection_starves_no_caller() {
    let _limit = support::time_limit(120);
    let backend = TestServer::grpc("backend").await;
    let Some(nginx) = Nginx::start(&Config::grpc_pass(backend.port).max_streams(2)).await else {
        return;
    };
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(nginx.instance("n0", "health"))
        .await
        .unwrap();
    let channel = LoadBalancedChannel::builder(registry, "health")
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let mut watches = Vec::new();
    for _ in 0..5 {
        let request = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let mut stream = client.watch(request).await.unwrap().into_inner();
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
    assert!(fewest * 6 * 4 >= ok, "a caller was starved: {each:?}");
    assert!(
        nginx.connections() <= 4,
        "at most 4 connections: {}",
        nginx.connections()
    );
    drop(watches);
}

/// The wrapped client's retry policy and health probe against nginx over HTTP/1.1
/// (hyper-util's client; neither end written here), counting in nginx's log what reached
/// it. Catches retries that do not happen (a GET failing while another nginx serves), a
/// retry back to the nginx that failed it (each GET reaches it at most once), a POST
/// retried unmarked (nginx would log it twice), a probe that leaves a failing instance in
/// the picks (its log would grow), and one that does not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_client_retries_and_probes_nginx_over_http1() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tower::Layer;
    use tower_sd::balance::EndpointState;

    let _limit = support::time_limit(60);
    let (Some(n0), Some(n1)) = (
        Nginx::start(&Config::default().http1()).await,
        Nginx::start(&Config::default().http1()).await,
    ) else {
        return;
    };
    let registry = Arc::new(MemoryRegistry::new());
    registry.register(n0.instance("n0", "web")).await.unwrap();
    registry.register(n1.instance("n1", "web")).await.unwrap();
    let client = DiscoveryLayer::new(registry)
        .balancer(|b| b.outlier_detection(None))
        .layer(Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>())
        .retry_policy(support::http_policies::retry_policy())
        .health_probe(support::http_policies::probe());
    let state = |key: &str| {
        let endpoints = client.endpoints("web");
        endpoints
            .into_iter()
            .find(|e| e.key == key)
            .map(|e| e.state)
    };
    let send = |method: http::Method, idempotent: bool| {
        let mut request = http::Request::builder()
            .method(method)
            .uri("http://web/")
            .body(Empty::new())
            .unwrap();
        if idempotent {
            request.extensions_mut().insert(tower_sd::http::Idempotent);
        }
        let client = client.clone();
        async move { client.oneshot(request).await.unwrap().status() }
    };
    // The first request makes the balancer; the probes start with it.
    assert_eq!(send(http::Method::GET, false).await, 200);
    support::until("both serving", || {
        state("n0") == Some(EndpointState::Ready) && state("n1") == Some(EndpointState::Ready)
    })
    .await;

    let start = (n0.requests_for("/"), n1.requests_for("/"));
    n0.set_failing(true);
    for _ in 0..100 {
        assert_eq!(send(http::Method::GET, false).await, 200, "{}", n0.log());
    }
    support::until("n1 logs 100 GETs", || n1.requests_for("/") >= start.1 + 100).await;
    let failed = n0.requests_for("/") - start.0;
    assert!(
        (1..=100).contains(&failed),
        "{failed} GETs reached the failing nginx"
    );
    assert_eq!(n1.requests_for("/"), start.1 + 100);
    let mut refused = 0;
    for _ in 0..50 {
        if send(http::Method::POST, false).await == 503 {
            refused += 1;
        }
    }
    let total = || n0.requests_for("/") + n1.requests_for("/");
    let sent = start.0 + start.1 + failed + 150;
    support::until("the POSTs logged", || total() >= sent).await;
    assert_eq!(total(), sent, "an unmarked POST is sent once");
    assert!(refused > 0, "no POST reached the failing nginx");

    n0.set_failing(false);
    n0.set_unhealthy(true);
    support::until("n0 out", || state("n0") == Some(EndpointState::NotServing)).await;
    let before = (n0.requests_for("/"), n1.requests_for("/"));
    for _ in 0..50 {
        assert_eq!(send(http::Method::GET, false).await, 200);
    }
    support::until("n1 logs 50 more", || n1.requests_for("/") >= before.1 + 50).await;
    assert_eq!(
        n0.requests_for("/"),
        before.0,
        "no GET reached n0 while it failed its probe"
    );
    n0.set_unhealthy(false);
    support::until("n0 back", || state("n0") == Some(EndpointState::Ready)).await;
    for _ in 0..50 {
        assert_eq!(send(http::Method::GET, false).await, 200);
    }
    support::until("n0 serves again", || n0.requests_for("/") > before.0).await;
}
