//! The watch loop every backend shares, written once.
//!
//! A backend supplies a [`Source`]: "fetch the next state" over its own protocol (Consul's
//! blocking queries, kube-runtime's watcher, etcd's watch, DNS lookups), answering with one
//! of the [`Fetched`] states. The driver owns the stream and the rest:
//!
//! - **deduplication**: a set is emitted when it differs from the last one emitted (the
//!   first set always is), and the first set after an error always is, so that a follower
//!   (a [`FallbackRegistry`](super::FallbackRegistry)) learns that the registry answers
//!   again even when nothing changed;
//! - **failures**: an error is logged and yielded, and the next fetch waits out a backoff
//!   (exponential, full jitter, capped, reset by the next answer), or the registry's
//!   `Retry-After` when it is longer ([`Error::retry_after`]); the stream goes on;
//! - **monitoring** (feature `metrics`): errors by kind and the time of the last good
//!   answer, per registry and service.

use std::future::Future;
use std::time::Duration;

use futures_core::Stream;
use futures_util::stream;
use tokio::time::sleep;
use tracing::warn;

use crate::backoff::Backoff;
use crate::error::{Chain, Error, Result};
use crate::instance::{ServiceInstance, ServiceQuery};

/// What one fetch of a backend's state gave.
#[derive(Debug)]
#[cfg_attr(
    not(all(feature = "dns", feature = "etcd", feature = "kubernetes")),
    allow(
        dead_code,
        reason = "each state is used by some backend, not always compiled in"
    )
)]
pub(crate) enum Fetched {
    /// The registry answered with the whole current set (perhaps unchanged).
    Set(Vec<ServiceInstance>),
    /// The registry answered, with nothing to emit: a list still in progress, a bookmark, a
    /// change elsewhere, a missing name not yet believed.
    Nothing,
    /// The registry answered that the backend must start over (an etcd watch compacted
    /// away): nothing to emit, and the next fetch waits out a backoff, with no error.
    StartOver,
    /// The registry failed: the error is yielded and the next fetch waits out a backoff.
    Failed(Error),
}

/// One backend's watch protocol.
pub(crate) trait Source: Send + 'static {
    /// Fetches the next state. Dropping the future cancels the fetch.
    fn fetch(&mut self) -> impl Future<Output = Fetched> + Send;
}

/// Follows `source` for `query`, with the shared rules above.
pub(crate) fn watch<S: Source>(
    registry: &'static str,
    query: ServiceQuery,
    retry: (Duration, Duration),
    source: S,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let driver = Driver {
        registry,
        query,
        source,
        last: None,
        backoff: Backoff::new(retry.0, retry.1),
        pause: None,
        after_error: false,
    };
    stream::unfold(driver, Driver::next)
}

struct Driver<S> {
    registry: &'static str,
    query: ServiceQuery,
    source: S,
    /// The last set emitted.
    last: Option<Vec<ServiceInstance>>,
    backoff: Backoff,
    /// Waited out before the next fetch.
    pause: Option<Duration>,
    /// The last item yielded was an error.
    after_error: bool,
}

