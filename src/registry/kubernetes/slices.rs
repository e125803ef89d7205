//! From EndpointSlices to instances: conditions, ports, zones, and the union of a service's
//! slices.
//!
//! The rules follow the `discovery.k8s.io/v1` API reference and KEP-1669:
//!
//! - `ready`: nil means ready. `serving`: nil defers to `ready` (so nil is serving whenever
//!   `ready` is nil or true). `terminating`: nil means not terminating.
//! - The set is the ready endpoints; when none is ready, the serving endpoints that are
//!   terminating (KEP-1669: "terminating endpoints are used when no ready endpoint is left");
//!   never a non-serving one.
//! - An endpoint's `addresses` are fungible: the first one is used. The same address in two
//!   slices (a slice being split or migrated) is one instance, with the better condition.
//! - The port is the one named by `port_name` in each slice (slices of one service may list
//!   ports in different orders); without a name, a service must have exactly one port.
//! - `FQDN` slices are skipped: they name hosts, not the pods the balancer should reach.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use tracing::warn;

use crate::instance::{HealthStatus, ServiceInstance};

/// Metadata keys set on instances from an endpoint.
pub(crate) const META_NODE: &str = "node_name";
pub(crate) const META_HOSTNAME: &str = "hostname";
pub(crate) const META_POD: &str = "pod";
pub(crate) const META_FOR_ZONES: &str = "for_zones";

/// The three conditions with the API's nil rules applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conditions {
    pub(crate) ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
}

impl Conditions {
    pub(crate) fn of(endpoint: &Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        Self {
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        }
    }

    /// Ready endpoints rank above serving-and-terminating ones; the rest are never used.
    fn rank(self) -> u8 {
        match self {
            Self { ready: true, .. } => 2,
            Self {
                serving: true,
                terminating: true,
                ..
            } => 1,
            _ => 0,
        }
    }

    /// `Passing` when ready, `Warning` when serving but not ready (terminating: used only
    /// when nothing is ready), `Critical` when not serving.
    pub(crate) fn health(self) -> HealthStatus {
        match (self.ready, self.serving) {
            (true, _) => HealthStatus::Passing,
            (false, true) => HealthStatus::Warning,
            (false, false) => HealthStatus::Critical,
        }
    }
}

/// Why a slice's port cannot be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PortError {
    /// No `port_name` is configured and the service has several ports.
    #[error("service `{service}` has several ports ({choices}); set `port_name` to one of them")]
    Ambiguous { service: String, choices: Names },
}

/// Port names for an error message: `grpc, http, (unnamed)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Names(pub(crate) Vec<String>);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if name.is_empty() {
                f.write_str("(unnamed)")?;
            } else {
                f.write_str(name)?;
            }
        }
        Ok(())
    }
}

/// One usable endpoint of a slice, already mapped to an instance.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceEndpoint {
    pub(crate) instance: ServiceInstance,
    pub(crate) conditions: Conditions,
}

/// The instance id: `namespace/service/authority`, so `health(id)` knows where to look.
pub(crate) fn instance_id(namespace: &str, service: &str, authority: &str) -> String {
    format!("{namespace}/{service}/{authority}")
}

/// Splits an id made by [`instance_id`].
pub(crate) fn parse_id(id: &str) -> Option<(&str, &str, &str)> {
    let mut parts = id.splitn(3, '/');
    let (namespace, service, authority) = (parts.next()?, parts.next()?, parts.next()?);
    (!namespace.is_empty() && !service.is_empty() && !authority.is_empty())
        .then_some((namespace, service, authority))
}

