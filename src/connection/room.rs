//! [`Room`]: the stream slots of one instance's connections, taken in the order requests
//! come.
//!
//! A server allows so many streams at once on a connection (its `MAX_CONCURRENT_STREAMS`).
//! A request claims a slot on a connection when it is picked (in `poll_ready`), before it
//! sends anything, and gives it back when its stream ends: so requests that get ready
//! together never overfill a connection, and none waits inside h2's queue behind streams
//! that may never end while another connection has room.
//!
//! When every open connection is full, a request waits for a slot, in arrival order: it
//! takes a ticket, one freed slot wakes one waiter (the one waiting longest for a wake-up),
//! and a waiter takes a slot only when a freed slot woke it or its ticket is first in line
//! (so that a slot freed before anyone was there to wake is not lost). While anyone waits,
//! a newcomer queues behind them instead of taking a slot that comes free. Meanwhile the
//! instance is marked [saturated](crate::endpoint::Readiness::is_saturated), so the
//! balancer sends new requests to instances with room.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::endpoint::Readiness;

/// The slot queue of one instance (see the module docs).
pub(crate) struct Room {
    /// Woken once per freed slot: the oldest waiter first.
    freed: Notify,
    /// Handles waiting for a slot: the length of `line`, read without its lock.
    waiting: AtomicUsize,
    /// The waiters' tickets, oldest first. Locked only on the slow path, while requests
    /// wait.
    line: Mutex<VecDeque<u64>>,
    /// The next ticket.
    tickets: AtomicU64,
    /// Where saturation is shown to the balancer.
    readiness: Readiness,
}

impl Room {
    pub(crate) fn new(readiness: Readiness) -> Self {
        Self {
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
            line: Mutex::new(VecDeque::new()),
            tickets: AtomicU64::new(0),
            readiness,
        }
    }

    fn line(&self) -> MutexGuard<'_, VecDeque<u64>> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Puts the caller in line, with the next ticket, until the returned guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> Waiting {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let mut line = self.line();
        line.push_back(ticket);
        self.waiting.store(line.len(), Ordering::Release);
        Waiting {
            room: Arc::clone(self),
            ticket,
        }
    }
}

/// A place in the line: dropped when the request got a slot, failed or gave up.
pub(crate) struct Waiting {
    room: Arc<Room>,
    ticket: u64,
}

impl Waiting {
    /// Whether no one has waited longer.
    pub(crate) fn is_first(&self) -> bool {
        self.room.line().front() == Some(&self.ticket)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut line = self.room.line();
        // Usually the first in line leaves (it got a slot); any other gave up.
        if line.front() == Some(&self.ticket) {
            line.pop_front();
        } else if let Some(at) = line.iter().position(|ticket| *ticket == self.ticket) {
            line.remove(at);
        }
        self.room.waiting.store(line.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Connectivity;

    fn room() -> Arc<Room> {
        Arc::new(Room::new(Readiness::new(Connectivity::Ready)))
    }

    /// Catches a line that loses its order when a waiter leaves: one that gave up taking
    /// another's place (the first's ticket removed, or the leaver's left behind), and a
    /// waiter that is never first. Random arrivals and departures against a plain list.
    #[test]
    fn the_line_keeps_its_order_whoever_leaves() {
        proptest::proptest!(|(steps in proptest::collection::vec(0usize..8, 1..64))| {
            let room = room();
            let mut line: Vec<Waiting> = Vec::new();
            for step in steps {
                if step < 3 || line.is_empty() {
                    line.push(room.enter());
                } else {
                    // The first (it got a slot) or any other (it gave up).
                    let leaving = (step - 3) % line.len();
                    line.remove(leaving);
                }
                proptest::prop_assert_eq!(room.queued(), !line.is_empty());
                for (place, waiting) in line.iter().enumerate() {
                    proptest::prop_assert_eq!(waiting.is_first(), place == 0, "place {}", place);
                }
            }
        });
    }
}
