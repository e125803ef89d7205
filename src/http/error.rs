//! The errors of routing: a host that is not a service, too many services.

/// A request's host is not a service name and [`UnknownHosts::Fail`](super::UnknownHosts::Fail) is set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("host `{0}` is not a discovered service")]
pub struct UnknownHost(pub String);

/// A request named a new service while [`max_services`](super::DiscoveryLayer::max_services)
/// balancers exist already.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many services: at most {limit} have a balancer")]
pub struct TooManyServices {
    /// The configured maximum.
    pub limit: usize,
}
