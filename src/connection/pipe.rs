//! [`Pipe`]: sends a request body to its h2 stream, as hyper's client does, from whichever
//! task polls it: the response future while the response is awaited, then a task of its own
//! if the body still streams.
//!
//! Data is sent once the stream has room for it (so a body is never read faster than the
//! server takes it), and the last chunk of a body that ends at once goes out with the end of
//! the stream: a unary request is HEADERS and one DATA frame.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::SendStream;
use http_body::Body;

use super::SendBody;
use super::replay::ReplayBody;
use crate::error::BoxError;

/// Why a body was not sent whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PipeError {
    /// The caller's body failed; the stream is reset.
    #[error("the request body failed")]
    Body(#[source] BoxError),
    /// The stream would take no more: the server reset it or ended it (it may have answered
    /// already, without reading the rest; RFC 9113, 8.1), or the connection closed. The
    /// response, or its error, says what happened.
    #[error("the stream took no more of the request body")]
    Stream(#[source] Option<h2::Error>),
}

impl From<h2::Error> for PipeError {
    fn from(error: h2::Error) -> Self {
        Self::Stream(Some(error))
    }
}

/// A request body on its way to its stream.
pub(crate) struct Pipe<B> {
    body: ReplayBody<B>,
    stream: SendStream<Bytes>,
    /// A chunk read and not yet sent: it goes with the end of the stream if the body ends
    /// right after it.
    held: Option<Bytes>,
    /// Chunks read so far. The first one, and whether the body ends right after it, are
    /// read without waiting for capacity (a unary request queues HEADERS and its one DATA
    /// frame without a round trip through the connection's task); from then on each chunk
    /// waits for room, so at most two chunks more than the stream can take are buffered.
    chunks: usize,
}

impl<B: SendBody> Pipe<B> {
    pub(crate) fn new(body: ReplayBody<B>, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            held: None,
            chunks: 0,
        }
    }

    /// Sends what the body has; ready when all of it is sent (or sending failed, in which
    /// case the stream is reset).
    pub(crate) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        loop {
            if self.chunks >= 2 || (self.chunks == 1 && self.held.is_none()) {
                ready!(self.poll_room(cx))?;
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    if let Some(data) = self.held.take() {
                        self.stream.send_data(data, false)?;
                    }
                    // Waiting for the caller's body: notice a reset from the server meanwhile.
                    if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                        let error = reason.map_or_else(|error| error, h2::Error::from);
                        return Poll::Ready(Err(PipeError::Stream(Some(error))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(frame) => frame,
            };
            match frame {
                None => {
                    let last = self.held.take().unwrap_or_default();
                    self.stream.send_data(last, true)?;
                    return Poll::Ready(Ok(()));
                }
                Some(Err(error)) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Err(PipeError::Body(error.into())));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.chunks = self.chunks.saturating_add(1);
                        if let Some(earlier) = self.held.replace(data) {
                            self.stream.send_data(earlier, false)?;
                        }
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        if let Some(data) = self.held.take() {
                            self.stream.send_data(data, false)?;
                        }
                        self.stream.reserve_capacity(0);
                        self.stream.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                },
            }
        }
    }

    /// Waits until the stream has room for more data.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        self.stream.reserve_capacity(1);
        while self.stream.capacity() == 0 {
            match ready!(self.stream.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(error.into())),
                None => return Poll::Ready(Err(PipeError::Stream(None))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends the rest of the body (in a task of its own).
    pub(crate) async fn send(mut self) {
        if let Err(error) = std::future::poll_fn(|cx| self.poll_send(cx)).await {
            tracing::debug!(error = %crate::error::Chain(&error), "request body not sent whole");
        }
    }
}
