//! The registry's vocabulary: [`ServiceInstance`], [`HealthStatus`] and [`ServiceQuery`].
//!
//! These types depend on nothing else in the crate, so every backend, the balancer and the
//! integrations can share them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidValue};

/// One addressable instance of a service, as a registry knows it.
///
/// `address` is an IP address (v4 or v6, without brackets) or a DNS host name. `weight`
/// scales the share of traffic the balancer gives the instance (Consul `Weights`), `zone`
/// feeds zone preference (Kubernetes EndpointSlice `zone`, Consul metadata), and `priority`
/// puts it in a tier (0, the default, is the most preferred; DNS SRV priorities, a Consul
/// datacenter's place in the failover order): the balancer sends traffic to the best tier
/// while enough of it is usable (see [`balance`](crate::balance#priority-tiers)).
///
/// # Examples
///
/// ```
/// use tower_sd::ServiceInstance;
///
/// let instance = ServiceInstance::new("greeter-1", "greeter", "10.0.0.7", 50051)
///     .with_tag("v2")
///     .with_metadata("version", "2.1.0")
///     .with_weight(3)
///     .with_zone("eu-west-1a");
/// assert!(instance.validate().is_ok());
/// assert_eq!(instance.authority(), "10.0.0.7:50051");
///
/// let v6 = ServiceInstance::new("greeter-2", "greeter", "::1", 50051);
/// assert_eq!(v6.authority(), "[::1]:50051");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceInstance {
    /// Unique id of the instance within its registry.
    pub id: String,
    /// Logical service name, e.g. `greeter`.
    pub name: String,
    /// IP address (no brackets for IPv6) or DNS host name.
    pub address: String,
    /// TCP port; never 0 in a valid instance.
    pub port: u16,
    /// Free-form tags; a [`ServiceQuery`] can require some of them.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form key/value metadata; a [`ServiceQuery`] can require equal values.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Relative weight for balancing; 1 unless the registry says otherwise.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Locality zone, when the registry knows it.
    #[serde(default)]
    pub zone: Option<String>,
    /// Priority tier: lower is preferred; 0 unless the registry says otherwise.
    #[serde(default)]
    pub priority: u16,
}

fn default_weight() -> u32 {
    1
}

// ===== impl ServiceInstance =====

impl ServiceInstance {
    /// Creates an instance with no tags, no metadata, weight 1 and no zone.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            weight: default_weight(),
            zone: None,
            priority: 0,
        }
    }

    /// Adds a tag.
    #[must_use]
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Sets one metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the balancing weight.
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the locality zone.
    #[must_use]
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the priority tier (lower is preferred).
    #[must_use]
    pub fn with_priority(mut self, priority: u16) -> Self {
        self.priority = priority;
        self
    }

    /// Checks that the instance can be registered and dialled.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInstance`] naming the field when the id or name is empty, the port is
    /// 0, or the address is neither an IP address nor a valid DNS host name.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field, source| Err(Error::InvalidInstance { field, source });
        if self.id.trim().is_empty() {
            return invalid("id", InvalidValue::Empty);
        }
        if self.name.trim().is_empty() {
            return invalid("name", InvalidValue::Empty);
        }
        if self.port == 0 {
            return invalid("port", InvalidValue::ZeroPort);
        }
        if self.address.is_empty() {
            return invalid("address", InvalidValue::Empty);
        }
        if self.address.parse::<IpAddr>().is_err() && !is_dns_name(&self.address) {
            return invalid("address", InvalidValue::NotAnAddress(self.address.clone()));
        }
        Ok(())
    }

    /// The `host:port` authority to dial, with IPv6 addresses in brackets.
    pub fn authority(&self) -> String {
        match self.address.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.address, self.port),
        }
    }

    /// The socket address, when `address` is an IP address rather than a host name.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip = self.address.parse::<IpAddr>().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    /// Whether the fields that decide where and how traffic goes differ from `other`'s:
    /// address, port, weight, zone, priority or metadata. Tags alone do not count.
    pub fn endpoint_differs(&self, other: &Self) -> bool {
        self.address != other.address
            || self.port != other.port
            || self.weight != other.weight
            || self.zone != other.zone
            || self.priority != other.priority
            || self.metadata != other.metadata
    }
}

/// RFC 1123 host name: dot-separated labels of 1-63 letters, digits and hyphens, not starting
/// or ending with a hyphen, at most 253 characters, optionally ending in a dot; the last label
/// is not all digits (so `999.1.1.1` is neither an IP address nor a name).
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    name.split('.').all(label_ok)
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
}

