//! [`ReplayBody`]: a request body that keeps what it has sent, up to a limit, so a request
//! the server did not process can be sent again with the same bytes.
//!
//! Every attempt of a request shares one [`Recording`]: the caller's body, the frames read
//! from it so far (while they fit the limit), and which attempt is current. An attempt's body
//! first sends the recorded frames it has not sent, then reads on from the caller's body,
//! recording as it goes; a retry makes the next attempt current, and the body of the
//! attempt before it, still held by its failed stream, ends. So an attempt that failed before
//! it sent anything (no connection took it) loses nothing for the one after it.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// A request body that records what it sends (see the module docs).
pub(crate) struct ReplayBody<B> {
    recording: Arc<Mutex<Recording<B>>>,
    /// Which attempt this body is: once a later one is current, this one ends.
    attempt: u32,
    /// The recorded frames this body has sent.
    next: usize,
    /// Whether this body has sent the recorded trailers.
    sent_trailers: bool,
}

/// What the caller's body has given so far, and the rest of it.
pub(crate) struct Recording<B> {
    /// The caller's body; `None` once it ended.
    body: Option<B>,
    /// The data frames read from `body`, in order.
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    bytes: usize,
    /// Bytes kept at most; past that, nothing is kept and no retry is possible.
    limit: usize,
    /// What every request of the channel keeps together, `bytes` of it this one's.
    budget: Arc<Budget>,
    overflowed: bool,
    /// The attempt whose body may send.
    attempt: u32,
}

/// A request body as read before any attempt sends it: the frames it had ready, and the
/// rest (`None` once it ended).
pub(crate) struct Read<B> {
    pub(crate) frames: Vec<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
    pub(crate) rest: Option<B>,
}

impl<B> Read<B> {
    /// A body none of which is read yet.
    pub(crate) fn unread(body: B) -> Self {
        Self {
            frames: Vec::new(),
            trailers: None,
            rest: Some(body),
        }
    }

    /// Reads what `body` has ready now, without waiting, until it ends, would wait, or
    /// more than `limit` bytes are read. A unary gRPC request's body is ready whole.
    #[cfg(feature = "tonic")]
    pub(crate) fn ready(mut body: B, limit: usize) -> Result<Self, B::Error>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        let (mut frames, mut trailers) = (Vec::new(), None);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut bytes = 0;
        while bytes <= limit {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(frame)) => match frame?.into_data() {
                    Ok(data) => {
                        bytes += data.len();
                        frames.push(data);
                    }
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Poll::Ready(None) => {
                    return Ok(Self {
                        frames,
                        trailers,
                        rest: None,
                    });
                }
                Poll::Pending => break,
            }
        }
        Ok(Self {
            frames,
            trailers,
            rest: Some(body),
        })
    }
}

impl<B> ReplayBody<B> {
    /// Wraps `body`, keeping up to `limit` bytes; returns the handle a retry needs.
    #[cfg(test)]
    pub(crate) fn new(body: B, limit: usize) -> (Self, Replay<B>) {
        Self::of(Read::unread(body), limit, &Budget::unlimited())
    }

    /// The body of which `read` was read, keeping up to `limit` bytes of `budget`.
    pub(crate) fn of(read: Read<B>, limit: usize, budget: &Arc<Budget>) -> (Self, Replay<B>) {
        let bytes = read.frames.iter().map(Bytes::len).sum();
        // What was read is held anyway; past the budget, it is sent once.
        let overflowed = !budget.reserve(bytes);
        let recording = Arc::new(Mutex::new(Recording {
            bytes: if overflowed { 0 } else { bytes },
            body: read.rest,
            frames: read.frames,
            trailers: read.trailers,
            limit,
            budget: Arc::clone(budget),
            // A body none of which was sent can be sent again whatever the limit.
            overflowed,
            attempt: 0,
        }));
        let handle = Replay(Arc::clone(&recording));
        (Self::attempt(recording, 0), handle)
    }

    fn attempt(recording: Arc<Mutex<Recording<B>>>, attempt: u32) -> Self {
        Self {
            recording,
            attempt,
            next: 0,
            sent_trailers: false,
        }
    }
}

fn lock<B>(recording: &Mutex<Recording<B>>) -> MutexGuard<'_, Recording<B>> {
    recording.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A body sent once: nothing of it is kept, so a request that carries it is not sent
/// again. For calling a [`Connection`](super::Connection) directly; the integrations make
/// their own, which keep what a retry needs.
impl<B> From<B> for ReplayBody<B> {
    fn from(body: B) -> Self {
        // Nothing is kept, so no budget is spent.
        static NONE: std::sync::LazyLock<Arc<Budget>> = std::sync::LazyLock::new(|| Budget::new(0));
        Self::of(Read::unread(body), 0, &NONE).0
    }
}

/// An empty body sent once (as [`From`] makes it).
impl<B: Default> Default for ReplayBody<B> {
    fn default() -> Self {
        Self::from(B::default())
    }
}

/// What a retry needs of a request's body.
pub(crate) struct Replay<B>(Arc<Mutex<Recording<B>>>);

