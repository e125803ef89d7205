//! Memory per endpoint and per idle connection, in bytes of resident memory.
//!
//! `cargo bench --bench memory --features tonic`
//!
//! - **balancer**: a `Balance` over 10,000 endpoints whose service is a zero-sized value:
//!   the bytes live once all are published, per endpoint (slots, the snapshot, the
//!   updater's index; no service).
//! - **registry discovery**: the same through `RegistryDiscover` from 10,000
//!   `ServiceInstance`s (ids like `api-01234`, address, port): the instances it keeps to
//!   diff the next set, on top.
//! - **idle connection**: `LoadBalancedChannel` over 200 instances of one tonic server in a
//!   child process (each instance its own HTTP/2 connection), all connected and idle: the
//!   client's bytes per connection.
//!
//! Bytes are the growth of the process's resident memory (`/proc/self/statm`), so they
//! include the allocator's own overhead, as a deployment pays it; the crate forbids
//! `unsafe`, which a counting allocator would need.

// A bench binary with its own `main`.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use tower::discover::Change;
use tower_sd::balance::Balance;
use tower_sd::endpoint::{Connectivity, Endpoints};
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{MemoryRegistry, RegistryDiscover, ServiceInstance, ServiceRegistry};
use tower_sd_testkit::servers::TestServer;
use tower_sd_testkit::trivial::Trivial;

/// Set in the child process that serves.
const SERVE: &str = "TOWER_SD_MEMORY_SERVE";

/// The process's resident memory, in bytes (`/proc/self/statm`, Linux).
fn resident() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: i64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const ENDPOINTS: usize = 10_000;
const CONNECTIONS: usize = 200;

fn balancer(rt: &tokio::runtime::Runtime) -> f64 {
    rt.block_on(async {
        let changes: Vec<_> = (0..ENDPOINTS)
            .map(|key| Ok::<_, Infallible>(Change::Insert(key, Trivial)))
            .collect();
        let before = resident();
        let balance = Balance::builder().build(Endpoints::new(stream::iter(changes)));
        per_endpoint(balance, before).await
    })
}

/// Resident bytes per endpoint grown since `before`, once `balance` lists them all.
async fn per_endpoint<K: Clone>(balance: Balance<Trivial, K>, before: i64) -> f64 {
    while balance.endpoints().len() < ENDPOINTS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let bytes = resident() - before;
    drop(balance);
    bytes as f64 / ENDPOINTS as f64
}

fn instances(n: usize) -> Vec<ServiceInstance> {
    (0..n)
        .map(|i| {
            ServiceInstance::new(
                format!("api-{i:05}"),
                "api",
                "10.0.0.1",
                1 + (i % 60_000) as u16,
            )
        })
        .collect()
}

fn registry_discovery(rt: &tokio::runtime::Runtime) -> f64 {
    rt.block_on(async {
        let before = resident();
        let set = instances(ENDPOINTS);
        let watch = stream::iter([Ok(set)]).chain(stream::pending());
        let discover =
            RegistryDiscover::from_stream("api", watch, |_| Ok::<_, Infallible>(Trivial));
        per_endpoint(Balance::builder().build(discover), before).await
    })
}

/// The tonic server, in a child process: its port, and the child (killed when dropped).
struct Child(std::process::Child, u16);

impl Child {
    fn start() -> Self {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(SERVE, "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Self(child, line.trim().parse().unwrap())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// In the child: serves until the parent closes stdin (or dies).
fn serve() {
    let rt = runtime();
    let server = rt.block_on(TestServer::grpc("memory"));
    println!("{}", server.port);
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_line(&mut String::new());
}

fn idle_connections(rt: &tokio::runtime::Runtime) -> f64 {
    let child = Child::start();
    let port = child.1;
    let bytes = rt.block_on(async {
        let registry = MemoryRegistry::new();
        for i in 0..CONNECTIONS {
            registry
                .register(ServiceInstance::new(
                    format!("api-{i}"),
                    "api",
                    "127.0.0.1",
                    port,
                ))
                .await
                .unwrap();
        }
        let registry = Arc::new(registry);
        // The channel's fixed costs first, over no instance.
        let baseline =
            LoadBalancedChannel::builder(Arc::new(MemoryRegistry::new()), "none").build();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = resident();
        let channel = LoadBalancedChannel::builder(registry, "api").build();
        loop {
            let ready = channel
                .endpoints()
                .iter()
                .filter(|e| e.connectivity == Some(Connectivity::Ready))
                .count();
            if ready == CONNECTIONS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let bytes = resident() - before;
        drop((channel, baseline));
        bytes
    });
    drop(child);
    bytes as f64 / CONNECTIONS as f64
}

fn main() {
    if std::env::var_os(SERVE).is_some() {
        serve();
        return;
    }
    // Only `cargo bench` runs the measurement (`cargo test --benches` passes no `--bench`).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = runtime();
    println!("| what | bytes each |");
    println!("| --- | ---: |");
    println!(
        "| balancer endpoint (of {ENDPOINTS}) | {:.0} |",
        balancer(&rt)
    );
    println!(
        "| balancer endpoint through RegistryDiscover (of {ENDPOINTS}) | {:.0} |",
        registry_discovery(&rt)
    );
    println!(
        "| idle connection, client side (of {CONNECTIONS}) | {:.0} |",
        idle_connections(&rt)
    );
}
