//! [`Balance`]: the cloneable, lock-free P2C balancer service.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::Service;
use tower::discover::Discover;
use tracing::debug;

use super::Builder;
use super::PanicMode;
use super::classify::{Classify, ErrorsOnly};
use super::endpoint::{Endpoint, EndpointStats, Meta};
use super::future::{InFlight, ResponseFuture};
use super::load::LoadMetric;
use super::p2c::{Candidates, Cost, Pick, Rules, pick};
use super::snapshot::{Config, Shared, Snapshot, run};
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
/// use tower_sd::{MemoryRegistry, ServiceInstance, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let registry = MemoryRegistry::new();
/// registry.register(ServiceInstance::new("a", "echo", "127.0.0.1", 8080)).await?;
///
/// let mut balance = Balance::from_registry(&registry, "echo", |instance| {
///     let authority = instance.authority();
///     Ok::<_, Infallible>(service_fn(move |request: String| {
///         let reply = format!("{authority} got {request}");
///         async move { Ok::<_, Infallible>(reply) }
///     }))
/// });
/// let reply = balance.ready().await?.call("hello".to_owned()).await?;
/// assert_eq!(reply, "127.0.0.1:8080 got hello");
/// # Ok(())
/// # }
/// ```
pub struct Balance<S, K = String, C = ErrorsOnly> {
    shared: Arc<Shared<S, K>>,
    /// Classifies outcomes for outlier detection; cloned into each response future.
    classify: C,
    /// The snapshot this handle last picked from, with its generation.
    view: Option<(u64, Arc<Snapshot<S, K>>)>,
    /// Clones of endpoint services kept for reuse (see `Builder::keep_clones`), keyed by
    /// endpoint; cleared with the view.
    clones: Vec<(usize, S)>,
    chosen: Option<Chosen<S, K>>,
    /// While the set is empty: resolves when endpoints arrive (`true`) or the wait times out.
    waiting: Option<Pin<Box<dyn Future<Output = bool> + Send + Sync>>>,
    /// While the chosen endpoint is pending: resolves at the next publish.
    next_publish: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

/// The endpoint picked by `poll_ready`, and the clone of its service that `call` uses.
struct Chosen<S, K> {
    endpoint: Arc<Endpoint<S, K>>,
    service: S,
}

// ===== impl Balance =====

impl<S, K> Balance<S, K>
where
    S: Send + Sync + 'static,
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
{
    /// A balancer over any tower [`Discover`], with default settings.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the updater task is spawned on the current one.
    pub fn new<D>(discover: D) -> Self
    where
        D: Discover<Key = K, Service = S> + Unpin + Send + 'static,
        D::Error: Into<BoxError> + Send,
    {
        Builder::default().build(discover)
    }

    pub(crate) fn spawn<D, F>(config: Config, discover: D, split: F) -> Self
    where
        D: Discover<Key = K> + Unpin + Send + 'static,
        D::Service: Send,
        D::Error: Into<BoxError> + Send,
        F: Fn(D::Service) -> (S, Meta) + Send + 'static,
    {
        let (shared, gone) = Shared::new(config);
        let shared = Arc::new(shared);
        tokio::spawn(run(discover, split, Arc::downgrade(&shared), gone));
        Self {
            shared,
            classify: ErrorsOnly,
            view: None,
            clones: Vec::new(),
            chosen: None,
            waiting: None,
            next_publish: None,
        }
    }
}

impl<S, K, C> Balance<S, K, C> {
    /// This balancer with another failure classifier for outlier detection (the default,
    /// [`ErrorsOnly`], counts errors only).
    pub fn with_classifier<C2>(self, classify: C2) -> Balance<S, K, C2> {
        Balance {
            shared: self.shared,
            classify,
            view: self.view,
            clones: self.clones,
            chosen: self.chosen,
            waiting: self.waiting,
            next_publish: self.next_publish,
        }
    }

