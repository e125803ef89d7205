//! [`ConsulRegistry`]: Consul's HTTP API (agent registration, health queries, blocking
//! queries), over reqwest with rustls and the ring provider.
//!
//! ```no_run
//! use tower_sd::registry::consul::ConsulRegistry;
//! use tower_sd::{ServiceRegistry, ServiceQuery};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_sd::Error> {
//! // CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN apply, as with Consul's own tools.
//! let consul = ConsulRegistry::builder().from_env().datacenter("dc1").build()?;
//! let healthy = consul.discover(&ServiceQuery::new("greeter").with_tag("v2")).await?;
//! # drop(healthy);
//! # Ok(())
//! # }
//! ```
//!
//! # Registration and health checks
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_sd::ServiceInstance;
//! use tower_sd::registration::Registration;
//! use tower_sd::registry::consul::{ConsulRegistry, HealthCheck, HealthCheckKind};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_sd::Error> {
//! let consul = ConsulRegistry::builder()
//!     .from_env()
//!     .health_check(HealthCheck::new(HealthCheckKind::Http(None))) // GET /healthz, 10 s
//!     .build()?;
//! // Server side: register, keep it registered, drain on shutdown.
//! let me = ServiceInstance::new("api-1", "api", "10.0.0.7", 8080);
//! let registration = Registration::builder(consul, me).build();
//! registration.registered(Duration::from_secs(30)).await?;
//! // ... serve `registration.health()` at /healthz; on SIGTERM:
//! registration.shutdown().await // 503 + maintenance, drain delay, deregister
//! # }
//! ```
//!
//! The backend uses the agent API to register (`replace-existing-checks=true`, explicit
//! `CheckID`; HTTP, TCP, gRPC or TTL checks with `DeregisterCriticalServiceAfter`, warning below
//! Consul's 1-minute minimum), `/v1/health/service/:name` to discover with every query filter
//! pushed to Consul (`tag`, `dc`, `ns`, metadata as a `filter` expression), and blocking queries
//! to watch: `index` and `wait`, a lower index resets to 0, a 0 or missing index becomes 1,
//! the first query after an error starts from 0 (so the answer comes as soon as Consul is back),
//! queries are rate limited by a token bucket, errors back off with full jitter and are yielded
//! on the stream, and sets are compared before being emitted. `Service.Address` falls back to
//! `Node.Address`; `Weights` and the zone (service or node metadata) are carried over; bodies
//! are size-limited.
//!
//! - **Datacenters**: a query with a [`Failover`] (or a registry built with
//!   one) follows several datacenters, each with its own blocking query and index; each
//!   datacenter's instances get its place in the order as their
//!   [priority tier](crate::balance#priority-tiers) and ids `{datacenter}/{node}/{service ID}`.
//!   A datacenter that fails is an error on the stream while the others are followed.
//!   `Failover::Nearest(n)` takes the local datacenter and the `n` nearest from
//!   `/v1/catalog/datacenters` (Consul's round-trip-time order), re-read every
//!   `datacenters_refresh`.
//! - **Prepared queries**: a query named `<name>.query` (as in Consul DNS's
//!   `<name>.query.consul`) executes the prepared query `<name>`, which fails over by its own
//!   definition; ids are `{datacenter}/{node}/{service ID}` of the datacenter that answered.
//!   They do not block, so a watch polls every `poll_interval` (with jitter, through the same
//!   rate limit).
//! - **Ids**: Consul's service IDs are unique per agent only (`web` on every node is the usual
//!   case), so discovered instances are `{node}/{service ID}` (`node-1/web`); agent operations
//!   (`deregister`, `health`, heartbeats, maintenance) take the ID you registered.
//! - **ACLs**: the token never appears in `Debug` output, errors or logs. An answer that Consul
//!   filtered by ACLs (`X-Consul-Results-Filtered-By-ACLs`, a token without `service:read`) is
//!   logged as a warning naming the problem, and an empty one is an error (403), never an empty
//!   set. Without a token, Consul does not say so (its servers clear the header for requests
//!   without one): an empty answer then is an empty set, with a warning, once, saying how to
//!   configure a token.
//! - **The token stays home**: redirects are never followed, and a loopback agent is never
//!   reached through the system's proxy unless `system_proxy(true)` asks for it.
//!
//! Against a real agent: `consul agent -dev`, then `cargo run --example consul --features
//! consul,tonic` (a tonic server registers with a gRPC check and a client finds it through
//! Consul), or `cargo run --example watch --features consul -- --consul 127.0.0.1:8500 SERVICE`.
//! The tests run against an in-repo fake agent (`testkit/src/fake_consul.rs`) that is as strict
//! as Consul where the tests can tell (nodes with `serfHealth`, blocking until the index moves
//! past the one asked, `passing`, the one-minute reaping minimum, `Status` required on check
//! updates, default-deny ACLs that filter answers); its header lists what it does not model; `CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo test --features consul --test
//! consul -- --ignored` runs the same scenario against a real agent.
//!
//! # Service mesh
//!
//! A service joins Consul's mesh (mutual TLS with certificates
//! from Consul's CA; intentions decide who may call whom) in one of two ways, and tower-sd does
//! both: enrollment and discovery here, Connect-native mTLS in `tower_sd::mesh` (feature `consul-connect`).
//!
//! `mesh_registration` on the Consul registry
//! adds the service definition's `Connect` block to every registration, and `mesh_discovery`
//! makes `discover` and `watch` read `/v1/health/connect/:service` (the mesh endpoints: each
//! sidecar proxy's address and port, or a Connect-native instance's own), with the same
//! blocking-query rules as the plain watch:
//!
//! ```no_run
//! use tower_sd::registry::consul::{ConsulRegistry, MeshRegistration, SidecarService, Upstream};
//!
//! # fn main() -> Result<(), tower_sd::Error> {
//! // "Connect": {"SidecarService": {"Port": 21000, "Proxy": {"Upstreams":
//! //     [{"DestinationName": "db", "LocalBindPort": 9191}]}}}
//! let sidecar = SidecarService::new(Some(21000)).upstream(Upstream::new("db", 9191));
//! let with_sidecar = ConsulRegistry::builder()
//!     .mesh_registration(MeshRegistration::Sidecar(sidecar))
//!     .build()?;
//! // "Connect": {"Native": true}, and discovery of mesh endpoints.
//! let native = ConsulRegistry::builder()
//!     .mesh_registration(MeshRegistration::Native)
//!     .mesh_discovery(true)
//!     .build()?;
//! # drop((with_sidecar, native));
//! # Ok(())
//! # }
//! ```
//!
//! The sidecar gets Consul's defaults (ID `<id>-sidecar-proxy`, the parent's tags and meta, an
//! alias check following the parent's health); the agent deregisters it with its service. Running
//! the proxy itself (Envoy, `consul connect envoy`) is outside tower-sd.

