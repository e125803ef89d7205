//! [`ResponseFuture`]: a dispatched request, holding its endpoint's in-flight claim (its
//! [`Completion`]) until the response is classified.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::classify::{Classify, ErrorsOnly};
use super::completion::Completion;
use crate::error::BoxError;

pin_project! {
    /// The response future of [`Balance`](super::Balance).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F, C = ErrorsOnly> {
        #[pin]
        inner: F,
        completion: Option<Completion>,
        classify: C,
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn new(inner: F, completion: Completion, classify: C) -> Self {
        Self {
            inner,
            completion: Some(completion),
            classify,
        }
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T>,
{
    type Output = Result<C::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx)).map_err(Into::into);
        let completion = this
            .completion
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(this.classify.classify(output, completion))
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("completion", &self.completion)
            .finish_non_exhaustive()
    }
}
