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

use super::policy::{Answer, HedgeRules, Throttle};
use super::replay::{Budget, Read, ReplayBody};
use crate::balance::Picks;
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
                // Nothing in flight and none to come: an attempt that ended non-fatally
                // readies the next at once, so only the last attempt, the throttle or a
                // failed pick gets here.
                let last = this.last.take();
                return Poll::Ready(last.unwrap_or_else(|| Err("no attempt was sent".into())));
            }
            return Poll::Pending;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;

    use super::*;

    type Body = Full<Bytes>;

    /// When each attempt went, with its `grpc-previous-rpc-attempts`.
    type Sent = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

    /// Each attempt answers after its scripted delay with its scripted status (0: OK), and
    /// counts itself dropped unanswered.
    #[derive(Clone, Default)]
    struct Script {
        answers: Arc<Mutex<Vec<(u64, u32)>>>,
        sent: Sent,
        avoided: Arc<Mutex<Vec<Vec<usize>>>>,
        cancelled: Arc<AtomicUsize>,
        avoid: Vec<usize>,
    }

    struct Cancelled(Arc<AtomicUsize>, bool);

    impl Drop for Cancelled {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl Picks for Script {
        fn picked(&self) -> Option<usize> {
            Some(self.sent.lock().unwrap().len())
        }

        fn avoid(&mut self, endpoints: &[usize]) {
            self.avoid = endpoints.to_vec();
        }
    }

    impl Service<Request<ReplayBody<Body>>> for Script {
        type Response = http::Response<()>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<ReplayBody<Body>>) -> Self::Future {
            let previous = request
                .headers()
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap().to_owned());
            self.sent.lock().unwrap().push((Instant::now(), previous));
            self.avoided.lock().unwrap().push(self.avoid.clone());
            let (delay, status) = self.answers.lock().unwrap().remove(0);
            let cancelled = Arc::clone(&self.cancelled);
            Box::pin(async move {
                let mut guard = Cancelled(cancelled, false);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                guard.1 = true;
                let mut answer = http::Response::new(());
                if status != 0 {
                    answer.headers_mut().insert("grpc-status", status.into());
                }
                Ok(answer)
            })
        }
    }

    fn script(answers: &[(u64, u32)]) -> Script {
        Script {
            answers: Arc::new(Mutex::new(answers.to_vec())),
            ..Script::default()
        }
    }

    async fn hedge(
        script: &Script,
        max_attempts: u32,
        non_fatal: u32,
        throttle: Option<Arc<Throttle>>,
    ) -> (Option<u32>, u32) {
        let rules = HedgeRules {
            max_attempts,
            delay: Duration::from_millis(10),
            non_fatal,
        };
        let read = Read {
            frames: vec![Bytes::from_static(b"hello")],
            trailers: None,
            rest: None,
        };
        let head = Request::post("/").body(()).unwrap().into_parts().0;
        let mut service = script.clone();
        let mut hedge = HedgeFuture::start(
            &mut service,
            head,
            read,
            Arc::new(rules),
            throttle,
            Budget::new(usize::MAX),
            "svc".into(),
        );
        let answer = (&mut hedge).await.unwrap();
        let status = super::super::policy::grpc_status(answer.headers());
        (status, hedge.attempts())
    }

    /// Catches a hedge sent before its delay or not at all, one sent back to the instance
    /// already tried, a loser not cancelled, attempts past the one that won, and a missing
    /// `grpc-previous-rpc-attempts`.
    #[tokio::test(start_paused = true)]
    async fn a_hedge_goes_after_the_delay_elsewhere_and_the_loser_is_cancelled() {
        let _limit = tower_sd_testkit::time_limit(10);
        let script = script(&[(100, 0), (1, 0), (1, 0)]);
        let started = Instant::now();
        let (status, attempts) = hedge(&script, 3, 0, None).await;
        assert_eq!((status, attempts), (None, 2));
        assert_eq!(started.elapsed(), Duration::from_millis(11));
        let sent = script.sent.lock().unwrap().clone();
        assert_eq!(sent[1].0 - sent[0].0, Duration::from_millis(10));
        assert_eq!(sent[0].1, None, "the first attempt is no retry");
        assert_eq!(sent[1].1.as_deref(), Some("1"));
        assert_eq!(*script.avoided.lock().unwrap(), [vec![], vec![0]]);
        assert_eq!(script.cancelled.load(Ordering::SeqCst), 1);
    }

    /// Catches a non-fatal answer that waits for the hedging delay (the next attempt must
    /// go at once), a fatal one that lets the others go on, and a call that ends before
    /// its last attempt when every answer is non-fatal.
    #[tokio::test(start_paused = true)]
    async fn non_fatal_answers_send_the_next_at_once_and_a_fatal_one_ends_the_call() {
        let _limit = tower_sd_testkit::time_limit(10);
        let script1 = script(&[(1, 14), (1, 14), (1, 14)]);
        let started = Instant::now();
        let (status, attempts) = hedge(&script1, 3, 1 << 14, None).await;
        assert_eq!((status, attempts), (Some(14), 3));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(3),
            "no delay waited"
        );

        let script2 = script(&[(1, 13), (50, 0)]);
        let (status, attempts) = hedge(&script2, 3, 1 << 14, None).await;
        assert_eq!((status, attempts), (Some(13), 1), "INTERNAL is fatal");
    }

    /// Catches hedges sent while the throttle forbids them.
    #[tokio::test(start_paused = true)]
    async fn the_throttle_stops_further_hedges() {
        let _limit = tower_sd_testkit::time_limit(10);
        // 2 tokens: the first non-fatal answer leaves 1, at half: no more attempts.
        let throttle = Arc::new(Throttle::new(2_000, 100));
        let script = script(&[(1, 14), (1, 14), (1, 14)]);
        let (status, attempts) = hedge(&script, 3, 1 << 14, Some(throttle)).await;
        assert_eq!((status, attempts), (Some(14), 1));
    }
}
