//! [`Connection`]: the service a balancer holds for one instance. A request goes straight to
//! a clone of hyper's `SendRequest` for one of the instance's open connections: no buffer,
//! no task hop.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::USER_AGENT;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::OwnedSemaphorePermit;

use super::SendBody;
use super::driver::{State, Sub};
use super::error::{ConnectionError, Unsent, never_processed};
use super::replay::ReplayBody;
use crate::balance::{Connectivity, Readiness};

/// The connection to one instance, as the balancer holds it: cheap to clone, each clone
/// keeping its own copy of the sender it last used.
///
/// Made by a [`Connector`](super::Connector). Its [`readiness`](Self::readiness) tells the
/// balancer whether it is connected; `poll_ready` is ready at once when it is, waits while
/// it connects, and fails ([`ConnectionError::NotConnected`]) while its last connect failed.
/// Requests take a [`ReplayBody`], which the integrations wrap around the caller's body
/// so that a request the server did not process can be sent again.
pub struct Connection<B> {
    handle: Arc<Handle<B>>,
    /// The sender this clone last used, with the generation of the set it came from.
    cached: Option<Cached<B>>,
    /// While waiting for a connection: resolves on the next change.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// The concurrency-limit permit taken by `poll_ready`, for the next call.
    permit: Option<OwnedSemaphorePermit>,
    acquiring: Option<Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send + Sync>>>,
}

struct Cached<B> {
    generation: u64,
    sub: Arc<Sub<B>>,
    send: SendRequest<ReplayBody<B>>,
}

/// Owns the driver task: the last clone's drop ends it (and its connections).
struct Handle<B> {
    state: Arc<State<B>>,
    task: tokio::task::AbortHandle,
}

impl<B> Drop for Handle<B> {
    fn drop(&mut self) {
        self.task.abort();
        self.state.readiness.set(Connectivity::Shutdown);
    }
}

impl<B: Send + 'static> Connection<B> {
    pub(crate) fn new(state: Arc<State<B>>, task: tokio::task::AbortHandle) -> Self {
        Self {
            handle: Arc::new(Handle { state, task }),
            cached: None,
            waiting: None,
            permit: None,
            acquiring: None,
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

    fn state(&self) -> &State<B> {
        &self.handle.state
    }

    /// Whether the cached sender is still current, open and not full.
    #[inline]
    fn cached_usable(&self) -> bool {
        let state = self.state();
        self.cached.as_ref().is_some_and(|cached| {
            cached.generation == state.generation.load(Ordering::Acquire)
                && cached.sub.has_room()
                && !cached.send.is_closed()
        })
    }

    /// Takes a sender from the current set: the first with room, else the least busy (and
    /// asks the driver for another connection). `false` when none is open.
    fn refresh(&mut self) -> bool {
        let state = &self.handle.state;
        let generation = state.generation.load(Ordering::Acquire);
        let subs = state.subs.load();
        let open = subs.iter().filter(|sub| !sub.send.is_closed());
        let chosen = match open.clone().find(|sub| sub.has_room()) {
            Some(sub) => Some(sub),
            None => {
                let busy = open.min_by_key(|sub| sub.streams.load(Ordering::Relaxed));
                if busy.is_some() {
                    state.demand.notify_one();
                }
                busy
            }
        };
        match chosen {
            Some(sub) => {
                self.cached = Some(Cached {
                    generation,
                    sub: Arc::clone(sub),
                    send: sub.send.clone(),
                });
                true
            }
            None => false,
        }
    }

    /// Waits for an open connection.
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
        self.poll_connected(cx)
    }

    fn call(&mut self, mut request: Request<ReplayBody<B>>) -> ResponseFuture<B> {
        let state = Arc::clone(&self.handle.state);
        let Some(cached) = self.cached.as_mut() else {
            let error = self.not_connected(state.readiness.get());
            return ResponseFuture::failed(error);
        };
        set_origin(&mut request, &state);
        if let Some(user_agent) = &state.settings.user_agent
            && !request.headers().contains_key(USER_AGENT)
        {
            request.headers_mut().insert(USER_AGENT, user_agent.clone());
        }
        let guard = StreamGuard::new(&cached.sub.streams, self.permit.take());
        let sent = cached.send.try_send_request(request);
        ResponseFuture {
            inner: Some(Inner {
                sent: Box::pin(sent),
                guard,
                state,
            }),
            failed: None,
        }
    }
}

/// Puts the origin on the request URI: the configured one, else the dialled address.
fn set_origin<B, T>(request: &mut Request<T>, state: &State<B>) {
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

/// Counts a stream open on its connection (and holds the concurrency permit) until the
/// response ends or is dropped.
struct StreamGuard {
    streams: Arc<AtomicUsize>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl StreamGuard {
    fn new(streams: &Arc<AtomicUsize>, permit: Option<OwnedSemaphorePermit>) -> Self {
        streams.fetch_add(1, Ordering::Relaxed);
        Self {
            streams: Arc::clone(streams),
            _permit: permit,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

type Sent<B> = Pin<
    Box<
        dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<ReplayBody<B>>>>>
            + Send,
    >,
>;

/// The response future of a [`Connection`].
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<B> {
    inner: Option<Inner<B>>,
    failed: Option<ConnectionError>,
}

struct Inner<B> {
    sent: Sent<B>,
    guard: StreamGuard,
    state: Arc<State<B>>,
}

impl<B> ResponseFuture<B> {
    fn failed(error: ConnectionError) -> Self {
        Self {
            inner: None,
            failed: Some(error),
        }
    }
}

impl<B: Send + 'static> Future for ResponseFuture<B> {
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
        let outcome = ready!(inner.sent.as_mut().poll(cx));
        let Inner { guard, state, .. } = this.inner.take().expect("polled");
        let authority = state.authority.clone();
        match outcome {
            Ok(response) => Poll::Ready(Ok(response.map(|incoming| {
                let ended = incoming.is_end_stream();
                let mut body = Body {
                    inner: incoming,
                    guard: Some(guard),
                };
                if ended {
                    body.guard = None;
                }
                body
            }))),
            Err(mut error) => {
                drop(guard);
                let request = error.take_message();
                let error = error.into_error();
                if request.is_some() || never_processed(&error) {
                    Poll::Ready(Err(ConnectionError::Unprocessed {
                        authority,
                        source: error,
                        request: Unsent::new(request),
                    }))
                } else {
                    Poll::Ready(Err(ConnectionError::Request {
                        authority,
                        source: error,
                    }))
                }
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

/// A response body from a [`Connection`]: hyper's, counting its stream open until it ends.
pub struct Body {
    inner: Incoming,
    guard: Option<StreamGuard>,
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() || self.inner.is_end_stream() {
            self.guard = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("open", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
