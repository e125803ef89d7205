//! The DNS watch: resolve, wait out the TTL (within its bounds), resolve again.
//!
//! A set is emitted when it differs from the last one. A missing name empties the set only
//! after `empty_after` missing answers in a row (re-checked at the TTL floor), so one lost
//! or wrong answer does not drop every instance. Failures are yielded and retried with
//! backoff; the last set stays.

use std::sync::Arc;

use futures_core::Stream;
use futures_util::stream;
use tracing::debug;

use super::Inner;
use super::lookup::{self, Outcome};
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::pace::Pace;

struct State {
    inner: Arc<Inner>,
    query: ServiceQuery,
    /// Missing answers in a row.
    misses: u32,
    pace: Pace,
}

pub(super) fn stream(
    inner: Arc<Inner>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let state = State {
        pace: Pace::new(
            super::REGISTRY,
            inner.config.retry_base,
            inner.config.retry_max,
        ),
        inner,
        query,
        misses: 0,
    };
    stream::unfold(state, State::next)
}

impl State {
    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            self.pace.wait().await;
            let resolved = match self.inner.target(&self.query.name) {
                Ok(target) => {
                    lookup::resolve(&self.inner.resolver, &target, &self.query.name).await
                }
                Err(error) => Err(error),
            };
            let set = match resolved {
                Ok(Outcome::Found { mut instances, ttl }) => {
                    self.misses = 0;
                    self.pace.succeeded();
                    self.pace.after(self.inner.clamp(ttl));
                    instances.retain(|instance| self.query.matches(instance));
                    instances
                }
                Ok(Outcome::Missing) => {
                    self.misses += 1;
                    self.pace.succeeded();
                    self.pace.after(self.inner.config.min_ttl);
                    if self.misses < self.inner.config.empty_after {
                        debug!(name = %self.query.name, misses = self.misses, "no records; keeping the last set until it repeats");
                        continue;
                    }
                    Vec::new()
                }
                Err(error) => {
                    let failed = self.pace.failed(&self.query, error);
                    return Some((failed, self));
                }
            };
            if let Some(set) = self.pace.changed(set) {
                return Some((Ok(set), self));
            }
        }
    }
}
