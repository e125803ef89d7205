//! [`ConnectionSettings`]: how the connections to every instance are made and kept.

use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, Scheme};

use super::tls::TlsConfig;

/// The shortest keepalive interval (gRFC A8's floor: servers police pings, and grpc-go and
/// C-core servers allow one per 5 minutes by default while they send no data).
pub(crate) const KEEPALIVE_FLOOR: Duration = Duration::from_secs(10);

/// How the connections to the instances of one service are made and kept: one HTTP/2
/// connection per instance (more when the server's `MAX_CONCURRENT_STREAMS` is reached),
/// opened as soon as the instance is discovered.
///
/// The defaults are safe for production and for the servers production runs:
///
/// - a 5 s connect timeout; reconnects backing off from 100 ms to 10 s with full jitter; at
///   most 16 connects at a time per service and 4 connections per instance;
/// - **no HTTP/2 keepalive pings** (gRFC A8's default, as grpc-go, tonic and hyper):
///   gRPC servers (C-core, grpc-go) allow one ping per 5 minutes by default while they send
///   no data, and close the connection with GOAWAY `too_many_pings` after two more, failing
///   its streams. A half-open connection is found by **TCP keepalive** instead, which no
///   server sees: the kernel probes a connection that has been silent for 60 s every 10 s,
///   and closes it after 3 unanswered probes (or when data it sent goes unacknowledged for
///   as long), whether it is idle, waits for a response or holds a quiet stream;
/// - a request waits at most 10 s for a stream when every connection to its instance is at
///   the server's stream limit;
/// - a 64 KiB buffer per request for transparent retries.
#[derive(Clone, Debug)]
#[must_use]
pub struct ConnectionSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) tcp_nodelay: bool,
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) keep_alive_while_idle: bool,
    pub(crate) initial_stream_window_size: Option<u32>,
    pub(crate) initial_connection_window_size: Option<u32>,
    pub(crate) adaptive_window: bool,
    pub(crate) eager: bool,
    pub(crate) max_concurrent_connects: usize,
    pub(crate) stream_wait: Duration,
    pub(crate) max_connections_per_instance: usize,
    pub(crate) concurrency_limit: Option<usize>,
    pub(crate) retry_buffer_bytes: usize,
    pub(crate) retry_buffer_total_bytes: usize,
    pub(crate) reconnect_base: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) origin: Option<(Scheme, Authority)>,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            tcp_keepalive: Some(Duration::from_secs(60)),
            tcp_nodelay: true,
            keep_alive_interval: None,
            keep_alive_timeout: Duration::from_secs(20),
            keep_alive_while_idle: false,
            initial_stream_window_size: None,
            initial_connection_window_size: None,
            adaptive_window: false,
            eager: true,
            max_concurrent_connects: 16,
            stream_wait: Duration::from_secs(10),
            max_connections_per_instance: 4,
            concurrency_limit: None,
            retry_buffer_bytes: 64 << 10,
            retry_buffer_total_bytes: 16 << 20,
            reconnect_base: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            tls: None,
            user_agent: None,
            origin: None,
        }
    }
}

impl ConnectionSettings {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Time limit of one connect: TCP, TLS and the HTTP/2 handshake (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// TCP keepalive: the kernel probes a connection silent this long (default 60 s;
    /// `None` for off), every 10 s, and closes it after 3 unanswered probes; data left
    /// unacknowledged for as long closes it too (`TCP_USER_TIMEOUT`). Servers never see the
    /// probes.
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.tcp_keepalive = idle;
        self
    }

    /// `TCP_NODELAY` (default on).
    pub fn tcp_nodelay(mut self, enabled: bool) -> Self {
        self.tcp_nodelay = enabled;
        self
    }

    /// HTTP/2 keepalive ping interval (default `None`: off). At least 10 s (gRFC A8's floor;
    /// a shorter one is raised to it). Servers police pings: gRPC servers allow one per 5
    /// minutes by default while they send no data, so a shorter interval needs the
    /// server's permission (`grpc.http2.min_ping_interval_without_data_ms` in C-core,
    /// `keepalive.EnforcementPolicy.MinTime` in grpc-go). When a server answers with GOAWAY
    /// `too_many_pings`, the interval doubles for the service's new connections, and a
    /// warning says so. Pings go only while streams are open unless
    /// [`keep_alive_while_idle`](Self::keep_alive_while_idle) says otherwise.
    pub fn http2_keep_alive_interval(mut self, interval: Option<Duration>) -> Self {
        self.keep_alive_interval = interval.map(|interval| {
            if interval < KEEPALIVE_FLOOR {
                tracing::warn!(?interval, floor = ?KEEPALIVE_FLOOR, "keepalive interval raised to the floor");
            }
            interval.max(KEEPALIVE_FLOOR)
        });
        self
    }

