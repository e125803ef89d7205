//! Per-instance HTTP/2 connections (grpc-go's subchannels): eager, state-aware, unbuffered.
//!
//! [`LoadBalancedChannel`](crate::tonic) and `DiscoveryLayer::over_connections`
//! ([`http`](crate::http)) give each discovered instance its own HTTP/2 connection: an h2
//! client connection over TCP or rustls (ring, ALPN `h2`, optional client certificate), driven
//! by a task of its own. A request goes to h2 straight from the caller's task: its HEADERS and,
//! for a body that is ready at once (a unary gRPC request's is), its DATA are queued together
//! and leave in one write, with no `Buffer`, no dispatch channel, no task per request and no
//! lock of ours (only a body still streaming when the response arrives is sent on by a task of
//! its own). The balancer sees each connection's state, and the integrations' `endpoints()`
//! report it:
//!
//! | state | when | picked |
//! | --- | --- | --- |
//! | [`Idle`](crate::endpoint::Connectivity::Idle) | lazy connections only: before the first request, and after a close | yes: the pick connects it |
//! | [`Connecting`](crate::endpoint::Connectivity::Connecting) | dialling (TCP, TLS, and until the server answers the HTTP/2 handshake) | no, while another instance is ready |
//! | [`Ready`](crate::endpoint::Connectivity::Ready) | a connection is open | yes |
//! | `Saturated` (an [endpoint state](crate::balance::EndpointState)) | every connection is at the server's `MAX_CONCURRENT_STREAMS` | no, while another instance has room |
//! | [`TransientFailure`](crate::endpoint::Connectivity::TransientFailure) | the last connect failed (or a connection closed within 1 s having carried nothing, without a graceful GOAWAY): backing off, 100 ms doubling to 10 s, with jitter | no, while another instance is ready |
//!
//! When no instance is ready, a call waits up to `wait_for_endpoints` for one, then fails
//! `UNAVAILABLE` with the last connect error.
//!
//! # GOAWAY and transparent retries
//!
//! A connection that closes (crash, GOAWAY) takes its instance out of the picks at once, before
//! the registry notices; streams already open on a connection that got a GOAWAY finish there
//! (its keepalive still running), and a new connection is dialled at once. **A graceful GOAWAY
//! is routine, not a failure**: nginx sends one after `keepalive_requests` requests, gRPC
//! servers at `max_connection_age`; a connection that carried a response, or was closed with
//! `NO_ERROR`, never puts its instance into backoff, and a server that closes connections
//! within a second of opening them gets a spare connection so requests need not wait for the
//! next (see `pool.rs`).
//!
//! A request that provably never reached the server's application is sent again through a new
//! pick, on a connection that can take it: one that never left the client (up to 10 attempts,
//! whatever the retry buffer), or one the server refused (`REFUSED_STREAM`, a stream above a
//! GOAWAY's last stream id; up to 5 attempts, if its body fit in the retry buffer, 64 KiB).
//! **Where we differ from gRFC A6**: A6 retries a refused request once; refusals come in runs
//! (nginx refuses a retry too when it lands on another connection at its count, and C-core
//! counts a stream a moment after the client saw it end), so tower-sd retries more, and
//! resends a request refused with `REFUSED_STREAM` after a pause of a few milliseconds,
//! doubling, so that the server can finish counting (A6 does not wait). Such
//! requests are no verdict on the instance: outlier detection does not count them. They are
//! counted in `tower_sd_transparent_retries_total`.
//!
//! # Stream limits
//!
//! A request claims a stream slot on a connection when it is picked, before anything is sent,
//! so requests made ready together never overfill a connection. When every connection is full,
//! a second one opens (up to [`max_connections_per_instance`], default 4); when all are full,
//! requests wait for a slot in the order they came (never in h2's queue behind streams that may
//! never end), at most [`stream_wait`] (10 s), then fail `UNAVAILABLE` naming the server's
//! limit. Meanwhile the instance is [saturated](crate::endpoint::Readiness::is_saturated), and
//! the balancer picks others. A slot goes back when the stream is over for HTTP/2 (its last
//! frame arrived), whether or not the caller has read the body (see `room.rs` and `body.rs`).
//!
//! # Eager or lazy
//!
//! Connections are eager by default: an instance starts connecting when it is discovered (at
//! most `max_concurrent_connects`, default 16, at a time), so scale-out adds no connect time to
//! requests. For very large sets where each client talks to a few instances,
//! [`eager(false)`](ConnectionSettings::eager) connects an instance on its first pick instead
//! (that request pays the connect).
//!
//! # Defaults that no common server punishes
//!
//! Connect timeout 5 s. **No HTTP/2 keepalive pings** (gRFC A8's default, as grpc-go, tonic and
//! hyper): gRPC servers (C-core, grpc-go) allow one ping per 5 minutes while they send no data
//! and close the connection with GOAWAY `too_many_pings` after two more, failing every stream
//! on it, so 30 s pings ended a quiet `Health/Watch` stream after 150 s. A half-open connection
//! is found by **TCP keepalive** instead, which servers never see: probes after 60 s of
//! silence, every 10 s, closed after 3 unanswered (and `TCP_USER_TIMEOUT` for data left
//! unacknowledged as long), whether the connection is idle, waits for a response or holds a
//! quiet stream. [`http2_keep_alive_interval`](ConnectionSettings::http2_keep_alive_interval) turns pings
//! on, at least every 10 s (A8's floor), with a 20 s timeout; a `too_many_pings` GOAWAY doubles
//! the interval for the service's new connections, with a warning.
//!
//! `:authority` carries the host, never a `Host` header beside it (RFC 9113, 8.3.1; nginx
//! answers 400 to a request with both). `TCP_NODELAY`; hyper's client windows (2 MiB per
//! stream, 5 MiB per connection), or adaptive flow control (`adaptive_window`, from PING round
//! trips, up to 16 MiB). A request body is read no faster than its stream takes it, and the
//! connection-specific headers HTTP/2 forbids (`Connection`, `Keep-Alive`,
//! `Transfer-Encoding`, `Upgrade`, a `TE` other than `trailers`) are dropped.
//!
//! # Deadlines
//!
//! Deadlines cover the whole call, as gRPC's do: `LoadBalancedChannel::timeout` (or a shorter
//! `grpc-timeout` the caller set) goes to the server as `grpc-timeout`, and a call past it,
//! response body included (a server stream too), ends with `DEADLINE_EXCEEDED`. tonic's
//! `Endpoint::timeout` stops at the response headers (gRPC's interop case
//! `timeout_on_sleeping_server` fails through it).
//!
//! # TLS
//!
//! A [`TlsConfig`] (`with_platform_roots()`, `with_ca_pem(..)`, `identity_pem(..)` for mutual
//! TLS, `server_name(..)`, or `from_rustls(ClientConfig)`); the server name defaults to the
//! service name. HTTP/1.1 servers are reached through `DiscoveryLayer` around hyper-util's
//! pooled client.
//!
//! [`stream_wait`]: ConnectionSettings::stream_wait
//! [`max_connections_per_instance`]: ConnectionSettings::max_connections_per_instance

