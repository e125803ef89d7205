//! [`Discovery`]: the routing of [`DiscoveryLayer`](super::DiscoveryLayer) around a wrapped
//! client (hyper-util's, or any `Clone` HTTP service), which dials the instance each
//! request is re-addressed to.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::future::BoxFuture;
use http::Request;
use tower::{Service, ServiceExt};

use super::rewrite::{Rewrite, Wire};
use super::route::{Route, UnknownHosts};
use super::router::{Reported, Router};
use super::{TooManyServices, UnknownHost};
use crate::balance::{Balance, EndpointStats};
use crate::classify::{HttpStatus, ResponseBody};
use crate::discover::RegistryDiscover;
use crate::error::BoxError;
use crate::instance::ServiceInstance;

/// The service made by [`DiscoveryLayer`](super::DiscoveryLayer).
pub struct Discovery<S> {
    inner: S,
    router: Arc<Router<ServiceBalance<S>>>,
}

/// The balancer of one service.
type ServiceBalance<S> = Balance<Rewrite<S>, String, HttpStatus>;

impl<S> Reported for ServiceBalance<S> {
    fn endpoints(&self) -> Vec<EndpointStats<String>> {
        Balance::endpoints(self)
    }
}

impl<S> Discovery<S> {
    pub(super) fn new(inner: S, router: Arc<Router<ServiceBalance<S>>>) -> Self {
        Self { inner, router }
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
            let discover = RegistryDiscover::new(
                &*router.registry,
                service.to_owned(),
                move |instance: &ServiceInstance| {
                    Rewrite::new(inner.clone(), instance, host_header, Wire::Client)
                },
            );
            router
                .balance_for(service)
                .build(discover)
                .with_classifier(HttpStatus)
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
        match self.balancer(&service) {
            Ok(balance) => Box::pin(balance.oneshot(request)),
            Err(error) => Box::pin(std::future::ready(Err(error.into()))),
        }
    }
}
