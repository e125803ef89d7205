//! [`Config`]: a balancer's settings, as every handle and the updater read them, and the
//! setting types of their own: [`PanicMode`] and [`ZonePreference`].

use std::time::Duration;

use super::load::LoadMetric;
use super::outlier::OutlierDetection;

/// Settings every handle and the updater read.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) service: String,
    pub(crate) metric: LoadMetric,
    pub(crate) wait_for_endpoints: Duration,
    pub(crate) outlier: Option<OutlierDetection>,
    pub(crate) panic_threshold: u8,
    pub(crate) panic_mode: PanicMode,
    pub(crate) slow_start: Option<Duration>,
    pub(crate) zone: Option<ZonePreference>,
    /// Service clones each handle keeps for reuse.
    pub(crate) keep_clones: usize,
}

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
