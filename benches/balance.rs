//! tower-sd's `Balance` against tower's `p2c::Balance`, measured in the same run.
//!
//! ```text
//! cargo bench --bench balance
//! ```
//!
//! - `per_request/{tower_sd,tower_sd_no_outlier,tower_sd_weighted,tower}/N`: one task, N
//!   always-ready endpoints, pending-requests load; the time of one `poll_ready` + `call` +
//!   response. `tower_sd` has the default outlier detection on; `tower_sd_no_outlier` turns
//!   it off; `tower_sd_weighted` gives the endpoints weights 1 to 4 (drawn by alias table).
//! - `per_request/shared_count`: no balancing, only an `Arc` cloned and dropped, the two
//!   locked read-modify-writes by which any count shared between handles follows one request
//!   (ours and tower's p2c both pay them): the floor under the rows above.
//! - `throughput/{tower_sd,tower_buffer}/T`: T tasks on a 2-worker runtime share one
//!   balancer over 16 endpoints: clones of ours, or clones of `Buffer(tower p2c)`. The time is
//!   per request (all tasks together), so requests/s = 1 / time.
//! - `publish/N`: the time from sending a discovery change to its snapshot being visible to
//!   pickers, at N endpoints, while another thread picks continuously. Prints p50/p99.
//!   `publish/10000x100`: 1% of 10,000 endpoints replaced at once (one batch).

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Waker};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::stream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::discover::{Change, ServiceList};
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower::{Service, ServiceExt};
use tower_sd::balance::Balance;
use tower_sd::endpoint::Endpoints;

use tower_sd_testkit::trivial;

use trivial::Trivial;

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// Our balancer over `n` trivial endpoints (default settings: outlier detection on), with
/// its first snapshot published.
fn ours(rt: &Runtime, n: usize) -> Balance<Trivial, usize> {
    ours_with(rt, n, Balance::builder())
}

fn ours_with(
    rt: &Runtime,
    n: usize,
    builder: tower_sd::balance::BalanceBuilder,
) -> Balance<Trivial, usize> {
    rt.block_on(async {
        let changes = (0..n).map(|key| Ok::<_, Infallible>(Change::Insert(key, Trivial)));
        let balance = builder.build(Endpoints::new(stream::iter(changes.collect::<Vec<_>>())));
        while balance.endpoints().len() < n {
            tokio::task::yield_now().await;
        }
        balance
    })
}

/// Ours over `n` endpoints weighted 1, 2, 3, 4, 1, ...
fn ours_weighted(rt: &Runtime, n: usize) -> Balance<Trivial, usize> {
    rt.block_on(async {
        let changes = (0..n).map(|key| {
            let endpoint = tower_sd::endpoint::Endpoint::new(Trivial).weight(1 + (key % 4) as u32);
            Ok::<_, Infallible>(Change::Insert(key, endpoint))
        });
        let balance = Balance::builder().build(stream::iter(changes.collect::<Vec<_>>()));
        while balance.endpoints().len() < n {
            tokio::task::yield_now().await;
        }
        balance
    })
}

type TowerBalance = tower::balance::p2c::Balance<
    PendingRequestsDiscover<ServiceList<Vec<Trivial>>, CompleteOnResponse>,
    (),
>;

fn tower_p2c(n: usize) -> TowerBalance {
    let discover = PendingRequestsDiscover::new(
        ServiceList::new(vec![Trivial; n]),
        CompleteOnResponse::default(),
    );
    tower::balance::p2c::Balance::new(discover)
}

/// One request driven by hand: poll_ready, call, poll the response once.
fn one_request<S: Service<()>>(service: &mut S, cx: &mut Context<'_>) {
    assert!(service.poll_ready(cx).is_ready());
    let response = pin!(service.call(()));
    assert!(response.poll(cx).is_ready());
}

