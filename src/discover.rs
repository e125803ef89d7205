//! [`RegistryDiscover`]: a registry watch as a tower [`Discover`] stream.
//!
//! (The rules are on the type, which the crate root exports.)
//!
//! [`Discover`]: tower::discover::Discover

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_core::Stream;
use futures_core::stream::BoxStream;
use futures_util::StreamExt;
use tower::discover::Change;
use tracing::{debug, warn};

use crate::endpoint::Endpoint;
use crate::error::{BoxError, Result};
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::ServiceRegistry;

/// Turns a registry's watch into a stream of [`Change`]s, so it can drive any tower balancer:
/// tower's `p2c::Balance` as well as this crate's.
///
/// A registry reports *sets* ("these 4 instances of `greeter` are healthy"); balancers want
/// *changes*. `RegistryDiscover` diffs successive sets by instance id:
///
/// - an id that appears yields [`Change::Insert`] with a service made for it;
/// - an id that disappears yields [`Change::Remove`];
/// - an id whose address, port, weight, zone or metadata changed yields [`Change::Insert`]
///   again, which replaces the old service (tags alone changing yields nothing).
///
/// Removals of a set are yielded before its insertions.
///
/// Keys are instance ids, and services [`Endpoint`]s: `make` builds the service for an
/// instance (typically a client for its address), which goes with the instance's weight
/// and zone. An `Endpoint` is a service itself, forwarding to its own, so tower's
/// balancers take them as they are.
///
/// Failures never remove endpoints:
///
/// - a watch error is logged and skipped; the last set stands until the registry sends a new
///   one;
/// - when `make` fails for an instance, that instance is logged and skipped (and a replaced
///   instance is removed, since its old service points at the old address); it is tried again
///   with the next set that includes it.
///
/// The stream therefore never yields an error (its error type is [`Infallible`]).
///
/// # End of stream
///
/// The stream ends only when the registry's watch ends, which means the registry itself is
/// gone (e.g. the last [`MemoryRegistry`] handle was dropped); a registry that is merely
/// unreachable keeps its watch open. After the end the stream keeps returning
/// `Ready(None)`, so tower's `p2c::Balance`, which polls again, keeps its last endpoints.
///
/// [`MemoryRegistry`]: crate::MemoryRegistry
///
/// # Examples
///
/// ```
/// use futures_util::StreamExt;
/// use tower::discover::Change;
/// use tower_sd::{MemoryRegistry, RegistryDiscover, ServiceInstance, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_sd::Error> {
/// let registry = MemoryRegistry::new();
/// registry.register(ServiceInstance::new("g-1", "greeter", "10.0.0.1", 50051)).await?;
///
/// // The "service" here is just the authority; a real one would be a client.
/// let mut discover = RegistryDiscover::new(&registry, "greeter", |instance| {
///     Ok::<_, std::convert::Infallible>(instance.authority())
/// });
/// match discover.next().await {
///     Some(Ok(Change::Insert(id, endpoint))) => {
///         assert_eq!((id.as_str(), endpoint.service.as_str()), ("g-1", "10.0.0.1:50051"));
///     }
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok(())
/// # }
/// ```
///
/// Any tower balancer can consume it:
///
/// ```
/// use std::convert::Infallible;
/// use tower::{BoxError, ServiceExt, balance::p2c::Balance, load::Constant, service_fn};
/// use tower_sd::{MemoryRegistry, RegistryDiscover, ServiceInstance, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let registry = MemoryRegistry::new();
/// registry.register(ServiceInstance::new("greeter-1", "greeter", "10.0.0.1", 50051)).await?;
/// // `make` builds the client for one instance; here a stand-in that answers with the
/// // address it would dial.
/// let discover = RegistryDiscover::new(&registry, "greeter", |instance| {
///     let authority = instance.authority();
///     Ok::<_, Infallible>(service_fn(move |_request: ()| {
///         let authority = authority.clone();
///         async move { Ok::<_, Infallible>(authority) }
///     }))
/// });
/// let balance = Balance::new(Constant::new(discover, 1));
/// assert_eq!(balance.oneshot(()).await?, "10.0.0.1:50051");
/// # Ok(())
/// # }
/// ```
pub struct RegistryDiscover<S, F> {
    service: String,
    watch: BoxStream<'static, Result<Vec<ServiceInstance>>>,
    make: F,
    diff: Diff,
    pending: VecDeque<Change<String, Endpoint<S>>>,
    ended: bool,
}

