//! What tower-sd's tests, benches and examples share (see `Cargo.toml`). Every module is
//! compiled in: the crate depends on tower-sd with every feature.

#![allow(dead_code, unused_imports)]

pub mod dnsmasq;
pub mod endpoint_slices;
pub mod etcd;
pub mod fake_connect;
pub mod fake_consul;
pub mod fake_kube;
pub mod feed;
pub mod grpc;
pub mod grpcio;
pub mod limit;
pub mod logs;
pub mod nghttpd;
pub mod nginx;
pub mod numbers;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod raw_h2;
pub mod servers;
pub mod trivial;
pub mod unreliable;

pub use limit::time_limit;
use tower_sd::ServiceInstance;

/// Waits until `done()` holds, checking every millisecond of tokio time (which paused-time
/// tests advance by themselves), and fails the test after 10 s of it, naming `what`.
pub async fn until(what: &str, done: impl FnMut() -> bool) {
    until_within(what, std::time::Duration::from_secs(10), done).await;
}

/// [`until`], giving up after `limit`.
pub async fn until_within(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting {limit:?} until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// [`until`] for a condition that is itself asynchronous (a registry query).
pub async fn until_async<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Installs a test-friendly tracing subscriber once; logs show with `--nocapture`.
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_sd=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// An instance of `name` on 127.0.0.1.
pub fn instance(id: &str, name: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(id, name, "127.0.0.1", port)
}

/// The ids of a set, in order.
pub fn ids(set: &[ServiceInstance]) -> Vec<&str> {
    set.iter().map(|instance| instance.id.as_str()).collect()
}

/// A watch followed from a task of its own, as a balancer follows one, so it keeps running
/// while a test changes the registry.
pub type Watch = tokio::sync::mpsc::Receiver<tower_sd::Result<Vec<ServiceInstance>>>;

/// Follows `registry`'s watch of `query`.
pub fn follow(
    registry: &dyn tower_sd::ServiceRegistry,
    query: impl Into<tower_sd::ServiceQuery>,
) -> Watch {
    use futures_util::StreamExt;
    let mut stream = registry.watch(&query.into());
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The watch's next item, within 20 s.
pub async fn next_item(watch: &mut Watch) -> tower_sd::Result<Vec<ServiceInstance>> {
    tokio::time::timeout(std::time::Duration::from_secs(20), watch.recv())
        .await
        .expect("the watch yields in time")
        .expect("the watch never ends")
}

/// The watch's next set, skipping the errors before it (each checked by `expected`) for at
/// most `limit`: a registry that keeps failing fails the test instead of looping.
pub async fn next_set_after_errors(
    watch: &mut Watch,
    limit: std::time::Duration,
    mut expected: impl FnMut(&tower_sd::Error) -> bool,
) -> Vec<ServiceInstance> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let item = tokio::time::timeout(left, watch.recv())
            .await
            .unwrap_or_else(|_| panic!("no set within {limit:?}, only errors"))
            .expect("the watch never ends");
        match item {
            Ok(set) => return set,
            Err(error) => assert!(expected(&error), "unexpected error {error:?}"),
        }
    }
}

/// The `host:port` of each instance, sorted.
pub fn authorities(set: &[ServiceInstance]) -> Vec<String> {
    let mut all: Vec<String> = set.iter().map(ServiceInstance::authority).collect();
    all.sort();
    all
}

/// The authorities of the watch's next set, failing on an error.
pub async fn next_set(watch: &mut Watch) -> Vec<String> {
    authorities(&next_item(watch).await.expect("a set, not an error"))
}
