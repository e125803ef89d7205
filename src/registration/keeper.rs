//! [`Keeper`]: the background task of a registration, which registers with retries, then
//! keeps the instance registered (heartbeats, or a periodic check that re-registers an
//! instance the registry forgot).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::error::{Chain, Error};
use crate::instance::{HealthStatus, ServiceInstance};
use crate::registry::ServiceRegistry;

use super::{Progress, Refusal};

/// The background task: registers with retries, then keeps the instance registered.
pub(super) struct Keeper {
    pub(super) registry: Arc<dyn ServiceRegistry>,
    pub(super) instance: ServiceInstance,
    pub(super) heartbeat: Option<Duration>,
    pub(super) check_every: Duration,
    pub(super) backoff: Backoff,
    pub(super) progress: watch::Sender<Progress>,
}

impl Keeper {
    pub(super) async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        tokio::select! {
            _ = &mut stop => {}
            () = self.keep() => {}
        }
    }

    pub(super) async fn keep(&mut self) {
        if !self.register().await {
            return;
        }
        loop {
            let wait = match self.heartbeat {
                Some(every) => self.beat(every).await,
                None => self.check().await,
            };
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return,
            }
        }
    }

    /// Registers, retrying with backoff; `false` when the registry refuses for good.
    pub(super) async fn register(&mut self) -> bool {
        let id = self.instance.id.clone();
        loop {
            match self.registry.register(self.instance.clone()).await {
                Ok(()) => {
                    self.backoff.reset();
                    info!(%id, registry = self.registry.kind(), "registered");
                    self.progress.send_replace(Progress::Registered);
                    return true;
                }
                Err(error) => {
                    if let Some(refusal) = Refusal::of(&error) {
                        warn!(%id, error = %Chain(&error), "registration refused; not retrying");
                        self.progress.send_replace(Progress::Refused(refusal));
                        return false;
                    }
                    let delay = self.backoff.next_delay();
                    warn!(%id, error = %Chain(&error), ?delay, attempt = self.backoff.failures(), "registration failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One heartbeat; the wait before the next, or `None` to stop heartbeating.
    pub(super) async fn beat(&mut self, every: Duration) -> Option<Duration> {
        let id = self.instance.id.clone();
        match self.registry.heartbeat(&id).await {
            Ok(()) => {
                self.backoff.reset();
                Some(every)
            }
            Err(error) if forgotten(&error) => {
                warn!(%id, "the registry forgot the instance; registering again");
                self.register().await.then_some(Duration::ZERO)
            }
            Err(error @ Error::Unsupported { .. }) => {
                warn!(%id, error = %Chain(&error), "the registry has no heartbeats; not sending them");
                self.heartbeat = None;
                Some(self.check_every)
            }
            Err(error) => {
                let delay = self.backoff.next_delay().min(every);
                warn!(%id, error = %Chain(&error), ?delay, "heartbeat failed; retrying");
                Some(delay)
            }
        }
    }

    /// Without heartbeats: whether the registry still has the instance; registers it
    /// again when not. The wait before the next check, or `None` to stop checking.
    pub(super) async fn check(&mut self) -> Option<Duration> {
        let id = self.instance.id.clone();
        match self.registry.health(&id).await {
            Ok(HealthStatus::Unknown) => {
                warn!(%id, "the registry no longer has the instance; registering again");
                self.register().await.then_some(self.check_every)
            }
            Ok(_) => Some(self.check_every),
            Err(Error::Unsupported { .. }) => None,
            Err(error) => {
                warn!(%id, error = %Chain(&error), "checking the registration failed");
                Some(self.check_every)
            }
        }
    }
}

/// Whether an error says the registry does not know the instance any more.
fn forgotten(error: &Error) -> bool {
    matches!(
        error,
        Error::UnknownInstance { .. } | Error::Status { status: 404, .. }
    )
}
