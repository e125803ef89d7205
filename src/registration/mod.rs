//! [`Registration`]: the server side. Register this process's instance, keep its TTL check
//! alive, and leave gracefully.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower_sd::registration::Registration;
//! use tower_sd::{MemoryRegistry, ServiceInstance, ServiceRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_sd::Error> {
//! let registry: Arc<dyn ServiceRegistry> = Arc::new(MemoryRegistry::new());
//! let instance = ServiceInstance::new("greeter-1", "greeter", "10.0.0.7", 50051);
//! let registration = Registration::builder(registry, instance)
//!     .heartbeat(Duration::from_secs(5))      // for TTL checks
//!     .drain_delay(Duration::from_secs(10))   // time for clients to see the change
//!     .build();
//! registration.registered(Duration::from_secs(30)).await?;
//! // ... serve; on SIGTERM:
//! registration.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Shutdown drains: the instance's health endpoint (see [`Registration::health`]) starts
//! answering 503 and, where the registry has a maintenance mode (Consul), the instance is put
//! in it, so it leaves discovery while it still serves; after the drain delay, during which
//! clients' balancers stop picking it and finish their requests, it is deregistered. Where
//! the registry has no maintenance mode (etcd), it is deregistered first, then the drain
//! delay passes before `shutdown` returns, so clients stop routing before the server stops.
//! The whole shutdown has a deadline, within which a failed deregistration is retried.
//!
//! While registered, the instance is kept registered: a heartbeat the registry answers with
//! "unknown" (404, [`Error::UnknownInstance`]: the agent restarted and forgot it) registers
//! it again, and without heartbeats its presence is checked periodically (see
//! [`RegistrationBuilder::check_every`]).
//!
//! Dropping a `Registration` without [`shutdown`](Registration::shutdown) stops its
//! heartbeats and deregisters it in the background, best effort and without a drain (with
//! etcd this also ends its lease); call `shutdown` for a graceful exit. The same happens
//! when `shutdown` is cancelled (its future dropped) or its deadline passes before the
//! instance is deregistered: a background task on the current runtime keeps trying, with
//! backoff, for at most the shutdown timeout more, and logs the outcome. What remains is
//! bounded by that timeout, and by the runtime living that long (none outside a runtime).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::error::{Chain, Elapsed, Error, Result};
use crate::instance::ServiceInstance;
use crate::registry::{IntoRegistry, ServiceRegistry};

mod builder;
mod keeper;
mod probe;

pub use builder::RegistrationBuilder;
pub use probe::HealthProbe;

/// How registering goes, as the background task tells it.
#[derive(Clone, Debug)]
pub(crate) enum Progress {
    Registering,
    Registered,
    /// The registry refused for good (an invalid instance, a registry that cannot
    /// register): not retried.
    Refused(Refusal),
}

/// A refusal, kept in a form that can be handed to every waiter.
#[derive(Clone, Debug)]
pub(crate) enum Refusal {
    Invalid(&'static str, crate::error::InvalidValue),
    Unsupported {
        registry: &'static str,
        operation: &'static str,
        reason: String,
    },
}

impl Refusal {
    /// The refusal an error is, if it is one.
    fn of(error: &Error) -> Option<Self> {
        match error {
            Error::InvalidInstance { field, source } => Some(Self::Invalid(field, source.clone())),
            Error::Unsupported {
                registry,
                operation,
                source,
            } => Some(Self::Unsupported {
                registry,
                operation,
                reason: source.to_string(),
            }),
            _ => None,
        }
    }

    fn error(&self) -> Error {
        match self {
            Self::Invalid(field, value) => Error::InvalidInstance {
                field,
                source: value.clone(),
            },
            Self::Unsupported {
                registry,
                operation,
                reason,
            } => Error::unsupported(registry, operation, reason.clone()),
        }
    }
}

/// A registered instance of this process; see the [module docs](self).
pub struct Registration {
    registry: Arc<dyn ServiceRegistry>,
    instance: ServiceInstance,
    drain_delay: Duration,
    shutdown_timeout: Duration,
    retry: (Duration, Duration),
    draining: Arc<AtomicBool>,
    registered: watch::Receiver<Progress>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The registry answered a deregistration: nothing is left to do on drop.
    deregistered: bool,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("instance", &self.instance.id)
            .field("progress", &*self.registered.borrow())
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// A builder registering `instance` with `registry`.
    pub fn builder(registry: impl IntoRegistry, instance: ServiceInstance) -> RegistrationBuilder {
        RegistrationBuilder {
            registry: registry.into_registry(),
            instance,
            heartbeat: None,
            check_every: Duration::from_secs(30),
            drain_delay: Duration::from_secs(5),
            shutdown_timeout: None,
            retry: (Duration::from_millis(100), Duration::from_secs(30)),
        }
    }

