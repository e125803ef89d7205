//! [`ReplayBody`]: a request body that keeps what it has sent, up to a limit, so a request
//! the server did not process can be sent again with the same bytes.
//!
//! The body hyper reads and the request's response future share one [`Recording`]: the
//! frames sent so far (while they fit the limit) and the rest of the caller's body. A retry
//! takes the rest and the frames, and builds a new body that sends the frames first; the
//! old body, still held by the failed stream, then ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// A request body that records what it sends (see the module docs).
pub(crate) struct ReplayBody<B> {
    recording: Arc<Mutex<Recording<B>>>,
    /// Frames of an earlier attempt, sent before the rest of the caller's body.
    replay: VecDeque<Bytes>,
    replay_trailers: Option<HeaderMap>,
}

/// What a body has sent, and the rest of it.
pub(crate) struct Recording<B> {
    /// The caller's body; `None` once it ended or a retry took it.
    body: Option<B>,
    sent: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    bytes: usize,
    /// Bytes kept at most; past that, nothing is kept and no retry is possible.
    limit: usize,
    overflowed: bool,
}

impl<B> ReplayBody<B> {
    /// Wraps `body`, keeping up to `limit` bytes; returns the handle a retry needs.
    pub(crate) fn new(body: B, limit: usize) -> (Self, Replay<B>) {
        let recording = Arc::new(Mutex::new(Recording {
            body: Some(body),
            sent: Vec::new(),
            trailers: None,
            bytes: 0,
            limit,
            // A body none of which was sent can be sent again whatever the limit.
            overflowed: false,
        }));
        let handle = Replay(Arc::clone(&recording));
        let body = Self {
            recording,
            replay: VecDeque::new(),
            replay_trailers: None,
        };
        (body, handle)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording<B>> {
        self.recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A body sent once: nothing of it is kept, so a request that carries it is not sent
/// again. For calling a [`Connection`](super::Connection) directly; the integrations make
/// their own, which keep what a retry needs.
impl<B> From<B> for ReplayBody<B> {
    fn from(body: B) -> Self {
        Self::new(body, 0).0
    }
}

/// What a retry needs of a request's body.
pub(crate) struct Replay<B>(Arc<Mutex<Recording<B>>>);

impl<B> Replay<B> {
    /// A body that sends the same bytes again, with what the attempt after it needs;
    /// `None` when more was sent than the limit kept.
    pub(crate) fn again(&self) -> Option<(ReplayBody<B>, Replay<B>)> {
        let mut recording = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if recording.overflowed {
            return None;
        }
        let again = Recording {
            body: recording.body.take(),
            sent: Vec::new(),
            trailers: None,
            bytes: 0,
            limit: recording.limit,
            overflowed: false,
        };
        let again = Arc::new(Mutex::new(again));
        let body = ReplayBody {
            replay: recording.sent.iter().cloned().collect(),
            replay_trailers: recording.trailers.clone(),
            recording: Arc::clone(&again),
        };
        Some((body, Replay(again)))
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let mut recording = this
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(data) = this.replay.pop_front() {
            recording.keep(&data);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(body) = recording.body.as_mut() else {
            // Ended, or a retry took the rest: what an earlier attempt had as trailers, if any.
            return Poll::Ready(this.replay_trailers.take().map(|t| Ok(Frame::trailers(t))));
        };
        let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    recording.keep(data);
                } else if let Some(trailers) = frame.trailers_ref() {
                    recording.trailers = Some(trailers.clone());
                }
            }
            Some(Err(_)) => recording.body = None,
            None => {
                recording.body = None;
                // Trailers an earlier attempt read come after everything else.
                return Poll::Ready(this.replay_trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.replay.is_empty()
            && self.replay_trailers.is_none()
            && self.lock().body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let replayed: usize = self.replay.iter().map(Bytes::len).sum();
        let rest = self
            .lock()
            .body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let replayed = replayed as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(replayed));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(replayed));
        }
        hint
    }
}

impl<B> Recording<B> {
    /// Keeps a sent data frame, while the kept bytes stay within the limit.
    fn keep(&mut self, data: &Bytes) {
        if self.overflowed {
            return;
        }
        self.bytes += data.len();
        if self.bytes > self.limit {
            self.overflowed = true;
            self.sent = Vec::new();
        } else {
            self.sent.push(data.clone());
        }
    }
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("replay", &self.replay.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    async fn collect<B: Body<Data = Bytes> + Unpin>(body: B) -> Vec<u8>
    where
        B::Error: std::fmt::Debug,
    {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_bytes_whether_the_first_attempt_read_all_some_or_none() {
        let _limit = tower_sd_testkit::time_limit(10);
        let frames = || {
            let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = ["ab", "cd", "ef"]
                .iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                .collect();
            StreamBody::new(futures_util::stream::iter(chunks))
        };
        for read_first in 0..=3 {
            let (mut body, replay) = ReplayBody::new(frames(), 1024);
            for _ in 0..read_first {
                body.frame().await.unwrap().unwrap();
            }
            let (again, _) = replay.again().expect("within the limit");
            assert_eq!(collect(again).await, b"abcdef", "after {read_first} frames");
            // The first attempt's body ends: its rest went to the retry.
            assert!(body.frame().await.is_none());
        }
    }

    #[tokio::test]
    async fn a_body_past_the_limit_cannot_be_replayed_and_its_hints_pass_through() {
        let _limit = tower_sd_testkit::time_limit(10);
        let (mut body, replay) = ReplayBody::new(Full::new(Bytes::from_static(b"12345")), 4);
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        body.frame().await.unwrap().unwrap();
        assert!(body.is_end_stream());
        assert!(replay.again().is_none(), "5 bytes over a 4-byte limit");

        let (mut body, replay) = ReplayBody::new(Full::new(Bytes::from_static(b"xyz")), 0);
        body.frame().await.unwrap().unwrap();
        assert!(
            replay.again().is_none(),
            "a 0 limit keeps nothing once sent"
        );
    }

    /// Catches a body that cannot be sent again when none of it was sent (a request that
    /// never left the client), with a 0 limit, and a replay that cannot be replayed again.
    #[tokio::test]
    async fn a_body_none_of_which_was_sent_goes_again_whatever_the_limit() {
        let _limit = tower_sd_testkit::time_limit(10);
        let (_first, replay) = ReplayBody::new(Full::new(Bytes::from_static(b"xyz")), 0);
        let (second, replay) = replay.again().expect("nothing was sent");
        let (third, _) = replay.again().expect("the second sent nothing either");
        drop(second);
        assert_eq!(collect(third).await, b"xyz");

        let (mut first, replay) = ReplayBody::new(Full::new(Bytes::from_static(b"abc")), 16);
        first.frame().await.unwrap().unwrap();
        let (mut second, replay) = replay.again().unwrap();
        assert_eq!(
            second.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        let (third, _) = replay.again().expect("the second kept what it replayed");
        assert_eq!(collect(third).await, b"abc");
    }
}
