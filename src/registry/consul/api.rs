//! Consul's HTTP API shapes, and their mapping to [`ServiceInstance`].
//!
//! Field names follow Consul's documentation (`website/content/api-docs/health.mdx`,
//! `agent/service.mdx`). Consul answers `null` for empty maps and lists, and spells the keys of
//! `TaggedAddresses` entries both `Address`/`Port` and `address`/`port`: both are accepted.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::instance::ServiceInstance;

/// One entry of `GET /v1/health/service/:service`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HealthEntry {
    pub(crate) node: Node,
    pub(crate) service: AgentService,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) checks: Vec<Check>,
}

/// The answer of `GET /v1/query/:name/execute`: the healthy nodes of the datacenter that
/// answered, which one, and how many it failed over to get there.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct PreparedAnswer {
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) nodes: Vec<HealthEntry>,
    #[serde(default)]
    pub(crate) datacenter: String,
    #[serde(default)]
    pub(crate) failovers: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Node {
    /// The node's name.
    #[serde(default)]
    pub(crate) node: String,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) datacenter: String,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) meta: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct AgentService {
    #[serde(rename = "ID")]
    pub(crate) id: String,
    pub(crate) service: String,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) tags: Vec<String>,
    #[serde(default)]
    pub(crate) address: String,
    pub(crate) port: u16,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) meta: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) weights: Option<Weights>,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) tagged_addresses: HashMap<String, TaggedAddress>,
    /// A sidecar proxy's destination (`/v1/health/connect` answers with proxies).
    #[serde(default)]
    pub(crate) proxy: Option<Proxy>,
    /// Consul Enterprise's; empty (the default namespace) otherwise.
    #[serde(default)]
    pub(crate) namespace: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Proxy {
    #[serde(default)]
    pub(crate) destination_service_name: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Weights {
    pub(crate) passing: u32,
    pub(crate) warning: u32,
}

#[derive(Debug, Deserialize)]
pub(crate) struct TaggedAddress {
    #[serde(alias = "Address")]
    pub(crate) address: String,
    #[serde(alias = "Port")]
    pub(crate) port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Check {
    pub(crate) status: String,
}

/// `null` (or absence) as the type's default.
fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// How to read instances out of health entries.
#[derive(Clone, Debug)]
pub(crate) struct Mapping {
    /// Metadata key (service meta first, then node meta) holding the zone.
    pub(crate) zone_key: String,
    /// A `TaggedAddresses` key to dial instead of the service address, when present.
    pub(crate) tagged_address: Option<String>,
    /// Mesh discovery: each instance says its datacenter and namespace, which its server's
    /// identity must name (`consul-datacenter`, `consul-namespace`).
    pub(crate) mesh: bool,
}

/// The metadata key of a mesh instance's datacenter (Consul reserves the `consul-` prefix,
/// so no registration carries it).
pub const META_DATACENTER: &str = "consul-datacenter";
/// The metadata key of a mesh instance's namespace (`default` outside Consul Enterprise).
pub const META_NAMESPACE: &str = "consul-namespace";

impl HealthEntry {
    /// The worst check status: `critical` (including maintenance), `warning` or `passing`.
    fn worst(&self) -> &str {
        let mut worst = "passing";
        for check in &self.checks {
            match check.status.as_str() {
                "critical" | "maintenance" => return "critical",
                "warning" => worst = "warning",
                _ => {}
            }
        }
        worst
    }

    /// The instance, unless a check is critical. Warning instances keep serving, at their
    /// `Weights.Warning` weight.
    pub(crate) fn into_instance(self, mapping: &Mapping) -> Option<ServiceInstance> {
        let worst = self.worst();
        if worst == "critical" {
            return None;
        }
        let weights = self.service.weights.unwrap_or(Weights {
            passing: 1,
            warning: 1,
        });
        let weight = if worst == "warning" {
            weights.warning
        } else {
            weights.passing
        };
        let (mut address, mut port) = (self.service.address, self.service.port);
        if address.is_empty() {
            // Consul leaves Service.Address empty when the service uses its node's address.
            address = self.node.address;
        }
        if let Some(tagged) = mapping
            .tagged_address
            .as_ref()
            .and_then(|key| self.service.tagged_addresses.get(key))
        {
            address.clone_from(&tagged.address);
            port = tagged.port;
        }
        let zone = self
            .service
            .meta
            .get(&mapping.zone_key)
            .or_else(|| self.node.meta.get(&mapping.zone_key))
            .cloned();
        let mut metadata = self.service.meta;
        if mapping.mesh && !self.node.datacenter.is_empty() {
            let namespace = match self.service.namespace.as_str() {
                "" => "default".to_owned(),
                namespace => namespace.to_owned(),
            };
            metadata.insert(META_DATACENTER.to_owned(), self.node.datacenter);
            metadata.insert(META_NAMESPACE.to_owned(), namespace);
        }
        Some(ServiceInstance {
            // Service IDs are unique per agent only (the default ID is the service name, so
            // `web` on every node is the usual case): qualify them by node.
            id: format!("{}/{}", self.node.node, self.service.id),
            // A sidecar proxy stands for its destination service.
            name: match self.service.proxy {
                Some(proxy) if !proxy.destination_service_name.is_empty() => {
                    proxy.destination_service_name
                }
                _ => self.service.service,
            },
            address,
            port,
            tags: self.service.tags,
            metadata,
            weight: weight.max(1),
            zone,
            priority: 0,
        })
    }
}

/// The body of `PUT /v1/agent/service/register`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Registration<'a> {
    #[serde(rename = "ID")]
    pub(crate) id: &'a str,
    pub(crate) name: &'a str,
    pub(crate) tags: &'a [String],
    pub(crate) address: &'a str,
    pub(crate) port: u16,
    pub(crate) meta: &'a BTreeMap<String, String>,
    pub(crate) weights: Weights,
    pub(crate) check: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) connect: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response as a real agent returns it: empty `Service.Address`, `Meta: null`,
    /// lowercase tagged-address keys, a warning check.
    const RECORDED: &str = r#"[{
        "Node": {"ID": "40e4a748", "Node": "node-1", "Address": "10.1.10.12", "Datacenter": "dc1",
                 "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"}, "Meta": {"zone": "a"},
                 "CreateIndex": 13, "ModifyIndex": 14},
        "Service": {"ID": "redis-1", "Service": "redis", "Tags": ["primary"], "Address": "", "Port": 8000,
                    "Meta": null, "Weights": {"Passing": 10, "Warning": 1},
                    "TaggedAddresses": {"lan_ipv4": {"address": "10.1.10.12", "port": 8000},
                                        "wan": {"Address": "198.18.1.1", "Port": 80}},
                    "Namespace": "default", "CreateIndex": 15, "ModifyIndex": 15},
        "Checks": [{"Node": "node-1", "CheckID": "serfHealth", "Status": "passing"},
                   {"Node": "node-1", "CheckID": "service:redis-1", "Status": "warning", "ServiceID": "redis-1"}]
    }]"#;

    #[test]
    fn maps_a_recorded_response() {
        let entries: Vec<HealthEntry> = serde_json::from_str(RECORDED).unwrap();
        let mapping = Mapping {
            zone_key: "zone".into(),
            tagged_address: None,
            mesh: false,
        };
        let instance = entries
            .into_iter()
            .next()
            .unwrap()
            .into_instance(&mapping)
            .unwrap();
        assert_eq!(instance.id, "node-1/redis-1", "qualified by node");
        assert_eq!(instance.address, "10.1.10.12", "falls back to Node.Address");
        assert_eq!(instance.port, 8000);
        assert_eq!(instance.weight, 1, "a warning check uses Weights.Warning");
        assert_eq!(instance.zone.as_deref(), Some("a"), "from node meta");
        assert!(instance.metadata.is_empty(), "Meta: null");

        let entries: Vec<HealthEntry> = serde_json::from_str(RECORDED).unwrap();
        let wan = Mapping {
            zone_key: "zone".into(),
            tagged_address: Some("wan".into()),
            mesh: false,
        };
        let instance = entries
            .into_iter()
            .next()
            .unwrap()
            .into_instance(&wan)
            .unwrap();
        assert_eq!(
            (instance.address.as_str(), instance.port),
            ("198.18.1.1", 80)
        );

        // Mesh discovery: the instance says where it is, for its server's identity check.
        let entries: Vec<HealthEntry> =
            serde_json::from_str(&RECORDED.replace("\"dc1\"", "\"dc2\"")).unwrap();
        let mesh = Mapping {
            zone_key: "zone".into(),
            tagged_address: None,
            mesh: true,
        };
        let instance = entries
            .into_iter()
            .next()
            .unwrap()
            .into_instance(&mesh)
            .unwrap();
        assert_eq!(instance.metadata[META_DATACENTER], "dc2");
        assert_eq!(instance.metadata[META_NAMESPACE], "default");
    }

    #[test]
    fn critical_or_maintenance_checks_drop_the_instance() {
        let critical = RECORDED.replace(r#""Status": "warning""#, r#""Status": "critical""#);
        let entries: Vec<HealthEntry> = serde_json::from_str(&critical).unwrap();
        let mapping = Mapping {
            zone_key: "zone".into(),
            tagged_address: None,
            mesh: false,
        };
        assert!(
            entries
                .into_iter()
                .next()
                .unwrap()
                .into_instance(&mapping)
                .is_none()
        );
    }
}