    /// How long a keepalive ping may go unanswered before the connection is closed
    /// (default 20 s, as gRFC A8).
    pub fn keep_alive_timeout(mut self, timeout: Duration) -> Self {
        self.keep_alive_timeout = timeout;
        self
    }

    /// Ping idle connections too (default off; gRPC servers refuse such pings unless they
    /// permit them, `grpc.keepalive_permit_without_calls`).
    pub fn keep_alive_while_idle(mut self, enabled: bool) -> Self {
        self.keep_alive_while_idle = enabled;
        self
    }

    /// HTTP/2 initial stream window (default 2 MiB, as hyper's client).
    pub fn initial_stream_window_size(mut self, size: Option<u32>) -> Self {
        self.initial_stream_window_size = size;
        self
    }

    /// HTTP/2 initial connection window (default 5 MiB, as hyper's client).
    pub fn initial_connection_window_size(mut self, size: Option<u32>) -> Self {
        self.initial_connection_window_size = size;
        self
    }

    /// HTTP/2 adaptive flow control, from BDP pings (default off: the pings count against
    /// servers' ping limits).
    pub fn adaptive_window(mut self, enabled: bool) -> Self {
        self.adaptive_window = enabled;
        self
    }

    /// Connect as soon as an instance is discovered (`true`, the default), so it takes
    /// traffic connected; or only when a request first picks it (`false`, for very large
    /// sets, where keeping a connection to every instance costs more than it gives).
    pub fn eager(mut self, eager: bool) -> Self {
        self.eager = eager;
        self
    }

    /// Connects in progress at once, per service (default 16): a large set discovered at
    /// once connects in waves rather than all together.
    pub fn max_concurrent_connects(mut self, connects: usize) -> Self {
        self.max_concurrent_connects = connects.max(1);
        self
    }

    /// Connections to one instance at most (default 4). A second one opens when every open
    /// one has as many streams as the server's `MAX_CONCURRENT_STREAMS` allows; with all of
    /// them full, the instance's `poll_ready` waits until a stream ends.
    pub fn max_connections_per_instance(mut self, connections: usize) -> Self {
        self.max_connections_per_instance = connections.max(1);
        self
    }

    /// How long a request waits for a stream when every connection to its instance is at the
    /// server's `MAX_CONCURRENT_STREAMS` and no more may open (default 10 s). Requests wait
    /// in the order they came; past this, the request fails with
    /// [`ConnectionError::StreamLimit`](super::ConnectionError::StreamLimit) (gRPC
    /// `UNAVAILABLE`), naming the limit.
    pub fn stream_wait(mut self, wait: Duration) -> Self {
        self.stream_wait = wait;
        self
    }

    /// Requests in flight per instance, at most (default unlimited); a pick of an instance
    /// at the limit waits for one to finish.
    pub fn concurrency_limit(mut self, limit: Option<usize>) -> Self {
        self.concurrency_limit = limit.map(|limit| limit.max(1));
        self
    }

    /// Request body bytes kept so that a request the server provably did not process
    /// (`REFUSED_STREAM`, a stream above a GOAWAY's last stream id) can be sent again
    /// (default 64 KiB; 0 turns transparent retries of such requests off; requests that
    /// never left the client are retried whatever this says).
    pub fn retry_buffer(mut self, bytes: usize) -> Self {
        self.retry_buffer_bytes = bytes;
        self
    }

    /// Request body bytes kept for retries by all the requests of a channel (or of a
    /// `DiscoveryLayer`) together (default 16 MiB, grpc-java's): a request whose body
    /// would take more is not retried once it outgrows what was left, as one past
    /// [`retry_buffer`](Self::retry_buffer) is not.
    pub fn retry_buffer_total(mut self, bytes: usize) -> Self {
        self.retry_buffer_total_bytes = bytes;
        self
    }

