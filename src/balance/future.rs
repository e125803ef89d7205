//! [`ResponseFuture`]: a dispatched request, holding its endpoint until it completes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::endpoint::Endpoint;
use crate::error::BoxError;

/// Counts a request in flight on an endpoint and keeps the endpoint (and so its service and
/// connection) alive until the request completes or is dropped.
pub(crate) struct InFlight<S, K> {
    endpoint: Arc<Endpoint<S, K>>,
    started: Option<Instant>,
}

impl<S, K> InFlight<S, K> {
    pub(crate) fn start(endpoint: Arc<Endpoint<S, K>>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = endpoint.ewma.as_ref().map(|_| Instant::now());
        Self { endpoint, started }
    }

    fn complete(&mut self) {
        if let (Some(load), Some(started)) = (&self.endpoint.ewma, self.started.take()) {
            let now = Instant::now();
            load.observe(now.saturating_duration_since(started), now);
        }
    }
}

impl<S, K> Drop for InFlight<S, K> {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// The response future of [`Balance`](super::Balance).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F, S, K> {
        #[pin]
        inner: F,
        in_flight: InFlight<S, K>,
    }
}

impl<F, S, K> ResponseFuture<F, S, K> {
    pub(crate) fn new(inner: F, in_flight: InFlight<S, K>) -> Self {
        Self { inner, in_flight }
    }
}

impl<F, T, E, S, K> Future for ResponseFuture<F, S, K>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx));
        this.in_flight.complete();
        Poll::Ready(output.map_err(Into::into))
    }
}

impl<F, S, K: fmt::Debug> fmt::Debug for ResponseFuture<F, S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("endpoint", &self.in_flight.endpoint.key)
            .finish_non_exhaustive()
    }
}
