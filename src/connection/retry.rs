//! [`Retry`]: gRPC A6's transparent retry, once, for a request the server provably did not
//! process.
//!
//! It wraps a balancer of [`Connection`](super::Connection)s. Each request's body goes into
//! a [`ReplayBody`] that keeps what it sends (up to the retry buffer). When the request
//! fails with [`ConnectionError::Unprocessed`] (it never left this process, or the server
//! refused its stream or sent a GOAWAY below it), it is sent once more through a fresh
//! pick, which passes over the connection that failed, and the caller sees only the second
//! outcome. Anything else, or a body that outgrew the buffer, is the caller's to see.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Request;
use http::request::Parts;
use tower::Service;
use tracing::debug;

use super::error::ConnectionError;
use super::replay::{Replay, ReplayBody};
use crate::error::BoxError;

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
        // The head is kept only when the body is: without the body there is no second
        // attempt.
        let head = (self.buffer > 0).then(|| parts.clone());
        let first = self.inner.call(Request::from_parts(parts, body));
        // A fresh handle for the second attempt: this one's readiness went to the first.
        let again = self.inner.clone();
        RetryFuture {
            state: State::First {
                first,
                again: Some(Again {
                    service: again,
                    head,
                    replay,
                }),
            },
            service: Arc::clone(&self.service),
        }
    }
}

/// What a second attempt needs.
struct Again<S, B> {
    service: S,
    head: Option<Parts>,
    replay: Replay<B>,
}

/// The response future of [`Retry`].
pub(crate) struct RetryFuture<S: Service<Request<ReplayBody<B>>>, B> {
    state: State<S, B>,
    service: Arc<str>,
}

enum State<S: Service<Request<ReplayBody<B>>>, B> {
    First {
        first: S::Future,
        again: Option<Again<S, B>>,
    },
    Readying {
        service: S,
        request: Option<Request<ReplayBody<B>>>,
    },
    Second {
        second: S::Future,
    },
}

impl<S, B> Future for RetryFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Error = BoxError> + Unpin,
    S::Future: Unpin,
    B: 'static,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::First { first, again } => {
                    let error = match ready!(Pin::new(first).poll(cx)) {
                        Ok(response) => return Poll::Ready(Ok(response)),
                        Err(error) => error,
                    };
                    let Some((request, service)) =
                        again.take().and_then(|again| again.request(&error))
                    else {
                        return Poll::Ready(Err(error));
                    };
                    debug!(service = %this.service, error = %crate::error::Chain(&*error), "request not processed; sending it again");
                    #[cfg(feature = "metrics")]
                    metrics::counter!("tower_sd_transparent_retries_total", "service" => this.service.to_string()).increment(1);
                    this.state = State::Readying {
                        service,
                        request: Some(request),
                    };
                }
                State::Readying { service, request } => {
                    ready!(service.poll_ready(cx))?;
                    let request = request.take().expect("set when readying");
                    let second = service.call(request);
                    this.state = State::Second { second };
                }
                State::Second { second } => return Pin::new(second).poll(cx),
            }
        }
    }
}

impl<S, B> Again<S, B> {
    /// The request to send again, with the service to send it through, when `error` says
    /// the server did not process it and its body can be sent again.
    fn request(self, error: &BoxError) -> Option<(Request<ReplayBody<B>>, S)>
    where
        B: 'static,
    {
        let error: &ConnectionError = error.downcast_ref()?;
        if !error.is_unprocessed() {
            return None;
        }
        let body = self.replay.again()?;
        Some((Request::from_parts(self.head?, body), self.service))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures_util::FutureExt;
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;

    use super::*;
    use crate::balance::Connectivity;

    type Body = ReplayBody<Full<Bytes>>;

    /// An inner service that answers with the next scripted outcome and records each
    /// request's body (read to the end before answering).
    #[derive(Clone)]
    struct Script {
        outcomes: Arc<Mutex<Vec<Outcome>>>,
        bodies: Arc<Mutex<Vec<Bytes>>>,
    }

    #[derive(Clone, Copy, Debug)]
    enum Outcome {
        Ok,
        Unprocessed,
        Failed,
    }

    impl Script {
        fn new(outcomes: &[Outcome]) -> Self {
            let mut outcomes = outcomes.to_vec();
            outcomes.reverse();
            Self {
                outcomes: Arc::new(Mutex::new(outcomes)),
                bodies: Arc::default(),
            }
        }

        fn bodies(&self) -> Vec<Bytes> {
            self.bodies.lock().unwrap().clone()
        }
    }

    impl Service<Request<Body>> for Script {
        type Response = &'static str;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let outcome = self
                .outcomes
                .lock()
                .unwrap()
                .pop()
                .expect("a scripted outcome");
            let bodies = Arc::clone(&self.bodies);
            Box::pin(async move {
                let body = request.into_body().collect().await?.to_bytes();
                bodies.lock().unwrap().push(body);
                match outcome {
                    Outcome::Ok => Ok("answered"),
                    Outcome::Unprocessed => Err(Box::new(ConnectionError::NotConnected {
                        authority: "10.0.0.1:80".into(),
                        state: Connectivity::Connecting,
                        source: None,
                    }) as BoxError),
                    Outcome::Failed => Err("reset by the server after it read the request".into()),
                }
            })
        }
    }

    fn send(script: &Script, buffer: usize, body: &'static str) -> Result<&'static str, BoxError> {
        let retry = Retry::new(script.clone(), buffer, "svc");
        let request = Request::post("/")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        retry
            .oneshot(request)
            .now_or_never()
            .expect("nothing here waits")
    }

    /// Catches no retry, a retry that sends an empty or partial body, and a second
    /// outcome the caller does not see.
    #[test]
    fn an_unprocessed_request_is_sent_once_more_with_the_same_body() {
        let script = Script::new(&[Outcome::Unprocessed, Outcome::Ok]);
        assert_eq!(send(&script, 1024, "hello").unwrap(), "answered");
        assert_eq!(script.bodies(), ["hello", "hello"]);
    }

    /// Catches retrying until it works (a loop): once, then the caller sees the error.
    #[test]
    fn it_is_sent_again_once_only() {
        let script = Script::new(&[Outcome::Unprocessed, Outcome::Unprocessed, Outcome::Ok]);
        let error = send(&script, 1024, "hello").unwrap_err();
        assert!(error.downcast_ref::<ConnectionError>().is_some(), "{error}");
        assert_eq!(script.bodies().len(), 2);
    }

    /// Catches retrying a request the server may have processed (not idempotent-safe).
    #[test]
    fn a_request_that_may_have_been_processed_is_not_sent_again() {
        let script = Script::new(&[Outcome::Failed, Outcome::Ok]);
        let error = send(&script, 1024, "hello").unwrap_err();
        assert!(error.to_string().contains("reset by the server"), "{error}");
        assert_eq!(script.bodies().len(), 1);
    }

    /// Catches a retry that sends a body it could not keep: past the buffer, the bytes
    /// already sent are gone, so the caller sees the error.
    #[test]
    fn a_body_larger_than_the_buffer_is_not_sent_again() {
        let script = Script::new(&[Outcome::Unprocessed, Outcome::Ok]);
        let error = send(&script, 4, "hello").unwrap_err();
        assert!(error.downcast_ref::<ConnectionError>().is_some(), "{error}");
        assert_eq!(script.bodies(), ["hello"]);
        let script = Script::new(&[Outcome::Unprocessed, Outcome::Ok]);
        assert_eq!(send(&script, 5, "hello").unwrap(), "answered");
    }
}
