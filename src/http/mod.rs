//! [`DiscoveryLayer`]: route `http://<service-name>/...` requests of any HTTP client to the
//! healthy instances of that service.
//!
//! The layer wraps a client service (hyper-util's legacy `Client`, or any
//! `Service<http::Request<B>>` that is `Clone`). For a request whose host is a service name
//! (compared case-insensitively), it picks an instance with that service's [`Balance`] and
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
mod rewrite;

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::future::BoxFuture;
use http::{Request, Uri};
use tower::{Layer, Service, ServiceExt};

use crate::balance::{self, Balance, LoadMetric};
use crate::classify::{HttpStatus, ResponseBody};
use crate::discover::RegistryDiscover;
use crate::error::BoxError;
use crate::instance::ServiceInstance;
use crate::registry::ServiceRegistry;
use balancers::Balancers;
pub use connections::ConnectionDiscovery;
use rewrite::{Rewrite, Wire};

/// Which host a routed request names: the service name the caller wrote, or the chosen
/// instance's address.
///
/// What goes on the wire depends on the transport:
///
/// | policy | wrapped client (HTTP/1.1) | [`over_connections`](DiscoveryLayer::over_connections) (HTTP/2) |
/// | --- | --- | --- |
/// | [`Logical`](Self::Logical) | `Host: greeter`, the request line to the instance | `:authority: greeter`, no `Host` |
/// | [`Instance`](Self::Instance) | `Host: 10.0.0.7:8080` (written by the client from the URI) | `:authority: 10.0.0.7:8080`, no `Host` |
///
/// Over HTTP/2 a `Host` header that differs from `:authority` must not be sent (RFC 9113,
/// 8.3.1), and nginx rejects any request that has both ("client sent duplicate host
/// header"), so a caller's `Host` header becomes `:authority` there. A wrapped client that
/// speaks HTTP/2 dials the URI's authority, the instance, and sends it as `:authority`:
/// with it, use [`Instance`](Self::Instance) (or `over_connections`, which sends the
/// logical host as `:authority`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostHeader {
    /// The logical authority the caller wrote (`greeter`), unless the request already has a
    /// `Host` header (the default): virtual hosting and logs see the service name.
    #[default]
    Logical,
    /// The chosen instance's address (`10.0.0.7:8080`); a `Host` header the request had is
    /// dropped.
    Instance,
}

/// What happens to a request whose host is not a service name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownHosts {
    /// Send it to the wrapped client unchanged (the default).
    #[default]
    PassThrough,
    /// Fail it with [`UnknownHost`].
    Fail,
}

/// A request's host is not a service name and [`UnknownHosts::Fail`] is set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("host `{0}` is not a discovered service")]
pub struct UnknownHost(pub String);

/// A request named a new service while [`max_services`](DiscoveryLayer::max_services)
/// balancers exist already.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many services: at most {limit} have a balancer")]
pub struct TooManyServices {
    /// The configured maximum.
    pub limit: usize,
}

/// The settings the running layer reads (the builder methods of [`DiscoveryLayer`] set them).
#[derive(Clone, Debug)]
struct Settings {
    host_header: HostHeader,
    unknown_hosts: UnknownHosts,
    /// Lowercase; `None` for any single-label host.
    services: Option<Arc<HashSet<String>>>,
    idle_timeout: Duration,
    max_services: usize,
}

/// A tower [`Layer`] that routes requests for service names through per-service balancers.
#[derive(Clone)]
#[must_use]
pub struct DiscoveryLayer {
    registry: Arc<dyn ServiceRegistry>,
    balance: balance::BalanceBuilder,
    settings: Settings,
}

impl DiscoveryLayer {
    /// Routes service names found in `registry`. Without [`services`](Self::services), any
    /// host that is a single DNS label other than `localhost` (no dot, not an IP address)
    /// counts as a service name.
    pub fn new(registry: Arc<dyn ServiceRegistry>) -> Self {
        Self {
            registry,
            balance: Balance::builder(),
            settings: Settings {
                host_header: HostHeader::default(),
                unknown_hosts: UnknownHosts::default(),
                services: None,
                idle_timeout: Duration::from_secs(300),
                max_services: 256,
            },
        }
    }

