//! [`KubernetesRegistry`]: a Service's healthy pods, read from its EndpointSlices
//! (`discovery.k8s.io/v1`) through kube and kube-runtime's watcher.
//!
//! ```no_run
//! use tower_sd::registry::kubernetes::KubernetesRegistry;
//! use tower_sd::{ServiceQuery, ServiceRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_sd::Error> {
//! // In a pod: the service account's credentials; elsewhere: KUBECONFIG or ~/.kube/config.
//! let kubernetes = KubernetesRegistry::builder()
//!     .namespace("shop")
//!     .port_name("grpc")
//!     .build();
//! let pods = kubernetes.discover(&ServiceQuery::new("greeter")).await?;
//! # drop(pods);
//! # Ok(())
//! # }
//! ```
//!
//! # Kubernetes versions
//!
//! As with kube itself, the application chooses the Kubernetes API version by enabling one
//! version feature of `k8s-openapi` (`k8s-openapi = { version = "0.29", features =
//! ["earliest"] }`). Only `discovery.k8s.io/v1` EndpointSlices are read, which every
//! supported version serves.
//!
//! # RBAC
//!
//! The client needs `get`, `list` and `watch` on `endpointslices` (API group
//! `discovery.k8s.io`) in the namespaces it reads; `examples/kubernetes/rbac.yaml` has the
//! Role and RoleBinding.
//!
//! # Rules
//!
//! A service is the union of its slices (label `kubernetes.io/service-name`), deduplicated by
//! address; a set is applied only once the (re)list is complete, and stays whole across a
//! 410 relist. Ready endpoints are used; when none is ready, the serving ones that are
//! terminating (KEP-1669); never non-serving ones. Nil `ready` means ready, nil `serving`
//! follows `ready` (the API reference's rule; it is ready whenever `ready` is nil), nil
//! `terminating` means not terminating. The zone comes from the endpoint (or its
//! `hints.forZones`), and `nodeName`, `hostname` and the pod name go into metadata. IPv4 and
//! IPv6 slices are read, FQDN slices skipped with a warning. `register` returns `Unsupported`:
//! Kubernetes owns the endpoints.
//!
//! `examples/kubernetes/` has a client and server program and what to apply: the Deployment,
//! a Service with a named port, and a ServiceAccount with a Role granting get, list and watch on
//! `endpointslices` plus its RoleBinding. The tests run against an in-repo fake API server
//! (`testkit/src/fake_kube.rs`: lists with `resourceVersion`, streamed watches with `ADDED`,
//! `MODIFIED`, `DELETED`, `BOOKMARK` and `ERROR` 410 events, 403s); `KUBECONFIG=... cargo test
//! --features kubernetes --test kubernetes -- --ignored` runs the same scenarios against a real
//! cluster. `cargo run --example watch --features kubernetes -- --kubernetes default greeter
//! grpc` prints a service's sets from your kubeconfig.

mod slices;
mod watch;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::{Client, Config};
use tokio::sync::OnceCell;

use super::{ServiceRegistry, WatchStream};
use crate::error::{BoxError, Elapsed, Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};

const REGISTRY: &str = "kubernetes";

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A [`ServiceRegistry`] over Kubernetes EndpointSlices.
///
/// - `discover` lists the slices labelled `kubernetes.io/service-name=<name>` (plus the
///   configured label selector) and `watch` follows them with kube-runtime's watcher. The
///   service is the union of its slices, deduplicated by address; a watch emits a set only
///   once the initial list is complete, keeps the whole set across relists (410 Gone), and
///   yields errors, backing off, without ending.
/// - Endpoints are used when ready; when none is, the serving ones that are terminating
///   (KEP-1669); never non-serving ones. Nil conditions follow the API reference: nil
///   `ready` is ready, nil `serving` follows `ready`, nil `terminating` is not terminating.
/// - Instances: id `namespace/service/address:port`, the endpoint's first address, the port
///   named by [`port_name`](KubernetesRegistryBuilder::port_name) (default: the only one), `zone`
///   from the endpoint's zone or its `hints.forZones`, and metadata `node_name`, `hostname`,
///   `pod` and `for_zones`. IPv4 and IPv6 slices are read; FQDN slices are skipped with a
///   warning.
/// - A [`ServiceQuery`]'s namespace overrides the registry's; its tags and metadata filter
///   the instances (Kubernetes endpoints have no tags, so a query with tags matches
///   nothing: select with labels instead); its datacenter is ignored (one client, one
///   cluster).
/// - `register` and `deregister` are [`Error::Unsupported`]: Kubernetes owns a Service's
///   endpoints.
#[derive(Clone)]
pub struct KubernetesRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    client: OnceCell<Client>,
    settings: Settings,
}

