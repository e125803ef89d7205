//! [`HealthProbe`]: whether this instance is serving, for its health endpoint: 503 once it
//! drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the instance is serving; cheap to clone into a health handler.
#[derive(Clone, Debug)]
pub struct HealthProbe {
    pub(super) draining: Arc<AtomicBool>,
}

impl HealthProbe {
    /// `false` once shutdown started.
    pub fn is_serving(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }
}

#[cfg(feature = "http")]
mod health_service {
    use std::convert::Infallible;
    use std::future::{Ready, ready};
    use std::task::{Context, Poll};

    use super::HealthProbe;

    /// A health endpoint: `200 ok` while serving, `503 draining` once shutdown started, so
    /// an HTTP check sees the drain before the instance leaves the registry. Mount it as a
    /// route, e.g. `Router::new().route_service("/healthz", registration.health())` in axum.
    impl<B> tower::Service<http::Request<B>> for HealthProbe {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<B>) -> Self::Future {
            let (status, body) = if self.is_serving() {
                (http::StatusCode::OK, "ok")
            } else {
                (http::StatusCode::SERVICE_UNAVAILABLE, "draining")
            };
            let mut response = http::Response::new(body.to_owned());
            *response.status_mut() = status;
            ready(Ok(response))
        }
    }
}
