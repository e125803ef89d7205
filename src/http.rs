//! [`DiscoveryLayer`]: route `http://<service-name>/...` requests of any HTTP client to the
//! healthy instances of that service.
//!
//! The layer wraps a client service (hyper-util's legacy `Client`, or any
//! `Service<http::Request<B>>` that is `Clone`). For a request whose host is a service name,
//! it picks an instance with that service's [`Balance`] and rewrites the URI authority to the
//! instance's address (IPv6 in brackets), then hands the request to the client. Balancers are
//! created on first use, shared by all clones of the service, and dropped after
//! [`idle_timeout`](DiscoveryLayer::idle_timeout) without requests.
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::future::BoxFuture;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Uri};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::balance::{self, Balance, HttpStatus, LoadMetric, ResponseBody};
use crate::discover::RegistryDiscover;
use crate::error::BoxError;
use crate::instance::ServiceInstance;
use crate::registry::ServiceRegistry;

/// What the `Host` header of a routed request says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostHeader {
    /// The logical authority the caller wrote (`greeter`), unless the request already has a
    /// `Host` header (the default): virtual hosting and logs see the service name.
    #[default]
    Logical,
    /// The chosen instance's address (`10.0.0.7:8080`).
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

/// A tower [`Layer`] that routes requests for service names through per-service balancers.
#[derive(Clone)]
#[must_use]
pub struct DiscoveryLayer {
    registry: Arc<dyn ServiceRegistry>,
    balance: balance::Builder,
    host_header: HostHeader,
    unknown_hosts: UnknownHosts,
    services: Option<Arc<HashSet<String>>>,
    idle_timeout: Duration,
}

impl DiscoveryLayer {
    /// Routes service names found in `registry`. Without [`services`](Self::services), any
    /// host that is a single DNS label other than `localhost` (no dot, not an IP address)
    /// counts as a service name.
    pub fn new(registry: Arc<dyn ServiceRegistry>) -> Self {
        Self {
            registry,
            balance: Balance::builder(),
            host_header: HostHeader::default(),
            unknown_hosts: UnknownHosts::default(),
            services: None,
            idle_timeout: Duration::from_secs(300),
        }
    }

    /// Only these hosts are service names.
    pub fn services<I: IntoIterator<Item = impl Into<String>>>(mut self, names: I) -> Self {
        self.services = Some(Arc::new(names.into_iter().map(Into::into).collect()));
        self
    }

    /// The `Host` header policy (default [`HostHeader::Logical`]).
    pub fn host_header(mut self, policy: HostHeader) -> Self {
        self.host_header = policy;
        self
    }

    /// What to do with hosts that are not service names (default pass through).
    pub fn unknown_hosts(mut self, policy: UnknownHosts) -> Self {
        self.unknown_hosts = policy;
        self
    }

    /// Drop a service's balancer after this long without requests (default 5 minutes).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
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
        configure: impl FnOnce(balance::Builder) -> balance::Builder,
    ) -> Self {
        self.balance = configure(self.balance);
        self
    }

    /// How long a request waits for an instance when there are none.
    pub fn wait_for_endpoints(mut self, wait: Duration) -> Self {
        self.balance = self.balance.wait_for_endpoints(wait);
        self
    }

    /// The service name of a request's host, if it is one.
    fn service_of<'a>(&self, uri: &'a Uri) -> Option<&'a str> {
        let host = uri.host()?;
        match &self.services {
            Some(names) => names.contains(host).then_some(host),
            None => {
                let single_label =
                    !host.contains('.') && !host.contains(':') && !host.starts_with('[');
                (single_label && host != "localhost" && host.parse::<IpAddr>().is_err())
                    .then_some(host)
            }
        }
    }
}

impl fmt::Debug for DiscoveryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryLayer")
            .field("registry", &self.registry)
            .field("host_header", &self.host_header)
            .field("unknown_hosts", &self.unknown_hosts)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for DiscoveryLayer {
    type Service = Discovery<S>;

    fn layer(&self, inner: S) -> Discovery<S> {
        Discovery {
            inner,
            config: Arc::new(self.clone()),
            balancers: Arc::new(Mutex::new(Balancers {
                by_service: HashMap::new(),
                last_sweep: Instant::now(),
            })),
        }
    }
}

/// The service made by [`DiscoveryLayer`].
pub struct Discovery<S> {
    inner: S,
    config: Arc<DiscoveryLayer>,
    balancers: Arc<Mutex<Balancers<S>>>,
}

/// The balancer of one service.
type ServiceBalance<S> = Balance<Rewrite<S>, String, HttpStatus>;

struct Balancers<S> {
    /// Each service's balancer and when it was last used.
    by_service: HashMap<String, (ServiceBalance<S>, Instant)>,
    last_sweep: Instant,
}

impl<S> Discovery<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// The shared balancer for `service`, created on first use; idle ones are dropped.
    fn balancer(&self, service: &str) -> ServiceBalance<S> {
        let now = Instant::now();
        let idle = self.config.idle_timeout;
        let mut balancers = self
            .balancers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(balancers.last_sweep) >= idle / 2 {
            balancers.last_sweep = now;
            balancers
                .by_service
                .retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
        }
        if let Some((balance, used)) = balancers.by_service.get_mut(service) {
            *used = now;
            return balance.clone();
        }
        let inner = self.inner.clone();
        let host_header = self.config.host_header;
        let discover = RegistryDiscover::endpoints(
            &*self.config.registry,
            service.to_owned(),
            move |instance: &ServiceInstance| Rewrite::new(inner.clone(), instance, host_header),
        );
        let balance = self
            .config
            .balance
            .clone()
            .service_name(service)
            .build_endpoints(discover)
            .with_classifier(HttpStatus);
        balancers
            .by_service
            .insert(service.to_owned(), (balance.clone(), now));
        balance
    }
}

