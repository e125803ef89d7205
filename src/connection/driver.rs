//! The driver: one task per instance that opens its connections, drives them, notices when
//! one closes (the peer went away, or sent GOAWAY), opens the next, and reports the
//! instance's [`Connectivity`] to the balancer.
//!
//! It keeps at least one connection open (or, for a lazy connection, one once a request
//! wanted it), and opens another, up to the per-instance maximum, when every open one has as
//! many streams as the server allows. A failed connect backs off (full jitter) before the
//! next; a connection that closes after [`STABLE`] is replaced at once, and one that closes
//! sooner (a server that accepts and drops, a client certificate refused after the
//! handshake) counts as a failed connect, so no server can make the driver reconnect in a
//! loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, warn};

use super::SendBody;
use super::dial::{Driver, dial};
use super::error::DialError;
use super::replay::ReplayBody;
use super::settings::ConnectionSettings;
use crate::backoff::Backoff;
use crate::balance::{Connectivity, Readiness};

/// One open HTTP/2 connection to the instance.
pub(crate) struct Sub<B> {
    pub(crate) id: u64,
    pub(crate) send: SendRequest<ReplayBody<B>>,
    /// Streams open on it: sent and not yet ended.
    pub(crate) streams: Arc<AtomicUsize>,
    /// The server's `MAX_CONCURRENT_STREAMS`, as hyper last reported it.
    pub(crate) max_streams: AtomicUsize,
}

impl<B> Sub<B> {
    /// Whether another stream fits under the server's limit.
    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        self.streams.load(Ordering::Relaxed) < self.max_streams.load(Ordering::Relaxed)
    }
}

/// What the handles of one instance's connection and its driver share.
pub(crate) struct State<B> {
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
    pub(crate) subs: ArcSwap<Vec<Arc<Sub<B>>>>,
    /// Bumped whenever `subs` changes, so handles know to look again.
    pub(crate) generation: AtomicU64,
    /// Woken on every change of `subs` or the readiness: handles waiting for a connection.
    pub(crate) changed: Notify,
    /// Woken by handles: a lazy connection is wanted, or every open one is full.
    pub(crate) demand: Notify,
    pub(crate) settings: Arc<ConnectionSettings>,
    /// Connects in progress at once, shared by the instances of one service.
    pub(crate) connects: Arc<Semaphore>,
    /// Requests in flight at most, when the settings limit them.
    pub(crate) limit: Option<Arc<Semaphore>>,
}

impl<B> State<B> {
    fn set(&self, connectivity: Connectivity) {
        self.readiness.set(connectivity);
        self.changed.notify_waiters();
    }

    fn publish(&self, subs: Vec<Arc<Sub<B>>>) {
        self.subs.store(Arc::new(subs));
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether every open connection is at the server's stream limit.
    fn saturated(&self) -> bool {
        let subs = self.subs.load();
        !subs.is_empty() && subs.iter().all(|sub| !sub.has_room())
    }
}

/// How long a connection must stay open for its close to be no failure.
pub(crate) const STABLE: Duration = Duration::from_secs(1);

/// Runs the instance's connections until the task is aborted (with the last handle).
pub(crate) async fn run<B: SendBody>(state: Arc<State<B>>) {
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
            Some((id, lived)) = open.next(), if !open.is_empty() => Event::Closed { id, lived },
            dialed = async { dialing.as_mut().expect("checked").await }, if dialing.is_some() => Event::Dialed(dialed),
            () = async { pause.as_mut().expect("checked").await }, if pause.is_some() => Event::Resumed,
            () = state.demand.notified() => Event::Wanted,
        };
        match event {
            Event::Closed { id, lived } => task.closed(id, lived),
            Event::Dialed(Ok((send, connection))) => task.connected(send, connection),
            Event::Dialed(Err(error)) => task.dial_failed(error),
            Event::Resumed => task.pause = None,
            Event::Wanted => task.wanted = true,
        }
    }
}

type Dialed<B> = Result<(SendRequest<ReplayBody<B>>, Driver<B>), DialError>;
type Dial<B> = Pin<Box<dyn Future<Output = Dialed<B>> + Send>>;

/// What woke the driver.
// One per wake-up, moved once: boxing the dialled connection would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Event<B: SendBody> {
    /// An open connection can take no more streams.
    Closed {
        id: u64,
        lived: Duration,
    },
    Dialed(Dialed<B>),
    /// The backoff pause is over.
    Resumed,
    /// A handle wants a connection (lazy, or every open one is full).
    Wanted,
}

/// The driver task's own state.
struct Task<B: SendBody> {
    state: Arc<State<B>>,
    backoff: Backoff,
    open: FuturesUnordered<Open<B>>,
    dialing: Option<Dial<B>>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A lazy connection connects once a request wants it, and again after it closes.
    wanted: bool,
    next_id: u64,
}

impl<B: SendBody> Task<B> {
    fn new(state: Arc<State<B>>) -> Self {
        let settings = &state.settings;
        Self {
            backoff: Backoff::new(settings.reconnect_base, settings.reconnect_max),
            wanted: settings.eager,
            state,
            open: FuturesUnordered::new(),
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
            dial::<B>(
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

    fn connected(&mut self, send: SendRequest<ReplayBody<B>>, connection: Driver<B>) {
        self.dialing = None;
        self.next_id += 1;
        let sub = Arc::new(Sub {
            id: self.next_id,
            send,
            streams: Arc::default(),
            max_streams: AtomicUsize::new(connection.current_max_send_streams().max(1)),
        });
        let mut subs = self.state.subs.load().as_ref().clone();
        subs.push(Arc::clone(&sub));
        self.state.publish(subs);
        self.state.set(Connectivity::Ready);
        debug!(instance = %self.state.authority, connections = self.open.len() + 1, "connected");
        self.open.push(Open {
            connection,
            sub,
            opened: tokio::time::Instant::now(),
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
/// it was open.
struct Open<B: SendBody> {
    connection: Driver<B>,
    sub: Arc<Sub<B>>,
    opened: tokio::time::Instant,
}

impl<B: SendBody> Future for Open<B> {
    type Output = (u64, Duration);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.connection).poll(cx);
        // The server may change its limit at any time (a SETTINGS frame).
        this.sub.max_streams.store(
            this.connection.current_max_send_streams().max(1),
            Ordering::Relaxed,
        );
        match done {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                if let Err(error) = result {
                    debug!(error = %crate::error::Chain(&error), "connection ended with an error");
                }
                Poll::Ready((this.sub.id, this.opened.elapsed()))
            }
        }
    }
}
