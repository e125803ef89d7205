//! [`Connection`]: the service a balancer holds for one instance. A request goes straight to
//! h2 on one of the instance's open connections, from the caller's task: its headers and (a
//! body that is ready at once, as a unary gRPC request's is) its data are queued together,
//! with no buffer, no dispatch channel and no task per request. Only a body still streaming
//! when the response arrives is sent on by a task of its own.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::client::SendRequest;
use http::header::USER_AGENT;
use http::{Request, Response};
use http_body::Body as HttpBody;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use super::SendBody;
use super::body::{Body, StreamGuard};
use super::error::ConnectionError;
use super::future::ResponseFuture;
use super::head::{set_origin, strip_connection_headers};
use super::open::OpenConnection;
use super::open::Slot;
use super::pipe::Pipe;
use super::pool::{Handle, Shared};
use super::replay::ReplayBody;
use super::room::Waiting;
use crate::endpoint::{Connectivity, Readiness};

/// The connection to one instance, as the balancer holds it: cheap to clone, each clone
/// keeping its own copy of the sender it last used.
///
/// Made by a [`Connector`](super::Connector). Its [`readiness`](Self::readiness) tells the
/// balancer whether it is connected, and whether it has room. `poll_ready` claims a stream
/// slot on an open connection under the server's stream limit (see
/// [`ConnectionSettings::stream_wait`](super::ConnectionSettings::stream_wait)); it waits
/// while the instance connects or while every connection is full (in arrival order), and
/// fails ([`ConnectionError::NotConnected`]) while its last connect failed. Dropping the
/// handle between `poll_ready` and `call` gives the slot back.
///
/// Requests take a [`ReplayBody`], which the integrations wrap around the caller's body
/// so that a request the server did not process can be sent again; called directly, a
/// body converts with `ReplayBody::from(body)` (sent once).
pub(crate) struct Connection<B> {
    handle: Arc<Handle>,
    /// The sender this clone last used, with the generation of the set it came from.
    cached: Option<Cached>,
    /// The stream slot `poll_ready` claimed for the next call (on the cached sender's
    /// connection).
    claimed: Option<Slot>,
    /// While waiting for a connection or a slot: resolves on the next change, `true` when
    /// it is a freed slot.
    waiting: Option<Pin<Box<dyn Future<Output = bool> + Send + Sync>>>,
    /// While waiting for a slot: this handle's place in the queue, and the end of its wait.
    queued: Option<Queued>,
    /// What `poll_ready` found in place of a slot (the wait ran out), for the next `call`.
    failed: Option<ConnectionError>,
    /// The concurrency-limit permit taken by `poll_ready`, for the next call.
    permit: Option<OwnedSemaphorePermit>,
    acquiring: Option<Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send + Sync>>>,
    _body: std::marker::PhantomData<fn(B)>,
}

struct Cached {
    generation: u64,
    conn: Arc<OpenConnection>,
    send: SendRequest<Bytes>,
}

/// A handle waiting for a stream slot.
struct Queued {
    place: Waiting,
    /// A freed slot woke it: it may take one, wherever it is in line.
    woken: bool,
    since: Instant,
    until: Pin<Box<Sleep>>,
}

