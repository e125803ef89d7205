//! The accept loop of [`ConsulConnect::incoming`](super::ConsulConnect::incoming), with a
//! budget for handshakes in progress and one for refused connections (see
//! [`Incoming`](super::Incoming)).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::ConsulConnect;
use super::server::{self, Authorization};

/// Handshakes in progress at most; a new connection past that replaces the oldest.
pub(super) const MAX_HANDSHAKES: usize = 256;
/// Refused connections answered at once at most; past that, closed without an answer.
pub(super) const MAX_REFUSALS: usize = 64;

/// A connection whose handshake (or authorization) is in progress.
struct Pending {
    task: AbortHandle,
    /// Set when its handshake and authorization are over.
    done: Arc<AtomicBool>,
}

/// Accepts until the receiver of `sender` is dropped.
pub(super) async fn accept_loop(
    connect: ConsulConnect,
    listener: TcpListener,
    sender: mpsc::Sender<std::io::Result<TlsStream<TcpStream>>>,
) {
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut pending = VecDeque::with_capacity(MAX_HANDSHAKES);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = sender.closed() => return,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of file descriptors and the like: do not spin.
                warn!(%error, "Consul Connect: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        make_room(&mut pending);
        let done = Arc::new(AtomicBool::new(false));
        let (connect, sender) = (connect.clone(), sender.clone());
        let (refusals, finished) = (Arc::clone(&refusals), Arc::clone(&done));
        let task = connections.spawn(async move {
            let accepted = connect.accept(tcp).await;
            finished.store(true, Ordering::Relaxed);
            match accepted {
                Ok(accepted) if accepted.authorization == Authorization::Allowed => {
                    debug!(client = %accepted.client, "Consul Connect: connection authorized");
                    let _ = sender.send(Ok(accepted.stream)).await;
                }
                Ok(accepted) => {
                    info!(client = %accepted.client, authorization = ?accepted.authorization, "Consul Connect: connection not authorized");
                    // Dropping the stream closes it: no answer past the budget.
                    if let Ok(_permit) = refusals.try_acquire_owned() {
                        server::refuse(accepted.stream, accepted.authorization).await;
                    }
                }
                Err(error) => debug!(error = %crate::error::Chain(&error), "Consul Connect: handshake failed"),
            }
        });
        pending.push_back(Pending { task, done });
    }
}

/// Forgets the handshakes that are over and, when [`MAX_HANDSHAKES`] are still in
/// progress, closes the oldest.
fn make_room(pending: &mut VecDeque<Pending>) {
    pending.retain(|p| !p.done.load(Ordering::Relaxed) && !p.task.is_finished());
    if pending.len() >= MAX_HANDSHAKES
        && let Some(oldest) = pending.pop_front()
    {
        debug!("Consul Connect: {MAX_HANDSHAKES} handshakes in progress; closing the oldest");
        oldest.task.abort();
    }
}
