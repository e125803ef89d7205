//! [`Endpoint`]: what the balancer is told about each service besides the service itself,
//! and [`Readiness`]: what the owner of a service (a connection) tells the balancer about
//! it without being polled.
//!
//! These are the seam between discovery, the balancer and the connections: discovery makes
//! endpoints ([`Endpoint::for_instance`]), connections report their [`Connectivity`], and
//! the balancer reads both, while none of the three imports another.

mod readiness;

pub(crate) use readiness::Signal;
pub use readiness::{Connectivity, Readiness, ReadinessError};

use crate::instance::ServiceInstance;

/// A service with what the balancer needs to know about it besides its load: its weight, its
/// locality zone, its priority tier, and whether it is connected.
///
/// A [`Discover`](tower::discover::Discover) whose services are `Endpoint`s gives the balancer
/// these facts (see [`BalanceBuilder::build`](crate::balance::BalanceBuilder::build));
/// [`RegistryDiscover`](crate::RegistryDiscover) makes them from a registry's instances
/// ([`Endpoint::for_instance`]), and [`Endpoints`] from any tower `Discover` (weight 1, no
/// zone).
///
/// # Examples
///
/// ```
/// use tower_sd::endpoint::Endpoint;
///
/// let endpoint = Endpoint::new("a client").weight(3).zone("eu-west-1a");
/// assert_eq!((endpoint.weight, endpoint.zone.as_deref()), (3, Some("eu-west-1a")));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint<S> {
    /// The service requests go to.
    pub service: S,
    /// Its share of traffic relative to the others when loads are equal (at least 1).
    pub weight: u32,
    /// Its locality zone, for [zone preference](crate::balance::ZonePreference).
    pub zone: Option<String>,
    /// Its [priority tier](crate::balance#priority-tiers): lower is preferred.
    pub priority: u16,
    /// Its connectivity, as the service's owner reports it; `None`: the service's own
    /// `poll_ready` is all the balancer knows.
    pub readiness: Option<Readiness>,
    /// What the balancer keeps as long as it keeps the endpoint.
    pub(crate) companion: Option<Companion>,
}

/// Something that lives exactly as long as the balancer keeps an endpoint: the abort guard
/// of a task that serves the endpoint (its health check), which must neither outlive it nor
/// keep it alive.
#[derive(Clone)]
pub(crate) struct Companion(#[allow(dead_code)] std::sync::Arc<dyn Send + Sync>);

#[cfg_attr(not(any(feature = "tonic", feature = "http")), allow(dead_code))]
impl Companion {
    /// Aborts `task` when the last clone is dropped.
    pub(crate) fn task(task: tokio::task::AbortHandle) -> Self {
        /// Aborts a task when dropped.
        struct AbortOnDrop(tokio::task::AbortHandle);

        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }

        Self(std::sync::Arc::new(AbortOnDrop(task)))
    }
}

/// Two companions are equal when they are the same value.
impl PartialEq for Companion {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(
            std::sync::Arc::as_ptr(&self.0),
            std::sync::Arc::as_ptr(&other.0),
        )
    }
}

impl Eq for Companion {}

impl std::fmt::Debug for Companion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Companion")
    }
}

impl<S> Endpoint<S> {
    /// An endpoint of weight 1 in no zone.
    pub fn new(service: S) -> Self {
        Self {
            service,
            weight: 1,
            zone: None,
            priority: 0,
            readiness: None,
            companion: None,
        }
    }

    /// Sets the weight (0 counts as 1).
    #[must_use]
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Sets the zone.
    #[must_use]
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the priority tier (lower is preferred).
    #[must_use]
    pub fn priority(mut self, priority: u16) -> Self {
        self.priority = priority;
        self
    }

    /// Keeps `companion` as long as the balancer keeps the endpoint.
    #[cfg_attr(not(any(feature = "tonic", feature = "http")), allow(dead_code))]
    pub(crate) fn companion(mut self, companion: Companion) -> Self {
        self.companion = Some(companion);
        self
    }

    /// Sets the readiness the balancer reads: while another endpoint is ready, it never
    /// picks this one unless it is [pickable](Connectivity::is_pickable).
    #[must_use]
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = Some(readiness);
        self
    }
}

impl<S> Endpoint<S> {
    /// The endpoint of `instance`: its service, with the instance's weight, zone and
    /// priority.
    pub fn for_instance(service: S, instance: &ServiceInstance) -> Self {
        let endpoint = Self::new(service)
            .weight(instance.weight)
            .priority(instance.priority);
        match &instance.zone {
            Some(zone) => endpoint.zone(zone.clone()),
            None => endpoint,
        }
    }
}

/// An endpoint is a service: it forwards to its own, so a stream of endpoints (such as
/// [`RegistryDiscover`](crate::RegistryDiscover)) drives tower's own balancers too, which
/// ignore the weight, zone and readiness.
impl<S, R> tower::Service<R> for Endpoint<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> S::Future {
        self.service.call(request)
    }
}

pin_project_lite::pin_project! {
    /// Any tower [`Discover`](tower::discover::Discover) as one of [`Endpoint`]s, each of
    /// weight 1, no zone and no readiness: what
    /// [`BalanceBuilder::build`](crate::balance::BalanceBuilder::build) takes.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::discover::Change;
    /// use tower::{ServiceExt, service_fn};
    /// use tower_sd::balance::Balance;
    /// use tower_sd::endpoint::Endpoints;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower::BoxError> {
    /// let echo = service_fn(|request: u32| async move { Ok::<_, Infallible>(request) });
    /// let discover = futures_util::stream::iter([Ok::<_, Infallible>(Change::Insert("a", echo))]);
    /// let balance = Balance::new(Endpoints::new(discover));
    /// assert_eq!(balance.oneshot(7).await?, 7);
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Debug)]
    #[must_use = "streams do nothing unless polled"]
    pub struct Endpoints<D> {
        #[pin]
        discover: D,
    }
}

impl<D> Endpoints<D> {
    /// Wraps `discover`.
    pub fn new(discover: D) -> Self {
        Self { discover }
    }
}

impl<D, K, S, E> futures_core::Stream for Endpoints<D>
where
    D: futures_core::TryStream<Ok = tower::discover::Change<K, S>, Error = E>,
{
    type Item = Result<tower::discover::Change<K, Endpoint<S>>, E>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use tower::discover::Change;
        let change = std::task::ready!(self.project().discover.try_poll_next(cx));
        std::task::Poll::Ready(change.map(|change| {
            change.map(|change| match change {
                Change::Insert(key, service) => Change::Insert(key, Endpoint::new(service)),
                Change::Remove(key) => Change::Remove(key),
            })
        }))
    }
}