/// Maps one slice of `service` in `namespace` to its endpoints (every condition kept, so the
/// union can rank them). A slice without the wanted port contributes nothing.
pub(crate) fn endpoints_of(
    slice: &EndpointSlice,
    namespace: &str,
    service: &str,
    port_name: Option<&str>,
) -> Result<Vec<SliceEndpoint>, PortError> {
    let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        warn!(
            slice = slice_name,
            address_type = %slice.address_type,
            "skipping EndpointSlice: only IPv4 and IPv6 slices are used"
        );
        return Ok(Vec::new());
    }
    let Some(port) = choose_port(slice, service, port_name)? else {
        return Ok(Vec::new());
    };
    let endpoints = slice.endpoints.iter().filter_map(|endpoint| {
        let address = endpoint.addresses.first()?;
        let mut instance = ServiceInstance::new("", service, address.as_str(), port);
        instance.id = instance_id(namespace, service, &instance.authority());
        instance.zone = zone_of(endpoint, &mut instance.metadata);
        let metadata = &mut instance.metadata;
        if let Some(node) = &endpoint.node_name {
            metadata.insert(META_NODE.into(), node.clone());
        }
        if let Some(hostname) = &endpoint.hostname {
            metadata.insert(META_HOSTNAME.into(), hostname.clone());
        }
        if let Some(pod) = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod"))
            && let Some(name) = &pod.name {
                metadata.insert(META_POD.into(), name.clone());
            }
        if instance.validate().is_err() {
            warn!(slice = slice_name, address = %address, "skipping an endpoint with an invalid address");
            return None;
        }
        Some(SliceEndpoint {
            conditions: Conditions::of(endpoint),
            instance,
        })
    });
    Ok(endpoints.collect())
}

/// The port to use from this slice: the one named `port_name`, else the only one.
fn choose_port(
    slice: &EndpointSlice,
    service: &str,
    port_name: Option<&str>,
) -> Result<Option<u16>, PortError> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let number = |p: &k8s_openapi::api::discovery::v1::EndpointPort| {
        p.port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
    };
    match port_name {
        Some(wanted) => Ok(ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or_default() == wanted)
            .and_then(number)),
        None => match ports {
            [] => Ok(None),
            [only] => Ok(number(only)),
            several => Err(PortError::Ambiguous {
                service: service.to_owned(),
                choices: Names(
                    several
                        .iter()
                        .map(|p| p.name.clone().unwrap_or_default())
                        .collect(),
                ),
            }),
        },
    }
}

/// The endpoint's zone; with topology hints, the zone whose clients it should serve
/// (its own zone when hinted, else the first hinted one), every hinted zone in metadata.
fn zone_of(endpoint: &Endpoint, metadata: &mut BTreeMap<String, String>) -> Option<String> {
    let hinted: Vec<&str> = endpoint
        .hints
        .iter()
        .flat_map(|h| h.for_zones.iter().flatten())
        .map(|z| z.name.as_str())
        .filter(|z| !z.is_empty())
        .collect();
    if hinted.is_empty() {
        return endpoint.zone.clone();
    }
    metadata.insert(META_FOR_ZONES.into(), hinted.join(","));
    match &endpoint.zone {
        Some(own) if hinted.contains(&own.as_str()) => Some(own.clone()),
        _ => Some(hinted[0].to_owned()),
    }
}

/// The union of a service's slices: deduplicated by address (the better condition wins),
/// ready endpoints, or the serving-and-terminating ones when none is ready. Sorted by id.
pub(crate) fn union<'a>(
    slices: impl IntoIterator<Item = &'a [SliceEndpoint]>,
) -> Vec<ServiceInstance> {
    let mut best: BTreeMap<&str, &SliceEndpoint> = BTreeMap::new();
    for endpoint in slices.into_iter().flatten() {
        let entry = best
            .entry(endpoint.instance.id.as_str())
            .or_insert(endpoint);
        if endpoint.conditions.rank() > entry.conditions.rank() {
            *entry = endpoint;
        }
    }
    let top = best
        .values()
        .map(|e| e.conditions.rank())
        .max()
        .unwrap_or(0);
    if top == 0 {
        return Vec::new();
    }
    best.into_values()
        .filter(|e| e.conditions.rank() == top)
        .map(|e| e.instance.clone())
        .collect()
}

