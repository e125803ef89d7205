//! [`Balance`]: the cloneable, lock-free P2C balancer service.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use tokio::time::Instant;
use tower::Service;
use tower::discover::Discover;
use tracing::debug;

use super::claim::{Chosen, Claim};
use super::classify::{Classify, ErrorsOnly};
use super::config::Config;
use super::future::ResponseFuture;
use super::load::LoadMetric;
use super::p2c::{Cost, Pick, Rules, pick, pick_avoiding};
use super::route;
use super::slot::{Slot, SlotState};
use super::snapshot::{Shared, Snapshot};
use super::stats::EndpointStats;
use super::tier::TierShare;
use super::updater;
use crate::endpoint::Endpoint;
use crate::error::{BoxError, Elapsed, Error};

/// A power-of-two-choices load balancer that every clone can use at once.
///
/// Discovery is applied by a background task that publishes immutable endpoint snapshots, so
/// the set follows the registry whether or not requests arrive, and a request never waits on
/// another task: each clone picks from the current snapshot by itself, without a lock and
/// without a `Buffer`. See the [module docs](super) for the algorithm.
///
/// - **Readiness**: `poll_ready` picks an endpoint and drives a clone of its service to
///   readiness; `call` dispatches to that same endpoint, even if the set changed in between.
///   A clone of `Balance` does not inherit readiness.
/// - **Load from the pick until the end**: a request counts as load on its endpoint from the
///   moment `poll_ready` picks it (so handles that get ready at the same time see each
///   other's picks) until its response is complete, as the [`Classify`] decides (with
///   `HttpStatus`, until the response body ends or is dropped).
/// - **Empty set**: `poll_ready` waits up to `wait_for_endpoints` (woken the moment an
///   endpoint arrives), then fails with [`Error::NoEndpoints`]. Zero fails at once.
/// - **Removal drains**: a request in flight on a removed endpoint completes on it, and no
///   request picks it once its removal is published. Its service is dropped when its last
///   request completes and no handle still holds a snapshot that lists it: each handle keeps
///   the snapshot it last picked from (so the hot path touches no shared reference count) and
///   trades it for the current one at its next `poll_ready`. A handle left idle after a
///   removal keeps the removed service alive, without traffic, until it is used or dropped.
/// - **Unready endpoints**: an endpoint whose `poll_ready` fails is marked failed and is not
///   picked while others are usable; a successful `poll_ready` or a replacement by discovery
///   restores it. After two failures in one `poll_ready`, the error is returned.
/// - **Cancellation**: dropping the `poll_ready` caller, the handle between `poll_ready` and
///   `call`, the response future or the response body releases what the request claimed
///   (its in-flight count, an outlier probe).
/// - **Discovery failure**: if the updater task panics, the panic is logged and `poll_ready`
///   fails with [`Error::DiscoveryStopped`] instead of serving a frozen set.
///
/// `S` must be `Clone`: each request runs on its own clone of the endpoint's service, as
/// tonic's `Channel` and hyper-util's `Client` expect.
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Service, ServiceExt, service_fn};
/// use tower_sd::balance::Balance;
/// use tower_sd::{MemoryRegistry, RegistryDiscover, ServiceInstance, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let registry = MemoryRegistry::new();
/// registry.register(ServiceInstance::new("a", "echo", "127.0.0.1", 8080)).await?;
///
/// let discover = RegistryDiscover::new(&registry, "echo", |instance| {
///     let authority = instance.authority();
///     Ok::<_, Infallible>(service_fn(move |request: String| {
///         let reply = format!("{authority} got {request}");
///         async move { Ok::<_, Infallible>(reply) }
///     }))
/// });
/// let mut balance = Balance::builder().build(discover);
/// let reply = balance.ready().await?.call("hello".to_owned()).await?;
/// assert_eq!(reply, "127.0.0.1:8080 got hello");
/// # Ok(())
/// # }
/// ```
pub struct Balance<S, K = String, C = ErrorsOnly> {
    shared: Arc<Shared<S, K>>,
    /// Classifies outcomes; cloned into each response future.
    classify: C,
    /// The snapshot this handle last picked from, with its generation.
    view: Option<(u64, Arc<Snapshot<S, K>>)>,
    /// Clones of endpoint services kept for reuse (see `BalanceBuilder::keep_clones`), keyed by
    /// slot; cleared with the view.
    clones: Vec<(usize, S)>,
    chosen: Option<Chosen<S, K>>,
    /// While the set is empty or no endpoint is ready: resolves when one is (`true`) or the
    /// wait times out.
    waiting: Option<Pin<Box<dyn Future<Output = bool> + Send + Sync>>>,
    /// While the chosen endpoint is pending: resolves at the next publish.
    next_publish: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// Endpoints (by [`slot_key`]) to pass over while another is usable: those a retried
    /// call tried. Empty but for a retry's handle.
    avoid: Vec<usize>,
}

