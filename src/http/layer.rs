//! [`DiscoveryLayer`]: the layer, and every setting of the routing it makes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::discovery::Discovery;
use super::route::{HostHeader, Settings, UnknownHosts};
use super::router::Router;
use crate::balance::{self, Balance, LoadMetric, OutlierDetection};
use crate::registry::{IntoRegistry, ServiceRegistry};

/// A tower [`Layer`] that routes requests for service names through per-service balancers.
#[derive(Clone)]
#[must_use]
pub struct DiscoveryLayer {
    pub(super) registry: Arc<dyn ServiceRegistry>,
    pub(super) balance: balance::BalanceBuilder,
    pub(super) settings: Settings,
}

impl DiscoveryLayer {
    /// Routes service names found in `registry`. Without [`services`](Self::services), any
    /// host that is a single DNS label other than `localhost` (no dot, not an IP address)
    /// counts as a service name.
    pub fn new(registry: impl IntoRegistry) -> Self {
        Self {
            registry: registry.into_registry(),
            balance: Balance::builder(),
            settings: Settings::default(),
        }
    }

    /// Only these hosts are service names (compared case-insensitively).
    pub fn services<I: IntoIterator<Item = impl Into<String>>>(mut self, names: I) -> Self {
        let names = names.into_iter().map(|n| n.into().to_ascii_lowercase());
        self.settings.services = Some(Arc::new(names.collect()));
        self
    }

    /// The `Host` header policy (default [`HostHeader::Logical`]).
    pub fn host_header(mut self, policy: HostHeader) -> Self {
        self.settings.host_header = policy;
        self
    }

    /// What to do with hosts that are not service names (default pass through).
    pub fn unknown_hosts(mut self, policy: UnknownHosts) -> Self {
        self.settings.unknown_hosts = policy;
        self
    }

    /// Drop a service's balancer after this long without requests (default 5 minutes); a
    /// background sweep does it every half of this.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.idle_timeout = timeout;
        self
    }

    /// At most this many services have a balancer at once (default 256); a request for
    /// another one fails with [`TooManyServices`](super::TooManyServices) instead of starting one more watch.
    pub fn max_services(mut self, services: usize) -> Self {
        self.settings.max_services = services.max(1);
        self
    }

    /// How endpoint load is measured.
    pub fn load(mut self, metric: LoadMetric) -> Self {
        self.balance = self.balance.load(metric);
        self
    }

    /// Passive outlier detection (default on); HTTP 5xx, gRPC `UNAVAILABLE`,
    /// `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL` and transport errors count as
    /// failures, requests the server provably did not process do not.
    pub fn outlier_detection(mut self, detection: Option<OutlierDetection>) -> Self {
        self.balance = self.balance.outlier_detection(detection);
        self
    }

    /// Any other balancer setting (panic threshold, slow start, zone preference).
    pub fn balancer(
        mut self,
        configure: impl FnOnce(balance::BalanceBuilder) -> balance::BalanceBuilder,
    ) -> Self {
        self.balance = configure(self.balance);
        self
    }

    /// How long a request waits for an instance when there are none.
    pub fn wait_for_endpoints(mut self, wait: Duration) -> Self {
        self.balance = self.balance.wait_for_endpoints(wait);
        self
    }
}

impl fmt::Debug for DiscoveryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryLayer")
            .field("registry", &self.registry)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl DiscoveryLayer {
    /// The router of the services this layer makes, with balancers of type `B`.
    pub(super) fn router<B>(&self) -> Arc<Router<B>> {
        Arc::new(Router::new(
            Arc::clone(&self.registry),
            self.balance.clone(),
            self.settings.clone(),
        ))
    }
}

impl<S> Layer<S> for DiscoveryLayer {
    type Service = Discovery<S>;

    fn layer(&self, inner: S) -> Discovery<S> {
        Discovery::new(inner, self.router())
    }
}
