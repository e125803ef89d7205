//! The driver: one task per instance that opens its connections, drives them, notices when
//! one closes (the peer went away, or sent GOAWAY), opens the next, and reports the
//! instance's [`Connectivity`] to the balancer.
//!
//! A connection that gets a GOAWAY takes no new stream from then on: it leaves the set at
//! once and is driven by a task of its own until its open streams end.
//!
//! It keeps at least one connection open (or, for a lazy connection, one once a request
//! wanted it), and opens another, up to the per-instance maximum, when every open one has as
//! many streams as the server allows. A failed connect backs off (full jitter) before the
//! next; a connection that closes after [`STABLE`] is replaced at once, and one that closes
//! sooner (a server that accepts and drops, a client certificate refused after the
//! handshake) counts as a failed connect, so no server can make the driver reconnect in a
//! loop.

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
use super::ping::{Pinger, Ponged};
use super::settings::ConnectionSettings;
use crate::backoff::Backoff;
use crate::balance::{Connectivity, Readiness};

/// One open HTTP/2 connection to the instance.
pub(crate) struct Sub {
    pub(crate) id: u64,
    pub(crate) send: SendRequest<Bytes>,
    /// Streams open on it: sent and not yet ended.
    pub(crate) streams: AtomicUsize,
    /// The server's `MAX_CONCURRENT_STREAMS`, as h2 last reported it.
    pub(crate) max_streams: AtomicUsize,
    /// Response bytes read on it (keepalive and adaptive flow control watch them).
    pub(crate) read: Arc<AtomicU64>,
    /// It takes no new stream (a GOAWAY came, or it failed): set by whoever notices first.
    pub(crate) closed: AtomicBool,
    /// The instance's [`State::changed`]: woken when this connection, full, gets room.
    pub(crate) changed: Arc<Notify>,
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

    /// One of its streams ended: wakes the handles waiting for room if it was full.
    #[inline]
    pub(crate) fn stream_ended(&self) {
        let before = self.streams.fetch_sub(1, Ordering::Relaxed);
        if before >= self.max_streams.load(Ordering::Relaxed) {
            self.changed.notify_waiters();
        }
    }

    /// Records the server's current stream limit, waking the waiting handles if it grew.
    fn set_max_streams(&self, max: usize) {
        let before = self.max_streams.load(Ordering::Relaxed);
        if max != before {
            self.max_streams.store(max, Ordering::Relaxed);
            if max > before {
                self.changed.notify_waiters();
            }
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
    /// The TLS name when the settings name none.
    pub(crate) server_name: Option<String>,
    pub(crate) readiness: Readiness,
    /// The open connections that take new streams.
    pub(crate) subs: ArcSwap<Vec<Arc<Sub>>>,
    /// Bumped whenever `subs` changes, so handles know to look again.
    pub(crate) generation: AtomicU64,
    /// Woken on every change of `subs` or the readiness, and when a full connection gets
    /// room: handles waiting for a connection with room.
    pub(crate) changed: Arc<Notify>,
    /// Woken by handles: a lazy connection is wanted, or every open one is full.
    pub(crate) demand: Notify,
    pub(crate) settings: Arc<ConnectionSettings>,
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

/// How long a connection must stay open for its close to be no failure.
pub(crate) const STABLE: Duration = Duration::from_secs(1);

/// Runs the instance's connections until the task is aborted (with the last handle).
pub(crate) async fn run(state: Arc<State>) {
    let mut task = Task::new(state);
    loop {
        task.dial_if_wanted();
        let Task {
            state,
            open,
            dialing,
            pause,
            ..
        } = &mut task;
        let event = tokio::select! {
            Some(ended) = open.join_next(), if !open.is_empty() => Event::Ended(ended),
            dialed = async { dialing.as_mut().expect("checked").await }, if dialing.is_some() => Event::Dialed(dialed),
            () = async { pause.as_mut().expect("checked").await }, if pause.is_some() => Event::Resumed,
            () = state.demand.notified() => Event::Wanted,
        };
        match event {
            Event::Ended(Ok((id, lived))) => task.closed(id, lived),
            // Only an abort cancels a connection's task: the driver's own, with the task set.
            Event::Ended(Err(_)) => {}
            Event::Dialed(Ok((send, connection))) => task.connected(send, connection),
            Event::Dialed(Err(error)) => task.dial_failed(error),
            Event::Resumed => task.pause = None,
            Event::Wanted => task.wanted = true,
        }
    }
}

type Dialed = Result<(SendRequest<Bytes>, Driver), DialError>;
type Dial = Pin<Box<dyn Future<Output = Dialed> + Send>>;

/// What woke the driver.
// One per wake-up, moved once: boxing the dialled connection would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Event {
    /// An open connection's task ended (its id, how long it was open): it can take no more
    /// streams.
    Ended(Result<(u64, Duration), tokio::task::JoinError>),
    Dialed(Dialed),
    /// The backoff pause is over.
    Resumed,
    /// A handle wants a connection (lazy, or every open one is full).
    Wanted,
}

/// The driver task's own state.
struct Task {
    state: Arc<State>,
    backoff: Backoff,
    /// Each open connection runs in a task of its own (polled by itself, it never wakes
    /// another task), which ends with the id of its [`Sub`].
    open: JoinSet<(u64, Duration)>,
    dialing: Option<Dial>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A lazy connection connects once a request wants it, and again after it closes.
    wanted: bool,
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
            dialing: None,
            pause: None,
            next_id: 0,
        }
    }

