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
//!
//! `unary_remote/...`: the same, with the 4 servers in a child process (this binary run
//! again with `TOWER_SD_BENCH_SERVE=1`), so that the process's CPU time is the clients'.
//!
//! After each criterion group, a latency pass sends 20,000 requests per client and caller
//! count, timing each one, and prints a table: throughput, p50 and p99 latency, and the
//! process's CPU time per request (from `/proc/self/stat`): both sides' cost in `unary`,
//! where client and servers share the process, the client's alone in `unary_remote`.
//!
//! `unary_policies/{plain,retry,health,retry_health}/C`: `LoadBalancedChannel` on the happy
//! path (in-process servers), without a service config, with a retry policy and throttle
//! for the method, with health checking, and with both: what each costs when nothing fails.
//!
//! `cargo bench --bench end_to_end --features tonic -- nomatch` runs the latency passes
//! alone. Built with `RUSTFLAGS="--cfg tokio_unstable"` and run with
//! `TOWER_SD_BENCH_NO_LIFO=1`, every runtime of the bench (the servers' too) runs with
//! tokio's LIFO slot off.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use tower_sd_testkit::servers;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group};
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

/// What the benched clients need of their transport.
trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Future: Send,
        Error: Into<tonic::codegen::StdError>,
        ResponseBody: tonic::codegen::Body<
            Data = bytes::Bytes,
            Error: Into<tonic::codegen::StdError> + Send,
        > + Send
                          + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Future: Send,
            Error: Into<tonic::codegen::StdError>,
            ResponseBody: tonic::codegen::Body<
                Data = bytes::Bytes,
                Error: Into<tonic::codegen::StdError> + Send,
            > + Send
                              + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Runs `total` unary calls split over `callers` tasks.
async fn run<T: Transport>(client: &HealthClient<T>, callers: usize, total: usize) -> Duration {
    timed(client, callers, total).await.0
}

/// [`run`], keeping each request's latency.
async fn timed<T: Transport>(
    client: &HealthClient<T>,
    callers: usize,
    total: usize,
) -> (Duration, Vec<Duration>) {
    let per_caller = total.div_ceil(callers);
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_caller);
                for _ in 0..per_caller {
                    let sent = Instant::now();
                    client
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .unwrap();
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    (start.elapsed(), latencies)
}

/// The process's user + system CPU time so far (Linux; zero elsewhere).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// One latency-pass row.
async fn latency_row<T: Transport>(name: &str, client: &HealthClient<T>, callers: usize) {
    const REQUESTS: usize = 20_000;
    let cpu = cpu_time();
    let (elapsed, mut latencies) = timed(client, callers, REQUESTS).await;
    let cpu = cpu_time().saturating_sub(cpu);
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let count = latencies.len() as f64;
    println!(
        "| {name} | {callers} | {:.1}k | {:.0} µs | {:.0} µs | {:.1} µs |",
        count / elapsed.as_secs_f64() / 1e3,
        at(0.50).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        cpu.as_secs_f64() * 1e6 / count,
    );
}

fn endpoint(port: u16) -> Endpoint {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap()
}

/// The environment variable that makes this binary serve instead of bench (see
/// [`ServerProcess`]).
const SERVE: &str = "TOWER_SD_BENCH_SERVE";

/// The 4 servers in a child process (this binary again, with [`SERVE`] set), so that the
/// parent's CPU time is the clients' alone. Killed on drop.
struct ServerProcess {
    child: std::process::Child,
    ports: Vec<u16>,
}

impl ServerProcess {
    fn start() -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(SERVE, "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the server process");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ports = line
            .split_whitespace()
            .map(|port| port.parse().expect("a port"))
            .collect();
        Self { child, ports }
    }

    /// In the child: serves until the parent closes stdin (or dies).
    fn serve() {
        let rt = runtime();
        let servers = rt.block_on(four_servers());
        let ports: Vec<String> = servers.iter().map(|s| s.port.to_string()).collect();
        println!("{}", ports.join(" "));
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .is_ok_and(|read| read > 0)
        {}
        drop(servers);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The 4 gRPC health servers every client is measured against.
async fn four_servers() -> Vec<TestServer> {
    let mut servers = Vec::new();
    for n in 0..4 {
        servers.push(TestServer::grpc(&format!("s{n}")).await);
    }
    servers
}

fn runtime() -> Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    // How much of the tail comes from tokio's LIFO slot (a woken task run next on the
    // worker that woke it): see the module docs.
    #[cfg(tokio_unstable)]
    if std::env::var_os("TOWER_SD_BENCH_NO_LIFO").is_some() {
        builder.disable_lifo_slot();
    }
    builder.build().unwrap()
}

