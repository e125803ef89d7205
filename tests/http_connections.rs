//! `DiscoveryLayer::over_connections`: `http://<service>/...` requests over tower-sd's own
//! HTTP/2 connections (h2c here; TLS goes through the same dial as the tonic tests'), to
//! real hyper HTTP/2 servers on 127.0.0.1.
#![cfg(feature = "http")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use support::raw_h2::Seen;
use support::servers::{TestServer, get};
use tower_sd::MemoryRegistry;
use tower_sd::balance::EndpointState;
use tower_sd::connection::ConnectionSettings;
use tower_sd::endpoint::Connectivity;
use tower_sd::http::{ConnectionDiscovery, DiscoveryLayer, UnknownHost};

const SERVICE: &str = "backend";

type Client = ConnectionDiscovery<Empty<Bytes>>;

fn client(registry: &Arc<MemoryRegistry>) -> Client {
    DiscoveryLayer::new(registry.clone())
        .balancer(|b| b.outlier_detection(None))
        .over_connections(ConnectionSettings::default())
}

async fn start(registry: &MemoryRegistry, prefix: &str, n: usize) -> Vec<TestServer> {
    support::servers::register_servers(registry, SERVICE, prefix, n, |name| async move {
        TestServer::http2(&name).await
    })
    .await
}

/// `requests` GETs from each of `callers` concurrent tasks; the failures.
async fn load(client: &Client, callers: usize, requests: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for _ in 0..requests {
                    if let Err(error) = get(&client, "http://backend/").await {
                        failed.push(error.to_string());
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

async fn until_state(client: &Client, key: &str, want: &[Connectivity]) {
    support::until(&format!("{key} is {want:?}"), || {
        client
            .endpoints(SERVICE)
            .iter()
            .any(|e| e.key == key && e.connectivity.is_some_and(|c| want.contains(&c)))
    })
    .await;
}

/// Catches a connection per request (or per caller) instead of one per instance, a
/// balancer that does not spread, and a lost logical `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_one_connection_per_instance() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "h", 4).await;
    let client = client(&registry);
    let (_, seen) = get(&client, "http://backend/").await.unwrap();
    assert_eq!(seen, SERVICE, "the server sees the logical host");
    for key in ["h0", "h1", "h2", "h3"] {
        until_state(&client, key, &[Connectivity::Ready]).await;
    }

    let failed = load(&client, 8, 1_250).await;
    assert!(failed.is_empty(), "{failed:?}");
    support::servers::assert_even_spread(&servers, 10_001);
    for server in &servers {
        assert_eq!(server.connections(), 1, "{}", server.name);
    }
    let error = get(&client, "http://localhost/").await.unwrap_err();
    assert!(error.downcast_ref::<UnknownHost>().is_some(), "{error}");
}

/// Catches picking an instance that never connects (with a wrapped client, a third of the
/// requests would fail with connection refused) and one that crashed (every request sent
/// to it would fail until discovery removed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_and_a_crashed_server_are_not_picked() {
    let _limit = support::time_limit(120);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "c", 3).await;
    let _closed = support::process::ClosedPort::registered(&registry, SERVICE).await;
    let client = client(&registry);
    get(&client, "http://backend/").await.unwrap();
    until_state(&client, "closed", &[Connectivity::TransientFailure]).await;
    let failed = load(&client, 4, 100).await;
    assert!(failed.is_empty(), "{failed:?}");

    servers[0].crash();
    until_state(
        &client,
        "c0",
        &[Connectivity::Connecting, Connectivity::TransientFailure],
    )
    .await;
    let failed = load(&client, 4, 100).await;
    assert!(failed.is_empty(), "{failed:?}");
    let states: Vec<_> = client
        .endpoints(SERVICE)
        .into_iter()
        .map(|e| (e.key, e.state))
        .collect();
    for (key, state) in states {
        let want_ready = key == "c1" || key == "c2";
        assert_eq!(
            state == EndpointState::Ready,
            want_ready,
            "{key}: {state:?}"
        );
    }
}

/// Chunks of the endless request body below pulled so far.
static PULLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type Chunk = Result<http_body::Frame<Bytes>, std::convert::Infallible>;
type Endless = http_body_util::StreamBody<
    futures_util::stream::Iter<std::iter::Map<std::ops::Range<u32>, fn(u32) -> Chunk>>,
>;

fn chunk(_: u32) -> Chunk {
    PULLED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(http_body::Frame::data(Bytes::from_static(&[0; 16 << 10])))
}

