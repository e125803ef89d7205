//! Per-instance HTTP/2 connections (grpc-go's subchannels): eager, state-aware, unbuffered.
//!
//! The channel and the HTTP layer keep one connection per discovered instance. Each has a driver task
//! that connects at once (or, [lazily](ConnectionSettings::eager), on the first request),
//! over TCP or rustls, and reports the instance's state to the balancer through a
//! [`Readiness`]:
//!
//! | state | when | picked |
//! | --- | --- | --- |
//! | [`Idle`](crate::endpoint::Connectivity::Idle) | lazy, before the first request (and after a close) | yes: the pick connects |
//! | [`Connecting`](crate::endpoint::Connectivity::Connecting) | dialling, the first time or after a close | no, while another instance is ready |
//! | [`Ready`](crate::endpoint::Connectivity::Ready) | a connection is open | yes |
//! | [`TransientFailure`](crate::endpoint::Connectivity::TransientFailure) | the last connect failed (or a connection closed within 1 s, carrying nothing, without a graceful GOAWAY); the next waits for a backoff | no, while another instance is ready |
//!
//! A request goes straight to h2 from the caller's task: no `Buffer`, no task hop. It
//! claims a stream slot under the server's `MAX_CONCURRENT_STREAMS` when it is picked, and
//! gives it back when its stream is over for HTTP/2 (see `room.rs` and `body.rs`). When
//! every open connection is full, the driver opens another, up to
//! [`max_connections_per_instance`], and requests wait for a slot in the order they came (at
//! most [`stream_wait`]) instead of queueing inside h2 behind a full connection's streams;
//! meanwhile the instance is [saturated](crate::endpoint::Readiness::is_saturated), and the
//! balancer picks others.
//!
//! A connection that closes (the server died, or sent GOAWAY) takes no new stream from that
//! moment; streams already open on it finish, and the driver opens the next one at once. A
//! graceful GOAWAY (nginx after `keepalive_requests`, gRPC servers at
//! `max_connection_age`) is no failure of the instance (see `pool.rs`).
//!
//! HTTP/2 keepalive pings are off by default (gRFC A8), since gRPC servers close
//! connections that ping more than their policy allows; TCP keepalive finds half-open
//! connections (see [`ConnectionSettings`]).
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
mod open;
mod ping;
mod pipe;
mod pool;
mod replay;
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
