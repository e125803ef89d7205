//! [`Discovery`]: the routing of [`DiscoveryLayer`](super::DiscoveryLayer) around a wrapped
//! client (hyper-util's, or any `Clone` HTTP service), which dials the instance each
//! request is re-addressed to.
//!
//! The wrapped client takes the caller's body type, so a retry sends a clone of the body
//! (a body that is not `Clone` is sent once), and the client reports no connection state,
//! so an instance is out of the picks only while its health probe fails.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::future::BoxFuture;
use http::Request;
use tower::{Service, ServiceExt};

use super::probe::{self, HttpProbe, Prober};
use super::retry::{HttpRetryPolicy, is_safe};
use super::rewrite::{Rewrite, Wire};
use super::route::{Route, UnknownHosts};
use super::router::{Reported, Router};
use super::{TooManyServices, UnknownHost};
use crate::balance::{Balance, EndpointStats, Picks};
use crate::classify::{HttpStatus, ResponseBody};
use crate::connection::policy::{CallPolicy, RetryRules, Throttle};
use crate::connection::retry::{Resend, RetryFuture};
use crate::discover::RegistryDiscover;
use crate::endpoint::{Connectivity, Endpoint, Readiness};
use crate::error::BoxError;
use crate::instance::ServiceInstance;

/// The service made by [`DiscoveryLayer`](super::DiscoveryLayer).
pub struct Discovery<S> {
    inner: S,
    router: Arc<Router<ServiceBalance<S>>>,
    /// The retry policy, when set.
    retries: Option<Arc<Retries>>,
    /// Starts the health probe of each instance, when set.
    probe: Option<Prober<Rewrite<S>>>,
}

/// The balancer of one service, and the service's retry throttle.
pub(super) struct ServiceBalance<S> {
    balance: Balance<Rewrite<S>, String, HttpStatus>,
    throttle: Option<Arc<Throttle>>,
}

impl<S> Clone for ServiceBalance<S> {
    fn clone(&self) -> Self {
        Self {
            balance: self.balance.clone(),
            throttle: self.throttle.clone(),
        }
    }
}

impl<S> Reported for ServiceBalance<S> {
    fn endpoints(&self) -> Vec<EndpointStats<String>> {
        self.balance.endpoints()
    }
}

/// A retry policy, and how it copies a body.
struct Retries {
    policy: HttpRetryPolicy,
    rules: Arc<RetryRules>,
    /// A `Copy<B>` for the body type `B` the policy was set for: the layer's service takes
    /// any body type, and only this one is known to be `Clone`.
    copy: Box<dyn Any + Send + Sync>,
}

/// A copy of the body, when its size is known and at most the limit.
type Copy<B> = fn(&B, u64) -> Option<B>;

/// The largest body a retry sends again: the default of the connection settings'
/// `retry_buffer_bytes`.
const RETRY_BODY_LIMIT: u64 = 64 << 10;

/// Each attempt sends a copy of the first one's body.
struct Cloned<B> {
    body: B,
    copy: Copy<B>,
}

// Nothing pins the body: it is only read, to copy it.
impl<B> Unpin for Cloned<B> {}

impl<B> Resend for Cloned<B> {
    type Body = B;

    fn resend(&mut self) -> Option<B> {
        (self.copy)(&self.body, u64::MAX)
    }
}

/// The balancer with its response futures boxed: a retry moves the futures it awaits,
/// and the wrapped client's need not be `Unpin`.
struct Boxed<S>(S);

// Nothing pins the balancer: a service is called through `&mut`.
impl<S> Unpin for Boxed<S> {}

impl<S: Clone> Clone for Boxed<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: Service<R>, R> Service<R> for Boxed<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        Box::pin(self.0.call(request))
    }
}

impl<S: Picks> Picks for Boxed<S> {
    fn picked(&self) -> Option<usize> {
        self.0.picked()
    }

    fn avoid(&mut self, endpoints: &[usize]) {
        self.0.avoid(endpoints);
    }
}

impl<S> Discovery<S> {
    pub(super) fn new(inner: S, router: Arc<Router<ServiceBalance<S>>>) -> Self {
        Self {
            inner,
            router,
            retries: None,
            probe: None,
        }
    }

    /// Retries requests that are safe to send twice by `policy` (see [`HttpRetryPolicy`]),
    /// for requests with the body type `B` the wrapped client takes (inferred from it), a
    /// body that is `Clone`: each retry sends a clone. A body whose size is not known
    /// (its `size_hint` has no upper bound) or is over 64 KiB is sent once. Set it before
    /// the first request (balancers made before keep no throttle).
    #[must_use]
    pub fn retry_policy<B>(mut self, policy: HttpRetryPolicy) -> Self
    where
        S: Service<Request<B>>,
        B: http_body::Body + Clone + Send + Sync + 'static,
    {
        let copy: Copy<B> = |body, limit| {
            let fits = body.size_hint().upper().is_some_and(|size| size <= limit);
            fits.then(|| body.clone())
        };
        self.retries = Some(Arc::new(Retries {
            rules: policy.rules(),
            policy,
            copy: Box::new(copy),
        }));
        self
    }

