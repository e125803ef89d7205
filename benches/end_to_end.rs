//! Unary gRPC throughput on loopback: `LoadBalancedChannel` over 4 servers, one direct tonic
//! `Channel` to one server, and tonic's `Channel::balance_channel` over the same 4, in the
//! same run.
//!
//! ```text
//! cargo bench --bench end_to_end --features tonic
//! ```
//!
//! `unary/{tower_sd,direct,balance_channel}/C`: C concurrent callers, each with its own clone
//! of the client; the time is per request (all callers together).

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

#[path = "../tests/support/servers.rs"]
mod servers;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use servers::TestServer;
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{MemoryRegistry, ServiceRegistry};

const PER_ITER: usize = 256;

/// Runs `total` unary calls split over `callers` tasks.
async fn run<T>(client: &HealthClient<T>, callers: usize, total: usize) -> Duration
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Error: Into<tonic::codegen::StdError>,
{
    let per_caller = total.div_ceil(callers);
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for _ in 0..per_caller {
                    client
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

fn endpoint(server: &TestServer) -> Endpoint {
    Endpoint::from_shared(format!("http://127.0.0.1:{}", server.port)).unwrap()
}

fn unary(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (servers, ours, direct, tonic_balanced) = rt.block_on(async {
        let registry = Arc::new(MemoryRegistry::new());
        let mut servers = Vec::new();
        for n in 0..4 {
            let server = TestServer::grpc(&format!("s{n}")).await;
            registry.register(server.instance("health")).await.unwrap();
            servers.push(server);
        }
        let ours = LoadBalancedChannel::builder(registry, "health")
            .connect(Duration::from_secs(5))
            .await
            .unwrap();
        let direct = endpoint(&servers[0]).connect().await.unwrap();
        let (balanced, changes) = Channel::balance_channel::<usize>(16);
        for (key, server) in servers.iter().enumerate() {
            changes
                .send(Change::Insert(key, endpoint(server)))
                .await
                .unwrap();
        }
        // Keep the sender: dropping it would end tonic's discovery stream.
        std::mem::forget(changes);
        (
            servers,
            HealthClient::new(ours),
            HealthClient::new(direct),
            HealthClient::new(balanced),
        )
    });
    // Warm every connection up.
    rt.block_on(async {
        run(&ours, 8, 512).await;
        run(&direct, 8, 512).await;
        run(&tonic_balanced, 8, 512).await;
    });

    let mut group = c.benchmark_group("unary");
    group.throughput(criterion::Throughput::Elements(PER_ITER as u64));
    for callers in [1usize, 8, 64] {
        let total = |iters: u64| PER_ITER * iters as usize;
        group.bench_function(BenchmarkId::new("tower_sd", callers), |b| {
            b.iter_custom(|iters| rt.block_on(run(&ours, callers, total(iters))));
        });
        group.bench_function(BenchmarkId::new("direct", callers), |b| {
            b.iter_custom(|iters| rt.block_on(run(&direct, callers, total(iters))));
        });
        group.bench_function(BenchmarkId::new("balance_channel", callers), |b| {
            b.iter_custom(|iters| rt.block_on(run(&tonic_balanced, callers, total(iters))));
        });
    }
    group.finish();
    drop(servers);
}

criterion_group!(benches, unary);
criterion_main!(benches);