    /// Per-endpoint statistics of the current snapshot, in slot order. Endpoints that were
    /// removed and are still draining are not included.
    pub fn endpoints(&self) -> Vec<EndpointStats<K>>
    where
        K: Clone,
    {
        let now = Instant::now();
        self.shared
            .snapshot
            .load()
            .endpoints
            .iter()
            .map(|endpoint| EndpointStats {
                key: endpoint.key.clone(),
                in_flight: endpoint.in_flight(),
                ewma: endpoint
                    .ewma
                    .as_ref()
                    .map(|load| std::time::Duration::from_nanos(load.estimate(now) as u64)),
                weight: u32::try_from(endpoint.weight).unwrap_or(u32::MAX),
                zone: endpoint.zone.clone(),
                state: endpoint.state(),
                ejected_for: self
                    .shared
                    .detector
                    .as_ref()
                    .and_then(|detector| endpoint.health.ejected_for(detector)),
            })
            .collect()
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

    /// How many endpoint snapshots the updater has published.
    pub fn updates(&self) -> u64 {
        self.shared.updates.load(Ordering::Acquire)
    }

    /// The service name used in errors and logs.
    pub fn service_name(&self) -> &str {
        &self.shared.config.service
    }

    fn cost(&self) -> Cost {
        match self.shared.config.metric {
            LoadMetric::PendingRequests => Cost::Pending,
            LoadMetric::PeakEwma { .. } => Cost::PeakEwma {
                now: Instant::now(),
            },
        }
    }

    fn no_endpoints(&self) -> BoxError {
        Box::new(Error::NoEndpoints {
            service: self.shared.config.service.clone(),
            source: Elapsed(self.shared.config.wait_for_endpoints),
        })
    }

    /// Starts (or keeps) waiting for a non-empty snapshot; `false` when the wait timed out.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<bool>
    where
        S: Send + Sync + 'static,
        K: Send + Sync + 'static,
    {
        let wait = self.waiting.get_or_insert_with(|| {
            let shared = Arc::clone(&self.shared);
            let limit = shared.config.wait_for_endpoints;
            Box::pin(async move {
                tokio::time::timeout(limit, shared.endpoints_available())
                    .await
                    .is_ok()
            })
        });
        let arrived = std::task::ready!(wait.as_mut().poll(cx));
        self.waiting = None;
        Poll::Ready(arrived)
    }
}

/// The current snapshot, reloaded only when the updater has published a new one: the common
/// case is one shared read, with no reference count touched.
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

/// Identifies an endpoint of the current view (its address; stable while the view holds it).
fn endpoint_key<S, K>(endpoint: &Arc<Endpoint<S, K>>) -> usize {
    Arc::as_ptr(endpoint).cast::<()>() as usize
}

/// The local zone's endpoints while it has enough usable ones, else all.
fn zone_candidates<'a, S, K>(
    snapshot: &'a Snapshot<S, K>,
    shared: &Shared<S, K>,
) -> Candidates<'a> {
    let Some(zone) = &shared.config.zone else {
        return Candidates::All;
    };
    let local = &snapshot.local;
    let some_ejected = shared
        .detector
        .as_ref()
        .is_some_and(|detector| detector.ejected.load(Ordering::Relaxed) > 0);
    let usable = if some_ejected {
        let endpoints = &snapshot.endpoints;
        local
            .iter()
            .filter(|&&i| !endpoints[i].health.is_ejected() && !endpoints[i].is_failed())
            .count()
    } else {
        local.len()
    };
    let share = (snapshot.endpoints.len() * usize::from(zone.min_share_percent)).div_ceil(100);
    if usable >= zone.min_endpoints.max(share).max(1) {
        Candidates::Only(local)
    } else {
        Candidates::All
    }
}