// The connections serve the integrations (`tonic`, `http`); a build with only
// `consul-connect` uses the TLS types alone.
#![cfg_attr(not(any(feature = "tonic", feature = "http")), allow(dead_code))]

mod body;
mod dial;
mod error;
mod future;
mod head;
#[cfg(feature = "tonic")]
pub(crate) mod hedge;
mod open;
mod ping;
mod pipe;
pub(crate) mod policy;
mod pool;
pub(crate) mod replay;
pub(crate) mod retry;
mod room;
mod service;
mod settings;
mod task;
#[cfg(test)]
mod tests;
mod tls;

pub use body::Body;
pub use error::{ConnectionError, DialError};
pub(crate) use service::Connection;
pub use settings::ConnectionSettings;
pub use tls::{ClientConfigSource, TlsConfig};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore};

use crate::endpoint::{Connectivity, Endpoint, Readiness};
use crate::error::BoxError;
use crate::error::{Error, InvalidValue, Result};
use crate::instance::ServiceInstance;

/// A request body the connections can send: `Bytes` data, an error that boxes, `Send` and
/// `Unpin` (tonic's body, and `Full`, `Empty` and boxed bodies of http-body-util, are).
pub(crate) trait SendBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<T> SendBody for T where
    T: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// Makes the [`Connection`]s to the instances of one service, sharing its settings and its
