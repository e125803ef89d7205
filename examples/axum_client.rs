//! An axum service that calls another service by name through `DiscoveryLayer`.
//!
//! ```text
//! cargo run --example axum_client --features http
//! ```
//!
//! Two `backend` HTTP servers register in the in-memory registry. The axum app's handler
//! calls `http://backend/` with a hyper-util client wrapped in the layer, which picks an
//! instance and rewrites the address. The program calls the app a few times and prints what
//! came back.

use tower_sd_testkit::servers;

use std::sync::Arc;

use axum::extract::State;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use servers::TestServer;
use tower::{BoxError, Layer, ServiceExt};
use tower_sd::http::{Discovery, DiscoveryLayer};
use tower_sd::{MemoryRegistry, ServiceRegistry};

type HttpClient = Discovery<Client<HttpConnector, Empty<Bytes>>>;

async fn fetch(client: HttpClient, uri: &str) -> Result<String, BoxError> {
    let response = client
        .oneshot(http::Request::get(uri).body(Empty::new())?)
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The handler: calls the `backend` service by name.
async fn front(State(client): State<HttpClient>) -> Result<String, (http::StatusCode, String)> {
    let answer = fetch(client, "http://backend/")
        .await
        .map_err(|e| (http::StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(format!("backend said: {answer}"))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let registry = Arc::new(MemoryRegistry::new());
    let mut backends = Vec::new();
    for n in 1..=2 {
        let server = TestServer::http(&format!("backend-{n}")).await;
        registry.register(server.instance("backend")).await?;
        backends.push(server);
    }

    let client: HttpClient =
        DiscoveryLayer::new(registry).layer(Client::builder(TokioExecutor::new()).build_http());
    let app = axum::Router::new()
        .route("/", axum::routing::get(front))
        .with_state(client.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let front_url = format!("http://{}/", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // Not a service name, so the same client passes this request through unchanged.
    for _ in 0..4 {
        println!("{}", fetch(client.clone(), &front_url).await?);
    }
    server.abort();
    Ok(())
}
