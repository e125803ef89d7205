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
//! wait, is the caller's to see, unless the call has a retry policy (gRFC A6; see
//! [`policy`](super::policy)): then an answer the policy finds worth retrying is sent again,
//! after the policy's wait, to an instance the call has not tried while another is usable,
//! with `grpc-previous-rpc-attempts`. Transparent resends do not count against the
//! policy's `maxAttempts` (as in grpc-go).

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
use super::policy::{Answer, CallPolicy, Verdict};
use super::replay::{Budget, Read, Replay, ReplayBody};
use crate::balance::Picks;
use crate::error::{BoxError, Error};

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
    /// The bytes all requests keep together, at most.
    budget: Arc<Budget>,
    service: Arc<str>,
    _body: PhantomData<fn(B)>,
}

impl<S, B> Retry<S, B> {
    pub(crate) fn new(inner: S, buffer: usize, budget: Arc<Budget>, service: &str) -> Self {
        Self {
            inner,
            buffer,
            budget,
            service: service.into(),
            _body: PhantomData,
        }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The retry buffer's size.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn buffer(&self) -> usize {
        self.buffer
    }

    /// What all requests keep together, at most.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The service name, for logs and metrics.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn service(&self) -> &Arc<str> {
        &self.service
    }
}

impl<S: Clone, B> Clone for Retry<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            buffer: self.buffer,
            budget: Arc::clone(&self.budget),
            service: Arc::clone(&self.service),
            _body: PhantomData,
        }
    }
}

impl<S, B> Retry<S, B>
where
    S: Service<Request<ReplayBody<B>>, Error = BoxError> + Picks + Clone + Unpin,
{
    /// Sends `request` (once `poll_ready` returned ready), under a retry `policy`.
    pub(crate) fn call_with(
        &mut self,
        request: Request<B>,
        policy: Option<Box<CallPolicy>>,
    ) -> RetryFuture<S, Replay<B>> {
        let (parts, body) = request.into_parts();
        self.call_read(parts, Read::unread(body), policy)
    }

    /// As [`call_with`](Self::call_with), for a request whose body was partly read.
    pub(crate) fn call_read(
        &mut self,
        parts: Parts,
        read: Read<B>,
        policy: Option<Box<CallPolicy>>,
    ) -> RetryFuture<S, Replay<B>> {
        let (body, replay) = ReplayBody::of(read, self.buffer, &self.budget);
        let head = parts.clone();
        let mut tried = Vec::new();
        if policy.is_some() {
            tried.extend(self.inner.picked());
        }
        let first = self.inner.call(Request::from_parts(parts, body));
        self.future(State::Sending(first), head, replay, policy, tried)
    }

    /// Sends `request` under `policy` once an instance is ready, when `poll_ready` failed
    /// and the policy waits for ready instances.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn wait_then_call(
        &mut self,
        request: Request<B>,
        policy: Box<CallPolicy>,
    ) -> RetryFuture<S, Replay<B>> {
        let (parts, body) = request.into_parts();
        let (body, replay) = ReplayBody::of(Read::unread(body), self.buffer, &self.budget);
        let request = Request::from_parts(parts, body);
        let name = Arc::clone(&self.service);
        RetryFuture::when_ready(self.inner.clone(), request, replay, policy, name)
    }

    fn future(
        &self,
        state: State<S, Replay<B>>,
        head: Parts,
        replay: Replay<B>,
        policy: Option<Box<CallPolicy>>,
        tried: Vec<usize>,
    ) -> RetryFuture<S, Replay<B>> {
        RetryFuture {
            state,
            // A fresh handle for another attempt: this one's readiness went to the first.
            again: NextAttempt {
                service: self.inner.clone(),
                head,
                replay,
            },
            attempts: 1,
            retries: 0,
            policy,
            tried,
            service: Arc::clone(&self.service),
        }
    }
}

