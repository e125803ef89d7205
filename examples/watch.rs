//! Prints each healthy set of a service as one JSON line whenever it changes.
//!
//! ```text
//! cargo run --example watch
//! ```
//!
//! With no arguments it runs a self-contained demo on the in-memory registry: it registers
//! three instances, marks one critical, deregisters one, and prints every set it sees.
//!
//! `--config FILE SERVICE` watches a service in any configured registry (feature `config`;
//! files in `examples/config/`), `--consul ADDRESS SERVICE` watches a service in Consul
//! (feature `consul`; `-` as the address means `CONSUL_HTTP_ADDR` or the default), and
//! `--kubernetes NAMESPACE SERVICE [PORT_NAME]` watches a Kubernetes Service's EndpointSlices
//! (feature `kubernetes`; the KUBECONFIG or in-cluster client; `-` as the namespace means the
//! client's), `--etcd ENDPOINT SERVICE` watches a service in etcd (feature `etcd`), and
//! `--dns NAME [NAMESERVER]` watches a DNS name (feature `dns`; SRV, or A/AAAA for
//! `host:port`; the system's name servers by default), each until interrupted:
//!
//! ```text
//! cargo run --example watch --features consul -- --consul 127.0.0.1:8500 web
//! cargo run --example watch --features kubernetes -- --kubernetes default greeter grpc
//! cargo run --example watch --features etcd -- --etcd http://127.0.0.1:2379 greeter
//! cargo run --example watch --features dns -- --dns _grpc._tcp.greeter.example.com
//! ```
//! Logs go to stderr (`RUST_LOG=debug` for more); stdout carries only the JSON lines.

use std::process::ExitCode;

use futures_util::StreamExt;
use serde_json::json;
use tower_sd::registry::WatchStream;
use tower_sd::{BoxError, HealthStatus, MemoryRegistry, ServiceInstance, ServiceRegistry};