/// The health of one instance, in Consul's terms.
///
/// Only [`Passing`](HealthStatus::Passing) and [`Warning`](HealthStatus::Warning) instances
/// receive traffic (see [`is_serving`](HealthStatus::is_serving)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// All checks pass.
    Passing,
    /// A check warns; the instance still serves (Consul `Weights.Warning`).
    Warning,
    /// A check fails; the instance gets no traffic.
    Critical,
    /// An operator put the instance in maintenance; it gets no traffic.
    Maintenance,
    /// The registry does not know the instance.
    Unknown,
}

impl HealthStatus {
    /// Whether an instance in this state belongs in the healthy set.
    pub fn is_serving(self) -> bool {
        matches!(self, Self::Passing | Self::Warning)
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
            Self::Maintenance => "maintenance",
            Self::Unknown => "unknown",
        })
    }
}

/// What to discover: a service name plus optional filters that must all match.
///
/// Backends push filters to the server where it supports them and apply the rest on the
/// client, so every backend honours every filter.
///
/// # Examples
///
/// ```
/// use tower_sd::{ServiceInstance, ServiceQuery};
///
/// let query = ServiceQuery::new("greeter").with_tag("v2").with_metadata("canary", "false");
/// let instance = ServiceInstance::new("g-1", "greeter", "10.0.0.7", 50051)
///     .with_tag("v2")
///     .with_metadata("canary", "false");
/// assert!(query.matches(&instance));
///
/// // The common case converts from the name alone.
/// let query: ServiceQuery = "greeter".into();
/// assert!(query.matches(&instance));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceQuery {
    /// Service name.
    pub name: String,
    /// Tags that every instance must carry.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Datacenter to ask (Consul `dc`); `None` means the registry's own.
    #[serde(default)]
    pub datacenter: Option<String>,
    /// Namespace to ask (Consul `ns`, Kubernetes namespace); `None` means the registry's own.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Metadata entries every instance must carry with equal values.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Datacenters to follow besides `datacenter`, each a lower
    /// [priority tier](crate::balance#priority-tiers) (Consul; other registries have one
    /// datacenter and ignore it, as they ignore `datacenter`).
    #[serde(default)]
    pub failover: Failover,
}

/// The datacenters a [`ServiceQuery`] follows after its first (`datacenter`, or the
/// registry's own), in order of preference: the instances of the n-th get priority n.
///
/// ```
/// use tower_sd::{Failover, ServiceQuery};
///
/// let listed = ServiceQuery::new("web").with_failover(["dc2", "dc3"]);
/// assert_eq!(listed.failover, Failover::Datacenters(vec!["dc2".into(), "dc3".into()]));
/// let nearest = ServiceQuery::new("web").with_nearest_datacenters(2);
/// assert_eq!(nearest.failover, Failover::Nearest(2));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Failover {
    /// One datacenter.
    #[default]
    None,
    /// These datacenters, in this order.
    Datacenters(Vec<String>),
    /// The local datacenter, then the `n` nearest others, by the registry's estimate of
    /// round-trip time (Consul's `/v1/catalog/datacenters` order), re-read as it changes.
    Nearest(usize),
}

// ===== impl ServiceQuery =====

impl ServiceQuery {
    /// A query for every healthy instance of `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Requires a tag.
    #[must_use]
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Asks a datacenter other than the registry's own.
    #[must_use]
    pub fn with_datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = Some(datacenter.into());
        self
    }

    /// Asks a namespace other than the registry's own.
    #[must_use]
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Requires a metadata entry with an equal value.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Follows these datacenters too, in order, after the first (see [`Failover`]).
    #[must_use]
    pub fn with_failover<D: Into<String>>(
        mut self,
        datacenters: impl IntoIterator<Item = D>,
    ) -> Self {
        self.failover = Failover::Datacenters(datacenters.into_iter().map(Into::into).collect());
        self
    }

    /// Follows the local datacenter and the `n` nearest others (see [`Failover::Nearest`]).
    #[must_use]
    pub fn with_nearest_datacenters(mut self, n: usize) -> Self {
        self.failover = Failover::Nearest(n);
        self
    }

    /// Whether `instance` has this query's name, all its tags and all its metadata entries.
    ///
    /// Datacenter and namespace are properties of where an instance is registered, not of the
    /// instance, so each registry checks them itself.
    pub fn matches(&self, instance: &ServiceInstance) -> bool {
        instance.name == self.name
            && self.tags.iter().all(|tag| instance.tags.contains(tag))
            && self
                .metadata
                .iter()
                .all(|(key, value)| instance.metadata.get(key) == Some(value))
    }
}

