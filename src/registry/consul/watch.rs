//! The blocking-query watch loop, following Consul's rules
//! (`website/content/api-docs/features/blocking.mdx`):
//!
//! - send the last `X-Consul-Index` as `index`, with `wait`;
//! - an index lower than the last one means the data was reset: start again from 0;
//! - an index of 0, or none, is treated as 1, so the next query blocks instead of spinning;
//! - a return is no proof of change: sets are compared before one is emitted (by the shared
//!   driver);
//! - queries are rate limited (token bucket), so an index that churns cannot make the loop
//!   spin, and errors back off exponentially with full jitter (each error is yielded; the
//!   stream goes on);
//! - after an error the next query starts from 0, so it answers at once when Consul is back
//!   instead of blocking on the old index.
//!
//! Each watch follows one query, hence one datacenter, with its own index.

use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use super::client::Client;
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::watch::{self, Fetched, Source};

/// The index to send next, given the last one and the one Consul returned.
pub(crate) fn next_index(last: u64, returned: Option<u64>) -> u64 {
    match returned {
        None | Some(0) => 1,
        Some(index) if index < last => 0,
        Some(index) => index,
    }
}

/// The longest a token bucket waits for a token, whatever its rate.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// A token bucket: `burst` requests at once, `rate` per second on average.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64) -> Self {
        let burst = rate.max(1.0);
        Self {
            tokens: burst,
            burst,
            rate,
            refilled: Instant::now(),
        }
    }

    /// Waits until a request may be sent, and takes its token.
    pub(crate) async fn take(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens < 1.0 {
            // A tiny rate would overflow a `Duration` (or the clock): wait a day at most.
            let wait = Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate)
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT);
            sleep_until(now + wait).await;
            self.tokens = 1.0;
            self.refilled = now + wait;
        }
        self.tokens -= 1.0;
    }
}

/// Consul's side of the shared watch loop (`registry/watch.rs`).
struct Blocking {
    client: Arc<Client>,
    query: ServiceQuery,
    index: u64,
    bucket: TokenBucket,
}

pub(crate) fn stream(
    client: Arc<Client>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let settings = &client.settings;
    let retry = (settings.retry_base, settings.retry_max);
    let source = Blocking {
        bucket: TokenBucket::new(settings.requests_per_second),
        client: Arc::clone(&client),
        query: query.clone(),
        index: 0,
    };
    watch::watch("consul", query, retry, source)
}

impl Source for Blocking {
    async fn fetch(&mut self) -> Fetched {
        self.bucket.take().await;
        match self
            .client
            .health_service(&self.query, Some(self.index))
            .await
        {
            Ok((set, returned)) => {
                let next = next_index(self.index, returned);
                if next == 0 {
                    debug!(service = %self.query.name, last = self.index, ?returned, "Consul index went backwards; resetting");
                }
                self.index = next;
                Fetched::Set(set)
            }
            Err(error) => {
                // After a failure, ask at once (not blocking on the old index), so that the
                // first answer after an outage arrives as soon as Consul is back.
                self.index = 0;
                Fetched::Failed(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, None), 1, "missing");
        assert_eq!(next_index(5, Some(0)), 1, "zero");
        assert_eq!(next_index(10, Some(7)), 0, "went backwards: reset");
        assert_eq!(next_index(10, Some(10)), 10, "unchanged");
        assert_eq!(next_index(10, Some(12)), 12);
    }

    /// Catches a wait computed from a tiny rate overflowing a `Duration` or the clock (a
    /// panic in the watch task).
    #[tokio::test(start_paused = true)]
    async fn a_tiny_rate_waits_a_day_at_most() {
        let _limit = tower_sd_testkit::time_limit(10);
        for rate in [1e-300, f64::MIN_POSITIVE] {
            let mut bucket = TokenBucket::new(rate);
            bucket.take().await;
            let start = Instant::now();
            bucket.take().await;
            assert_eq!(start.elapsed(), MAX_WAIT);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_bounds_the_rate() {
        let _limit = tower_sd_testkit::time_limit(10);
        let mut bucket = TokenBucket::new(5.0);
        let start = Instant::now();
        for _ in 0..55 {
            bucket.take().await;
        }
        // A burst of 5, then 5 per second: 50 more take 10 s.
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
}