/// Endpoint `10.0.0.{host}:80` of service `svc` in namespace `ns`, for tests.
#[cfg(test)]
pub(crate) fn test_endpoint(
    host: u8,
    ready: bool,
    serving: bool,
    terminating: bool,
) -> SliceEndpoint {
    let address = format!("10.0.0.{host}");
    let mut instance = ServiceInstance::new("", "svc", address.as_str(), 80);
    instance.id = instance_id("ns", "svc", &instance.authority());
    SliceEndpoint {
        instance,
        conditions: Conditions {
            ready,
            serving,
            terminating,
        },
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::EndpointConditions;

    use super::*;

    fn endpoint(ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec!["10.0.0.1".into()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Endpoint::default()
        }
    }

    #[test]
    fn nil_conditions_follow_the_api_reference() {
        let all_nil = Conditions::of(&Endpoint::default());
        assert_eq!(
            all_nil,
            Conditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        let c = Conditions::of(&endpoint(Some(false), None, Some(true)));
        assert!(!c.serving, "nil serving defers to ready");
        let c = Conditions::of(&endpoint(None, None, None));
        assert!(c.ready && c.serving && !c.terminating);
        let c = Conditions::of(&endpoint(Some(false), Some(true), Some(true)));
        assert_eq!(c.rank(), 1);
        assert_eq!(c.health(), HealthStatus::Warning);
        let c = Conditions::of(&endpoint(Some(false), Some(false), Some(true)));
        assert_eq!(c.rank(), 0);
        assert_eq!(c.health(), HealthStatus::Critical);
        let c = Conditions::of(&endpoint(Some(false), Some(true), Some(false)));
        assert_eq!(
            c.rank(),
            0,
            "serving but not ready and not terminating: not used"
        );
    }

    #[test]
    fn ids_round_trip() {
        let id = instance_id("prod", "greeter", "[::1]:50051");
        assert_eq!(parse_id(&id), Some(("prod", "greeter", "[::1]:50051")));
        assert_eq!(parse_id("greeter"), None);
        assert_eq!(parse_id("a//b"), None);
    }

    #[test]
    fn port_names_are_listed() {
        let names = Names(vec!["grpc".into(), String::new()]);
        assert_eq!(names.to_string(), "grpc, (unnamed)");
    }

    mod union {
        use proptest::prelude::*;

        use super::*;

        fn endpoint() -> impl Strategy<Value = SliceEndpoint> {
            // A small address pool, so addresses repeat across slices.
            (0u8..6, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(host, ready, serving, terminating)| {
                    test_endpoint(host, ready, serving || ready, terminating)
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn union_is_deduplicated_ranked_and_order_free(
                slices in prop::collection::vec(prop::collection::vec(endpoint(), 0..5), 0..5),
            ) {
                let set = union(slices.iter().map(Vec::as_slice));
                let ids: Vec<&str> = set.iter().map(|i| i.id.as_str()).collect();
                let mut unique = ids.clone();
                unique.dedup();
                prop_assert_eq!(&ids, &unique, "sorted, one instance per address");

                let all = || slices.iter().flatten();
                let best = |id: &str| all().filter(|e| e.instance.id == id).map(|e| e.conditions.rank()).max();
                let any_ready = all().any(|e| e.conditions.ready);
                for instance in &set {
                    let rank = best(&instance.id).unwrap();
                    prop_assert!(rank > 0, "never a non-serving endpoint");
                    prop_assert_eq!(rank == 2, any_ready, "ready ones, else draining ones");
                }
                for endpoint in all() {
                    let wanted = best(&endpoint.instance.id).unwrap() == if any_ready { 2 } else { 1 };
                    prop_assert_eq!(ids.contains(&endpoint.instance.id.as_str()), wanted);
                }

                let mut reversed = slices.clone();
                reversed.reverse();
                prop_assert_eq!(union(reversed.iter().map(Vec::as_slice)), set);
            }
        }
    }
}
