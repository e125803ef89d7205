//! Retry policies (gRFC A6): which answers are worth another attempt, when it goes, and the
//! channel's throttle that stops a storm of them.
//!
//! [`Retry`](super::retry::Retry) asks a call's [`CallPolicy`] about each answer that came
//! back whole in its headers (gRPC's trailers-only answer, the only kind A6 retries: any
//! other response headers commit the call). The policy says retry, after how long, or keep
//! the answer:
//!
//! - the status must be one of the policy's retryable codes, and the attempts fewer than
//!   its `maxAttempts` (at most 5);
//! - the server's `grpc-retry-pushback-ms` sets the wait; a negative, malformed or repeated
//!   one means do not retry (and counts as a failure for the throttle);
//! - otherwise the wait is drawn from `[0, min(initialBackoff x multiplier^(n-1),
//!   maxBackoff))` for the n-th retry since the last pushback, as A6 specifies (grpc-go
//!   instead draws from 0.8 to 1.2 times that ceiling);
//! - the [`Throttle`]: every failure with a retryable code takes a token, every successful
//!   call gives back `tokenRatio` (the channel sees each call's end and tells it), and
//!   while the tokens are at or below half of `maxTokens` nothing is retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::HeaderMap;

/// What a retry policy reads of an answer: its headers and status, when it has them.
pub(crate) trait Answer {
    fn headers(&self) -> Option<&http::HeaderMap>;
    fn status(&self) -> Option<u16>;
}

impl<B> Answer for http::Response<B> {
    fn headers(&self) -> Option<&http::HeaderMap> {
        Some(self.headers())
    }

    fn status(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }
}

/// Attempts at most, whatever a policy says (gRFC A6's limit).
pub(crate) const MAX_ATTEMPTS: u32 = 5;

/// A channel's retry throttle: gRFC A6's token bucket, in thousandths of a token.
#[derive(Debug)]
pub(crate) struct Throttle {
    milli_tokens: AtomicU32,
    max: u32,
    ratio: u32,
}

impl Throttle {
    /// A full bucket of `max` thousandths, refilled by `ratio` thousandths per success.
    pub(crate) fn new(max: u32, ratio: u32) -> Self {
        Self {
            milli_tokens: AtomicU32::new(max),
            max,
            ratio,
        }
    }

    /// A failure takes a token; whether retries (and hedges) are still allowed after it.
    pub(crate) fn failure(&self) -> bool {
        let before = self.update(|tokens| tokens.saturating_sub(1000));
        before.saturating_sub(1000) > self.max / 2
    }

    /// A success gives back `ratio`, up to the full bucket.
    pub(crate) fn success(&self) {
        self.update(|tokens| tokens.saturating_add(self.ratio).min(self.max));
    }

    /// Tokens now, in thousandths.
    #[cfg(test)]
    pub(crate) fn milli_tokens(&self) -> u32 {
        self.milli_tokens.load(Ordering::Relaxed)
    }

    fn update(&self, change: impl Fn(u32) -> u32) -> u32 {
        let mut now = self.milli_tokens.load(Ordering::Relaxed);
        loop {
            match self.milli_tokens.compare_exchange_weak(
                now,
                change(now),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(before) => return before,
                Err(seen) => now = seen,
            }
        }
    }
}

/// What makes an attempt worth retrying, and how retries are spaced.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RetryRules {
    /// Attempts at most, the first included.
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) multiplier: f64,
    /// What answers are worth retrying.
    pub(crate) retryable: Retryable,
}

/// The answers a policy retries.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Retryable {
    /// gRPC status codes, as bits, read from trailers-only answers.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    Grpc(u32),
    /// HTTP statuses.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Http(Box<[u16]>),
}

/// gRFC A6's hedging: how many attempts, how far apart, and which answers let the others
/// go on.
#[cfg(feature = "tonic")]
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HedgeRules {
    /// Attempts at most, the first included.
    pub(crate) max_attempts: u32,
    pub(crate) delay: Duration,
    /// The non-fatal gRPC status codes, as bits.
    pub(crate) non_fatal: u32,
}

#[cfg(feature = "tonic")]
impl HedgeRules {
    /// Whether an answer with `headers` lets the other attempts go on: a trailers-only
    /// answer with a non-fatal code.
    pub(crate) fn non_fatal(&self, headers: &HeaderMap) -> bool {
        grpc_status(headers)
            .is_some_and(|code| code != 0 && self.non_fatal & (1 << code.min(31)) != 0)
    }
}

/// One call's retry policy, and where it stands.
#[derive(Debug)]
pub(crate) struct CallPolicy {
    rules: Option<Arc<RetryRules>>,
    throttle: Option<Arc<Throttle>>,
    /// Wait for an instance to be ready rather than fail when none is.
    pub(crate) wait_for_ready: bool,
    /// Retries since the last pushback (which resets the backoff).
    since_pushback: u32,
}

