//! `LoadBalancedChannel` on its own connections, against real tonic servers on 127.0.0.1:
//! a dead instance is never picked, GOAWAY and connection loss cost no request, a new
//! instance takes traffic only once connected, TLS and mutual TLS with a private CA, and
//! streaming calls through the balancer.
//!
//! Outlier detection is off in the failure tests, so what they see is the connections'
//! doing: with tonic's lazily connecting `Channel` per instance, each of them fails a share
//! of the requests (to the dead, closed or draining instance) for as long as it runs.
#![cfg(feature = "tonic")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::grpc::{Callers, check, connectivity, until_endpoints};
use support::numbers;
use support::servers::TestServer;
use tokio::time::Instant;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::balance::EndpointState;
use tower_sd::connection::TlsConfig;
use tower_sd::endpoint::Connectivity;
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{MemoryRegistry, ServiceInstance, ServiceRegistry};

const SERVICE: &str = "health";

async fn start(registry: &MemoryRegistry, prefix: &str, n: usize) -> Vec<TestServer> {
    support::servers::register_servers(registry, SERVICE, prefix, n, |name| async move {
        TestServer::grpc(&name).await
    })
    .await
}

/// A channel with outlier detection off, once every registered instance is listed.
async fn channel(registry: &Arc<MemoryRegistry>) -> LoadBalancedChannel {
    LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .outlier_detection(None)
        .connect(Duration::from_secs(5))
        .await
        .unwrap()
}

async fn until_connectivity(channel: &LoadBalancedChannel, key: &str, want: &[Connectivity]) {
    support::until(&format!("{key} is {want:?}"), || {
        connectivity(channel, key).is_some_and(|c| want.contains(&c))
    })
    .await;
}

/// Catches an endpoint that stays pickable after its server died: with the instance still
/// registered, every request sent to it fails for as long as it is picked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_only_the_requests_in_flight_on_it() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "k", 4).await;
    let channel = channel(&registry).await;
    for key in ["k0", "k1", "k2", "k3"] {
        until_connectivity(&channel, key, &[Connectivity::Ready]).await;
    }
    let running = Callers::start(&channel, 8);
    running.succeed(200).await;

    // No deregistration: only the connection can tell.
    servers[0].crash();
    until_connectivity(
        &channel,
        "k0",
        &[Connectivity::Connecting, Connectivity::TransientFailure],
    )
    .await;
    running.succeed(200).await;
    let (_, failed) = running.stop().await;
    assert!(
        failed.len() <= 8,
        "at most the 8 callers' requests in flight on it: {} failed: {:?}",
        failed.len(),
        failed.first()
    );
    for status in &failed {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    let running = Callers::start(&channel, 8);
    running.succeed(500).await;
    let (_, failed) = running.stop().await;
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    let k0 = channel
        .endpoints()
        .into_iter()
        .find(|e| e.key == "k0")
        .expect("still registered");
    assert_ne!(k0.state, EndpointState::Ready, "{k0:?}");
}

/// Catches a connection that takes new streams after GOAWAY, or requests refused by it
/// (above its last stream id) and by the closed listener reaching the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shutting_down_gracefully_fails_no_request() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let _servers = start(&registry, "g", 2).await;
    let (leaving, stop) = TestServer::grpc_graceful("leaving").await;
    registry.register(leaving.instance(SERVICE)).await.unwrap();
    let channel = channel(&registry).await;
    until_connectivity(&channel, "leaving", &[Connectivity::Ready]).await;
    let running = Callers::start(&channel, 8);
    running.succeed(300).await;
    let served_before = leaving.served();
    assert!(served_before > 0, "it took traffic before");

    // Still registered: GOAWAY, then a refused connect, are all the client learns.
    stop.send(()).unwrap();
    support::until("the server stopped", || leaving.stopped()).await;
    running.succeed(300).await;
    let (ok, failed) = running.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {ok} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert_ne!(connectivity(&channel, "leaving"), Some(Connectivity::Ready));
}

