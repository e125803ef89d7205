//! Consul service mesh enrollment: the `Connect` block of a service registration
//! (`api-docs/agent/service.mdx`, "Connect Structure"; `connect/proxies/deploy-sidecar-services.mdx`).

use serde::Serialize;
use serde_json::{Value, json};

/// How a registered instance joins the Consul service mesh; see
/// [`ConsulRegistryBuilder::mesh_registration`](super::ConsulRegistryBuilder::mesh_registration).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MeshRegistration {
    /// The service speaks mTLS itself (Connect-native, e.g. with
    /// [`ConsulConnect`](crate::mesh::ConsulConnect)). Produces
    /// `"Connect": {"Native": true}`.
    Native,
    /// The agent registers a sidecar proxy next to the service. Produces
    /// `"Connect": {"SidecarService": {"Port": …, "Proxy": {"Upstreams": […]}}}`. The
    /// sidecar's ID is `<service ID>-sidecar-proxy` and its name `<name>-sidecar-proxy`;
    /// it inherits the service's tags and metadata, and the agent deregisters it with the
    /// service.
    Sidecar(SidecarService),
}

/// The sidecar proxy of a [`MeshRegistration::Sidecar`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SidecarService {
    /// The port the sidecar listens on for mesh traffic; `None` lets the agent pick one
    /// from its sidecar port range (21000 to 21255 by default).
    pub port: Option<u16>,
    /// The services this one calls through the sidecar.
    pub upstreams: Vec<Upstream>,
}

/// A service the sidecar proxies calls to, on a local port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub struct Upstream {
    /// The service called.
    pub destination_name: String,
    /// The local port the application dials to reach it.
    pub local_bind_port: u16,
    /// Its datacenter, when not the local one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
}

impl SidecarService {
    /// A sidecar on this port (`None`: the agent picks one).
    pub fn new(port: Option<u16>) -> Self {
        Self {
            port,
            upstreams: Vec::new(),
        }
    }

    /// Adds an upstream.
    #[must_use]
    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstreams.push(upstream);
        self
    }
}

impl Upstream {
    /// `destination` reached on `127.0.0.1:local_bind_port`.
    pub fn new(destination: impl Into<String>, local_bind_port: u16) -> Self {
        Self {
            destination_name: destination.into(),
            local_bind_port,
            datacenter: None,
        }
    }

    /// In this datacenter.
    #[must_use]
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = Some(datacenter.into());
        self
    }
}

impl MeshRegistration {
    /// The registration's `Connect` value.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Self::Native => json!({ "Native": true }),
            Self::Sidecar(sidecar) => {
                let mut service = json!({ "Proxy": { "Upstreams": sidecar.upstreams } });
                if let Some(port) = sidecar.port {
                    service["Port"] = json!(port);
                }
                json!({ "SidecarService": service })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_definitions_they_produce() {
        assert_eq!(MeshRegistration::Native.to_json(), json!({"Native": true}));
        let sidecar = SidecarService::new(Some(21000))
            .upstream(Upstream::new("db", 9191))
            .upstream(Upstream::new("cache", 9292).datacenter("dc2"));
        assert_eq!(
            MeshRegistration::Sidecar(sidecar).to_json(),
            json!({"SidecarService": {"Port": 21000, "Proxy": {"Upstreams": [
                {"DestinationName": "db", "LocalBindPort": 9191},
                {"DestinationName": "cache", "LocalBindPort": 9292, "Datacenter": "dc2"},
            ]}}})
        );
        assert_eq!(
            MeshRegistration::Sidecar(SidecarService::new(None)).to_json(),
            json!({"SidecarService": {"Proxy": {"Upstreams": []}}}),
            "no port: the agent assigns one"
        );
    }
}