mod api;
mod builder;
pub(crate) mod client;
mod failover;
mod mesh;
mod prepared;
mod read;
mod settings;
pub(crate) mod watch;

pub use api::{META_DATACENTER, META_NAMESPACE};
pub use builder::ConsulRegistryBuilder;
pub use mesh::{MeshRegistration, SidecarService, Upstream};
pub use settings::{HealthCheck, HealthCheckKind};

use std::fmt;
use std::sync::Arc;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};

use super::{ServiceRegistry, WatchStream};
use crate::error::{Error, InvalidValue, Result};
use crate::instance::{Failover, HealthStatus, ServiceInstance, ServiceQuery};
use client::Client;

/// A [`ServiceRegistry`] over a Consul agent's HTTP API.
///
/// - `register` uses the agent API with `replace-existing-checks=true` and one health check
///   built from the [`HealthCheck`] template, with an explicit `CheckID` of
///   `service:<id>`.
/// - `discover` and `watch` read `/v1/health/service/:name`, pushing every [`ServiceQuery`]
///   filter to Consul (`tag`, `dc`, `ns`, and metadata as a `filter` expression). Instances with
///   a critical check are left out; warning ones stay, at their `Weights.Warning` weight.
/// - With [`ConsulRegistryBuilder::mesh_discovery`], both read
///   `/v1/health/connect/:name` instead: the service's mesh endpoints (sidecar proxies, or
///   Connect-native instances). [`ConsulRegistryBuilder::mesh_registration`] registers
///   instances into the mesh.
/// - `watch` runs blocking queries and follows Consul's index rules (see
///   [`ConsulRegistryBuilder::wait`]).
/// - `health` reads `/v1/agent/health/service/id/:id`.
///
/// **Instance ids.** Consul's service IDs are unique per agent, not per cluster (the default
/// ID is the service name, so `web` on every node is the usual case), so discovered
/// instances have the id `{node}/{service ID}`, e.g. `node-1/web`; everything downstream is
/// keyed by it. The agent operations (`deregister`, `health`, `heartbeat`,
/// `set_maintenance`) act on the local agent and take the service ID the instance was
/// registered with.
///
/// **ACLs.** The token is sent as `X-Consul-Token` and never appears in `Debug` output, logs
/// or errors. Consul answers 403 only for an unknown token; a known token without
/// `service:read` (or the anonymous token under default deny) gets its answer with the
/// instances it may not see removed and `X-Consul-Results-Filtered-By-ACLs: true`. Such an
/// answer is logged as a warning naming the ACL problem, and when it leaves nothing it is an
/// [`Error::Status`] of 403, not an empty set: the last set stands.
/// Without a token, Consul clears that header (`maskResultsFilteredByACLs` in its servers),
/// so a hidden service looks empty: the first empty answer logs a warning saying that ACLs
/// may hide it and how to configure a token.
///
/// **Redirects and proxies.** Redirects are never followed (the token would go along), and
/// an agent on a loopback address is always dialled directly, never through the system's
/// proxy, unless [`ConsulRegistryBuilder::system_proxy`] says otherwise.
#[derive(Clone)]
pub struct ConsulRegistry {
    client: Arc<Client>,
}