/// Catches connecting on the request path: the new instance's first requests would wait for
/// its (here deliberately slow) connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_takes_traffic_only_once_connected() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let _servers = start(&registry, "n", 2).await;
    let channel = channel(&registry).await;
    let newcomer = TestServer::grpc("newcomer").await;
    // Its connects take 2 s: the proxy holds each new connection before forwarding it.
    let slow = support::proxy::Proxy::start_delayed(
        ([127, 0, 0, 1], newcomer.port).into(),
        Duration::from_secs(2),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = HealthClient::new(channel.clone());
            let (stop, slowest) = (Arc::clone(&stop), Arc::clone(&slowest));
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    check(&mut client).await.unwrap();
                    let took = started.elapsed();
                    let mut slowest = slowest.lock().unwrap();
                    *slowest = (*slowest).max(took);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let steady = *slowest.lock().unwrap();

    let instance = ServiceInstance::new("newcomer", SERVICE, "127.0.0.1", slow.addr.port());
    registry.register(instance).await.unwrap();
    support::until_async("the newcomer serves", || async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        newcomer.served() >= 50
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.unwrap();
    }
    let slowest = *slowest.lock().unwrap();
    println!("slowest request: {steady:?} before the newcomer, {slowest:?} with it");
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited {slowest:?}: it paid the newcomer's 2 s connect"
    );
}

/// Keepalive pings every 10 s (gRFC A8's floor), each answered within 300 ms or the
/// connection closes.
const PING_EVERY: Duration = Duration::from_secs(10);

/// One server behind a proxy (to freeze), and a channel with keepalive pings every
/// [`PING_EVERY`] and a 300 ms timeout, connected and once used.
async fn behind_a_proxy(
    key: &str,
    while_idle: bool,
) -> (TestServer, support::proxy::Proxy, LoadBalancedChannel) {
    let server = TestServer::grpc(key).await;
    let proxy = support::proxy::Proxy::start(([127, 0, 0, 1], server.port).into()).await;
    let registry = Arc::new(MemoryRegistry::new());
    let instance = ServiceInstance::new(key, SERVICE, "127.0.0.1", proxy.addr.port());
    registry.register(instance).await.unwrap();
    let channel = LoadBalancedChannel::builder(registry, SERVICE)
        .outlier_detection(None)
        .http2_keep_alive_interval(Some(PING_EVERY))
        .keep_alive_timeout(Duration::from_millis(300))
        .keep_alive_while_idle(while_idle)
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    until_connectivity(&channel, key, &[Connectivity::Ready]).await;
    check(&mut HealthClient::new(channel.clone()))
        .await
        .unwrap();
    (server, proxy, channel)
}

/// Waits, for a ping interval and more, until the connection to `key` is closed.
async fn until_closed(channel: &LoadBalancedChannel, key: &str) {
    support::until_within(&format!("{key} is closed"), PING_EVERY * 2, || {
        matches!(
            connectivity(channel, key),
            Some(Connectivity::Connecting | Connectivity::TransientFailure)
        )
    })
    .await;
}

/// Catches a connection that stays ready after its peer went silent (no keepalive pings, or
/// pings whose missing answer is never noticed): every request sent on it would hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_peer_went_silent_is_closed_by_keepalive() {
    let _limit = support::time_limit(90);
    let (server, proxy, channel) = behind_a_proxy("silent", true).await;
    // An idle ping is answered: the connection stays up past an interval.
    tokio::time::sleep(PING_EVERY + Duration::from_secs(1)).await;
    assert_eq!(connectivity(&channel, "silent"), Some(Connectivity::Ready));
    assert_eq!(server.connections(), 1, "one connection, kept");

    proxy.freeze();
    let frozen = Instant::now();
    until_closed(&channel, "silent").await;
    let noticed = frozen.elapsed();
    println!("a silent peer was noticed after {noticed:?}");
    assert!(
        noticed >= Duration::from_millis(300),
        "closed after {noticed:?}, before a ping could go unanswered"
    );
}

/// Catches keepalive pings on an idle connection when `keep_alive_while_idle` is off
/// (servers may count them as abuse: grpc-go allows one per 5 minutes by default) and
/// keepalive that ignores the streams open on a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_pinged_only_once_a_stream_is_open() {
    let _limit = support::time_limit(90);
    let (_server, proxy, channel) = behind_a_proxy("idle", false).await;
    // Silent from now on: a ping would go unanswered and close the connection.
    proxy.freeze();
    tokio::time::sleep(PING_EVERY + Duration::from_secs(1)).await;
    assert_eq!(
        connectivity(&channel, "idle"),
        Some(Connectivity::Ready),
        "an idle connection was pinged"
    );
    let mut client = HealthClient::new(channel.clone());
    let stuck = tokio::spawn(async move { check(&mut client).await });
    until_closed(&channel, "idle").await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), stuck).await;
    assert!(
        matches!(outcome, Ok(Ok(Err(_)))),
        "the request on the silent connection ends with an error: {outcome:?}"
    );
}