impl<B: Send + 'static> Connection<B> {
    pub(crate) fn new(state: Arc<Shared>, task: tokio::task::AbortHandle) -> Self {
        Self::handle_on(Arc::new(Handle::new(state, task)), None)
    }

    /// What the balancer reads to tell whether the instance is connected.
    pub(crate) fn readiness(&self) -> Readiness {
        self.handle.state.readiness.clone()
    }

    /// The open connections to the instance.
    pub(crate) fn open_connections(&self) -> usize {
        self.handle.state.connections.load().len()
    }

    fn state(&self) -> &Shared {
        &self.handle.state
    }

    /// Claims a slot on an open connection with room: the cached one if it still is one,
    /// else the first in the current set.
    #[inline]
    fn claim(&mut self) -> bool {
        let state = &self.handle.state;
        let generation = state.generation.load(Ordering::Acquire);
        if let Some(cached) = &self.cached
            && cached.generation == generation
            && cached.conn.is_open()
            && cached.conn.try_claim()
        {
            self.claimed = Some(Slot::claimed(&cached.conn));
            return true;
        }
        let connections = state.connections.load();
        let Some(conn) = connections
            .iter()
            .find(|conn| conn.is_open() && conn.try_claim())
        else {
            return false;
        };
        self.claimed = Some(Slot::claimed(conn));
        self.cached = Some(Cached {
            generation,
            conn: Arc::clone(conn),
            send: conn.send.clone(),
        });
        true
    }

    /// Claims a stream slot, waiting for a connection, or (in arrival order, for at most
    /// the stream wait) for a slot while every open connection is full.
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        loop {
            if self.may_take() && self.claim() {
                self.end_wait();
                return Poll::Ready(Ok(()));
            }
            let state = Arc::clone(&self.handle.state);
            match state.readiness.get() {
                connectivity @ (Connectivity::TransientFailure | Connectivity::Shutdown) => {
                    self.end_wait();
                    return Poll::Ready(Err(self.not_connected(connectivity)));
                }
                Connectivity::Idle => state.demand.notify_one(),
                _ => {}
            }
            if self.queued.is_none() && state.connections.load().iter().any(|conn| conn.is_open()) {
                // Every open connection is full: queue, let the balancer pick others, ask
                // for one more connection, and look once more (a slot may have come free).
                self.queued = Some(Queued {
                    place: state.room.enter(),
                    woken: false,
                    since: Instant::now(),
                    until: Box::pin(tokio::time::sleep(state.settings.stream_wait)),
                });
                state.room.saturated();
                state.demand.notify_one();
                crate::metrics::stream_wait(&state.service);
                continue;
            }
            if let Some(queued) = &mut self.queued
                && queued.until.as_mut().poll(cx).is_ready()
            {
                let error = self.stream_limit();
                self.end_wait();
                crate::metrics::stream_wait_timeout(&state.service);
                return Poll::Ready(Err(error));
            }
            let waiting = self.waiting.get_or_insert_with(|| {
                Box::pin(async move {
                    tokio::select! {
                        () = state.room.notified() => true,
                        () = state.changed.notified() => false,
                    }
                })
            });
            if let Poll::Ready(freed) = waiting.as_mut().poll(cx) {
                self.waiting = None;
                if let Some(queued) = &mut self.queued {
                    queued.woken |= freed;
                }
                continue;
            }
            // Registered for the next change; look once more, so none is missed.
            if self.may_take() && self.claim() {
                self.end_wait();
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
    }

    /// Whether this handle may take a free slot: a newcomer when no one waits, a waiter when
    /// a freed slot woke it or no one has waited longer.
    fn may_take(&self) -> bool {
        match &self.queued {
            None => !self.state().room.queued(),
            Some(queued) => queued.woken || queued.place.is_first(),
        }
    }

    /// Leaves the queue, if in it. A slot this handle was woken for and did not take goes
    /// to the next waiter.
    fn end_wait(&mut self) {
        self.waiting = None;
        if self.queued.take().is_none() {
            return;
        }
        let state = self.state();
        if state.room.queued()
            && state
                .connections
                .load()
                .iter()
                .any(|s| s.is_open() && s.has_room())
        {
            state.room.free(1);
        }
    }

    /// The cached connection takes no new streams: mark it so that every handle passes it
    /// over, wake the driver (it replaces the connection), and let go of it here.
    fn forget_closed(&mut self) {
        self.claimed = None;
        if let Some(cached) = self.cached.take() {
            cached.conn.closed.store(true, Ordering::Relaxed);
            self.state().demand.notify_one();
        }
    }

    fn not_connected(&self, state: Connectivity) -> ConnectionError {
        let source = self.state().readiness.last_error();
        ConnectionError::NotConnected {
            authority: self.state().authority.clone(),
            state,
            source,
        }
    }

    fn stream_limit(&self) -> ConnectionError {
        let connections = self.state().connections.load();
        let open = connections.iter().filter(|conn| conn.is_open());
        ConnectionError::StreamLimit {
            authority: self.state().authority.clone(),
            limit: open
                .clone()
                .map(|conn| conn.max_streams.load(Ordering::Relaxed))
                .max()
                .unwrap_or_default(),
            connections: open.count(),
            waited: self
                .queued
                .as_ref()
                .map_or(Duration::ZERO, |queued| queued.since.elapsed()),
        }
    }

    /// Takes a permit under the concurrency limit, when there is one.
    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(limit) = &self.handle.state.limit else {
            return Poll::Ready(());
        };
        if self.permit.is_some() {
            return Poll::Ready(());
        }
        let limit = Arc::clone(limit);
        let acquiring = self.acquiring.get_or_insert_with(|| {
            Box::pin(async move {
                limit
                    .acquire_owned()
                    .await
                    .expect("the limit semaphore is never closed")
            })
        });
        let permit = ready!(acquiring.as_mut().poll(cx));
        self.acquiring = None;
        self.permit = Some(permit);
        Poll::Ready(())
    }
}

