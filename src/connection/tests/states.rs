//! One [`Connection`] on its own, no balancer in front, against servers on 127.0.0.1 that do
//! what a real one does only at its worst: close every connection at once, accept and never
//! answer, send GOAWAY. What is checked is what the balancer relies on: the state the
//! connection reports, when it dials again (and when it must not), what `poll_ready` says,
//! which connection a request goes on, and what stays open after it is done with.

use tower_sd_testkit as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{Chunks, WAIT, connect, ms, settings, until_state};
use crate::connection::replay::ReplayBody;
use crate::connection::{Connection, ConnectionError, ConnectionSettings};
use crate::endpoint::Connectivity;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::raw_h2::{RawH2, Seen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

type Conn = Connection<Empty<Bytes>>;
type Call =
    tokio::task::JoinHandle<Result<http::Response<crate::connection::Body>, ConnectionError>>;

fn get() -> http::Request<ReplayBody<Empty<Bytes>>> {
    http::Request::get("/")
        .body(ReplayBody::from(Empty::new()))
        .unwrap()
}

/// A GET on a clone of `connection`, in a task of its own.
fn send(connection: &Conn) -> Call {
    let connection = connection.clone();
    tokio::spawn(connection.oneshot(get()))
}

fn seen(connection: usize, stream: u32) -> Seen {
    Seen { connection, stream }
}

fn at(connection: usize, stream: u32) -> Option<Seen> {
    Some(seen(connection, stream))
}

/// A GET on `connection` that the server must get on its connection `n`, stream `stream`.
async fn sent(server: &mut RawH2, connection: &Conn, n: usize, stream: u32) -> (Seen, Call) {
    let call = send(connection);
    let want = seen(n, stream);
    assert_eq!(server.request(WAIT).await, Some(want), "where it went");
    (want, call)
}

/// Answers a request the server got; its call must get the `200`.
async fn answer(server: &RawH2, (seen, call): (Seen, Call)) {
    server.respond(seen);
    assert_eq!(call.await.unwrap().unwrap().status(), http::StatusCode::OK);
}

/// Catches a closed connection left in the set (its replacement then counts twice, and the
/// set grows with every reconnect), a connection not replaced after GOAWAY, one that keeps
/// taking streams after it, and a drained connection never closed (or closed under its
/// open stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_sent_goaway_is_replaced_then_closed_once_its_stream_ends() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(100).await;
    let connection: Conn = connect(server.port, settings());
    until_state(&connection, Connectivity::Ready).await;
    let first = sent(&mut server, &connection, 0, 1).await;

    // Stream 1 may finish; nothing new may start on connection 0.
    server.go_away(0, 1);
    support::until("one open connection, the replacement", || {
        server.connections() == 2 && connection.open_connections() == 1
    })
    .await;
    until_state(&connection, Connectivity::Ready).await;
    let second = sent(&mut server, &connection, 1, 1).await;

    tokio::time::sleep(ms(300)).await;
    assert!(!server.closed(0), "closed under its open stream");
    answer(&server, first).await;
    support::until("the drained connection is closed", || server.closed(0)).await;

    answer(&server, second).await;
    assert_eq!(connection.open_connections(), 1);
    assert!(!server.closed(1));
}

/// Catches the close of one of two connections taken for the close of the instance's
/// last: the other still serves, so the instance must stay ready (reported as connecting
/// or failed, the balancer would stop picking it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_on_one_of_two_connections_leaves_the_instance_ready() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    // Two at most: a third may be opened ahead while both are full.
    let connection: Conn = connect(server.port, settings().max_connections_per_instance(2));
    until_state(&connection, Connectivity::Ready).await;
    let first = sent(&mut server, &connection, 0, 1).await;
    let second = sent(&mut server, &connection, 1, 1).await;
    answer(&server, second).await;

    // Connection 1 has room again: nothing calls for a third connection.
    server.go_away(0, 1);
    support::until("connection 0 left the set", || {
        connection.open_connections() == 1
    })
    .await;
    let readiness = connection.readiness();
    for _ in 0..30 {
        assert_eq!(readiness.get(), Connectivity::Ready);
        tokio::time::sleep(ms(10)).await;
    }
    let third = sent(&mut server, &connection, 1, 3).await;
    answer(&server, third).await;
    answer(&server, first).await;
    assert_eq!(server.connections(), 2);
}

