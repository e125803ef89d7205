//! The crate's [`Error`], one variant per cause.

use std::time::Duration;

/// A boxed error, as tower middleware passes them around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between a registry and a request.
///
/// Each variant names its cause; the underlying error, if any, is reachable through
/// [`std::error::Error::source`] rather than formatted into the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry could not be reached (connection refused, DNS failure, TLS failure).
    #[error("{registry} registry unreachable")]
    Unreachable {
        /// Which registry, e.g. `consul`.
        registry: &'static str,
        /// The transport error.
        #[source]
        source: BoxError,
    },

    /// The registry answered, with an error status.
    #[error("{registry} registry answered with status {status}")]
    Status {
        /// Which registry, e.g. `consul`.
        registry: &'static str,
        /// The protocol status code (HTTP status, gRPC code).
        status: u16,
        /// What the registry said, size-limited; never contains credentials.
        #[source]
        source: BoxError,
    },

    /// The registry answered from a copy older than allowed (a Consul `stale` read from a
    /// server out of touch with its leader for longer than `max_stale`, or with no known
    /// leader).
    #[error("{registry} registry answered from a stale copy")]
    Stale {
        /// Which registry, e.g. `consul`.
        registry: &'static str,
        /// How stale, and the limit.
        #[source]
        source: BoxError,
    },

    /// The registry answered with something that could not be understood.
    #[error("malformed response from {registry} registry")]
    Malformed {
        /// Which registry, e.g. `consul`.
        registry: &'static str,
        /// The decoding error.
        #[source]
        source: BoxError,
    },

    /// A configuration value is wrong.
    #[error("invalid configuration at `{key}`")]
    InvalidConfig {
        /// The offending setting: the name of the builder method that set it (`ca_file`),
        /// or, for a configuration file, its key path
        /// (`registry.fallback[0].consul.ca_file`).
        key: String,
        /// Why the value is wrong.
        #[source]
        source: BoxError,
    },

    /// An instance cannot be registered or dialled.
    #[error("invalid instance: field `{field}`")]
    InvalidInstance {
        /// The offending field: `id`, `name`, `address` or `port`.
        field: &'static str,
        /// What is wrong with its value.
        #[source]
        source: InvalidValue,
    },

    /// The registry has no instance with this id.
    #[error("{registry} registry has no instance `{id}`")]
    UnknownInstance {
        /// Which registry.
        registry: &'static str,
        /// The id asked for.
        id: String,
    },

    /// The registry cannot do this by design (e.g. registering with Kubernetes).
    #[error("{operation} is not supported by the {registry} registry")]
    Unsupported {
        /// The operation, e.g. `register`.
        operation: &'static str,
        /// Which registry.
        registry: &'static str,
        /// Why not, and what to do instead.
        #[source]
        source: BoxError,
    },

    /// No healthy endpoint became available in time.
    #[error("no endpoints available for service `{service}`")]
    NoEndpoints {
        /// The service that has none.
        service: String,
        /// How long the caller waited for one.
        #[source]
        source: Elapsed,
    },

    /// There are endpoints, but none became ready in time: each is connecting, or its
    /// connection failed and waits for a retry.
    #[error(
        "no endpoint of service `{service}` is connected after {waited:?} ({total} connecting or failing)"
    )]
    NoReadyEndpoints {
        /// The service.
        service: String,
        /// Its endpoints, none of them ready.
        total: usize,
        /// How long the caller waited for one.
        waited: std::time::Duration,
        /// Why one of them failed to connect, when one did (an endpoint's
        /// [`ReadinessError`](crate::endpoint::ReadinessError), spelt out so that this base
        /// module imports nothing downstream).
        #[source]
        last_error: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
    },

    /// Too few endpoints are usable (the rest are ejected) and the balancer is set to fail
    /// rather than panic.
    #[error("too few healthy endpoints for service `{service}`: {ejected} of {total} ejected")]
    NoHealthyEndpoints {
        /// The service.
        service: String,
        /// Endpoints ejected by outlier detection.
        ejected: usize,
        /// All endpoints.
        total: usize,
    },

    /// A balancer stopped following discovery (its updater task panicked, which is logged),
    /// so its endpoints may be stale: it fails requests rather than serve them.
    #[error("discovery for service `{service}` stopped")]
    DiscoveryStopped {
        /// The service.
        service: String,
    },

    /// An operation on the registry did not finish in time.
    #[error("{registry} registry timed out")]
    Timeout {
        /// Which registry.
        registry: &'static str,
        /// The time limit that passed.
        #[source]
        source: Elapsed,
    },
}

