//! Conformance with nghttpd, nghttp2's HTTP/2 server (neither hyper's nor nginx's): GETs and
//! POSTs over `DiscoveryLayer::over_connections`, h2c and TLS, under a small stream limit.
#![cfg(feature = "http")]

use tower_sd_testkit as support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::nghttpd::{HELLO, Nghttpd};
use tower::ServiceExt;
use tower_sd::connection::{ConnectionSettings, TlsConfig};
use tower_sd::http::{ConnectionDiscovery, DiscoveryLayer};
use tower_sd::{MemoryRegistry, ServiceRegistry};

type Client = ConnectionDiscovery<Full<Bytes>>;

async fn connect(server: &Nghttpd, settings: ConnectionSettings) -> (Client, Arc<MemoryRegistry>) {
    let registry = Arc::new(MemoryRegistry::new());
    registry
        .register(server.instance("h0", "web"))
        .await
        .unwrap();
    let client = DiscoveryLayer::new(registry.clone()).over_connections(settings);
    (client, registry)
}

/// A request through `client`: the status and the body.
async fn send(client: &Client, method: &str, path: &str, body: &'static str) -> (u16, Bytes) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://web{path}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Catches requests nghttp2 rejects (a `Host` beside `:authority`, connection-specific
/// headers, a malformed body), over h2c and TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttpd_serves_gets_and_posts_over_h2c_and_tls() {
    let _limit = support::time_limit(60);
    let Some(plain) = Nghttpd::start(100, None).await else {
        return;
    };
    let (client, _registry) = connect(&plain, ConnectionSettings::default()).await;
    let (status, body) = send(&client, "GET", "/hello", "").await;
    assert_eq!(
        (status, &body[..]),
        (200, HELLO.as_bytes()),
        "{}",
        plain.log()
    );
    let (status, body) = send(&client, "POST", "/hello", "echoed").await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"echoed"[..]),
        "{}",
        plain.log()
    );

    let ca = support::pki::Ca::new("conformance CA");
    let leaf = ca.leaf(&["web"], &[]);
    let Some(secure) = Nghttpd::start(100, Some(&leaf)).await else {
        return;
    };
    let tls = TlsConfig::with_ca_pem(ca.cert_pem.as_bytes()).unwrap();
    let (client, _registry) = connect(&secure, ConnectionSettings::default().tls(tls)).await;
    let (status, body) = send(&client, "GET", "/hello", "").await;
    assert_eq!(
        (status, &body[..]),
        (200, HELLO.as_bytes()),
        "{}",
        secure.log()
    );
}

/// Catches callers overfilling a connection nghttp2 limits to 2 streams (it refuses the
/// rest), and refused requests reaching the caller: 8 callers, 2,000 GETs, none failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttpd_with_two_streams_per_connection_fails_no_request() {
    let _limit = support::time_limit(120);
    let Some(server) = Nghttpd::start(2, None).await else {
        return;
    };
    let (client, _registry) = connect(&server, ConnectionSettings::default()).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..250 {
                    let (status, body) = send(&client, "GET", "/hello", "").await;
                    assert_eq!((status, &body[..]), (200, HELLO.as_bytes()));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("every GET succeeds");
    }
}