/// A listener whose every connection gets the server's SETTINGS (so the dial succeeds) and
/// is then closed; notes when each connection came.
async fn closes_at_once() -> (u16, Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let times = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            times.lock().unwrap().push(tokio::time::Instant::now());
            tokio::spawn(async move {
                let empty_settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
                let _ = tcp.write_all(&empty_settings).await;
                // The end of the stream, then whatever the client still sends, so that no
                // unread byte turns the close into a reset.
                let _ = tcp.shutdown().await;
                let _ = tcp.read_to_end(&mut Vec::new()).await;
            });
        }
    });
    (port, accepted)
}

/// Catches a connection that closes right after it opened being redialled at once, in a
/// loop (the backoff skipped, or the close taken for a stable one), a backoff that does not
/// double (50 ms each time: some 80 dials in 2 s) or is not capped (a pause past 400 ms),
/// and the instance reported as connecting instead of failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_every_connection_at_once_is_backed_off() {
    let _limit = support::time_limit(30);
    let (port, accepted) = closes_at_once().await;
    let settings = ConnectionSettings::default().reconnect_backoff(ms(50), ms(400));
    let connection: Conn = connect(port, settings);
    until_state(&connection, Connectivity::TransientFailure).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let times = accepted.lock().unwrap().clone();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    // Full jitter under 50, 100, 200, 400, 400... ms (and a dial's own time, on a busy
    // machine): some 10 dials in 2 s.
    println!("{} connections in 2 s, gaps {gaps:?} ms", times.len());
    for (n, gap) in gaps.iter().enumerate() {
        let ceiling = (50u128 << n.min(3)).min(400);
        assert!(
            *gap <= ceiling + 100,
            "pause {n}: {gap} ms, over {ceiling}: {gaps:?}"
        );
    }
    assert!(
        (4..=30).contains(&times.len()),
        "{} connections in 2 s",
        times.len()
    );
    assert_eq!(connection.readiness().get(), Connectivity::TransientFailure);
    let error = connection.readiness().last_error().expect("a reason");
    assert!(error.to_string().contains("closed"), "{error}");
}

/// Catches a failed instance reported as connecting again while it redials (the balancer
/// would then wait on it instead of passing it over), and `poll_ready` waiting on a failed
/// instance instead of failing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_instance_stays_failed_and_fails_poll_ready_at_once_while_it_redials() {
    let _limit = support::time_limit(30);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let settings = ConnectionSettings::default()
        .connect_timeout(ms(200))
        .reconnect_backoff(ms(10), ms(50));
    let mut connection: Conn = connect(port, settings);
    until_state(&connection, Connectivity::TransientFailure).await;
    let readiness = connection.readiness();
    for _ in 0..100 {
        assert_eq!(readiness.get(), Connectivity::TransientFailure);
        let ready = tokio::time::timeout(ms(50), connection.ready()).await;
        match ready {
            Ok(Err(ConnectionError::NotConnected { state, .. })) => {
                assert_eq!(state, Connectivity::TransientFailure);
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => panic!("poll_ready waits on a failed instance"),
        }
        tokio::time::sleep(ms(10)).await;
    }
    let dials = accepted.load(Ordering::SeqCst);
    assert!(dials >= 3, "it redials: {dials} connections");
    assert!(
        readiness
            .last_error()
            .is_some_and(|e| e.to_string().contains("timed out")),
        "{:?}",
        readiness.last_error()
    );
}

