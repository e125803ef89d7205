//! [`ConnectionDiscovery`]: the routing of [`DiscoveryLayer`], over tower-sd's own HTTP/2
//! connections instead of a wrapped client.
//!
//! Each discovered instance gets a [`Connection`]: eager, state-aware, h2c or h2 over TLS
//! as the [`ConnectionSettings`] say, so a dead or still connecting instance is never
//! picked, and a request the server provably did not process is sent once more elsewhere
//! (see [`connection`](crate::connection)). HTTP/1.1 servers need the wrapped-client form
//! ([`DiscoveryLayer`] around hyper-util's pooled client).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::future::BoxFuture;
use http::Request;
use tower::{Service, ServiceExt};

use super::probe::{self, HttpProbe, Prober};
use super::retry::{HttpRetryPolicy, is_safe};
use super::rewrite::{Rewrite, Wire};
use super::route::Route;
use super::router::{Reported, Router};
use super::{DiscoveryLayer, TooManyServices, UnknownHost};
use crate::balance::{Balance, EndpointStats};
use crate::classify::{HttpStatus, ResponseBody};
use crate::connection::policy::{CallPolicy, RetryRules, Throttle};
use crate::connection::replay::Budget;
use crate::connection::retry::Retry;
use crate::connection::{self, Connection, ConnectionSettings, Connector};
use crate::discover::RegistryDiscover;
use crate::error::BoxError;
use crate::instance::ServiceInstance;

/// Routes `http://<service>/...` requests over per-instance HTTP/2 connections; made by
/// [`DiscoveryLayer::over_connections`]. Cheap to clone; clones share the balancers and
/// the connections.
///
/// A request whose host is not a service name fails with [`UnknownHost`]: there is no
/// client to pass it to.
pub struct ConnectionDiscovery<B> {
    router: Arc<Router<ServiceBalance<B>>>,
    connector: Connector,
    /// The transparent retry's buffer (the connection settings' `retry_buffer_bytes`).
    retry_buffer: usize,
    /// What every request keeps for retries, together, at most.
    budget: Arc<Budget>,
    /// The retry policy, with its rules as the connections apply them.
    policy: Option<(HttpRetryPolicy, Arc<RetryRules>)>,
    /// Starts the health probe of each instance, when set.
    probe: Option<Prober<Rewrite<Connection<B>>>>,
}

/// The balancer of one service, with the retries in front, and the service's throttle.
struct ServiceBalance<B> {
    retry: Retry<Balance<Rewrite<Connection<B>>, String, HttpStatus>, B>,
    throttle: Option<Arc<Throttle>>,
}

impl<B> Clone for ServiceBalance<B> {
    fn clone(&self) -> Self {
        Self {
            retry: self.retry.clone(),
            throttle: self.throttle.clone(),
        }
    }
}

impl<B> Reported for ServiceBalance<B> {
    fn endpoints(&self) -> Vec<EndpointStats<String>> {
        self.retry.get_ref().endpoints()
    }
}

impl DiscoveryLayer {
    /// Routes requests for service names over tower-sd's own HTTP/2 connections, one set
    /// per instance, made with `connections` (h2c, or h2 over TLS when it has a
    /// [`TlsConfig`](crate::connection::TlsConfig); the TLS server name defaults to the
    /// service name). No client is wrapped, so the servers must speak HTTP/2.
    ///
    /// Request bodies carry `Bytes` and are `Send` and `Unpin` (http-body-util's `Full`,
    /// `Empty` and boxed bodies are).
    pub fn over_connections<B>(self, connections: ConnectionSettings) -> ConnectionDiscovery<B>
    where
        B: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Unpin + 'static,
    {
        ConnectionDiscovery {
            router: self.router(),
            retry_buffer: connections.retry_buffer_bytes,
            budget: Budget::new(connections.retry_buffer_total_bytes),
            connector: Connector::new(connections),
            policy: None,
            probe: None,
        }
    }
}