/// How another attempt gets the request's body, from its start.
pub(crate) trait Resend {
    /// The body each attempt sends.
    type Body;
    /// The body again; `None` when it can no longer be sent again (it outgrew the buffer).
    fn resend(&mut self) -> Option<Self::Body>;
}

impl<B> Resend for Replay<B> {
    type Body = ReplayBody<B>;

    fn resend(&mut self) -> Option<ReplayBody<B>> {
        let (body, replay) = self.again()?;
        *self = replay;
        Some(body)
    }
}

impl<S, R> RetryFuture<S, R>
where
    S: Service<Request<R::Body>> + Clone,
    R: Resend,
{
    /// Sends `request` through `service`, once it is ready, under `policy`; another attempt
    /// gets its body from `resend`. `name` names the service in logs and metrics.
    pub(crate) fn when_ready(
        service: S,
        request: Request<R::Body>,
        resend: R,
        policy: Box<CallPolicy>,
        name: Arc<str>,
    ) -> Self {
        let (head, body) = request.into_parts();
        let request = Request::from_parts(head.clone(), body);
        Self {
            state: State::Readying {
                service: service.clone(),
                request: Some(Box::new(request)),
                pause: None,
            },
            again: NextAttempt {
                service,
                head,
                replay: resend,
            },
            attempts: 1,
            retries: 0,
            policy: Some(policy),
            tried: Vec::new(),
            service: name,
        }
    }
}

impl<S, B> Service<Request<B>> for Retry<S, B>
where
    S: Service<Request<ReplayBody<B>>, Error = BoxError> + Picks + Clone + Unpin + Send + 'static,
    S::Response: Answer,
    S::Future: Unpin + Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RetryFuture<S, Replay<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> RetryFuture<S, Replay<B>> {
        self.call_with(request, None)
    }
}

/// What another attempt needs.
struct NextAttempt<S, R> {
    service: S,
    head: Parts,
    /// The body of the last attempt, to send again.
    replay: R,
}

/// The response future of [`Retry`] (with `R` a [`Replay`]), and of any call under a retry
/// policy whose body another attempt gets from `R`.
pub(crate) struct RetryFuture<S: Service<Request<R::Body>>, R: Resend> {
    state: State<S, R>,
    again: NextAttempt<S, R>,
    /// Attempts so far, transparent resends included.
    attempts: u32,
    /// Of them, the retries the policy made.
    retries: u32,
    policy: Option<Box<CallPolicy>>,
    /// The endpoints the attempts went to, while a policy may retry.
    tried: Vec<usize>,
    service: Arc<str>,
}

enum State<S: Service<Request<R::Body>>, R: Resend> {
    Sending(S::Future),
    /// A retry, the rare case: boxed, so the first attempt's future stays small.
    Readying {
        service: S,
        request: Option<Box<Request<R::Body>>>,
        /// The pause before it, after a `REFUSED_STREAM`.
        pause: Option<Pin<Box<Sleep>>>,
    },
}

impl<S, R> Future for RetryFuture<S, R>
where
    S: Service<Request<R::Body>, Error = BoxError> + Picks + Clone + Unpin,
    S::Response: Answer,
    S::Future: Unpin,
    R: Resend + Unpin,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Sending(attempt) => {
                    let next = match ready!(Pin::new(attempt).poll(cx)) {
                        Ok(response) => match this.retry(&response) {
                            Some(next) => next,
                            None => return this.finish(Ok(response)),
                        },
                        Err(error) => match this.again(&error) {
                            Some(next) => next,
                            None => return this.finish(Err(error)),
                        },
                    };
                    this.attempts += 1;
                    let mut service = this.again.service.clone();
                    if !this.tried.is_empty() {
                        service.avoid(&this.tried);
                    }
                    this.state = State::Readying {
                        service,
                        request: Some(Box::new(next.0)),
                        pause: next.1.map(|pause| Box::pin(tokio::time::sleep(pause))),
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
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        if !this.policy.as_ref().is_some_and(|p| p.wait_for_ready)
                            || !not_ready(&error)
                        {
                            return this.finish(Err(error));
                        }
                        // Waiting for ready: the balancer waited its `wait_for_endpoints`;
                        // look again after a moment, until the call's deadline.
                        *pause = Some(Box::pin(tokio::time::sleep(WAIT_FOR_READY_PAUSE)));
                        continue;
                    }
                    if this.policy.is_some() {
                        this.tried.extend(service.picked());
                    }
                    let request = request.take().expect("set when readying");
                    this.state = State::Sending(service.call(*request));
                }
            }
        }
    }
}