/// What to do with an answer.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Keep it: the caller sees it.
    Keep,
    /// Send the call again after this wait.
    Retry { after: Duration, code: u32 },
    /// It was worth retrying, but the throttle says no.
    Throttled,
}

impl CallPolicy {
    pub(crate) fn new(
        rules: Option<Arc<RetryRules>>,
        throttle: Option<Arc<Throttle>>,
        wait_for_ready: bool,
    ) -> Self {
        Self {
            rules,
            throttle,
            wait_for_ready,
            since_pushback: 0,
        }
    }

    /// What to do with `answer`, after `attempts` attempts.
    pub(crate) fn verdict(&mut self, answer: &impl Answer, attempts: u32) -> Verdict {
        let Some(rules) = self.rules.clone() else {
            return Verdict::Keep;
        };
        let (code, pushback) = match &rules.retryable {
            Retryable::Grpc(codes) => {
                let Some(headers) = answer.headers() else {
                    return Verdict::Keep;
                };
                // Only a trailers-only answer carries its status in its headers; any other
                // commits. Successes refill the throttle where every call's end is seen
                // (the channel).
                let Some(code) = grpc_status(headers).filter(|code| *code != 0) else {
                    return Verdict::Keep;
                };
                let Ok(pushback) = pushback(headers) else {
                    self.failed();
                    return Verdict::Keep;
                };
                if codes & (1 << code.min(31)) == 0 {
                    return Verdict::Keep;
                }
                (code, pushback)
            }
            Retryable::Http(statuses) => {
                let Some(status) = answer.status() else {
                    return Verdict::Keep;
                };
                if !statuses.contains(&status) {
                    if status < 500
                        && let Some(throttle) = &self.throttle
                    {
                        throttle.success();
                    }
                    return Verdict::Keep;
                }
                (u32::from(status), None)
            }
        };
        if !self.failed() {
            return Verdict::Throttled;
        }
        if attempts >= rules.max_attempts {
            return Verdict::Keep;
        }
        let after = match pushback {
            Some(after) => {
                self.since_pushback = 0;
                after
            }
            None => {
                let ceiling = backoff_ceiling(&rules, self.since_pushback);
                self.since_pushback += 1;
                ceiling.mul_f64(crate::backoff::unit_draw())
            }
        };
        Verdict::Retry { after, code }
    }

    /// Whether its retries are gRPC's (and carry `grpc-previous-rpc-attempts`).
    pub(crate) fn is_grpc(&self) -> bool {
        self.rules
            .as_ref()
            .is_some_and(|rules| matches!(rules.retryable, Retryable::Grpc(_)))
    }

    /// Records a failure with the throttle; whether retries are still allowed.
    fn failed(&self) -> bool {
        self.throttle
            .as_ref()
            .is_none_or(|throttle| throttle.failure())
    }
}

/// `min(initialBackoff x multiplier^n, maxBackoff)`.
fn backoff_ceiling(rules: &RetryRules, n: u32) -> Duration {
    let factor = rules.multiplier.powi(n.min(64) as i32);
    let ceiling = rules.initial_backoff.as_secs_f64() * factor;
    let max = rules.max_backoff.as_secs_f64();
    Duration::from_secs_f64(if ceiling.is_finite() {
        ceiling.min(max)
    } else {
        max
    })
}

