//! The driver: one task per instance that opens its connections, notices when one stops
//! taking streams (the peer went away, or sent GOAWAY), opens the next, and reports the
//! instance's [`Connectivity`] to the balancer.
//!
//! It keeps at least one connection open (or, for a lazy connection, one once a request
//! wanted it), and opens another, up to the per-instance maximum, when every open one has as
//! many streams as the server allows.
//!
//! Each open connection runs in a task of its own, and leaves the set the moment it takes
//! no new streams. After a GOAWAY it goes on draining in a task the driver owns (keepalive
//! still running, so a server that vanishes meanwhile is noticed), until its last stream
//! ends; aborting the driver ends every one of them.
//!
//! A failed connect backs off (full jitter) before the next. A connection that leaves is
//! no failure when it carried a response or lived [`STABLE`]: the backoff is reset and the
//! next one is dialled at once, as grpc-go does once a connection was ready. One that
//! leaves sooner having carried nothing waits out a backoff before the next dial, so no
//! server can make the driver reconnect in a loop; it counts as a failed connect (the
//! instance backs off in `TransientFailure`) unless the server closed it with a graceful
//! GOAWAY (`NO_ERROR`), which says nothing against the instance.
//!
//! A server that closes connections gracefully within a second of opening them (nginx does
//! after `keepalive_requests` requests, 1,000 by default, which takes well under a second
//! under load) gets a spare connection: requests go on there while the next one connects,
//! instead of waiting for it.
//!
//! A GOAWAY with `ENHANCE_YOUR_CALM` and `too_many_pings` (gRFC A8: the server's ping
//! policy) doubles the keepalive interval of the service's new connections.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use h2::client::SendRequest;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::dial::{Driver, dial};
use super::error::DialError;
use super::ping::{KeepAliveInterval, Pinger, Ponged};
use super::room::Room;
use super::settings::ConnectionSettings;
use crate::backoff::Backoff;
use crate::endpoint::{Connectivity, Readiness};

/// One open HTTP/2 connection to the instance.
pub(crate) struct Sub {
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

impl Sub {
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
    fn set_max_streams(&self, max: usize) {
        let before = self.max_streams.swap(max, Ordering::AcqRel);
        if max > before && self.is_open() {
            self.room.free(max - before);
        }
    }
}

/// What the handles of one instance's connection and its driver share.
pub(crate) struct State {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `host:port`, for errors and logs.
    pub(crate) authority: String,
    /// The scheme and authority requests are sent with (parsed once, not per request).
    pub(crate) origin: (http::uri::Scheme, http::uri::Authority),
    /// The service: the TLS name when the settings name none, and the metrics' label.
    pub(crate) service: Arc<str>,
    pub(crate) readiness: Readiness,
    /// The open connections that take new streams.
    pub(crate) subs: ArcSwap<Vec<Arc<Sub>>>,
    /// Bumped whenever `subs` changes, so handles know to look again.
    pub(crate) generation: AtomicU64,
    /// Woken on every change of `subs` or the readiness: handles waiting for a connection.
    pub(crate) changed: Notify,
    /// The stream slots, taken in arrival order.
    pub(crate) room: Arc<Room>,
    /// Woken by handles: a lazy connection is wanted, every open one is full, or one they
    /// used takes no new streams.
    pub(crate) demand: Notify,
    pub(crate) settings: Arc<ConnectionSettings>,
    /// The keepalive interval of new connections, shared by the service's instances.
    pub(crate) keepalive: Arc<KeepAliveInterval>,
    /// Connects in progress at once, shared by the instances of one service.
    pub(crate) connects: Arc<Semaphore>,
    /// Requests in flight at most, when the settings limit them.
    pub(crate) limit: Option<Arc<Semaphore>>,
}

impl State {
    fn set(&self, connectivity: Connectivity) {
        self.readiness.set(connectivity);
        self.changed.notify_waiters();
    }