/// Catches picking an instance that never connects: every request sent to it would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_accepts_no_connection_is_never_picked() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "c", 3).await;
    let _closed = support::process::ClosedPort::registered(&registry, SERVICE).await;
    let channel = channel(&registry).await;
    until_endpoints(&channel, &["c0", "c1", "c2", "closed"]).await;
    let running = Callers::start(&channel, 8);
    running.succeed(600).await;
    let (ok, failed) = running.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {ok} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(
        connectivity(&channel, "closed"),
        Some(Connectivity::TransientFailure)
    );
    let served: usize = servers.iter().map(TestServer::served).sum();
    assert!(served >= 600, "{served}");
}

/// With no instance able to connect, a call waits `wait_for_endpoints` and fails
/// `UNAVAILABLE`, saying why the connects failed; it never hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_connecting_fails_unavailable_with_the_reason() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let _closed = support::process::ClosedPort::registered(&registry, SERVICE).await;
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .wait_for_endpoints(Duration::from_millis(500))
        .build();
    let started = Instant::now();
    let status = check(&mut HealthClient::new(channel)).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("TCP connect failed"),
        "{status:?}"
    );
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
}

/// Mutual TLS with a private CA: the server requires a client certificate from the CA.
/// Catches a client that presents none (the server refuses it) and one that trusts any
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_private_ca() {
    let _limit = support::time_limit(120);
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

    let ca = support::pki::Ca::new("test CA");
    let server_cert = ca.leaf(&["health.internal"], &[]);
    let client_cert = ca.leaf(&["client.internal"], &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        Some((listener.accept().await.map(|(stream, _)| stream), listener))
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &server_cert.cert_pem,
            &server_cert.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&ca.cert_pem));
    let server = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(ServiceInstance::new("m", SERVICE, "127.0.0.1", port))
        .await
        .unwrap();

    let trusted = TlsConfig::with_ca_pem(ca.cert_pem.as_bytes()).unwrap();
    let with_cert = trusted
        .clone()
        .identity_pem(
            client_cert.cert_pem.as_bytes(),
            client_cert.key_pem.as_bytes(),
        )
        .unwrap();
    // Its Debug output says what it is, and never prints the client's private key.
    let printed = format!("{with_cert:?}");
    assert!(printed.starts_with("TlsConfig"), "{printed}");
    let key_line = client_cert.key_pem.lines().nth(1).expect("a PEM body");
    assert!(!printed.contains(key_line), "{printed}");
    let channel = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .tls(with_cert.server_name("health.internal"))
        .build();
    let mut client = HealthClient::new(channel);
    for _ in 0..20 {
        check(&mut client).await.unwrap();
    }

    let without_cert = LoadBalancedChannel::builder(registry.clone(), SERVICE)
        .tls(trusted.server_name("health.internal"))
        .wait_for_endpoints(Duration::from_secs(1))
        .build();
    let status = check(&mut HealthClient::new(without_cert))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    let other_ca = support::pki::Ca::new("another CA");
    let untrusting = LoadBalancedChannel::builder(registry, SERVICE)
        .tls(
            TlsConfig::with_ca_pem(other_ca.cert_pem.as_bytes())
                .unwrap()
                .server_name("health.internal"),
        )
        .wait_for_endpoints(Duration::from_secs(1))
        .build();
    let status = check(&mut HealthClient::new(untrusting)).await.unwrap_err();
    assert!(
        status.message().contains("TLS handshake failed"),
        "a server from another CA: {status:?}"
    );
    server.abort();
}

async fn numbers_channel(
    registry: &Arc<MemoryRegistry>,
    name: &str,
    events: &Arc<numbers::Events>,
    pace: Duration,
) -> (TestServer, LoadBalancedChannel) {
    let server = numbers::start(name, Arc::clone(events), pace).await;
    registry
        .register(ServiceInstance::new(
            name,
            "numbers",
            "127.0.0.1",
            server.port,
        ))
        .await
        .unwrap();
    let channel = LoadBalancedChannel::builder(registry.clone(), "numbers")
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    (server, channel)
}

fn in_flight(channel: &LoadBalancedChannel, key: &str) -> u64 {
    channel
        .endpoints()
        .into_iter()
        .find(|e| e.key == key)
        .map_or(0, |e| e.in_flight)
}

/// Client, server and bidirectional streaming calls through the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_streaming_call_goes_through() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let events = Arc::new(numbers::Events::default());
    let (_server, channel) = numbers_channel(&registry, "s0", &events, Duration::ZERO).await;
    let mut client = numbers::Client::new(channel.clone());
    assert_eq!(client.sum((0..100).collect()).await.unwrap(), 4950);
    let mut counted = client.count(50).await.unwrap();
    let mut seen = Vec::new();
    while let Some(number) = counted.message().await.unwrap() {
        seen.push(number.value);
    }
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    assert_eq!(
        client.echo(vec![3, 1, 4, 1, 5]).await.unwrap(),
        [3, 1, 4, 1, 5]
    );
    support::until("nothing in flight", || in_flight(&channel, "s0") == 0).await;
}

