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
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::SendBody;
use super::driver::{State, Sub};
use super::error::{ConnectionError, never_processed};
use super::pipe::{Pipe, PipeError};
use super::replay::ReplayBody;
use crate::balance::{Connectivity, Readiness};

/// The connection to one instance, as the balancer holds it: cheap to clone, each clone
/// keeping its own copy of the sender it last used.
///
/// Made by a [`Connector`](super::Connector). Its [`readiness`](Self::readiness) tells the
/// balancer whether it is connected; `poll_ready` is ready at once when it is and one of
/// its connections has room under the server's stream limit, waits while it connects or
/// while every connection is full, and fails ([`ConnectionError::NotConnected`]) while its
/// last connect failed.
/// Requests take a [`ReplayBody`], which the integrations wrap around the caller's body
/// so that a request the server did not process can be sent again; called directly, a
/// body converts with `ReplayBody::from(body)` (sent once).
pub struct Connection<B> {
    handle: Arc<Handle>,
    /// The sender this clone last used, with the generation of the set it came from.
    cached: Option<Cached>,
    /// While waiting for a connection: resolves on the next change.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// The concurrency-limit permit taken by `poll_ready`, for the next call.
    permit: Option<OwnedSemaphorePermit>,
    acquiring: Option<Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send + Sync>>>,
    _body: std::marker::PhantomData<fn(B)>,
}

struct Cached {
    generation: u64,
    sub: Arc<Sub>,
    send: SendRequest<Bytes>,
}

/// Owns the driver task: the last clone's drop ends it (and its connections). Responses in
/// flight hold it too, so their streams outlive the handles.
struct Handle {
    state: Arc<State>,
    task: tokio::task::AbortHandle,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
        self.state.readiness.set(Connectivity::Shutdown);
    }
}

