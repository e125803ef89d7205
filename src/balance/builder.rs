//! [`BalanceBuilder`] and the policies it sets: [`PanicMode`] and [`ZonePreference`].

use std::hash::Hash;
use std::time::Duration;

use tower::discover::Discover;

use super::endpoint::Endpoint;
use super::load::LoadMetric;
use super::outlier::OutlierDetection;
use super::service::Balance;
use super::snapshot::Config;
use crate::error::BoxError;

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
///
/// An endpoint is usable when it is neither ejected by outlier detection nor failing its
/// `poll_ready`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZonePreference {
    /// This client's zone, compared with each endpoint's `zone`.
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
/// use tower_sd::{MemoryRegistry, RegistryDiscover};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = MemoryRegistry::new();
/// let discover = RegistryDiscover::endpoints(&registry, "greeter", |instance| {
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
///     .build_endpoints(discover);
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

    /// A balancer over any tower [`Discover`]; every endpoint has weight 1 and no zone.
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
        Balance::spawn(self.config, discover, Endpoint::new)
    }

    /// A balancer over a [`Discover`] whose services are [`Endpoint`]s, with their weights
    /// and zones (such as [`RegistryDiscover::endpoints`](crate::RegistryDiscover::endpoints)).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the updater task is spawned on the current one.
    pub fn build_endpoints<D, S>(self, discover: D) -> Balance<S, D::Key>
    where
        D: Discover<Service = Endpoint<S>> + Unpin + Send + 'static,
        D::Key: Hash + Eq + Clone + std::fmt::Debug + Send + Sync + 'static,
        S: Send + Sync + 'static,
        D::Error: Into<BoxError> + Send,
    {
        Balance::spawn(self.config, discover, |endpoint| endpoint)
    }
}
