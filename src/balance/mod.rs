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

mod builder;
mod claim;
mod classify;
mod completion;
mod config;
mod future;
mod load;
mod outlier;
mod p2c;
mod service;
mod slot;
mod snapshot;
mod stats;
mod updater;
mod zone;

pub use builder::BalanceBuilder;
pub use classify::{Classify, ErrorsOnly};
pub use completion::Completion;
#[cfg(all(test, any(feature = "http", feature = "tonic")))]
pub(crate) use completion::Track;
pub use config::{PanicMode, ZonePreference};
pub use future::ResponseFuture;
pub use load::LoadMetric;
pub use outlier::OutlierDetection;
pub use service::Balance;
pub use stats::{EndpointState, EndpointStats};
