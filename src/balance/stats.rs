//! [`EndpointStats`] and [`EndpointState`]: what [`Balance::endpoints`](super::Balance::endpoints)
//! reports of each endpoint.

use std::time::Duration;

use crate::endpoint::Connectivity;

/// Whether the balancer picks an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndpointState {
    /// Picked normally.
    Ready,
    /// Its owner reports it connecting ([`Connectivity::Connecting`]): not picked while
    /// another endpoint is ready.
    Connecting,
    /// Its `poll_ready` failed, or its owner reports a failed connection
    /// ([`Connectivity::TransientFailure`]). Either way it is not picked while another
    /// endpoint is usable. After a `poll_ready` failure, it is tried again after a backoff (50 ms doubling to 5 s)
    /// or when no other endpoint is usable, and is ready again when a `poll_ready` on it
    /// succeeds or discovery replaces it.
    Failed,
    /// Ejected by outlier detection; a single probe decides when the ejection ends.
    Ejected,
    /// Connected, but every connection is at its server's stream limit
    /// ([`Readiness::is_saturated`](crate::endpoint::Readiness::is_saturated)): not picked while another endpoint has room; when
    /// none has, requests wait for a stream in the order they came.
    Saturated,
    /// Connected, but its health check finds it not serving
    /// ([`Readiness::set_serving`](crate::endpoint::Readiness::set_serving)): not picked
    /// while another endpoint is ready.
    NotServing,
    /// Removed by discovery; only requests already in flight still use it.
    Draining,
}

/// A point-in-time view of one endpoint, from [`Balance::endpoints`].
///
/// [`Balance::endpoints`]: super::Balance::endpoints
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EndpointStats<K> {
    /// The discovery key (the instance id, for registry discovery).
    pub key: K,
    /// Requests picked for it and not yet complete: counted from the `poll_ready` that picked
    /// it, until the response (a streaming body included) is complete or dropped.
    pub in_flight: u64,
    /// Peak-EWMA latency estimate; `None` unless the balancer uses that load.
    pub ewma: Option<Duration>,
    /// Weight.
    pub weight: u32,
    /// Locality zone.
    pub zone: Option<String>,
    /// Priority tier (lower is preferred).
    pub priority: u16,
    /// Whether it is picked.
    pub state: EndpointState,
    /// Time left in its ejection, when ejected.
    pub ejected_for: Option<Duration>,
    /// What its owner reports of its connection, when it reports anything (see
    /// [`Readiness`](crate::endpoint::Readiness)).
    pub connectivity: Option<Connectivity>,
}
