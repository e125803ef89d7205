//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! Every metric tower-sd records is named in [`NAMES`] and recorded by a function of this
//! module; without the feature, each function is empty and compiles to nothing, so no call
//! site needs a `cfg`. Every metric has a `service` label; the registries' also have
//! `registry` (the backend's kind).
//!
//! The metrics and what they mean are listed in the crate docs (`lib.rs`, "Metrics"),
//! which a test checks against [`NAMES`].

#[cfg(feature = "metrics")]
use metrics::{Counter, counter, gauge};

/// Every metric name, with its kind: what the crate docs' table is checked against.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const NAMES: [(&str, &str); 22] = [
    ("tower_sd_endpoints", "gauge"),
    ("tower_sd_requests_total", "counter"),
    ("tower_sd_ejections_total", "counter"),
    ("tower_sd_returns_total", "counter"),
    ("tower_sd_panic_picks_total", "counter"),
    ("tower_sd_tier_share_percent", "gauge"),
    ("tower_sd_updates_total", "counter"),
    ("tower_sd_last_update_seconds", "gauge"),
    ("tower_sd_transparent_retries_total", "counter"),
    ("tower_sd_retries_total", "counter"),
    ("tower_sd_retries_throttled_total", "counter"),
    ("tower_sd_call_attempts", "histogram"),
    ("tower_sd_hedges_total", "counter"),
    ("tower_sd_hedges_won_total", "counter"),
    ("tower_sd_health_changes_total", "counter"),
    ("tower_sd_stream_waits_total", "counter"),
    ("tower_sd_stream_wait_timeouts_total", "counter"),
    ("tower_sd_registry_errors_total", "counter"),
    ("tower_sd_registry_last_answer_seconds", "gauge"),
    ("tower_sd_cache_serving", "gauge"),
    ("tower_sd_cache_age_seconds", "gauge"),
    ("tower_sd_fallback_active", "gauge"),
];

#[cfg(feature = "metrics")]
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Increments the counter `name` of `service`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[inline]
fn count(name: &'static str, service: &str) {
    #[cfg(feature = "metrics")]
    counter!(name, "service" => service.to_owned()).increment(1);
}

// ===== the balancer =====

/// An endpoint was ejected by outlier detection.
pub(crate) fn ejected(service: &str) {
    count("tower_sd_ejections_total", service);
}

/// An ejected endpoint returned after a successful probe.
pub(crate) fn returned(service: &str) {
    count("tower_sd_returns_total", service);
}

/// A pick was made in panic mode.
pub(crate) fn panic_pick(service: &str) {
    count("tower_sd_panic_picks_total", service);
}

/// The tier of `priority` now takes `percent` of the picks.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn tier_share(service: &str, priority: u16, percent: u8) {
    #[cfg(feature = "metrics")]
    gauge!("tower_sd_tier_share_percent", "service" => service.to_owned(), "priority" => priority.to_string())
        .set(f64::from(percent));
}

/// A snapshot was published, with `ready` endpoints of which `ejected` are ejected.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn published(service: &str, ready: usize, ejected: usize) {
    #[cfg(feature = "metrics")]
    {
        count("tower_sd_updates_total", service);
        let state = |state: &'static str| gauge!("tower_sd_endpoints", "service" => service.to_owned(), "state" => state);
        state("ready").set(ready.saturating_sub(ejected) as f64);
        state("ejected").set(ejected as f64);
        gauge!("tower_sd_last_update_seconds", "service" => service.to_owned()).set(unix_now());
    }
}

/// The request counters of one service, registered once so that counting a request costs
/// no allocation.
#[derive(Debug)]
pub(crate) struct Requests {
    #[cfg(feature = "metrics")]
    success: Counter,
    #[cfg(feature = "metrics")]
    failure: Counter,
}

impl Requests {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(service: &str) -> Self {
        #[cfg(feature = "metrics")]
        let counter = |outcome: &'static str| counter!("tower_sd_requests_total", "service" => service.to_owned(), "outcome" => outcome);
        Self {
            #[cfg(feature = "metrics")]
            success: counter("success"),
            #[cfg(feature = "metrics")]
            failure: counter("failure"),
        }
    }

    /// A request completed, as classified.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(crate) fn record(&self, failure: bool) {
        #[cfg(feature = "metrics")]
        if failure {
            self.failure.increment(1);
        } else {
            self.success.increment(1);
        }
    }
}

// ===== the connections =====

/// A request the server did not process is sent again.
#[cfg(feature = "_connections")]
pub(crate) fn transparent_retry(service: &str) {
    count("tower_sd_transparent_retries_total", service);
}

