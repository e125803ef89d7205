//! Leases of registered instances: granted at registration, kept alive by one task per
//! instance, granted again (with the key put again) if etcd forgets them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::sleep;
use tracing::{debug, info, warn};

use super::rpc::Etcd;
use super::rpc::proto::etcdserverpb::{LeaseKeepAliveRequest, PutRequest};
use super::{Inner, timed};
use crate::backoff::Backoff;
use crate::error::{Chain, Result};

/// An instance this process registered.
pub(super) struct Registered {
    key: String,
    /// The lease the key is on now (the task may replace it).
    lease: Arc<AtomicI64>,
    pub(super) task: JoinHandle<()>,
}

/// Grants a lease, puts the key on it, and starts keeping it alive.
pub(super) async fn register(inner: &Inner, key: String, value: Vec<u8>) -> Result<Registered> {
    let client = inner.client().await?;
    let ttl = ttl_seconds(inner.settings.lease_ttl);
    let mut keeper = Keeper {
        client,
        key: key.clone(),
        value,
        ttl,
        lease: Arc::new(AtomicI64::new(0)),
        backoff: Backoff::new(inner.settings.retry_base, inner.settings.retry_max),
        request_timeout: inner.settings.request_timeout,
    };
    let lease = Arc::clone(&keeper.lease);
    lease.store(keeper.grant_and_put().await?, Ordering::Release);
    Ok(Registered {
        key,
        lease,
        task: tokio::spawn(keeper.run()),
    })
}

impl Registered {
    /// Stops keeping the lease alive, deletes the key and revokes the lease.
    pub(super) async fn stop(self, inner: &Inner) -> Result<()> {
        self.task.abort();
        let client = inner.client().await?;
        inner.timed(client.delete(self.key.into_bytes())).await?;
        let lease = self.lease.load(Ordering::Acquire);
        if let Err(error) = inner.timed(client.revoke(lease)).await {
            // The key is gone; a lease left behind expires on its own.
            debug!(lease, error = %Chain(&error), "revoking the lease failed");
        }
        Ok(())
    }
}

/// etcd leases count whole seconds.
fn ttl_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX)
}

struct Keeper {
    client: Etcd,
    key: String,
    value: Vec<u8>,
    ttl: i64,
    lease: Arc<AtomicI64>,
    backoff: Backoff,
    request_timeout: Duration,
}

impl Keeper {
    /// Keeps the lease alive every third of its TTL until aborted. A broken stream is
    /// reopened with backoff; a lease etcd no longer knows is granted again and the key put
    /// on it again.
    async fn run(mut self) {
        let every = Duration::from_secs(u64::try_from(self.ttl).unwrap_or(1)) / 3;
        loop {
            match self.keep_alive(every).await {
                Lost::Lease => match self.grant_and_put().await {
                    Ok(lease) => {
                        // Keep the new lease alive after a short pause (not at once: a
                        // lease that keeps vanishing must not spin).
                        info!(key = %self.key, lease, "lease expired; registered again on a new lease");
                        self.lease.store(lease, Ordering::Release);
                    }
                    Err(error) => {
                        warn!(key = %self.key, error = %Chain(&error), "registering again failed");
                    }
                },
                Lost::Stream(error) => {
                    warn!(key = %self.key, error = %Chain(&error), "lease keep-alive failed; retrying");
                }
            }
            sleep(self.backoff.next_delay()).await;
        }
    }

    /// Runs one keep-alive stream until it fails.
    async fn keep_alive(&mut self, every: Duration) -> Lost {
        let id = self.lease.load(Ordering::Acquire);
        let (renew, renewals) = mpsc::channel(1);
        // The first renewal goes out with the stream: etcd answers (and so sends the
        // response headers the open waits for) only once it has a request.
        let _ = renew.try_send(LeaseKeepAliveRequest { id });
        let renewals = stream::unfold(renewals, |mut renewals| async move {
            renewals.recv().await.map(|renewal| (renewal, renewals))
        });
        let open = self.client.keep_alive(renewals);
        let mut answers = match timed(self.request_timeout, open).await {
            Ok(answers) => answers,
            Err(error) => return Lost::Stream(error),
        };
        loop {
            match timed(self.request_timeout, answers.message()).await {
                Ok(Some(answer)) if answer.ttl > 0 => self.backoff.reset(),
                Ok(Some(_)) => return Lost::Lease,
                Ok(None) => return Lost::Stream(closed()),
                Err(error) => return Lost::Stream(error),
            }
            sleep(every).await;
            if renew.send(LeaseKeepAliveRequest { id }).await.is_err() {
                return Lost::Stream(closed());
            }
        }
    }

    /// Grants a new lease and puts the key on it.
    async fn grant_and_put(&mut self) -> Result<i64> {
        let limit = self.request_timeout;
        let lease = timed(limit, self.client.grant(self.ttl)).await?;
        let put = self.client.put(PutRequest {
            key: self.key.clone().into_bytes(),
            value: self.value.clone(),
            lease,
            ..Default::default()
        });
        timed(limit, put).await?;
        Ok(lease)
    }
}

enum Lost {
    /// etcd answered with TTL 0: the lease (and so the key) is gone.
    Lease,
    /// The keep-alive stream failed; the lease may still be alive.
    Stream(crate::Error),
}

fn closed() -> crate::Error {
    crate::Error::Unreachable {
        registry: super::REGISTRY,
        source: "the keep-alive stream closed".into(),
    }
}
