//! `KubernetesRegistry` scenarios, run against the in-repo fake API server (real HTTP on
//! 127.0.0.1) and against a real cluster when `KUBECONFIG` is set (`real_cluster`, ignored
//! otherwise). The faults only the fake can stage are in `kubernetes_faults.rs`.
#![cfg(feature = "kubernetes")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::endpoint_slices::{conditions, draining, grpc, ready, slice};
use support::fake_kube::FakeKube;
use support::{authorities, follow, next_item as next, next_set};
use tower_sd::registry::kubernetes::{KubernetesRegistry, KubernetesRegistryBuilder};
use tower_sd::{Error, HealthStatus, ServiceQuery, ServiceRegistry};

// ===== where the slices live =====

enum Cluster {
    Fake(Arc<FakeKube>),
    Real {
        client: kube::Client,
        namespace: String,
    },
}

impl Cluster {
    async fn fake() -> Self {
        support::trace_init();
        Self::Fake(FakeKube::start().await)
    }

    fn namespace(&self) -> &str {
        match self {
            Self::Fake(_) => "default",
            Self::Real { namespace, .. } => namespace,
        }
    }

    fn builder(&self) -> KubernetesRegistryBuilder {
        match self {
            Self::Fake(fake) => fake.registry(),
            Self::Real { client, namespace } => KubernetesRegistry::builder()
                .client(client.clone())
                .namespace(namespace)
                .retry_backoff(Duration::from_millis(10), Duration::from_millis(50)),
        }
    }

    fn registry(&self) -> KubernetesRegistry {
        self.builder().build()
    }

    async fn apply(&self, slice: Value) {
        match self {
            Self::Fake(fake) => fake.apply(slice),
            Self::Real { client, namespace } => {
                use k8s_openapi::api::discovery::v1::EndpointSlice;
                use kube::api::{Api, Patch, PatchParams};
                let name = slice["metadata"]["name"].as_str().unwrap().to_owned();
                let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
                api.patch(
                    &name,
                    &PatchParams::apply("tower-sd-tests").force(),
                    &Patch::Apply(&slice),
                )
                .await
                .expect("apply EndpointSlice");
            }
        }
    }

    async fn delete(&self, name: &str) {
        match self {
            Self::Fake(fake) => fake.delete("default", name),
            Self::Real { client, namespace } => {
                use k8s_openapi::api::discovery::v1::EndpointSlice;
                use kube::api::{Api, DeleteParams};
                let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
                api.delete(name, &DeleteParams::default())
                    .await
                    .expect("delete EndpointSlice");
            }
        }
    }

    /// Applies slice `{service}-{suffix}` of `service`, with the `grpc` port.
    async fn put(&self, service: &str, suffix: &str, endpoints: Vec<Value>) {
        let name = format!("{service}-{suffix}");
        self.apply(slice(&name, service, grpc(), endpoints)).await;
    }

    /// Deletes every slice the scenarios made (a real cluster keeps them otherwise).
    async fn clean_up(&self) {
        if let Self::Real { client, namespace } = self {
            use k8s_openapi::api::discovery::v1::EndpointSlice;
            use kube::api::{Api, DeleteParams, ListParams};
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
            let ours = ListParams::default()
                .labels("endpointslice.kubernetes.io/managed-by=tower-sd-tests");
            api.delete_collection(&DeleteParams::default(), &ours)
                .await
                .expect("delete the test slices");
        }
    }

    /// A service name no earlier run used.
    fn service(&self, base: &str) -> String {
        match self {
            Self::Fake(_) => base.to_owned(),
            Self::Real { .. } => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos();
                format!("{base}-{nanos:x}")
            }
        }
    }
}

// ===== scenarios shared by the fake and a real cluster =====

