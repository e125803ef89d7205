//! A memory registry that fails on demand, for resilience and retry tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures_core::future::BoxFuture;
use futures_util::StreamExt;
use tower_sd::registry::WatchStream;
use tower_sd::{
    Error, HealthStatus, MemoryRegistry, ServiceInstance, ServiceQuery, ServiceRegistry,
};

/// While `down`, reads (discover, watch) fail as unreachable; the first `register_failures`
/// registrations fail too. Everything else goes to the memory registry.
#[derive(Debug, Default)]
pub struct Unreliable {
    pub inner: MemoryRegistry,
    pub down: AtomicBool,
    pub register_failures: AtomicUsize,
    pub register_attempts: AtomicUsize,
    /// Registrations answer `Unsupported`, as a read-only registry's do.
    pub read_only: AtomicBool,
    /// There is no maintenance mode (as with etcd).
    pub no_maintenance: AtomicBool,
    /// The first this many deregistrations fail as unreachable.
    pub deregister_failures: AtomicUsize,
    pub deregister_attempts: AtomicUsize,
    /// When each registration was attempted (tokio time).
    pub register_times: Mutex<Vec<tokio::time::Instant>>,
}

impl Unreliable {
    fn unreachable() -> Error {
        Error::Unreachable {
            registry: "unreliable",
            source: "switched off".into(),
        }
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
}

impl ServiceRegistry for Unreliable {
    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, tower_sd::Result<()>> {
        self.register_attempts.fetch_add(1, Ordering::SeqCst);
        self.register_times
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        let fail = self
            .register_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err(Self::unreachable()) });
        }
        if self.read_only.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(Error::unsupported("unreliable", "register", "read only"))
            });
        }
        self.inner.register(instance)
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, tower_sd::Result<()>> {
        self.deregister_attempts.fetch_add(1, Ordering::SeqCst);
        let fail = self
            .deregister_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err(Self::unreachable()) });
        }
        self.inner.deregister(id)
    }

    fn discover<'a>(
        &'a self,
        q: &'a ServiceQuery,
    ) -> BoxFuture<'a, tower_sd::Result<Vec<ServiceInstance>>> {
        if self.is_down() {
            return Box::pin(async { Err(Self::unreachable()) });
        }
        self.inner.discover(q)
    }

    /// A watch started while down yields one error and then waits.
    fn watch(&self, q: &ServiceQuery) -> WatchStream {
        if self.is_down() {
            return futures_util::stream::iter([Err(Self::unreachable())])
                .chain(futures_util::stream::pending())
                .boxed();
        }
        self.inner.watch(q)
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, tower_sd::Result<HealthStatus>> {
        self.inner.health(id)
    }

    fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, tower_sd::Result<()>> {
        self.inner.heartbeat(id)
    }

    fn set_maintenance<'a>(
        &'a self,
        id: &'a str,
        on: bool,
        why: &'a str,
    ) -> BoxFuture<'a, tower_sd::Result<()>> {
        if self.no_maintenance.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(Error::unsupported("unreliable", "set_maintenance", "none"))
            });
        }
        self.inner.set_maintenance(id, on, why)
    }
}