/// Catches a request body read faster than the stream can take it: a body that is always
/// ready (here 1 GiB, to a server that never reads it) would be buffered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_read_no_faster_than_the_stream_takes_it() {
    let _limit = support::time_limit(60);
    use tower::ServiceExt;
    let registry = Arc::new(MemoryRegistry::new());
    let _servers = start(&registry, "r", 1).await;
    let client: ConnectionDiscovery<Endless> = DiscoveryLayer::new(registry.clone())
        .balancer(|b| b.outlier_detection(None))
        .over_connections(ConnectionSettings::default());
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(
        (0..65_536).map(chunk as fn(u32) -> Chunk),
    ));
    let request = http::Request::post("http://backend/").body(body).unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let pulled = PULLED.load(std::sync::atomic::Ordering::SeqCst) << 14;
    println!("{pulled} bytes of the body read");
    assert!(
        pulled <= 8 << 20,
        "{pulled} bytes read from a body the server never takes"
    );
    drop(response);
}

/// Catches connection-specific headers passed on to HTTP/2 (RFC 9113 forbids them, and h2
/// refuses the request): an HTTP/1.1-minded caller's `Connection` or `TE: gzip` would fail
/// every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_specific_headers_are_not_sent_over_http2() {
    let _limit = support::time_limit(60);
    use tower::ServiceExt;
    let registry = Arc::new(MemoryRegistry::new());
    let _servers = start(&registry, "x", 1).await;
    let client = client(&registry);
    let request = http::Request::get("http://backend/")
        .header(http::header::CONNECTION, "keep-alive")
        .header("keep-alive", "timeout=5")
        .header(http::header::TE, "gzip")
        .header(http::header::TRANSFER_ENCODING, "chunked")
        .header(http::header::UPGRADE, "websocket")
        .body(Empty::new())
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
}

type Streamed = http_body_util::StreamBody<futures_util::stream::BoxStream<'static, Chunk>>;

/// Catches a request body that stops once the response has arrived (a bidirectional
/// stream): the server below answers at once and echoes the body, which the caller sends
/// only after it has the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_still_streaming_when_the_response_arrives_is_sent_whole() {
    let _limit = support::time_limit(60);
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let registry = Arc::new(MemoryRegistry::new());
    let echo = TestServer::start("echo", true, Arc::default(), || {
        tower::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
            Ok::<_, std::convert::Infallible>(http::Response::new(request.into_body()))
        })
    })
    .await;
    tower_sd::ServiceRegistry::register(&*registry, echo.instance(SERVICE))
        .await
        .unwrap();
    let client: ConnectionDiscovery<Streamed> = DiscoveryLayer::new(registry.clone())
        .balancer(|b| b.outlier_detection(None))
        .over_connections(ConnectionSettings::default());
    let (chunks, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(http_body::Frame::data(chunk)), rx))
    });
    let body = http_body_util::StreamBody::new(stream.boxed());
    let request = http::Request::post("http://backend/").body(body).unwrap();
    let response = client.oneshot(request).await.unwrap();
    let mut body = response.into_body();
    for word in ["one", "two", "three"] {
        chunks.send(Bytes::from(word)).await.unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < word.len() {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
                .await
                .expect("echoed within 5 s")
                .expect("the body goes on")
                .unwrap();
            echoed.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(echoed, word.as_bytes());
    }
    drop(chunks);
    // The end of the request (an empty DATA frame with END_STREAM) ends the echo.
    let rest = tokio::time::timeout(std::time::Duration::from_secs(5), body.collect())
        .await
        .expect("the echo ends with the request")
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty(), "nothing more echoed: {rest:?}");
}

/// A hand-driven HTTP/2 server starting each connection at `max` streams, a client allowed
/// `connections` connections to it, and a first request the server holds (connection 0,
/// stream 1).
async fn one_held_request(max: u32, connections: usize) -> HeldRequest {
    let mut server = support::raw_h2::RawH2::start(max).await;
    let registry = Arc::new(MemoryRegistry::new());
    let instance = tower_sd::ServiceInstance::new("raw", SERVICE, "127.0.0.1", server.port);
    tower_sd::ServiceRegistry::register(&*registry, instance)
        .await
        .unwrap();
    let settings = ConnectionSettings::default().max_connections_per_instance(connections);
    let client = DiscoveryLayer::new(registry.clone())
        .balancer(|b| b.outlier_detection(None))
        .over_connections(settings);
    let first = send(&client);
    let held = Seen {
        connection: 0,
        stream: 1,
    };
    assert_eq!(server.request(WAIT).await, Some(held));
    HeldRequest {
        server,
        client,
        _registry: registry,
        first,
        held,
    }
}

struct HeldRequest {
    server: support::raw_h2::RawH2,
    client: Client,
    _registry: Arc<MemoryRegistry>,
    first: Call,
    held: Seen,
}