/// A call's retry policy sends it again after an answer with status `code`.
#[cfg(feature = "_connections")]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn policy_retry(service: &str, code: u32) {
    #[cfg(feature = "metrics")]
    counter!("tower_sd_retries_total", "service" => service.to_owned(), "code" => code.to_string())
        .increment(1);
}

/// The retry throttle refused a retry.
#[cfg(feature = "_connections")]
pub(crate) fn retry_throttled(service: &str) {
    count("tower_sd_retries_throttled_total", service);
}

/// A hedged call sent one more attempt.
#[cfg(feature = "tonic")]
pub(crate) fn hedge_sent(service: &str) {
    count("tower_sd_hedges_total", service);
}

/// A hedged call's answer came from an attempt after its first.
#[cfg(feature = "tonic")]
pub(crate) fn hedge_won(service: &str) {
    count("tower_sd_hedges_won_total", service);
}

/// A call with a retry policy ended after `attempts` attempts.
#[cfg(feature = "_connections")]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn call_attempts(service: &str, attempts: u32) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("tower_sd_call_attempts", "service" => service.to_owned())
        .record(f64::from(attempts));
}

/// An instance's health check found it `serving`, `not_serving`, or `unimplemented`
/// (checking stopped).
#[cfg(any(feature = "tonic", feature = "http"))]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn health(service: &str, status: &'static str) {
    #[cfg(feature = "metrics")]
    counter!("tower_sd_health_changes_total", "service" => service.to_owned(), "status" => status)
        .increment(1);
}

/// A request waits for a stream: every connection to its instance is full.
#[cfg(feature = "_connections")]
pub(crate) fn stream_wait(service: &str) {
    count("tower_sd_stream_waits_total", service);
}

/// A request waited out the stream wait.
#[cfg(feature = "_connections")]
pub(crate) fn stream_wait_timeout(service: &str) {
    count("tower_sd_stream_wait_timeouts_total", service);
}

// ===== the registries =====

/// The registries' watch loop (`registry/watch.rs`).
#[cfg(any(
    feature = "consul",
    feature = "kubernetes",
    feature = "etcd",
    feature = "dns"
))]
pub(crate) mod registry {
    #[cfg(feature = "metrics")]
    use super::unix_now;
    #[cfg(feature = "metrics")]
    use metrics::{counter, gauge};

    /// A registry's watch failed with `kind` (an [`Error`](crate::Error)'s kind name).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn failed(registry: &'static str, service: &str, kind: &'static str) {
        #[cfg(feature = "metrics")]
        counter!(
            "tower_sd_registry_errors_total",
            "registry" => registry,
            "service" => service.to_owned(),
            "kind" => kind,
        )
        .increment(1);
    }

    /// A registry answered.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn answered(registry: &'static str, service: &str) {
        #[cfg(feature = "metrics")]
        gauge!(
            "tower_sd_registry_last_answer_seconds",
            "registry" => registry,
            "service" => service.to_owned(),
        )
        .set(unix_now());
    }
}

/// A cached set is served for `service` because the registry failed (`Some` of its age),
/// or the registry answers (`None`).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn cache_serving(
    registry: &'static str,
    service: &str,
    age: Option<std::time::Duration>,
) {
    #[cfg(feature = "metrics")]
    {
        let labels = || {
            [
                ("registry", registry.to_owned()),
                ("service", service.to_owned()),
            ]
        };
        gauge!("tower_sd_cache_serving", &labels()).set(if age.is_some() { 1.0 } else { 0.0 });
        gauge!("tower_sd_cache_age_seconds", &labels()).set(age.unwrap_or_default().as_secs_f64());
    }
}

/// A fallback chain follows the registry of kind `registry`, at `position` (0: the
/// primary).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn fallback_active(service: &str, registry: &'static str, position: usize) {
    #[cfg(feature = "metrics")]
    gauge!(
        "tower_sd_fallback_active",
        "service" => service.to_owned(),
        "registry" => registry,
    )
    .set(position as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches a metric the docs do not list, or one they list that is gone: the crate docs'
    /// names are exactly [`NAMES`], and so are the ones this module records.
    #[test]
    fn the_crate_docs_list_every_metric() {
        let names: std::collections::BTreeSet<&str> = NAMES.iter().map(|(name, _)| *name).collect();
        for (what, text) in [
            ("src/lib.rs", include_str!("lib.rs")),
            ("src/metrics.rs", include_str!("metrics.rs")),
        ] {
            let listed: std::collections::BTreeSet<&str> = text
                .match_indices("tower_sd_")
                .map(|(at, _)| {
                    let rest = &text[at..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                        .unwrap_or(rest.len());
                    &rest[..end]
                })
                .filter(|name| name.len() > "tower_sd_".len())
                .collect();
            assert_eq!(listed, names, "the metrics {what} names");
        }
    }
}