    /// Probes each instance's health with `probe` (see [`HttpProbe`]), through the wrapped
    /// client, whose body type `B` (inferred from it) gives the probe its empty body: an
    /// instance whose probe fails gets no requests while another passes. Set it before the
    /// first request (balancers made before keep none).
    #[must_use]
    pub fn health_probe<B, RB>(mut self, probe: HttpProbe) -> Self
    where
        S: Service<Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
        B: Default + Send + 'static,
    {
        self.probe = Some(probe::prober(probe));
        self
    }

    /// The endpoints of `service`'s balancer, as
    /// [`Balance::endpoints`](crate::balance::Balance::endpoints) reports them; empty when
    /// the service has no balancer (yet, or any more).
    pub fn endpoints(&self, service: &str) -> Vec<EndpointStats<String>> {
        self.router.endpoints(service)
    }

    /// The services that currently have a balancer, sorted.
    pub fn active_services(&self) -> Vec<String> {
        self.router.active_services()
    }
}

impl<S> Discovery<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// The shared balancer for `service`, created on first use.
    fn balancer(&self, service: &str) -> Result<ServiceBalance<S>, TooManyServices> {
        let router = &self.router;
        router.balancer(service, || {
            let inner = self.inner.clone();
            let host_header = router.settings.host_header;
            let (probe, name) = (self.probe.clone(), service.to_owned());
            let discover = RegistryDiscover::of_endpoints(
                &*router.registry,
                service.to_owned(),
                move |instance: &ServiceInstance| {
                    let rewrite = Rewrite::new(inner.clone(), instance, host_header, Wire::Client)?;
                    let Some(start) = &probe else {
                        return Ok::<_, BoxError>(Endpoint::for_instance(rewrite, instance));
                    };
                    // The client dials by itself: the endpoint is always connected, and out
                    // of the picks only while its probe fails.
                    let readiness = Readiness::new(Connectivity::Ready);
                    let companion = start(&rewrite, &readiness, &name);
                    Ok(Endpoint::for_instance(rewrite, instance)
                        .readiness(readiness)
                        .companion(companion))
                },
            );
            let balance = router
                .balance_for(service)
                .build(discover)
                .with_classifier(HttpStatus);
            ServiceBalance {
                balance,
                throttle: self.retries.as_ref().and_then(|r| r.policy.new_throttle()),
            }
        })
    }

    /// A request whose host is not a service name.
    fn other<B, RB>(
        &self,
        request: Request<B>,
    ) -> BoxFuture<'static, Result<http::Response<ResponseBody<RB>>, BoxError>>
    where
        S: Service<Request<B>, Response = http::Response<RB>>,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Send + 'static,
        RB: http_body::Body + Send + 'static,
    {
        match self.router.settings.unknown_hosts {
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

impl<S: Clone> Clone for Discovery<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            router: Arc::clone(&self.router),
            retries: self.retries.clone(),
            probe: self.probe.clone(),
        }
    }
}

