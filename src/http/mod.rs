//! [`DiscoveryLayer`]: route `http://<service-name>/...` requests of any HTTP client to the
//! healthy instances of that service.
//!
//! The layer wraps a client service (hyper-util's legacy `Client`, or any
//! `Service<http::Request<B>>` that is `Clone`). For a request whose host is a service name
//! (compared case-insensitively), it picks an instance with that service's
//! [`Balance`](crate::balance::Balance) and
//! rewrites the URI authority to the instance's address (IPv6 in brackets), then hands the
//! request to the client. Balancers are created on first use, at most
//! [`max_services`](DiscoveryLayer::max_services) of them, shared by all clones of the
//! service without a lock, and dropped by a background sweep after
//! [`idle_timeout`](DiscoveryLayer::idle_timeout) without requests.
//!
//! For HTTP/2 servers, [`DiscoveryLayer::over_connections`] routes the same way over
//! tower-sd's own per-instance connections instead of a wrapped client
//! ([`ConnectionDiscovery`]): an instance is picked only once it is connected, a crashed
//! one stops being picked when its connection closes, and a request the server never
//! processed is sent once more elsewhere. HTTP/1.1 servers keep the wrapped client.
//!
//! ```no_run
//! use std::sync::Arc;
//! use http_body_util::Empty;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_sd::http::DiscoveryLayer;
//! use tower_sd::{MemoryRegistry, ServiceRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
//! let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
//! let client = ServiceBuilder::new().layer(DiscoveryLayer::new(registry)).service(client);
//!
//! let request = http::Request::get("http://greeter/hello").body(Empty::new())?;
//! let response = client.oneshot(request).await?;
//! # drop(response);
//! # Ok(())
//! # }
//! ```

mod balancers;
mod connections;
mod discovery;
mod error;
mod layer;
mod probe;
mod retry;
mod rewrite;
mod route;
mod router;

pub use connections::ConnectionDiscovery;
pub use discovery::Discovery;
pub use error::{TooManyServices, UnknownHost};
pub use layer::DiscoveryLayer;
pub use probe::HttpProbe;
pub use retry::{HttpRetryPolicy, Idempotent};
pub use route::{HostHeader, UnknownHosts};
