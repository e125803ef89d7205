//! [`EtcdRegistry`]: instances as JSON under `{prefix}/{service}/{id}`, attached to a lease
//! the registering process keeps alive, read with prefix gets and watches.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_sd::registry::etcd::EtcdRegistry;
//! use tower_sd::{ServiceInstance, ServiceQuery, ServiceRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_sd::Error> {
//! let etcd = EtcdRegistry::builder(["http://127.0.0.1:2379"])
//!     .prefix("/services")
//!     .lease_ttl(Duration::from_secs(10))
//!     .build()?;
//! etcd.register(ServiceInstance::new("greeter-1", "greeter", "10.0.0.7", 50051)).await?;
//! let found = etcd.discover(&ServiceQuery::new("greeter")).await?;
//! # drop(found);
//! # Ok(())
//! # }
//! ```

mod lease;
mod rpc;
mod watch;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::OnceCell;
use tracing::warn;

use super::{Secret, ServiceRegistry, WatchStream};
use crate::error::{Chain, Elapsed, Error, InvalidValue, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};
use rpc::proto::etcdserverpb::RangeRequest;
use rpc::proto::mvccpb::KeyValue;
use rpc::{Etcd, prefix_end};

const REGISTRY: &str = "etcd";

/// A [`ServiceRegistry`] over etcd's v3 API.
///
/// - `register` grants a lease of [`lease_ttl`](EtcdBuilder::lease_ttl), puts the instance as
///   JSON at `{prefix}/{service}/{id}` on it, and keeps the lease alive from a background task
///   (every third of the TTL). If the process dies, the lease expires and the key goes with
///   it. If the lease is lost anyway (etcd restored from a backup, a long partition), the task
///   grants a new one and puts the key again. Registering an id again replaces it.
/// - `deregister` stops the task, deletes the key and revokes the lease.
/// - `discover` is a prefix get on `{prefix}/{service}/`; `watch` starts from the revision
///   of its initial get and applies PUT and DELETE events. If the stream breaks it resumes
///   from the last revision it saw; if that revision was compacted it gets the prefix again
///   and goes on from there, emitting only whole sets. Errors are yielded, with backoff.
/// - `health` is `Passing` while the key exists and its lease is alive, `Critical` when the
///   key's lease has expired, `Unknown` when there is no key.
/// - Keys whose value is not an instance are skipped with a warning.
///
/// Dropping the last clone stops the keep-alive tasks without revoking their leases: the
/// keys disappear after the TTL, as they would if the process died. Deregister for a prompt
/// goodbye. The password never appears in `Debug` output, logs or errors.
#[derive(Clone)]
pub struct EtcdRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    client: OnceCell<Etcd>,
    config: EtcdBuilder,
    /// Instances this process registered: id -> their lease and keep-alive task.
    leases: Mutex<HashMap<String, lease::Registered>>,
}

/// Configures an [`EtcdRegistry`]; see [`EtcdRegistry::builder`].
#[derive(Clone)]
#[must_use]
pub struct EtcdBuilder {
    endpoints: Vec<String>,
    prefix: String,
    lease_ttl: Duration,
    username: Option<String>,
    password: Option<Secret>,
    ca_file: Option<PathBuf>,
    request_timeout: Duration,
    connect_timeout: Duration,
    retry_base: Duration,
    retry_max: Duration,
}

// ===== impl EtcdBuilder =====

