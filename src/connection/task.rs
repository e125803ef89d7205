//! The tasks of one open connection: [`ConnectionTask`] drives it while it takes new
//! streams (with its keepalive and adaptive window), and says how it left the set;
//! [`DrainingTask`] drives what is left of it after a GOAWAY, keepalive included, until its
//! last stream ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tracing::debug;

use super::dial::H2Connection;
use super::open::OpenConnection;
use super::ping::{PingOutcome, Pinger};

/// LeaveReason a connection left the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaveReason {
    /// The server sent GOAWAY; `graceful` for `NO_ERROR`.
    GoAway { graceful: bool },
    /// GOAWAY `ENHANCE_YOUR_CALM` `too_many_pings`: the server's ping policy.
    TooManyPings,
    /// The connection ended (closed by the peer, or an error) or its task panicked.
    Failed,
    /// A keepalive ping went unanswered.
    Silent,
}

/// A connection that left the set: its id, how long it was open, whether it carried a
/// response, and what is left of it to drain.
pub(crate) struct Left {
    pub(crate) id: u64,
    pub(crate) lived: Duration,
    pub(crate) carried: bool,
    pub(crate) how: LeaveReason,
    pub(crate) rest: Option<DrainingTask>,
}

/// An open connection, driven until it takes no new streams.
pub(crate) struct ConnectionTask {
    /// `None` once handed on to drain.
    pub(crate) connection: Option<H2Connection>,
    pub(crate) pinger: Option<Pinger>,
    /// A sender of its own, never used to send: its readiness says whether h2 still takes
    /// new streams.
    pub(crate) probe: SendRequest<Bytes>,
    pub(crate) conn: Arc<OpenConnection>,
    pub(crate) opened: tokio::time::Instant,
}

impl ConnectionTask {
    fn leave(&mut self, how: LeaveReason, drain: bool) -> Poll<Left> {
        self.conn.closed.store(true, Ordering::Relaxed);
        let rest = if drain {
            self.connection.take().map(|connection| DrainingTask {
                connection,
                pinger: self.pinger.take(),
                conn: Arc::clone(&self.conn),
            })
        } else {
            None
        };
        Poll::Ready(Left {
            id: self.conn.id,
            lived: self.opened.elapsed(),
            carried: self.conn.carried.load(Ordering::Relaxed),
            how,
            rest,
        })
    }
}

impl Future for ConnectionTask {
    type Output = Left;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Left> {
        let this = self.get_mut();
        let Some(connection) = this.connection.as_mut() else {
            return this.leave(LeaveReason::Failed, false);
        };
        if let Some(pinger) = &mut this.pinger {
            // Until it is pending, so its timer is set to wake the task.
            loop {
                match pinger.poll(cx, this.conn.streams.load(Ordering::Relaxed)) {
                    Poll::Ready(PingOutcome::Window(size)) => {
                        connection.set_target_window_size(size);
                        if let Err(error) = connection.set_initial_window_size(size) {
                            debug!(error = %error, "could not grow the stream window");
                        }
                    }
                    Poll::Ready(PingOutcome::TimedOut) => {
                        debug!("keepalive ping unanswered; closing the connection");
                        return this.leave(LeaveReason::Silent, false);
                    }
                    Poll::Pending => break,
                }
            }
        }
        let ended = Pin::new(&mut *connection).poll(cx);
        // The server may change its limit at any time (a SETTINGS frame).
        this.conn
            .set_max_streams(connection.max_concurrent_send_streams().max(1));
        if let Poll::Ready(result) = ended {
            let how = match &result {
                Err(error) => {
                    debug!(error = %crate::error::Chain(error), "connection ended with an error");
                    how_it_ended(error)
                }
                Ok(()) => LeaveReason::Failed,
            };
            return this.leave(how, false);
        }
        // A GOAWAY (or a connection error) makes h2 refuse new streams: leave the set now,
        // and let the streams already open finish.
        if let Poll::Ready(Err(error)) = this.probe.poll_ready(cx) {
            return this.leave(how_it_ended(&error), true);
        }
        Poll::Pending
    }
}

/// What h2's error says of how the connection ended.
fn how_it_ended(error: &h2::Error) -> LeaveReason {
    if !(error.is_go_away() && error.is_remote()) {
        return LeaveReason::Failed;
    }
    match error.reason() {
        Some(h2::Reason::NO_ERROR) => LeaveReason::GoAway { graceful: true },
        // h2 shows the GOAWAY's debug data only in its message.
        Some(h2::Reason::ENHANCE_YOUR_CALM) if error.to_string().contains("too_many_pings") => {
            LeaveReason::TooManyPings
        }
        _ => LeaveReason::GoAway { graceful: false },
    }
}

/// A connection that takes no new streams, driven (with its keepalive) until its last
/// stream ends and h2 closes it (RFC 9113, 6.8), or until its peer stops answering pings.
pub(crate) struct DrainingTask {
    connection: H2Connection,
    pinger: Option<Pinger>,
    conn: Arc<OpenConnection>,
}

impl DrainingTask {
    pub(crate) async fn run(mut self) {
        let ended = std::future::poll_fn(|cx| {
            while let Some(pinger) = &mut self.pinger {
                match pinger.poll(cx, self.conn.streams.load(Ordering::Relaxed)) {
                    // The window no longer matters: no stream opens on it.
                    Poll::Ready(PingOutcome::Window(_)) => {}
                    Poll::Ready(PingOutcome::TimedOut) => {
                        debug!("keepalive ping unanswered while draining; closing the connection");
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => break,
                }
            }
            Pin::new(&mut self.connection).poll(cx)
        })
        .await;
        if let Err(error) = ended {
            debug!(error = %crate::error::Chain(&error), "draining connection ended with an error");
        }
    }
}
