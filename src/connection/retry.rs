//! [`Retry`]: gRPC A6's transparent retry, for a request the server provably did not
//! process.
//!
//! It wraps a balancer of [`Connection`](super::Connection)s. Each request's body goes into
//! a [`ReplayBody`] that keeps what it sends (up to the retry buffer). When the request
//! fails without the server having processed it, it is sent again through a fresh pick
//! (which passes over the connection that failed: it is marked closed), and the caller sees
//! only the last outcome:
//!
//! - a request that never left this process (no connection, or h2 refused to open its
//!   stream on a closing connection) is sent again whatever the buffer holds, since none
//!   of its body was read: gRFC A6 retries these until the deadline; here at most
//!   [`NEVER_SENT_ATTEMPTS`] attempts, so that no request loops;
//! - a request the server refused unprocessed, by a GOAWAY (its stream above the last one
//!   the server processes) or with `REFUSED_STREAM`, is sent again up to
//!   [`REFUSED_ATTEMPTS`] attempts in all. gRFC A6 retries a refused request once; but
//!   such refusals come in runs that say nothing of the next attempt. A server that closes
//!   every connection after so many requests (nginx's `keepalive_requests`) refuses the
//!   retry too whenever it lands on a connection at that count. And a server counts a
//!   stream against its `MAX_CONCURRENT_STREAMS` until it has cleaned it up, a moment
//!   after the client saw it end (C-core does), so a client that keeps to the limit still
//!   meets `REFUSED_STREAM` on a busy connection, retry included. So a request refused with
//!   `REFUSED_STREAM` waits a moment before it goes again (see [`refused_pause`]), giving
//!   the server time to catch up; one refused by a GOAWAY goes at once, to another
//!   connection.
//!
//! Anything else, a body that outgrew the buffer, or a request that waited out the stream
//! wait, is the caller's to see.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Request;
use http::request::Parts;
use tokio::time::Sleep;
use tower::Service;
use tracing::debug;

use super::error::ConnectionError;
use super::replay::{Replay, ReplayBody};
use crate::error::BoxError;

/// Attempts at most for a request that never left this process.
pub(crate) const NEVER_SENT_ATTEMPTS: u32 = 10;
/// Attempts at most for a request the server refused unprocessed.
pub(crate) const REFUSED_ATTEMPTS: u32 = 5;

/// The pause before sending again a request refused with `REFUSED_STREAM` after `attempts`
/// attempts: 2-4 ms after the first, doubling (at most 60 ms over the 4 resends). A
/// deviation from gRFC A6, whose transparent retry does not wait.
pub(crate) fn refused_pause(attempts: u32) -> Duration {
    let ceiling = Duration::from_millis(4) * 2u32.saturating_pow(attempts.saturating_sub(1));
    crate::backoff::equal_jitter(ceiling.min(Duration::from_millis(32)))
}

/// Sends a request the server did not process once more (see the module docs).
pub(crate) struct Retry<S, B> {
    inner: S,
    buffer: usize,
    service: Arc<str>,
    _body: PhantomData<fn(B)>,
}

impl<S, B> Retry<S, B> {
    pub(crate) fn new(inner: S, buffer: usize, service: &str) -> Self {
        Self {
            inner,
            buffer,
            service: service.into(),
            _body: PhantomData,
        }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, B> Clone for Retry<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            buffer: self.buffer,
            service: Arc::clone(&self.service),
            _body: PhantomData,
        }
    }
}

impl<S, B> Service<Request<B>> for Retry<S, B>
where
    S: Service<Request<ReplayBody<B>>, Error = BoxError> + Clone + Unpin + Send + 'static,
    S::Future: Unpin + Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RetryFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> RetryFuture<S, B> {
        let (parts, body) = request.into_parts();
        let (body, replay) = ReplayBody::new(body, self.buffer);
        let head = parts.clone();
        let first = self.inner.call(Request::from_parts(parts, body));
        RetryFuture {
            state: State::Sending(first),
            // A fresh handle for another attempt: this one's readiness went to the first.
            again: NextAttempt {
                service: self.inner.clone(),
                head,
                replay,
            },
            attempts: 1,
            service: Arc::clone(&self.service),
        }
    }
}