/// How long the raw-h2 tests wait for what must happen.
const WAIT: Duration = Duration::from_secs(5);

/// A GET to the service in a task of its own: its status.
fn send(client: &Client) -> Call {
    use tower::ServiceExt;
    let client = client.clone();
    tokio::spawn(async move {
        let request = http::Request::get("http://backend/").body(Empty::new())?;
        Ok(client.oneshot(request).await?.status())
    })
}

/// Answers each request on the server; each call then gets its `200`.
async fn answer<const N: usize>(server: &support::raw_h2::RawH2, calls: [(Seen, Call); N]) {
    for (seen, call) in calls {
        server.respond(seen);
        assert_eq!(call.await.unwrap().unwrap(), http::StatusCode::OK);
    }
}

type Call = tokio::task::JoinHandle<Result<http::StatusCode, tower::BoxError>>;

/// Catches a limit read once at connect: a server that raises its `MAX_CONCURRENT_STREAMS`
/// on an open connection (SETTINGS, RFC 9113 6.5.2) must get the request that waited for
/// room at once, not when the open stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_raising_its_stream_limit_takes_the_waiting_request() {
    let _limit = support::time_limit(30);
    let HeldRequest {
        mut server,
        client,
        first,
        held,
        ..
    } = one_held_request(1, 1).await;
    let second = send(&client);
    let early = server.request(Duration::from_millis(300)).await;
    assert_eq!(early, None, "a second stream on a 1-stream connection");

    server.set_max_streams(0, 2);
    let raised = Seen {
        connection: 0,
        stream: 3,
    };
    assert_eq!(
        server.request(WAIT).await,
        Some(raised),
        "the waiting request goes out under the raised limit"
    );
    answer(&server, [(held, first), (raised, second)]).await;
    assert_eq!(server.connections(), 1);
}

/// Catches a limit read once at connect, the other way: a server that lowers its limit to
/// the streams already open makes the next request open a second connection, where a stale
/// limit would queue it in h2 behind the open stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lowering_its_stream_limit_gets_a_second_connection() {
    let _limit = support::time_limit(30);
    let HeldRequest {
        mut server,
        client,
        first,
        held,
        ..
    } = one_held_request(2, 2).await;
    // The client acknowledged the first SETTINGS before its request; wait for the second.
    let acked = server.acks(0);
    server.set_max_streams(0, 1);
    support::until("the client acknowledges the lower limit", || {
        server.acks(0) > acked
    })
    .await;
    // The ack is written while the client applies the frame; give its connection's task a
    // moment to record the new limit after it.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let second = send(&client);
    let other = Seen {
        connection: 1,
        stream: 1,
    };
    assert_eq!(
        server.request(WAIT).await,
        Some(other),
        "the request goes out on a second connection, not behind the open stream"
    );
    answer(&server, [(held, first), (other, second)]).await;
}

/// Catches saturation hidden from the balancer: an instance whose every connection is at
/// the server's limit is reported `Saturated` (picked only when no other has room), and
/// `Ready` again once a stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_at_its_stream_limit_is_reported_saturated() {
    let _limit = support::time_limit(30);
    let HeldRequest {
        mut server,
        client,
        first,
        held,
        ..
    } = one_held_request(1, 1).await;
    let second = send(&client);
    let state = |client: &Client| client.endpoints(SERVICE)[0].state;
    support::until("the instance is saturated", || {
        state(&client) == EndpointState::Saturated
    })
    .await;
    server.respond(held);
    assert_eq!(first.await.unwrap().unwrap(), http::StatusCode::OK);
    let next = server
        .request(WAIT)
        .await
        .expect("the waiting request goes out");
    answer(&server, [(next, second)]).await;
    support::until("ready again", || state(&client) == EndpointState::Ready).await;
}

/// See [`support::http_policies::check_retry_policy`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_retries_safe_requests_on_another_instance() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "r", 2).await;
    let client = client(&registry).retry_policy(support::http_policies::retry_policy());
    support::http_policies::check_retry_policy(&client, &servers).await;
}

/// See [`support::http_policies::check_health_probe`]; also catches a probe that closes
/// the connection of an instance it takes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_probe_takes_the_instance_out_until_it_passes() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(MemoryRegistry::new());
    let servers = start(&registry, "p", 2).await;
    let client = client(&registry).health_probe(support::http_policies::probe());
    let endpoints = || client.endpoints(SERVICE);
    support::http_policies::check_health_probe(&client, &servers, endpoints).await;
    assert_eq!(servers[0].connections(), 1, "its connection stayed open");
}