/// Catches a lazy connection that never connects (nothing asks its driver), one that
/// connects before a request wants it, and one that reconnects by itself after a close
/// (or reports itself as connecting then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_connection_connects_for_a_request_and_idles_after_a_close() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(100).await;
    let connection: Conn = connect(server.port, settings().eager(false));
    tokio::time::sleep(ms(200)).await;
    assert_eq!(server.connections(), 0, "connected before a request");
    assert_eq!(connection.readiness().get(), Connectivity::Idle);

    let first = sent(&mut server, &connection, 0, 1).await;
    answer(&server, first).await;
    assert_eq!(connection.readiness().get(), Connectivity::Ready);

    // Open long enough that its close is no failure.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.go_away(0, 1);
    until_state(&connection, Connectivity::Idle).await;
    tokio::time::sleep(ms(300)).await;
    assert_eq!(server.connections(), 1, "reconnected with no request");
    assert_eq!(connection.open_connections(), 0);

    let again = sent(&mut server, &connection, 1, 1).await;
    answer(&server, again).await;
}

/// Catches a driver task that outlives the connection's last handle: its connections would
/// stay open (and reconnect) for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_closes_the_connection() {
    let _limit = support::time_limit(30);
    let server = RawH2::start(100).await;
    let connection: Conn = connect(server.port, settings());
    until_state(&connection, Connectivity::Ready).await;
    let readiness = connection.readiness();
    let clone = connection.clone();
    drop(connection);
    tokio::time::sleep(ms(100)).await;
    assert!(!server.closed(0), "closed while a clone is alive");
    drop(clone);
    support::until("the server sees the connection closed", || server.closed(0)).await;
    assert_eq!(readiness.get(), Connectivity::Shutdown);
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        server.connections(),
        1,
        "reconnected after the last handle went"
    );
}

/// Catches the concurrency limit not applied: with a limit of 1, a second request must
/// wait in `poll_ready` until the first one's response is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_holds_a_request_until_one_ends() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(100).await;
    let connection: Conn = connect(server.port, settings().concurrency_limit(Some(1)));
    let first = sent(&mut server, &connection, 0, 1).await;
    let second = send(&connection);
    assert_eq!(
        server.request(ms(300)).await,
        None,
        "a second request in flight"
    );
    answer(&server, first).await;
    assert_eq!(server.request(WAIT).await, at(0, 3));
    answer(&server, (seen(0, 3), second)).await;
}

/// Catches a request that h2 refused to send (its connection got GOAWAY between
/// `poll_ready` and `call`) reported as one the server may have seen: it never left, so it
/// is [`ConnectionError::NotSent`] (which the integrations send again), and the next
/// request goes on the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_after_goaway_is_not_sent() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(100).await;
    let mut connection: Conn = connect(server.port, settings());
    connection.ready().await.unwrap();
    server.go_away(0, 0);
    support::until("the replacement is dialled", || server.connections() == 2).await;
    let error = connection.call(get()).await.unwrap_err();
    assert!(
        matches!(error, ConnectionError::NotSent { .. }),
        "{error:?}"
    );
    assert!(error.never_sent() && error.is_unprocessed(), "{error:?}");
    until_state(&connection, Connectivity::Ready).await;

    let next = sent(&mut server, &connection, 1, 1).await;
    answer(&server, next).await;
}

/// Catches a stream counted open after its body ended: on a one-stream connection, the next
/// request would wait until the body is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_read_to_its_end_frees_its_stream_while_it_is_held() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    // One connection: the next request can only take the stream the first one left.
    let connection: Conn = connect(server.port, settings().max_connections_per_instance(1));
    let (first, call) = sent(&mut server, &connection, 0, 1).await;
    server.respond_with_body(first, b"done");
    let mut body = call.await.unwrap().unwrap().into_body();
    assert_eq!(
        http_body::Body::size_hint(&body).exact(),
        Some(4),
        "its length"
    );
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"done"));
    assert!(http_body::Body::is_end_stream(&body));
    assert_eq!(http_body::Body::size_hint(&body).exact(), Some(0));
    assert!(format!("{body:?}").contains("open: false"), "{body:?}");

    // The body is still held, read to its end.
    let second = sent(&mut server, &connection, 0, 3).await;
    answer(&server, second).await;
    assert_eq!(server.connections(), 1);
    drop(body);
}

