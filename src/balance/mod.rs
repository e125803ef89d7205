//! A lock-free power-of-two-choices balancer that follows discovery in the background.
//!
//! # Algorithm
//!
//! Each request samples two distinct endpoints uniformly at random and sends to the less
//! loaded one ("power of two choices", Mitzenmacher 2001; Finagle's and tower's P2C). Load is
//! requests in flight by default, or a peak-EWMA of latency times requests in flight
//! ([`LoadMetric`]); either is divided by the endpoint's weight. The cost of a pick does not
//! depend on the number of endpoints.
//!
//! # Why not tower's `p2c::Balance`
//!
//! tower's balancer takes `&mut self`, so sharing it needs a `Buffer`: one task does all the
//! work, every request hops through a channel, discovery is only applied when requests arrive
//! (tower #824), and an empty set makes callers wait forever. Here:
//!
//! - one **updater task** per balancer owns the [`Discover`] stream, drains every ready change,
//!   and publishes an immutable snapshot through `ArcSwap` once per batch, whether or not
//!   requests arrive; endpoints that stay keep their slot and counters;
//! - every **clone** of [`Balance`] picks from the current snapshot on its own thread with no
//!   lock and no channel; per-endpoint counters are atomics that share a cache line only with
//!   that endpoint's own reference count;
//! - an **empty set** makes callers wait at most `wait_for_endpoints`, then fail with
//!   [`Error::NoEndpoints`](crate::Error::NoEndpoints).
//!
//! The updater ends when discovery ends (the last endpoints stay in use) or when the last
//! handle is dropped.
//!
//! [`Discover`]: tower::discover::Discover

mod classify;
mod endpoint;
mod future;
mod load;
#[cfg(feature = "metrics")]
mod metrics;
mod outlier;
mod p2c;
mod service;
mod snapshot;

#[cfg(any(feature = "http", feature = "tonic"))]
pub use classify::HttpStatus;
pub use classify::{Classify, ErrorsOnly};
pub use endpoint::{EndpointState, EndpointStats};
pub use future::ResponseFuture;
pub use load::LoadMetric;
pub use outlier::OutlierDetection;
pub use service::Balance;

use std::hash::Hash;
use std::time::Duration;

use tower::discover::Discover;

use crate::discover::RegistryDiscover;
use crate::error::BoxError;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::ServiceRegistry;
use endpoint::Meta;
use snapshot::Config;

/// What happens when fewer endpoints than the panic threshold are usable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PanicMode {
    /// Ignore ejections and balance across every endpoint (Envoy's panic mode; the default).
    #[default]
    BalanceAll,
    /// Fail requests with [`Error::NoHealthyEndpoints`](crate::Error::NoHealthyEndpoints).
    Fail,
}

/// Prefer endpoints in the local zone while it has enough usable ones.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZonePreference {
    /// This client's zone, compared with each instance's `zone`.
    pub local: String,
    /// The local zone is used while it has at least this many usable endpoints (default 2).
    pub min_endpoints: usize,
    /// ... and at least this percentage of all endpoints (default 0).
    pub min_share_percent: u8,
}

impl ZonePreference {
    /// Prefer `local`, with at least 2 usable endpoints there.
    pub fn new(local: impl Into<String>) -> Self {
        Self {
            local: local.into(),
            min_endpoints: 2,
            min_share_percent: 0,
        }
    }

    /// Sets [`min_endpoints`](Self::min_endpoints) (at least 1).
    #[must_use]
    pub fn min_endpoints(mut self, endpoints: usize) -> Self {
        self.min_endpoints = endpoints.max(1);
        self
    }

    /// Sets [`min_share_percent`](Self::min_share_percent).
    #[must_use]
    pub fn min_share_percent(mut self, percent: u8) -> Self {
        self.min_share_percent = percent.min(100);
        self
    }
}

/// Configures a [`Balance`].
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use tower::service_fn;
/// use tower_sd::balance::{Balance, LoadMetric};
/// use tower_sd::MemoryRegistry;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = MemoryRegistry::new();
/// let balance = Balance::builder()
///     .load(LoadMetric::peak_ewma())
///     .wait_for_endpoints(Duration::from_secs(1))
///     .from_registry(&registry, "greeter", |instance| {
///         let authority = instance.authority();
///         Ok::<_, Infallible>(service_fn(move |()| {
///             let authority = authority.clone();
///             async move { Ok::<_, Infallible>(authority) }
///         }))
///     });
/// assert_eq!(balance.service_name(), "greeter");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Builder {
    config: Config,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            config: Config {
                service: "unnamed".to_owned(),
                metric: LoadMetric::default(),
                wait_for_endpoints: Duration::from_secs(5),
                outlier: Some(OutlierDetection::default()),
                panic_threshold: 50,
                panic_mode: PanicMode::default(),
                slow_start: None,
                zone: None,
                keep_clones: 0,
            },
        }
    }
}