/// How long a call that waits for ready pauses between two failed picks.
const WAIT_FOR_READY_PAUSE: Duration = Duration::from_millis(100);

/// Whether a failed pick says only that no instance is ready yet.
pub(crate) fn not_ready(error: &BoxError) -> bool {
    match error.downcast_ref::<Error>() {
        Some(error) => matches!(
            error,
            Error::NoEndpoints { .. }
                | Error::NoReadyEndpoints { .. }
                | Error::NoHealthyEndpoints { .. }
        ),
        None => error.downcast_ref::<ConnectionError>().is_some(),
    }
}

/// A request to send again, and the pause before it.
type Next<B> = (Request<B>, Option<Duration>);

impl<S: Service<Request<R::Body>>, R: Resend> RetryFuture<S, R> {
    /// Attempts so far, transparent resends included.
    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The call's outcome, its attempts counted when it had a policy.
    fn finish<T>(&self, outcome: T) -> Poll<T> {
        if self.policy.is_some() {
            crate::metrics::call_attempts(&self.service, self.attempts);
        }
        Poll::Ready(outcome)
    }

    /// The request to send again, and the pause before it, when `error` says the server did
    /// not process it, the attempts allow another, and its body can be sent again.
    fn again(&mut self, error: &BoxError) -> Option<Next<R::Body>> {
        let error: &ConnectionError = error.downcast_ref()?;
        let transparent = self.attempts - self.retries;
        let (more, pause) = match error {
            _ if error.never_sent() => (transparent < NEVER_SENT_ATTEMPTS, None),
            ConnectionError::GoAway { .. } => (transparent < REFUSED_ATTEMPTS, None),
            ConnectionError::Unprocessed { .. } => (
                transparent < REFUSED_ATTEMPTS,
                Some(refused_pause(transparent)),
            ),
            _ => (false, None),
        };
        if !more {
            return None;
        }
        let request = self.resend()?;
        debug!(service = %self.service, attempt = self.attempts, ?pause, error = %crate::error::Chain(error), "request not processed; sending it again");
        crate::metrics::transparent_retry(&self.service);
        Some((request, pause))
    }

    /// The request to send again, and the wait before it, when the call's policy finds
    /// `response` worth retrying.
    fn retry(&mut self, response: &S::Response) -> Option<Next<R::Body>>
    where
        S::Response: Answer,
    {
        let policy = self.policy.as_deref_mut()?;
        let (after, code) = match policy.verdict(response, self.retries + 1) {
            Verdict::Keep => return None,
            Verdict::Throttled => {
                debug!(service = %self.service, attempts = self.attempts, "retry throttled");
                crate::metrics::retry_throttled(&self.service);
                return None;
            }
            Verdict::Retry { after, code } => (after, code),
        };
        let grpc = policy.is_grpc();
        let mut request = self.resend()?;
        self.retries += 1;
        if grpc {
            request
                .headers_mut()
                .insert("grpc-previous-rpc-attempts", self.retries.into());
        }
        debug!(service = %self.service, attempt = self.attempts, code, ?after, "retrying by the call's retry policy");
        crate::metrics::policy_retry(&self.service, code);
        Some((request, Some(after)))
    }

    /// The request again, with its body from the start; `None` when the body outgrew the
    /// buffer.
    fn resend(&mut self) -> Option<Request<R::Body>> {
        let body = self.again.replay.resend()?;
        Some(Request::from_parts(self.again.head.clone(), body))
    }
}

#[cfg(test)]
mod tests;
