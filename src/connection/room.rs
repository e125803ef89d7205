//! [`Room`]: the stream slots of one instance's connections, taken in the order requests
//! come.
//!
//! A server allows so many streams at once on a connection (its `MAX_CONCURRENT_STREAMS`).
//! A request claims a slot on a connection when it is picked (in `poll_ready`), before it
//! sends anything, and gives it back when its stream ends: so requests that get ready
//! together never overfill a connection, and none waits inside h2's queue behind streams
//! that may never end while another connection has room.
//!
//! When every open connection is full, a request waits for a slot, in arrival order: one
//! freed slot wakes the oldest waiter, and while anyone waits a newcomer queues behind
//! them instead of taking a slot that comes free. Meanwhile the instance is marked
//! [saturated](crate::endpoint::Readiness::is_saturated), so the balancer sends new
//! requests to instances with room.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use crate::endpoint::Readiness;

/// The slot queue of one instance (see the module docs).
pub(crate) struct Room {
    /// Woken once per freed slot: the oldest waiter first.
    freed: Notify,
    /// Handles waiting for a slot.
    waiting: AtomicUsize,
    /// Where saturation is shown to the balancer.
    readiness: Readiness,
}

impl Room {
    pub(crate) fn new(readiness: Readiness) -> Self {
        Self {
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
            readiness,
        }
    }

    /// Whether requests wait for a slot: a newcomer queues behind them.
    #[inline]
    pub(crate) fn queued(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// `slots` slots came free (a stream ended, a claim was given back, a connection opened
    /// or its server raised its limit): the instance has room, and as many waiters as there
    /// are slots are woken, oldest first.
    #[inline]
    pub(crate) fn free(&self, slots: usize) {
        self.readiness.set_saturated(false);
        let waiting = self.waiting.load(Ordering::Acquire);
        for _ in 0..slots.min(waiting) {
            self.freed.notify_one();
        }
    }

    /// Every open connection is full: the balancer should pick others while it is.
    pub(crate) fn saturated(&self) {
        self.readiness.set_saturated(true);
    }

    /// Resolves when a slot may have come free for the caller (spuriously at times: a waiter
    /// that finds no slot waits again). Register it before looking for a slot, so a slot
    /// freed in between is not missed.
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Counts the caller among the waiters until the returned guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting {
            room: Arc::clone(self),
        }
    }
}

/// A place in the queue: dropped when the request got a slot, failed or gave up.
pub(crate) struct Waiting {
    room: Arc<Room>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.room.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}
