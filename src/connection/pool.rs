//! The pool: one task per instance that opens its connections, notices when one stops
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
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use h2::client::SendRequest;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::dial::{H2Connection, dial};
use super::error::DialError;
use super::open::OpenConnection;
use super::ping::{KeepAliveInterval, Pinger};
use super::room::Room;
use super::settings::ConnectionSettings;
use super::task::{ConnectionTask, LeaveReason, Left};
use crate::backoff::Backoff;
use crate::endpoint::{Connectivity, Readiness};

/// What the handles of one instance's connection and its pool share.
pub(crate) struct Shared {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `host:port`, for errors and logs.
    pub(crate) authority: String,
    /// The scheme and authority requests are sent with (parsed once, not per request).
    pub(crate) origin: (http::uri::Scheme, http::uri::Authority),
    /// The service: the TLS name when the settings name none, and the metrics' label.
    pub(crate) service: Arc<str>,
    /// The TLS name this instance is dialled with, when the settings name one for it.
    pub(crate) tls_name: Option<String>,
    pub(crate) readiness: Readiness,
    /// The open connections that take new streams.
    pub(crate) connections: ArcSwap<Vec<Arc<OpenConnection>>>,
    /// Bumped whenever `connections` changes, so handles know to look again.
    pub(crate) generation: AtomicU64,
    /// Woken on every change of `connections` or the readiness: handles waiting for a connection.
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

impl Shared {
    fn set(&self, connectivity: Connectivity) {
        self.readiness.set(connectivity);
        self.changed.notify_waiters();
    }

    fn publish(&self, connections: Vec<Arc<OpenConnection>>) {
        self.connections.store(Arc::new(connections));
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether every open connection is at the server's stream limit.
    fn saturated(&self) -> bool {
        let connections = self.connections.load();
        !connections.is_empty()
            && connections
                .iter()
                .all(|conn| !conn.is_open() || !conn.has_room())
    }
}

/// LeaveReason long a connection must stay open for its close to be no failure, when it carried
/// no response.
pub(crate) const STABLE: Duration = Duration::from_secs(1);

/// Runs the instance's connections until the task is aborted (with the last handle).
pub(crate) async fn run(state: Arc<Shared>) {
    let mut task = Pool::new(state);
    loop {
        task.dial_if_wanted();
        let Pool {
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

type Dialed = Result<(SendRequest<Bytes>, H2Connection), DialError>;
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
struct Pool {
    state: Arc<Shared>,
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

impl Pool {
    fn new(state: Arc<Shared>) -> Self {
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
            let name = state.tls_name.as_deref().unwrap_or(&state.service);
            dial(&state.host, state.port, name, &state.settings).await
        }));
    }

    /// Takes the connections handles saw close out of the set at once; their tasks say
    /// how they ended when they notice it too.
    fn prune(&self) {
        let connections = self.state.connections.load();
        if connections.iter().all(|conn| conn.is_open()) {
            return;
        }
        let open = connections
            .iter()
            .filter(|conn| conn.is_open())
            .cloned()
            .collect();
        self.state.publish(open);
    }

    fn left(&mut self, left: Left) {
        let state = &self.state;
        let connections: Vec<_> = state
            .connections
            .load()
            .iter()
            .filter(|conn| conn.id != left.id)
            .cloned()
            .collect();
        let none_left = connections.is_empty();
        state.publish(connections);
        if let Some(rest) = left.rest {
            self.draining.spawn(rest.run());
        }
        if left.how == LeaveReason::TooManyPings {
            let interval = state.keepalive.double();
            warn!(instance = %state.authority, ?interval, "the server sent GOAWAY `too_many_pings` (its keepalive policy): new connections ping every {interval:?}");
        }
        let graceful = matches!(left.how, LeaveReason::GoAway { graceful: true });
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

    fn connected(&mut self, send: SendRequest<Bytes>, mut connection: H2Connection) {
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
        let conn = Arc::new(OpenConnection {
            id: self.next_id,
            send,
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(max_streams),
            read,
            closed: AtomicBool::new(false),
            carried: AtomicBool::new(false),
            room: Arc::clone(&self.state.room),
        });
        let mut connections = self.state.connections.load().as_ref().clone();
        connections.push(Arc::clone(&conn));
        self.state.publish(connections);
        self.state.set(Connectivity::Ready);
        self.state.room.free(max_streams);
        debug!(instance = %self.state.authority, connections = self.open.len() + 1, max_streams, "connected");
        let id = conn.id;
        let task = ConnectionTask {
            connection: Some(connection),
            pinger,
            probe: conn.send.clone(),
            conn,
            opened: tokio::time::Instant::now(),
        };
        let authority = self.state.authority.clone();
        self.open.spawn(async move {
            // A panic (in h2) ends the connection too: it leaves the set like any other.
            AssertUnwindSafe(task)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    warn!(instance = %authority, "connection task panicked");
                    Left {
                        id,
                        lived: Duration::ZERO,
                        carried: false,
                        how: LeaveReason::Failed,
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

/// Owns the pool task: the last clone's drop ends it (and its connections). Responses in
/// flight hold it too, so their streams outlive the handles.
pub(crate) struct Handle {
    pub(crate) state: Arc<Shared>,
    task: tokio::task::AbortHandle,
}

impl Handle {
    /// The handle of the pool task `task`, which serves `state`.
    pub(crate) fn new(state: Arc<Shared>, task: tokio::task::AbortHandle) -> Self {
        Self { state, task }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
        self.state.readiness.set(Connectivity::Shutdown);
    }
}
