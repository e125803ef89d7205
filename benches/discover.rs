//! Cost of turning a new registry set into tower changes, and into a published snapshot.
//!
//! `cargo bench --bench discover`
//!
//! - `discover/update/N`: every one of N instances moved to another port: the diff into
//!   tower changes.
//! - `discover/one_percent/10000`: 100 of 10,000 instances moved: the diff alone.
//! - `discover/to_snapshot/10000`: the same change, from the registry's set arriving on
//!   the watch stream to the balancer's snapshot holding it (diff, updater, publish), while
//!   another thread picks continuously. Prints p50/p99.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::{FutureExt, StreamExt, stream};
use tokio::time::Instant;
use tower::Service;
use tower_sd::balance::Balance;
use tower_sd::{RegistryDiscover, ServiceInstance};
use tower_sd_testkit::trivial::Trivial;

fn set(n: usize, port: u16) -> Vec<ServiceInstance> {
    (0..n)
        .map(|i| ServiceInstance::new(format!("i{i}"), "svc", "10.0.0.1", port + (i % 2) as u16))
        .collect()
}

/// The time of one update from set `a` to set `b` of `n` instances: the diff into changes.
fn update(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: usize,
    a: &[ServiceInstance],
    b: &[ServiceInstance],
) {
    group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
        bench.iter_batched(
            || {
                let sets = stream::iter([Ok(a.to_vec()), Ok(b.to_vec())]).chain(stream::pending());
                let mut discover =
                    RegistryDiscover::from_stream("svc", sets, |i| Ok::<_, Infallible>(i.port));
                // Apply the first set outside the timed part.
                for _ in 0..n {
                    discover.next().now_or_never();
                }
                discover
            },
            |mut discover| {
                let mut changes = 0;
                while let Some(Some(change)) = discover.next().now_or_never() {
                    black_box(change.ok());
                    changes += 1;
                }
                // Dropped outside the timed part, as the setup's is made outside it.
                (changes, discover)
            },
            criterion::BatchSize::LargeInput,
        );
    });
}

/// One registry update of `n` instances that all moved to another port: diff plus changes.
fn diff(c: &mut Criterion) {
    let mut group = c.benchmark_group("discover/update");
    for n in [16usize, 256, 10_000] {
        update(&mut group, n, &set(n, 1000), &set(n, 2000));
    }
    group.finish();
}

/// The set of `n` instances in which the first `n / 100` are on `port` and the rest on
/// 1000.
fn one_percent_moved(n: usize, port: u16) -> Vec<ServiceInstance> {
    (0..n)
        .map(|i| {
            let port = if i < n / 100 { port } else { 1000 };
            ServiceInstance::new(format!("i{i:05}"), "svc", "10.0.0.1", port)
        })
        .collect()
}

/// 1% of 10,000 instances change: the diff into changes.
fn one_percent(c: &mut Criterion) {
    let n = 10_000;
    let mut group = c.benchmark_group("discover/one_percent");
    update(
        &mut group,
        n,
        &one_percent_moved(n, 2000),
        &one_percent_moved(n, 3000),
    );
    group.finish();
}

/// 1% of 10,000 instances change: from the set arriving to the snapshot published.
fn to_snapshot(c: &mut Criterion) {
    let n = 10_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (sets, mut rx) = tokio::sync::mpsc::unbounded_channel();
    sets.send(Ok(one_percent_moved(n, 2000))).unwrap();
    let watch = stream::poll_fn(move |cx| rx.poll_recv(cx));
    let balance: Balance<Trivial, String> = rt.block_on(async {
        let discover =
            RegistryDiscover::from_stream("svc", watch, |_| Ok::<_, Infallible>(Trivial));
        let balance = Balance::builder().build(discover);
        while balance.endpoints().len() < n {
            tokio::task::yield_now().await;
        }
        balance
    });
    let stop = Arc::new(AtomicBool::new(false));
    let picker = {
        let balance = balance.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut balance = balance.clone();
                let mut cx = Context::from_waker(Waker::noop());
                if let Poll::Ready(Ok(())) = balance.poll_ready(&mut cx) {
                    drop(balance.call(()));
                }
            }
        })
    };
    let mut group = c.benchmark_group("discover/to_snapshot");
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut round = 0u16;
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            // Measured on the runtime's one worker, beside the updater: the measuring task
            // yields to it instead of competing for a core with it and the picker.
            let (balance, sets, samples) = (balance.clone(), sets.clone(), Arc::clone(&samples));
            let first = round;
            round = round.wrapping_add(iters as u16);
            rt.block_on(rt.spawn(async move {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let set = one_percent_moved(n, 3000 + first.wrapping_add(i as u16) % 2);
                    let before = balance.updates();
                    let start = Instant::now();
                    sets.send(Ok(set)).unwrap();
                    while balance.updates() == before {
                        tokio::task::yield_now().await;
                    }
                    let elapsed = start.elapsed();
                    samples.lock().unwrap().push(elapsed);
                    total += elapsed;
                }
                total
            }))
            .unwrap()
        });
    });
    group.finish();
    stop.store(true, Ordering::Relaxed);
    picker.join().unwrap();
    let mut samples = std::mem::take(&mut *samples.lock().unwrap());
    if !samples.is_empty() {
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        eprintln!(
            "discover/to_snapshot/{n}: p50 {:?} p99 {:?} over {} sets",
            at(0.5),
            at(0.99),
            samples.len()
        );
    }
}

criterion_group!(benches, diff, one_percent, to_snapshot);
criterion_main!(benches);
