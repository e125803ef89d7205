//! Failure classification: which completed requests count against an endpoint, and when a
//! request is complete.

use crate::error::BoxError;

use super::completion::Completion;

/// Decides when a request is complete and whether it counts as a failure of the endpoint
/// that served it, for [outlier detection](super::OutlierDetection) and the load metrics.
///
/// `classify` receives the outcome with the request's [`Completion`]: complete it now, or
/// keep it in the response (as `HttpStatus` keeps it in the response body) so that the
/// request stays in flight, and its latency is measured, until the response ends.
///
/// Implement it for your own response types; [`ErrorsOnly`] and
/// [`HttpStatus`](crate::classify::HttpStatus) (features `http` or `tonic`) cover the
/// common cases.
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// The response the caller gets.
    type Response;

    /// Completes (now or later) the request that ended with `outcome`.
    ///
    /// # Errors
    ///
    /// The outcome's error, passed on.
    fn classify(
        &self,
        outcome: Result<Res, BoxError>,
        completion: Completion,
    ) -> Result<Self::Response, BoxError>;
}

/// Every error is a failure; every response is a success, complete when it arrives. The
/// default for any `Balance`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorsOnly;

impl<Res> Classify<Res> for ErrorsOnly {
    type Response = Res;

    #[inline]
    fn classify(
        &self,
        outcome: Result<Res, BoxError>,
        completion: Completion,
    ) -> Result<Res, BoxError> {
        completion.complete(outcome.is_err());
        outcome
    }
}
