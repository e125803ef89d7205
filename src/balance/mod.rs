//! A lock-free power-of-two-choices balancer that follows discovery in the background.
//!
//! # Algorithm
//!
//! Each request draws two distinct endpoints at random and sends to the less loaded one
//! ("power of two choices", Mitzenmacher 2001; Finagle's and tower's P2C). Load is requests
//! in flight by default, or a peak EWMA of latency scaled by requests in flight
//! ([`LoadMetric`]), either relative to the endpoint's weight. When weights differ, the
//! candidates are drawn in proportion to them, so that shares follow weights when loads are
//! equal, idle or busy (see `p2c.rs`). The cost of a pick does not depend on the number of
//! endpoints.
//!
//! # Why not tower's `p2c::Balance`
//!
//! tower's balancer takes `&mut self`, so sharing it needs a `Buffer`: one task does all the
//! work, every request hops through a channel, discovery is only applied when requests arrive
//! (tower #824), and an empty set makes callers wait forever. Here:
//!
//! - one **updater task** per balancer owns the [`Discover`] stream, drains every ready change,
//!   and publishes an immutable snapshot through `ArcSwap` once per batch, whether or not
//!   requests arrive; endpoints that stay keep their slot and counters;
//! - every **clone** of [`Balance`] picks from the current snapshot on its own thread with no
//!   lock and no channel; an endpoint's in-flight count is the reference count of its state
//!   (held by each request and by its slots: one per snapshot that lists it, and the
//!   updater's) less the slots, which the state counts, so a request costs two atomic
//!   operations on its endpoint, up at the pick and down at completion;
//! - an **empty set** makes callers wait at most `wait_for_endpoints`, then fail with
//!   [`Error::NoEndpoints`](crate::Error::NoEndpoints).
//!
//! The balancer knows [`Discover`] streams of [`Endpoint`]s, not registries or connections:
//! each endpoint brings its service, weight, zone and readiness.
//! [`RegistryDiscover`](crate::RegistryDiscover) makes such a stream from a registry, and
//! [`Endpoints`](crate::endpoint::Endpoints) from any tower `Discover`.
//!
//! [`Discover`]: tower::discover::Discover
//! [`Endpoint`]: crate::endpoint::Endpoint
//!
//! # Example
//!
//! ```rust
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceExt, service_fn};
//! use tower_sd::balance::{Balance, LoadMetric};
//! use tower_sd::{MemoryRegistry, RegistryDiscover, ServiceInstance, ServiceRegistry};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), BoxError> {
//!     let registry = MemoryRegistry::new();
//!     registry.register(ServiceInstance::new("a", "echo", "127.0.0.1", 8080)).await?;
//!
//!     // Each instance as a balancer endpoint with its weight and zone; `make` builds the
//!     // client for one instance (a real one would be a tonic Channel or an HTTP client bound
//!     // to `instance.authority()`).
//!     let discover = RegistryDiscover::new(&registry, "echo", |instance| {
//!         let authority = instance.authority();
//!         Ok::<_, Infallible>(service_fn(move |()| {
//!             let authority = authority.clone();
//!             async move { Ok::<_, Infallible>(authority) }
//!         }))
//!     });
//!     let balance = Balance::builder()
//!         .service_name("echo")
//!         .load(LoadMetric::peak_ewma())                 // or in-flight requests (default)
//!         .wait_for_endpoints(Duration::from_secs(2))    // then Error::NoEndpoints
//!         .build(discover);
//!
//!     // Every clone balances on its own: no Buffer, no lock, no shared task.
//!     let mut handle = balance.clone();
//!     assert_eq!(handle.ready().await?.call(()).await?, "127.0.0.1:8080");
//!     Ok(())
//! }
//! ```
//!
//! # Guarantees
//!
//! What `Balance` guarantees:
//!
//! - discovery is applied by one updater task per balancer, whether or not requests arrive, and
//!   published as an immutable snapshot once per batch of changes;
//! - `poll_ready` picks by power of two choices (in-flight or peak-EWMA load, divided by the
//!   instance's weight; a request counts as load from its pick until its response ends) and
//!   `call` uses that same endpoint even if the set changed in between;
//! - an empty set makes callers wait at most `wait_for_endpoints`, woken the moment an endpoint
//!   arrives, then fail with `Error::NoEndpoints` naming the service;
//! - a removed endpoint drains: its requests in flight finish on it, and no new request picks it;
//! - an endpoint whose `poll_ready` fails is avoided until it recovers or is replaced;
//! - `Balance::endpoints()` reports in-flight, EWMA, weight, zone, priority, state and ejection
//!   per endpoint;
//! - the updater stops when discovery ends (the last endpoints stay) or the last handle drops.
//!
//! # Production balancing
//!
//! - **Failure classification** is pluggable (`Classify`): `ErrorsOnly` for any service, and
//!   `HttpStatus` (used by the tonic and HTTP integrations) for transport errors, HTTP 5xx and the
//!   gRPC codes `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL` from the
//!   `grpc-status` header (trailers-only responses, the usual way a unary call fails).
//! - **Passive outlier detection** (on by default, Envoy's semantics): 5 consecutive failures eject
//!   an endpoint for 30 s x the times it was ejected, capped at 300 s; at most 50% are ejected at
//!   once; when an ejection ends, one probe request decides. All state is per-endpoint atomics.
//! - **Panic threshold**: below 50% usable endpoints, balance across all of them
//!   (`PanicMode::BalanceAll`), or fail with `Error::NoHealthyEndpoints` (`PanicMode::Fail`).
//! - **Slow start** (`slow_start(window)`): a new endpoint's share ramps up over the window.
//! - **Zone preference** (`ZonePreference::new("eu-west-1a")`): stay in the local zone while it
//!   has at least `min_endpoints` usable endpoints (and `min_share_percent` of all), else use all.
//! - **Priority tiers** and **keyed routing**: see below.
//! - **Retries belong to you**: wrap `Balance` in `tower::retry::Retry` with a budget
//!   (`TpsBudget`). Each retry picks again; with outlier detection, the endpoint that just
//!   failed is avoided once it is ejected (`tests/retries.rs` shows it with
//!   `consecutive_failures(1)`: no retried request lands on the failing endpoint).
//!
//! # Priority tiers
//!
//! Each endpoint has a priority ([`Endpoint::priority`], from [`ServiceInstance::priority`]:
//! DNS SRV priorities, a Consul datacenter's place in the failover order); 0 is the most
//! preferred, and each distinct priority is a tier. Traffic goes by Envoy's rule: a tier takes
//! `min(100%, healthy share x 1.4)` of what the better tiers left, so the best tier takes
//! everything while at least 72% of its endpoints are healthy (pickable, not failed, not
//! ejected) and spills to the next gradually below that. When the tiers' health adds up to
//! less than 100%, each takes its share of the sum, and a tier whose healthy share is below
//! the panic threshold is in panic (its ejections are ignored, or its picks fail with
//! `PanicMode::Fail`). Within a tier, power of two choices, weights and zone preference
//! apply as they do without tiers. [`Balance::tiers`] and the gauge
//! `tower_sd_tier_share_percent` show the share each tier takes; [`Balance::endpoints`]
//! shows each endpoint's priority. An endpoint still connecting is not healthy, so while a
//! better tier connects (at start-up, say) its share goes to the next one that is connected;
//! grpc-go's priority policy instead waits up to 10 s for a connecting priority before
//! failing over. With one priority none of this costs anything; with
//! several, a pick draws its tier from shares recomputed only when an endpoint's health
//! changes.
//!
//! [`Endpoint::priority`]: crate::endpoint::Endpoint::priority
//! [`ServiceInstance::priority`]: crate::ServiceInstance::priority
//!
//! # Keyed routing
//!
//! [`Balance::keyed`] routes requests with a key ("sticky" routing: a user, a session, a
//! cache shard) to the same endpoint, by consistent hashing with bounded load: a ring of 64
//! entries per unit of weight over the best tier's endpoints, placed by XXH64 of their keys
//! (so clients that know the same instances agree), and a request goes to the first
//! endpoint along the ring from its key's hash ([`key_hash`]) that is usable and holds
//! fewer than `c` times the average load (Mirrokni, Thorup and Zadimoghaddam, 2018; `c` is
//! 1.25 by default, [`Keyed::balance_factor`]). A hot key spills along the ring instead of
//! piling onto one endpoint; an ejected, failed, unready or saturated endpoint is passed
//! over and gets its keys back once it recovers; when one of N endpoints leaves, only its
//! keys (about 1/N) move. Requests without a key, or with no usable endpoint in the best
//! tier, are balanced as above. `keyed.rs` says where this differs from gRFC A42.
//!
//! The counters and gauges it keeps (feature `metrics`) are listed in the [crate docs](crate#metrics).

mod builder;
mod claim;
mod classify;
mod completion;
mod config;
mod future;
mod keyed;
mod load;
mod outlier;
mod p2c;
mod pool;
mod ring;
mod route;
mod service;
mod slot;
mod snapshot;
mod stats;
mod tier;
mod updater;

pub use builder::BalanceBuilder;
pub use classify::{Classify, ErrorsOnly};
pub use completion::Completion;
#[cfg(all(test, any(feature = "http", feature = "tonic")))]
pub(crate) use completion::Track;
pub use config::{PanicMode, ZonePreference};
pub use future::ResponseFuture;
pub use keyed::{Keyed, KeyedFuture, key_hash};
pub use load::LoadMetric;
pub use outlier::OutlierDetection;
pub use service::Balance;
#[cfg(feature = "_connections")]
pub(crate) use service::Picks;
pub use stats::{EndpointState, EndpointStats};
pub use tier::TierShare;
