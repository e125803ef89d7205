//! What one [`Connection`] puts on the wire: a request body no faster than the server's
//! flow-control window lets it, a unary request whole from one poll, and the HTTP/2
//! settings and windows it advertises.

use tower_sd_testkit as support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Chunks, WAIT, connect, ms, settings, until_state};
use crate::connection::Connection;
use crate::connection::replay::ReplayBody;
use crate::endpoint::Connectivity;
use bytes::Bytes;
use http_body_util::{Empty, Full};
use support::raw_h2::RawH2;
use tower::{Service, ServiceExt};

/// Catches a request body read faster than the server takes it. This server never opens
/// its flow-control window past HTTP/2's initial 65,535 bytes, so about 16 chunks of 4 KiB
/// fit, and at most two more may wait in the client; a pipe that does not wait for room
/// pulls the whole 256 KiB body into h2's send queue (and would pull any body, however
/// large, into memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_read_no_faster_than_the_server_takes_it() {
    let _limit = support::time_limit(30);
    use futures_util::StreamExt;
    let mut server = RawH2::start(100).await;
    let mut connection: Connection<Chunks> = connect(server.port, settings());
    let read = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&read);
    let chunks = futures_util::stream::iter(0..64).map(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(http_body::Frame::data(Bytes::from(vec![0; 4096])))
    });
    let body = ReplayBody::from(http_body_util::StreamBody::new(chunks.boxed()));
    connection.ready().await.unwrap();
    let call = tokio::spawn(connection.call(http::Request::post("/").body(body).unwrap()));
    server.request(WAIT).await.expect("the request's headers");
    support::until("a window's worth read", || {
        read.load(Ordering::SeqCst) >= 16
    })
    .await;

    tokio::time::sleep(ms(300)).await;
    let chunks = read.load(Ordering::SeqCst);
    assert!(
        chunks <= 18,
        "{chunks} chunks of 4 KiB read into a 64 KiB window"
    );
    assert_eq!(server.ended(0), [0u32; 0], "the body cannot have ended");
    call.abort();
}

/// Catches a unary request whose body waits for another poll (a round trip through the
/// connection's task) before it is queued: polled once, and never again, the request must
/// still reach the server whole, its HEADERS and DATA with the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_request_is_sent_whole_from_one_poll() {
    let _limit = support::time_limit(30);
    let mut server = RawH2::start(100).await;
    let mut connection: Connection<Full<Bytes>> = connect(server.port, settings());
    let body = ReplayBody::from(Full::new(Bytes::from_static(b"hello")));
    connection.ready().await.unwrap();
    let mut response =
        std::pin::pin!(connection.call(http::Request::post("/").body(body).unwrap()));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(std::future::Future::poll(response.as_mut(), &mut cx).is_pending());

    let seen = server.request(WAIT).await.expect("the request's headers");
    assert_eq!((seen.connection, seen.stream), (0, 1));
    support::until("the request's end", || server.ended(0) == [1]).await;
}

/// Catches the client's HTTP/2 settings left at h2's defaults, or miscomputed: a 64 KiB
/// window (h2's default) makes a response body wait a round trip per 64 KiB. The client
/// must advertise hyper's windows, 2 MiB per stream and 5 MiB per connection, push off,
/// and 16 KiB header lists; and the window it is told to use instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_advertises_its_flow_control_windows() {
    let _limit = support::time_limit(30);
    const ENABLE_PUSH: u16 = 0x2;
    const INITIAL_WINDOW_SIZE: u16 = 0x4;
    const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    let server = RawH2::start(100).await;
    let connection: Connection<Empty<Bytes>> = connect(server.port, settings());
    until_state(&connection, Connectivity::Ready).await;
    let settings_of = |n| server.client_settings(n);
    for want in [
        (ENABLE_PUSH, 0),
        (INITIAL_WINDOW_SIZE, 2 << 20),
        (MAX_HEADER_LIST_SIZE, 16 << 10),
    ] {
        assert!(
            settings_of(0).contains(&want),
            "{want:?} in {:?}",
            settings_of(0)
        );
    }
    support::until("the connection window raised to 5 MiB", || {
        server.connection_window_added(0) == (5 << 20) - 65_535
    })
    .await;

    let other = settings()
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(3 << 20));
    let connection: Connection<Empty<Bytes>> = connect(server.port, other);
    until_state(&connection, Connectivity::Ready).await;
    assert!(
        settings_of(1).contains(&(INITIAL_WINDOW_SIZE, 1 << 20)),
        "{:?}",
        settings_of(1)
    );
    support::until("the connection window raised to 3 MiB", || {
        server.connection_window_added(1) == (3 << 20) - 65_535
    })
    .await;
}
