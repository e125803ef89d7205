//! [`HttpStatus`]: what an HTTP or gRPC response says about the endpoint that served it, for
//! the balancer's outlier detection and load (see [`Classify`]).
//!
//! gRPC puts a call's status in `grpc-status`: in the response headers of a trailers-only
//! response (the usual way a unary call fails) or in the trailers (a call that streamed data
//! and then failed).
//!
//! [`Classify`]: crate::balance::Classify

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::balance::{Classify, Completion};
use crate::error::BoxError;

/// For HTTP and gRPC: errors (transport, connect, timeout; not a request the server
/// provably did not process, which says nothing of it), HTTP 5xx, and the gRPC codes
/// that mean the server cannot serve: `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
/// `RESOURCE_EXHAUSTED` and `INTERNAL`, read from `grpc-status` in the response headers
/// (a trailers-only response, the usual way a unary call fails) or in the trailers (a
/// call that streamed data and then failed).
///
/// The request stays in flight until its response body ends or is dropped, so an open
/// stream counts as load, and peak EWMA measures the whole response. A body dropped
/// before its end counts as abandoned, not as a failure.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpStatus;

/// gRPC codes that count as failures: DEADLINE_EXCEEDED 4, RESOURCE_EXHAUSTED 8,
/// INTERNAL 13, UNAVAILABLE 14.
const GRPC_FAILURES: [&[u8]; 4] = [b"4", b"8", b"13", b"14"];

/// Whether the server provably did not process the request.
fn unprocessed(error: &BoxError) -> bool {
    error
        .downcast_ref::<crate::connection::ConnectionError>()
        .is_some_and(crate::connection::ConnectionError::is_unprocessed)
}

fn grpc_failure(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|code| GRPC_FAILURES.contains(&code.as_bytes()))
}

impl<B: Body> Classify<http::Response<B>> for HttpStatus {
    type Response = http::Response<ResponseBody<B>>;

    fn classify(
        &self,
        outcome: Result<http::Response<B>, BoxError>,
        completion: Completion,
    ) -> Result<Self::Response, BoxError> {
        let response = match outcome {
            Ok(response) => response,
            // Never sent, or refused unprocessed (and retried elsewhere): no verdict on
            // the endpoint, as a request its caller gave up on.
            Err(error) if unprocessed(&error) => {
                drop(completion);
                return Err(error);
            }
            Err(error) => {
                completion.complete(true);
                return Err(error);
            }
        };
        let failure = response.status().is_server_error() || grpc_failure(response.headers());
        Ok(response.map(|body| {
            let mut body = ResponseBody {
                inner: body,
                completion: Some(completion),
                failure,
            };
            if body.inner.is_end_stream() {
                body.end();
            }
            body
        }))
    }
}

pin_project! {
    /// A response body that keeps its request in flight until it ends (see
    /// [`HttpStatus`]).
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        completion: Option<Completion>,
        failure: bool,
    }
}

impl<B> ResponseBody<B> {
    /// A body no balancer tracks (a request the HTTP layer passed through).
    #[cfg(feature = "http")]
    pub(crate) fn untracked(inner: B) -> Self {
        Self {
            inner,
            completion: None,
            failure: false,
        }
    }

    fn end(&mut self) {
        if let Some(completion) = self.completion.take() {
            completion.complete(self.failure);
        }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let end = |completion: &mut Option<Completion>, failure: bool| {
            if let Some(completion) = completion.take() {
                completion.complete(failure);
            }
        };
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    *this.failure |= grpc_failure(trailers);
                }
                if this.inner.is_end_stream() {
                    end(this.completion, *this.failure);
                }
            }
            Some(Err(_)) => end(this.completion, true),
            None => end(this.completion, *this.failure),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("ended", &self.completion.is_none())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::balance::Track;
    use crate::connection::ConnectionError;

    /// What the classifier told the endpoint: `Some(failure)`, or `None` (abandoned).
    #[derive(Default)]
    struct Verdicts(Mutex<Vec<Option<bool>>>);

    impl Track for Verdicts {
        fn done(&self, outcome: Option<bool>, _: u64, _: bool) {
            self.0.lock().unwrap().push(outcome);
        }
    }

    fn verdict(error: ConnectionError) -> Option<bool> {
        let verdicts = Arc::new(Verdicts::default());
        let completion = Completion::tracked_by(Arc::clone(&verdicts) as Arc<dyn Track>);
        let outcome: Result<http::Response<String>, BoxError> = Err(Box::new(error));
        assert!(HttpStatus.classify(outcome, completion).is_err());
        let verdicts = verdicts.0.lock().unwrap();
        assert_eq!(verdicts.len(), 1, "one verdict");
        verdicts[0]
    }

    /// The verdict on a response with `status` and, if any, `grpc-status: code` in its
    /// headers (trailers-only), once its body ended.
    fn verdict_on(status: u16, code: Option<&str>) -> Option<bool> {
        let verdicts = Arc::new(Verdicts::default());
        let completion = Completion::tracked_by(Arc::clone(&verdicts) as Arc<dyn Track>);
        let mut response = http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        if let Some(code) = code {
            response
                .headers_mut()
                .insert("grpc-status", code.parse().unwrap());
        }
        drop(HttpStatus.classify(Ok(response), completion).unwrap());
        let verdicts = verdicts.0.lock().unwrap();
        assert_eq!(verdicts.len(), 1, "one verdict");
        verdicts[0]
    }

    /// Catches a failure code missed or one too many: gRPC's DEADLINE_EXCEEDED (4),
    /// RESOURCE_EXHAUSTED (8), INTERNAL (13) and UNAVAILABLE (14) and HTTP 5xx say the
    /// server cannot serve; every other gRPC code (NOT_FOUND, PERMISSION_DENIED, ...) and
    /// HTTP 4xx are the caller's business, not the server's health.
    #[test]
    fn every_failure_code_and_only_those_count_against_the_server() {
        for code in 0..=16 {
            let failure = [4, 8, 13, 14].contains(&code);
            let verdict = verdict_on(200, Some(&code.to_string()));
            assert_eq!(verdict, Some(failure), "grpc-status {code}");
        }
        for status in [200, 204, 301, 400, 401, 403, 404, 409, 429, 499] {
            assert_eq!(verdict_on(status, None), Some(false), "HTTP {status}");
        }
        for status in [500, 502, 503, 504, 599] {
            assert_eq!(verdict_on(status, None), Some(true), "HTTP {status}");
        }
        assert_eq!(verdict_on(200, Some("140")), Some(false), "not 14");
    }

    /// Catches outlier detection counting requests the server never processed (a GOAWAY's
    /// refusals ejected healthy nginx instances for 30 s) and one that stops counting real
    /// failures.
    #[test]
    fn unprocessed_requests_are_no_verdict_and_failed_ones_are_failures() {
        let authority = || "10.0.0.1:80".to_owned();
        let h2 = || Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)) as BoxError;
        let none = [
            ConnectionError::NotSent {
                authority: authority(),
                source: h2(),
            },
            ConnectionError::GoAway {
                authority: authority(),
                source: h2(),
            },
            ConnectionError::Unprocessed {
                authority: authority(),
                source: h2(),
            },
        ];
        for error in none {
            assert_eq!(verdict(error), None, "no verdict");
        }
        let failed = ConnectionError::Request {
            authority: authority(),
            source: h2(),
        };
        assert_eq!(verdict(failed), Some(true));
    }
}
