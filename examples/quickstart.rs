//! tower-sd in one program: real HTTP backends, the in-memory registry, and `Balance`
//! following the registry while traffic flows.
//!
//! ```text
//! cargo run --example quickstart
//! cargo run --example quickstart --features config -- --config examples/config/memory.yaml
//! ```
//!
//! It starts three hyper backends on 127.0.0.1, registers them, and sends requests from
//! several tasks through one balancer. Then it adds a fourth backend, deregisters one, and
//! marks another critical, printing after each phase how many requests each backend served
//! and the latencies the client saw. Nothing leaves the loopback interface.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt, service_fn};
use tower_sd::balance::Balance;
use tower_sd::{HealthStatus, MemoryRegistry, ServiceInstance, ServiceRegistry};

const SERVICE: &str = "hello";
const TASKS: usize = 8;
const REQUESTS_PER_PHASE: usize = 3_000;

/// Starts an HTTP backend answering every request with its name; returns its port.
async fn start_backend(name: String) -> std::io::Result<(u16, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_: hyper::Request<Incoming>| {
                    let body = Full::new(Bytes::from(name.clone()));
                    async move { Ok::<_, Infallible>(hyper::Response::new(body)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "backend connection ended");
                }
            });
        }
    });
    Ok((port, task))
}

/// One request per call: what the balancer dispatches to an instance.
type Endpoint = tower::util::BoxCloneSyncService<(), String, BoxError>;

/// Makes the client service for one instance: a GET to its address, answering the body.
fn endpoint(client: &Client<HttpConnector, Empty<Bytes>>, instance: &ServiceInstance) -> Endpoint {
    let client = client.clone();
    let uri: hyper::Uri = format!("http://{}/", instance.authority())
        .parse()
        .expect("an authority from a validated instance is a valid URI");
    Endpoint::new(service_fn(move |()| {
        let (client, uri) = (client.clone(), uri.clone());
        async move {
            let response = client.get(uri).await?;
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(String::from_utf8_lossy(&body).into_owned())
        }
    }))
}

/// Latencies seen per backend in one phase.
type Served = BTreeMap<String, Vec<Duration>>;

/// Sends `REQUESTS_PER_PHASE` requests from `TASKS` tasks through clones of `balance`.
async fn phase(balance: &Balance<Endpoint>) -> Result<Served, BoxError> {
    let served = Arc::new(Mutex::new(Served::new()));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut balance = balance.clone();
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                for _ in 0..REQUESTS_PER_PHASE / TASKS {
                    let started = Instant::now();
                    let backend = balance.ready().await?.call(()).await?;
                    let latency = started.elapsed();
                    served
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(backend)
                        .or_default()
                        .push(latency);
                }
                Ok::<_, BoxError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let served = std::mem::take(
        &mut *served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok(served)
}

/// Waits (briefly) until the balancer's endpoints are the registry's healthy set, so each
/// phase starts from the new set.
async fn settle(
    registry: &dyn ServiceRegistry,
    balance: &Balance<Endpoint>,
) -> Result<(), BoxError> {
    let want: Vec<String> = registry
        .discover(&SERVICE.into())
        .await?
        .into_iter()
        .map(|i| i.id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut have: Vec<String> = balance.endpoints().into_iter().map(|e| e.key).collect();
        have.sort();
        if have == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("balancer has {have:?}, registry {want:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(feature = "config")]
fn from_config(file: &str) -> Result<Arc<dyn ServiceRegistry>, BoxError> {
    Ok(tower_sd::config::RegistryConfig::from_path(file)?.build()?)
}

#[cfg(not(feature = "config"))]
fn from_config(_file: &str) -> Result<Arc<dyn ServiceRegistry>, BoxError> {
    Err("--config needs the `config` cargo feature: cargo run --example quickstart --features config -- --config FILE".into())
}

fn print_table(title: &str, served: &Served) {
    println!("\n{title}");
    println!(
        "{:<12} {:>8} {:>10} {:>10} {:>10}",
        "backend", "requests", "p50", "p90", "p99"
    );
    for (backend, latencies) in served {
        let mut sorted = latencies.clone();
        sorted.sort();
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        println!(
            "{backend:<12} {:>8} {:>10.1?} {:>10.1?} {:>10.1?}",
            sorted.len(),
            at(0.50),
            at(0.90),
            at(0.99),
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person: not in a file, a pipe or CI logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    // The embedded registry by default; `--config FILE` uses any configured registry that
    // takes registrations (the backends register themselves in it).
    let memory = MemoryRegistry::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let embedded = args.is_empty();
    let registry: Arc<dyn ServiceRegistry> = match args.as_slice() {
        [] => Arc::new(memory.clone()),
        [flag, file] if flag == "--config" => from_config(file)?,
        _ => return Err("usage: quickstart [--config FILE]".into()),
    };
    let mut servers = Vec::new();
    for n in 1..=3 {
        let name = format!("backend-{n}");
        let (port, task) = start_backend(name.clone()).await?;
        registry
            .register(ServiceInstance::new(&name, SERVICE, "127.0.0.1", port))
            .await?;
        servers.push(task);
    }

    let client = Client::builder(TokioExecutor::new()).build_http();
    let balance = Balance::builder()
        .wait_for_endpoints(Duration::from_secs(2))
        .build(tower_sd::RegistryDiscover::new(
            &*registry,
            SERVICE,
            move |instance| Ok::<_, Infallible>(endpoint(&client, instance)),
        ));

    settle(&*registry, &balance).await?;
    print_table("three backends", &phase(&balance).await?);

    let (port, task) = start_backend("backend-4".to_owned()).await?;
    registry
        .register(ServiceInstance::new(
            "backend-4",
            SERVICE,
            "127.0.0.1",
            port,
        ))
        .await?;
    servers.push(task);
    settle(&*registry, &balance).await?;
    print_table("backend-4 registered", &phase(&balance).await?);

    registry.deregister("backend-1").await?;
    settle(&*registry, &balance).await?;
    print_table("backend-1 deregistered", &phase(&balance).await?);

    if embedded {
        memory.set_health("backend-2", HealthStatus::Critical)?;
    } else {
        // Other registries have no "mark critical" call; maintenance takes it out the same way.
        registry
            .set_maintenance("backend-2", true, "quickstart")
            .await?;
    }
    settle(&*registry, &balance).await?;
    print_table("backend-2 marked critical", &phase(&balance).await?);

    for server in servers {
        server.abort();
    }
    Ok(())
}