/// Benches `LoadBalancedChannel`, a direct `Channel` and `balance_channel` against servers
/// on `ports`, as criterion group `name`, then prints the latency pass.
fn clients(c: &mut Criterion, rt: &Runtime, name: &str, ports: &[u16]) {
    let (ours, direct, tonic_balanced) = rt.block_on(async {
        let registry = Arc::new(MemoryRegistry::new());
        for (n, port) in ports.iter().enumerate() {
            let instance =
                tower_sd::ServiceInstance::new(format!("s{n}"), "health", "127.0.0.1", *port);
            registry.register(instance).await.unwrap();
        }
        let ours = LoadBalancedChannel::builder(registry, "health")
            .connect(Duration::from_secs(5))
            .await
            .unwrap();
        let direct = endpoint(ports[0]).connect().await.unwrap();
        let (balanced, changes) = Channel::balance_channel::<usize>(16);
        for (key, port) in ports.iter().enumerate() {
            changes
                .send(Change::Insert(key, endpoint(*port)))
                .await
                .unwrap();
        }
        // Keep the sender: dropping it would end tonic's discovery stream.
        std::mem::forget(changes);
        (
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

    let mut group = c.benchmark_group(name);
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

    println!("\n{name}:\n");
    println!("| client | callers | req/s | p50 | p99 | CPU / request |");
    println!("| --- | --- | --- | --- | --- | --- |");
    rt.block_on(async {
        for callers in [1usize, 8, 64] {
            latency_row("tower_sd", &ours, callers).await;
            latency_row("direct", &direct, callers).await;
            latency_row("balance_channel", &tonic_balanced, callers).await;
        }
    });
}

/// Servers in this process: the CPU per request is both sides'.
fn unary(c: &mut Criterion) {
    let rt = runtime();
    let servers = rt.block_on(four_servers());
    let ports: Vec<u16> = servers.iter().map(|server| server.port).collect();
    clients(c, &rt, "unary", &ports);
    drop(servers);
}

/// Servers in a child process: the CPU per request is the client's alone.
fn unary_remote(c: &mut Criterion) {
    let servers = ServerProcess::start();
    let rt = runtime();
    clients(c, &rt, "unary_remote", &servers.ports);
    drop(rt);
    drop(servers);
}

/// The happy-path cost of a retry policy and of health checking (see the module docs).
fn unary_policies(c: &mut Criterion) {
    let rt = runtime();
    let servers = rt.block_on(four_servers());
    let retry = r#""methodConfig": [{ "name": [{ "service": "grpc.health.v1.Health" }],
        "retryPolicy": { "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"] } }],
        "retryThrottling": { "maxTokens": 10, "tokenRatio": 0.1 }"#;
    let health = r#""healthCheckConfig": { "serviceName": "" }"#;
    let configs = [
        ("plain", None),
        ("retry", Some(format!("{{ {retry} }}"))),
        ("health", Some(format!("{{ {health} }}"))),
        ("retry_health", Some(format!("{{ {retry}, {health} }}"))),
    ];
    let clients: Vec<_> = rt.block_on(async {
        let registry = Arc::new(MemoryRegistry::new());
        for server in &servers {
            registry.register(server.instance("health")).await.unwrap();
        }
        let mut clients = Vec::new();
        for (name, config) in configs {
            let mut builder = LoadBalancedChannel::builder(registry.clone(), "health");
            if let Some(config) = config {
                builder = builder.service_config(config.parse().unwrap());
            }
            let channel = builder.connect(Duration::from_secs(5)).await.unwrap();
            let client = HealthClient::new(channel);
            // Warm up (and, with health checking, wait for the first answers).
            tokio::time::sleep(Duration::from_millis(200)).await;
            run(&client, 8, 512).await;
            clients.push((name, client));
        }
        clients
    });
    let mut group = c.benchmark_group("unary_policies");
    group.throughput(criterion::Throughput::Elements(PER_ITER as u64));
    for callers in [1usize, 8] {
        for (name, client) in &clients {
            group.bench_function(BenchmarkId::new(*name, callers), |b| {
                b.iter_custom(|iters| rt.block_on(run(client, callers, PER_ITER * iters as usize)));
            });
        }
    }
    group.finish();
    drop(servers);
}

criterion_group!(benches, unary, unary_remote, unary_policies);

fn main() {
    if std::env::var_os(SERVE).is_some() {
        ServerProcess::serve();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
