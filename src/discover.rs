//! [`RegistryDiscover`]: a registry watch as a tower [`Discover`] stream.
//!
//! (The rules are on the type, which the crate root exports.)
//!
//! [`Discover`]: tower::discover::Discover

use std::collections::VecDeque;
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
        self.diff.current().iter()
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
                    self.diff.forget(&instance.id);
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
            .field("instances", &self.diff.current().len())
            .field("pending", &self.pending.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

// ===== impl Diff =====

/// Sets this large are dropped on tokio's blocking pool, when there is a runtime, rather
/// than on the way from the registry to the balancer: freeing 10,000 instances costs about
/// half a millisecond.
const DROP_ASIDE: usize = 1_000;

/// Drops a replaced set: on tokio's blocking pool when it is large and a runtime is at hand,
/// else here.
fn drop_aside(set: Vec<ServiceInstance>) {
    if set.len() >= DROP_ASIDE
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        drop(runtime.spawn_blocking(move || drop(set)));
    }
}

/// The set-diffing core, kept apart from services so it can be tested on its own.
///
/// The current set is kept sorted by id, and a new set is merged against it in one pass:
/// registries give their sets sorted by id, so at 10,000 instances a change of a few costs
/// one comparison per instance, with no hashing and no copy of the ids (a set that is not
/// sorted is sorted first).
#[derive(Debug, Default)]
pub(crate) struct Diff {
    current: Vec<ServiceInstance>,
}

impl Diff {
    /// The current instances, sorted by id.
    pub(crate) fn current(&self) -> &[ServiceInstance] {
        &self.current
    }

    /// Forgets the instance `id` (its endpoint could not be made).
    pub(crate) fn forget(&mut self, id: &str) {
        if let Ok(at) = self.current.binary_search_by(|i| i.id.as_str().cmp(id)) {
            self.current.remove(at);
        }
    }

    /// Makes `set` current (of instances with one id, the last). Returns the ids removed
    /// and the instances to insert, each with whether it replaces an instance of the same
    /// id.
    pub(crate) fn apply(
        &mut self,
        mut set: Vec<ServiceInstance>,
    ) -> (Vec<String>, Vec<(ServiceInstance, bool)>) {
        if !set.is_sorted_by(|a, b| a.id < b.id) {
            // Stable, so that of one id the last stays last; then keep only it.
            set.sort_by(|a, b| a.id.cmp(&b.id));
            let mut unique: Vec<ServiceInstance> = Vec::with_capacity(set.len());
            for instance in set {
                match unique.last_mut() {
                    Some(last) if last.id == instance.id => *last = instance,
                    _ => unique.push(instance),
                }
            }
            set = unique;
        }
        let mut removed = Vec::new();
        let mut inserted = Vec::new();
        let mut old = self.current.iter().peekable();
        for instance in &set {
            // Every old instance before this id is gone.
            while let Some(gone) = old.next_if(|o| o.id < instance.id) {
                removed.push(gone.id.clone());
            }
            match old.next_if(|o| o.id == instance.id) {
                Some(previous) if !previous.endpoint_differs(instance) => {}
                previous => inserted.push((instance.clone(), previous.is_some())),
            }
        }
        removed.extend(old.map(|gone| gone.id.clone()));
        let replaced = std::mem::replace(&mut self.current, set);
        drop_aside(replaced);
        (removed, inserted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance::new(id, "svc", "127.0.0.1", port)
    }

    /// The diff as a reference model would make it: hash maps, no order assumed.
    fn reference(
        old: &[ServiceInstance],
        new: &[ServiceInstance],
    ) -> (Vec<String>, Vec<(ServiceInstance, bool)>) {
        let old: std::collections::HashMap<&str, &ServiceInstance> =
            old.iter().map(|i| (i.id.as_str(), i)).collect();
        let new: std::collections::HashMap<&str, &ServiceInstance> =
            new.iter().map(|i| (i.id.as_str(), i)).collect();
        let mut removed: Vec<String> = old
            .keys()
            .filter(|id| !new.contains_key(*id))
            .map(|id| (*id).to_owned())
            .collect();
        let mut inserted: Vec<(ServiceInstance, bool)> = new
            .iter()
            .filter(|(id, i)| old.get(*id).is_none_or(|o| o.endpoint_differs(i)))
            .map(|(id, i)| ((*i).clone(), old.contains_key(id)))
            .collect();
        removed.sort();
        inserted.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        (removed, inserted)
    }

    proptest::proptest! {
        /// Catches a merge that loses an instance at either end, misses a removal between
        /// two kept ones, or takes an unsorted set or a repeated id wrongly: the same changes
        /// as the hash-map model, set after set.
        #[test]
        fn the_merge_gives_the_changes_a_hash_map_model_gives(
            sets in proptest::collection::vec(
                proptest::collection::vec((0u8..30, 1u16..4), 0..25),
                1..6,
            )
        ) {
            let mut diff = Diff::default();
            let mut previous: Vec<ServiceInstance> = Vec::new();
            for set in sets {
                let set: Vec<ServiceInstance> =
                    set.iter().map(|&(id, port)| instance(&format!("i{id}"), port)).collect();
                // Of one id, the last counts.
                let mut last: std::collections::BTreeMap<String, ServiceInstance> = Default::default();
                for i in &set {
                    last.insert(i.id.clone(), i.clone());
                }
                let unique: Vec<ServiceInstance> = last.into_values().collect();
                let want = reference(&previous, &unique);
                let (mut removed, mut inserted) = diff.apply(set);
                removed.sort();
                inserted.sort_by(|a, b| a.0.id.cmp(&b.0.id));
                proptest::prop_assert_eq!((removed, inserted), want);
                proptest::prop_assert_eq!(diff.current(), unique.as_slice());
                previous = unique;
            }
        }
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
        assert_eq!(diff.current()[0].tags, ["t"]);

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