fn per_request(c: &mut Criterion) {
    let rt = runtime(1);
    let mut group = c.benchmark_group("per_request");
    let mut cx = Context::from_waker(Waker::noop());
    let count = Arc::new(());
    group.bench_function("shared_count", |b| {
        b.iter(|| drop(std::hint::black_box(Arc::clone(&count))));
    });
    for n in [2usize, 16, 256, 10_000] {
        let mut balance = ours(&rt, n);
        group.bench_function(BenchmarkId::new("tower_sd", n), |b| {
            b.iter(|| one_request(&mut balance, &mut cx));
        });
        let mut plain = ours_with(&rt, n, Balance::builder().outlier_detection(None));
        group.bench_function(BenchmarkId::new("tower_sd_no_outlier", n), |b| {
            b.iter(|| one_request(&mut plain, &mut cx));
        });
        let mut weighted = ours_weighted(&rt, n);
        group.bench_function(BenchmarkId::new("tower_sd_weighted", n), |b| {
            b.iter(|| one_request(&mut weighted, &mut cx));
        });
        let mut tower = tower_p2c(n);
        // Let tower's balancer take in the whole list first.
        assert!(tower.poll_ready(&mut cx).is_ready());
        group.bench_function(BenchmarkId::new("tower", n), |b| {
            b.iter(|| one_request(&mut tower, &mut cx));
        });
    }
    group.finish();
}

/// Runs `total` requests split over `tasks` tasks, each on its own clone of `service`.
async fn run_shared<S>(service: &S, tasks: usize, total: usize) -> Duration
where
    S: Service<()> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let per_task = total.div_ceil(tasks);
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    service.ready().await.unwrap().call(()).await.unwrap();
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    start.elapsed()
}

fn throughput(c: &mut Criterion) {
    const N: usize = 16;
    const PER_ITER: usize = 4096;
    let rt = runtime(2);
    let mut group = c.benchmark_group("throughput");
    group.throughput(criterion::Throughput::Elements(PER_ITER as u64));
    let balance = ours(&rt, N);
    let buffered = rt.block_on(async { tower::buffer::Buffer::new(tower_p2c(N), 1024) });
    for tasks in [1usize, 2, 8, 64] {
        group.bench_function(BenchmarkId::new("tower_sd", tasks), |b| {
            b.iter_custom(|iters| {
                let total = PER_ITER * iters as usize;
                rt.block_on(run_shared(&balance, tasks, total))
            });
        });
        group.bench_function(BenchmarkId::new("tower_buffer", tasks), |b| {
            b.iter_custom(|iters| {
                let total = PER_ITER * iters as usize;
                rt.block_on(run_shared(&buffered, tasks, total))
            });
        });
    }
    group.finish();
}

fn publish(c: &mut Criterion) {
    let rt = runtime(1);
    let mut group = c.benchmark_group("publish");
    // (endpoints, changed per publish): one replaced, or 1% of 10,000 in one batch.
    for (n, batch) in [(256usize, 1usize), (10_000, 1), (10_000, 100)] {
        let (feed, mut rx) = mpsc::unbounded_channel();
        for key in 0..n {
            feed.send(Ok::<_, Infallible>(Change::Insert(key, Trivial)))
                .unwrap();
        }
        let balance = rt.block_on(async {
            let balance = Balance::builder()
                .build(Endpoints::new(stream::poll_fn(move |cx| rx.poll_recv(cx))));
            while balance.endpoints().len() < n {
                tokio::task::yield_now().await;
            }
            balance
        });

        // A picker on another thread, so publication competes with real traffic.
        let stop = Arc::new(AtomicBool::new(false));
        let picker = {
            let mut balance = balance.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut cx = Context::from_waker(Waker::noop());
                while !stop.load(Ordering::Relaxed) {
                    one_request(&mut balance, &mut cx);
                }
            })
        };

        let mut samples = Vec::new();
        let mut next_key = 0;
        let name = if batch == 1 {
            n.to_string()
        } else {
            format!("{n}x{batch}")
        };
        group.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Replace `batch` endpoints (re-inserts under their keys), keeping N
                    // constant.
                    let before = balance.updates();
                    let start = Instant::now();
                    for _ in 0..batch {
                        feed.send(Ok(Change::Insert(next_key % n, Trivial)))
                            .unwrap();
                        next_key += 1;
                    }
                    while balance.updates() == before {
                        std::hint::spin_loop();
                    }
                    let elapsed = start.elapsed();
                    samples.push(elapsed);
                    total += elapsed;
                }
                total
            });
        });
        stop.store(true, Ordering::Relaxed);
        picker.join().unwrap();
        if samples.is_empty() {
            // Filtered out by the command line.
            continue;
        }
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        eprintln!(
            "publish/{name}: p50 {:?} p99 {:?} over {} swaps",
            at(0.5),
            at(0.99),
            samples.len()
        );
    }
    group.finish();
}

criterion_group!(benches, per_request, throughput, publish);
criterion_main!(benches);