    /// Starts a dial when one is wanted, none is under way and no backoff pause runs: for
    /// the first connection, or for one more when every open one is full.
    fn dial_if_wanted(&mut self) {
        let settings = &self.state.settings;
        let more = self.open.is_empty()
            || (self.open.len() < settings.max_connections_per_instance && self.state.saturated());
        if !(self.wanted && more && self.dialing.is_none() && self.pause.is_none()) {
            return;
        }
        if self.open.is_empty() && self.state.readiness.get() != Connectivity::TransientFailure {
            self.state.set(Connectivity::Connecting);
        }
        let state = Arc::clone(&self.state);
        self.dialing = Some(Box::pin(async move {
            let _permit = state.connects.acquire().await;
            dial(
                &state.host,
                state.port,
                state.server_name.as_deref(),
                &state.settings,
            )
            .await
        }));
    }

    fn closed(&mut self, id: u64, lived: Duration) {
        let state = &self.state;
        let subs: Vec<_> = state
            .subs
            .load()
            .iter()
            .filter(|sub| sub.id != id)
            .cloned()
            .collect();
        let none_left = subs.is_empty();
        state.publish(subs);
        let stable = lived >= STABLE;
        if stable {
            self.backoff.reset();
        } else if self.pause.is_none() {
            let delay = self.backoff.next_delay();
            debug!(instance = %state.authority, ?lived, ?delay, "connection closed right after it opened; backing off");
            self.pause = Some(Box::pin(tokio::time::sleep(delay)));
        }
        if !none_left || self.dialing.is_some() {
            return;
        }
        debug!(instance = %state.authority, "connection closed; reconnecting");
        self.wanted = state.settings.eager;
        if !stable {
            state
                .readiness
                .fail(Arc::new(DialError::ClosedEarly(lived)));
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
            Arc::clone(&read),
        );
        let sub = Arc::new(Sub {
            id: self.next_id,
            send,
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(connection.max_concurrent_send_streams().max(1)),
            read,
            closed: AtomicBool::new(false),
            changed: Arc::clone(&self.state.changed),
        });
        let mut subs = self.state.subs.load().as_ref().clone();
        subs.push(Arc::clone(&sub));
        self.state.publish(subs);
        self.state.set(Connectivity::Ready);
        debug!(instance = %self.state.authority, connections = self.open.len() + 1, "connected");
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
                    (id, Duration::ZERO)
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

/// An open connection, driven until it can take no new streams; yields its id and how long
/// it was open. After a GOAWAY, what is left of it (its open streams) goes on in a task of
/// its own.
struct Open {
    /// `None` once handed to its drain task.
    connection: Option<Driver>,
    pinger: Option<Pinger>,
    /// A sender of its own, never used to send: its readiness says whether h2 still takes
    /// new streams.
    probe: SendRequest<Bytes>,
    sub: Arc<Sub>,
    opened: tokio::time::Instant,
}

impl Future for Open {
    type Output = (u64, Duration);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let done = (this.sub.id, this.opened.elapsed());
        let Some(connection) = this.connection.as_mut() else {
            return Poll::Ready(done);
        };
        if let Some(pinger) = &mut this.pinger {
            match pinger.poll(cx, this.sub.streams.load(Ordering::Relaxed)) {
                Poll::Ready(Ponged::Window(size)) => {
                    connection.set_target_window_size(size);
                    if let Err(error) = connection.set_initial_window_size(size) {
                        debug!(error = %error, "could not grow the stream window");
                    }
                }
                Poll::Ready(Ponged::TimedOut) => {
                    debug!("keepalive ping unanswered; closing the connection");
                    this.sub.closed.store(true, Ordering::Relaxed);
                    return Poll::Ready(done);
                }
                Poll::Pending => {}
            }
        }
        let ended = Pin::new(&mut *connection).poll(cx);
        // The server may change its limit at any time (a SETTINGS frame).
        this.sub
            .set_max_streams(connection.max_concurrent_send_streams().max(1));
        if let Poll::Ready(result) = ended {
            if let Err(error) = result {
                debug!(error = %crate::error::Chain(&error), "connection ended with an error");
            }
            this.sub.closed.store(true, Ordering::Relaxed);
            return Poll::Ready(done);
        }
        // A GOAWAY (or a connection error) makes h2 refuse new streams: leave the set now,
        // and let the streams already open finish.
        if let Poll::Ready(Err(_)) = this.probe.poll_ready(cx) {
            this.sub.closed.store(true, Ordering::Relaxed);
            let connection = this.connection.take().expect("checked");
            tokio::spawn(drain(connection));
            return Poll::Ready(done);
        }
        Poll::Pending
    }
}

/// Drives a connection that takes no new streams until it ends: h2 closes it by itself once
/// the last stream open on it is over (after a GOAWAY, RFC 9113 6.8) or at once (after a
/// connection error).
async fn drain(connection: Driver) {
    if let Err(error) = connection.await {
        debug!(error = %crate::error::Chain(&error), "draining connection ended with an error");
    }
}