// Nothing in `RegistryDiscover` is structurally pinned (the watch is boxed), so it is `Unpin`
// whatever `S` and `F` are; tower's balancers require `Unpin` discovery.
impl<S, F> Unpin for RegistryDiscover<S, F> {}

// ===== impl RegistryDiscover =====

impl<S> RegistryDiscover<S, ()> {
    /// Watches `query` on `registry`, and makes a service for each instance with `make`;
    /// each is yielded as an [`Endpoint`] with its instance's weight and zone.
    pub fn new<R, Q, E, M>(
        registry: &R,
        query: Q,
        make: M,
    ) -> RegistryDiscover<S, impl Fn(&ServiceInstance) -> Result<Endpoint<S>, E> + use<S, R, Q, E, M>>
    where
        R: ServiceRegistry + ?Sized,
        Q: Into<ServiceQuery>,
        E: Into<BoxError>,
        M: Fn(&ServiceInstance) -> Result<S, E>,
    {
        RegistryDiscover::of_endpoints(registry, query, for_instance(make))
    }

    /// Diffs the sets of any stream of full instance sets, such as a
    /// [`WatchStream`](crate::registry::WatchStream), as [`new`](RegistryDiscover::new)
    /// does a registry's. `service` names the service in logs.
    pub fn from_stream<N, W, E, M>(
        service: N,
        watch: W,
        make: M,
    ) -> RegistryDiscover<S, impl Fn(&ServiceInstance) -> Result<Endpoint<S>, E> + use<S, N, W, E, M>>
    where
        N: Into<String>,
        W: Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static,
        E: Into<BoxError>,
        M: Fn(&ServiceInstance) -> Result<S, E>,
    {
        RegistryDiscover::stream_of_endpoints(service, watch, for_instance(make))
    }
}

/// `make`, with the instance's weight and zone around its service.
fn for_instance<S, E>(
    make: impl Fn(&ServiceInstance) -> Result<S, E>,
) -> impl Fn(&ServiceInstance) -> Result<Endpoint<S>, E> {
    move |instance| Ok(Endpoint::for_instance(make(instance)?, instance))
}

impl<S, F, E> RegistryDiscover<S, F>
where
    F: Fn(&ServiceInstance) -> Result<Endpoint<S>, E>,
    E: Into<BoxError>,
{
    /// [`new`](RegistryDiscover::new), with `make` making the whole endpoint (a connection
    /// adds its readiness).
    pub(crate) fn of_endpoints<R>(registry: &R, query: impl Into<ServiceQuery>, make: F) -> Self
    where
        R: ServiceRegistry + ?Sized,
    {
        let query = query.into();
        let watch = registry.watch(&query);
        Self::stream_of_endpoints(query.name, watch, make)
    }

    fn stream_of_endpoints<W>(service: impl Into<String>, watch: W, make: F) -> Self
    where
        W: Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static,
    {
        Self {
            service: service.into(),
            watch: watch.boxed(),
            make,
            diff: Diff::default(),
            pending: VecDeque::new(),
            ended: false,
        }
    }

    /// The instances currently inserted, in no particular order.
    pub fn instances(&self) -> impl Iterator<Item = &ServiceInstance> {
        self.diff.current.values()
    }

    fn apply(&mut self, set: Vec<ServiceInstance>) {
        let (removed, inserted) = self.diff.apply(set);
        self.pending.extend(removed.into_iter().map(Change::Remove));
        for (instance, replaces) in inserted {
            match (self.make)(&instance) {
                Ok(service) => {
                    debug!(service = %self.service, id = %instance.id, address = %instance.authority(), "insert");
                    self.pending.push_back(Change::Insert(instance.id, service));
                }
                Err(error) => {
                    let error: BoxError = error.into();
                    warn!(
                        service = %self.service, id = %instance.id, %error,
                        "cannot make an endpoint for the instance; skipping it until the next set"
                    );
                    self.diff.current.remove(&instance.id);
                    if replaces {
                        self.pending.push_back(Change::Remove(instance.id));
                    }
                }
            }
        }
    }
}