/// An open stream counts as load until it ends, and runs to its end on an instance that
/// discovery removed meanwhile, while new calls go to the instance that replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_its_instance_leaving_discovery() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let events = Arc::new(numbers::Events::default());
    let pace = Duration::from_millis(20);
    let (old, channel) = numbers_channel(&registry, "old", &events, pace).await;
    let mut client = numbers::Client::new(channel.clone());
    let mut stream = client.count(40).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().value, 0);
    assert_eq!(in_flight(&channel, "old"), 1, "an open stream is load");

    let new = numbers::start("new", Arc::clone(&events), Duration::ZERO).await;
    registry
        .register(ServiceInstance::new(
            "new",
            "numbers",
            "127.0.0.1",
            new.port,
        ))
        .await
        .unwrap();
    registry.deregister("old").await.unwrap();
    until_endpoints_named(&channel, "new").await;
    for _ in 0..20 {
        assert_eq!(client.sum(vec![1, 2]).await.unwrap(), 3);
    }
    let mut rest = 1;
    while stream.message().await.unwrap().is_some() {
        rest += 1;
    }
    assert_eq!(
        rest, 40,
        "the stream ran to its end on the removed instance"
    );
    support::until("the server saw it complete", || events.completed() == 1).await;
    drop(old);
}

async fn until_endpoints_named(channel: &LoadBalancedChannel, name: &str) {
    support::until(&format!("only {name} is listed"), || {
        let endpoints = channel.endpoints();
        endpoints.len() == 1 && endpoints[0].key == name
    })
    .await;
}

/// Dropping a call resets its stream (the server sees it cancelled) and releases its load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_resets_its_stream_and_releases_its_load() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let events = Arc::new(numbers::Events::default());
    let (_server, channel) =
        numbers_channel(&registry, "d0", &events, Duration::from_millis(50)).await;
    let mut client = numbers::Client::new(channel.clone());
    let mut stream = client.count(1_000).await.unwrap();
    stream.message().await.unwrap().unwrap();
    assert_eq!(in_flight(&channel, "d0"), 1);
    drop(stream);
    support::until("the server saw the stream cancelled", || {
        events.cancelled() == 1
    })
    .await;
    assert_eq!(in_flight(&channel, "d0"), 0);
    assert_eq!(events.completed(), 0);
}

/// The connections' pace: many callers, one connection per instance, its stream count
/// within the server's limit (hyper queues the rest), and a second connection when the
/// server allows few streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_opens_when_the_server_allows_few_streams() {
    let _limit = support::time_limit(40);
    // Each stream runs 20 s (100 numbers, 200 ms apart): a call queued behind a full
    // connection's streams (in h2's queue) would wait that long, and fails the 5 s bound.
    let registry = Arc::new(MemoryRegistry::new());
    let events = Arc::new(numbers::Events::default());
    let limited =
        numbers::start_limited("few", Arc::clone(&events), Duration::from_millis(200), 2).await;
    registry
        .register(ServiceInstance::new(
            "few",
            "numbers",
            "127.0.0.1",
            limited.port,
        ))
        .await
        .unwrap();
    let channel = LoadBalancedChannel::builder(registry.clone(), "numbers")
        .connections(|c| c.max_connections_per_instance(3))
        .connect(Duration::from_secs(5))
        .await
        .unwrap();
    let open = |channel: LoadBalancedChannel| async move {
        let mut client = numbers::Client::new(channel);
        let mut stream = client.count(100).await.unwrap();
        stream.message().await.unwrap().unwrap();
        stream
    };
    let mut streams = Vec::new();
    for n in 1..=6 {
        let stream = tokio::time::timeout(Duration::from_secs(5), open(channel.clone()))
            .await
            .unwrap_or_else(|_| panic!("stream {n} waited behind a full connection"));
        streams.push(stream);
    }
    assert_eq!(
        limited.connections(),
        3,
        "three connections of two streams each"
    );

    // Every connection full, at the maximum: a seventh call waits for room, and takes the
    // room a cancelled stream leaves on the last connection (not the first one's queue).
    let seventh = tokio::spawn(open(channel.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!seventh.is_finished(), "a seventh stream on 3 x 2 streams");
    drop(streams.pop());
    tokio::time::timeout(Duration::from_secs(5), seventh)
        .await
        .expect("the seventh call took the room a cancelled stream left")
        .unwrap();
    assert_eq!(
        limited.connections(),
        3,
        "no fourth connection past the maximum"
    );
}