/// Everything but the client, as configured.
#[derive(Clone, Debug)]
struct Settings {
    connect: Connect,
    namespace: Option<String>,
    port_name: Option<String>,
    label_selector: Option<String>,
    retry_base: Duration,
    retry_max: Duration,
    request_timeout: Duration,
}

#[derive(Clone, Copy, Debug)]
enum Connect {
    /// `Config::incluster()`: the pod's service account.
    InCluster,
    /// `Config::infer()`: KUBECONFIG, `~/.kube/config`, else in-cluster.
    Infer,
}

/// Builds a [`KubernetesRegistry`]; see [`KubernetesRegistry::builder`].
#[must_use]
pub struct KubernetesRegistryBuilder {
    client: Option<Client>,
    settings: Settings,
}

// ===== impl KubernetesRegistryBuilder =====

impl KubernetesRegistryBuilder {
    /// Uses this client instead of one inferred from the environment.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Uses the in-cluster configuration (the pod's service account) when `true`; the default,
    /// `false`, reads `KUBECONFIG` or `~/.kube/config` and falls back to in-cluster.
    pub fn in_cluster(mut self, in_cluster: bool) -> Self {
        self.settings.connect = if in_cluster {
            Connect::InCluster
        } else {
            Connect::Infer
        };
        self
    }

    /// The namespace of the services (default: the client's, e.g. the pod's own namespace or
    /// the kubeconfig context's). A query's namespace overrides it.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.settings.namespace = Some(namespace.into());
        self
    }

    /// The name of the Service port to dial. Without it, a service must have exactly one port;
    /// a service with several yields an error naming them.
    pub fn port_name(mut self, name: impl Into<String>) -> Self {
        self.settings.port_name = Some(name.into());
        self
    }

    /// An extra label selector (e.g. `tier=backend`), added to the service-name label.
    pub fn label_selector(mut self, selector: impl Into<String>) -> Self {
        self.settings.label_selector = Some(selector.into());
        self
    }

    /// Backoff between watch errors: full jitter from `base`, doubling up to `max`
    /// (default 100 ms to 30 s).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.retry_base = base;
        self.settings.retry_max = max;
        self
    }

    /// The limit on each list request (`discover`, `health`; default 10 s). Watches are
    /// long-lived and guarded by kube-runtime's own timeouts.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// Builds the registry. The client is created on first use (so the factory needs no
    /// runtime), and errors creating it are returned by the operation that needed it.
    pub fn build(self) -> KubernetesRegistry {
        let mut settings = self.settings;
        settings.namespace = settings.namespace.filter(|ns| !ns.is_empty());
        settings.port_name = settings.port_name.filter(|name| !name.is_empty());
        settings.label_selector = settings.label_selector.filter(|s| !s.trim().is_empty());
        KubernetesRegistry {
            inner: Arc::new(Inner {
                client: OnceCell::new_with(self.client),
                settings,
            }),
        }
    }
}

impl fmt::Debug for KubernetesRegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesRegistryBuilder")
            .field("client", &self.client.as_ref().map(|_| "<given>"))
            .field("settings", &self.settings)
            .finish()
    }
}

impl Default for KubernetesRegistryBuilder {
    fn default() -> Self {
        Self {
            client: None,
            settings: Settings {
                connect: Connect::Infer,
                namespace: None,
                port_name: None,
                label_selector: None,
                retry_base: Duration::from_millis(100),
                retry_max: Duration::from_secs(30),
                request_timeout: Duration::from_secs(10),
            },
        }
    }
}

// ===== impl KubernetesRegistry =====

impl KubernetesRegistry {
    /// A builder: kubeconfig (else in-cluster) client, the client's namespace, the only port.
    pub fn builder() -> KubernetesRegistryBuilder {
        KubernetesRegistryBuilder::default()
    }

    /// A registry over this client, with the client's namespace.
    pub fn new(client: Client) -> Self {
        Self::builder().client(client).build()
    }
}

impl Inner {
    async fn client(&self) -> Result<&Client> {
        self.client
            .get_or_try_init(|| async {
                let config = match self.settings.connect {
                    Connect::InCluster => {
                        Config::incluster().map_err(|e| Error::InvalidConfig {
                            key: "in_cluster".into(),
                            source: e.into(),
                        })?
                    }
                    Connect::Infer => Config::infer().await.map_err(|e| Error::InvalidConfig {
                        key: "KUBECONFIG".into(),
                        source: e.into(),
                    })?,
                };
                Client::try_from(config).map_err(kube_error)
            })
            .await
    }

