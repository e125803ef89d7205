//! [`HedgeFuture`]: gRFC A6's hedging, for calls configured as safe to send more than once.
//!
//! The first attempt goes at once; while no attempt has given a final answer, another goes
//! every `hedgingDelay` (at once after a non-fatal answer), up to `maxAttempts`, each to an
//! instance the call has not tried while another is usable, with
//! `grpc-previous-rpc-attempts`. The first final answer wins: any response but a
//! trailers-only one with a non-fatal code (so the first response headers commit the call,
//! as A6 says), and the attempts still running are dropped, which resets their streams
//! (`RST_STREAM` `CANCEL`) and releases their load on their instances at once. When every
//! attempt ended non-fatally, the caller sees the last answer. Each non-fatal answer
//! counts as a failure for the channel's retry throttle, which stops further attempts
//! once it allows no more.
//!
//! Every attempt sends the whole request body, so a call is hedged only when its body is
//! at hand whole when the call starts and fits the retry buffer (a unary call's is); any
//! other call goes out once, as a call without a policy does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Request};
use tokio::time::{Instant, Sleep};
use tower::Service;
use tracing::debug;

use super::policy::{HedgeRules, Throttle};
use super::replay::{Budget, Read, ReplayBody};
use super::retry::{Answer, Picks};
use crate::error::BoxError;

/// The response future of a hedged call.
pub(crate) struct HedgeFuture<S: Service<Request<ReplayBody<B>>>, B> {
    /// A handle for the next attempt's pick.
    service: S,
    head: Parts,
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    rules: Arc<HedgeRules>,
    throttle: Option<Arc<Throttle>>,
    /// The channel's retry budget, which each attempt's body counts against.
    budget: Arc<Budget>,
    /// The attempts in flight, with their number (0: the first).
    running: Vec<(u32, S::Future)>,
    /// A handle getting ready for the next attempt.
    readying: Option<S>,
    /// When the next attempt goes.
    next: Pin<Box<Sleep>>,
    /// The next attempt goes at once (the last one ended non-fatally).
    now: bool,
    /// Attempts sent.
    sent: u32,
    /// No more attempts: the throttle or the picks said no.
    stopped: bool,
    /// The endpoints the attempts went to.
    tried: Vec<usize>,
    /// The answer of the last attempt that ended, for when none wins.
    last: Option<Result<S::Response, BoxError>>,
    name: Arc<str>,
}

impl<S, B> HedgeFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Error = BoxError> + Picks + Clone + Unpin,
    S::Response: Answer,
    S::Future: Unpin,
{
    /// Sends the first attempt on `service`, which `poll_ready` made ready, and hedges the
    /// rest from fresh handles. `read` is the whole body.
    pub(crate) fn start(
        service: &mut S,
        head: Parts,
        read: Read<B>,
        rules: Arc<HedgeRules>,
        throttle: Option<Arc<Throttle>>,
        budget: Arc<Budget>,
        name: Arc<str>,
    ) -> Self {
        let mut hedge = Self {
            service: service.clone(),
            head,
            frames: read.frames,
            trailers: read.trailers,
            next: Box::pin(tokio::time::sleep(rules.delay)),
            rules,
            throttle,
            budget,
            running: Vec::new(),
            readying: None,
            now: false,
            sent: 0,
            stopped: false,
            tried: Vec::new(),
            last: None,
            name,
        };
        hedge.send(service);
        hedge
    }

    /// Attempts sent so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.sent
    }

    /// Sends the next attempt on `service`, which is ready.
    fn send(&mut self, service: &mut S) {
        self.tried.extend(service.picked());
        let read = Read {
            frames: self.frames.clone(),
            trailers: self.trailers.clone(),
            rest: None,
        };
        let (body, _) = ReplayBody::of(read, usize::MAX, &self.budget);
        let mut request = Request::from_parts(self.head.clone(), body);
        if self.sent > 0 {
            request
                .headers_mut()
                .insert("grpc-previous-rpc-attempts", self.sent.into());
            debug!(service = %self.name, attempt = self.sent, "hedging the call");
            crate::metrics::hedge_sent(&self.name);
        }
        self.running.push((self.sent, service.call(request)));
        self.sent += 1;
        let delay = self.rules.delay;
        self.next.as_mut().reset(Instant::now() + delay);
    }

    /// Drives the attempts in flight; a final answer, when one came.
    fn poll_running(&mut self, cx: &mut Context<'_>) -> Option<Result<S::Response, BoxError>> {
        let mut i = 0;
        while i < self.running.len() {
            let Poll::Ready(outcome) = Pin::new(&mut self.running[i].1).poll(cx) else {
                i += 1;
                continue;
            };
            let (attempt, _) = self.running.swap_remove(i);
            let non_fatal = match &outcome {
                Ok(response) => response
                    .headers()
                    .is_some_and(|headers| self.rules.non_fatal(headers)),
                // Refused, or never sent: another instance may answer.
                Err(_) => true,
            };
            if !non_fatal {
                if attempt > 0 {
                    crate::metrics::hedge_won(&self.name);
                }
                return Some(outcome);
            }
            if outcome.is_ok()
                && let Some(throttle) = &self.throttle
                && !throttle.failure()
            {
                self.stopped = true;
            }
            self.last = Some(outcome);
            self.now = true;
        }
        None
    }
}

impl<S, B> Future for HedgeFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Error = BoxError> + Picks + Clone + Unpin,
    S::Response: Answer + Unpin,
    S::Future: Unpin,
    B: Unpin,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            if let Some(outcome) = this.poll_running(cx) {
                return Poll::Ready(outcome);
            }
            let more = this.sent < this.rules.max_attempts && !this.stopped;
            if more
                && this.readying.is_none()
                && (std::mem::take(&mut this.now) || this.next.as_mut().poll(cx).is_ready())
            {
                let mut service = this.service.clone();
                service.avoid(&this.tried);
                this.readying = Some(service);
            }
            if let Some(service) = &mut this.readying {
                match service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let mut service = this.readying.take().expect("readying");
                        this.send(&mut service);
                        continue;
                    }
                    Poll::Ready(Err(error)) => {
                        this.readying = None;
                        this.stopped = true;
                        this.last.get_or_insert(Err(error));
                    }
                    Poll::Pending => {}
                }
            }
            if this.running.is_empty() && this.readying.is_none() {
                let more = this.sent < this.rules.max_attempts && !this.stopped;
                if !more {
                    let last = this.last.take();
                    return Poll::Ready(last.unwrap_or_else(|| Err("no attempt was sent".into())));
                }
                if !this.now {
                    // The next attempt waits for its delay with nothing in flight: send it now.
                    this.now = true;
                    continue;
                }
            }
            return Poll::Pending;
        }
    }
}
