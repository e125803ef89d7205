//! A gRPC client that finds its servers through Kubernetes EndpointSlices, and the server it
//! calls: one binary, two roles, deployed by the manifests beside this file.
//!
//! ```text
//! cargo build --release --example kubernetes --features kubernetes,tonic
//! kubectl apply -f examples/kubernetes/          # after building the image, see README.md
//! kubectl logs -f deploy/greeter-client
//! ```
//!
//! - `kubernetes server` serves `grpc.health.v1` on `0.0.0.0:50051` (the `grpc` port of the
//!   `greeter` Service) and reports SERVING until it receives SIGTERM, when it drains: it
//!   reports NOT_SERVING, so its readiness probe fails and its endpoint turns not-ready and
//!   then terminating, while it keeps answering calls for the grace period.
//! - `kubernetes client SERVICE` runs the generated `HealthClient` on a `LoadBalancedChannel`
//!   over `KubernetesRegistry` (in-cluster credentials, the pod's namespace, the `grpc` port)
//!   and prints the reply and the endpoints it balances over each second, as pods come and
//!   go.
//!
//! The client's service account needs get, list and watch on `endpointslices`: `rbac.yaml`.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::ServiceRegistry;
use tower_sd::registry::kubernetes::KubernetesRegistry;
use tower_sd::tonic::LoadBalancedChannel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server"] => server().await,
        ["client", service] => client(service).await,
        _ => Err("usage: kubernetes server | kubernetes client SERVICE".into()),
    }
}

async fn server() -> Result<(), BoxError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let drain = async move {
        shutdown_signal().await;
        tracing::info!("SIGTERM: reporting NOT_SERVING and draining");
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        // Long enough for the readiness probe to fail and clients to see the endpoint leave.
        tokio::time::sleep(Duration::from_secs(10)).await;
    };
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_shutdown("0.0.0.0:50051".parse()?, drain)
        .await?;
    Ok(())
}

async fn client(service: &str) -> Result<(), BoxError> {
    let registry: Arc<dyn ServiceRegistry> = Arc::new(
        KubernetesRegistry::builder()
            .in_cluster(true)
            .port_name("grpc")
            .build(),
    );
    let channel = LoadBalancedChannel::builder(registry, service)
        .connect(Duration::from_secs(60))
        .await?;
    let mut health = HealthClient::new(channel.clone());
    loop {
        let reply = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        // The balancer's endpoints: instance ids `namespace/service/address:port`.
        let pods: Vec<String> = channel
            .endpoints()
            .into_iter()
            .map(|endpoint| endpoint.key)
            .collect();
        match reply {
            Ok(reply) => println!("{:?}; balancing over {pods:?}", reply.into_inner().status()),
            Err(status) => println!("call failed: {status}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