/// Catches a stream slot held until the caller reads its body: HTTP/2 frees a stream when
/// its last frame arrives. On a one-stream connection, responses the caller holds unread,
/// whole when their headers came or ended later, leave the stream to the next request; and
/// what was read ahead still reaches the caller, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_response_frees_its_stream_unread() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    let connection: Conn = connect(server.port, settings().max_connections_per_instance(1));
    let (first, call) = sent(&mut server, &connection, 0, 1).await;
    server.respond_with_body(first, b"whole");
    let whole = call.await.unwrap().unwrap().into_body();

    let (second, call) = sent(&mut server, &connection, 0, 3).await;
    server.respond_open(second);
    let later = call.await.unwrap().unwrap().into_body();
    assert!(format!("{later:?}").contains("open: true"), "{later:?}");
    server.end_stream(second, b"later");

    // Both held unread: the next request still goes out on the one stream allowed.
    let third = sent(&mut server, &connection, 0, 5).await;
    answer(&server, third).await;
    assert!(format!("{later:?}").contains("open: false"), "{later:?}");
    for (body, want) in [(whole, &b"whole"[..]), (later, &b"later"[..])] {
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(&read[..], want);
    }
    assert_eq!(server.connections(), 1);
}

/// Catches the task sending a still-streaming request body left running after the caller
/// dropped the response: it would hold the caller's body (and read it) for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_response_stops_sending_its_request_body() {
    let _limit = support::time_limit(30);
    use futures_util::StreamExt;
    let mut server = RawH2::start(100).await;
    let mut connection: Connection<Chunks> = connect(server.port, settings());
    let (chunks, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(http_body::Frame::data(chunk)), rx))
    });
    let body = ReplayBody::from(http_body_util::StreamBody::new(stream.boxed()));
    let request = http::Request::post("/").body(body).unwrap();
    connection.ready().await.unwrap();
    let response = connection.call(request);
    let stream = server.request(WAIT).await.expect("the request's headers");
    server.respond_open(stream);
    let response = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    chunks.send(Bytes::from_static(b"more")).await.unwrap();

    drop(response);
    tokio::time::timeout(WAIT, chunks.closed())
        .await
        .expect("the request body is dropped with the response");
}

/// Catches the configured user agent not sent (or put over the caller's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_agent_is_sent_unless_the_request_has_one() {
    let _limit = support::time_limit(30);
    let server = support::servers::TestServer::start("ua", true, Arc::default(), || {
        tower::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
            let seen = request
                .headers()
                .get(http::header::USER_AGENT)
                .map(|ua| Bytes::copy_from_slice(ua.as_bytes()))
                .unwrap_or_default();
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(seen)))
        })
    })
    .await;
    let settings = settings().user_agent(http::HeaderValue::from_static("configured/1"));
    let connection: Conn = connect(server.port, settings);
    let mut own = get();
    own.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("own/2"),
    );
    for (request, want) in [(get(), "configured/1"), (own, "own/2")] {
        let response = connection.clone().oneshot(request).await.unwrap();
        let seen = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(seen, want.as_bytes());
    }
}

/// Catches one connection more than the per-instance maximum: with two allowed, each taking
/// one stream, a third request waits for room instead of opening a third connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_at_its_connection_maximum_waits_for_room() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    let connection: Conn = connect(server.port, settings().max_connections_per_instance(2));
    let first = sent(&mut server, &connection, 0, 1).await;
    let second = sent(&mut server, &connection, 1, 1).await;
    let third = send(&connection);
    assert_eq!(server.request(ms(300)).await, None, "a third stream");
    assert_eq!(server.connections(), 2, "a third connection");

    answer(&server, second).await;
    assert_eq!(
        server.request(WAIT).await,
        at(1, 3),
        "the room the second left"
    );
    answer(&server, first).await;
    answer(&server, (seen(1, 3), third)).await;
}

