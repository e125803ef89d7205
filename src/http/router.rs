//! [`Router`]: what both forms of the routing share (a wrapped client,
//! [`Discovery`](super::Discovery), and tower-sd's own connections,
//! [`ConnectionDiscovery`](super::ConnectionDiscovery)): the registry, the settings, and a
//! balancer per service, made on its first request and dropped when idle.

use std::fmt;
use std::sync::Arc;

use http::Uri;

use super::TooManyServices;
use super::balancers::Balancers;
use super::route::{Route, Settings};
use crate::balance::{BalanceBuilder, EndpointStats};
use crate::registry::ServiceRegistry;

/// The routing of one layer (see the module docs); `B` is the balancer of one service.
pub(super) struct Router<B> {
    pub(super) registry: Arc<dyn ServiceRegistry>,
    balance: BalanceBuilder,
    pub(super) settings: Settings,
    balancers: Arc<Balancers<B>>,
}

/// What the router reads of a service's balancer.
pub(super) trait Reported {
    /// Its endpoints, as [`Balance::endpoints`](crate::balance::Balance::endpoints) reports
    /// them.
    fn endpoints(&self) -> Vec<EndpointStats<String>>;
}

impl<B> Router<B> {
    pub(super) fn new(
        registry: Arc<dyn ServiceRegistry>,
        balance: BalanceBuilder,
        settings: Settings,
    ) -> Self {
        Self {
            balancers: Arc::new(Balancers::new(settings.max_services, settings.idle_timeout)),
            registry,
            balance,
            settings,
        }
    }

    /// Where a request goes.
    pub(super) fn route<'a>(&self, uri: &'a Uri) -> Route<'a> {
        self.settings.route(uri)
    }

    /// The balancer settings, named for `service`.
    pub(super) fn balance_for(&self, service: &str) -> BalanceBuilder {
        self.balance.clone().service_name(service)
    }

    /// The endpoints of `service`'s balancer; empty when it has none (yet, or any more).
    pub(super) fn endpoints(&self, service: &str) -> Vec<EndpointStats<String>>
    where
        B: Reported + Clone,
    {
        self.balancers
            .get(&service.to_ascii_lowercase())
            .map(|balance| balance.endpoints())
            .unwrap_or_default()
    }

    /// The services that currently have a balancer, sorted.
    pub(super) fn active_services(&self) -> Vec<String> {
        self.balancers.names()
    }
}

impl<B: Clone + Send + Sync + 'static> Router<B> {
    /// The balancer of `service` (lowercase), made by `make` on first use.
    pub(super) fn balancer(
        &self,
        service: &str,
        make: impl FnOnce() -> B,
    ) -> Result<B, TooManyServices> {
        self.balancers.get_or_make(service, make)
    }
}

impl<B> fmt::Debug for Router<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("settings", &self.settings)
            .field("balancers", &self.balancers.names().len())
            .finish_non_exhaustive()
    }
}
