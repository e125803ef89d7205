//! Balancer metrics through the [`metrics`] facade (feature `metrics`).
//!
//! Every metric carries a `service` label:
//!
//! | name | kind | meaning |
//! | --- | --- | --- |
//! | `tower_sd_endpoints` | gauge, label `state` (`ready`, `ejected`) | endpoints in the current snapshot |
//! | `tower_sd_requests_total` | counter, label `outcome` (`success`, `failure`) | completed requests, as classified |
//! | `tower_sd_ejections_total` | counter | endpoints ejected by outlier detection |
//! | `tower_sd_returns_total` | counter | ejected endpoints returned by a successful probe |
//! | `tower_sd_panic_picks_total` | counter | picks made in panic mode |
//! | `tower_sd_updates_total` | counter | endpoint snapshots published |
//! | `tower_sd_last_update_seconds` | gauge | Unix time of the last published snapshot |
//!
//! The last one lets a dashboard show the time since the registry last changed the set.

use metrics::{counter, gauge};

pub(crate) fn ejected(service: &str) {
    counter!("tower_sd_ejections_total", "service" => service.to_owned()).increment(1);
}

pub(crate) fn returned(service: &str) {
    counter!("tower_sd_returns_total", "service" => service.to_owned()).increment(1);
}

pub(crate) fn panic_pick(service: &str) {
    counter!("tower_sd_panic_picks_total", "service" => service.to_owned()).increment(1);
}

/// The request counters of one service, registered once so counting costs no allocation.
#[derive(Debug)]
pub(crate) struct Requests {
    success: metrics::Counter,
    failure: metrics::Counter,
}

impl Requests {
    pub(crate) fn new(service: &str) -> Self {
        let counter = |outcome: &'static str| counter!("tower_sd_requests_total", "service" => service.to_owned(), "outcome" => outcome);
        Self {
            success: counter("success"),
            failure: counter("failure"),
        }
    }

    pub(crate) fn record(&self, failure: bool) {
        if failure {
            self.failure.increment(1);
        } else {
            self.success.increment(1);
        }
    }
}

pub(crate) fn published(service: &str, ready: usize, ejected: usize) {
    counter!("tower_sd_updates_total", "service" => service.to_owned()).increment(1);
    gauge!("tower_sd_endpoints", "service" => service.to_owned(), "state" => "ready")
        .set(ready.saturating_sub(ejected) as f64);
    gauge!("tower_sd_endpoints", "service" => service.to_owned(), "state" => "ejected")
        .set(ejected as f64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    gauge!("tower_sd_last_update_seconds", "service" => service.to_owned()).set(now.as_secs_f64());
}
