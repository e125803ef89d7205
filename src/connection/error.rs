//! The errors of connections: [`ConnectionError`] for requests, and why a dial failed.

use std::time::Duration;

use crate::balance::Connectivity;

/// Why one dial failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The TCP connect failed (refused, unreachable, the name did not resolve).
    #[error("TCP connect failed")]
    Connect(#[source] std::io::Error),
    /// The TLS handshake failed (for instance, the certificate did not verify).
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    /// The server did not agree to HTTP/2 in the TLS handshake (ALPN).
    #[error("the server did not negotiate HTTP/2 (ALPN h2)")]
    NoHttp2,
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake failed")]
    Handshake(#[source] h2::Error),
    /// Connecting took longer than the connect timeout.
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    /// The server closed the connection before it sent its HTTP/2 preface.
    #[error("the server closed the connection before answering the HTTP/2 handshake")]
    NoAnswer,
    /// The connection closed right after it opened (the server refused it after the
    /// handshake, for instance for a missing client certificate).
    #[error("the connection closed {0:?} after it opened")]
    ClosedEarly(Duration),
}

/// A request on a connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The instance has no open connection (it is connecting, or its last connect failed):
    /// nothing was sent.
    #[error("`{authority}` is not connected ({state:?})")]
    NotConnected {
        /// The instance's address.
        authority: String,
        /// Its state.
        state: Connectivity,
        /// The last dial error, if a dial failed.
        #[source]
        source: Option<crate::balance::ReadinessError>,
    },
    /// The server provably did not process the request: it never left this process (the
    /// connection closed first), or the server refused its stream (`REFUSED_STREAM`, or a
    /// GOAWAY whose last stream id is below it). It is safe to send again, and the
    /// integrations do, once, on another endpoint.
    #[error("request to `{authority}` was not processed")]
    Unprocessed {
        /// The instance's address.
        authority: String,
        /// What h2 said.
        #[source]
        source: crate::error::BoxError,
    },
    /// The request failed on the connection (it may have reached the server).
    #[error("request to `{authority}` failed")]
    Request {
        /// The instance's address.
        authority: String,
        /// What h2 said, or the request body's error.
        #[source]
        source: crate::error::BoxError,
    },
}

impl ConnectionError {
    /// Whether the server provably did not process the request.
    pub fn is_unprocessed(&self) -> bool {
        matches!(self, Self::Unprocessed { .. } | Self::NotConnected { .. })
    }
}

/// Whether h2's error says the server did not process the stream: refused
/// (`REFUSED_STREAM`) or above a GOAWAY's last stream id (RFC 9113, 8.7).
pub(crate) fn never_processed(error: &h2::Error) -> bool {
    error.is_remote()
        && (error.is_go_away()
            || (error.is_reset() && error.reason() == Some(h2::Reason::REFUSED_STREAM)))
}
