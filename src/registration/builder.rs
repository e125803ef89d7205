//! [`RegistrationBuilder`]: how a [`Registration`](super::Registration) registers, keeps
//! its instance registered and leaves.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::backoff::Backoff;
use crate::instance::ServiceInstance;
use crate::registry::ServiceRegistry;

use super::keeper::Keeper;
use super::{Progress, Registration};

/// Configures a [`Registration`].
#[must_use]
pub struct RegistrationBuilder {
    pub(super) registry: Arc<dyn ServiceRegistry>,
    pub(super) instance: ServiceInstance,
    pub(super) heartbeat: Option<Duration>,
    pub(super) check_every: Duration,
    pub(super) drain_delay: Duration,
    pub(super) shutdown_timeout: Option<Duration>,
    pub(super) retry: (Duration, Duration),
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
            deregistered: false,
        }
    }
}
