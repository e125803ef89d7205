//! The errors of connections: [`ConnectionError`] for requests, and why a dial failed.

use std::time::Duration;

use crate::endpoint::Connectivity;

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
    /// The server did not agree to HTTP/2 in the TLS handshake (ALPN `h2`). Behind a
    /// Consul Connect sidecar, that means the service's protocol is neither `http2` nor
    /// `grpc` (its `service-defaults` config entry); a sidecar of a `tcp` service
    /// negotiates nothing, which [`TlsConfig::http2_without_alpn`] accepts.
    ///
    /// [`TlsConfig::http2_without_alpn`]: super::TlsConfig::http2_without_alpn
    #[error(
        "the server did not negotiate HTTP/2 over TLS (ALPN `h2`; it chose {}): behind a Consul Connect sidecar, set the service's `Protocol` to `http2` or `grpc` in its `service-defaults` config entry",
        .negotiated.as_deref().map_or_else(|| "none".to_owned(), |p| format!("`{p}`"))
    )]
    NoHttp2 {
        /// The protocol it negotiated instead, if any.
        negotiated: Option<String>,
    },
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
        source: Option<crate::endpoint::ReadinessError>,
    },
    /// h2 refused to open the request's stream: the connection had closed, or was closing
    /// (a GOAWAY came). Nothing was written; the integrations send it again on another
    /// connection.
    #[error("request to `{authority}` was not sent: the connection takes no new streams")]
    NotSent {
        /// The instance's address.
        authority: String,
        /// What h2 said.
        #[source]
        source: crate::error::BoxError,
    },
    /// The server refused the request's stream (`REFUSED_STREAM`): it did not process it.
    /// It is safe to send again, and the integrations do, once, on another connection.
    #[error("request to `{authority}` was refused unprocessed")]
    Unprocessed {
        /// The instance's address.
        authority: String,
        /// What h2 said.
        #[source]
        source: crate::error::BoxError,
    },
    /// The server closed the connection with a GOAWAY whose last stream id is below the
    /// request's (RFC 9113, 6.8): it did not process it. The connection was closing (the
    /// server closes connections after so many requests, or at an age), which says nothing
    /// of the next one; the integrations send the request again on another connection.
    #[error("request to `{authority}` was not processed: the connection was closing (GOAWAY)")]
    GoAway {
        /// The instance's address.
        authority: String,
        /// What h2 said.
        #[source]
        source: crate::error::BoxError,
    },
    /// Every connection to the instance was at the server's stream limit for the whole
    /// [stream wait](super::ConnectionSettings::stream_wait), and no more could open.
    /// Nothing was sent.
    #[error(
        "every connection to `{authority}` ({connections}) is at the server's limit of {limit} concurrent streams; waited {waited:?} for one"
    )]
    StreamLimit {
        /// The instance's address.
        authority: String,
        /// The server's `MAX_CONCURRENT_STREAMS`.
        limit: usize,
        /// Its connections open.
        connections: usize,
        /// How long the request waited.
        waited: Duration,
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
    /// Whether the server provably did not process the request: it never left this
    /// process, or the server refused it. Such a request says nothing about the instance
    /// (outlier detection does not count it) and is safe to send again.
    pub fn is_unprocessed(&self) -> bool {
        matches!(
            self,
            Self::Unprocessed { .. }
                | Self::GoAway { .. }
                | Self::NotSent { .. }
                | Self::NotConnected { .. }
                | Self::StreamLimit { .. }
        )
    }

    /// Whether the request never left this process (no connection, or h2 refused to open
    /// its stream): gRFC A6 retries such a request for as long as its deadline allows.
    pub fn never_sent(&self) -> bool {
        matches!(self, Self::NotSent { .. } | Self::NotConnected { .. })
    }

    /// The error of a stream that failed, by what h2 says: refused unprocessed
    /// (`REFUSED_STREAM`), above a GOAWAY's last stream id, or failed (it may have reached
    /// the server).
    pub(crate) fn of_stream(authority: String, error: h2::Error) -> Self {
        let source = Box::new(error);
        if !source.is_remote() {
            Self::Request { authority, source }
        } else if source.is_go_away() {
            Self::GoAway { authority, source }
        } else if source.is_reset() && source.reason() == Some(h2::Reason::REFUSED_STREAM) {
            Self::Unprocessed { authority, source }
        } else {
            Self::Request { authority, source }
        }
    }
}