/// Catches Debug output that says nothing: a connection names its instance, its state and
/// its open connections; a response future whether it was sent; a response body whether
/// its stream is still open; a request body what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_says_what_each_part_is() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(100).await;
    let mut connection: Conn = connect(server.port, settings());
    until_state(&connection, Connectivity::Ready).await;
    connection.ready().await.unwrap();
    let printed = format!("{connection:?}");
    let instance = format!("127.0.0.1:{}", server.port);
    for part in [instance.as_str(), "Ready", "open: 1"] {
        assert!(printed.contains(part), "{part} in {printed}");
    }
    let future = connection.call(get());
    assert!(format!("{future:?}").contains("sent: true"), "{future:?}");
    let stream = server.request(WAIT).await.expect("sent");
    server.respond_open(stream);
    let body = future.await.unwrap().into_body();
    assert!(format!("{body:?}").contains("open: true"), "{body:?}");
    let request_body = ReplayBody::from(Empty::<Bytes>::new());
    assert!(
        format!("{request_body:?}").contains("ReplayBody"),
        "{request_body:?}"
    );
}

/// Catches a handle that sends again on the connection it used last while that one is
/// full: the second request would queue in h2 behind the first instead of going out on a
/// second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_handle_sends_its_next_request_where_there_is_room() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    let mut connection: Conn = connect(server.port, settings().max_connections_per_instance(2));
    connection.ready().await.unwrap();
    let first = tokio::spawn(connection.call(get()));
    assert_eq!(server.request(WAIT).await, at(0, 1));
    tokio::time::timeout(WAIT, connection.ready())
        .await
        .expect("a second connection")
        .unwrap();
    let second = tokio::spawn(connection.call(get()));
    assert_eq!(server.request(WAIT).await, at(1, 1), "not behind the first");
    answer(&server, (seen(1, 1), second)).await;
    answer(&server, (seen(0, 1), first)).await;
}

/// Catches a draining connection driven without its keepalive (a detached task with the
/// pinger dropped): after a GOAWAY that lets a stream finish, the server vanishes, and the
/// stream must end once a ping goes unanswered, not when TCP gives up minutes later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_connection_keeps_its_keepalive() {
    let _limit = support::time_limit(60);
    let mut server = RawH2::start(100).await;
    let proxy = support::proxy::Proxy::start(([127, 0, 0, 1], server.port).into()).await;
    let pinging = settings()
        .http2_keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(ms(300));
    let connection: Conn = connect(proxy.addr.port(), pinging);
    until_state(&connection, Connectivity::Ready).await;
    let (seen, call) = sent(&mut server, &connection, 0, 1).await;
    server.respond_open(seen);
    let mut body = call.await.unwrap().unwrap().into_body();
    // Stream 1 may go on; the connection drains.
    server.go_away(0, 1);
    // A connection closed under a second after it opened gets a spare beside its
    // replacement: two may open at once.
    support::until("the replacement is open", || server.connections() >= 2).await;
    proxy.freeze();
    let frozen = tokio::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), body.frame()).await;
    let took = frozen.elapsed();
    assert!(
        matches!(ended, Ok(Some(Err(_)) | None)),
        "the stream on the vanished server ends: {ended:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "after {took:?}: one interval and the timeout"
    );
}

