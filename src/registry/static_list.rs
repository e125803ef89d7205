//! [`StaticRegistry`]: a fixed list of instances given in code.

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, stream};

use super::{ServiceRegistry, WatchStream, validate_all};
use crate::error::{Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};

/// A registry over a fixed list of instances, all considered passing.
///
/// Useful for local development, tests, and as the last link of a fallback chain. Its watch
/// yields the matching set once and then stays open without further items (the set never
/// changes). [`register`](ServiceRegistry::register) and
/// [`deregister`](ServiceRegistry::deregister) return [`Error::Unsupported`].
///
/// # Examples
///
/// ```
/// use tower_sd::{ServiceInstance, ServiceRegistry, StaticRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_sd::Error> {
/// let registry = StaticRegistry::builder()
///     .instance(ServiceInstance::new("a", "greeter", "127.0.0.1", 50051))
///     .instance(ServiceInstance::new("b", "greeter", "127.0.0.1", 50052))
///     .build()?;
/// assert_eq!(registry.discover(&"greeter".into()).await?.len(), 2);
/// assert!(registry.deregister("a").await.is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StaticRegistry {
    instances: std::sync::Arc<[ServiceInstance]>,
}

/// Builds a [`StaticRegistry`] from its instances.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct StaticRegistryBuilder {
    instances: Vec<ServiceInstance>,
}

impl StaticRegistryBuilder {
    /// One more instance.
    pub fn instance(mut self, instance: ServiceInstance) -> Self {
        self.instances.push(instance);
        self
    }

    /// These instances too.
    pub fn instances(mut self, instances: impl IntoIterator<Item = ServiceInstance>) -> Self {
        self.instances.extend(instances);
        self
    }

    /// A registry serving exactly the instances given.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInstance`] when an instance does not validate or an id repeats.
    pub fn build(self) -> Result<StaticRegistry> {
        validate_all(&self.instances)?;
        let mut instances = self.instances;
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(StaticRegistry {
            instances: instances.into(),
        })
    }
}

impl StaticRegistry {
    /// A builder with no instances yet.
    pub fn builder() -> StaticRegistryBuilder {
        StaticRegistryBuilder::default()
    }

    fn matching(&self, query: &ServiceQuery) -> Vec<ServiceInstance> {
        // A static list has no datacenters or namespaces: a query naming one still matches,
        // since the list is whatever the user declared for this deployment.
        self.instances
            .iter()
            .filter(|instance| query.matches(instance))
            .cloned()
            .collect()
    }

    fn read_only(operation: &'static str) -> Error {
        Error::unsupported(
            "static",
            operation,
            "a static registry is a fixed list given in code; use MemoryRegistry to register at run time",
        )
    }
}

impl ServiceRegistry for StaticRegistry {
    fn kind(&self) -> &'static str {
        "static"
    }

    fn register(&self, _instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        async { Err(Self::read_only("register")) }.boxed()
    }

    fn deregister<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<()>> {
        async { Err(Self::read_only("deregister")) }.boxed()
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        let set = self.matching(query);
        async move { Ok(set) }.boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        stream::once(std::future::ready(Ok(self.matching(query))))
            .chain(stream::pending())
            .boxed()
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        let known = self.instances.iter().any(|instance| instance.id == id);
        let status = if known {
            HealthStatus::Passing
        } else {
            HealthStatus::Unknown
        };
        async move { Ok(status) }.boxed()
    }
}
