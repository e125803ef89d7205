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
//!     .start();
//! registration.registered(Duration::from_secs(30)).await?;
//! // ... serve; on SIGTERM:
//! registration.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Shutdown drains in three steps: the instance's health endpoint (see
//! [`Registration::health`]) starts answering 503 and the registry puts it in maintenance,
//! so it leaves discovery while it still serves; after the drain delay, during which clients'
//! balancers stop picking it and finish their requests, it is deregistered.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::error::{Elapsed, Error, Result};
use crate::instance::ServiceInstance;
use crate::registry::ServiceRegistry;

/// Configures a [`Registration`].
#[must_use]
pub struct RegistrationBuilder {
    registry: Arc<dyn ServiceRegistry>,
    instance: ServiceInstance,
    heartbeat: Option<Duration>,
    drain_delay: Duration,
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

    /// How long to stay registered, in maintenance, before deregistering (default 5 s).
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Backoff bounds for retrying registration and heartbeats (default 100 ms to 30 s).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry = (base, max);
        self
    }

    /// Starts registering in the background (retrying with backoff, logging each failure),
    /// then heartbeating if configured.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn start(self) -> Registration {
        let draining = Arc::new(AtomicBool::new(false));
        let (registered_tx, registered) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep_registered(
            Arc::clone(&self.registry),
            self.instance.clone(),
            self.heartbeat,
            Backoff::new(self.retry.0, self.retry.1),
            registered_tx,
            stopped,
        ));
        Registration {
            registry: self.registry,
            instance: self.instance,
            drain_delay: self.drain_delay,
            draining,
            registered,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

/// A registered instance of this process; see the [module docs](self).
pub struct Registration {
    registry: Arc<dyn ServiceRegistry>,
    instance: ServiceInstance,
    drain_delay: Duration,
    draining: Arc<AtomicBool>,
    registered: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("instance", &self.instance.id)
            .field("registered", &*self.registered.borrow())
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// A builder registering `instance` with `registry`.
    pub fn builder(
        registry: Arc<dyn ServiceRegistry>,
        instance: ServiceInstance,
    ) -> RegistrationBuilder {
        RegistrationBuilder {
            registry,
            instance,
            heartbeat: None,
            drain_delay: Duration::from_secs(5),
            retry: (Duration::from_millis(100), Duration::from_secs(30)),
        }
    }

    /// Waits until the registry has accepted the registration, for at most `limit`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when `limit` passes first.
    pub async fn registered(&self, limit: Duration) -> Result<()> {
        let mut registered = self.registered.clone();
        let kind = self.registry.kind();
        tokio::time::timeout(limit, registered.wait_for(|done| *done))
            .await
            .ok()
            .and_then(Result::ok)
            .map(drop)
            .ok_or(Error::Timeout {
                registry: kind,
                source: Elapsed(limit),
            })
    }

    /// The instance's health as its HTTP check should report it: `true` while serving,
    /// `false` once draining started.
    pub fn health(&self) -> HealthProbe {
        HealthProbe {
            draining: Arc::clone(&self.draining),
        }
    }

    /// Drains and deregisters: health turns 503 and the instance goes into maintenance
    /// (skipped for registries without it), then after the drain delay it is deregistered
    /// and the background task stops.
    ///
    /// # Errors
    ///
    /// The registry's error from deregistering (maintenance errors are logged only).
    pub async fn shutdown(mut self) -> Result<()> {
        self.draining.store(true, Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let id = self.instance.id.clone();
        match self
            .registry
            .set_maintenance(&id, true, "shutting down")
            .await
        {
            Ok(()) | Err(Error::Unsupported { .. }) => {}
            Err(error) => warn!(%id, %error, "could not enter maintenance; draining anyway"),
        }
        info!(%id, delay = ?self.drain_delay, "draining before deregistering");
        tokio::time::sleep(self.drain_delay).await;
        self.registry.deregister(&id).await?;
        info!(%id, "deregistered");
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Registers with retries, then heartbeats until stopped.
async fn keep_registered(
    registry: Arc<dyn ServiceRegistry>,
    instance: ServiceInstance,
    heartbeat: Option<Duration>,
    mut backoff: Backoff,
    registered: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let id = instance.id.clone();
    loop {
        match registry.register(instance.clone()).await {
            Ok(()) => break,
            Err(error @ Error::InvalidInstance { .. }) => {
                warn!(%id, %error, "registration rejected; not retrying");
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(%id, %error, ?delay, attempt = backoff.failures(), "registration failed; retrying");
                tokio::select! {
                    _ = &mut stop => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    backoff.reset();
    info!(%id, registry = registry.kind(), "registered");
    let Some(every) = heartbeat else {
        let _ = registered.send(true);
        return;
    };
    loop {
        let wait = match registry.heartbeat(&id).await {
            Ok(()) => {
                backoff.reset();
                let _ = registered.send(true);
                every
            }
            Err(error) => {
                let delay = backoff.next_delay().min(every);
                warn!(%id, %error, ?delay, "heartbeat failed; retrying");
                delay
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
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
