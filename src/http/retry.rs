//! [`HttpRetryPolicy`]: gRFC A6's retry policy and throttle, for HTTP requests routed around
//! a wrapped client ([`Discovery::retry_policy`]) or over tower-sd's connections
//! ([`ConnectionDiscovery::retry_policy`]).
//!
//! A request is retried only when it is safe to send twice: its method is idempotent
//! (`GET`, `HEAD`, `OPTIONS`, `PUT`, `DELETE`, `TRACE`) or the caller marked it
//! [`Idempotent`], and its body fits the retry buffer. An answer whose status is one of
//! the policy's (by default 502, 503 and 504) is retried after A6's backoff, on an instance
//! the request has not tried while another is usable, up to `max_attempts` in all; the
//! caller sees the last answer. With a throttle, each retryable answer takes a token, each
//! answer below 500 that is not retryable gives back `token_ratio`, and while the tokens
//! are at or below half, nothing is retried (per service).
//!
//! Over tower-sd's connections, the body is kept as it is sent, up to the connection
//! settings' retry buffer; around a wrapped client, which takes the caller's body type,
//! each retry sends a clone of the body, which must be `Clone` with a known size of at most
//! 64 KiB (other requests are sent once).
//!
//! [`Discovery::retry_policy`]: super::Discovery::retry_policy
//! [`ConnectionDiscovery::retry_policy`]: super::ConnectionDiscovery::retry_policy

use std::sync::Arc;
use std::time::Duration;

use crate::connection::policy::{RetryRules, Retryable, Throttle};

/// A retry policy for HTTP requests (see the module docs).
///
/// ```
/// use std::time::Duration;
/// use tower_sd::http::HttpRetryPolicy;
///
/// let policy = HttpRetryPolicy::new(3)
///     .statuses([503])
///     .backoff(Duration::from_millis(50), Duration::from_secs(1), 2.0)
///     .throttle(10, 0.1);
/// # drop(policy);
/// ```
#[derive(Clone, Debug)]
pub struct HttpRetryPolicy {
    rules: RetryRules,
    /// `maxTokens` and `tokenRatio`, in thousandths.
    throttle: Option<(u32, u32)>,
}

/// Marks a request safe to send more than once whatever its method (insert it into the
/// request's extensions).
#[derive(Clone, Copy, Debug, Default)]
pub struct Idempotent;

impl HttpRetryPolicy {
    /// At most `max_attempts` attempts (the first included; taken within 1 to 5, as gRFC
    /// A6 caps them), retrying 502, 503 and 504 after a backoff from 100 ms doubling to
    /// 1 s, with no throttle.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            rules: RetryRules {
                max_attempts: max_attempts.clamp(1, crate::connection::policy::MAX_ATTEMPTS),
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                multiplier: 2.0,
                retryable: Retryable::Http(Box::new([502, 503, 504])),
            },
            throttle: None,
        }
    }

    /// The statuses worth another attempt.
    #[must_use]
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.rules.retryable = Retryable::Http(statuses.into_iter().collect());
        self
    }

    /// The backoff before the n-th retry is drawn from `[0, min(initial x
    /// multiplier^(n-1), max))` (A6's; a multiplier below 1 is taken as 1).
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration, multiplier: f64) -> Self {
        self.rules.initial_backoff = initial;
        self.rules.max_backoff = max.max(initial);
        self.rules.multiplier = if multiplier >= 1.0 { multiplier } else { 1.0 };
        self
    }

    /// A per-service throttle of `max_tokens` tokens (1 to 1000), each answer below 500
    /// that is not retried giving back `token_ratio` (at least 0.001).
    #[must_use]
    pub fn throttle(mut self, max_tokens: u32, token_ratio: f64) -> Self {
        let ratio = (token_ratio * 1000.0).round();
        let ratio = if ratio >= 1.0 {
            ratio.min(f64::from(u32::MAX)) as u32
        } else {
            1
        };
        self.throttle = Some((max_tokens.clamp(1, 1000) * 1000, ratio));
        self
    }

    pub(crate) fn rules(&self) -> Arc<RetryRules> {
        Arc::new(self.rules.clone())
    }

    /// A fresh throttle for one service, when the policy has one.
    pub(crate) fn new_throttle(&self) -> Option<Arc<Throttle>> {
        self.throttle
            .map(|(max, ratio)| Arc::new(Throttle::new(max, ratio)))
    }
}

/// Whether `request` may be sent more than once.
pub(crate) fn is_safe<B>(request: &http::Request<B>) -> bool {
    use http::Method;
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || request.extensions().get::<Idempotent>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches the throttle's tokens or ratio off by the unit (thousandths), a ratio below
    /// a thousandth taken as 0 (a drained bucket would never refill), and the clamps.
    #[test]
    fn the_throttle_counts_thousandths_and_clamps() {
        let throttle = |tokens, ratio| {
            let policy = HttpRetryPolicy::new(3).throttle(tokens, ratio);
            let throttle = policy.new_throttle().expect("a throttle");
            (throttle.milli_tokens(), policy.throttle.unwrap().1)
        };
        assert_eq!(throttle(4, 0.5), (4_000, 500));
        assert_eq!(throttle(0, 0.0001), (1_000, 1));
        assert_eq!(throttle(5_000, 1e12), (1_000_000, u32::MAX));
        assert!(HttpRetryPolicy::new(3).new_throttle().is_none());
    }

    /// Catches a multiplier below 1 kept (the backoff would shrink), one of 1 or more
    /// changed, a maximum below the initial kept, and attempts outside 1 to 5.
    #[test]
    fn the_backoff_and_attempts_are_kept_sane() {
        let rules = |policy: HttpRetryPolicy| policy.rules();
        let second = Duration::from_secs(1);
        let shrinking = rules(HttpRetryPolicy::new(3).backoff(second, second / 2, 0.5));
        assert_eq!(shrinking.multiplier, 1.0);
        assert_eq!(shrinking.max_backoff, second);
        let growing = rules(HttpRetryPolicy::new(3).backoff(second, second * 4, 1.0));
        assert_eq!(growing.multiplier, 1.0);
        assert_eq!(growing.max_backoff, second * 4);
        assert_eq!(
            rules(HttpRetryPolicy::new(3).backoff(second, second, 2.5)).multiplier,
            2.5
        );
        assert_eq!(rules(HttpRetryPolicy::new(0)).max_attempts, 1);
        assert_eq!(rules(HttpRetryPolicy::new(9)).max_attempts, 5);
    }

    #[test]
    fn safe_methods_or_a_mark() {
        let request =
            |method: http::Method| http::Request::builder().method(method).body(()).unwrap();
        assert!(is_safe(&request(http::Method::GET)));
        assert!(is_safe(&request(http::Method::DELETE)));
        assert!(!is_safe(&request(http::Method::POST)));
        assert!(!is_safe(&request(http::Method::PATCH)));
        let mut marked = request(http::Method::POST);
        marked.extensions_mut().insert(Idempotent);
        assert!(is_safe(&marked));
    }
}
