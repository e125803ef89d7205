//! [`ResponseFuture`]: a dispatched request, holding its endpoint until it completes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::classify::{Classify, ErrorsOnly};
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

    /// Whether the outcome needs classifying (outlier detection is on).
    fn classifies(&self) -> bool {
        self.endpoint.detector.is_some()
    }

    fn complete(&mut self, failure: bool)
    where
        K: fmt::Debug,
    {
        if let (Some(load), Some(started)) = (&self.endpoint.ewma, self.started.take()) {
            let now = Instant::now();
            load.observe(now.saturating_duration_since(started), now);
        }
        if let Some(detector) = &self.endpoint.detector {
            self.endpoint
                .health
                .record(detector, &self.endpoint.key, failure);
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
    pub struct ResponseFuture<F, S, K, C = ErrorsOnly> {
        #[pin]
        inner: F,
        in_flight: InFlight<S, K>,
        classify: C,
    }
}

impl<F, S, K, C> ResponseFuture<F, S, K, C> {
    pub(crate) fn new(inner: F, in_flight: InFlight<S, K>, classify: C) -> Self {
        Self {
            inner,
            in_flight,
            classify,
        }
    }
}

impl<F, T, E, S, K, C> Future for ResponseFuture<F, S, K, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    K: fmt::Debug,
    C: Classify<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx)).map_err(Into::into);
        let failure = this.in_flight.classifies() && this.classify.is_failure(output.as_ref());
        this.in_flight.complete(failure);
        Poll::Ready(output)
    }
}

impl<F, S, K: fmt::Debug, C> fmt::Debug for ResponseFuture<F, S, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("endpoint", &self.in_flight.endpoint.key)
            .finish_non_exhaustive()
    }
}
