//! What every backend's watch loop shares: when to try next, and whether a set is news.
//!
//! Each loop (Consul's blocking queries, Kubernetes' watcher, etcd's watch, DNS lookups)
//! asks its registry, then either emits a set that differs from the last one it emitted,
//! yields an error and backs off (full jitter, capped, reset by the next success), or waits
//! a delay of its own choosing (a DNS TTL).

use std::time::Duration;

use tokio::time::sleep;
use tracing::warn;

use crate::backoff::Backoff;
use crate::error::{Chain, Error, Result};
use crate::instance::{ServiceInstance, ServiceQuery};

#[derive(Debug)]
pub(crate) struct Pace {
    registry: &'static str,
    last: Option<Vec<ServiceInstance>>,
    backoff: Backoff,
    next: Option<Duration>,
}

impl Pace {
    pub(crate) fn new(registry: &'static str, base: Duration, max: Duration) -> Self {
        Self {
            registry,
            last: None,
            backoff: Backoff::new(base, max),
            next: None,
        }
    }

    /// Waits out the delay the last outcome asked for, if any.
    pub(crate) async fn wait(&mut self) {
        if let Some(delay) = self.next.take() {
            sleep(delay).await;
        }
    }

    /// Waits `delay` before the next attempt.
    #[cfg_attr(not(feature = "dns"), allow(dead_code))]
    pub(crate) fn after(&mut self, delay: Duration) {
        self.next = Some(delay);
    }

    /// The registry answered: the next failure backs off from the start.
    pub(crate) fn succeeded(&mut self) {
        self.backoff.reset();
    }

    /// Waits a backoff delay before the next attempt, without an error to report.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn back_off(&mut self) {
        self.next = Some(self.backoff.next_delay());
    }

    /// Logs a failure and backs off before the next attempt; returns the error to yield.
    pub(crate) fn failed(
        &mut self,
        query: &ServiceQuery,
        error: Error,
    ) -> Result<Vec<ServiceInstance>> {
        let pause = self.backoff.next_delay();
        warn!(
            registry = self.registry,
            service = %query.name,
            error = %Chain(&error),
            ?pause,
            "{} watch failed; retrying",
            self.registry
        );
        self.next = Some(pause);
        Err(error)
    }

    /// `set`, when it differs from the last set emitted (the first set always does).
    pub(crate) fn changed(&mut self, set: Vec<ServiceInstance>) -> Option<Vec<ServiceInstance>> {
        if self.last.as_ref() == Some(&set) {
            return None;
        }
        self.last = Some(set.clone());
        Some(set)
    }
}