async fn union_of_slices(cluster: &Cluster) {
    let service = cluster.service("union");
    let registry = cluster.registry();
    cluster
        .put(&service, "a", vec![ready("10.0.0.1"), ready("10.0.0.2")])
        .await;
    cluster.put(&service, "b", vec![ready("10.0.0.3")]).await;
    let query = ServiceQuery::new(&service);
    let found = registry.discover(&query).await.unwrap();
    assert_eq!(
        authorities(&found),
        ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
    );
    let first = &found[0];
    assert_eq!(first.name, service);
    assert_eq!(
        first.id,
        format!("{}/{service}/10.0.0.1:50051", cluster.namespace())
    );

    let mut watch = follow(&registry, query.clone());
    assert_eq!(
        next_set(&mut watch).await.len(),
        3,
        "the first set is the whole list"
    );
    cluster.put(&service, "c", vec![ready("10.0.0.4")]).await;
    assert_eq!(next_set(&mut watch).await.len(), 4);
}

async fn same_address_in_two_slices(cluster: &Cluster) {
    let service = cluster.service("dedup");
    let registry = cluster.registry();
    cluster
        .put(&service, "a", vec![ready("10.0.1.1"), ready("10.0.1.2")])
        .await;
    // Mid-migration, the same pod is in a second slice, not yet ready there.
    cluster
        .put(
            &service,
            "b",
            vec![
                conditions("10.0.1.1", false, false, false),
                ready("10.0.1.3"),
            ],
        )
        .await;
    let mut watch = follow(&registry, ServiceQuery::new(&service));
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.1.1:50051", "10.0.1.2:50051", "10.0.1.3:50051"],
        "one instance per address, the ready copy wins"
    );
}

async fn slice_deleted(cluster: &Cluster) {
    let service = cluster.service("deleted");
    let registry = cluster.registry();
    cluster.put(&service, "a", vec![ready("10.0.2.1")]).await;
    cluster.put(&service, "b", vec![ready("10.0.2.2")]).await;
    let mut watch = follow(&registry, ServiceQuery::new(&service));
    assert_eq!(next_set(&mut watch).await.len(), 2);
    cluster.delete(&format!("{service}-b")).await;
    assert_eq!(next_set(&mut watch).await, ["10.0.2.1:50051"]);
}

async fn endpoints_turn_unready_and_terminating(cluster: &Cluster) {
    let service = cluster.service("conditions");
    let registry = cluster.registry();
    let name = format!("{service}-a");
    let all_ready = vec![ready("10.0.3.1"), ready("10.0.3.2"), ready("10.0.3.3")];
    cluster
        .apply(slice(&name, &service, grpc(), all_ready))
        .await;
    let mut watch = follow(&registry, ServiceQuery::new(&service));
    assert_eq!(next_set(&mut watch).await.len(), 3);
    let changed = vec![
        ready("10.0.3.1"),
        conditions("10.0.3.2", false, false, false),
        draining("10.0.3.3"),
    ];
    cluster.apply(slice(&name, &service, grpc(), changed)).await;
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.3.1:50051"],
        "not ready and terminating endpoints leave while one is ready"
    );
}

async fn terminating_endpoints_are_the_last_resort(cluster: &Cluster) {
    let service = cluster.service("kep1669");
    let registry = cluster.registry();
    let name = format!("{service}-a");
    let none_ready = vec![
        draining("10.0.4.1"),
        draining("10.0.4.2"),
        conditions("10.0.4.3", false, false, true),
        conditions("10.0.4.4", false, false, false),
    ];
    cluster
        .apply(slice(&name, &service, grpc(), none_ready))
        .await;
    let mut watch = follow(&registry, ServiceQuery::new(&service));
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.4.1:50051", "10.0.4.2:50051"],
        "no ready endpoint: the serving, terminating ones; never a non-serving one"
    );
    let one_ready = vec![
        draining("10.0.4.1"),
        draining("10.0.4.2"),
        json!({ "addresses": ["10.0.4.4"] }),
    ];
    cluster
        .apply(slice(&name, &service, grpc(), one_ready))
        .await;
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.4.4:50051"],
        "nil conditions mean ready: the ready endpoint replaces the draining ones"
    );
}