    /// Only these hosts are service names (compared case-insensitively).
    pub fn services<I: IntoIterator<Item = impl Into<String>>>(mut self, names: I) -> Self {
        let names = names.into_iter().map(|n| n.into().to_ascii_lowercase());
        self.settings.services = Some(Arc::new(names.collect()));
        self
    }

    /// The `Host` header policy (default [`HostHeader::Logical`]).
    pub fn host_header(mut self, policy: HostHeader) -> Self {
        self.settings.host_header = policy;
        self
    }

    /// What to do with hosts that are not service names (default pass through).
    pub fn unknown_hosts(mut self, policy: UnknownHosts) -> Self {
        self.settings.unknown_hosts = policy;
        self
    }

    /// Drop a service's balancer after this long without requests (default 5 minutes); a
    /// background sweep does it every half of this.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.idle_timeout = timeout;
        self
    }

    /// At most this many services have a balancer at once (default 256); a request for
    /// another one fails with [`TooManyServices`] instead of starting one more watch.
    pub fn max_services(mut self, services: usize) -> Self {
        self.settings.max_services = services.max(1);
        self
    }

    /// How endpoint load is measured.
    pub fn load(mut self, metric: LoadMetric) -> Self {
        self.balance = self.balance.load(metric);
        self
    }

    /// Any other balancer setting (outlier detection, panic threshold, slow start, zone
    /// preference); HTTP 5xx, gRPC failure codes and transport errors count as failures.
    pub fn balancer(
        mut self,
        configure: impl FnOnce(balance::BalanceBuilder) -> balance::BalanceBuilder,
    ) -> Self {
        self.balance = configure(self.balance);
        self
    }

    /// How long a request waits for an instance when there are none.
    pub fn wait_for_endpoints(mut self, wait: Duration) -> Self {
        self.balance = self.balance.wait_for_endpoints(wait);
        self
    }
}

/// Where a request goes.
enum Route<'a> {
    /// Through the balancer of this service (lowercase).
    Service(Cow<'a, str>),
    /// Its host is not a service name: [`UnknownHosts`] decides.
    Other,
}

impl Settings {
    fn route<'a>(&self, uri: &'a Uri) -> Route<'a> {
        self.service_of(uri).map_or(Route::Other, Route::Service)
    }

    /// The service name of a request's host, lowercase, if it is one.
    fn service_of<'a>(&self, uri: &'a Uri) -> Option<Cow<'a, str>> {
        let host = uri.host()?;
        let host: Cow<'a, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let is_service = match &self.services {
            Some(names) => names.contains(host.as_ref()),
            None => {
                let single_label =
                    !host.contains('.') && !host.contains(':') && !host.starts_with('[');
                single_label && host != "localhost" && host.parse::<IpAddr>().is_err()
            }
        };
        is_service.then_some(host)
    }
}

impl fmt::Debug for DiscoveryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryLayer")
            .field("registry", &self.registry)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for DiscoveryLayer {
    type Service = Discovery<S>;

    fn layer(&self, inner: S) -> Discovery<S> {
        Discovery {
            inner,
            shared: Arc::new(Shared {
                registry: Arc::clone(&self.registry),
                balance: self.balance.clone(),
                settings: self.settings.clone(),
                balancers: Arc::new(Balancers::new(
                    self.settings.max_services,
                    self.settings.idle_timeout,
                )),
            }),
        }
    }
}

/// The service made by [`DiscoveryLayer`].
pub struct Discovery<S> {
    inner: S,
    shared: Arc<Shared<S>>,
}

/// What all clones of one [`Discovery`] share.
struct Shared<S> {
    registry: Arc<dyn ServiceRegistry>,
    balance: balance::BalanceBuilder,
    settings: Settings,
    balancers: Arc<Balancers<ServiceBalance<S>>>,
}

/// The balancer of one service.
type ServiceBalance<S> = Balance<Rewrite<S>, String, HttpStatus>;

impl<S> Discovery<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// The shared balancer for `service`, created on first use.
    fn balancer(&self, service: &str) -> Result<ServiceBalance<S>, TooManyServices> {
        let shared = &self.shared;
        shared.balancers.get_or_make(service, || {
            let inner = self.inner.clone();
            let host_header = shared.settings.host_header;
            let discover = RegistryDiscover::new(
                &*shared.registry,
                service.to_owned(),
                move |instance: &ServiceInstance| {
                    Rewrite::new(inner.clone(), instance, host_header, Wire::Client)
                },
            );
            shared
                .balance
                .clone()
                .service_name(service)
                .build(discover)
                .with_classifier(HttpStatus)
        })
    }
}