/// What driving the chosen endpoint's readiness gave.
enum Readiness {
    Ready,
    /// Its `poll_ready` failed; it is marked failed and another is to be picked.
    Failed(BoxError),
    /// It was removed while pending: pick another.
    Removed,
    /// A snapshot was published while it was pending: poll it again.
    Again,
}

// ===== impl Balance =====

impl<S, K> Balance<S, K>
where
    S: Send + Sync + 'static,
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
{
    pub(crate) fn spawn<D>(config: Config, discover: D) -> Self
    where
        D: Discover<Key = K, Service = Endpoint<S>> + Unpin + Send + 'static,
        D::Error: Into<BoxError> + Send,
    {
        let (shared, gone) = Shared::new(config);
        let shared = Arc::new(shared);
        updater::spawn(discover, &shared, gone);
        Self {
            shared,
            classify: ErrorsOnly,
            view: None,
            clones: Vec::new(),
            chosen: None,
            waiting: None,
            next_publish: None,
            avoid: Vec::new(),
        }
    }
}

impl<S, K, C> Balance<S, K, C> {
    /// This balancer with another classifier (the default, [`ErrorsOnly`], counts errors
    /// only and completes a request with its response).
    pub fn with_classifier<C2>(self, classify: C2) -> Balance<S, K, C2> {
        Balance {
            shared: Arc::clone(&self.shared),
            classify,
            view: None,
            clones: Vec::new(),
            chosen: None,
            waiting: None,
            next_publish: None,
            avoid: Vec::new(),
        }
    }

    /// Per-endpoint statistics of the current snapshot, in slot order. Endpoints that were
    /// removed and are still draining are not included.
    pub fn endpoints(&self) -> Vec<EndpointStats<K>>
    where
        K: Clone,
    {
        let now = Instant::now();
        let snapshot = self.shared.snapshot.load();
        snapshot.slots.iter().map(|slot| slot.stats(now)).collect()
    }

    /// The priority tiers of the current snapshot, best first, with the share of picks each
    /// takes now (see [priority tiers](super#priority-tiers)). One tier of all the endpoints,
    /// taking 100%, when they all have one priority.
    pub fn tiers(&self) -> Vec<TierShare> {
        route::report(&self.shared.snapshot.load(), &self.shared)
    }

    /// How many endpoints of the current snapshot outlier detection has ejected (those being
    /// probed included), as the panic threshold and `max_ejection_percent` count them.
    pub fn ejected(&self) -> usize {
        self.shared
            .detector
            .as_ref()
            .map_or(0, |detector| detector.ejected.load(Ordering::SeqCst))
    }

    /// Waits until the balancer has at least one endpoint, for at most `limit`.
    ///
    /// # Errors
    ///
    /// [`Error::NoEndpoints`] when `limit` passes first.
    pub async fn await_endpoints(&self, limit: std::time::Duration) -> Result<(), Error> {
        tokio::time::timeout(limit, self.shared.endpoints_available())
            .await
            .map_err(|_| Error::NoEndpoints {
                service: self.shared.config.service.clone(),
                source: Elapsed(limit),
            })
    }

    /// How many endpoint snapshots the updater has published. A snapshot is published, and
    /// every pick that starts afterwards uses it (or a newer one), once it is counted here;
    /// [`endpoints`](Self::endpoints) may show it a moment earlier.
    pub fn updates(&self) -> u64 {
        self.shared.updates.load(Ordering::Acquire)
    }

    /// The service name used in errors and logs.
    pub fn service_name(&self) -> &str {
        &self.shared.config.service
    }

    /// What every handle shares, for keyed routing.
    pub(super) fn shared(&self) -> &Shared<S, K> {
        &self.shared
    }

    /// The classifier, for keyed routing.
    pub(super) fn classifier(&self) -> &C {
        &self.classify
    }
}