impl<S: Source> Driver<S> {
    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            if let Some(pause) = self.pause.take() {
                sleep(pause).await;
            }
            match self.source.fetch().await {
                Fetched::Set(set) => {
                    self.answered();
                    if self.after_error || self.last.as_ref() != Some(&set) {
                        self.after_error = false;
                        self.last = Some(set.clone());
                        return Some((Ok(set), self));
                    }
                }
                Fetched::Nothing => self.answered(),
                Fetched::StartOver => {
                    self.answered();
                    self.pause = Some(self.backoff.next_delay());
                }
                Fetched::Failed(error) => {
                    // A registry that said how long to leave it alone gets at least that.
                    let asked = error.retry_after().unwrap_or_default();
                    let pause = self.backoff.next_delay().max(asked);
                    warn!(
                        registry = self.registry,
                        service = %self.query.name,
                        error = %Chain(&error),
                        ?pause,
                        "{} watch failed; retrying",
                        self.registry
                    );
                    crate::metrics::registry::failed(
                        self.registry,
                        &self.query.name,
                        error.kind_name(),
                    );
                    self.pause = Some(pause);
                    self.after_error = true;
                    return Some((Err(error), self));
                }
            }
        }
    }

    fn answered(&mut self) {
        self.backoff.reset();
        crate::metrics::registry::answered(self.registry, &self.query.name);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use futures_util::StreamExt;

    use super::*;

    /// Answers from a script, then nothing.
    struct Script(VecDeque<Fetched>);

    impl Source for Script {
        async fn fetch(&mut self) -> Fetched {
            match self.0.pop_front() {
                Some(fetched) => fetched,
                None => std::future::pending().await,
            }
        }
    }

    fn set(ids: &[&str]) -> Vec<ServiceInstance> {
        ids.iter()
            .map(|id| ServiceInstance::new(*id, "svc", "10.0.0.1", 80))
            .collect()
    }

    fn failure() -> Fetched {
        Fetched::Failed(Error::Unreachable {
            registry: "test",
            source: "down".into(),
        })
    }

    /// The first `n` items the driver yields for `script`: sets as their ids, errors as
    /// "error".
    async fn yielded(n: usize, script: Vec<Fetched>) -> Vec<String> {
        let stream = watch(
            "test",
            ServiceQuery::new("svc"),
            (Duration::from_millis(10), Duration::from_millis(100)),
            Script(script.into()),
        );
        stream
            .take(n)
            .map(|item| match item {
                Ok(set) => set
                    .iter()
                    .map(|i| i.id.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                Err(_) => "error".to_owned(),
            })
            .collect()
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn equal_sets_are_emitted_once_but_again_after_an_error() {
        let _limit = tower_sd_testkit::time_limit(10);
        let script = vec![
            Fetched::Set(set(&["a"])),
            Fetched::Set(set(&["a"])),
            Fetched::Nothing,
            Fetched::Set(set(&["a", "b"])),
            failure(),
            Fetched::Set(set(&["a", "b"])),
            Fetched::Set(set(&["a", "b"])),
            Fetched::StartOver,
            Fetched::Set(set(&[])),
        ];
        assert_eq!(
            yielded(5, script).await,
            ["a", "a,b", "error", "a,b", ""],
            "the set after the error is sent though unchanged"
        );
    }

    /// Answers from a script, then nothing, noting when each fetch was made.
    struct Timed(
        VecDeque<Fetched>,
        std::sync::Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    );

    impl Source for Timed {
        async fn fetch(&mut self) -> Fetched {
            self.1.lock().unwrap().push(tokio::time::Instant::now());
            match self.0.pop_front() {
                Some(fetched) => fetched,
                None => std::future::pending().await,
            }
        }
    }

    /// The waits before each fetch after the first, for `script` (10 ms doubling to 100).
    async fn waits(script: Vec<Fetched>) -> Vec<Duration> {
        let times = std::sync::Arc::default();
        let n = script.len();
        let source = Timed(script.into(), std::sync::Arc::clone(&times));
        let stream = watch(
            "test",
            ServiceQuery::new("svc"),
            (Duration::from_millis(10), Duration::from_millis(100)),
            source,
        );
        let _: Vec<_> = stream.take(n).collect().await;
        let times = times.lock().unwrap().clone();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Catches a hot retry loop (no wait after a failure), a backoff that does not grow or
    /// is not capped, and one that an answer does not reset: each cycle fails six times
    /// (ceilings 10, 20, 40, 80, 100 and 100 ms), answers, then fails once more, whose wait
    /// is under the first ceiling again (without the reset, under 100 ms: five cycles would
    /// all land under 10 ms by chance once in 100,000 runs).
    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_an_answer_resets_the_backoff() {
        let _limit = tower_sd_testkit::time_limit(10);
        let mut script = Vec::new();
        for n in 0..5 {
            script.extend((0..6).map(|_| failure()));
            script.push(Fetched::Set(set(&[&format!("a{n}")])));
            script.push(failure());
            script.push(Fetched::Set(set(&[&format!("b{n}")])));
        }
        let waits = waits(script).await;
        let ms = |d: &Duration| d.as_millis();
        for cycle in waits.chunks(9) {
            let ceilings = [10, 20, 40, 80, 100, 100];
            for (wait, ceiling) in cycle.iter().zip(ceilings) {
                assert!(ms(wait) <= ceiling, "{cycle:?}");
            }
            assert_eq!(
                ms(&cycle[6]),
                0,
                "an answer is fetched after, not waited for"
            );
            assert!(ms(&cycle[7]) <= 10, "reset by the answer: {cycle:?}");
        }
        let total: Duration = waits.iter().sum();
        assert!(
            total >= Duration::from_millis(200),
            "not a hot loop: {waits:?}"
        );
    }

    /// Catches a registry's `Retry-After` ignored, or taken even when the backoff is longer.
    #[tokio::test(start_paused = true)]
    async fn a_registry_asking_to_wait_is_left_alone_that_long() {
        let _limit = tower_sd_testkit::time_limit(10);
        let limited = || {
            Fetched::Failed(Error::Status {
                registry: "test",
                status: 429,
                source: Box::new(crate::error::RateLimited {
                    retry_after: Some(Duration::from_secs(3)),
                    message: "slow down".into(),
                }),
            })
        };
        let waits = waits(vec![limited(), Fetched::Set(set(&["a"]))]).await;
        assert_eq!(waits[0], Duration::from_secs(3));
    }
}
