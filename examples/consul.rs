//! A tonic server that registers itself in Consul, and a client that finds it there.
//!
//! Needs a Consul agent; the quickest is a dev agent:
//!
//! ```text
//! consul agent -dev &
//! cargo run --example consul --features consul,tonic
//! ```
//!
//! `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` are honoured. The server runs the standard
//! `grpc.health.v1` service, which is also what Consul's gRPC check calls; the client is the
//! generated `HealthClient` on a `LoadBalancedChannel` that discovers the server through
//! Consul. On exit the server drains: maintenance, a delay, then deregistration.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::registration::Registration;
use tower_sd::registry::consul::{ConsulRegistry, HealthCheck, HealthCheckKind};
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{ServiceInstance, ServiceRegistry};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person: not in a file, a pipe or CI logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // The server: grpc.health.v1 on a free loopback port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        Some((listener.accept().await.map(|(stream, _)| stream), listener))
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );

    // Consul checks it over gRPC every 5 s and removes it a minute after it goes critical.
    let consul: Arc<dyn ServiceRegistry> = Arc::new(
        ConsulRegistry::builder()
            .from_env()
            .health_check(
                HealthCheck::new(HealthCheckKind::Grpc)
                    .interval(Duration::from_secs(5))
                    .deregister_after(Duration::from_secs(60)),
            )
            .build()?,
    );
    let instance =
        ServiceInstance::new(format!("health-{port}"), "tower-sd-demo", "127.0.0.1", port);
    let registration = Registration::builder(Arc::clone(&consul), instance)
        .drain_delay(Duration::from_secs(2))
        .build();
    registration.registered(Duration::from_secs(10)).await?;

    // The client: waits for Consul's first passing check, then calls through the balancer.
    let channel = LoadBalancedChannel::builder(consul, "tower-sd-demo")
        .connect(Duration::from_secs(30))
        .await?;
    let mut client = HealthClient::new(channel);
    for _ in 0..5 {
        let reply = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        println!("status: {:?}", reply.into_inner().status());
    }

    registration.shutdown().await?;
    server.abort();
    Ok(())
}