impl<B> ConnectionDiscovery<B>
where
    B: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Unpin + 'static,
{
    /// The shared balancer for `service`, created on first use.
    fn balancer(&self, service: &str) -> Result<ServiceBalance<B>, TooManyServices> {
        let router = &self.router;
        router.balancer(service, || {
            let connector = self.connector.clone().service(service);
            let host_header = router.settings.host_header;
            let (probe, name) = (self.probe.clone(), service.to_owned());
            let discover = RegistryDiscover::of_endpoints(
                &*router.registry,
                service.to_owned(),
                move |instance: &ServiceInstance| {
                    let endpoint = connector.endpoint(instance, |connection: Connection<B>| {
                        Rewrite::new(connection, instance, host_header, Wire::Http2)
                    })?;
                    Ok::<_, BoxError>(match (&probe, &endpoint.readiness) {
                        (Some(start), Some(readiness)) => {
                            let companion = start(&endpoint.service, readiness, &name);
                            endpoint.companion(companion)
                        }
                        _ => endpoint,
                    })
                },
            );
            let balance = router
                .balance_for(service)
                .build(discover)
                .with_classifier(HttpStatus);
            ServiceBalance {
                retry: Retry::new(
                    balance,
                    self.retry_buffer,
                    Arc::clone(&self.budget),
                    service,
                ),
                throttle: self.policy.as_ref().and_then(|(p, _)| p.new_throttle()),
            }
        })
    }

    /// Probes each instance's health with `probe` (see [`HttpProbe`]): an instance whose
    /// probe fails gets no requests; set it before the first request (balancers made before
    /// keep none).
    #[must_use]
    pub fn health_probe(mut self, probe: HttpProbe) -> Self
    where
        B: Default,
    {
        self.probe = Some(probe::prober(probe));
        self
    }

    /// Retries requests that are safe to send twice by `policy` (see [`HttpRetryPolicy`]);
    /// set it before the first request (balancers made before keep none).
    #[must_use]
    pub fn retry_policy(mut self, policy: HttpRetryPolicy) -> Self {
        let rules = policy.rules();
        self.policy = Some((policy, rules));
        self
    }
}

impl<B> ConnectionDiscovery<B> {
    /// The endpoints of `service`'s balancer, with each connection's state; empty when the
    /// service has no balancer (yet, or any more).
    pub fn endpoints(&self, service: &str) -> Vec<EndpointStats<String>> {
        self.router.endpoints(service)
    }

    /// The services that currently have a balancer, sorted.
    pub fn active_services(&self) -> Vec<String> {
        self.router.active_services()
    }
}

impl<B> Clone for ConnectionDiscovery<B> {
    fn clone(&self) -> Self {
        Self {
            router: Arc::clone(&self.router),
            connector: self.connector.clone(),
            retry_buffer: self.retry_buffer,
            budget: Arc::clone(&self.budget),
            policy: self.policy.clone(),
            probe: self.probe.clone(),
        }
    }
}

impl<B> fmt::Debug for ConnectionDiscovery<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionDiscovery")
            .field("router", &self.router)
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for ConnectionDiscovery<B>
where
    B: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Unpin + 'static,
{
    type Response = http::Response<ResponseBody<connection::Body>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    /// Always ready: readiness is checked per request, on the instance that serves it.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.router.route(request.uri()) {
            Route::Service(service) => match self.balancer(&service) {
                Ok(balance) => {
                    let policy = self.policy.as_ref().filter(|_| is_safe(&request));
                    let Some((_, rules)) = policy else {
                        return Box::pin(balance.retry.oneshot(request));
                    };
                    let policy = CallPolicy::new(Some(Arc::clone(rules)), balance.throttle, false);
                    let mut retry = balance.retry;
                    Box::pin(async move {
                        retry.ready().await?;
                        retry.call_with(request, Some(Box::new(policy))).await
                    })
                }
                Err(error) => Box::pin(std::future::ready(Err(error.into()))),
            },
            Route::Other => {
                let host = request.uri().host().unwrap_or_default().to_owned();
                Box::pin(std::future::ready(Err(UnknownHost(host).into())))
            }
        }
    }
}
