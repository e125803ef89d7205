//! Service discovery and client-side load balancing for tower, tonic, hyper and axum clients.
//!
//! ```
//! use futures_util::StreamExt;
//! use tower_sd::{HealthStatus, MemoryRegistry, ServiceInstance, ServiceRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_sd::Error> {
//! // Instances register themselves (here in the embedded in-memory registry)...
//! let registry = MemoryRegistry::new();
//! registry.register(ServiceInstance::new("greeter-1", "greeter", "10.0.0.1", 50051)).await?;
//! registry.register(ServiceInstance::new("greeter-2", "greeter", "10.0.0.2", 50051)).await?;
//!
//! // ...and clients follow the healthy set as it changes.
//! let mut healthy = registry.watch(&"greeter".into());
//! assert_eq!(healthy.next().await.unwrap()?.len(), 2);
//!
//! registry.set_health("greeter-2", HealthStatus::Critical)?;
//! let set = healthy.next().await.unwrap()?;
//! assert_eq!(set.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["greeter-1"]);
//! # Ok(())
//! # }
//! ```
//!
//! # Overview
//!
//! A registry backend reports the full healthy instance set of a service
//! ([`ServiceRegistry::watch`]). [`RegistryDiscover`] diffs successive sets into tower
//! [`Change`](tower::discover::Change)s, so any tower balancer can route to the instances
//! and follow them as they come, go, crash and drain.
//!
//! - [`ServiceInstance`], [`HealthStatus`], [`ServiceQuery`]: the vocabulary.
//! - [`ServiceRegistry`]: the object-safe registry trait; [`MemoryRegistry`] (the embedded
//!   default, with health states and TTL checks) and [`StaticRegistry`] (a fixed list) need
//!   no feature.
//! - [`RegistryDiscover`]: registry watch to tower `Discover`.
//! - [`balance::Balance`]: a lock-free power-of-two-choices balancer shared by clones, with
//!   outlier ejection, panic mode, slow start and zone preference.
//! - [`registration::Registration`]: the server side (register, heartbeat, drain).
//! - [`Error`]: one error type, one variant per cause.
//!
//! Registries, balancers, channels and registrations with options are made by
//! `Type::builder()`, which returns a `TypeBuilder` (`ConsulRegistry::builder()` gives a
//! `ConsulRegistryBuilder`, `Balance::builder()` a `BalanceBuilder`); its `build()` checks
//! the options, and the built value reads them from a settings struct of its own, never from
//! the builder. Layers, as in tower, take their options as methods on the layer
//! (`DiscoveryLayer::new(registry).max_services(100)`).
//!
//! # Feature Flags
//!
//! The core (types, in-memory and static registries, the discover adapter, the balancer,
//! registration) needs no feature.
//!
//! - `tonic`: [`tonic::LoadBalancedChannel`](crate::tonic) for generated gRPC clients.
//! - `http`: [`http::DiscoveryLayer`](crate::http) for hyper-util and axum HTTP clients.
//! - `consul`: [`registry::consul::ConsulRegistry`](crate::registry) over Consul's HTTP API.
//! - `consul-connect`: [`mesh::ConsulConnect`](crate::mesh): Connect-native mTLS clients
//!   and servers in the Consul service mesh (on the agent's Connect-native endpoints, which
//!   Consul deprecates since 1.18 but still serves).
//! - `kubernetes`: [`registry::kubernetes::KubernetesRegistry`](crate::registry) over
//!   EndpointSlices (kube, kube-runtime). As with kube, the application picks the Kubernetes
//!   version with a `k8s-openapi` version feature.
//! - `etcd`: [`registry::etcd::EtcdRegistry`](crate::registry): instances on leases, prefix
//!   watches (etcd's gRPC API through tonic; the generated code is checked in, so no `protoc`).
//! - `dns`: [`registry::dns::DnsRegistry`](crate::registry): SRV, A and AAAA records
//!   re-resolved on their TTL (hickory-resolver).
//! - `metrics`: balancer counters and gauges through the `metrics` facade.
//! - `config`: [`config::RegistryConfig`](crate::config): YAML/TOML and the registry factory.
//! - `full`: all of the above.
//!
//! # Metrics
//!
//! With the `metrics` feature, tower-sd records these through the
//! [`metrics`](https://docs.rs/metrics) facade (install any recorder, such as
//! `metrics-exporter-prometheus`). Every metric has a `service` label; the registries' also
//! have `registry` (the backend's kind). Every endpoint state change (inserted, replaced,
//! removed, failed, ready again, ejected, probed, returned) is also a `tracing` event.
//!
//! | name | kind | more labels | meaning |
//! | --- | --- | --- | --- |
//! | `tower_sd_endpoints` | gauge | `state` (`ready`, `ejected`) | endpoints in the balancer's current snapshot |
//! | `tower_sd_requests_total` | counter | `outcome` (`success`, `failure`) | requests completed, as classified |
//! | `tower_sd_ejections_total` | counter | | endpoints ejected by outlier detection |
//! | `tower_sd_returns_total` | counter | | ejected endpoints returned by a successful probe |
//! | `tower_sd_panic_picks_total` | counter | | picks made in panic mode |
//! | `tower_sd_tier_share_percent` | gauge | `priority` | the percentage of picks that go to the endpoints of this priority (set when there are several priorities, as their health changes) |
//! | `tower_sd_updates_total` | counter | | endpoint snapshots published |
//! | `tower_sd_last_update_seconds` | gauge | | Unix time of the last published snapshot |
//! | `tower_sd_transparent_retries_total` | counter | | requests sent again because the server did not process them |
//! | `tower_sd_retries_total` | counter | `code` | calls sent again by their retry policy, by the status code that made them worth retrying |
//! | `tower_sd_retries_throttled_total` | counter | | retries the retry throttle refused |
//! | `tower_sd_call_attempts` | histogram | | attempts per call with a retry policy, transparent resends included |
//! | `tower_sd_hedges_total` | counter | | attempts a hedging policy sent after a call's first |
//! | `tower_sd_hedges_won_total` | counter | | hedged calls answered by an attempt after their first |
//! | `tower_sd_health_changes_total` | counter | `status` (`serving`, `not_serving`, `unimplemented`) | health-check answers that changed an instance's state (`unimplemented`: the server has no health service; checking stopped) |
//! | `tower_sd_stream_waits_total` | counter | | requests that waited for a stream, every connection to their instance at the server's limit |
//! | `tower_sd_stream_wait_timeouts_total` | counter | | requests that waited out the stream wait and failed |
//! | `tower_sd_registry_errors_total` | counter | `registry`, `kind` | watch errors, by kind (`unreachable`, `status`, `malformed`, `timeout`, ...) |
//! | `tower_sd_registry_last_answer_seconds` | gauge | `registry` | Unix time of the registry's last good answer |
//! | `tower_sd_cache_serving` | gauge | `registry` | 1 while a cached set is served because the registry fails |
//! | `tower_sd_cache_age_seconds` | gauge | `registry` | the age of the cached set served |
//! | `tower_sd_fallback_active` | gauge | `registry` | the position in a fallback chain of the registry followed (0: the primary) |
//!
//! The two `_seconds` gauges let a dashboard show the time since: `time() - ` the gauge.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.89 (edition 2024; kube 5, behind the `kubernetes` feature, needs it). Raising it is
//! a minor version bump. What was checked: the crate is built and tested with Rust 1.95 only
//! (no older toolchain can be installed here), and every dependency in `Cargo.lock` that
//! declares a `rust-version` declares 1.89 or older (`cargo metadata --all-features`: 348
//! packages, 275 declaring one, the highest 1.89); it has not been compiled with 1.89 itself.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

mod backoff;
pub mod balance;
#[cfg(any(feature = "http", feature = "tonic"))]
pub mod classify;
#[cfg(feature = "config")]
pub mod config;
#[cfg(feature = "_connections")]
pub mod connection;
mod discover;
pub mod endpoint;
mod error;
#[cfg(feature = "http")]
pub mod http;
mod instance;
#[cfg(feature = "consul-connect")]
pub mod mesh;
mod metrics;
pub mod registration;
pub mod registry;
#[cfg(feature = "tonic")]
pub mod tonic;

pub use discover::RegistryDiscover;

/// The README's code blocks, compiled as doctests so they stay true.
#[cfg(all(
    doctest,
    feature = "tonic",
    feature = "http",
    feature = "consul",
    feature = "consul-connect",
    feature = "kubernetes",
    feature = "etcd",
    feature = "dns"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use error::{BoxError, Elapsed, Error, InvalidValue, RateLimited, Result};
pub use instance::{Failover, HealthStatus, ServiceInstance, ServiceQuery};
pub use registry::{MemoryRegistry, ServiceRegistry, StaticRegistry};
