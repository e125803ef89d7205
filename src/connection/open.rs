//! [`OpenConnection`]: one open HTTP/2 connection to an instance, as the handles that
//! send on it and the task that drives it share it: its sender, its stream slots under the
//! server's limit, and whether it still takes new streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use h2::client::SendRequest;

use super::room::Room;

/// One open HTTP/2 connection to the instance.
pub(crate) struct OpenConnection {
    pub(crate) id: u64,
    pub(crate) send: SendRequest<Bytes>,
    /// Stream slots taken: claimed by a handle for its next request, or held by a stream
    /// until it ends.
    pub(crate) streams: AtomicUsize,
    /// The server's `MAX_CONCURRENT_STREAMS`, as h2 last reported it.
    pub(crate) max_streams: AtomicUsize,
    /// Response bytes read on it (keepalive and adaptive flow control watch them).
    pub(crate) read: Arc<AtomicU64>,
    /// It takes no new stream (a GOAWAY came, or it failed): set by whoever notices first.
    pub(crate) closed: AtomicBool,
    /// A response arrived on it: however it closes, it was no failed connect.
    pub(crate) carried: AtomicBool,
    /// The instance's slot queue.
    pub(crate) room: Arc<Room>,
}

impl OpenConnection {
    /// Whether it may take new streams.
    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }

    /// Whether another stream fits under the server's limit.
    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        self.streams.load(Ordering::Relaxed) < self.max_streams.load(Ordering::Relaxed)
    }

    /// Takes a stream slot, if one is free.
    #[inline]
    pub(crate) fn try_claim(&self) -> bool {
        let max = self.max_streams.load(Ordering::Relaxed);
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |taken| {
                (taken < max).then_some(taken + 1)
            })
            .is_ok()
    }

    /// Gives a slot back (its stream ended, or its claim was not used): the oldest waiter
    /// may take it.
    #[inline]
    pub(crate) fn release(&self) {
        let before = self.streams.fetch_sub(1, Ordering::AcqRel);
        if self.is_open() && before <= self.max_streams.load(Ordering::Relaxed) {
            self.room.free(1);
        }
    }

    /// A response arrived on it.
    #[inline]
    pub(crate) fn answered(&self) {
        if !self.carried.load(Ordering::Relaxed) {
            self.carried.store(true, Ordering::Relaxed);
        }
    }

    /// Records the server's current stream limit, freeing the slots it added.
    pub(crate) fn set_max_streams(&self, max: usize) {
        let before = self.max_streams.swap(max, Ordering::AcqRel);
        if max > before && self.is_open() {
            self.room.free(max - before);
        }
    }
}

/// A stream slot claimed on a connection: given back when dropped.
pub(crate) struct Slot(Arc<OpenConnection>);

impl Slot {
    /// The slot just claimed on `conn` (see [`OpenConnection::try_claim`]).
    pub(crate) fn claimed(conn: &Arc<OpenConnection>) -> Self {
        Self(Arc::clone(conn))
    }

    pub(crate) fn conn(&self) -> &Arc<OpenConnection> {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}