impl ConsulRegistry {
    /// The HTTP client, shared with the Connect-native mesh.
    #[cfg(feature = "consul-connect")]
    pub(crate) fn client(&self) -> Arc<Client> {
        Arc::clone(&self.client)
    }

    /// A builder, with Consul's defaults (`http://127.0.0.1:8500`).
    pub fn builder() -> ConsulRegistryBuilder {
        ConsulRegistryBuilder::default()
    }

    /// Puts an instance in maintenance mode (it leaves discovery) or takes it out.
    ///
    /// # Errors
    ///
    /// The agent's errors.
    pub async fn set_maintenance(&self, id: &str, enable: bool, reason: &str) -> Result<()> {
        self.client.maintenance(id, enable, reason).await
    }
}

impl fmt::Debug for ConsulRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulRegistry")
            .field("client", &self.client)
            .finish()
    }
}

impl ConsulRegistry {
    /// `query` with the registry's failover when it gives none; `None` when it follows one
    /// datacenter.
    fn with_failover(&self, query: &ServiceQuery) -> Option<ServiceQuery> {
        let failover = match &query.failover {
            Failover::None => &self.client.settings.failover,
            failover => failover,
        };
        (*failover != Failover::None).then(|| ServiceQuery {
            failover: failover.clone(),
            ..query.clone()
        })
    }
}

impl ServiceRegistry for ConsulRegistry {
    fn kind(&self) -> &'static str {
        "consul"
    }

    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        async move {
            instance.validate()?;
            // Consul refuses weights outside 1..=65535 (`structs.ValidateWeights`): a
            // refusal for good, said before asking.
            if !(1..=65_535).contains(&instance.weight) {
                return Err(Error::InvalidInstance {
                    field: "weight",
                    source: InvalidValue::OutOfRange {
                        value: instance.weight.into(),
                        min: 1,
                        max: 65_535,
                    },
                });
            }
            self.client.register(&instance).await
        }
        .boxed()
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.client.deregister(id).boxed()
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        async move {
            if let Some(name) = prepared::name(query) {
                return prepared::discover(&self.client, query, name).await;
            }
            match self.with_failover(query) {
                None => Ok(self.client.health_service(query, None).await?.0),
                Some(query) => failover::discover(&self.client, &query).await,
            }
        }
        .boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        let client = Arc::clone(&self.client);
        if let Some(name) = prepared::name(query) {
            return prepared::stream(client, query.clone(), name).boxed();
        }
        match self.with_failover(query) {
            None => watch::stream(client, query.clone()).boxed(),
            Some(query) => failover::stream(client, query).boxed(),
        }
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        self.client.agent_health(id).boxed()
    }

    fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.client.pass_ttl(id).boxed()
    }

    fn set_maintenance<'a>(
        &'a self,
        id: &'a str,
        enable: bool,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        self.client.maintenance(id, enable, reason).boxed()
    }
}