impl<S> Discovery<S> {
    /// The endpoints of `service`'s balancer, as [`Balance::endpoints`] reports them; empty
    /// when the service has no balancer (yet, or any more).
    pub fn endpoints(&self, service: &str) -> Vec<balance::EndpointStats<String>> {
        let balancers = self
            .balancers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        balancers
            .by_service
            .get(service)
            .map(|(balance, _)| balance.endpoints())
            .unwrap_or_default()
    }

    /// The services that currently have a balancer, sorted.
    pub fn active_services(&self) -> Vec<String> {
        let balancers = self
            .balancers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = balancers.by_service.keys().cloned().collect();
        names.sort();
        names
    }
}

impl<S: Clone> Clone for Discovery<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            balancers: Arc::clone(&self.balancers),
        }
    }
}

impl<S> fmt::Debug for Discovery<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let services = self
            .balancers
            .lock()
            .map(|b| b.by_service.len())
            .unwrap_or_default();
        f.debug_struct("Discovery")
            .field("config", &self.config)
            .field("balancers", &services)
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
        if let Some(service) = self.config.service_of(request.uri()) {
            let balance = self.balancer(service);
            return Box::pin(balance.oneshot(request));
        }
        match self.config.unknown_hosts {
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

/// One instance's endpoint: the client, with requests re-addressed to the instance.
#[derive(Clone)]
struct Rewrite<S> {
    inner: S,
    authority: Authority,
    host: HeaderValue,
    host_header: HostHeader,
}

impl<S> Rewrite<S> {
    fn new(
        inner: S,
        instance: &ServiceInstance,
        host_header: HostHeader,
    ) -> Result<Self, BoxError> {
        let authority = instance.authority();
        Ok(Self {
            host: HeaderValue::from_str(&authority)?,
            authority: authority.parse()?,
            inner,
            host_header,
        })
    }

    fn readdress<B>(&self, request: Request<B>) -> Result<Request<B>, BoxError> {
        let (mut head, body) = request.into_parts();
        match self.host_header {
            HostHeader::Logical => {
                if let (false, Some(logical)) =
                    (head.headers.contains_key(HOST), head.uri.authority())
                {
                    head.headers
                        .insert(HOST, HeaderValue::from_str(logical.as_str())?);
                }
            }
            HostHeader::Instance => {
                head.headers.insert(HOST, self.host.clone());
            }
        }
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.authority = Some(self.authority.clone());
        uri.scheme.get_or_insert(Scheme::HTTP);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        head.uri = Uri::from_parts(uri)?;
        Ok(Request::from_parts(head, body))
    }
}

impl<S, B> Service<Request<B>> for Rewrite<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RewriteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.readdress(request) {
            Ok(request) => RewriteFuture::Sent {
                inner: self.inner.call(request),
            },
            Err(error) => RewriteFuture::Invalid { error: Some(error) },
        }
    }
}

pin_project! {
    #[project = RewriteProj]
    enum RewriteFuture<F> {
        Sent { #[pin] inner: F },
        Invalid { error: Option<BoxError> },
    }
}

impl<F, T, E> Future for RewriteFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RewriteProj::Sent { inner } => inner.poll(cx).map_err(Into::into),
            RewriteProj::Invalid { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readdressed(instance: &ServiceInstance, policy: HostHeader, uri: &str) -> Request<()> {
        let rewrite = Rewrite::new((), instance, policy).unwrap();
        rewrite
            .readdress(Request::get(uri).body(()).unwrap())
            .unwrap()
    }

    #[test]
    fn rewrites_the_authority_and_keeps_path_and_query() {
        let v4 = ServiceInstance::new("a", "svc", "10.0.0.7", 8080);
        let request = readdressed(&v4, HostHeader::Logical, "http://svc/a/b?c=d");
        assert_eq!(request.uri(), "http://10.0.0.7:8080/a/b?c=d");
        assert_eq!(request.headers()[HOST], "svc");

        let v6 = ServiceInstance::new("b", "svc", "::1", 8080);
        let request = readdressed(&v6, HostHeader::Instance, "http://svc:9999/x");
        assert_eq!(request.uri(), "http://[::1]:8080/x");
        assert_eq!(request.headers()[HOST], "[::1]:8080");
    }

    #[test]
    fn an_existing_host_header_wins_under_the_logical_policy() {
        let instance = ServiceInstance::new("a", "svc", "10.0.0.7", 8080);
        let rewrite = Rewrite::new((), &instance, HostHeader::Logical).unwrap();
        let request = Request::get("http://svc/")
            .header(HOST, "custom")
            .body(())
            .unwrap();
        assert_eq!(
            rewrite.readdress(request).unwrap().headers()[HOST],
            "custom"
        );
    }

    #[test]
    fn service_names_are_single_labels_unless_listed() {
        let registry: Arc<dyn ServiceRegistry> = Arc::new(crate::MemoryRegistry::new());
        let layer = DiscoveryLayer::new(Arc::clone(&registry));
        let name = |uri: &str| layer.service_of(&uri.parse().unwrap()).map(str::to_owned);
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
        assert!(
            listed
                .service_of(&"http://api.internal/".parse().unwrap())
                .is_some()
        );
        assert!(
            listed
                .service_of(&"http://greeter/".parse().unwrap())
                .is_none()
        );
    }
}
