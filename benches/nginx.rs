//! Throughput through nginx when it closes connections often: `DiscoveryLayer`'s own
//! connections to nginx (h2c, `return 200`), with `keepalive_requests` 10 and 100 (a GOAWAY
//! every 10 or 100 requests on each connection) against 1,000 (nginx's default), in the same
//! run; beside each, hyper's pooled HTTP/2 client (`hyper_util`'s legacy `Client`,
//! `http2_only`) to the same nginx, as the baseline of what a reconnect costs any client.
//! 8 callers, 256 GETs per iteration; the time is per request. hyper's client surfaces the
//! requests a GOAWAY refused (it does not retry them): they are counted, not failed on.
//!
//! ```text
//! cargo bench --bench nginx --features http
//! ```
//!
//! Needs nginx (`apt-get install -y nginx-light`); without it, says so and measures nothing.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use tower_sd_testkit::nginx;

use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use tower::ServiceExt;
use tower_sd::connection::ConnectionSettings;
use tower_sd::http::{ConnectionDiscovery, DiscoveryLayer};
use tower_sd::{MemoryRegistry, ServiceRegistry};

const PER_ITER: usize = 256;
const CALLERS: usize = 8;

type Hyper = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// The baseline: hyper's client, 8 callers; returns the requests that failed.
async fn hyper_batch(client: &Hyper, uri: &http::Uri) -> usize {
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (client, uri) = (client.clone(), uri.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                for _ in 0..PER_ITER / CALLERS {
                    let request = http::Request::get(uri.clone()).body(Empty::new()).unwrap();
                    match client.request(request).await {
                        Ok(response) => {
                            response.into_body().collect().await.unwrap();
                        }
                        Err(_) => failed += 1,
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        failed += task.await.unwrap();
    }
    failed
}

async fn batch(client: &ConnectionDiscovery<Empty<Bytes>>) {
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..PER_ITER / CALLERS {
                    let request = http::Request::get("http://web/")
                        .body(Empty::new())
                        .unwrap();
                    let response = client.clone().oneshot(request).await.unwrap();
                    assert_eq!(response.status(), http::StatusCode::OK);
                    response.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

fn keepalive_requests(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("nginx");
    group.throughput(Throughput::Elements(PER_ITER as u64));
    for keepalive in [10, 100, 1_000] {
        let config = nginx::Config::default().keepalive_requests(keepalive);
        let Some(server) = rt.block_on(nginx::Nginx::start(&config)) else {
            return;
        };
        let registry = Arc::new(MemoryRegistry::new());
        rt.block_on(registry.register(server.instance("n0", "web")))
            .unwrap();
        let client = DiscoveryLayer::new(registry.clone())
            .over_connections::<Empty<Bytes>>(ConnectionSettings::default());
        rt.block_on(batch(&client));
        group.bench_function(BenchmarkId::new("keepalive_requests", keepalive), |b| {
            b.iter(|| rt.block_on(batch(&client)));
        });
        let hyper: Hyper = {
            let _runtime = rt.enter();
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http()
        };
        let uri: http::Uri = format!("http://127.0.0.1:{}/", server.port)
            .parse()
            .unwrap();
        let mut failed = 0;
        let mut sent = 0;
        group.bench_function(BenchmarkId::new("hyper_client", keepalive), |b| {
            b.iter(|| {
                failed += rt.block_on(hyper_batch(&hyper, &uri));
                sent += PER_ITER;
            });
        });
        println!("hyper_client/{keepalive}: {failed} of {sent} requests failed");
    }
    group.finish();
}

criterion_group!(benches, keepalive_requests);
criterion_main!(benches);