    /// Waits until the registry has accepted the registration, for at most `limit`.
    ///
    /// # Errors
    ///
    /// The registry's refusal when it refuses for good ([`Error::InvalidInstance`],
    /// [`Error::Unsupported`]), at once; [`Error::Timeout`] when `limit` passes first.
    pub async fn registered(&self, limit: Duration) -> Result<()> {
        let mut registered = self.registered.clone();
        let kind = self.registry.kind();
        let settled = tokio::time::timeout(
            limit,
            registered.wait_for(|p| !matches!(p, Progress::Registering)),
        )
        .await;
        match settled {
            Ok(Ok(progress)) => match &*progress {
                Progress::Refused(refusal) => Err(refusal.error()),
                _ => Ok(()),
            },
            _ => Err(Error::Timeout {
                registry: kind,
                source: Elapsed(limit),
            }),
        }
    }

    /// The instance's health as its HTTP check should report it: `true` while serving,
    /// `false` once draining started.
    pub fn health(&self) -> HealthProbe {
        HealthProbe {
            draining: Arc::clone(&self.draining),
        }
    }

    /// Drains and deregisters (see the [module docs](self)), within the shutdown timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when the deadline passes first; the registry's last error when
    /// deregistering fails for good (it is retried with backoff until the deadline).
    pub async fn shutdown(mut self) -> Result<()> {
        let kind = self.registry.kind();
        let limit = self.shutdown_timeout;
        match tokio::time::timeout(limit, self.drain()).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                registry: kind,
                source: Elapsed(limit),
            }),
        }
    }

    async fn drain(&mut self) -> Result<()> {
        self.draining.store(true, Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let id = self.instance.id.clone();
        let maintenance = self
            .registry
            .set_maintenance(&id, true, "shutting down")
            .await;
        match maintenance {
            Ok(()) => {
                info!(%id, delay = ?self.drain_delay, "in maintenance; draining before deregistering");
                tokio::time::sleep(self.drain_delay).await;
                self.deregister().await
            }
            Err(Error::Unsupported { .. }) => {
                // No maintenance mode: leave discovery now, and give clients the drain delay
                // to notice before the server stops.
                self.deregister().await?;
                info!(%id, delay = ?self.drain_delay, "deregistered; draining");
                tokio::time::sleep(self.drain_delay).await;
                Ok(())
            }
            Err(error) => {
                warn!(%id, error = %Chain(&error), "could not enter maintenance; draining anyway");
                tokio::time::sleep(self.drain_delay).await;
                self.deregister().await
            }
        }
    }

    /// Deregisters (see [`leave`]); the shutdown's deadline bounds it.
    async fn deregister(&mut self) -> Result<()> {
        leave(&*self.registry, &self.instance.id, self.retry).await?;
        self.deregistered = true;
        Ok(())
    }
}

/// Deregisters `id`, retrying transient failures with backoff, until the registry answers
/// (the caller bounds it).
async fn leave(
    registry: &dyn ServiceRegistry,
    id: &str,
    retry: (Duration, Duration),
) -> Result<()> {
    let mut backoff = Backoff::new(retry.0, retry.1);
    loop {
        match registry.deregister(id).await {
            Ok(()) => {
                info!(%id, "deregistered");
                return Ok(());
            }
            Err(error) if error.is_transient() => {
                let delay = backoff.next_delay();
                warn!(%id, error = %Chain(&error), ?delay, "deregistering failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(error),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Nothing to leave: deregistered already, or refused for good at registration.
        if self.deregistered || matches!(*self.registered.borrow(), Progress::Refused(_)) {
            return;
        }
        // Dropped without a shutdown, or with one cancelled or out of time: leave the
        // registry in the background, for at most the shutdown timeout.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (registry, retry) = (Arc::clone(&self.registry), self.retry);
        let id = self.instance.id.clone();
        let limit = self.shutdown_timeout;
        warn!(%id, "registration dropped before it was deregistered; deregistering in the background");
        runtime.spawn(async move {
            match tokio::time::timeout(limit, leave(&*registry, &id, retry)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    warn!(%id, error = %Chain(&error), "background deregistration failed")
                }
                Err(_) => warn!(%id, "background deregistration timed out"),
            }
        });
    }
}
