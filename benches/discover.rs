//! Cost of turning a new registry set into tower changes.
//!
//! `cargo bench --bench discover`

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::{FutureExt, StreamExt, stream};
use tower_sd::{RegistryDiscover, ServiceInstance};

fn set(n: usize, port: u16) -> Vec<ServiceInstance> {
    (0..n)
        .map(|i| ServiceInstance::new(format!("i{i}"), "svc", "10.0.0.1", port + (i % 2) as u16))
        .collect()
}

/// One registry update of `n` instances that all moved to another port: diff plus changes.
fn diff(c: &mut Criterion) {
    let mut group = c.benchmark_group("discover/update");
    for n in [16usize, 256, 10_000] {
        let a = set(n, 1000);
        let b = set(n, 2000);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter_batched(
                || {
                    let sets =
                        stream::iter([Ok(a.clone()), Ok(b.clone())]).chain(stream::pending());
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
                    changes
                },
                criterion::BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, diff);
criterion_main!(benches);
