//! `DiscoveryLayer` end to end: hyper-util's client and an axum handler routing
//! `http://<service>/...` to real HTTP servers on 127.0.0.1.
#![cfg(feature = "http")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::servers::{TestServer, get};
use tower::Layer;
use tower_sd::http::{
    Discovery, DiscoveryLayer, HostHeader, TooManyServices, UnknownHost, UnknownHosts,
};
use tower_sd::{MemoryRegistry, ServiceRegistry};

const SERVICE: &str = "backend";

type HttpClient = Discovery<Client<HttpConnector, Empty<Bytes>>>;

fn client(layer: DiscoveryLayer) -> HttpClient {
    layer.layer(Client::builder(TokioExecutor::new()).build_http())
}

async fn start(registry: &MemoryRegistry, prefix: &str, n: usize) -> Vec<TestServer> {
    support::servers::register_servers(registry, SERVICE, prefix, n, |name| async move {
        TestServer::http(&name).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_requests_over_four_servers() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "h", 4).await;
    let client = client(DiscoveryLayer::new(registry));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..1_250 {
                    get(&client, "http://backend/").await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    support::servers::assert_even_spread(&servers, 10_000);
    assert_eq!(client.active_services(), [SERVICE]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_churn_under_load_fails_nothing() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let mut live = start(&registry, "a", 2).await;
    let client = client(DiscoveryLayer::new(registry.clone()));
    get(&client, "http://backend/").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let running: Vec<_> = (0..2)
        .map(|_| {
            let (client, stop) = (client.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0usize, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    match get(&client, "http://backend/").await {
                        Ok(_) => ok += 1,
                        Err(error) => failed.push(error.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    for round in 0..4 {
        let added = TestServer::http(&format!("r{round}")).await;
        registry.register(added.instance(SERVICE)).await.unwrap();
        support::until("the new server takes traffic", || added.served() > 0).await;
        live.push(added);

        let leaving = live.remove(0);
        registry.deregister(&leaving.name).await.unwrap();
        // Once the layer's balancer has published the removal, no new request picks it;
        // requests already on the wire land before the server stops.
        support::until("the removal is published", || {
            !client
                .endpoints(SERVICE)
                .iter()
                .any(|endpoint| endpoint.key == leaving.name)
        })
        .await;
        leaving.drain_and_stop().await;
        assert!(
            leaving.served() > 0,
            "{} took traffic while it was live",
            leaving.name
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for caller in running {
        let (ok, failed) = caller.await.unwrap();
        assert!(
            failed.is_empty(),
            "graceful churn failed requests: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 100, "only {total} requests");
}

#[tokio::test]
async fn host_header_policy_and_unknown_hosts() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "h", 1).await;
    let port = servers[0].port;

    let logical = client(DiscoveryLayer::new(registry.clone()));
    assert_eq!(
        get(&logical, "http://backend/").await.unwrap(),
        ("h0".to_owned(), "backend".to_owned())
    );
    // Not a service name: passed through unchanged by default.
    let direct = format!("http://127.0.0.1:{port}/");
    let (body, seen) = get(&logical, &direct).await.unwrap();
    assert_eq!((body.as_str(), seen), ("h0", format!("127.0.0.1:{port}")));

    let instance = client(
        DiscoveryLayer::new(registry.clone())
            .host_header(HostHeader::Instance)
            .unknown_hosts(UnknownHosts::Fail),
    );
    let (_, seen) = get(&instance, "http://backend/").await.unwrap();
    assert_eq!(seen, format!("127.0.0.1:{port}"));
    let error = get(&instance, &direct).await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<UnknownHost>(),
        Some(&UnknownHost("127.0.0.1".to_owned()))
    );
}

#[tokio::test]
async fn a_service_without_instances_fails_within_the_wait() {
    let _limit = support::time_limit(120);
    let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
    let client =
        client(DiscoveryLayer::new(registry).wait_for_endpoints(Duration::from_millis(100)));
    let started = tokio::time::Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(5), get(&client, "http://nobody/"))
        .await
        .expect("never hangs")
        .unwrap_err();
    // It waited the whole wait, and not much more.
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(100)..Duration::from_secs(2)).contains(&waited),
        "{waited:?}"
    );
    match error.downcast_ref::<tower_sd::Error>() {
        Some(tower_sd::Error::NoEndpoints { service, .. }) => assert_eq!(service, "nobody"),
        other => panic!("expected NoEndpoints, got {other:?} ({error})"),
    }
}

#[tokio::test(start_paused = true)]
async fn idle_balancers_are_dropped() {
    let _limit = support::time_limit(120);
    let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
    let client = client(
        DiscoveryLayer::new(registry)
            .wait_for_endpoints(Duration::ZERO)
            .idle_timeout(Duration::from_secs(10)),
    );
    let _ = get(&client, "http://first/").await;
    let _ = get(&client, "http://busy/").await;
    assert_eq!(client.active_services(), ["busy", "first"]);
    // `busy` is used every 2 s: it outlives the idle timeout many times over, while
    // `first` goes (a sweep that drops every balancer, or goes by creation time, fails).
    for _ in 0..15 {
        tokio::time::advance(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert!(
            client.active_services().contains(&"busy".to_owned()),
            "kept while used"
        );
        let _ = get(&client, "http://busy/").await;
    }
    support::until("the idle balancer is dropped", || {
        client.active_services() == ["busy"]
    })
    .await;
    let _ = get(&client, "http://second/").await;
    assert_eq!(client.active_services(), ["busy", "second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_handler_calls_a_discovered_service() {
    let _limit = support::time_limit(120);
    use axum::extract::State;
    use axum::routing::get as route_get;

    let registry = Arc::new(MemoryRegistry::new());
    let _servers = start(&registry, "b", 2).await;

    // The front service: an axum app whose handler calls `http://backend/` through the layer.
    async fn front(State(client): State<HttpClient>) -> Result<String, (http::StatusCode, String)> {
        let (body, _) = get(&client, "http://backend/")
            .await
            .map_err(|e| (http::StatusCode::BAD_GATEWAY, e.to_string()))?;
        Ok(format!("front via {body}"))
    }
    let app = axum::Router::new()
        .route("/", route_get(front))
        .with_state(client(DiscoveryLayer::new(registry)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let plain = client(DiscoveryLayer::new(Arc::new(MemoryRegistry::new())));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let (body, _) = get(&plain, &format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap();
        assert!(body.starts_with("front via b"), "{body}");
        seen.insert(body);
    }
    assert_eq!(seen.len(), 2, "both backends answered: {seen:?}");
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn the_services_are_bounded_and_idle_ones_leave_without_a_request() {
    let _limit = support::time_limit(60);
    let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
    let client = client(
        DiscoveryLayer::new(registry)
            .wait_for_endpoints(Duration::ZERO)
            .max_services(2)
            .idle_timeout(Duration::from_secs(10)),
    );
    let _ = get(&client, "http://one/").await;
    let _ = get(&client, "http://two/").await;
    // A third service would be a third watch: refused, with a typed error.
    let error = get(&client, "http://three/").await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<TooManyServices>(),
        Some(&TooManyServices { limit: 2 })
    );
    assert_eq!(client.active_services(), ["one", "two"]);
    // Idle balancers are swept on a timer, with no request needed to trigger it.
    tokio::time::advance(Duration::from_secs(16)).await;
    support::until("the idle balancers are dropped", || {
        client.active_services().is_empty()
    })
    .await;
    let _ = get(&client, "http://three/").await;
    assert_eq!(client.active_services(), ["three"]);
}

#[tokio::test]
async fn host_names_are_matched_case_insensitively() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let _servers = start(&registry, "h", 1).await;
    let client = client(DiscoveryLayer::new(registry));
    let (body, _) = get(&client, "http://Backend/").await.unwrap();
    assert_eq!(body, "h0");
    let (body, _) = get(&client, "http://BACKEND/").await.unwrap();
    assert_eq!(body, "h0");
    assert_eq!(
        client.active_services(),
        [SERVICE],
        "one balancer for both spellings"
    );
}

/// The wrapped client's retries: see [`support::http_policies::check_retry_policy`]
/// (hyper-util's client, HTTP/1.1 servers; `Empty` is a `Clone` body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_retries_safe_requests_on_another_instance() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "r", 2).await;
    let layer = DiscoveryLayer::new(registry).balancer(|b| b.outlier_detection(None));
    let client = client(layer).retry_policy(support::http_policies::retry_policy());
    support::http_policies::check_retry_policy(&client, &servers).await;
}

/// The wrapped client's health probe: see [`support::http_policies::check_health_probe`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_probe_takes_the_instance_out_until_it_passes() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "p", 2).await;
    let layer = DiscoveryLayer::new(registry).balancer(|b| b.outlier_detection(None));
    let client = client(layer).health_probe(support::http_policies::probe());
    let endpoints = || client.endpoints(SERVICE);
    support::http_policies::check_health_probe(&client, &servers, endpoints).await;
}