impl<S> Discovery<S> {
    /// The endpoints of `service`'s balancer, as [`Balance::endpoints`] reports them; empty
    /// when the service has no balancer (yet, or any more).
    pub fn endpoints(&self, service: &str) -> Vec<balance::EndpointStats<String>> {
        self.shared
            .balancers
            .get(&service.to_ascii_lowercase())
            .map(|balance| balance.endpoints())
            .unwrap_or_default()
    }

    /// The services that currently have a balancer, sorted.
    pub fn active_services(&self) -> Vec<String> {
        self.shared.balancers.names()
    }
}

impl<S: Clone> Clone for Discovery<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> fmt::Debug for Discovery<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("settings", &self.shared.settings)
            .field("balancers", &self.shared.balancers.names().len())
            .finish_non_exhaustive()
    }
}

impl<S, B, RB> Service<Request<B>> for Discovery<S>
where
    S: Service<Request<B>, Response = http::Response<RB>> + Clone + Send + Sync + 'static,
    RB: http_body::Body + Send + 'static,
    S::Response: Send,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = http::Response<ResponseBody<RB>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    /// Always ready: readiness is checked per request, on the endpoint (or client) that
    /// serves it.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let service = match self.shared.settings.route(request.uri()) {
            Route::Service(service) => service,
            Route::Other => return self.other(request),
        };
        match self.balancer(&service) {
            Ok(balance) => Box::pin(balance.oneshot(request)),
            Err(error) => Box::pin(std::future::ready(Err(error.into()))),
        }
    }
}

impl<S> Discovery<S> {
    /// A request whose host is not a service name.
    fn other<B, RB>(
        &self,
        request: Request<B>,
    ) -> BoxFuture<'static, Result<http::Response<ResponseBody<RB>>, BoxError>>
    where
        S: Service<Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Send + 'static,
        RB: http_body::Body + Send + 'static,
    {
        match self.shared.settings.unknown_hosts {
            UnknownHosts::PassThrough => {
                let inner = self.inner.clone();
                Box::pin(async move {
                    let response = inner.oneshot(request).await.map_err(Into::into)?;
                    Ok(response.map(ResponseBody::untracked))
                })
            }
            UnknownHosts::Fail => {
                let host = request.uri().host().unwrap_or_default().to_owned();
                Box::pin(std::future::ready(Err(UnknownHost(host).into())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_of(layer: &DiscoveryLayer, uri: &str) -> Option<String> {
        layer
            .settings
            .service_of(&uri.parse().unwrap())
            .map(Cow::into_owned)
    }

    #[test]
    fn service_names_are_single_labels_unless_listed() {
        let registry: Arc<dyn ServiceRegistry> = Arc::new(crate::MemoryRegistry::new());
        let layer = DiscoveryLayer::new(Arc::clone(&registry));
        let name = |uri: &str| service_of(&layer, uri);
        assert_eq!(name("http://greeter/x").as_deref(), Some("greeter"));
        assert_eq!(name("http://greeter:80/x").as_deref(), Some("greeter"));
        for other in [
            "http://localhost/",
            "http://127.0.0.1/",
            "http://[::1]/",
            "http://a.b/",
        ] {
            assert_eq!(name(other), None, "{other}");
        }
        let listed = DiscoveryLayer::new(registry).services(["api.internal"]);
        assert!(service_of(&listed, "http://api.internal/").is_some());
        assert!(service_of(&listed, "http://greeter/").is_none());
    }

    #[test]
    fn service_names_are_matched_case_insensitively() {
        let registry: Arc<dyn ServiceRegistry> = Arc::new(crate::MemoryRegistry::new());
        let layer = DiscoveryLayer::new(Arc::clone(&registry));
        let name = |uri: &str| service_of(&layer, uri);
        assert_eq!(name("http://Greeter/x").as_deref(), Some("greeter"));
        let listed = DiscoveryLayer::new(registry).services(["API"]);
        assert!(service_of(&listed, "http://api/").is_some());
    }
}