impl Builder {
    /// How endpoint load is measured (default [`LoadMetric::PendingRequests`]).
    #[must_use]
    pub fn load(mut self, metric: LoadMetric) -> Self {
        self.config.metric = metric;
        self
    }

    /// How long a caller waits for an endpoint when there are none (default 5 s); zero fails
    /// at once.
    #[must_use]
    pub fn wait_for_endpoints(mut self, wait: Duration) -> Self {
        self.config.wait_for_endpoints = wait;
        self
    }

    /// Passive outlier detection (default on, with [`OutlierDetection::default`]); `None`
    /// turns it off.
    #[must_use]
    pub fn outlier_detection(mut self, detection: Option<OutlierDetection>) -> Self {
        self.config.outlier = detection;
        self
    }

    /// Below this percentage of usable (not ejected) endpoints, the balancer panics (default
    /// 50); see [`PanicMode`].
    #[must_use]
    pub fn panic_threshold(mut self, percent: u8) -> Self {
        self.config.panic_threshold = percent.min(100);
        self
    }

    /// What a panic does (default [`PanicMode::BalanceAll`]).
    #[must_use]
    pub fn panic_mode(mut self, mode: PanicMode) -> Self {
        self.config.panic_mode = mode;
        self
    }

    /// Ramp a new endpoint's share of traffic up over `window`, so a cold instance is not
    /// flooded (default off).
    #[must_use]
    pub fn slow_start(mut self, window: Duration) -> Self {
        self.config.slow_start = (!window.is_zero()).then_some(window);
        self
    }

    /// Prefer endpoints in the local zone (default off).
    #[must_use]
    pub fn zone_preference(mut self, zone: ZonePreference) -> Self {
        self.config.zone = Some(zone);
        self
    }

    /// Let each handle keep up to `clones` endpoint-service clones for reuse (default 0:
    /// clone per request). Worth it when cloning costs: a tonic `Channel` clone allocates
    /// and touches a counter shared by all callers, so `LoadBalancedChannel` keeps 16. Kept
    /// clones are dropped when the handle sees a new snapshot.
    #[must_use]
    pub fn keep_clones(mut self, clones: usize) -> Self {
        self.config.keep_clones = clones;
        self
    }

    /// The service name for errors and logs (set for you by
    /// [`from_registry`](Self::from_registry)).
    #[must_use]
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.config.service = name.into();
        self
    }

    /// A balancer over any tower [`Discover`]; every endpoint has weight 1.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the updater task is spawned on the current one.
    pub fn build<D>(self, discover: D) -> Balance<D::Service, D::Key>
    where
        D: Discover + Unpin + Send + 'static,
        D::Key: Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
        D::Service: Send + Sync + 'static,
        D::Error: Into<BoxError> + Send,
    {
        Balance::spawn(self.config, discover, |service| (service, Meta::default()))
    }

    /// A balancer over the healthy instances of `query` in `registry`, with their weights and
    /// zones; `make` builds the service for one instance (see [`RegistryDiscover`]).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the updater task is spawned on the current one.
    pub fn from_registry<R, S, E, F>(
        mut self,
        registry: &R,
        query: impl Into<ServiceQuery>,
        make: F,
    ) -> Balance<S, String>
    where
        R: ServiceRegistry + ?Sized,
        S: Send + Sync + 'static,
        E: Into<BoxError>,
        F: Fn(&ServiceInstance) -> Result<S, E> + Send + 'static,
    {
        let query = query.into();
        if self.config.service == Builder::default().config.service {
            self.config.service = query.name.clone();
        }
        let discover = RegistryDiscover::new(registry, query, move |instance: &ServiceInstance| {
            let meta = Meta {
                weight: instance.weight,
                zone: instance.zone.clone(),
            };
            make(instance).map(|service| (service, meta))
        });
        Balance::spawn(self.config, discover, |endpoint| endpoint)
    }
}

impl Balance<(), ()> {
    /// A [`Builder`] for a balancer with non-default settings.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl<S: Send + Sync + 'static> Balance<S, String> {
    /// A balancer over the healthy instances of `query` in `registry`, with default settings;
    /// see [`Builder::from_registry`].
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the updater task is spawned on the current one.
    pub fn from_registry<R, E, F>(registry: &R, query: impl Into<ServiceQuery>, make: F) -> Self
    where
        R: ServiceRegistry + ?Sized,
        E: Into<BoxError>,
        F: Fn(&ServiceInstance) -> Result<S, E> + Send + 'static,
    {
        Builder::default().from_registry(registry, query, make)
    }
}
