//! [`BalanceBuilder`] and the policies it sets: [`PanicMode`] and [`ZonePreference`].

use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tower::discover::Discover;

use super::config::{Config, PanicMode, ZonePreference};
use super::load::LoadMetric;
use super::outlier::OutlierDetection;
use super::service::Balance;
use crate::endpoint::Endpoint;
use crate::error::BoxError;

/// Configures a [`Balance`].
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use tower::service_fn;
/// use tower_sd::balance::{Balance, LoadMetric};
/// use tower_sd::{MemoryRegistry, RegistryDiscover};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = MemoryRegistry::new();
/// let discover = RegistryDiscover::new(&registry, "greeter", |instance| {
///     let authority = instance.authority();
///     Ok::<_, Infallible>(service_fn(move |()| {
///         let authority = authority.clone();
///         async move { Ok::<_, Infallible>(authority) }
///     }))
/// });
/// let balance = Balance::builder()
///     .service_name("greeter")
///     .load(LoadMetric::peak_ewma())
///     .wait_for_endpoints(Duration::from_secs(1))
///     .build(discover);
/// assert_eq!(balance.service_name(), "greeter");
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct BalanceBuilder {
    config: Config,
}

impl Default for BalanceBuilder {
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

impl BalanceBuilder {
    /// How endpoint load is measured (default [`LoadMetric::PendingRequests`]).
    pub fn load(mut self, metric: LoadMetric) -> Self {
        self.config.metric = metric;
        self
    }

    /// How long a caller waits for an endpoint when there are none (default 5 s); zero fails
    /// at once.
    pub fn wait_for_endpoints(mut self, wait: Duration) -> Self {
        self.config.wait_for_endpoints = wait;
        self
    }

    /// Passive outlier detection (default on, with [`OutlierDetection::default`]); `None`
    /// turns it off.
    pub fn outlier_detection(mut self, detection: Option<OutlierDetection>) -> Self {
        self.config.outlier = detection;
        self
    }

    /// Below this percentage of usable (not ejected) endpoints, the balancer panics (default
    /// 50); see [`PanicMode`].
    pub fn panic_threshold(mut self, percent: u8) -> Self {
        self.config.panic_threshold = percent.min(100);
        self
    }

    /// What a panic does (default [`PanicMode::BalanceAll`]).
    pub fn panic_mode(mut self, mode: PanicMode) -> Self {
        self.config.panic_mode = mode;
        self
    }

    /// Ramp a new endpoint's share of traffic up over `window`, so a cold instance is not
    /// flooded (default off).
    pub fn slow_start(mut self, window: Duration) -> Self {
        self.config.slow_start = (!window.is_zero()).then_some(window);
        self
    }

    /// Prefer endpoints in the local zone (default off).
    pub fn zone_preference(mut self, zone: ZonePreference) -> Self {
        self.config.zone = Some(zone);
        self
    }

    /// Let each handle keep up to `clones` endpoint-service clones for reuse (default 0:
    /// clone per request). Worth it when cloning costs: a tonic `Channel` clone allocates
    /// and touches a counter shared by all callers. Kept clones are dropped when the handle
    /// sees a new snapshot.
    pub fn keep_clones(mut self, clones: usize) -> Self {
        self.config.keep_clones = clones;
        self
    }

    /// The service name for errors and logs (default `unnamed`).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.config.service = name.into();
        self
    }

    /// A balancer over a [`Discover`] of [`Endpoint`]s: each service with its weight, zone
    /// and readiness ([`RegistryDiscover`](crate::RegistryDiscover) makes them from a
    /// registry; [`Endpoints`](crate::endpoint::Endpoints) from any tower `Discover`).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the updater task is spawned on the current one.
    pub fn build<D, S>(self, discover: D) -> Balance<S, D::Key>
    where
        D: Discover<Service = Endpoint<S>> + Unpin + Send + 'static,
        D::Key: Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
        S: Send + Sync + 'static,
        D::Error: Into<BoxError> + Send,
    {
        Balance::spawn(self.config, discover)
    }
}

// ===== constructors of Balance =====

impl Balance<(), ()> {
    /// A [`BalanceBuilder`] for a balancer with non-default settings.
    pub fn builder() -> BalanceBuilder {
        BalanceBuilder::default()
    }
}

impl<S, K> Balance<S, K>
where
    S: Send + Sync + 'static,
    K: Hash + Eq + Clone + fmt::Debug + Send + Sync + 'static,
{
    /// A balancer over a [`Discover`] of [`Endpoint`]s, with default settings (see
    /// [`BalanceBuilder::build`]).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the updater task is spawned on the current one.
    pub fn new<D>(discover: D) -> Self
    where
        D: Discover<Key = K, Service = Endpoint<S>> + Unpin + Send + 'static,
        D::Error: Into<BoxError> + Send,
    {
        BalanceBuilder::default().build(discover)
    }
}