    /// Backoff between failed connects: full jitter from `base`, doubling up to `max`
    /// (default 100 ms to 10 s).
    pub fn reconnect_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.reconnect_base = base;
        self.reconnect_max = max.max(base);
        self
    }

    /// Dial over TLS with this configuration.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The `user-agent` header of every request that has none.
    pub fn user_agent(mut self, user_agent: HeaderValue) -> Self {
        self.user_agent = Some(user_agent);
        self
    }

    /// The scheme and authority requests carry (`:scheme`, `:authority`), instead of the
    /// dialled address.
    pub fn origin(mut self, scheme: Scheme, authority: Authority) -> Self {
        self.origin = Some((scheme, authority));
        self
    }

    /// The HTTP/2 handshake's settings. The defaults are hyper's client's (windows of 2 MiB
    /// per stream and 5 MiB per connection, 16 KiB frames and header lists, a 1 MiB send
    /// buffer per stream, 100 streams before the server's SETTINGS arrive), and push is off.
    pub(crate) fn h2_builder(&self) -> h2::client::Builder {
        let stream_window = self.stream_window();
        let connection_window = self.initial_connection_window_size.unwrap_or(5 << 20);
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .initial_max_send_streams(100)
            .max_frame_size(16 << 10)
            .max_header_list_size(16 << 10)
            .max_send_buffer_size(1 << 20)
            .max_local_error_reset_streams(Some(1024))
            .enable_push(false);
        builder
    }

    /// The stream window a connection starts with (what adaptive flow control grows from).
    pub(crate) fn stream_window(&self) -> u32 {
        self.initial_stream_window_size.unwrap_or(2 << 20)
    }

    /// The scheme dialled.
    pub(crate) fn scheme(&self) -> Scheme {
        if self.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches a setter that sets nothing, or that starts from the defaults again (it would
    /// drop every setting made before it): each is chained after the others, every one to
    /// something other than its default, and all must hold at the end.
    #[test]
    fn every_setter_sets_its_own_setting_and_keeps_the_others() {
        let ms = Duration::from_millis;
        let settings = ConnectionSettings::new()
            .connect_timeout(ms(1))
            .tcp_keepalive(Some(ms(2)))
            .tcp_nodelay(false)
            .http2_keep_alive_interval(Some(ms(30_000)))
            .keep_alive_timeout(ms(4))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(5))
            .initial_connection_window_size(Some(6))
            .adaptive_window(true)
            .eager(false)
            .max_concurrent_connects(7)
            .stream_wait(ms(13))
            .max_connections_per_instance(8)
            .concurrency_limit(Some(9))
            .retry_buffer(10)
            .reconnect_backoff(ms(11), ms(12))
            .user_agent(HeaderValue::from_static("agent"))
            .origin(Scheme::HTTPS, Authority::from_static("example.com"));
        assert_eq!(settings.connect_timeout, ms(1));
        assert_eq!(settings.tcp_keepalive, Some(ms(2)));
        assert!(!settings.tcp_nodelay);
        assert_eq!(settings.keep_alive_interval, Some(ms(30_000)));
        assert_eq!(settings.keep_alive_timeout, ms(4));
        assert!(settings.keep_alive_while_idle);
        assert_eq!(settings.stream_window(), 5);
        assert_eq!(settings.initial_connection_window_size, Some(6));
        assert!(settings.adaptive_window);
        assert!(!settings.eager);
        assert_eq!(settings.max_concurrent_connects, 7);
        assert_eq!(settings.stream_wait, ms(13));
        assert_eq!(settings.max_connections_per_instance, 8);
        assert_eq!(settings.concurrency_limit, Some(9));
        assert_eq!(settings.retry_buffer_bytes, 10);
        assert_eq!(
            (settings.reconnect_base, settings.reconnect_max),
            (ms(11), ms(12))
        );
        assert_eq!(settings.user_agent, Some(HeaderValue::from_static("agent")));
        let origin = Some((Scheme::HTTPS, Authority::from_static("example.com")));
        assert_eq!(settings.origin, origin);
        assert_eq!(settings.scheme(), Scheme::HTTP, "no TLS was set");
    }

    /// Catches keepalive pings on by default (gRPC servers close connections that ping more
    /// than once per 5 minutes with no data, failing their streams) and an interval under
    /// gRFC A8's floor.
    #[test]
    fn keepalive_is_off_by_default_and_never_under_the_floor() {
        let defaults = ConnectionSettings::default();
        assert_eq!(defaults.keep_alive_interval, None);
        assert_eq!(defaults.keep_alive_timeout, Duration::from_secs(20));
        assert_eq!(defaults.tcp_keepalive, Some(Duration::from_secs(60)));
        let fast = defaults.http2_keep_alive_interval(Some(Duration::from_millis(300)));
        assert_eq!(fast.keep_alive_interval, Some(Duration::from_secs(10)));
        let off = fast.http2_keep_alive_interval(None);
        assert_eq!(off.keep_alive_interval, None);
    }
}