/// What another attempt needs.
struct NextAttempt<S, B> {
    service: S,
    head: Parts,
    /// The body of the last attempt, to send again.
    replay: Replay<B>,
}

/// The response future of [`Retry`].
pub(crate) struct RetryFuture<S: Service<Request<ReplayBody<B>>>, B> {
    state: State<S, B>,
    again: NextAttempt<S, B>,
    attempts: u32,
    service: Arc<str>,
}

enum State<S: Service<Request<ReplayBody<B>>>, B> {
    Sending(S::Future),
    /// A retry, the rare case: boxed, so the first attempt's future stays small.
    Readying {
        service: S,
        request: Option<Box<Request<ReplayBody<B>>>>,
        /// The pause before it, after a `REFUSED_STREAM`.
        pause: Option<Pin<Box<Sleep>>>,
    },
}

impl<S, B> Future for RetryFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Error = BoxError> + Clone + Unpin,
    S::Future: Unpin,
    B: 'static,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Sending(attempt) => {
                    let error = match ready!(Pin::new(attempt).poll(cx)) {
                        Ok(response) => return Poll::Ready(Ok(response)),
                        Err(error) => error,
                    };
                    let Some((request, pause)) = this.again(&error) else {
                        return Poll::Ready(Err(error));
                    };
                    debug!(service = %this.service, attempt = this.attempts, ?pause, error = %crate::error::Chain(&*error), "request not processed; sending it again");
                    crate::metrics::transparent_retry(&this.service);
                    this.attempts += 1;
                    this.state = State::Readying {
                        service: this.again.service.clone(),
                        request: Some(Box::new(request)),
                        pause: pause.map(|pause| Box::pin(tokio::time::sleep(pause))),
                    };
                }
                State::Readying {
                    service,
                    request,
                    pause,
                } => {
                    if let Some(sleep) = pause {
                        ready!(sleep.as_mut().poll(cx));
                        *pause = None;
                    }
                    ready!(service.poll_ready(cx))?;
                    let request = request.take().expect("set when readying");
                    this.state = State::Sending(service.call(*request));
                }
            }
        }
    }
}

