//! Keepalive and adaptive flow control for one connection, over h2's one user PING (hyper's
//! client does both the same way).
//!
//! - **Keepalive** (off by default; gRFC A8): when the interval passes with nothing read on
//!   the connection (while streams are open, or always with `keep_alive_while_idle`), a
//!   PING goes out; no PONG within the timeout ends the connection, so a half-open one is
//!   noticed. The interval is at least 10 s, and doubles for the service's new connections
//!   each time a server answers with GOAWAY `too_many_pings` ([`KeepAliveInterval`]).
//! - **Adaptive window** (bandwidth-delay product): while response data arrives, a PING goes
//!   out; the bytes read until its PONG are one sample of what the path holds, and a sample
//!   that fills two thirds of the stream window doubles the window toward it (at most
//!   16 MiB). Samples are taken at most every 100 ms, backing off to 10 s while the window
//!   stays put.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::time::{Instant, Sleep};

use super::settings::ConnectionSettings;

/// The largest window adaptive flow control grows to (hyper's limit too).
const WINDOW_LIMIT: u32 = 16 << 20;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const SAMPLE_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// The keepalive interval of a service's new connections (nanoseconds; 0 for off), shared
/// by its instances: a server's `too_many_pings` GOAWAY doubles it (gRFC A8).
#[derive(Debug)]
pub(crate) struct KeepAliveInterval(AtomicU64);

impl KeepAliveInterval {
    pub(crate) fn new(interval: Option<Duration>) -> Self {
        let nanos = interval.map_or(0, |i| u64::try_from(i.as_nanos()).unwrap_or(u64::MAX));
        Self(AtomicU64::new(nanos))
    }

    /// The interval for a connection opened now.
    pub(crate) fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// Doubles the interval (saturating); returns the new one.
    pub(crate) fn double(&self) -> Option<Duration> {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |nanos| {
                Some(nanos.saturating_mul(2))
            });
        self.get()
    }
}

/// What a pong, or its absence, asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PingOutcome {
    /// Set the stream and connection windows to this size.
    Window(u32),
    /// The keepalive ping went unanswered: close the connection.
    TimedOut,
}

/// The PING state of one connection.
pub(crate) struct Pinger {
    pong: PingPong,
    /// Response bytes read on the connection so far (its bodies add to it).
    read: Arc<AtomicU64>,
    /// The ping out, if one is: the bytes read when it was sent.
    out: Option<u64>,
    keepalive: Option<KeepAlive>,
    adaptive: Option<Adaptive>,
}

struct KeepAlive {
    interval: Duration,
    timeout: Duration,
    while_idle: bool,
    timer: Pin<Box<Sleep>>,
    /// Bytes read when the timer was last set: more since means the connection is alive.
    seen: u64,
    /// The timer runs for the answer to a ping, not for the interval.
    awaiting: bool,
}

struct Adaptive {
    window: u32,
    /// Bytes read at the last sample.
    sampled: u64,
    next: Instant,
    every: Duration,
}

impl Pinger {
    /// The pinger the settings ask for, if any.
    /// `interval` is the keepalive interval for this connection (`None` for off).
    pub(crate) fn new(
        pong: Option<PingPong>,
        settings: &ConnectionSettings,
        interval: Option<Duration>,
        read: Arc<AtomicU64>,
    ) -> Option<Self> {
        let keepalive = interval.map(|interval| KeepAlive {
            interval,
            timeout: settings.keep_alive_timeout,
            while_idle: settings.keep_alive_while_idle,
            timer: Box::pin(tokio::time::sleep_until(after(Instant::now(), interval))),
            seen: 0,
            awaiting: false,
        });
        let adaptive = settings
            .adaptive_window
            .then(|| Adaptive::new(settings.stream_window()));
        if keepalive.is_none() && adaptive.is_none() {
            return None;
        }
        Some(Self {
            pong: pong?,
            read,
            out: None,
            keepalive,
            adaptive,
        })
    }

    /// Drives the pings; `streams` is how many streams are open on the connection.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, streams: usize) -> Poll<PingOutcome> {
        let read = self.read.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut ponged = None;
        if let Some(sent) = self.out
            && let Poll::Ready(answer) = self.pong.poll_pong(cx)
        {
            self.out = None;
            if answer.is_ok() {
                ponged = self.answered(now, read, read.saturating_sub(sent));
            }
        }
        if self.out.is_none()
            && let Some(adaptive) = &self.adaptive
            && adaptive.wants_sample(now, read)
        {
            self.send(read);
        }
        if let Some(ponged) = ponged {
            return Poll::Ready(ponged);
        }
        self.poll_keepalive(cx, now, read, streams)
    }

    /// A pong came: the connection is alive, and the bytes since the ping are a sample.
    fn answered(&mut self, now: Instant, read: u64, bytes: u64) -> Option<PingOutcome> {
        if let Some(keepalive) = &mut self.keepalive {
            keepalive.rearm(now, read);
        }
        let window = self.adaptive.as_mut()?.sample(now, read, bytes)?;
        Some(PingOutcome::Window(window))
    }

    fn poll_keepalive(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
        read: u64,
        streams: usize,
    ) -> Poll<PingOutcome> {
        loop {
            let Some(keepalive) = &mut self.keepalive else {
                return Poll::Pending;
            };
            if keepalive.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if keepalive.awaiting {
                return Poll::Ready(PingOutcome::TimedOut);
            }
            if read != keepalive.seen || (streams == 0 && !keepalive.while_idle) {
                keepalive.rearm(now, read);
                continue;
            }
            keepalive.awaiting = true;
            let deadline = after(now, keepalive.timeout);
            keepalive.timer.as_mut().reset(deadline);
            // A ping already out (for a window sample) answers for this one too.
            if self.out.is_none() {
                self.send(read);
            }
        }
    }

    fn send(&mut self, read: u64) {
        if self.pong.send_ping(Ping::opaque()).is_ok() {
            self.out = Some(read);
        }
    }
}