impl<S> fmt::Debug for Discovery<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("router", &self.router)
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
        let service = match self.router.route(request.uri()) {
            Route::Service(service) => service,
            Route::Other => return self.other(request),
        };
        let balance = match self.balancer(&service) {
            Ok(balance) => balance,
            Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
        };
        let retries = self.retries.as_deref().filter(|_| is_safe(&request));
        let Some((retries, copy)) =
            retries.and_then(|r| Some((r, r.copy.downcast_ref::<Copy<B>>()?)))
        else {
            return Box::pin(balance.balance.oneshot(request));
        };
        let Some(body) = copy(request.body(), RETRY_BODY_LIMIT) else {
            return Box::pin(balance.balance.oneshot(request));
        };
        let resend = Cloned { body, copy: *copy };
        let policy = CallPolicy::new(Some(Arc::clone(&retries.rules)), balance.throttle, false);
        let service = Boxed(balance.balance);
        let name = Arc::from(service.0.service_name());
        Box::pin(RetryFuture::when_ready(
            service,
            request,
            resend,
            Box::new(policy),
            name,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use tower::Layer;

    use super::*;
    use crate::MemoryRegistry;
    use crate::registry::ServiceRegistry;

    /// A body of unknown size (its size hint has no upper bound).
    #[derive(Clone, Default)]
    struct Unsized;

    impl http_body::Body for Unsized {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }
    }

    /// A client that answers every request 503 and logs the authorities it was sent to.
    #[derive(Clone, Default)]
    struct Failing(Arc<Mutex<Vec<String>>>);

    impl<B> Service<Request<B>> for Failing {
        type Response = http::Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Self::Response, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<B>) -> Self::Future {
            let authority = request.uri().authority().unwrap().to_string();
            self.0.lock().unwrap().push(authority);
            let mut response = http::Response::new(Full::new(Bytes::new()));
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            std::future::ready(Ok(response))
        }
    }

    /// Two instances of `svc` behind a [`Failing`] client, and its log.
    async fn failing() -> (Discovery<Failing>, Arc<Mutex<Vec<String>>>) {
        let registry = Arc::new(MemoryRegistry::new());
        for (id, port) in [("a", 1), ("b", 2)] {
            let instance = ServiceInstance::new(id, "svc", "127.0.0.1", port);
            registry.register(instance).await.unwrap();
        }
        let client = Failing::default();
        let sent = Arc::clone(&client.0);
        let layer = super::super::DiscoveryLayer::new(registry)
            .balancer(|b| b.outlier_detection(None))
            .wait_for_endpoints(Duration::from_secs(5));
        (layer.layer(client), sent)
    }

    fn policy() -> HttpRetryPolicy {
        HttpRetryPolicy::new(3).backoff(Duration::ZERO, Duration::ZERO, 1.0)
    }

    async fn attempts<B: Send + 'static>(
        client: Discovery<Failing>,
        body: B,
        sent: &Mutex<Vec<String>>,
    ) -> Vec<String> {
        let request = Request::get("http://svc/").body(body).unwrap();
        client.oneshot(request).await.unwrap();
        std::mem::take(&mut *sent.lock().unwrap())
    }

    /// Catches a retry that sends a body over the limit or of unknown size again (kept
    /// or not, a clone of it is the whole body), and one that goes back to the same
    /// instance while the other is usable.
    #[tokio::test]
    async fn a_wrapped_client_retries_only_bodies_of_known_size_within_the_limit() {
        let _limit = tower_sd_testkit::time_limit(30);
        let (discovery, sent) = failing().await;
        let client = discovery.retry_policy::<Full<Bytes>>(policy());
        let small = Full::new(Bytes::from(vec![0; 64 << 10]));
        for _ in 0..20 {
            let tried = attempts(client.clone(), small.clone(), &sent).await;
            assert_eq!(tried.len(), 3, "{tried:?}");
            let avoided = tried[0] != tried[1];
            assert!(
                avoided,
                "the retry avoids the instance that failed: {tried:?}"
            );
        }
        let large = Full::new(Bytes::from(vec![0; (64 << 10) + 1]));
        assert_eq!(attempts(client, large, &sent).await.len(), 1);

        let (discovery, sent) = failing().await;
        let client = discovery.retry_policy::<Unsized>(policy());
        assert_eq!(attempts(client, Unsized, &sent).await.len(), 1);
    }

    /// Catches a throttle left out of the wrapped client's retries: with 4 tokens and every
    /// answer a failure, the first call retries once (3 tokens left, more than half), and
    /// the next calls not at all.
    #[tokio::test]
    async fn a_wrapped_client_stops_retrying_once_the_throttle_drains() {
        let _limit = tower_sd_testkit::time_limit(30);
        let (discovery, sent) = failing().await;
        let client = discovery.retry_policy::<Full<Bytes>>(policy().throttle(4, 0.1));
        let body = Full::new(Bytes::new());
        assert_eq!(attempts(client.clone(), body.clone(), &sent).await.len(), 2);
        for _ in 0..3 {
            assert_eq!(attempts(client.clone(), body.clone(), &sent).await.len(), 1);
        }
    }

    /// Catches a policy applied to a body type it was not set for (whose clone it does
    /// not know), and to an unsafe method.
    #[tokio::test]
    async fn a_wrapped_client_sends_other_bodies_and_unsafe_methods_once() {
        let _limit = tower_sd_testkit::time_limit(30);
        let (discovery, sent) = failing().await;
        let client = discovery.retry_policy::<Full<Bytes>>(policy());
        let post = Request::post("http://svc/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.clone().oneshot(post).await.unwrap();
        assert_eq!(std::mem::take(&mut *sent.lock().unwrap()).len(), 1);
        assert_eq!(
            attempts(client.clone(), String::from("x"), &sent)
                .await
                .len(),
            1
        );
        let again = Full::new(Bytes::from_static(b"x"));
        assert_eq!(attempts(client, again, &sent).await.len(), 3);
    }
}