async fn port_chosen_by_name(cluster: &Cluster) {
    let service = cluster.service("ports");
    let http_then_grpc = json!([
        { "name": "http", "port": 8080, "protocol": "TCP" },
        { "name": "grpc", "port": 50051, "protocol": "TCP" },
    ]);
    let grpc_then_http = json!([
        { "name": "grpc", "port": 50052, "protocol": "TCP" },
        { "name": "http", "port": 8080, "protocol": "TCP" },
    ]);
    cluster
        .apply(slice(
            &format!("{service}-a"),
            &service,
            http_then_grpc,
            vec![ready("10.0.5.1")],
        ))
        .await;
    cluster
        .apply(slice(
            &format!("{service}-b"),
            &service,
            grpc_then_http,
            vec![ready("10.0.5.2")],
        ))
        .await;
    let query = ServiceQuery::new(&service);
    let by_name = cluster.builder().port_name("grpc").build();
    assert_eq!(
        authorities(&by_name.discover(&query).await.unwrap()),
        ["10.0.5.1:50051", "10.0.5.2:50052"]
    );
    let mut watch = follow(&by_name, query.clone());
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.5.1:50051", "10.0.5.2:50052"]
    );

    let unnamed = cluster.registry();
    let error = unnamed.discover(&query).await.unwrap_err();
    let Error::InvalidConfig { key, source } = &error else {
        panic!("expected InvalidConfig, got {error:?}");
    };
    assert_eq!(key, "port_name");
    let message = source.to_string();
    assert!(
        message.contains("http, grpc") || message.contains("grpc, http"),
        "{message}"
    );
    let mut watch = follow(&unnamed, query.clone());
    assert!(matches!(
        next(&mut watch).await,
        Err(Error::InvalidConfig { .. })
    ));
}

async fn ipv6_slices_work_and_fqdn_slices_are_skipped(cluster: &Cluster) {
    let service = cluster.service("families");
    let registry = cluster.registry();
    let mut v6 = slice(
        &format!("{service}-v6"),
        &service,
        grpc(),
        vec![ready("fd00::1")],
    );
    v6["addressType"] = json!("IPv6");
    let mut fqdn = slice(
        &format!("{service}-fqdn"),
        &service,
        grpc(),
        vec![ready("db.example.com")],
    );
    fqdn["addressType"] = json!("FQDN");
    cluster.apply(v6).await;
    cluster.apply(fqdn).await;
    cluster.put(&service, "v4", vec![ready("10.0.6.1")]).await;
    let mut watch = follow(&registry, ServiceQuery::new(&service));
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.6.1:50051", "[fd00::1]:50051"]
    );
}