impl Adaptive {
    fn new(window: u32) -> Self {
        Self {
            window,
            sampled: 0,
            next: Instant::now(),
            every: SAMPLE_EVERY,
        }
    }

    /// Whether to ping for a sample: data arrived since the last one, and it is time.
    fn wants_sample(&self, now: Instant, read: u64) -> bool {
        read > self.sampled && now >= self.next
    }

    /// `bytes` were read in one round trip: a sample that fills two thirds of the window
    /// grows it to twice the sample (the new window, to set), else sampling slows down.
    fn sample(&mut self, now: Instant, read: u64, bytes: u64) -> Option<u32> {
        self.sampled = read;
        let window = u64::from(self.window);
        let grown = if self.window < WINDOW_LIMIT && bytes * 3 >= window * 2 {
            let doubled = (bytes * 2).min(u64::from(WINDOW_LIMIT));
            self.window = u32::try_from(doubled)
                .unwrap_or(WINDOW_LIMIT)
                .max(self.window);
            self.every = SAMPLE_EVERY;
            Some(self.window)
        } else {
            self.every = (self.every * 2).min(SAMPLE_AT_MOST_EVERY);
            None
        };
        self.next = after(now, self.every);
        grown
    }
}

impl KeepAlive {
    fn rearm(&mut self, now: Instant, read: u64) {
        self.seen = read;
        self.awaiting = false;
        let next = after(now, self.interval);
        self.timer.as_mut().reset(next);
    }
}

/// `now + duration`, saturating far in the future (a configured duration may be huge).
fn after(now: Instant, duration: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    now.checked_add(duration.min(FAR)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches a window that never grows, grows on a small sample, passes the limit, or
    /// keeps sampling at full rate while nothing changes.
    #[test]
    fn a_sample_filling_two_thirds_of_the_window_doubles_it_up_to_the_limit() {
        let now = Instant::now();
        let mut adaptive = Adaptive::new(1 << 20);
        assert_eq!(
            adaptive.sample(now, 100, 600 << 10),
            None,
            "under two thirds"
        );
        assert_eq!(adaptive.every, SAMPLE_EVERY * 2, "sampling slows down");
        assert_eq!(adaptive.next, now + SAMPLE_EVERY * 2);
        assert_eq!(adaptive.sampled, 100);
        assert_eq!(adaptive.sample(now, 200, 700 << 10), Some(1400 << 10));
        assert_eq!(adaptive.every, SAMPLE_EVERY, "a change samples again soon");
        assert_eq!(adaptive.sample(now, 300, 12 << 20), Some(WINDOW_LIMIT));
        assert_eq!(adaptive.sample(now, 400, 64 << 20), None, "at the limit");
        for _ in 0..10 {
            adaptive.sample(now, 500, 0);
        }
        assert_eq!(adaptive.every, SAMPLE_AT_MOST_EVERY);
    }

    /// Catches sampling with no data flowing (pings a server may count as abuse), before the
    /// sampling delay, or never.
    #[test]
    fn a_sample_is_taken_only_when_data_arrived_and_it_is_time() {
        let mut adaptive = Adaptive::new(1 << 20);
        let now = adaptive.next;
        assert!(
            adaptive.wants_sample(now, 1),
            "data arrived, and it is time"
        );
        assert!(
            !adaptive.wants_sample(now, 0),
            "no data since the last sample"
        );
        adaptive.sample(now, 10, 0);
        let next = adaptive.next;
        assert!(!adaptive.wants_sample(next - Duration::from_millis(1), 11));
        assert!(adaptive.wants_sample(next, 11), "exactly when due");
        assert!(
            !adaptive.wants_sample(next, 10),
            "nothing new since the sample"
        );
    }

    /// Catches an interval that does not double on `too_many_pings` (the server would
    /// close every new connection the same way), one that overflows, and "off" turned on.
    #[test]
    fn the_keepalive_interval_doubles_and_saturates() {
        let interval = KeepAliveInterval::new(Some(Duration::from_secs(10)));
        assert_eq!(interval.get(), Some(Duration::from_secs(10)));
        assert_eq!(interval.double(), Some(Duration::from_secs(20)));
        assert_eq!(interval.get(), Some(Duration::from_secs(20)));
        let huge = KeepAliveInterval::new(Some(Duration::MAX));
        assert_eq!(huge.double(), Some(Duration::from_nanos(u64::MAX)));
        let off = KeepAliveInterval::new(None);
        assert_eq!((off.double(), off.get()), (None, None));
    }

    /// Catches a saturation that is no saturation (a huge configured interval would panic)
    /// or one that cuts ordinary durations short (pings would go out at once).
    #[test]
    fn later_saturates_far_ahead_and_keeps_ordinary_durations() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let year = Duration::from_secs(365 * 24 * 3600);
        assert!(after(now, Duration::MAX) > now + 20 * year);
    }
}
