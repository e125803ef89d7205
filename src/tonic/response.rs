//! What a call of a [`LoadBalancedChannel`](super::LoadBalancedChannel)(super::LoadBalancedChannel) returns: its
//! [`ResponseFuture`], over the call's attempts (retried or hedged), and the [`ChannelBody`]
//! that carries the response on, with the call's deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;

use super::ChannelBalance;
use super::status::{deadline_exceeded, note_attempts, status_of, status_of_transport};
use crate::classify::ResponseBody;
use crate::connection;
use crate::connection::hedge::HedgeFuture;
use crate::connection::policy::{Throttle, grpc_status};
use crate::connection::replay::Replay;
use crate::connection::retry::RetryFuture;
use crate::error::BoxError;

/// The response body of a [`LoadBalancedChannel`](super::LoadBalancedChannel): the connection's, kept in flight by the
/// balancer until it ends, with transport errors as gRPC statuses, and ended with
/// `DEADLINE_EXCEEDED` when the call's deadline passes before it does.
pub struct ChannelBody {
    inner: Option<ResponseBody<connection::Body>>,
    /// The call's deadline, with its length for the message.
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// The channel's retry throttle, told when the call ends in success.
    throttle: Option<Arc<Throttle>>,
}

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            if let (Some(throttle), Some(Ok(frame))) = (&this.throttle, &frame)
                && frame.trailers_ref().and_then(grpc_status) == Some(0)
            {
                throttle.success();
            }
            return Poll::Ready(
                frame.map(|frame| frame.map_err(|error| status_of_transport(&error))),
            );
        }
        if let Some((limit, sleep)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            let status = deadline_exceeded(*limit);
            // Dropping the body resets its stream.
            this.inner = None;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

impl fmt::Debug for ChannelBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBody")
            .field("ended", &self.inner.is_none())
            .field("deadline", &self.deadline.as_ref().map(|(limit, _)| limit))
            .finish()
    }
}

/// A call's attempts: retried, or hedged. The hedged call, the rare one, is boxed so the
/// common one costs no allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Attempts {
    Retry(RetryFuture<ChannelBalance, Replay<Body>>),
    Hedge(Box<HedgeFuture<ChannelBalance, Body>>),
}

impl Attempts {
    fn attempts(&self) -> u32 {
        match self {
            Self::Retry(retry) => retry.attempts(),
            Self::Hedge(hedge) => hedge.attempts(),
        }
    }
}

impl Future for Attempts {
    type Output = Result<http::Response<ResponseBody<connection::Body>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Retry(retry) => Pin::new(retry).poll(cx),
            Self::Hedge(hedge) => Pin::new(&mut **hedge).poll(cx),
        }
    }
}

/// The response future of [`LoadBalancedChannel`](super::LoadBalancedChannel).
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    inner: Option<Attempts>,
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    failed: Option<tonic::Status>,
    throttle: Option<Arc<Throttle>>,
}

impl ResponseFuture {
    /// The future of a call sent as `attempts`, which ends by `limit` when set.
    pub(super) fn sent(
        attempts: Attempts,
        limit: Option<Duration>,
        throttle: Option<Arc<Throttle>>,
    ) -> Self {
        Self {
            inner: Some(attempts),
            deadline: limit.map(|limit| (limit, Box::pin(tokio::time::sleep(limit)))),
            failed: None,
            throttle,
        }
    }

    /// The future of a call that failed before it was sent.
    pub(super) fn failed(status: tonic::Status) -> Self {
        Self {
            inner: None,
            deadline: None,
            failed: Some(status),
            throttle: None,
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ChannelBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            let status = this.failed.take().expect("polled after completion");
            return Poll::Ready(Err(Box::new(status)));
        };
        if let Poll::Ready(outcome) = Pin::new(&mut *inner).poll(cx) {
            let attempts = inner.attempts();
            this.inner = None;
            return Poll::Ready(match outcome {
                Ok(mut response) => {
                    let status = grpc_status(response.headers());
                    if status == Some(0)
                        && let Some(throttle) = &this.throttle
                    {
                        throttle.success();
                    }
                    if status.is_some_and(|code| code != 0) && attempts > 1 {
                        note_attempts(response.headers_mut(), attempts);
                    }
                    // The deadline goes on with the body.
                    Ok(response.map(|body| ChannelBody {
                        inner: Some(body),
                        deadline: this.deadline.take(),
                        throttle: this.throttle.take(),
                    }))
                }
                Err(error) => {
                    let status = status_of(error);
                    Err(Box::new(if attempts > 1 {
                        tonic::Status::with_details_and_metadata(
                            status.code(),
                            format!("{} ({attempts} attempts)", status.message()),
                            status.details().to_vec().into(),
                            status.metadata().clone(),
                        )
                    } else {
                        status
                    }))
                }
            });
        }
        if let Some((limit, sleep)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            // Dropping the request resets its stream.
            this.inner = None;
            return Poll::Ready(Err(Box::new(deadline_exceeded(*limit))));
        }
        Poll::Pending
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.inner.is_some() {
            "dispatched"
        } else {
            "failed"
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