impl<B: Send + 'static> Connection<B> {
    pub(crate) fn new(state: Arc<State>, task: tokio::task::AbortHandle) -> Self {
        Self {
            handle: Arc::new(Handle { state, task }),
            cached: None,
            waiting: None,
            permit: None,
            acquiring: None,
            _body: std::marker::PhantomData,
        }
    }

    /// What the balancer reads to tell whether the instance is connected.
    pub fn readiness(&self) -> Readiness {
        self.handle.state.readiness.clone()
    }

    /// The open connections to the instance.
    pub fn open_connections(&self) -> usize {
        self.handle.state.subs.load().len()
    }

    fn state(&self) -> &State {
        &self.handle.state
    }

    /// Whether the cached sender is still current, open and not full.
    #[inline]
    fn cached_usable(&self) -> bool {
        let state = self.state();
        self.cached.as_ref().is_some_and(|cached| {
            cached.generation == state.generation.load(Ordering::Acquire)
                && cached.sub.is_open()
                && cached.sub.has_room()
        })
    }

    /// Takes a sender from the current set: the first open connection with room. `false`
    /// when none has room; then, if some are open, every one is full, and the driver is
    /// asked for another (it opens one unless the instance has its maximum).
    fn refresh(&mut self) -> bool {
        let state = &self.handle.state;
        let generation = state.generation.load(Ordering::Acquire);
        let subs = state.subs.load();
        let mut open = subs.iter().filter(|sub| sub.is_open()).peekable();
        let any_open = open.peek().is_some();
        let Some(sub) = open.find(|sub| sub.has_room()) else {
            // Not queued behind a full connection's streams in h2: the request waits for
            // the first room, on a new connection or when a stream ends.
            if any_open {
                state.demand.notify_one();
            }
            return false;
        };
        self.cached = Some(Cached {
            generation,
            sub: Arc::clone(sub),
            send: sub.send.clone(),
        });
        true
    }

    /// Waits for an open connection with room.
    fn poll_connected(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        loop {
            if self.cached_usable() || self.refresh() {
                self.waiting = None;
                return Poll::Ready(Ok(()));
            }
            let state = Arc::clone(&self.handle.state);
            match state.readiness.get() {
                connectivity @ (Connectivity::TransientFailure | Connectivity::Shutdown) => {
                    self.waiting = None;
                    return Poll::Ready(Err(self.not_connected(connectivity)));
                }
                Connectivity::Idle => state.demand.notify_one(),
                _ => {}
            }
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(async move { state.changed.notified().await }));
            if waiting.as_mut().poll(cx).is_ready() {
                self.waiting = None;
                continue;
            }
            // Registered for the next change; look once more, so none is missed.
            if self.refresh() {
                self.waiting = None;
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
    }

    /// The cached connection takes no new streams: mark it so that every handle passes it
    /// over, wake the driver (it replaces the connection), and let go of it here.
    fn forget_closed(&mut self) {
        if let Some(cached) = self.cached.take() {
            cached.sub.closed.store(true, Ordering::Relaxed);
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
    fn clone(&self) -> Self {
        Self {
            handle: Arc::clone(&self.handle),
            cached: self.cached.as_ref().map(|cached| Cached {
                generation: cached.generation,
                sub: Arc::clone(&cached.sub),
                send: cached.send.clone(),
            }),
            waiting: None,
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
        ready!(self.poll_permit(cx));
        loop {
            ready!(self.poll_connected(cx))?;
            let cached = self.cached.as_mut().expect("connected");
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
        let handle = Arc::clone(&self.handle);
        let state = &handle.state;
        let Some(cached) = self.cached.as_mut() else {
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
                let guard = StreamGuard::new(&cached.sub, self.permit.take());
                ResponseFuture {
                    inner: Some(Inner {
                        response,
                        pipe: (!end).then(|| Pipe::new(body, stream)),
                        guard,
                        handle,
                    }),
                    failed: None,
                }
            }
            // Refused before anything was written: the connection takes no new streams, or
            // the request is one HTTP/2 cannot carry.
            Err(error) => {
                self.permit = None;
                let authority = state.authority.clone();
                let source = Box::new(error);
                if !(source.is_go_away() || source.is_io()) {
                    return ResponseFuture::failed(ConnectionError::Request { authority, source });
                }
                self.forget_closed();
                ResponseFuture::failed(ConnectionError::Unprocessed { authority, source })
            }
        }
    }
}

/// Puts the origin on the request URI: the configured one, else the dialled address.
fn set_origin<T>(request: &mut Request<T>, state: &State) {
    let (scheme, authority) = state.origin.clone();
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// Removes the connection-specific headers HTTP/2 forbids (RFC 9113, 8.2.2), as hyper does:
/// h2 refuses a request that has them.
fn strip_connection_headers(headers: &mut HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    if headers.is_empty() {
        return;
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// Counts a stream open on its connection (and holds the concurrency permit) until the
/// response ends or is dropped.
struct StreamGuard {
    sub: Arc<Sub>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl StreamGuard {
    fn new(sub: &Arc<Sub>, permit: Option<OwnedSemaphorePermit>) -> Self {
        sub.streams.fetch_add(1, Ordering::Relaxed);
        Self {
            sub: Arc::clone(sub),
            _permit: permit,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.sub.stream_ended();
    }
}

/// The response future of a [`Connection`]. It sends the request body while it waits: all
/// of it, for a body that is ready at once.
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<B> {
    inner: Option<Inner<B>>,
    failed: Option<ConnectionError>,
}

struct Inner<B> {
    response: h2::client::ResponseFuture,
    /// The request body still to send, if any.
    pipe: Option<Pipe<B>>,
    guard: StreamGuard,
    handle: Arc<Handle>,
}

impl<B> ResponseFuture<B> {
    fn failed(error: ConnectionError) -> Self {
        Self {
            inner: None,
            failed: Some(error),
        }
    }
}

impl<B: SendBody> Future for ResponseFuture<B> {
    type Output = Result<Response<Body>, ConnectionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            let error = this
                .failed
                .take()
                .expect("ResponseFuture polled after completion");
            return Poll::Ready(Err(error));
        };
        if let Some(pipe) = &mut inner.pipe
            && let Poll::Ready(sent) = pipe.poll_send(cx)
        {
            inner.pipe = None;
            match sent {
                Ok(()) => {}
                // The stream took no more: the response (perhaps sent without reading the
                // rest, RFC 9113, 8.1) or its error tells the caller what happened.
                Err(PipeError::Stream(error)) => {
                    debug!(error = ?error, "request body not sent whole");
                }
                Err(PipeError::Body(error)) => {
                    let authority = inner.handle.state.authority.clone();
                    // Dropping the stream's halves resets it.
                    this.inner = None;
                    return Poll::Ready(Err(ConnectionError::Request {
                        authority,
                        source: error,
                    }));
                }
            }
        }
        let outcome = ready!(Pin::new(&mut inner.response).poll(cx));
        let Inner {
            guard,
            handle,
            pipe,
            ..
        } = this.inner.take().expect("polled");
        match outcome {
            Ok(response) => {
                // A body still streaming (a client or bidi stream) goes on by itself.
                let pipe = pipe.map(|pipe| tokio::spawn(pipe.send()).abort_handle());
                let (parts, recv) = response.into_parts();
                let body = Body::new(recv, guard, pipe, handle).with_length(&parts.headers);
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            Err(error) => {
                let authority = handle.state.authority.clone();
                Poll::Ready(Err(if never_processed(&error) {
                    ConnectionError::Unprocessed {
                        authority,
                        source: Box::new(error),
                    }
                } else {
                    ConnectionError::Request {
                        authority,
                        source: Box::new(error),
                    }
                }))
            }
        }
    }
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("sent", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

/// A response body from a [`Connection`]: h2's, counting its stream open until it ends.
pub struct Body {
    recv: h2::RecvStream,
    /// The data frames are over; the trailers are next.
    data_done: bool,
    guard: Option<StreamGuard>,
    /// The task sending the rest of the request body, stopped with the response.
    pipe: Option<tokio::task::AbortHandle>,
    /// What is left of a `content-length`, for the size hint.
    remaining: Option<u64>,
    _handle: Arc<Handle>,
}

impl Body {
    fn new(
        recv: h2::RecvStream,
        guard: StreamGuard,
        pipe: Option<tokio::task::AbortHandle>,
        handle: Arc<Handle>,
    ) -> Self {
        let ended = recv.is_end_stream();
        Self {
            recv,
            data_done: false,
            guard: (!ended).then_some(guard),
            pipe,
            remaining: None,
            _handle: handle,
        }
    }

    fn with_length(mut self, headers: &HeaderMap) -> Self {
        self.remaining = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|length| length.to_str().ok()?.parse().ok());
        self
    }

    fn end(&mut self) {
        self.guard = None;
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
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let len = data.len();
                    // Read: the server may send as much again.
                    let _ = this.recv.flow_control().release_capacity(len);
                    if let Some(remaining) = &mut this.remaining {
                        *remaining = remaining.saturating_sub(len as u64);
                    }
                    if let Some(guard) = &this.guard {
                        guard.sub.read.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    if this.recv.is_end_stream() {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => {
                    this.end();
                    return Poll::Ready(Some(Err(error)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.end();
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
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
        f.debug_struct("Body")
            .field("open", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