const USAGE: &str = "usage: watch                            (demo on the in-memory registry)
       watch --config FILE SERVICE       (feature config; any configured registry)
       watch --consul ADDRESS SERVICE    (feature consul; ADDRESS `-` for CONSUL_HTTP_ADDR)
       watch --kubernetes NAMESPACE SERVICE [PORT_NAME]
                                         (feature kubernetes; NAMESPACE `-` for the client's)
       watch --etcd ENDPOINT SERVICE     (feature etcd; ENDPOINT like http://127.0.0.1:2379)
       watch --dns NAME [NAMESERVER]     (feature dns; NAME `_grpc._tcp.host` or `host:port`)";

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person: not in a file, a pipe or CI logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => demo().await,
        [flag, address, service] if flag == "--consul" => consul(address, service).await,
        [flag, file, service] if flag == "--config" => configured(file, service).await,
        [flag, endpoint, service] if flag == "--etcd" => etcd(endpoint, service).await,
        [flag, name, server @ ..] if flag == "--dns" && server.len() <= 1 => {
            dns(name, server.first()).await
        }
        [flag, namespace, service, port_name @ ..]
            if flag == "--kubernetes" && port_name.len() <= 1 =>
        {
            kubernetes(namespace, service, port_name.first()).await
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The error and its causes: `invalid configuration at `registry.type`: ...`.
            let mut message = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// One JSON line: the service and its instances, sorted by id.
fn json_line(service: &str, instances: &[ServiceInstance]) -> String {
    let mut instances: Vec<&ServiceInstance> = instances.iter().collect();
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    let instances: Vec<_> = instances
        .into_iter()
        .map(|i| {
            json!({
                "id": i.id, "address": i.address, "port": i.port, "tags": i.tags,
                "metadata": i.metadata, "weight": i.weight, "zone": i.zone,
            })
        })
        .collect();
    json!({ "service": service, "instances": instances }).to_string()
}

/// Prints the next set the watch yields; a watch error is reported and waited past.
async fn print_next(service: &str, watch: &mut WatchStream) -> Result<(), BoxError> {
    loop {
        match watch.next().await {
            Some(Ok(set)) => {
                println!("{}", json_line(service, &set));
                return Ok(());
            }
            Some(Err(error)) => tracing::warn!(%error, "watch failed; waiting for the next set"),
            None => return Err("the registry's watch ended".into()),
        }
    }
}

/// Prints every set of `service` until the watch ends or the process is interrupted.
#[allow(dead_code)] // unused when no backend feature is enabled
async fn follow(registry: &dyn ServiceRegistry, service: &str) -> Result<(), BoxError> {
    let mut watch = registry.watch(&service.into());
    loop {
        print_next(service, &mut watch).await?;
    }
}

#[cfg(feature = "config")]
async fn configured(file: &str, service: &str) -> Result<(), BoxError> {
    let registry = tower_sd::config::RegistryConfig::from_path(file)?.build()?;
    follow(&*registry, service).await
}

#[cfg(not(feature = "config"))]
async fn configured(_file: &str, _service: &str) -> Result<(), BoxError> {
    Err("--config needs the `config` cargo feature: cargo run --example watch --features config -- --config FILE SERVICE".into())
}

#[cfg(feature = "consul")]
async fn consul(address: &str, service: &str) -> Result<(), BoxError> {
    let mut builder = tower_sd::registry::consul::ConsulRegistry::builder().from_env();
    if address != "-" {
        builder = builder.address(address);
    }
    follow(&builder.build()?, service).await
}

#[cfg(not(feature = "consul"))]
async fn consul(_address: &str, _service: &str) -> Result<(), BoxError> {
    Err("watching Consul needs the `consul` cargo feature: cargo run --example watch --features consul -- --consul ADDRESS SERVICE".into())
}

#[cfg(feature = "kubernetes")]
async fn kubernetes(
    namespace: &str,
    service: &str,
    port_name: Option<&String>,
) -> Result<(), BoxError> {
    let mut builder = tower_sd::registry::kubernetes::KubernetesRegistry::builder();
    if namespace != "-" {
        builder = builder.namespace(namespace);
    }
    if let Some(name) = port_name {
        builder = builder.port_name(name);
    }
    follow(&builder.build(), service).await
}

#[cfg(not(feature = "kubernetes"))]
async fn kubernetes(
    _namespace: &str,
    _service: &str,
    _port_name: Option<&String>,
) -> Result<(), BoxError> {
    Err("watching Kubernetes needs the `kubernetes` cargo feature: cargo run --example watch --features kubernetes -- --kubernetes NAMESPACE SERVICE".into())
}

#[cfg(feature = "etcd")]
async fn etcd(endpoint: &str, service: &str) -> Result<(), BoxError> {
    let registry = tower_sd::registry::etcd::EtcdRegistry::builder([endpoint]).build()?;
    follow(&registry, service).await
}

#[cfg(not(feature = "etcd"))]
async fn etcd(_endpoint: &str, _service: &str) -> Result<(), BoxError> {
    Err("watching etcd needs the `etcd` cargo feature: cargo run --example watch --features etcd -- --etcd ENDPOINT SERVICE".into())
}

#[cfg(feature = "dns")]
async fn dns(name: &str, server: Option<&String>) -> Result<(), BoxError> {
    let mut builder = tower_sd::registry::dns::DnsRegistry::builder();
    if let Some(server) = server {
        builder = builder.nameservers([server.parse()?]);
    }
    follow(&builder.build()?, name).await
}

#[cfg(not(feature = "dns"))]
async fn dns(_name: &str, _server: Option<&String>) -> Result<(), BoxError> {
    Err("watching DNS needs the `dns` cargo feature: cargo run --example watch --features dns -- --dns NAME [NAMESERVER]".into())
}

async fn demo() -> Result<(), BoxError> {
    let service = "greeter";
    let registry = MemoryRegistry::new();
    let mut watch = registry.watch(&service.into());
    print_next(service, &mut watch).await?;

    for (n, zone) in [(1, "a"), (2, "b"), (3, "a")] {
        let instance =
            ServiceInstance::new(format!("{service}-{n}"), service, "127.0.0.1", 50050 + n)
                .with_tag("v1")
                .with_metadata("version", "1.0.0")
                .with_zone(zone);
        registry.register(instance).await?;
        print_next(service, &mut watch).await?;
    }

    tracing::info!("marking greeter-2 critical");
    registry.set_health("greeter-2", HealthStatus::Critical)?;
    print_next(service, &mut watch).await?;

    tracing::info!("deregistering greeter-3");
    registry.deregister("greeter-3").await?;
    print_next(service, &mut watch).await?;
    Ok(())
}
