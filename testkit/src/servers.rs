//! Real servers on 127.0.0.1 for end-to-end tests: a tonic gRPC server (the standard
//! `grpc.health.v1.Health` service, so the client is real generated code) and a hyper HTTP
//! server. Each counts the requests it served, can be slowed down, and can be stopped
//! abruptly (every connection dropped at once) or after its in-flight requests finish.

// Shared by tests and examples; each uses part of it, and `pub` is for them.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::Service;
use tower_sd::ServiceInstance;

/// Counters shared between a server and the test.
#[derive(Debug, Default)]
pub struct Stats {
    pub served: AtomicUsize,
    pub in_flight: AtomicUsize,
    /// Added latency per request, in milliseconds.
    pub delay_ms: AtomicU64,
    /// gRPC servers answer `UNAVAILABLE` (trailers-only) while set.
    pub unavailable: std::sync::atomic::AtomicBool,
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// The HTTP/2 `MAX_CONCURRENT_STREAMS` of new connections; 0 for hyper's default.
    pub max_streams: AtomicUsize,
}

/// A running server.
pub struct TestServer {
    pub name: String,
    pub port: u16,
    pub stats: Arc<Stats>,
    accept: JoinHandle<()>,
}

impl TestServer {
    /// A tonic server with the health service (its overall status is SERVING).
    pub async fn grpc(name: &str) -> Self {
        Self::grpc_reporting(name).await.0
    }

    /// A tonic server with the health service, and the reporter that sets its statuses.
    pub async fn grpc_reporting(name: &str) -> (Self, tonic_health::server::HealthReporter) {
        let (reporter, health) = tonic_health::server::health_reporter();
        let routes = tonic::service::Routes::new(health);
        let stats = Arc::new(Stats::default());
        let flags = Arc::clone(&stats);
        let server = Self::start(name, true, stats, move || {
            let (routes, flags) = (routes.clone(), Arc::clone(&flags));
            tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let mut routes = routes.clone();
                let unavailable = flags.unavailable.load(Ordering::SeqCst);
                async move {
                    if unavailable {
                        return Ok(tonic::Status::unavailable("shedding load").into_http());
                    }
                    routes.call(request).await
                }
            })
        })
        .await;
        (server, reporter)
    }

    /// A tonic server (tonic's own `Server`, with the health service) that shuts down
    /// gracefully when the sender fires or is dropped: it stops accepting, sends GOAWAY on
    /// each connection and lets the requests in flight finish.
    pub async fn grpc_graceful(name: &str) -> (Self, tokio::sync::oneshot::Sender<()>) {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| {
                // TCP_NODELAY, as in `start` (which says why).
                let _ = stream.set_nodelay(true);
                stream
            });
            Some((accepted, listener))
        });
        let stats = Arc::new(Stats::default());
        let counters = Arc::clone(&stats);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let accept = tokio::spawn(async move {
            let counting = tower::layer::layer_fn(move |inner| Counting {
                inner,
                stats: Arc::clone(&counters),
            });
            let _ = tonic::transport::Server::builder()
                .layer(counting)
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        let server = Self {
            name: name.to_owned(),
            port,
            stats,
            accept,
        };
        (server, stop)
    }

    /// Whether the server's task has ended (a graceful shutdown finished).
    pub fn stopped(&self) -> bool {
        self.accept.is_finished()
    }

    /// Makes a gRPC server answer `UNAVAILABLE` (or serve again).
    /// From now on, answer every request `UNAVAILABLE` (gRPC) or 503 (HTTP), or not.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.stats.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// An HTTP/1 server answering every request with its name, and the `Host` header it
    /// received in `x-seen-host`.
    pub async fn http(name: &str) -> Self {
        Self::echo_host(name, false).await
    }

    /// [`http`](Self::http) speaking HTTP/2 only (h2c, prior knowledge).
    pub async fn http2(name: &str) -> Self {
        Self::echo_host(name, true).await
    }

    async fn echo_host(name: &str, http2: bool) -> Self {
        let body = Bytes::from(name.to_owned());
        let stats = Arc::new(Stats::default());
        let flags = Arc::clone(&stats);
        Self::start(name, http2, stats, move || {
            let (body, flags) = (body.clone(), Arc::clone(&flags));
            tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let mut response = http::Response::new(Full::new(body.clone()));
                if flags.unavailable.load(Ordering::SeqCst) {
                    // `set_unavailable`: 503, as a server shedding load answers.
                    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                let host = request
                    .headers()
                    .get(http::header::HOST)
                    .cloned()
                    .or_else(|| request.uri().authority()?.as_str().parse().ok());
                if let Some(host) = host {
                    response.headers_mut().insert("x-seen-host", host);
                }
                async move { Ok::<_, Infallible>(response) }
            })
        })
        .await
    }

    pub async fn start<S, F, RB>(name: &str, http2: bool, stats: Arc<Stats>, make: F) -> Self
    where
        F: Fn() -> S + Send + 'static,
        S: Service<
                http::Request<hyper::body::Incoming>,
                Response = http::Response<RB>,
                Error = Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        RB: http_body::Body + Send + 'static,
        RB::Data: Send,
        RB::Error: Into<tower::BoxError>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counters = Arc::clone(&stats);
        let accept = tokio::spawn(async move {
            // Owned here: aborting this task drops every connection at once.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                // As tonic's `Server` does by default: without it, a small frame written while
                // a response is unacknowledged (a PING or WINDOW_UPDATE) waits for the
                // client's delayed ACK, and requests stall for 40 ms at random.
                let _ = stream.set_nodelay(true);
                let service = Counting {
                    inner: make(),
                    stats: Arc::clone(&counters),
                };
                counters.connections.fetch_add(1, Ordering::SeqCst);
                let mut builder = auto::Builder::new(TokioExecutor::new());
                if http2 {
                    let max = counters.max_streams.load(Ordering::SeqCst);
                    if max > 0 {
                        builder.http2().max_concurrent_streams(max as u32);
                    }
                    builder = builder.http2_only();
                } else {
                    builder = builder.http1_only();
                }
                connections.spawn(async move {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                        .await;
                });
            }
        });
        Self {
            name: name.to_owned(),
            port,
            stats,
            accept,
        }
    }

    /// The instance to register for this server.
    pub fn instance(&self, service: &str) -> ServiceInstance {
        ServiceInstance::new(&self.name, service, "127.0.0.1", self.port)
    }

    pub fn served(&self) -> usize {
        self.stats.served.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, delay: Duration) {
        self.stats
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Stops at once: the listener and every connection go away mid-request.
    pub fn crash(&self) {
        self.accept.abort();
    }

    /// Once callers have stopped sending to it: waits until nothing is in flight and no
    /// request has arrived for 100 ms (requests already on the wire land first), then stops.
    pub async fn drain_and_stop(&self) {
        let mut quiet_since = tokio::time::Instant::now();
        let mut last = self.served();
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let served = self.served();
            if served != last || self.stats.in_flight.load(Ordering::SeqCst) > 0 {
                last = served;
                quiet_since = tokio::time::Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(100) {
                break;
            }
        }
        self.accept.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Counts requests and in-flight ones, and adds the configured delay.
#[derive(Clone)]
struct Counting<S> {
    inner: S,
    stats: Arc<Stats>,
}

impl<S, B> Service<http::Request<B>> for Counting<S>
where
    S: Service<http::Request<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let stats = Arc::clone(&self.stats);
        stats.in_flight.fetch_add(1, Ordering::SeqCst);
        let response = self.inner.call(request);
        Box::pin(async move {
            let delay = stats.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let response = response.await;
            stats.served.fetch_add(1, Ordering::SeqCst);
            stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            response
        })
    }
}

