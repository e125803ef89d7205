//! The DNS watch: resolve, wait out the TTL (within its bounds), resolve again.
//!
//! A set is emitted when it differs from the last one. A missing name empties the set only
//! after `empty_after` missing answers in a row (re-checked at the TTL floor), so one lost
//! or wrong answer does not drop every instance. Failures are yielded and retried with
//! backoff; the last set stays.

use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use futures_util::stream;
use tokio::time::sleep;
use tracing::{debug, warn};

use super::Inner;
use super::lookup::{self, Outcome};
use crate::backoff::Backoff;
use crate::error::{Chain, Result};
use crate::instance::{ServiceInstance, ServiceQuery};

struct State {
    inner: Arc<Inner>,
    query: ServiceQuery,
    last: Option<Vec<ServiceInstance>>,
    /// Missing answers in a row.
    misses: u32,
    backoff: Backoff,
    wait: Option<Duration>,
}

pub(super) fn stream(
    inner: Arc<Inner>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let state = State {
        backoff: Backoff::new(inner.config.retry_base, inner.config.retry_max),
        inner,
        query,
        last: None,
        misses: 0,
        wait: None,
    };
    stream::unfold(state, State::next)
}

impl State {
    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            if let Some(wait) = self.wait.take() {
                sleep(wait).await;
            }
            let resolved = match self.inner.target(&self.query.name) {
                Ok(target) => {
                    lookup::resolve(&self.inner.resolver, &target, &self.query.name).await
                }
                Err(error) => Err(error),
            };
            let set = match resolved {
                Ok(Outcome::Found { mut instances, ttl }) => {
                    self.misses = 0;
                    self.backoff.reset();
                    self.wait = Some(self.inner.clamp(ttl));
                    instances.retain(|instance| self.query.matches(instance));
                    instances
                }
                Ok(Outcome::Missing) => {
                    self.misses += 1;
                    self.backoff.reset();
                    self.wait = Some(self.inner.config.min_ttl);
                    if self.misses < self.inner.config.empty_after {
                        debug!(name = %self.query.name, misses = self.misses, "no records; keeping the last set until it repeats");
                        continue;
                    }
                    Vec::new()
                }
                Err(error) => {
                    let pause = self.backoff.next_delay();
                    warn!(name = %self.query.name, error = %Chain(&error), ?pause, "DNS lookup failed; retrying");
                    self.wait = Some(pause);
                    return Some((Err(error), self));
                }
            };
            if self.last.as_ref() != Some(&set) {
                self.last = Some(set.clone());
                return Some((Ok(set), self));
            }
        }
    }
}