/// Catches a stream slot checked in `poll_ready` but taken only in `call`: four handles made
/// ready together on a 2-stream connection would all send on it, and h2 would queue two of
/// them behind streams that may never end, while a second connection could take them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_ready_together_never_overfill_a_connection() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(2).await;
    let connection: Conn = connect(server.port, settings().max_connections_per_instance(2));
    until_state(&connection, Connectivity::Ready).await;
    let mut handles: Vec<Conn> = (0..4).map(|_| connection.clone()).collect();
    let mut calls = Vec::new();
    for handle in &mut handles[..2] {
        handle.ready().await.unwrap();
    }
    // The other two claim their slots on a second connection.
    let (third, fourth) = handles.split_at_mut(3);
    let (third, fourth) = (&mut third[2], &mut fourth[0]);
    tokio::time::timeout(WAIT, async {
        third.ready().await.unwrap();
        fourth.ready().await.unwrap();
    })
    .await
    .expect("ready on the second connection");
    for handle in &mut handles {
        calls.push(tokio::spawn(handle.call(get())));
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(server.request(WAIT).await.expect("all four sent"));
    }
    let on = |n| seen.iter().filter(|s| s.connection == n).count();
    assert_eq!((on(0), on(1)), (2, 2), "two on each connection: {seen:?}");
    for (seen, call) in seen.into_iter().zip(calls) {
        server.respond(seen);
        drop(call);
    }
}

/// Whether `handle` becomes ready within `within`.
async fn ready_within(handle: &mut Conn, within: Duration) -> bool {
    tokio::time::timeout(within, handle.ready()).await.is_ok()
}

/// Catches waiters served out of order (every one woken at once, the quickest winning) and
/// newcomers taking a freed slot ahead of those already waiting: on a one-stream
/// connection, the first waiter gets the first freed slot, the second the next, and a
/// newcomer waits behind both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_stream_get_it_in_the_order_they_came() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    let connection: Conn = connect(server.port, settings().max_connections_per_instance(1));
    until_state(&connection, Connectivity::Ready).await;
    let held = sent(&mut server, &connection, 0, 1).await;
    let (mut first, mut second, mut newcomer) =
        (connection.clone(), connection.clone(), connection.clone());
    assert!(!ready_within(&mut first, ms(100)).await, "no slot yet");
    assert!(!ready_within(&mut second, ms(100)).await, "no slot yet");

    answer(&server, held).await;
    assert!(
        ready_within(&mut first, WAIT).await,
        "the first waiter takes it"
    );
    assert!(
        !ready_within(&mut second, ms(200)).await,
        "one slot, one waiter"
    );
    assert!(
        !ready_within(&mut newcomer, ms(200)).await,
        "behind the waiters"
    );

    let call = tokio::spawn(first.call(get()));
    let next = server.request(WAIT).await.unwrap();
    answer(&server, (next, call)).await;
    // The slot is free and `second` was woken for it, but has not looked yet: a handle that
    // never waited must not take it.
    let readiness = connection.readiness();
    support::until("the slot is free", || !readiness.is_saturated()).await;
    let mut late = connection.clone();
    assert!(
        !ready_within(&mut late, ms(200)).await,
        "a newcomer queues behind the waiters"
    );
    assert!(
        ready_within(&mut second, WAIT).await,
        "the second waiter is next"
    );
    assert!(!ready_within(&mut newcomer, ms(200)).await, "still behind");
    drop(second);
    assert!(
        ready_within(&mut newcomer, WAIT).await,
        "its turn, once the others left"
    );
    drop(late);
}

/// Catches a slot lost with a waiter that gave up: woken for the freed slot, the first
/// waiter is dropped before it looks (its caller cancelled), and the second must get the
/// slot instead of waiting for another stream to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_freed_for_a_waiter_that_gave_up_goes_to_the_next() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    let connection: Conn = connect(server.port, settings().max_connections_per_instance(1));
    until_state(&connection, Connectivity::Ready).await;
    let held = sent(&mut server, &connection, 0, 1).await;
    let (mut first, mut second) = (connection.clone(), connection.clone());
    assert!(!ready_within(&mut first, ms(100)).await, "no slot yet");
    assert!(!ready_within(&mut second, ms(100)).await, "no slot yet");
    answer(&server, held).await;
    let readiness = connection.readiness();
    support::until("the slot is free", || !readiness.is_saturated()).await;
    drop(first);
    assert!(
        ready_within(&mut second, WAIT).await,
        "the slot passes to the next waiter"
    );
}

