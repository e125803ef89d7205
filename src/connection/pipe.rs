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

/// The stream closed while its request body was being sent.
#[derive(Debug, thiserror::Error)]
#[error("the stream closed before the request body was sent")]
struct StreamClosed;

/// A request body on its way to its stream.
pub(crate) struct Pipe<B> {
    body: ReplayBody<B>,
    stream: SendStream<Bytes>,
    /// A chunk read and not yet sent: it goes with the end of the stream if the body ends
    /// right after it.
    held: Option<Bytes>,
    /// The first chunk is read without waiting for capacity (the stream starts with the
    /// server's initial window); each later one waits for room, so at most one chunk more
    /// than the stream can take is ever buffered.
    started: bool,
}

impl<B: SendBody> Pipe<B> {
    pub(crate) fn new(body: ReplayBody<B>, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            held: None,
            started: false,
        }
    }

    /// Sends what the body has; ready when all of it is sent (or sending failed, in which
    /// case the stream is reset).
    pub(crate) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            if self.started {
                ready!(self.poll_room(cx))?;
            }
            self.started = true;
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    if let Some(data) = self.held.take() {
                        self.stream.send_data(data, false)?;
                    }
                    // Waiting for the caller's body: notice a reset from the server meanwhile.
                    if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                        let reason = reason?;
                        return Poll::Ready(Err(Box::new(h2::Error::from(reason))));
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
                    return Poll::Ready(Err(error.into()));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
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
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.stream.reserve_capacity(1);
        while self.stream.capacity() == 0 {
            match ready!(self.stream.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(Box::new(error))),
                None => return Poll::Ready(Err(Box::new(StreamClosed))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends the rest of the body (in a task of its own).
    pub(crate) async fn send(mut self) {
        if let Err(error) = std::future::poll_fn(|cx| self.poll_send(cx)).await {
            tracing::debug!(error = %crate::error::Chain(&*error), "request body not sent whole");
        }
    }
}