    fn publish(&self, subs: Vec<Arc<Sub>>) {
        self.subs.store(Arc::new(subs));
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether every open connection is at the server's stream limit.
    fn saturated(&self) -> bool {
        let subs = self.subs.load();
        !subs.is_empty() && subs.iter().all(|sub| !sub.is_open() || !sub.has_room())
    }
}

/// How long a connection must stay open for its close to be no failure, when it carried
/// no response.
pub(crate) const STABLE: Duration = Duration::from_secs(1);

/// Runs the instance's connections until the task is aborted (with the last handle).
pub(crate) async fn run(state: Arc<State>) {
    let mut task = Task::new(state);
    loop {
        task.dial_if_wanted();
        let Task {
            state,
            open,
            draining,
            dialing,
            pause,
            ..
        } = &mut task;
        let event = tokio::select! {
            Some(left) = open.join_next(), if !open.is_empty() => Event::Left(left),
            Some(_) = draining.join_next(), if !draining.is_empty() => continue,
            dialed = async { dialing.as_mut().expect("checked").await }, if dialing.is_some() => Event::Dialed(dialed),
            () = async { pause.as_mut().expect("checked").await }, if pause.is_some() => Event::Resumed,
            () = state.demand.notified() => Event::Wanted,
        };
        match event {
            Event::Left(Ok(left)) => task.left(left),
            // Only an abort cancels a connection's task: the driver's own, with the task set.
            Event::Left(Err(_)) => {}
            Event::Dialed(Ok((send, connection))) => task.connected(send, connection),
            Event::Dialed(Err(error)) => task.dial_failed(error),
            Event::Resumed => task.pause = None,
            Event::Wanted => {
                task.wanted = true;
                task.prune();
            }
        }
    }
}

type Dialed = Result<(SendRequest<Bytes>, Driver), DialError>;
type Dial = Pin<Box<dyn Future<Output = Dialed> + Send>>;

/// What woke the driver.
// One per wake-up, moved once: boxing the dialled connection would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Event {
    /// An open connection takes no more streams.
    Left(Result<Left, tokio::task::JoinError>),
    Dialed(Dialed),
    /// The backoff pause is over.
    Resumed,
    /// A handle wants a connection (lazy, or every open one is full), or saw one close.
    Wanted,
}

/// The driver task's own state.
struct Task {
    state: Arc<State>,
    backoff: Backoff,
    /// The connections that take new streams, each in a task of its own (polled by itself,
    /// it never wakes another task), which ends when it leaves the set.
    open: JoinSet<Left>,
    /// Connections that left the set after a GOAWAY, until their last stream ends.
    draining: JoinSet<()>,
    dialing: Option<Dial>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A lazy connection connects once a request wants it, and again after it closes.
    wanted: bool,
    /// The server closes connections soon after they open (a GOAWAY under a second, as
    /// nginx does after `keepalive_requests`): keep a spare open, so that requests go on
    /// there while the next one connects.
    spare: bool,
    next_id: u64,
}

impl Task {
    fn new(state: Arc<State>) -> Self {
        let settings = &state.settings;
        Self {
            backoff: Backoff::new(settings.reconnect_base, settings.reconnect_max),
            wanted: settings.eager,
            state,
            open: JoinSet::new(),
            draining: JoinSet::new(),
            dialing: None,
            pause: None,
            spare: false,
            next_id: 0,
        }
    }

    /// Starts a dial when one is wanted, none is under way and no backoff pause runs: for
    /// the first connection, or for one more when every open one is full.
    fn dial_if_wanted(&mut self) {
        let settings = &self.state.settings;
        let max = settings.max_connections_per_instance;
        let base = if self.spare { 2.min(max) } else { 1 };
        let more = self.open.len() < base || (self.open.len() < max && self.state.saturated());
        if !(self.wanted && more && self.dialing.is_none() && self.pause.is_none()) {
            return;
        }
        if self.open.is_empty() && self.state.readiness.get() != Connectivity::TransientFailure {
            self.state.set(Connectivity::Connecting);
        }
        let state = Arc::clone(&self.state);
        self.dialing = Some(Box::pin(async move {
            let _permit = state.connects.acquire().await;
            dial(&state.host, state.port, &state.service, &state.settings).await
        }));
    }

    /// Takes the connections handles saw close out of the set at once; their tasks say
    /// how they ended when they notice it too.
    fn prune(&self) {
        let subs = self.state.subs.load();
        if subs.iter().all(|sub| sub.is_open()) {
            return;
        }
        let open = subs.iter().filter(|sub| sub.is_open()).cloned().collect();
        self.state.publish(open);
    }

