//! `DiscoveryLayer`'s per-request lookup of a service's balancer: the read-mostly map it uses
//! (`ArcSwap<HashMap>`, no lock) against the mutex-guarded map it used before, measured in
//! the same run, from one thread and from two threads at once; and a whole routed request
//! through the layer over a trivial client.
//!
//! ```text
//! cargo bench --bench discovery_layer --features http
//! ```

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tower::{Layer, ServiceExt};
use tower_sd::http::DiscoveryLayer;
use tower_sd::{MemoryRegistry, ServiceInstance, ServiceRegistry};

/// What a map entry is: a handle the lookup clones (as the layer clones its `Balance`).
type Handle = Arc<String>;
type Swapped = Arc<ArcSwap<HashMap<String, Handle>>>;
type Locked = Arc<Mutex<HashMap<String, Handle>>>;

fn maps(n: usize) -> (Swapped, Locked) {
    let map: HashMap<String, Handle> = (0..n)
        .map(|i| (format!("service-{i}"), Arc::new(format!("balancer {i}"))))
        .collect();
    (
        Arc::new(ArcSwap::from_pointee(map.clone())),
        Arc::new(Mutex::new(map)),
    )
}

/// `iters` lookups on each of `threads` threads; the time per lookup.
fn run(
    threads: usize,
    iters: u64,
    lookup: impl Fn(&str) -> Handle + Send + Sync + Clone + 'static,
) -> Duration {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let lookup = lookup.clone();
            std::thread::spawn(move || {
                for i in 0..iters {
                    let name = if i % 2 == 0 { "service-3" } else { "service-7" };
                    std::hint::black_box(lookup(name));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    start.elapsed() / u32::try_from(threads).unwrap()
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for threads in [1usize, 2] {
        let (swap, mutex) = maps(16);
        group.bench_function(BenchmarkId::new("arc_swap", threads), |b| {
            let swap = Arc::clone(&swap);
            b.iter_custom(|iters| {
                let swap = Arc::clone(&swap);
                run(threads, iters, move |name| Arc::clone(&swap.load()[name]))
            });
        });
        group.bench_function(BenchmarkId::new("mutex", threads), |b| {
            let mutex = Arc::clone(&mutex);
            b.iter_custom(|iters| {
                let mutex = Arc::clone(&mutex);
                run(threads, iters, move |name| {
                    Arc::clone(&mutex.lock().unwrap()[name])
                })
            });
        });
    }
    group.finish();
}

fn routed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = Arc::new(MemoryRegistry::new());
    rt.block_on(registry.register(ServiceInstance::new("a", "backend", "127.0.0.1", 1)))
        .unwrap();
    let inner = tower::service_fn(|_: http::Request<()>| async {
        Ok::<_, Infallible>(http::Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    });
    let registry: Arc<dyn ServiceRegistry> = registry;
    let client = DiscoveryLayer::new(registry).layer(inner);
    rt.block_on(async {
        let request = || http::Request::get("http://backend/").body(()).unwrap();
        client.clone().oneshot(request()).await.unwrap();
    });
    c.bench_function("routed_request", |b| {
        b.iter(|| {
            rt.block_on(async {
                let request = http::Request::get("http://backend/").body(()).unwrap();
                client.clone().oneshot(request).await.unwrap()
            })
        });
    });
}

criterion_group!(benches, lookup, routed);
criterion_main!(benches);