    /// The slices API and namespace for a query.
    async fn slices(&self, namespace: Option<&str>) -> Result<(Api<EndpointSlice>, String)> {
        let client = self.client().await?;
        let namespace = namespace
            .or(self.settings.namespace.as_deref())
            .unwrap_or_else(|| client.default_namespace())
            .to_owned();
        Ok((Api::namespaced(client.clone(), &namespace), namespace))
    }

    fn selector(&self, service: &str) -> String {
        match &self.settings.label_selector {
            Some(extra) => format!("{SERVICE_NAME_LABEL}={service},{extra}"),
            None => format!("{SERVICE_NAME_LABEL}={service}"),
        }
    }

    /// Lists a service's slices, mapped to endpoints.
    async fn list(
        &self,
        namespace: Option<&str>,
        service: &str,
    ) -> Result<(Vec<Vec<slices::SliceEndpoint>>, String)> {
        let (api, namespace) = self.slices(namespace).await?;
        let limit = self.settings.request_timeout;
        let params = ListParams::default().labels(&self.selector(service));
        let list = tokio::time::timeout(limit, api.list(&params))
            .await
            .map_err(|_| Error::Timeout {
                registry: REGISTRY,
                source: Elapsed(limit),
            })?
            .map_err(kube_error)?;
        let endpoints = list
            .items
            .iter()
            .map(|slice| {
                slices::endpoints_of(
                    slice,
                    &namespace,
                    service,
                    self.settings.port_name.as_deref(),
                )
                .map_err(port_error)
            })
            .collect::<Result<_>>()?;
        Ok((endpoints, namespace))
    }
}

impl fmt::Debug for KubernetesRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesRegistry")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl ServiceRegistry for KubernetesRegistry {
    fn kind(&self) -> &'static str {
        REGISTRY
    }

    fn register(&self, _instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        let error = Error::unsupported(
            REGISTRY,
            "register",
            "Kubernetes owns a Service's endpoints: a pod joins when its readiness probe passes",
        );
        async move { Err(error) }.boxed()
    }

    fn deregister<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<()>> {
        let error = Error::unsupported(
            REGISTRY,
            "deregister",
            "Kubernetes owns a Service's endpoints: a pod leaves when it fails readiness or terminates",
        );
        async move { Err(error) }.boxed()
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        async move {
            let (endpoints, _) = self
                .inner
                .list(query.namespace.as_deref(), &query.name)
                .await?;
            let mut set = slices::union(endpoints.iter().map(Vec::as_slice));
            set.retain(|instance| query.matches(instance));
            Ok(set)
        }
        .boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        watch::stream(Arc::clone(&self.inner), query.clone()).boxed()
    }

    /// The endpoint's condition: `Passing` when ready, `Warning` when serving but not ready
    /// (terminating), `Critical` when not serving, `Unknown` when no slice of its service
    /// lists it (or the id is not one this registry made).
    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        async move {
            let Some((namespace, service, _)) = slices::parse_id(id) else {
                return Ok(HealthStatus::Unknown);
            };
            let (endpoints, _) = self.inner.list(Some(namespace), service).await?;
            let health = endpoints
                .iter()
                .flatten()
                .filter(|e| e.instance.id == id)
                .map(|e| e.conditions.health())
                .min_by_key(|h| match h {
                    HealthStatus::Passing => 0,
                    HealthStatus::Warning => 1,
                    _ => 2,
                });
            Ok(health.unwrap_or(HealthStatus::Unknown))
        }
        .boxed()
    }
}

// ===== errors =====

fn kube_error(error: kube::Error) -> Error {
    match error {
        kube::Error::Api(status) => Error::Status {
            registry: REGISTRY,
            status: status.code,
            source: status,
        },
        kube::Error::SerdeError(e) => Error::Malformed {
            registry: REGISTRY,
            source: e.into(),
        },
        kube::Error::InferConfig(e) => Error::InvalidConfig {
            key: "KUBECONFIG".into(),
            source: e.into(),
        },
        other => Error::Unreachable {
            registry: REGISTRY,
            source: BoxError::from(other),
        },
    }
}

fn watcher_error(error: kube::runtime::watcher::Error) -> Error {
    use kube::runtime::watcher::Error as W;
    match error {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => kube_error(e),
        W::WatchError(status) => Error::Status {
            registry: REGISTRY,
            status: status.code,
            source: status,
        },
        other @ W::NoResourceVersion => Error::Malformed {
            registry: REGISTRY,
            source: other.into(),
        },
    }
}

fn port_error(error: slices::PortError) -> Error {
    Error::InvalidConfig {
        key: "port_name".into(),
        source: error.into(),
    }
}