impl<B> Replay<B> {
    /// The body of the next attempt, which sends the same bytes again, and the handle for
    /// the attempt after it; `None` when more was sent than the limit kept.
    pub(crate) fn again(&self) -> Option<(ReplayBody<B>, Replay<B>)> {
        let mut recording = lock(&self.0);
        if recording.overflowed {
            return None;
        }
        recording.attempt += 1;
        let body = ReplayBody::attempt(Arc::clone(&self.0), recording.attempt);
        Some((body, Replay(Arc::clone(&self.0))))
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
        let mut recording = lock(&this.recording);
        if recording.attempt != this.attempt {
            // A retry took over.
            return Poll::Ready(None);
        }
        if let Some(data) = recording.frames.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        let Some(body) = recording.body.as_mut() else {
            return Poll::Ready(recording.trailers_once(&mut this.sent_trailers));
        };
        let frame = std::task::ready!(Pin::new(body).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if recording.keep(data) {
                        this.next += 1;
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    recording.trailers = Some(trailers.clone());
                    this.sent_trailers = true;
                }
            }
            Some(Err(_)) => recording.body = None,
            None => {
                recording.body = None;
                return Poll::Ready(recording.trailers_once(&mut this.sent_trailers));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let recording = lock(&self.recording);
        recording.attempt != self.attempt
            || (self.next >= recording.frames.len()
                && (self.sent_trailers || recording.trailers.is_none())
                && recording.body.as_ref().is_none_or(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        let recording = lock(&self.recording);
        if recording.attempt != self.attempt {
            return SizeHint::with_exact(0);
        }
        let unsent = recording.frames.get(self.next..).unwrap_or_default();
        let unsent = unsent.iter().map(Bytes::len).sum::<usize>() as u64;
        let rest = recording
            .body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(unsent));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(unsent));
        }
        hint
    }
}

/// The bytes all the requests of a channel keep for retries, together, at most.
#[derive(Debug)]
pub(crate) struct Budget {
    used: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: std::sync::atomic::AtomicUsize::new(0),
            limit,
        })
    }

    #[cfg(test)]
    pub(crate) fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX)
    }

    /// Takes `bytes` when they fit; whether they did.
    fn reserve(&self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used
            .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
    }

    /// Bytes kept now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl<B> Drop for Recording<B> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl<B> Recording<B> {
    /// The trailers the caller's body ended with, unless `sent` says an attempt's body has
    /// sent them.
    fn trailers_once<E>(&self, sent: &mut bool) -> Option<Result<Frame<Bytes>, E>> {
        if std::mem::replace(sent, true) {
            return None;
        }
        self.trailers.clone().map(|t| Ok(Frame::trailers(t)))
    }

    /// Keeps a data frame read from the caller's body, while the kept bytes stay within
    /// the limit; whether it was kept.
    fn keep(&mut self, data: &Bytes) -> bool {
        if self.overflowed {
            return false;
        }
        let fits = self.bytes + data.len() <= self.limit && self.budget.reserve(data.len());
        if !fits {
            self.overflowed = true;
            self.budget.release(std::mem::take(&mut self.bytes));
            self.frames = Vec::new();
            return false;
        }
        self.bytes += data.len();
        self.frames.push(data.clone());
        true
    }
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("attempt", &self.attempt)
            .field("sent", &self.next)
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
    /// Catches trailers lost or sent twice on a replay, a retry's hints that leave out the
    /// bytes it replays, and a superseded attempt that keeps sending.
    #[tokio::test]
    async fn a_replay_sends_the_trailers_once_and_hints_its_whole_length() {
        let _limit = tower_sd_testkit::time_limit(10);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let (mut first, replay) =
            ReplayBody::new(StreamBody::new(futures_util::stream::iter(frames)), 16);
        first.frame().await.unwrap().unwrap();
        let (second, replay) = replay.again().unwrap();
        assert_eq!(second.size_hint().lower(), 3);
        assert!(!second.is_end_stream());
        assert!(first.is_end_stream(), "superseded");
        assert!(first.frame().await.is_none());
        let collected = second.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "abc");
        let (mut third, _) = replay.again().unwrap();
        assert_eq!(
            third.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert_eq!(
            third
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_trailers()
                .unwrap(),
            trailers
        );
        assert!(third.frame().await.is_none(), "the trailers once");
        assert!(third.is_end_stream());
    }

    /// Catches a channel-wide budget not enforced (a request that would take more than is
    /// left must not be replayable), bytes never given back (a dropped request frees what
    /// it kept, and one that overflowed frees what it had taken), and bytes counted twice.
    #[tokio::test]
    async fn every_request_keeps_its_bytes_within_the_channel_budget() {
        let _limit = tower_sd_testkit::time_limit(10);
        let budget = Budget::new(10);
        let body =
            |text: &'static str| Read::unread(Full::new(Bytes::from_static(text.as_bytes())));
        let (mut first, first_replay) = ReplayBody::of(body("12345678"), 1024, &budget);
        first.frame().await.unwrap().unwrap();
        assert_eq!(budget.used(), 8);
        let (mut second, second_replay) = ReplayBody::of(body("abcde"), 1024, &budget);
        second.frame().await.unwrap().unwrap();
        assert!(
            second_replay.again().is_none(),
            "5 more bytes do not fit in 10"
        );
        assert_eq!(budget.used(), 8, "the overflow took nothing");
        let (again, _) = first_replay.again().expect("the first fits");
        assert_eq!(collect(again).await, b"12345678");
        assert_eq!(budget.used(), 8, "a replay keeps the same bytes");
        drop((first, first_replay));
        assert_eq!(budget.used(), 0, "given back with the request");
        let (mut third, third_replay) = ReplayBody::of(body("abcde"), 1024, &budget);
        third.frame().await.unwrap().unwrap();
        assert!(third_replay.again().is_some(), "room again");
        drop((second, second_replay, third, third_replay));
        assert_eq!(budget.used(), 0);
    }
}
