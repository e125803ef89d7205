//! The checks of an HTTP retry policy and health probe that both forms of `DiscoveryLayer`
//! must pass (around hyper-util's client, and over tower-sd's connections), each against
//! two [`TestServer`]s registered as `backend`, the first of which it makes fail.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use tower::{Service, ServiceExt};
use tower_sd::balance::EndpointState;

use super::servers::TestServer;

/// Sends a request to `http://backend/` with `method`, marked idempotent or not; its status.
pub async fn send_marked<S, B>(
    client: &S,
    method: http::Method,
    idempotent: bool,
) -> http::StatusCode
where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    let mut request = http::Request::builder()
        .method(method)
        .uri("http://backend/")
        .body(Empty::new())
        .unwrap();
    if idempotent {
        request.extensions_mut().insert(tower_sd::http::Idempotent);
    }
    client.clone().oneshot(request).await.unwrap().status()
}

/// The policy the retry check sets: 3 attempts, 503 retried, a millisecond's backoff.
pub fn retry_policy() -> tower_sd::http::HttpRetryPolicy {
    tower_sd::http::HttpRetryPolicy::new(3)
        .statuses([503])
        .backoff(Duration::from_millis(1), Duration::from_millis(5), 2.0)
}

/// Catches a retry policy that does not retry a safe request (a server answering 503 to
/// everything must cost no GET an error while another serves), a retry back to the server
/// that failed it (each request reaches the failing one at most once), and a POST retried
/// without the caller's mark. `client` has [`retry_policy`]; `servers` are `backend`'s two.
pub async fn check_retry_policy<S, B>(client: &S, servers: &[TestServer])
where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    servers[0].set_unavailable(true);
    for _ in 0..50 {
        assert_eq!(send_marked(client, http::Method::GET, false).await, 200);
    }
    let failing = servers[0].served();
    assert!(
        failing > 0 && failing <= 50,
        "{failing} requests reached the failing server"
    );
    assert_eq!(servers[1].served(), 50);
    for _ in 0..50 {
        assert_eq!(send_marked(client, http::Method::POST, true).await, 200);
    }
    let mut refused = 0;
    for _ in 0..50 {
        if send_marked(client, http::Method::POST, false).await == 503 {
            refused += 1;
        }
    }
    assert!(refused > 0, "an unmarked POST is sent once");
}

/// The probe the health check sets: `/healthz` every 20 ms.
pub fn probe() -> tower_sd::http::HttpProbe {
    tower_sd::http::HttpProbe::new("/healthz")
        .unwrap()
        .interval(Duration::from_millis(20))
        .timeout(Duration::from_millis(500))
}

/// Catches a health probe that does not take a failing instance out of the picks (once it
/// is reported not serving, no request may reach it: each would answer 503), one that does
/// not bring it back. `client` has [`probe`];
/// `servers` are `backend`'s two, `p0` and `p1`; `endpoints` reads its balancer's.
pub async fn check_health_probe<S, B>(
    client: &S,
    servers: &[TestServer],
    endpoints: impl Fn() -> Vec<tower_sd::balance::EndpointStats<String>>,
) where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    let state = |key: &str| {
        endpoints()
            .into_iter()
            .find(|e| e.key == key)
            .map(|e| e.state)
    };
    send_marked(client, http::Method::GET, false).await;
    crate::until("both serving", || {
        state("p0") == Some(EndpointState::Ready) && state("p1") == Some(EndpointState::Ready)
    })
    .await;
    servers[0].set_unavailable(true);
    crate::until("p0 out", || state("p0") == Some(EndpointState::NotServing)).await;
    for _ in 0..50 {
        assert_eq!(send_marked(client, http::Method::GET, false).await, 200);
    }
    servers[0].set_unavailable(false);
    crate::until("p0 back", || state("p0") == Some(EndpointState::Ready)).await;
    let before = servers[0].served();
    for _ in 0..50 {
        assert_eq!(send_marked(client, http::Method::GET, false).await, 200);
    }
    assert!(servers[0].served() > before, "p0 serves again");
}