impl<B> Clone for Connection<B> {
    /// A new handle on the same connection; it does not inherit readiness (nor a claimed
    /// slot).
    fn clone(&self) -> Self {
        let cached = self.cached.as_ref().map(|cached| Cached {
            generation: cached.generation,
            conn: Arc::clone(&cached.conn),
            send: cached.send.clone(),
        });
        Self::handle_on(Arc::clone(&self.handle), cached)
    }
}

impl<B> Connection<B> {
    /// A handle on the pool `handle` owns, with nothing claimed, awaited or failed yet.
    fn handle_on(handle: Arc<Handle>, cached: Option<Cached>) -> Self {
        Self {
            handle,
            cached,
            claimed: None,
            waiting: None,
            queued: None,
            failed: None,
            permit: None,
            acquiring: None,
            _body: std::marker::PhantomData,
        }
    }
}

impl<B: Send + 'static> fmt::Debug for Connection<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("instance", &self.state().authority)
            .field("state", &self.state().readiness.get())
            .field("open", &self.open_connections())
            .finish_non_exhaustive()
    }
}

impl<B: SendBody> tower::Service<Request<ReplayBody<B>>> for Connection<B> {
    type Response = Response<Body>;
    type Error = ConnectionError;
    type Future = ResponseFuture<B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        if self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_permit(cx));
        loop {
            if self.claimed.is_none() {
                match ready!(self.poll_slot(cx)) {
                    Ok(()) => {}
                    // Not a failure of the instance: the call says so.
                    Err(error @ ConnectionError::StreamLimit { .. }) => {
                        self.failed = Some(error);
                        return Poll::Ready(Ok(()));
                    }
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
            let cached = self.cached.as_mut().expect("a slot comes with its sender");
            // h2 is ready unless this sender's last stream still waits for the server's
            // stream limit; an error means the connection takes no new streams.
            match cached.send.poll_ready(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => self.forget_closed(),
            }
        }
    }

    fn call(&mut self, mut request: Request<ReplayBody<B>>) -> ResponseFuture<B> {
        if let Some(error) = self.failed.take() {
            self.permit = None;
            return ResponseFuture::failed(error);
        }
        let handle = Arc::clone(&self.handle);
        let state = &handle.state;
        let (Some(slot), Some(cached)) = (self.claimed.take(), self.cached.as_mut()) else {
            let error = self.not_connected(state.readiness.get());
            return ResponseFuture::failed(error);
        };
        set_origin(&mut request, state);
        let headers = request.headers_mut();
        strip_connection_headers(headers);
        if let Some(user_agent) = &state.settings.user_agent
            && !headers.contains_key(USER_AGENT)
        {
            headers.insert(USER_AGENT, user_agent.clone());
        }
        let (parts, body) = request.into_parts();
        let end = body.is_end_stream();
        match cached
            .send
            .send_request(Request::from_parts(parts, ()), end)
        {
            Ok((response, stream)) => {
                let guard = StreamGuard::new(slot, self.permit.take());
                let pipe = (!end).then(|| Pipe::new(body, stream));
                ResponseFuture::sent(response, pipe, guard, handle)
            }
            // Refused before anything was written: the connection takes no new streams, or
            // the request is one HTTP/2 cannot carry.
            Err(error) => {
                drop(slot);
                self.permit = None;
                let authority = state.authority.clone();
                let source = Box::new(error);
                if !(source.is_go_away() || source.is_io()) {
                    return ResponseFuture::failed(ConnectionError::Request { authority, source });
                }
                self.forget_closed();
                ResponseFuture::failed(ConnectionError::NotSent { authority, source })
            }
        }
    }
}
