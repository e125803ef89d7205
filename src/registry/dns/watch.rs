//! The DNS watch: resolve, wait out the TTL (within its bounds), resolve again, in the shared
//! watch loop (`registry/watch.rs`).
//!
//! A missing name empties the set only after `empty_after` missing answers in a row
//! (re-checked at the TTL floor), so one lost or wrong answer does not drop every instance.
//! Failures are yielded and retried with backoff; the last set stays.

use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use tracing::debug;

use super::Inner;
use super::lookup::Outcome;
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::watch::{self, Fetched, Source};

/// DNS's side of the shared watch loop.
struct Lookups {
    inner: Arc<Inner>,
    query: ServiceQuery,
    /// Missing answers in a row.
    misses: u32,
    /// Waited before the next lookup: the last answer's TTL, within bounds.
    next: Option<Duration>,
}

pub(super) fn stream(
    inner: Arc<Inner>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let retry = (inner.settings.retry_base, inner.settings.retry_max);
    let source = Lookups {
        inner,
        query: query.clone(),
        misses: 0,
        next: None,
    };
    watch::watch(super::REGISTRY, query, retry, source)
}

impl Source for Lookups {
    async fn fetch(&mut self) -> Fetched {
        if let Some(delay) = self.next.take() {
            tokio::time::sleep(delay).await;
        }
        let resolved = self.inner.resolve(&self.query.name).await;
        match resolved {
            Ok(Outcome::Found { mut instances, ttl }) => {
                self.misses = 0;
                self.next = Some(self.inner.clamp(ttl));
                instances.retain(|instance| self.query.matches(instance));
                Fetched::Set(instances)
            }
            Ok(Outcome::Missing) => {
                self.misses += 1;
                self.next = Some(self.inner.settings.min_ttl);
                if self.misses < self.inner.settings.empty_after {
                    debug!(name = %self.query.name, misses = self.misses, "no records; keeping the last set until it repeats");
                    return Fetched::Nothing;
                }
                Fetched::Set(Vec::new())
            }
            Err(error) => Fetched::Failed(error),
        }
    }
}