/// The status of a trailers-only answer: `grpc-status` in its headers.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The server's `grpc-retry-pushback-ms`: `Ok(None)` when absent, `Err` when it says do
/// not retry (negative, malformed, or given more than once).
fn pushback(headers: &HeaderMap) -> Result<Option<Duration>, ()> {
    let mut values = headers.get_all("grpc-retry-pushback-ms").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(());
    }
    let ms: u64 = value.to_str().map_err(drop)?.parse().map_err(drop)?;
    Ok(Some(Duration::from_millis(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(max_attempts: u32) -> Arc<RetryRules> {
        Arc::new(RetryRules {
            max_attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            multiplier: 2.0,
            retryable: Retryable::Grpc(1 << 14),
        })
    }

    fn answer(status: u32, pushback: &[&str]) -> http::Response<()> {
        let mut answer = http::Response::new(());
        let headers = answer.headers_mut();
        headers.insert("grpc-status", status.into());
        for value in pushback {
            headers.append("grpc-retry-pushback-ms", value.parse().unwrap());
        }
        answer
    }

    /// Catches a bucket that does not stop at half, one a success does not refill by
    /// the ratio, and one that refills past its size.
    #[test]
    fn the_throttle_stops_retries_at_half_and_successes_refill_it() {
        let throttle = Throttle::new(10_000, 500);
        let allowed: Vec<bool> = (0..7).map(|_| throttle.failure()).collect();
        // 9, 8, 7, 6 tokens allow; 5 (half) and below do not.
        assert_eq!(allowed, [true, true, true, true, false, false, false]);
        assert_eq!(throttle.milli_tokens(), 3_000);
        for _ in 0..5 {
            throttle.success();
        }
        assert_eq!(throttle.milli_tokens(), 5_500);
        for _ in 0..20 {
            throttle.success();
        }
        assert_eq!(throttle.milli_tokens(), 10_000, "at most full");
        let empty = Throttle::new(1_000, 1);
        assert!(!empty.failure());
        assert!(!empty.failure());
        assert_eq!(empty.milli_tokens(), 0, "never below 0");
    }

    /// Catches a retry of a code the policy does not list, of a committed answer (no status
    /// in its headers), past `maxAttempts`, and a backoff that does not grow or is not
    /// capped at `maxBackoff`.
    #[test]
    fn retries_retryable_codes_with_a_growing_capped_backoff() {
        let mut policy = CallPolicy::new(Some(rules(5)), None, false);
        assert_eq!(policy.verdict(&answer(13, &[]), 1), Verdict::Keep);
        assert_eq!(policy.verdict(&http::Response::new(()), 1), Verdict::Keep);
        assert_eq!(policy.verdict(&answer(0, &[]), 1), Verdict::Keep);
        let ceilings = [100, 200, 350, 350];
        for (n, ceiling) in ceilings.into_iter().enumerate() {
            let mut most = Duration::ZERO;
            for _ in 0..200 {
                let mut fresh = CallPolicy::new(Some(rules(5)), None, false);
                fresh.since_pushback = n as u32;
                match fresh.verdict(&answer(14, &[]), 1) {
                    Verdict::Retry { after, code: 14 } => most = most.max(after),
                    other => panic!("{other:?}"),
                }
            }
            let ceiling = Duration::from_millis(ceiling);
            assert!(most < ceiling && most > ceiling * 8 / 10, "{n}: {most:?}");
        }
        assert!(matches!(
            policy.verdict(&answer(14, &[]), 4),
            Verdict::Retry { .. }
        ));
        assert_eq!(policy.verdict(&answer(14, &[]), 5), Verdict::Keep);
        // Each retry raises the next one's ceiling.
        let mut growing = CallPolicy::new(Some(rules(5)), None, false);
        for n in 1..=3 {
            growing.verdict(&answer(14, &[]), n);
            assert_eq!(growing.since_pushback, n);
        }
    }

    /// Catches pushback ignored, a negative, malformed or repeated pushback retried, a
    /// pushback that does not reset the backoff, and one that does not count for the
    /// throttle when it says do not retry.
    #[test]
    fn pushback_sets_the_wait_or_forbids_the_retry() {
        let throttle = Arc::new(Throttle::new(10_000, 1_000));
        let mut policy = CallPolicy::new(Some(rules(5)), Some(Arc::clone(&throttle)), false);
        policy.since_pushback = 3;
        assert_eq!(
            policy.verdict(&answer(14, &["200"]), 1),
            Verdict::Retry {
                after: Duration::from_millis(200),
                code: 14
            }
        );
        assert_eq!(policy.since_pushback, 0, "reset");
        assert_eq!(throttle.milli_tokens(), 9_000);
        for forbidding in [&["-1"][..], &["soon"], &["1", "2"], &["1.5"]] {
            assert_eq!(policy.verdict(&answer(14, forbidding), 1), Verdict::Keep);
        }
        assert_eq!(throttle.milli_tokens(), 5_000, "each a failure");
        assert_eq!(policy.verdict(&answer(14, &["10"]), 1), Verdict::Throttled);
        // A non-retryable code, or a success, takes no token.
        policy.verdict(&answer(13, &[]), 1);
        policy.verdict(&answer(0, &[]), 1);
        assert_eq!(throttle.milli_tokens(), 4_000);
    }

    /// Catches an HTTP policy that reads gRPC's status instead of the HTTP one, retries a
    /// status it does not list, takes no token for a retryable status, or refills the
    /// throttle for a server error.
    #[test]
    fn http_statuses_retry_and_feed_the_throttle() {
        let throttle = Arc::new(Throttle::new(10_000, 1_000));
        let rules = RetryRules {
            retryable: Retryable::Http(Box::new([503])),
            ..(*rules(3)).clone()
        };
        let mut policy = CallPolicy::new(Some(Arc::new(rules)), Some(Arc::clone(&throttle)), false);
        let status = |code: u16| {
            let mut answer = http::Response::new(());
            *answer.status_mut() = http::StatusCode::from_u16(code).unwrap();
            answer
        };
        assert!(matches!(
            policy.verdict(&status(503), 1),
            Verdict::Retry { code: 503, .. }
        ));
        assert_eq!(throttle.milli_tokens(), 9_000);
        assert_eq!(policy.verdict(&status(500), 1), Verdict::Keep);
        assert_eq!(throttle.milli_tokens(), 9_000, "a 500 gives nothing back");
        assert_eq!(policy.verdict(&status(404), 1), Verdict::Keep);
        assert_eq!(
            throttle.milli_tokens(),
            10_000,
            "a 404 is a success for the throttle"
        );
        assert_eq!(
            policy.verdict(&status(503), 3),
            Verdict::Keep,
            "at maxAttempts"
        );
        assert!(!policy.is_grpc());
    }
}