async fn zones_and_metadata(cluster: &Cluster) {
    let service = cluster.service("zones");
    let registry = cluster.registry();
    let endpoints = vec![
        json!({
            "addresses": ["10.0.7.1"],
            "conditions": { "ready": true },
            "zone": "eu-west-1a",
            "nodeName": "node-1",
            "hostname": "greeter-0",
            "targetRef": { "kind": "Pod", "name": "greeter-0", "namespace": cluster.namespace() },
        }),
        json!({
            "addresses": ["10.0.7.2"],
            "conditions": { "ready": true },
            "zone": "eu-west-1b",
            "hints": { "forZones": [{ "name": "eu-west-1c" }] },
        }),
    ];
    cluster
        .apply(slice(&format!("{service}-a"), &service, grpc(), endpoints))
        .await;
    let found = registry
        .discover(&ServiceQuery::new(&service))
        .await
        .unwrap();
    assert_eq!(found[0].zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(found[0].metadata["node_name"], "node-1");
    assert_eq!(found[0].metadata["hostname"], "greeter-0");
    assert_eq!(found[0].metadata["pod"], "greeter-0");
    assert_eq!(
        found[1].zone.as_deref(),
        Some("eu-west-1c"),
        "topology hints say which zone's clients it serves"
    );
    assert_eq!(found[1].metadata["for_zones"], "eu-west-1c");
}

async fn health_reports_conditions(cluster: &Cluster) {
    let service = cluster.service("health");
    let registry = cluster.registry();
    let endpoints = vec![
        ready("10.0.8.1"),
        draining("10.0.8.2"),
        conditions("10.0.8.3", false, false, false),
    ];
    cluster
        .apply(slice(&format!("{service}-a"), &service, grpc(), endpoints))
        .await;
    let ns = cluster.namespace();
    let health = |ip: &str| {
        let id = format!("{ns}/{service}/{ip}:50051");
        let registry = registry.clone();
        async move { registry.health(&id).await.unwrap() }
    };
    assert_eq!(health("10.0.8.1").await, HealthStatus::Passing);
    assert_eq!(health("10.0.8.2").await, HealthStatus::Warning);
    assert_eq!(health("10.0.8.3").await, HealthStatus::Critical);
    assert_eq!(health("10.0.8.9").await, HealthStatus::Unknown);
    assert_eq!(
        registry.health("not-an-id").await.unwrap(),
        HealthStatus::Unknown
    );
}

async fn label_selector_filters(cluster: &Cluster) {
    let service = cluster.service("labels");
    let mut backend = slice(
        &format!("{service}-a"),
        &service,
        grpc(),
        vec![ready("10.0.9.1")],
    );
    backend["metadata"]["labels"]["tier"] = json!("backend");
    cluster.apply(backend).await;
    cluster.put(&service, "b", vec![ready("10.0.9.2")]).await;
    let registry = cluster.builder().label_selector("tier=backend").build();
    let query = ServiceQuery::new(&service);
    assert_eq!(
        authorities(&registry.discover(&query).await.unwrap()),
        ["10.0.9.1:50051"]
    );
    let mut watch = follow(&registry, query.clone());
    assert_eq!(next_set(&mut watch).await, ["10.0.9.1:50051"]);
}

// ===== against the fake =====

macro_rules! on_the_fake {
    ($($scenario:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $scenario() {
            let _limit = crate::support::time_limit(60);
            super::$scenario(&Cluster::fake().await).await;
        }
    )*};
}

mod fake {
    use super::Cluster;

    on_the_fake!(
        union_of_slices,
        same_address_in_two_slices,
        slice_deleted,
        endpoints_turn_unready_and_terminating,
        terminating_endpoints_are_the_last_resort,
        port_chosen_by_name,
        ipv6_slices_work_and_fqdn_slices_are_skipped,
        zones_and_metadata,
        health_reports_conditions,
        label_selector_filters,
    );
}

/// The fake behind a `Cluster`, for the fault tests.
// ===== against a real cluster =====

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --features kubernetes --test kubernetes -- --ignored (namespace: TOWER_SD_TEST_NAMESPACE, default `default`; needs create, patch, delete, list and watch on endpointslices)"]
async fn real_cluster() {
    let _limit = support::time_limit(60);
    support::trace_init();
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "set KUBECONFIG to run the scenarios against a real cluster"
    );
    let cluster = Cluster::Real {
        client: kube::Client::try_default()
            .await
            .expect("a client from KUBECONFIG"),
        namespace: std::env::var("TOWER_SD_TEST_NAMESPACE").unwrap_or_else(|_| "default".into()),
    };
    union_of_slices(&cluster).await;
    same_address_in_two_slices(&cluster).await;
    slice_deleted(&cluster).await;
    endpoints_turn_unready_and_terminating(&cluster).await;
    terminating_endpoints_are_the_last_resort(&cluster).await;
    port_chosen_by_name(&cluster).await;
    ipv6_slices_work_and_fqdn_slices_are_skipped(&cluster).await;
    zones_and_metadata(&cluster).await;
    health_reports_conditions(&cluster).await;
    label_selector_filters(&cluster).await;
    cluster.clean_up().await;
}
