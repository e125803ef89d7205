//! A Connect-native tonic server and client in the Consul service mesh: mutual TLS with
//! certificates from Consul's CA, and an intention deciding who may call whom.
//!
//! Needs a Consul agent with Connect on; a dev agent has it:
//!
//! ```text
//! consul agent -dev &
//! cargo run --example consul_connect --features consul-connect,tonic
//! # deny the call, and run it again: the client gets PERMISSION_DENIED
//! consul intention create -deny tower-sd-web tower-sd-api
//! ```
//!
//! `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` are honoured (with ACLs on, the token needs
//! `service:write` on both services). The server, `tower-sd-api`, registers as
//! Connect-native and serves `grpc.health.v1` only on authorized mTLS connections; the
//! client, `tower-sd-web`, finds it through `/v1/health/connect/tower-sd-api` and calls it
//! over mTLS, checking that the server's certificate names `tower-sd-api`.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::mesh::ConsulConnect;
use tower_sd::registration::Registration;
use tower_sd::registry::consul::{ConsulRegistry, HealthCheck, HealthCheckKind, MeshRegistration};
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{ServiceInstance, ServiceRegistry};

const SERVER: &str = "tower-sd-api";
const CLIENT: &str = "tower-sd-web";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Native mesh registration (a TCP check: the server speaks only mTLS), and discovery of
    // mesh endpoints.
    let consul = ConsulRegistry::builder()
        .from_env()
        .mesh_registration(MeshRegistration::Native)
        .mesh_discovery(true)
        .health_check(HealthCheck::new(HealthCheckKind::Tcp).interval(Duration::from_secs(2)))
        .build()?;

    // The server: its identity, and tonic on the authorized connections.
    let api = ConsulConnect::builder(&consul, SERVER).build().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(api.incoming(listener)),
    );
    let registry: Arc<dyn ServiceRegistry> = Arc::new(consul.clone());
    let instance = ServiceInstance::new(format!("{SERVER}-{port}"), SERVER, "127.0.0.1", port);
    let registration = Registration::builder(Arc::clone(&registry), instance)
        .drain_delay(Duration::from_secs(1))
        .build();
    registration.registered(Duration::from_secs(10)).await?;
    println!(
        "server: {}",
        api.leaf().map(|l| l.id.to_string()).unwrap_or_default()
    );

    // The client: its own identity, as the channel's TLS.
    let web = ConsulConnect::builder(&consul, CLIENT).build().await?;
    println!(
        "client: {}",
        web.leaf().map(|l| l.id.to_string()).unwrap_or_default()
    );
    let channel = LoadBalancedChannel::builder(registry, SERVER)
        .tls(web.client_tls()?)
        .connect(Duration::from_secs(30))
        .await?;
    let mut client = HealthClient::new(channel);
    for _ in 0..3 {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match client.check(request).await {
            Ok(reply) => println!("status: {:?}", reply.into_inner().status()),
            Err(status) => println!("refused: {:?}: {}", status.code(), status.message()),
        }
    }

    registration.shutdown().await?;
    server.abort();
    Ok(())
}
