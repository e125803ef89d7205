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
pub(crate) type Driver = Connection<Io, Bytes>;

/// Dials `host:port` and hands back the request sender and the connection to drive.
pub(crate) async fn dial(
    host: &str,
    port: u16,
    server_name: Option<&str>,
    settings: &ConnectionSettings,
) -> Result<(SendRequest<Bytes>, Driver), DialError> {
    let attempt = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(DialError::Connect)?;
        tcp.set_nodelay(settings.tcp_nodelay)
            .map_err(DialError::Connect)?;
        if let Some(idle) = settings.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new().with_time(idle);
            socket2::SockRef::from(&tcp)
                .set_tcp_keepalive(&keepalive)
                .map_err(DialError::Connect)?;
        }
        let stream = match &settings.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let name = tls
                    .name_or(server_name.unwrap_or(host))
                    .map_err(|e| DialError::Tls(io::Error::other(e)))?;
                let connector = tokio_rustls::TlsConnector::from(tls.client_config());
                let stream = connector.connect(name, tcp).await.map_err(DialError::Tls)?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(DialError::NoHttp2);
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