    fn left(&mut self, left: Left) {
        let state = &self.state;
        let subs: Vec<_> = state
            .subs
            .load()
            .iter()
            .filter(|sub| sub.id != left.id)
            .cloned()
            .collect();
        let none_left = subs.is_empty();
        state.publish(subs);
        if let Some(rest) = left.rest {
            self.draining.spawn(rest.run());
        }
        if left.how == How::TooManyPings {
            let interval = state.keepalive.double();
            warn!(instance = %state.authority, ?interval, "the server sent GOAWAY `too_many_pings` (its keepalive policy): new connections ping every {interval:?}");
        }
        let graceful = matches!(left.how, How::GoAway { graceful: true });
        let progress = left.carried || left.lived >= STABLE;
        self.spare = graceful && left.carried && left.lived < STABLE;
        if progress {
            self.backoff.reset();
        } else if self.pause.is_none() {
            let delay = self.backoff.next_delay();
            debug!(instance = %state.authority, lived = ?left.lived, ?delay, how = ?left.how, "connection closed before it carried a response; backing off");
            self.pause = Some(Box::pin(tokio::time::sleep(delay)));
        }
        if !none_left || self.dialing.is_some() {
            return;
        }
        debug!(instance = %state.authority, how = ?left.how, "connection closed; reconnecting");
        self.wanted = state.settings.eager;
        if !progress && !graceful {
            state
                .readiness
                .fail(Arc::new(DialError::ClosedEarly(left.lived)));
            state.changed.notify_waiters();
        } else if self.wanted {
            state.set(Connectivity::Connecting);
        } else {
            state.set(Connectivity::Idle);
        }
    }

    fn connected(&mut self, send: SendRequest<Bytes>, mut connection: Driver) {
        self.dialing = None;
        self.next_id += 1;
        let read = Arc::new(AtomicU64::new(0));
        let pinger = Pinger::new(
            connection.ping_pong(),
            &self.state.settings,
            self.state.keepalive.get(),
            Arc::clone(&read),
        );
        let max_streams = connection.max_concurrent_send_streams().max(1);
        let sub = Arc::new(Sub {
            id: self.next_id,
            send,
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(max_streams),
            read,
            closed: AtomicBool::new(false),
            carried: AtomicBool::new(false),
            room: Arc::clone(&self.state.room),
        });
        let mut subs = self.state.subs.load().as_ref().clone();
        subs.push(Arc::clone(&sub));
        self.state.publish(subs);
        self.state.set(Connectivity::Ready);
        self.state.room.free(max_streams);
        debug!(instance = %self.state.authority, connections = self.open.len() + 1, max_streams, "connected");
        let id = sub.id;
        let open = Open {
            connection: Some(connection),
            pinger,
            probe: sub.send.clone(),
            sub,
            opened: tokio::time::Instant::now(),
        };
        let authority = self.state.authority.clone();
        self.open.spawn(async move {
            // A panic (in h2) ends the connection too: it leaves the set like any other.
            AssertUnwindSafe(open)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    warn!(instance = %authority, "connection task panicked");
                    Left {
                        id,
                        lived: Duration::ZERO,
                        carried: false,
                        how: How::Failed,
                        rest: None,
                    }
                })
        });
    }

    fn dial_failed(&mut self, error: DialError) {
        self.dialing = None;
        let delay = self.backoff.next_delay();
        warn!(instance = %self.state.authority, error = %crate::error::Chain(&error), ?delay, "connect failed");
        if self.open.is_empty() {
            self.state.readiness.fail(Arc::new(error));
            self.state.changed.notify_waiters();
        }
        self.pause = Some(Box::pin(tokio::time::sleep(delay)));
    }
}

/// How a connection left the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// The server sent GOAWAY; `graceful` for `NO_ERROR`.
    GoAway { graceful: bool },
    /// GOAWAY `ENHANCE_YOUR_CALM` `too_many_pings`: the server's ping policy.
    TooManyPings,
    /// The connection ended (closed by the peer, or an error) or its task panicked.
    Failed,
    /// A keepalive ping went unanswered.
    Silent,
}

/// A connection that left the set: its id, how long it was open, whether it carried a
/// response, and what is left of it to drain.
struct Left {
    id: u64,
    lived: Duration,
    carried: bool,
    how: How,
    rest: Option<Draining>,
}

