//! One dial: TCP (with its socket options), TLS when configured (ALPN `h2` required), the
//! HTTP/2 handshake, and the server's first frame, all under the connect timeout.
//!
//! h2's handshake returns once the client preface is written; a connection counts as
//! made only when the server has answered (its preface is a SETTINGS frame). Until then a
//! listener that accepts but does not serve, or a proxy that holds the connection, would be
//! pickable and hold the requests sent to it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;

use super::error::DialError;
use super::settings::ConnectionSettings;

/// A dialled stream, plain or TLS, that reports the first bytes the server sends.
pub(crate) struct Io {
    stream: Stream,
    answered: Option<oneshot::Sender<()>>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The HTTP/2 connection h2 hands back, to be polled for as long as it has streams.
pub(crate) type H2Connection = Connection<Io, Bytes>;

/// Dials `host:port` (TLS with the server name `name` unless the settings set one) and
/// hands back the request sender and the connection to drive.
pub(crate) async fn dial(
    host: &str,
    port: u16,
    name: &str,
    settings: &ConnectionSettings,
) -> Result<(SendRequest<Bytes>, H2Connection), DialError> {
    let attempt = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(DialError::Connect)?;
        tcp.set_nodelay(settings.tcp_nodelay)
            .map_err(DialError::Connect)?;
        if let Some(idle) = settings.tcp_keepalive {
            set_tcp_keepalive(&tcp, idle).map_err(DialError::Connect)?;
        }
        let stream = match &settings.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let name = tls
                    .name_or(if name.is_empty() { host } else { name })
                    .map_err(|e| DialError::Tls(io::Error::other(e)))?;
                let connector = tokio_rustls::TlsConnector::from(tls.client_config());
                let stream = connector.connect(name, tcp).await.map_err(DialError::Tls)?;
                let alpn = stream.get_ref().1.alpn_protocol();
                if !tls.speaks_http2(alpn) {
                    let negotiated = alpn.map(|p| String::from_utf8_lossy(p).into_owned());
                    return Err(DialError::NoHttp2 { negotiated });
                }
                Stream::Tls(Box::new(stream))
            }
        };
        let (answered, answer) = oneshot::channel();
        let io = Io {
            stream,
            answered: Some(answered),
        };
        let (send, mut connection) = settings
            .h2_builder()
            .handshake(io)
            .await
            .map_err(DialError::Handshake)?;
        tokio::select! {
            biased;
            Ok(()) = answer => Ok((send, connection)),
            ended = &mut connection => Err(match ended {
                Err(error) => DialError::Handshake(error),
                Ok(()) => DialError::NoAnswer,
            }),
        }
    };
    tokio::time::timeout(settings.connect_timeout, attempt)
        .await
        .map_err(|_| DialError::TimedOut(settings.connect_timeout))?
}

/// Probes a connection silent for `idle` every [`PROBE_EVERY`], and gives up after
/// [`PROBES`] unanswered ones; data unacknowledged for as long closes it too, where the
/// platform has `TCP_USER_TIMEOUT`. None of this reaches the server's HTTP/2 stack, so no
/// ping policy counts it.
fn set_tcp_keepalive(tcp: &TcpStream, idle: std::time::Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new().with_time(idle);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "windows",
        target_os = "freebsd"
    ))]
    let keepalive = keepalive.with_interval(PROBE_EVERY).with_retries(PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(idle.saturating_add(PROBE_EVERY * PROBES)))?;
    Ok(())
}

/// How often TCP keepalive probes a silent connection.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Unanswered probes before the connection is closed.
const PROBES: u32 = 3;

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = match &mut this.stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() > before
            && let Some(answered) = this.answered.take()
        {
            let _ = answered.send(());
        }
        read
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
