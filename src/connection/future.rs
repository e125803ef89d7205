//! [`ResponseFuture`]: a request sent on a [`Connection`](super::Connection), sending its
//! body while it waits for the response.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use http::Response;
use tracing::debug;

use super::SendBody;
use super::body::{Body, StreamGuard};
use super::error::ConnectionError;
use super::pipe::{Pipe, PipeError};
use super::pool::Handle;

/// The response future of a [`Connection`](super::Connection). It sends the request body while it waits: all
/// of it, for a body that is ready at once.
#[must_use = "futures do nothing unless polled"]
pub(crate) struct ResponseFuture<B> {
    inner: Option<Inner<B>>,
    failed: Option<ConnectionError>,
}

struct Inner<B> {
    response: h2::client::ResponseFuture,
    /// The request body still to send, if any.
    pipe: Option<Pipe<B>>,
    guard: StreamGuard,
    handle: Arc<Handle>,
}

impl<B> ResponseFuture<B> {
    /// A request whose head h2 took: its body is sent as the response is awaited.
    pub(crate) fn sent(
        response: h2::client::ResponseFuture,
        pipe: Option<Pipe<B>>,
        guard: StreamGuard,
        handle: Arc<Handle>,
    ) -> Self {
        Self {
            inner: Some(Inner {
                response,
                pipe,
                guard,
                handle,
            }),
            failed: None,
        }
    }

    pub(crate) fn failed(error: ConnectionError) -> Self {
        Self {
            inner: None,
            failed: Some(error),
        }
    }
}

impl<B: SendBody> Future for ResponseFuture<B> {
    type Output = Result<Response<Body>, ConnectionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            let error = this
                .failed
                .take()
                .expect("ResponseFuture polled after completion");
            return Poll::Ready(Err(error));
        };
        if let Some(pipe) = &mut inner.pipe
            && let Poll::Ready(sent) = pipe.poll_send(cx)
        {
            inner.pipe = None;
            match sent {
                Ok(()) => {}
                // The stream took no more: the response (perhaps sent without reading the
                // rest, RFC 9113, 8.1) or its error tells the caller what happened.
                Err(PipeError::Stream(error)) => {
                    debug!(error = ?error, "request body not sent whole");
                }
                Err(PipeError::Body(error)) => {
                    let authority = inner.handle.state.authority.clone();
                    // Dropping the stream's halves resets it.
                    this.inner = None;
                    return Poll::Ready(Err(ConnectionError::Request {
                        authority,
                        source: error,
                    }));
                }
            }
        }
        let outcome = ready!(Pin::new(&mut inner.response).poll(cx));
        let Inner {
            guard,
            handle,
            pipe,
            ..
        } = this.inner.take().expect("polled");
        match outcome {
            Ok(response) => {
                guard.conn().answered();
                // A body still streaming (a client or bidi stream) goes on by itself.
                let pipe = pipe.map(|pipe| tokio::spawn(pipe.send()).abort_handle());
                let (parts, recv) = response.into_parts();
                let body = Body::new(recv, guard, pipe, handle, &parts.headers);
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            Err(error) => {
                if error.is_go_away() {
                    // No retry may pick it before its driver notices.
                    guard.conn().closed.store(true, Ordering::Relaxed);
                    handle.state.demand.notify_one();
                }
                let authority = handle.state.authority.clone();
                Poll::Ready(Err(ConnectionError::of_stream(authority, error)))
            }
        }
    }
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("sent", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}