impl From<&str> for ServiceQuery {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for ServiceQuery {
    fn from(name: String) -> Self {
        Self::new(name)
    }
}

impl fmt::Display for ServiceQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        for tag in &self.tags {
            write!(f, " tag={tag}")?;
        }
        for (key, value) in &self.metadata {
            write!(f, " meta.{key}={value}")?;
        }
        if let Some(dc) = &self.datacenter {
            write!(f, " dc={dc}")?;
        }
        if let Some(ns) = &self.namespace {
            write!(f, " ns={ns}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(instance: &ServiceInstance) -> Option<&'static str> {
        match instance.validate() {
            Ok(()) => None,
            Err(Error::InvalidInstance { field, .. }) => Some(field),
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = ServiceInstance::new("a", "svc", "127.0.0.1", 80);
        assert_eq!(field_of(&ok), None);
        assert_eq!(
            field_of(&ServiceInstance {
                id: " ".into(),
                ..ok.clone()
            }),
            Some("id")
        );
        assert_eq!(
            field_of(&ServiceInstance {
                name: "".into(),
                ..ok.clone()
            }),
            Some("name")
        );
        assert_eq!(
            field_of(&ServiceInstance {
                port: 0,
                ..ok.clone()
            }),
            Some("port")
        );
        for bad in [
            "",
            "-a.com",
            "a-.com",
            "a..b",
            "999.1.1.1",
            "[::1]",
            "a b",
            "a_b.com",
        ] {
            let instance = ServiceInstance {
                address: bad.into(),
                ..ok.clone()
            };
            assert_eq!(field_of(&instance), Some("address"), "{bad:?}");
        }
        let long_label = "a".repeat(64);
        let instance = ServiceInstance {
            address: long_label,
            ..ok.clone()
        };
        assert_eq!(field_of(&instance), Some("address"));
        for good in [
            "::1",
            "fe80::1",
            "10.0.0.1",
            "localhost",
            "api.example.com.",
            "a-1.b2",
        ] {
            let instance = ServiceInstance {
                address: good.into(),
                ..ok.clone()
            };
            assert_eq!(field_of(&instance), None, "{good:?}");
        }
    }

    #[test]
    fn error_message_names_field_and_value() {
        let instance = ServiceInstance::new("a", "svc", "not an address", 80);
        let err = instance.validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid instance: field `address`");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("not an address"), "{source}");
    }

    #[test]
    fn authority_brackets_ipv6_only() {
        assert_eq!(
            ServiceInstance::new("a", "s", "::1", 1).authority(),
            "[::1]:1"
        );
        assert_eq!(
            ServiceInstance::new("a", "s", "host", 1).authority(),
            "host:1"
        );
        assert_eq!(
            ServiceInstance::new("a", "s", "::1", 8).socket_addr(),
            Some("[::1]:8".parse().unwrap())
        );
        assert_eq!(
            ServiceInstance::new("a", "s", "host", 8).socket_addr(),
            None
        );
    }

    #[test]
    fn query_requires_every_filter() {
        let instance = ServiceInstance::new("a", "svc", "127.0.0.1", 80)
            .with_tag("x")
            .with_metadata("k", "v");
        assert!(ServiceQuery::new("svc").matches(&instance));
        assert!(!ServiceQuery::new("other").matches(&instance));
        assert!(!ServiceQuery::new("svc").with_tag("y").matches(&instance));
        assert!(
            !ServiceQuery::new("svc")
                .with_metadata("k", "w")
                .matches(&instance)
        );
        assert!(
            !ServiceQuery::new("svc")
                .with_metadata("j", "v")
                .matches(&instance)
        );
    }

    #[test]
    fn endpoint_differs_ignores_tags() {
        let a = ServiceInstance::new("a", "svc", "127.0.0.1", 80);
        assert!(!a.endpoint_differs(&a.clone().with_tag("t")));
        assert!(a.endpoint_differs(&a.clone().with_weight(2)));
        assert!(a.endpoint_differs(&a.clone().with_zone("z")));
        assert!(a.endpoint_differs(&a.clone().with_priority(1)));
        assert!(a.endpoint_differs(&a.clone().with_metadata("k", "v")));
        assert!(a.endpoint_differs(&ServiceInstance {
            port: 81,
            ..a.clone()
        }));
    }
}