impl<S, K, C, Req> Service<Req> for Balance<S, K, C>
where
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    K: fmt::Debug + Send + Sync + 'static,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S, K, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut failures = 0;
        loop {
            let chosen = match &mut self.chosen {
                Some(chosen) => chosen,
                None => {
                    let cost = self.cost();
                    let shared = &*self.shared;
                    let snapshot = view(&mut self.view, &mut self.clones, shared);
                    let rules = Rules {
                        detector: shared.detector.as_deref(),
                        panic_threshold: shared.config.panic_threshold,
                        fail_in_panic: shared.config.panic_mode == PanicMode::Fail,
                        slow_start: shared
                            .config
                            .slow_start
                            .map(|window| (window, Instant::now())),
                    };
                    let candidates = zone_candidates(snapshot, shared);
                    let index = match pick(&snapshot.endpoints, candidates, cost, &rules) {
                        Pick::Endpoint(index) => index,
                        Pick::Panic => {
                            let total = snapshot.endpoints.len();
                            let ejected = shared
                                .detector
                                .as_ref()
                                .map_or(0, |d| d.ejected.load(Ordering::Relaxed));
                            return Poll::Ready(Err(Box::new(Error::NoHealthyEndpoints {
                                service: shared.config.service.clone(),
                                ejected,
                                total,
                            })));
                        }
                        Pick::Empty => {
                            if self.shared.config.wait_for_endpoints.is_zero()
                                || !std::task::ready!(self.poll_wait(cx))
                            {
                                return Poll::Ready(Err(self.no_endpoints()));
                            }
                            continue;
                        }
                    };
                    let endpoint = &snapshot.endpoints[index];
                    let kept = if self.clones.is_empty() {
                        None
                    } else {
                        let key = endpoint_key(endpoint);
                        let found = self.clones.iter().position(|(k, _)| *k == key);
                        found.map(|i| self.clones.swap_remove(i).1)
                    };
                    let service = kept.unwrap_or_else(|| endpoint.service.clone());
                    let chosen = Chosen {
                        endpoint: Arc::clone(endpoint),
                        service,
                    };
                    self.waiting = None;
                    self.chosen.insert(chosen)
                }
            };
            match chosen.service.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.next_publish = None;
                    if chosen.endpoint.is_failed() {
                        chosen.endpoint.failed.store(false, Ordering::Relaxed);
                        debug!(service = %self.shared.config.service, endpoint = ?chosen.endpoint.key, "endpoint ready again");
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => {
                    // Wait for the endpoint, but also for the next publish: if discovery
                    // removes it meanwhile, pick again rather than wait on it for ever.
                    let removed = Arc::clone(&chosen.endpoint);
                    let publish = self.next_publish.get_or_insert_with(|| {
                        let shared = Arc::clone(&self.shared);
                        Box::pin(async move { shared.published.notified().await })
                    });
                    let published = publish.as_mut().poll(cx).is_ready();
                    if published {
                        self.next_publish = None;
                    }
                    // Checked after the publish watch is registered, so none is missed.
                    if !removed.is_removed() {
                        if published {
                            continue;
                        }
                        return Poll::Pending;
                    }
                    self.chosen = None;
                    self.next_publish = None;
                }
                Poll::Ready(Err(error)) => {
                    chosen.endpoint.failed.store(true, Ordering::Relaxed);
                    self.chosen = None;
                    failures += 1;
                    let error = error.into();
                    debug!(service = %self.shared.config.service, %error, "endpoint not ready; marked failed");
                    if failures >= 2 {
                        return Poll::Ready(Err(error));
                    }
                }
            }
        }
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        let Chosen {
            endpoint,
            mut service,
        } = self
            .chosen
            .take()
            .expect("Balance::call without poll_ready returning Ready(Ok)");
        let future = service.call(request);
        let keep = self.shared.config.keep_clones;
        if keep > 0 {
            if self.clones.len() >= keep {
                self.clones.swap_remove(0);
            }
            self.clones.push((endpoint_key(&endpoint), service));
        }
        let in_flight = InFlight::start(endpoint);
        ResponseFuture::new(future, in_flight, self.classify.clone())
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
        }
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
