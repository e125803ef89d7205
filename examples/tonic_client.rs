//! A generated gRPC client on `LoadBalancedChannel`: three tonic servers register in the
//! in-memory registry, the client spreads calls over them, and follows the registry when one
//! leaves.
//!
//! ```text
//! cargo run --example tonic_client --features tonic
//! cargo run --example tonic_client --features tonic,config -- --config examples/config/memory.yaml
//! ```
//!
//! The servers run the standard `grpc.health.v1.Health` service, so the client is ordinary
//! generated code (`HealthClient`), taking the channel exactly as it would take a
//! `tonic::transport::Channel`.

use tower_sd_testkit::servers;

use std::sync::Arc;
use std::time::Duration;

use servers::TestServer;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{MemoryRegistry, ServiceRegistry};

#[cfg(feature = "config")]
fn from_config(file: &str) -> Result<Arc<dyn ServiceRegistry>, Box<dyn std::error::Error>> {
    Ok(tower_sd::config::RegistryConfig::from_path(file)?.build()?)
}

#[cfg(not(feature = "config"))]
fn from_config(_file: &str) -> Result<Arc<dyn ServiceRegistry>, Box<dyn std::error::Error>> {
    Err("--config needs the `config` cargo feature".into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The embedded registry, or `--config FILE` for any configured registry that takes
    // registrations.
    let registry: Arc<dyn ServiceRegistry> =
        match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
            [] => Arc::new(MemoryRegistry::new()),
            [flag, file] if flag == "--config" => from_config(file)?,
            _ => return Err("usage: tonic_client [--config FILE]".into()),
        };
    let mut servers = Vec::new();
    for n in 1..=3 {
        let server = TestServer::grpc(&format!("health-{n}")).await;
        registry.register(server.instance("health")).await?;
        servers.push(server);
    }

    let channel = LoadBalancedChannel::builder(registry.clone(), "health")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect(Duration::from_secs(5))
        .await?;
    let mut client = HealthClient::new(channel);

    for phase in ["three servers", "health-1 deregistered"] {
        let before: Vec<usize> = servers.iter().map(TestServer::served).collect();
        for _ in 0..300 {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
        }
        println!("{phase}:");
        for (server, before) in servers.iter().zip(before) {
            println!(
                "  {:<10} served {:>4}",
                server.name,
                server.served() - before
            );
        }
        registry.deregister("health-1").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
