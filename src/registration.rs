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
//! etcd this also ends its lease); call `shutdown` for a graceful exit.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::error::{Chain, Elapsed, Error, Result};
use crate::instance::{HealthStatus, ServiceInstance};
use crate::registry::{IntoRegistry, ServiceRegistry};

/// Configures a [`Registration`].
#[must_use]
pub struct RegistrationBuilder {
    registry: Arc<dyn ServiceRegistry>,
    instance: ServiceInstance,
    heartbeat: Option<Duration>,
    check_every: Duration,
    drain_delay: Duration,
    shutdown_timeout: Option<Duration>,
    retry: (Duration, Duration),
}

impl fmt::Debug for RegistrationBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationBuilder")
            .field("instance", &self.instance.id)
            .field("heartbeat", &self.heartbeat)
            .field("drain_delay", &self.drain_delay)
            .finish_non_exhaustive()
    }
}

impl RegistrationBuilder {
    /// Renew the instance's TTL check this often (use about a third of the TTL). Off by
    /// default: HTTP, TCP and gRPC checks need no heartbeat.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = Some(every);
        self
    }

    /// Without heartbeats, check this often that the registry still has the instance, and
    /// register it again if not (default 30 s).
    pub fn check_every(mut self, every: Duration) -> Self {
        self.check_every = every;
        self
    }

    /// How long to stay registered, in maintenance, before deregistering (default 5 s).
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// The most `shutdown` may take, drain included (default: the drain delay plus 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = Some(timeout);
        self
    }

    /// Backoff bounds for retrying registration, heartbeats and deregistration (default
    /// 100 ms to 30 s).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry = (base, max);
        self
    }

    /// The registration, registering in the background at once (retrying with backoff,
    /// logging each failure), then keeping the instance registered.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn build(self) -> Registration {
        let draining = Arc::new(AtomicBool::new(false));
        let (progress, registered) = watch::channel(Progress::Registering);
        let (stop, stopped) = oneshot::channel();
        let keeper = Keeper {
            registry: Arc::clone(&self.registry),
            instance: self.instance.clone(),
            heartbeat: self.heartbeat,
            check_every: self.check_every,
            backoff: Backoff::new(self.retry.0, self.retry.1),
            progress,
        };
        let task = tokio::spawn(keeper.run(stopped));
        Registration {
            registry: self.registry,
            instance: self.instance,
            drain_delay: self.drain_delay,
            shutdown_timeout: self
                .shutdown_timeout
                .unwrap_or(self.drain_delay.saturating_add(Duration::from_secs(10))),
            retry: self.retry,
            draining,
            registered,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

/// How registering goes, as the background task tells it.
#[derive(Clone, Debug)]
enum Progress {
    Registering,
    Registered,
    /// The registry refused for good (an invalid instance, a registry that cannot
    /// register): not retried.
    Refused(Refusal),
}

/// A refusal, kept in a form that can be handed to every waiter.
#[derive(Clone, Debug)]
enum Refusal {
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

    /// Deregisters, retrying transient failures with backoff (the shutdown's deadline
    /// bounds it).
    async fn deregister(&self) -> Result<()> {
        let id = &self.instance.id;
        let mut backoff = Backoff::new(self.retry.0, self.retry.1);
        loop {
            match self.registry.deregister(id).await {
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
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        task.abort();
        // Dropped without a shutdown: leave the registry in the background, best effort.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let registry = Arc::clone(&self.registry);
        let id = self.instance.id.clone();
        let limit = self.shutdown_timeout;
        warn!(%id, "registration dropped without shutdown; deregistering in the background");
        runtime.spawn(async move {
            match tokio::time::timeout(limit, registry.deregister(&id)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    warn!(%id, error = %Chain(&error), "background deregistration failed")
                }
                Err(_) => warn!(%id, "background deregistration timed out"),
            }
        });
    }
}

/// The background task: registers with retries, then keeps the instance registered.
struct Keeper {
    registry: Arc<dyn ServiceRegistry>,
    instance: ServiceInstance,
    heartbeat: Option<Duration>,
    check_every: Duration,
    backoff: Backoff,
    progress: watch::Sender<Progress>,
}

impl Keeper {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        tokio::select! {
            _ = &mut stop => {}
            () = self.keep() => {}
        }
    }

    async fn keep(&mut self) {
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
    async fn register(&mut self) -> bool {
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
    async fn beat(&mut self, every: Duration) -> Option<Duration> {
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
    async fn check(&mut self) -> Option<Duration> {
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

/// Whether the instance is serving; cheap to clone into a health handler.
#[derive(Clone, Debug)]
pub struct HealthProbe {
    draining: Arc<AtomicBool>,
}

impl HealthProbe {
    /// `false` once shutdown started.
    pub fn is_serving(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }
}

#[cfg(feature = "http")]
mod health_service {
    use std::convert::Infallible;
    use std::future::{Ready, ready};
    use std::task::{Context, Poll};

    use super::HealthProbe;

    /// A health endpoint: `200 ok` while serving, `503 draining` once shutdown started, so
    /// an HTTP check sees the drain before the instance leaves the registry. Mount it as a
    /// route, e.g. `Router::new().route_service("/healthz", registration.health())` in axum.
    impl<B> tower::Service<http::Request<B>> for HealthProbe {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<B>) -> Self::Future {
            let (status, body) = if self.is_serving() {
                (http::StatusCode::OK, "ok")
            } else {
                (http::StatusCode::SERVICE_UNAVAILABLE, "draining")
            };
            let mut response = http::Response::new(body.to_owned());
            *response.status_mut() = status;
            ready(Ok(response))
        }
    }
}
