//! EndpointSlice objects (`discovery.k8s.io/v1`) as JSON, for the fake API server and a real
//! one alike. Slices carry `endpointslice.kubernetes.io/managed-by: tower-sd-tests`, so a
//! real cluster's controller leaves them alone and the tests can find theirs.

use serde_json::{Value, json};

/// A slice of `service` named `name`, IPv4.
pub fn slice(name: &str, service: &str, ports: Value, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "tower-sd-tests",
            },
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// One port, `grpc` 50051.
pub fn grpc() -> Value {
    json!([{ "name": "grpc", "port": 50051, "protocol": "TCP" }])
}

/// An endpoint with these conditions.
pub fn conditions(address: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [address],
        "conditions": { "ready": ready, "serving": serving, "terminating": terminating },
    })
}

/// A ready endpoint.
pub fn ready(address: &str) -> Value {
    conditions(address, true, true, false)
}

/// Terminating, still serving: used only when nothing is ready.
pub fn draining(address: &str) -> Value {
    conditions(address, false, true, true)
}