impl<S, K, C> Balance<S, K, C>
where
    S: Clone + Send + Sync + 'static,
    K: fmt::Debug + Send + Sync + 'static,
{
    /// Picks an endpoint into `chosen`, waiting while there are none.
    fn poll_pick(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            if self.shared.updater_failed.load(Ordering::Relaxed) {
                return Poll::Ready(Err(self.no_endpoints()));
            }
            let shared = &*self.shared;
            let snapshot = view(&mut self.view, &mut self.clones, shared);
            let choice = route::choose(snapshot, shared);
            let rules = rules(shared, choice.panic);
            let picked = pick(&snapshot.slots, choice.pool, cost(&shared.config), &rules);
            let (mut index, probe) = match picked {
                Pick::Endpoint { index, probe } => (index, probe),
                Pick::Panic => {
                    let total = snapshot.slots.len();
                    return Poll::Ready(Err(self.no_healthy(total)));
                }
                Pick::Empty | Pick::NotReady => {
                    if shared.config.wait_for_endpoints.is_zero() || !ready!(self.poll_wait(cx)) {
                        return Poll::Ready(Err(self.no_endpoints()));
                    }
                    continue;
                }
            };
            if !self.avoid.is_empty() && self.avoid.contains(&slot_key(&snapshot.slots[index])) {
                let avoided = |slot: &Slot<S, K>| self.avoid.contains(&slot_key(slot));
                let other = pick_avoiding(
                    &snapshot.slots,
                    choice.pool,
                    cost(&shared.config),
                    &rules,
                    avoided,
                );
                index = other.unwrap_or(index);
            }
            let slot = &snapshot.slots[index];
            let claim = Claim {
                state: Some(slot.start()),
                probe,
            };
            let service = kept_clone(&mut self.clones, slot);
            if self.waiting.is_some() {
                self.waiting = None;
            }
            self.chosen = Some(Chosen { claim, service });
            return Poll::Ready(Ok(()));
        }
    }

    /// Starts (or keeps) waiting for a snapshot with an endpoint that is ready (any endpoint
    /// without a [`Readiness`](super::Readiness) is); `false` when the wait timed out.
    #[cold]
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let wait = self.waiting.get_or_insert_with(|| {
            let shared = Arc::clone(&self.shared);
            let limit = shared.config.wait_for_endpoints;
            Box::pin(async move {
                tokio::time::timeout(limit, shared.endpoint_ready())
                    .await
                    .is_ok()
            })
        });
        let arrived = ready!(wait.as_mut().poll(cx));
        self.waiting = None;
        Poll::Ready(arrived)
    }

    #[cold]
    fn no_endpoints(&self) -> BoxError {
        if self.shared.updater_failed.load(Ordering::Relaxed) {
            return Box::new(Error::DiscoveryStopped {
                service: self.shared.config.service.clone(),
            });
        }
        let snapshot = self.shared.snapshot.load();
        if !snapshot.slots.is_empty() {
            return Box::new(Error::NoReadyEndpoints {
                service: self.shared.config.service.clone(),
                total: snapshot.slots.len(),
                waited: self.shared.config.wait_for_endpoints,
                last_error: snapshot
                    .slots
                    .iter()
                    .find_map(|slot| slot.readiness_error()),
            });
        }
        Box::new(Error::NoEndpoints {
            service: self.shared.config.service.clone(),
            source: Elapsed(self.shared.config.wait_for_endpoints),
        })
    }

    #[cold]
    fn no_healthy(&self, total: usize) -> BoxError {
        let ejected = self
            .shared
            .detector
            .as_ref()
            .map_or(0, |d| d.ejected.load(Ordering::Relaxed));
        Box::new(Error::NoHealthyEndpoints {
            service: self.shared.config.service.clone(),
            ejected,
            total,
        })
    }
}

/// The current snapshot, reloaded only when the updater has published a new one: the common
/// case is one shared read, with no reference count touched.
#[inline]
fn view<'a, S, K>(
    view: &'a mut Option<(u64, Arc<Snapshot<S, K>>)>,
    clones: &mut Vec<(usize, S)>,
    shared: &Shared<S, K>,
) -> &'a Snapshot<S, K> {
    let generation = shared.updates.load(Ordering::Acquire);
    if view.as_ref().is_none_or(|(seen, _)| *seen != generation) {
        *view = Some((generation, shared.snapshot.load_full()));
        // Kept clones belong to the old snapshot's endpoints: drop them with it.
        clones.clear();
    }
    let (_, snapshot) = view.as_ref().expect("just set");
    snapshot
}

/// A clone of the slot's service: one this handle kept, or a new one.
#[inline]
fn kept_clone<S: Clone, K>(clones: &mut Vec<(usize, S)>, slot: &SlotState<S, K>) -> S {
    if !clones.is_empty() {
        let key = slot_key(slot);
        if let Some(i) = clones.iter().position(|(k, _)| *k == key) {
            return clones.swap_remove(i).1;
        }
    }
    slot.service.clone()
}

/// Identifies a slot of the current view (its address; stable while the view holds it).
fn slot_key<S, K>(slot: &SlotState<S, K>) -> usize {
    std::ptr::from_ref(slot).cast::<()>() as usize
}

#[inline]
fn cost(config: &Config) -> Cost {
    match config.metric {
        LoadMetric::PendingRequests => Cost::Pending,
        LoadMetric::PeakEwma { .. } => Cost::PeakEwma {
            now: Instant::now(),
        },
    }
}