/// Catches a wait for a stream that never ends (a caller hangs on a connection full of
/// streams that do not end), one that ends as a failure of the instance, and an error that
/// does not say why: with the stream wait at 200 ms, the call fails with the limit named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_stream_no_longer_than_the_stream_wait() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(1).await;
    let limited = settings()
        .max_connections_per_instance(1)
        .stream_wait(ms(200));
    let connection: Conn = connect(server.port, limited);
    until_state(&connection, Connectivity::Ready).await;
    let held = sent(&mut server, &connection, 0, 1).await;
    let mut waiting = connection.clone();
    let started = tokio::time::Instant::now();
    waiting
        .ready()
        .await
        .expect("not a failure of the instance");
    let error = waiting.call(get()).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(
            error,
            ConnectionError::StreamLimit {
                limit: 1,
                connections: 1,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("limit of 1 concurrent streams"),
        "{error}"
    );
    assert!((ms(200)..ms(2_000)).contains(&waited), "{waited:?}");
    assert_eq!(server.request(ms(100)).await, None, "nothing was sent");
    answer(&server, held).await;
}

/// Catches a stream error judged by the wrong signal: a stream the server reset with
/// `REFUSED_STREAM`, or left above its GOAWAY's last stream id, was provably not processed
/// (the integrations send it again, outlier detection does not count it), while any other
/// reset is a failure the server may have seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_errors_say_whether_the_server_may_have_seen_the_request() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(100).await;
    let connection: Conn = connect(server.port, settings());
    until_state(&connection, Connectivity::Ready).await;
    let error = |call: Call| async move { call.await.unwrap().unwrap_err() };

    let (refused, call) = sent(&mut server, &connection, 0, 1).await;
    server.reset(refused, 0x7);
    let refused = error(call).await;
    assert!(
        matches!(refused, ConnectionError::Unprocessed { .. }),
        "{refused:?}"
    );
    assert!(refused.is_unprocessed() && !refused.never_sent());

    let (failed, call) = sent(&mut server, &connection, 0, 3).await;
    server.reset(failed, 0x2);
    let failed = error(call).await;
    assert!(
        matches!(failed, ConnectionError::Request { .. }),
        "{failed:?}"
    );
    assert!(!failed.is_unprocessed());

    let kept = sent(&mut server, &connection, 0, 5).await;
    let (dropped, call) = sent(&mut server, &connection, 0, 7).await;
    server.go_away(dropped.connection, kept.0.stream);
    let dropped = error(call).await;
    assert!(
        matches!(dropped, ConnectionError::GoAway { .. }),
        "{dropped:?}"
    );
    assert!(dropped.is_unprocessed() && !dropped.never_sent());
    answer(&server, kept).await;
}

/// Catches `max_concurrent_connects` not enforced: six instances whose servers take the
/// TCP connection and never answer the HTTP/2 handshake, two connects at a time: while
/// those two hang, no third is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_connects_at_once_than_the_limit() {
    let _limit = support::time_limit(30);
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut ports = Vec::new();
    for _ in 0..6 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut silent = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                silent.push(tcp);
            }
        });
    }
    let connector = crate::connection::Connector::new(
        ConnectionSettings::default()
            .max_concurrent_connects(2)
            .connect_timeout(Duration::from_secs(20)),
    );
    let connections: Vec<Conn> = ports
        .iter()
        .map(|port| {
            let instance = crate::instance::ServiceInstance::new("s", "s", "127.0.0.1", *port);
            connector.connect(&instance).unwrap()
        })
        .collect();
    support::until("two connects", || accepted.load(Ordering::SeqCst) == 2).await;
    tokio::time::sleep(ms(500)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "no third connect while two hang"
    );
    drop(connections);
}