impl Error {
    /// An [`Error::Unsupported`] with a reason.
    pub fn unsupported(
        registry: &'static str,
        operation: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self::Unsupported {
            operation,
            registry,
            source: reason.into().into(),
        }
    }

    /// A short name of the variant, for the registries' error metric.
    #[cfg(any(
        feature = "consul",
        feature = "kubernetes",
        feature = "etcd",
        feature = "dns"
    ))]
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::Status { .. } => "status",
            Self::Malformed { .. } => "malformed",
            Self::Stale { .. } => "stale",
            Self::InvalidConfig { .. } => "invalid_config",
            Self::InvalidInstance { .. } => "invalid_instance",
            Self::UnknownInstance { .. } => "unknown_instance",
            Self::Unsupported { .. } => "unsupported",
            Self::NoEndpoints { .. } => "no_endpoints",
            Self::NoReadyEndpoints { .. } => "no_ready_endpoints",
            Self::NoHealthyEndpoints { .. } => "no_healthy_endpoints",
            Self::DiscoveryStopped { .. } => "discovery_stopped",
            Self::Timeout { .. } => "timeout",
        }
    }

    /// Whether retrying the same operation later may succeed (network errors, timeouts,
    /// rate limiting and server errors).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. }
            | Self::Timeout { .. }
            | Self::Stale { .. }
            | Self::NoEndpoints { .. }
            | Self::NoReadyEndpoints { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// How long the registry asked to be left alone: the `Retry-After` of a rate-limited
    /// answer (an [`Error::Status`] 429 whose source is [`RateLimited`]).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status {
                status: 429,
                source,
                ..
            } => source.downcast_ref::<RateLimited>()?.retry_after,
            _ => None,
        }
    }
}

/// The source of an [`Error::Status`] 429: what the registry said, and how long it asked
/// the client to wait before the next request (its `Retry-After`, when it sent one).
#[derive(Debug, thiserror::Error)]
#[error("rate limited: {message}")]
pub struct RateLimited {
    /// The registry's `Retry-After`, as a duration from when the answer arrived.
    pub retry_after: Option<Duration>,
    /// What the registry said, size-limited.
    pub message: String,
}

/// What is wrong with an instance field; the source of [`Error::InvalidInstance`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidValue {
    /// The value is empty.
    #[error("must not be empty")]
    Empty,
    /// The port is 0.
    #[error("port 0 cannot be dialled")]
    ZeroPort,
    /// The value is outside what the registry takes.
    #[error("{value} is outside {min}..={max}")]
    OutOfRange {
        /// The value given.
        value: u64,
        /// The smallest taken.
        min: u64,
        /// The largest taken.
        max: u64,
    },
    /// The address is neither an IP address nor a DNS host name.
    #[error("`{0}` is neither an IP address nor a valid DNS host name")]
    NotAnAddress(String),
    /// Another instance already uses this id.
    #[error("id `{0}` is used twice")]
    Duplicate(String),
    /// The value contains a character the registry reserves (e.g. `/` in etcd keys).
    #[error("`{value}` contains `{character}`, which this registry reserves")]
    Reserved {
        /// The offending value.
        value: String,
        /// The reserved character.
        character: char,
    },
}

/// A time limit passed; the source of [`Error::NoEndpoints`] and [`Error::Timeout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("gave up after {0:?}")]
pub struct Elapsed(pub Duration);

/// An error and its sources, `outer: inner: root`, for log lines (the `Display` of each
/// error describes its own layer only).
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}