impl EtcdBuilder {
    /// The key prefix (default `/services`); keys are `{prefix}/{service}/{id}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The lease TTL of registered instances (default 10 s; whole seconds, at least 1).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Authenticates as this user.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self.password = Some(Secret(password.into()));
        self
    }

    /// Trusts this CA (PEM file) for `https://` endpoints, instead of nothing: with TLS
    /// endpoints a CA is required.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The limit on each request other than watches (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The limit on connecting (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Backoff between watch and keep-alive retries: full jitter from `base`, doubling up
    /// to `max` (default 100 ms to 10 s).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max = max;
        self
    }

    /// Builds the registry. It connects on first use, so building needs no runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for no endpoint, an endpoint that is not an `http://` or
    /// `https://` URL, `https://` without a CA file, a prefix without a leading `/` or a
    /// lease TTL under a second.
    pub fn build(mut self) -> Result<EtcdRegistry> {
        let invalid = |key: &str, why: String| Error::InvalidConfig {
            key: format!("registry.etcd.{key}"),
            source: why.into(),
        };
        if self.endpoints.is_empty() {
            return Err(invalid(
                "endpoints",
                "at least one endpoint is needed".into(),
            ));
        }
        for endpoint in &self.endpoints {
            let tls = endpoint.starts_with("https://");
            if !tls && !endpoint.starts_with("http://") {
                return Err(invalid(
                    "endpoints",
                    format!("`{endpoint}` is not an http:// or https:// URL"),
                ));
            }
            if let Err(error) = tonic::transport::Endpoint::from_shared(endpoint.clone()) {
                return Err(invalid(
                    "endpoints",
                    format!("`{endpoint}` is not a valid URL: {error}"),
                ));
            }
            if tls && self.ca_file.is_none() {
                return Err(invalid(
                    "endpoints",
                    format!("`{endpoint}` uses TLS: set a CA file to trust"),
                ));
            }
        }
        let trimmed = self.prefix.trim_end_matches('/');
        if !self.prefix.starts_with('/') || trimmed.is_empty() {
            return Err(invalid(
                "prefix",
                format!("`{}` must start with `/` and name a directory", self.prefix),
            ));
        }
        self.prefix = trimmed.to_owned();
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(invalid("lease_ttl", "must be at least 1s".into()));
        }
        Ok(EtcdRegistry {
            inner: Arc::new(Inner {
                client: OnceCell::new(),
                config: self,
                leases: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl fmt::Debug for EtcdBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBuilder")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

// ===== impl EtcdRegistry =====

impl EtcdRegistry {
    /// A builder for these endpoints (`http://host:port` or `https://host:port`).
    pub fn builder<E: Into<String>>(endpoints: impl IntoIterator<Item = E>) -> EtcdBuilder {
        EtcdBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/services".into(),
            lease_ttl: Duration::from_secs(10),
            username: None,
            password: None,
            ca_file: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

impl Inner {
    async fn client(&self) -> Result<Etcd> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let config = &self.config;
                let ca = match &config.ca_file {
                    Some(ca_file) => {
                        Some(std::fs::read(ca_file).map_err(|e| Error::InvalidConfig {
                            key: "registry.etcd.ca_file".into(),
                            source: e.into(),
                        })?)
                    }
                    None => None,
                };
                let credentials = config.username.clone().zip(config.password.clone());
                let authenticate = credentials.is_some();
                let etcd = Etcd::connect(rpc::Connect {
                    endpoints: &config.endpoints,
                    connect_timeout: config.connect_timeout,
                    ca,
                    credentials,
                })
                .map_err(|e| Error::InvalidConfig {
                    key: "registry.etcd.endpoints".into(),
                    source: e.into(),
                })?;
                if authenticate {
                    self.timed(etcd.authenticate()).await?;
                }
                Ok::<_, Error>(etcd)
            })
            .await?;
        Ok(client.clone())
    }

    /// Runs a request under the request timeout, mapping its error.
    async fn timed<T>(&self, request: impl Future<Output = Result<T, tonic::Status>>) -> Result<T> {
        timed(self.config.request_timeout, request).await
    }

    /// `{prefix}/{service}/`: the directory of one service.
    fn service_dir(&self, service: &str) -> String {
        format!("{}/{service}/", self.config.prefix)
    }

    /// Reads the instances of a service at the current revision.
    async fn get_service(&self, service: &str) -> Result<(Vec<(String, ServiceInstance)>, i64)> {
        let client = self.client().await?;
        let dir = self.service_dir(service).into_bytes();
        let request = RangeRequest {
            range_end: prefix_end(&dir),
            key: dir,
            ..Default::default()
        };
        let response = self.timed(client.range(request)).await?;
        let revision = response.header.map_or(0, |h| h.revision);
        let instances = response
            .kvs
            .iter()
            .filter_map(|kv| decode(kv, service))
            .collect();
        Ok((instances, revision))
    }

    /// The keys of instances with this id under any service (ids are unique per registry),
    /// without their values.
    async fn keys_of(&self, id: &str) -> Result<Vec<KeyValue>> {
        let client = self.client().await?;
        let all = format!("{}/", self.config.prefix).into_bytes();
        let request = RangeRequest {
            range_end: prefix_end(&all),
            key: all,
            keys_only: true,
            ..Default::default()
        };
        let response = self.timed(client.range(request)).await?;
        let suffix = format!("/{id}");
        Ok(response
            .kvs
            .into_iter()
            .filter(|kv| kv.key.ends_with(suffix.as_bytes()))
            .collect())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, registered) in self
            .leases
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            registered.task.abort();
        }
    }
}

/// Decodes one key's instance; a value that is not one is skipped with a warning.
fn decode(kv: &KeyValue, service: &str) -> Option<(String, ServiceInstance)> {
    let key = String::from_utf8_lossy(&kv.key).into_owned();
    match serde_json::from_slice::<ServiceInstance>(&kv.value) {
        Ok(instance) if instance.name == service && instance.validate().is_ok() => {
            Some((key, instance))
        }
        Ok(instance) => {
            warn!(%key, name = %instance.name, "skipping an etcd key whose instance is not valid for its service");
            None
        }
        Err(error) => {
            warn!(%key, %error, "skipping an etcd key that is not an instance");
            None
        }
    }
}

/// A `/` would move the key to another directory.
fn check_segments(instance: &ServiceInstance) -> Result<()> {
    for (field, value) in [("id", &instance.id), ("name", &instance.name)] {
        if value.contains('/') {
            return Err(Error::InvalidInstance {
                field,
                source: InvalidValue::Reserved {
                    value: value.clone(),
                    character: '/',
                },
            });
        }
    }
    Ok(())
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl ServiceRegistry for EtcdRegistry {
    fn kind(&self) -> &'static str {
        REGISTRY
    }

    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        async move {
            instance.validate()?;
            check_segments(&instance)?;
            let inner = &self.inner;
            let previous = inner.leases.lock().unwrap_or_else(|p| p.into_inner()).remove(&instance.id);
            if let Some(previous) = previous {
                // The new registration replaces the key; an old lease left behind expires.
                if let Err(error) = previous.stop(inner).await {
                    warn!(id = %instance.id, error = %Chain(&error), "stopping the previous registration failed");
                }
            }
            let key = format!("{}{}", inner.service_dir(&instance.name), instance.id);
            let value = serde_json::to_vec(&instance).map_err(|e| Error::Malformed {
                registry: REGISTRY,
                source: e.into(),
            })?;
            let registered = lease::register(inner, key, value).await?;
            let raced = inner
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(instance.id, registered);
            // A concurrent registration of the same id lost: stop keeping its lease alive
            // (the key is ours now; its lease expires).
            if let Some(raced) = raced {
                raced.task.abort();
            }
            Ok(())
        }
        .boxed()
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        async move {
            let inner = &self.inner;
            let registered = inner
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            if let Some(registered) = registered {
                return registered.stop(inner).await;
            }
            // Registered by another process (or before a restart): delete its key.
            let client = inner.client().await?;
            for kv in inner.keys_of(id).await? {
                inner.timed(client.delete(kv.key)).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        async move {
            let (instances, _) = self.inner.get_service(&query.name).await?;
            Ok(instances
                .into_iter()
                .map(|(_, instance)| instance)
                .filter(|instance| query.matches(instance))
                .collect())
        }
        .boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        watch::stream(Arc::clone(&self.inner), query.clone()).boxed()
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        async move {
            let inner = &self.inner;
            let Some(kv) = inner.keys_of(id).await?.into_iter().next() else {
                return Ok(HealthStatus::Unknown);
            };
            if kv.lease == 0 {
                return Ok(HealthStatus::Passing);
            }
            let client = inner.client().await?;
            let ttl = inner.timed(client.time_to_live(kv.lease)).await?;
            Ok(if ttl > 0 {
                HealthStatus::Passing
            } else {
                HealthStatus::Critical
            })
        }
        .boxed()
    }
}

fn etcd_error(status: tonic::Status) -> Error {
    match status.code() {
        // tonic reports a broken connection as `Unknown`, and transport errors as
        // `Unavailable`.
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Unknown => Error::Unreachable {
            registry: REGISTRY,
            source: Box::new(status),
        },
        code => Error::Status {
            registry: REGISTRY,
            status: code as u16,
            source: Box::new(status),
        },
    }
}

/// Runs a request under a time limit, mapping its error.
async fn timed<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(limit, request).await {
        Ok(result) => result.map_err(etcd_error),
        Err(_) => Err(Error::Timeout {
            registry: REGISTRY,
            source: Elapsed(limit),
        }),
    }
}