/// bound on connects in progress.
#[derive(Clone)]
pub(crate) struct Connector {
    settings: Arc<ConnectionSettings>,
    connects: Arc<Semaphore>,
    /// The keepalive interval of new connections, doubled by `too_many_pings` GOAWAYs.
    keepalive: Arc<ping::KeepAliveInterval>,
    /// The service the connections are for.
    service: Arc<str>,
}

impl Connector {
    /// A connector with these settings.
    pub(crate) fn new(settings: ConnectionSettings) -> Self {
        Self {
            connects: Arc::new(Semaphore::new(settings.max_concurrent_connects)),
            keepalive: Arc::new(ping::KeepAliveInterval::new(settings.keep_alive_interval)),
            settings: Arc::new(settings),
            service: Arc::from(""),
        }
    }

    /// The service the connections are for: the TLS server name when the [`TlsConfig`]
    /// names none (never the dialled address), and the `service` label of the metrics.
    #[must_use]
    pub(crate) fn service(mut self, name: impl Into<Arc<str>>) -> Self {
        self.service = name.into();
        self
    }

    /// Starts the connection to `instance`: its driver task connects at once unless the
    /// settings make connections lazy.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInstance`] when the instance's address and port do not make a URI
    /// authority.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (the driver task is spawned on it).
    pub(crate) fn connect<B: SendBody>(&self, instance: &ServiceInstance) -> Result<Connection<B>> {
        let authority = instance.authority();
        let Ok(dialled) = authority.parse::<http::uri::Authority>() else {
            return Err(Error::InvalidInstance {
                field: "address",
                source: InvalidValue::NotAnAddress(instance.address.clone()),
            });
        };
        let origin = match &self.settings.origin {
            Some(origin) => origin.clone(),
            None => (self.settings.scheme(), dialled),
        };
        let initial = if self.settings.eager {
            Connectivity::Connecting
        } else {
            Connectivity::Idle
        };
        let readiness = Readiness::new(initial);
        let state = Arc::new(pool::Shared {
            host: instance.address.clone(),
            port: instance.port,
            authority,
            origin,
            service: Arc::clone(&self.service),
            tls_name: self
                .settings
                .tls
                .as_ref()
                .and_then(|tls| tls.instance_name(instance)),
            room: Arc::new(room::Room::new(readiness.clone())),
            readiness,
            connections: ArcSwap::from_pointee(Vec::new()),
            generation: AtomicU64::new(0),
            changed: Notify::new(),
            demand: Notify::new(),
            settings: Arc::clone(&self.settings),
            keepalive: Arc::clone(&self.keepalive),
            connects: Arc::clone(&self.connects),
            limit: self
                .settings
                .concurrency_limit
                .map(|limit| Arc::new(Semaphore::new(limit))),
        });
        let task = tokio::spawn(pool::run(Arc::clone(&state))).abort_handle();
        Ok(Connection::new(state, task))
    }

    /// [`connect`](Self::connect), with the connection wrapped by `wrap` (the integration's
    /// request rewrite) as a balancer [`Endpoint`] with the instance's weight, zone and the
    /// connection's readiness.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect), or `wrap`'s error.
    pub(crate) fn endpoint<B: SendBody, S, E: Into<BoxError>>(
        &self,
        instance: &ServiceInstance,
        wrap: impl FnOnce(Connection<B>) -> std::result::Result<S, E>,
    ) -> std::result::Result<Endpoint<S>, BoxError> {
        let connection = self.connect(instance)?;
        let readiness = connection.readiness();
        let service = wrap(connection).map_err(Into::into)?;
        Ok(Endpoint::for_instance(service, instance).readiness(readiness))
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
