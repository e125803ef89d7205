//! [`Body`]: a response body from a [`Connection`](super::Connection), holding its stream's
//! slot until HTTP/2 says the stream is over, whether or not the caller has read it.
//!
//! A server counts a stream against its `MAX_CONCURRENT_STREAMS` until the stream's last
//! frame (`END_STREAM`) is sent, and h2 frees it on this side when that frame arrives, not
//! when the caller reads it. So a body holds its slot only until then:
//!
//! - until the caller first reads it, the body is *parked*: what h2 has received is read
//!   ahead into a buffer, and a waker of its own is left with h2, so that frames arriving
//!   later are read ahead too (by a short task, since h2 wakes it holding its own lock);
//!   when the end arrives, the slot goes back at once. Flow control is not released for
//!   what is read ahead, so the server sends no more than it could have anyway;
//! - once the caller reads, the body is its own: the buffer first, then straight from h2.
//!
//! A body that a caller started to read and then holds unread keeps its slot until it is
//! read to the end or dropped.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;

use super::open::OpenConnection;
use super::open::Slot;

/// A stream open on its connection: holds its slot (and the concurrency permit) until the
/// stream is over or its response is dropped.
pub(crate) struct StreamGuard {
    slot: Slot,
    _permit: Option<OwnedSemaphorePermit>,
}

impl StreamGuard {
    pub(crate) fn new(slot: Slot, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            slot,
            _permit: permit,
        }
    }

    pub(crate) fn conn(&self) -> &OpenConnection {
        self.slot.conn()
    }
}

/// A response body from one of the balancer's connections (see the [module docs](super)).
pub struct Body {
    reader: Reader,
    /// The task sending the rest of the request body, stopped with the response.
    pipe: Option<tokio::task::AbortHandle>,
    /// What is left of a `content-length`, for the size hint.
    remaining: Option<u64>,
    /// Keeps the instance's connections open while the body is.
    _handle: Arc<dyn Send + Sync>,
}

enum Reader {
    /// Not read by the caller yet: shared with the task that reads ahead.
    Parked(Arc<Mutex<Option<Stream>>>),
    /// Read by the caller.
    Own(Stream),
}

/// The receiving half of a stream, with what was read ahead of the caller.
struct Stream {
    recv: h2::RecvStream,
    /// Frames read ahead, for the caller.
    ahead: VecDeque<Result<Frame<Bytes>, h2::Error>>,
    /// The data frames are over; the trailers are next.
    data_done: bool,
    /// Nothing more comes from h2.
    done: bool,
    guard: Option<StreamGuard>,
}

impl Body {
    /// The body of a response whose headers just arrived: read ahead now, in the caller's
    /// task, and parked if it is not over yet.
    pub(crate) fn new(
        recv: h2::RecvStream,
        guard: StreamGuard,
        pipe: Option<tokio::task::AbortHandle>,
        handle: Arc<dyn Send + Sync>,
        headers: &HeaderMap,
    ) -> Self {
        let mut stream = Stream {
            done: recv.is_end_stream(),
            recv,
            ahead: VecDeque::new(),
            data_done: false,
            guard: Some(guard),
        };
        let runtime = tokio::runtime::Handle::try_current();
        let reader = match runtime {
            _ if stream.done => {
                stream.guard = None;
                Reader::Own(stream)
            }
            Ok(runtime) => {
                let parked = Arc::new(Mutex::new(None));
                let reaper = Arc::new(Reaper {
                    stream: Arc::downgrade(&parked),
                    scheduled: AtomicBool::new(false),
                    runtime,
                });
                stream.read_ahead(&mut Context::from_waker(&Waker::from(reaper)));
                *lock(&parked) = Some(stream);
                Reader::Parked(parked)
            }
            // No runtime to read ahead on: the caller's reads free the slot.
            Err(_) => Reader::Own(stream),
        };
        Self {
            reader,
            pipe,
            remaining: headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|length| length.to_str().ok()?.parse().ok()),
            _handle: handle,
        }
    }

    /// The stream, the caller's from now on.
    fn own(&mut self) -> &mut Stream {
        if let Reader::Parked(parked) = &self.reader {
            let stream = lock(parked).take().expect("parked until the caller reads");
            self.reader = Reader::Own(stream);
        }
        match &mut self.reader {
            Reader::Own(stream) => stream,
            Reader::Parked(_) => unreachable!("owned above"),
        }
    }

    /// `f` of the stream, parked or not.
    fn with_stream<T>(&self, f: impl FnOnce(&Stream) -> T) -> T {
        match &self.reader {
            Reader::Own(stream) => f(stream),
            Reader::Parked(parked) => f(lock(parked).as_ref().expect("parked")),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Stream {
    /// Reads what h2 has, up to the end, into `ahead`; gives the slot back at the end.
    fn read_ahead(&mut self, cx: &mut Context<'_>) {
        while !self.done {
            match self.poll_h2(cx) {
                Poll::Ready(Some(frame)) => self.ahead.push_back(frame),
                Poll::Ready(None) => {}
                Poll::Pending => return,
            }
        }
    }

    /// The next frame from h2 (`None` once it is over).
    fn poll_h2(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    if let Some(guard) = &self.guard {
                        let read = &guard.conn().read;
                        read.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    if self.recv.is_end_stream() {
                        self.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => {
                    self.end();
                    return Poll::Ready(Some(Err(error)));
                }
                None => self.data_done = true,
            }
        }
        let trailers = ready!(self.recv.poll_trailers(cx));
        self.end();
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        })
    }

    /// The stream is over: its slot goes back.
    fn end(&mut self) {
        self.done = true;
        self.guard = None;
    }

    /// The next frame for the caller: read ahead, or from h2.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let frame = match self.ahead.pop_front() {
            Some(frame) => Some(frame),
            None => ready!(self.poll_h2(cx)),
        };
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            // Read: the server may send as much again.
            let _ = self.recv.flow_control().release_capacity(data.len());
        }
        Poll::Ready(frame)
    }

    fn is_over(&self) -> bool {
        self.ahead.is_empty() && (self.done || self.recv.is_end_stream())
    }
}

/// The waker a parked body leaves with h2: a frame for it starts a short task that reads
/// it ahead (h2 wakes it holding its own lock, so it cannot read there).
struct Reaper {
    stream: Weak<Mutex<Option<Stream>>>,
    /// A read-ahead task is on its way.
    scheduled: AtomicBool,
    runtime: tokio::runtime::Handle,
}

impl Wake for Reaper {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.stream.strong_count() == 0 || self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let reaper = Arc::clone(self);
        self.runtime.spawn(async move { reaper.read_ahead() });
    }
}

impl Reaper {
    fn read_ahead(self: Arc<Self>) {
        self.scheduled.store(false, Ordering::Release);
        let Some(parked) = self.stream.upgrade() else {
            return;
        };
        let mut stream = lock(&parked);
        // Taken by the caller meanwhile: its own reads go on from here.
        let Some(stream) = stream.as_mut() else {
            return;
        };
        let waker = Waker::from(Arc::clone(&self));
        stream.read_ahead(&mut Context::from_waker(&waker));
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let frame = ready!(this.own().poll_next(cx));
        if let (Some(Ok(frame)), Some(remaining)) = (&frame, &mut this.remaining)
            && let Some(data) = frame.data_ref()
        {
            *remaining = remaining.saturating_sub(data.len() as u64);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.with_stream(Stream::is_over)
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            pipe.abort();
        }
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let open = self.with_stream(|stream| stream.guard.is_some());
        f.debug_struct("Body")
            .field("open", &open)
            .finish_non_exhaustive()
    }
}