impl<S: Service<Request<ReplayBody<B>>>, B> RetryFuture<S, B> {
    /// The request to send again, and the pause before it, when `error` says the server did
    /// not process it, the attempts allow another, and its body can be sent again.
    fn again(&mut self, error: &BoxError) -> Option<(Request<ReplayBody<B>>, Option<Duration>)> {
        let error: &ConnectionError = error.downcast_ref()?;
        let (more, pause) = match error {
            _ if error.never_sent() => (self.attempts < NEVER_SENT_ATTEMPTS, None),
            ConnectionError::GoAway { .. } => (self.attempts < REFUSED_ATTEMPTS, None),
            ConnectionError::Unprocessed { .. } => (
                self.attempts < REFUSED_ATTEMPTS,
                Some(refused_pause(self.attempts)),
            ),
            _ => (false, None),
        };
        if !more {
            return None;
        }
        let (body, replay) = self.again.replay.again()?;
        self.again.replay = replay;
        Some((Request::from_parts(self.again.head.clone(), body), pause))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use super::*;
    use crate::endpoint::Connectivity;

    type Body = ReplayBody<Full<Bytes>>;

    /// An inner service that answers with the next scripted outcome and records each
    /// request's body (read to the end before answering, unless it never left).
    #[derive(Clone)]
    struct Script {
        outcomes: Arc<Mutex<Vec<Outcome>>>,
        bodies: Arc<Mutex<Vec<Bytes>>>,
        /// When each attempt was sent.
        sent: Arc<Mutex<Vec<tokio::time::Instant>>>,
    }

    #[derive(Clone, Copy, Debug)]
    enum Outcome {
        Ok,
        /// No connection: nothing of the request was read.
        NeverSent,
        /// Above a GOAWAY's last stream id, after the body went out.
        GoAway,
        /// `REFUSED_STREAM`, after the body went out.
        Refused,
        /// Reset after the server read the request.
        Failed,
    }

    impl Script {
        fn new(outcomes: &[Outcome]) -> Self {
            let mut outcomes = outcomes.to_vec();
            outcomes.reverse();
            Self {
                outcomes: Arc::new(Mutex::new(outcomes)),
                bodies: Arc::default(),
                sent: Arc::default(),
            }
        }

        fn bodies(&self) -> Vec<Bytes> {
            self.bodies.lock().unwrap().clone()
        }

        fn attempts(&self) -> usize {
            self.bodies().len()
        }
    }

    fn error(outcome: Outcome) -> BoxError {
        let authority = "10.0.0.1:80".to_owned();
        let source = || Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)) as BoxError;
        Box::new(match outcome {
            Outcome::NeverSent => ConnectionError::NotConnected {
                authority,
                state: Connectivity::Connecting,
                source: None,
            },
            Outcome::GoAway => ConnectionError::GoAway {
                authority,
                source: source(),
            },
            Outcome::Refused => ConnectionError::Unprocessed {
                authority,
                source: source(),
            },
            _ => ConnectionError::Request {
                authority,
                source: "reset by the server after it read the request".into(),
            },
        })
    }

    impl Service<Request<Body>> for Script {
        type Response = &'static str;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            self.sent.lock().unwrap().push(tokio::time::Instant::now());
            let outcome = self
                .outcomes
                .lock()
                .unwrap()
                .pop()
                .expect("a scripted outcome");
            let bodies = Arc::clone(&self.bodies);
            Box::pin(async move {
                if let Outcome::NeverSent = outcome {
                    bodies.lock().unwrap().push(Bytes::new());
                    return Err(error(outcome));
                }
                let body = request.into_body().collect().await?.to_bytes();
                bodies.lock().unwrap().push(body);
                match outcome {
                    Outcome::Ok => Ok("answered"),
                    outcome => Err(error(outcome)),
                }
            })
        }
    }

    async fn send(
        script: &Script,
        buffer: usize,
        body: &'static str,
    ) -> Result<&'static str, BoxError> {
        let retry = Retry::new(script.clone(), buffer, "svc");
        let request = Request::post("/")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        retry.oneshot(request).await
    }

    /// Catches no retry, a retry that sends an empty or partial body, and a second
    /// outcome the caller does not see.
    #[tokio::test(start_paused = true)]
    async fn a_refused_request_is_sent_once_more_with_the_same_body() {
        let _limit = tower_sd_testkit::time_limit(10);
        let script = Script::new(&[Outcome::Refused, Outcome::Ok]);
        assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
        assert_eq!(script.bodies(), ["hello", "hello"]);
    }

    /// Catches a retry that sends only what the attempt before it sent: an attempt that
    /// never left (its body unread) comes between one that sent the body and the last, which
    /// must still send it whole. Against nginx closing connections, 1 of some 50,000 calls
    /// reached the server with no message ("Missing request message").
    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_never_left_keeps_the_body_for_the_next() {
        let _limit = tower_sd_testkit::time_limit(10);
        let outcomes = [Outcome::Refused, Outcome::NeverSent, Outcome::GoAway];
        let script = Script::new(&[&outcomes[..], &outcomes[..1], &[Outcome::Ok]].concat());
        assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
        assert_eq!(script.bodies(), ["hello", "", "hello", "hello", "hello"]);
    }

    /// Catches a refused request surfacing after one retry (refusals come in runs: a
    /// server closing connections after so many requests, or one that counts streams a
    /// moment longer than the client), and one retried without end.
    #[tokio::test(start_paused = true)]
    async fn a_refused_request_is_sent_again_up_to_five_attempts() {
        let _limit = tower_sd_testkit::time_limit(10);
        for refusal in [Outcome::GoAway, Outcome::Refused] {
            let mut outcomes = vec![refusal; 4];
            outcomes.push(Outcome::Ok);
            let script = Script::new(&outcomes);
            assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
            assert_eq!(script.bodies(), ["hello"; 5]);

            let script = Script::new(&[refusal; 6]);
            assert!(send(&script, 1024, "hello").await.is_err());
            assert_eq!(script.attempts(), REFUSED_ATTEMPTS as usize);
        }
        let mixed = [
            Outcome::Refused,
            Outcome::GoAway,
            Outcome::Refused,
            Outcome::Ok,
        ];
        assert_eq!(
            send(&Script::new(&mixed), 1024, "hi").await.unwrap(),
            "answered"
        );
    }

    /// Catches a request refused with `REFUSED_STREAM` sent again at once (the server that
    /// refused it is still counting the stream that made it full), a pause that does not
    /// grow, and a pause after a GOAWAY (the next attempt goes to another connection).
    #[tokio::test(start_paused = true)]
    async fn a_refused_stream_waits_a_growing_moment_and_a_goaway_none() {
        let _limit = tower_sd_testkit::time_limit(10);
        let outcomes = [Outcome::Refused; 4].into_iter().chain([Outcome::Ok]);
        let script = Script::new(&outcomes.collect::<Vec<_>>());
        assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
        let sent = script.sent.lock().unwrap().clone();
        let pauses: Vec<Duration> = sent.windows(2).map(|w| w[1] - w[0]).collect();
        let ms = Duration::from_millis;
        let bounds = [
            (ms(2), ms(4)),
            (ms(4), ms(8)),
            (ms(8), ms(16)),
            (ms(16), ms(32)),
        ];
        for (pause, (low, high)) in pauses.iter().zip(bounds) {
            assert!((low..=high).contains(pause), "{pauses:?}");
        }
        assert_eq!(pauses.len(), 4);

        let script = Script::new(&[Outcome::GoAway, Outcome::GoAway, Outcome::Ok]);
        assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
        let sent = script.sent.lock().unwrap().clone();
        assert!(sent.windows(2).all(|w| w[1] == w[0]), "no pause: {sent:?}");
    }

    /// Catches a request that never left the client given up after one retry, or with a
    /// 0-byte buffer (nothing of its body was read, so nothing needs keeping), and one
    /// retried without end.
    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_left_is_sent_again_whatever_the_buffer() {
        let _limit = tower_sd_testkit::time_limit(10);
        let mut outcomes = vec![Outcome::NeverSent; 9];
        outcomes.push(Outcome::Ok);
        let script = Script::new(&outcomes);
        assert_eq!(send(&script, 0, "hello").await.unwrap(), "answered");
        assert_eq!(
            script.bodies().last().unwrap(),
            "hello",
            "sent whole at last"
        );

        let script = Script::new(&[Outcome::NeverSent; 11]);
        assert!(send(&script, 0, "hello").await.is_err());
        assert_eq!(script.attempts(), NEVER_SENT_ATTEMPTS as usize);
    }

    /// Catches retrying a request the server may have processed (not idempotent-safe).
    #[tokio::test(start_paused = true)]
    async fn a_request_that_may_have_been_processed_is_not_sent_again() {
        let _limit = tower_sd_testkit::time_limit(10);
        let script = Script::new(&[Outcome::Failed, Outcome::Ok]);
        let error = send(&script, 1024, "hello").await.unwrap_err();
        assert!(
            crate::error::Chain(&*error)
                .to_string()
                .contains("reset by the server"),
            "{error}"
        );
        assert_eq!(script.attempts(), 1);
    }

    /// Catches a retry that sends a body it could not keep: past the buffer, the bytes
    /// already sent are gone, so the caller sees the error.
    #[tokio::test(start_paused = true)]
    async fn a_body_larger_than_the_buffer_is_not_sent_again() {
        let _limit = tower_sd_testkit::time_limit(10);
        let script = Script::new(&[Outcome::Refused, Outcome::Ok]);
        let error = send(&script, 4, "hello").await.unwrap_err();
        assert!(error.downcast_ref::<ConnectionError>().is_some(), "{error}");
        assert_eq!(script.bodies(), ["hello"]);
        let script = Script::new(&[Outcome::Refused, Outcome::Ok]);
        assert_eq!(send(&script, 5, "hello").await.unwrap(), "answered");
    }
}