#[inline]
fn rules<S, K>(shared: &Shared<S, K>, panic: Option<bool>) -> Rules<'_> {
    Rules {
        detector: shared.detector.as_deref(),
        config: &shared.config,
        panic,
    }
}

impl<S, K, C, Req> Service<Req> for Balance<S, K, C>
where
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    K: fmt::Debug + Send + Sync + 'static,
    C: Classify<S::Response>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut failures = 0;
        loop {
            if self.chosen.is_none() {
                ready!(self.poll_pick(cx))?;
            }
            match ready!(poll_chosen(self, cx)) {
                Readiness::Ready => return Poll::Ready(Ok(())),
                Readiness::Removed | Readiness::Again => {}
                Readiness::Failed(error) => {
                    failures += 1;
                    if failures >= 2 {
                        return Poll::Ready(Err(error));
                    }
                }
            }
        }
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        let Chosen { claim, mut service } = self
            .chosen
            .take()
            .expect("Balance::call without poll_ready returning Ready(Ok)");
        let future = service.call(request);
        let keep = self.shared.config.keep_clones;
        if keep > 0 {
            if self.clones.len() >= keep {
                self.clones.swap_remove(0);
            }
            self.clones.push((slot_key(claim.state()), service));
        }
        ResponseFuture::new(future, claim.into_completion(), self.classify.clone())
    }
}

/// Drives the chosen endpoint's service to readiness; on a failure or a removal while it is
/// pending, `chosen` is cleared so that the next pick chooses again.
fn poll_chosen<S, K, C, Req>(
    balance: &mut Balance<S, K, C>,
    cx: &mut Context<'_>,
) -> Poll<Readiness>
where
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    K: fmt::Debug + Send + Sync + 'static,
{
    let chosen = balance.chosen.as_mut().expect("an endpoint was picked");
    let slot = chosen.claim.state();
    match chosen.service.poll_ready(cx) {
        Poll::Ready(Ok(())) => {
            if balance.next_publish.is_some() {
                balance.next_publish = None;
            }
            if slot.clear_failed() {
                debug!(service = %balance.shared.config.service, endpoint = ?slot.key, "endpoint ready again");
            }
            Poll::Ready(Readiness::Ready)
        }
        Poll::Ready(Err(error)) => {
            slot.set_failed();
            let error = error.into();
            debug!(service = %balance.shared.config.service, endpoint = ?slot.key, %error, "endpoint not ready; marked failed");
            balance.chosen = None;
            Poll::Ready(Readiness::Failed(error))
        }
        Poll::Pending => {
            // Wait for the endpoint, but also for the next publish: if discovery removes it
            // meanwhile, pick again rather than wait on it for ever.
            let publish = balance.next_publish.get_or_insert_with(|| {
                let shared = Arc::clone(&balance.shared);
                Box::pin(async move { shared.published.notified().await })
            });
            let published = publish.as_mut().poll(cx).is_ready();
            if published {
                balance.next_publish = None;
            }
            // Checked after the publish watch is registered, so none is missed.
            if !slot.is_removed() {
                if published {
                    return Poll::Ready(Readiness::Again);
                }
                return Poll::Pending;
            }
            balance.chosen = None;
            balance.next_publish = None;
            Poll::Ready(Readiness::Removed)
        }
    }
}

impl<S, K, C: Clone> Clone for Balance<S, K, C> {
    /// A new handle on the same balancer; it does not inherit readiness.
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            classify: self.classify.clone(),
            view: None,
            clones: Vec::new(),
            chosen: None,
            waiting: None,
            next_publish: None,
            avoid: Vec::new(),
        }
    }
}

/// A service that says which endpoint its last ready pick chose, and can be told to pass
/// over some while another is usable: how a retry avoids the instances its call tried.
#[cfg(feature = "_connections")]
pub(crate) trait Picks {
    /// The endpoint the last `poll_ready` chose (an opaque id), until `call`.
    fn picked(&self) -> Option<usize>;
    /// Pass over these endpoints while another is usable.
    fn avoid(&mut self, endpoints: &[usize]);
}

#[cfg(feature = "_connections")]
impl<S, K, C> Picks for Balance<S, K, C> {
    fn picked(&self) -> Option<usize> {
        self.chosen
            .as_ref()
            .map(|chosen| slot_key(chosen.claim.state()))
    }

    fn avoid(&mut self, endpoints: &[usize]) {
        self.avoid.clear();
        self.avoid.extend_from_slice(endpoints);
    }
}

impl<S, K, C> fmt::Debug for Balance<S, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("shared", &self.shared)
            .field("ready", &self.chosen.is_some())
            .finish_non_exhaustive()
    }
}