/// Asserts that `total` requests reached the servers and each served its share within
/// a fifth (20-30% each of four).
pub fn assert_even_spread(servers: &[TestServer], total: usize) {
    let served: Vec<usize> = servers.iter().map(TestServer::served).collect();
    assert_eq!(served.iter().sum::<usize>(), total);
    let n = servers.len();
    for count in &served {
        assert!(
            (total * 4 / (5 * n)..=total * 6 / (5 * n)).contains(count),
            "each of {n} servers serves its share within a fifth: {served:?}"
        );
    }
}

/// Starts `n` servers named `{prefix}{i}` with `start` and registers each as `service`.
pub async fn register_servers<F, Fut>(
    registry: &tower_sd::MemoryRegistry,
    service: &str,
    prefix: &str,
    n: usize,
    start: F,
) -> Vec<TestServer>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = TestServer>,
{
    use tower_sd::ServiceRegistry;
    let mut servers = Vec::new();
    for i in 0..n {
        let server = start(format!("{prefix}{i}")).await;
        registry.register(server.instance(service)).await.unwrap();
        servers.push(server);
    }
    servers
}

/// GETs `uri` through `client`; returns the body and the host the server saw
/// (`x-seen-host`, from [`TestServer::http`] and [`TestServer::http2`]).
pub async fn get<S, B>(client: &S, uri: &str) -> Result<(String, String), tower::BoxError>
where
    S: Service<http::Request<http_body_util::Empty<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: Into<tower::BoxError>,
    B: http_body::Body,
    B::Error: Into<tower::BoxError>,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let request = http::Request::get(uri).body(http_body_util::Empty::new())?;
    let response = client.clone().oneshot(request).await.map_err(Into::into)?;
    let seen = response
        .headers()
        .get("x-seen-host")
        .map(|h| h.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes();
    Ok((String::from_utf8_lossy(&body).into_owned(), seen))
}