impl<S, F, E> Stream for RegistryDiscover<S, F>
where
    F: Fn(&ServiceInstance) -> Result<Endpoint<S>, E>,
    E: Into<BoxError>,
{
    type Item = Result<Change<String, Endpoint<S>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(this.watch.poll_next_unpin(cx)) {
                Some(Ok(set)) => this.apply(set),
                Some(Err(error)) => {
                    let error = crate::error::Chain(&error);
                    warn!(service = %this.service, %error, "registry watch failed; keeping the last set");
                }
                None => {
                    debug!(service = %this.service, "registry watch ended");
                    this.ended = true;
                }
            }
        }
    }
}

impl<S, F> fmt::Debug for RegistryDiscover<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryDiscover")
            .field("service", &self.service)
            .field("instances", &self.diff.current.len())
            .field("pending", &self.pending.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

// ===== impl Diff =====

/// The set-diffing core, kept apart from services so it can be tested on its own.
#[derive(Debug, Default)]
pub(crate) struct Diff {
    current: HashMap<String, ServiceInstance>,
}

impl Diff {
    /// Makes `set` current. Returns the ids removed and the instances to insert, each with
    /// whether it replaces an instance of the same id.
    pub(crate) fn apply(
        &mut self,
        set: Vec<ServiceInstance>,
    ) -> (Vec<String>, Vec<(ServiceInstance, bool)>) {
        let mut next: HashMap<String, ServiceInstance> = set
            .into_iter()
            .map(|instance| (instance.id.clone(), instance))
            .collect();
        let removed: Vec<String> = self
            .current
            .keys()
            .filter(|id| !next.contains_key(*id))
            .cloned()
            .collect();
        for id in &removed {
            self.current.remove(id);
        }
        let mut inserted = Vec::new();
        for (id, instance) in next.drain() {
            match self.current.get_mut(&id) {
                Some(old) if !old.endpoint_differs(&instance) => *old = instance,
                old => {
                    inserted.push((instance.clone(), old.is_some()));
                    self.current.insert(id, instance);
                }
            }
        }
        (removed, inserted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance::new(id, "svc", "127.0.0.1", port)
    }

    #[test]
    fn diff_inserts_removes_and_replaces() {
        let mut diff = Diff::default();
        let (removed, inserted) = diff.apply(vec![instance("a", 1), instance("b", 2)]);
        assert!(removed.is_empty());
        assert_eq!(inserted.len(), 2);

        // Same set: nothing.
        let (removed, inserted) = diff.apply(vec![instance("a", 1), instance("b", 2)]);
        assert!(removed.is_empty() && inserted.is_empty());

        // Tags only: nothing emitted, but the stored instance is updated.
        let (removed, inserted) =
            diff.apply(vec![instance("a", 1).with_tag("t"), instance("b", 2)]);
        assert!(removed.is_empty() && inserted.is_empty());
        assert_eq!(diff.current["a"].tags, ["t"]);

        // b's port changes, a goes away, c arrives.
        let (removed, mut inserted) = diff.apply(vec![instance("b", 3), instance("c", 4)]);
        assert_eq!(removed, ["a"]);
        inserted.sort_by(|x, y| x.0.id.cmp(&y.0.id));
        assert_eq!(
            inserted,
            [(instance("b", 3), true), (instance("c", 4), false)]
        );
    }
}