/// An open connection, driven until it takes no new streams.
struct Open {
    /// `None` once handed on to drain.
    connection: Option<Driver>,
    pinger: Option<Pinger>,
    /// A sender of its own, never used to send: its readiness says whether h2 still takes
    /// new streams.
    probe: SendRequest<Bytes>,
    sub: Arc<Sub>,
    opened: tokio::time::Instant,
}

impl Open {
    fn leave(&mut self, how: How, drain: bool) -> Poll<Left> {
        self.sub.closed.store(true, Ordering::Relaxed);
        let rest = if drain {
            self.connection.take().map(|connection| Draining {
                connection,
                pinger: self.pinger.take(),
                sub: Arc::clone(&self.sub),
            })
        } else {
            None
        };
        Poll::Ready(Left {
            id: self.sub.id,
            lived: self.opened.elapsed(),
            carried: self.sub.carried.load(Ordering::Relaxed),
            how,
            rest,
        })
    }
}

impl Future for Open {
    type Output = Left;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Left> {
        let this = self.get_mut();
        let Some(connection) = this.connection.as_mut() else {
            return this.leave(How::Failed, false);
        };
        if let Some(pinger) = &mut this.pinger {
            // Until it is pending, so its timer is set to wake the task.
            loop {
                match pinger.poll(cx, this.sub.streams.load(Ordering::Relaxed)) {
                    Poll::Ready(Ponged::Window(size)) => {
                        connection.set_target_window_size(size);
                        if let Err(error) = connection.set_initial_window_size(size) {
                            debug!(error = %error, "could not grow the stream window");
                        }
                    }
                    Poll::Ready(Ponged::TimedOut) => {
                        debug!("keepalive ping unanswered; closing the connection");
                        return this.leave(How::Silent, false);
                    }
                    Poll::Pending => break,
                }
            }
        }
        let ended = Pin::new(&mut *connection).poll(cx);
        // The server may change its limit at any time (a SETTINGS frame).
        this.sub
            .set_max_streams(connection.max_concurrent_send_streams().max(1));
        if let Poll::Ready(result) = ended {
            let how = match &result {
                Err(error) => {
                    debug!(error = %crate::error::Chain(error), "connection ended with an error");
                    how_it_ended(error)
                }
                Ok(()) => How::Failed,
            };
            return this.leave(how, false);
        }
        // A GOAWAY (or a connection error) makes h2 refuse new streams: leave the set now,
        // and let the streams already open finish.
        if let Poll::Ready(Err(error)) = this.probe.poll_ready(cx) {
            return this.leave(how_it_ended(&error), true);
        }
        Poll::Pending
    }
}

/// What h2's error says of how the connection ended.
fn how_it_ended(error: &h2::Error) -> How {
    if !(error.is_go_away() && error.is_remote()) {
        return How::Failed;
    }
    match error.reason() {
        Some(h2::Reason::NO_ERROR) => How::GoAway { graceful: true },
        // h2 shows the GOAWAY's debug data only in its message.
        Some(h2::Reason::ENHANCE_YOUR_CALM) if error.to_string().contains("too_many_pings") => {
            How::TooManyPings
        }
        _ => How::GoAway { graceful: false },
    }
}

/// A connection that takes no new streams, driven (with its keepalive) until its last
/// stream ends and h2 closes it (RFC 9113, 6.8), or until its peer stops answering pings.
struct Draining {
    connection: Driver,
    pinger: Option<Pinger>,
    sub: Arc<Sub>,
}

impl Draining {
    async fn run(mut self) {
        let ended = std::future::poll_fn(|cx| {
            while let Some(pinger) = &mut self.pinger {
                match pinger.poll(cx, self.sub.streams.load(Ordering::Relaxed)) {
                    // The window no longer matters: no stream opens on it.
                    Poll::Ready(Ponged::Window(_)) => {}
                    Poll::Ready(Ponged::TimedOut) => {
                        debug!("keepalive ping unanswered while draining; closing the connection");
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => break,
                }
            }
            Pin::new(&mut self.connection).poll(cx)
        })
        .await;
        if let Err(error) = ended {
            debug!(error = %crate::error::Chain(&error), "draining connection ended with an error");
        }
    }
}
