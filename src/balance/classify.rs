//! Failure classification: which completed requests count against an endpoint.

use crate::error::BoxError;

/// Decides whether a completed request counts as a failure of the endpoint that served it,
/// for [outlier detection](super::OutlierDetection).
///
/// Implement it for your own response types; [`ErrorsOnly`] and `HttpStatus` (features
/// `http` or `tonic`) cover the common cases.
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// `true` when this outcome is the endpoint's fault.
    fn is_failure(&self, outcome: Result<&Res, &BoxError>) -> bool;
}

/// Every error is a failure; every response is a success. The default for any `Balance`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorsOnly;

impl<Res> Classify<Res> for ErrorsOnly {
    fn is_failure(&self, outcome: Result<&Res, &BoxError>) -> bool {
        outcome.is_err()
    }
}

/// For HTTP and gRPC: errors (transport, connect, timeout), HTTP 5xx, and the gRPC codes that
/// mean the server cannot serve: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED` and
/// `INTERNAL`, read from the `grpc-status` response header.
///
/// A gRPC error that the server sends as a trailers-only response (the usual way to fail a
/// unary call) carries `grpc-status` in the headers, which the balancer sees. A status sent
/// in trailers after a body is not visible to the balancer, which completes with the
/// headers.
#[cfg(any(feature = "http", feature = "tonic"))]
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpStatus;

/// gRPC codes that count as failures: INTERNAL 13, UNAVAILABLE 14, DEADLINE_EXCEEDED 4,
/// RESOURCE_EXHAUSTED 8.
#[cfg(any(feature = "http", feature = "tonic"))]
const GRPC_FAILURES: [&[u8]; 4] = [b"4", b"8", b"13", b"14"];

#[cfg(any(feature = "http", feature = "tonic"))]
impl<B> Classify<http::Response<B>> for HttpStatus {
    fn is_failure(&self, outcome: Result<&http::Response<B>, &BoxError>) -> bool {
        match outcome {
            Err(_) => true,
            Ok(response) => {
                response.status().is_server_error()
                    || response
                        .headers()
                        .get("grpc-status")
                        .is_some_and(|code| GRPC_FAILURES.contains(&code.as_bytes()))
            }
        }
    }
}

#[cfg(all(test, any(feature = "http", feature = "tonic")))]
mod tests {
    use super::*;

    fn response(status: u16, grpc: Option<&str>) -> http::Response<()> {
        let mut builder = http::Response::builder().status(status);
        if let Some(code) = grpc {
            builder = builder.header("grpc-status", code);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn http_status_classifies_5xx_and_grpc_codes() {
        let c = HttpStatus;
        assert!(!c.is_failure(Ok(&response(200, None))));
        assert!(!c.is_failure(Ok(&response(404, None))));
        assert!(c.is_failure(Ok(&response(503, None))));
        for code in ["4", "8", "13", "14"] {
            assert!(c.is_failure(Ok(&response(200, Some(code)))), "{code}");
        }
        for code in ["0", "5", "3", "16"] {
            assert!(!c.is_failure(Ok(&response(200, Some(code)))), "{code}");
        }
        let error: BoxError = "connection refused".into();
        assert!(c.is_failure(Err::<&http::Response<()>, _>(&error)));
        assert!(ErrorsOnly.is_failure(Err::<&(), _>(&error)));
        assert!(!ErrorsOnly.is_failure(Ok(&())));
    }
}
