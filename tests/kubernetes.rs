//! `KubernetesRegistry` against the in-repo fake API server (real HTTP on 127.0.0.1), and the
//! same scenarios against a real cluster when `KUBECONFIG` is set (`real_cluster`, ignored
//! otherwise). The faults (410 mid-watch, 403, closed streams, bookmarks) need the fake.
#![cfg(feature = "kubernetes")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::fake_kube::FakeKube;
use support::{Watch, follow};
use tower_sd::registry::kubernetes::{KubernetesBuilder, KubernetesRegistry};
use tower_sd::{Error, HealthStatus, ServiceInstance, ServiceQuery, ServiceRegistry};

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

    fn builder(&self) -> KubernetesBuilder {
        let client = match self {
            Self::Fake(fake) => fake.client(),
            Self::Real { client, .. } => client.clone(),
        };
        KubernetesRegistry::builder()
            .client(client)
            .namespace(self.namespace())
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
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

// ===== slices =====

fn slice(name: &str, service: &str, ports: Value, endpoints: Vec<Value>) -> Value {
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

fn grpc() -> Value {
    json!([{ "name": "grpc", "port": 50051, "protocol": "TCP" }])
}

fn conditions(address: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [address],
        "conditions": { "ready": ready, "serving": serving, "terminating": terminating },
    })
}

fn ready(address: &str) -> Value {
    conditions(address, true, true, false)
}

/// Terminating, still serving: used only when nothing is ready.
fn draining(address: &str) -> Value {
    conditions(address, false, true, true)
}

fn authorities(set: &[ServiceInstance]) -> Vec<String> {
    let mut all: Vec<String> = set.iter().map(ServiceInstance::authority).collect();
    all.sort();
    all
}

async fn next(watch: &mut Watch) -> tower_sd::Result<Vec<ServiceInstance>> {
    support::next_item(watch).await
}

/// The next set, failing on an error.
async fn next_set(watch: &mut Watch) -> Vec<String> {
    authorities(&next(watch).await.expect("a set, not an error"))
}

// ===== scenarios shared by the fake and a real cluster =====

async fn union_of_slices(cluster: &Cluster) {
    let service = cluster.service("union");
    let registry = cluster.registry();
    cluster
        .apply(slice(
            &format!("{service}-a"),
            &service,
            grpc(),
            vec![ready("10.0.0.1"), ready("10.0.0.2")],
        ))
        .await;
    cluster
        .apply(slice(
            &format!("{service}-b"),
            &service,
            grpc(),
            vec![ready("10.0.0.3")],
        ))
        .await;
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
    cluster
        .apply(slice(
            &format!("{service}-c"),
            &service,
            grpc(),
            vec![ready("10.0.0.4")],
        ))
        .await;
    assert_eq!(next_set(&mut watch).await.len(), 4);
}

async fn same_address_in_two_slices(cluster: &Cluster) {
    let service = cluster.service("dedup");
    let registry = cluster.registry();
    cluster
        .apply(slice(
            &format!("{service}-a"),
            &service,
            grpc(),
            vec![ready("10.0.1.1"), ready("10.0.1.2")],
        ))
        .await;
    // Mid-migration, the same pod is in a second slice, not yet ready there.
    cluster
        .apply(slice(
            &format!("{service}-b"),
            &service,
            grpc(),
            vec![
                conditions("10.0.1.1", false, false, false),
                ready("10.0.1.3"),
            ],
        ))
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
    cluster
        .apply(slice(
            &format!("{service}-a"),
            &service,
            grpc(),
            vec![ready("10.0.2.1")],
        ))
        .await;
    cluster
        .apply(slice(
            &format!("{service}-b"),
            &service,
            grpc(),
            vec![ready("10.0.2.2")],
        ))
        .await;
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
    assert_eq!(key, "registry.kubernetes.port_name");
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
    cluster
        .apply(slice(
            &format!("{service}-v4"),
            &service,
            grpc(),
            vec![ready("10.0.6.1")],
        ))
        .await;
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
    cluster
        .apply(slice(
            &format!("{service}-b"),
            &service,
            grpc(),
            vec![ready("10.0.9.2")],
        ))
        .await;
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
async fn fake() -> (Arc<FakeKube>, KubernetesRegistry) {
    let Cluster::Fake(fake) = Cluster::fake().await else {
        unreachable!()
    };
    let registry = Cluster::Fake(Arc::clone(&fake)).registry();
    (fake, registry)
}

#[tokio::test]
async fn a_410_mid_watch_relists_and_the_set_stays_whole() {
    let (fake, registry) = fake().await;
    fake.apply(slice("a", "relist", grpc(), vec![ready("10.1.0.1")]));
    fake.apply(slice("b", "relist", grpc(), vec![ready("10.1.0.2")]));
    let mut watch = follow(&registry, ServiceQuery::new("relist"));
    assert_eq!(next_set(&mut watch).await.len(), 2);

    // History is compacted under the live watch; the change below is only visible
    // through a new list.
    fake.watching(1).await;
    fake.expire_watches();
    fake.apply(slice("c", "relist", grpc(), vec![ready("10.1.0.3")]));
    loop {
        match next(&mut watch).await {
            Ok(set) => {
                assert_eq!(
                    authorities(&set),
                    ["10.1.0.1:50051", "10.1.0.2:50051", "10.1.0.3:50051"],
                    "after the relist, the whole set, never a part of it"
                );
                break;
            }
            Err(Error::Status { status: 410, .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(fake.lists(), 2, "one list, and one relist after the 410");
}

#[tokio::test]
async fn a_403_is_yielded_and_the_watch_goes_on() {
    let (fake, registry) = fake().await;
    fake.apply(slice("a", "rbac", grpc(), vec![ready("10.2.0.1")]));
    fake.forbid(true);
    let query = ServiceQuery::new("rbac");
    let error = registry.discover(&query).await.unwrap_err();
    assert!(
        matches!(error, Error::Status { status: 403, .. }),
        "{error:?}"
    );
    assert!(!error.is_transient());
    let mut watch = follow(&registry, query.clone());
    for _ in 0..2 {
        let error = next(&mut watch).await.unwrap_err();
        assert!(
            matches!(error, Error::Status { status: 403, .. }),
            "{error:?}"
        );
    }
    fake.forbid(false);
    let set = loop {
        if let Ok(set) = next(&mut watch).await {
            break set;
        }
    };
    assert_eq!(authorities(&set), ["10.2.0.1:50051"]);
}

#[tokio::test]
async fn a_closed_watch_resumes_from_its_version_without_a_relist() {
    let (fake, registry) = fake().await;
    fake.apply(slice("a", "resume", grpc(), vec![ready("10.3.0.1")]));
    let mut watch = follow(&registry, ServiceQuery::new("resume"));
    assert_eq!(next_set(&mut watch).await.len(), 1);
    fake.watching(1).await;
    fake.close_watches();
    fake.apply(slice(
        "a",
        "resume",
        grpc(),
        vec![ready("10.3.0.1"), ready("10.3.0.2")],
    ));
    assert_eq!(next_set(&mut watch).await.len(), 2);
    assert_eq!(fake.lists(), 1);
    let watches = fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("watch"))
        .count();
    assert!(watches >= 2, "{:?}", fake.requests());
}

#[tokio::test]
async fn bookmarks_and_unrelated_changes_emit_nothing() {
    let (fake, registry) = fake().await;
    fake.apply(slice("a", "quiet", grpc(), vec![ready("10.4.0.1")]));
    let mut watch = follow(&registry, ServiceQuery::new("quiet"));
    assert_eq!(next_set(&mut watch).await.len(), 1);
    fake.watching(1).await;
    fake.bookmark();
    // A slice update that changes nothing the balancer sees.
    let mut relabelled = slice("a", "quiet", grpc(), vec![ready("10.4.0.1")]);
    relabelled["metadata"]["labels"]["release"] = json!("2");
    fake.apply(relabelled);
    fake.apply(slice("other", "elsewhere", grpc(), vec![ready("10.4.9.9")]));
    fake.apply(slice(
        "a",
        "quiet",
        grpc(),
        vec![ready("10.4.0.1"), ready("10.4.0.2")],
    ));
    assert_eq!(
        next_set(&mut watch).await.len(),
        2,
        "the next set is the real change, not a repeat"
    );
}

#[tokio::test]
async fn an_empty_service_is_an_empty_first_set() {
    let (_fake, registry) = fake().await;
    let mut watch = follow(&registry, ServiceQuery::new("nobody"));
    assert!(next_set(&mut watch).await.is_empty());
}

#[tokio::test]
async fn a_query_namespace_overrides_the_registry_namespace() {
    let (fake, registry) = fake().await;
    let mut other = slice("a", "greeter", grpc(), vec![ready("10.5.0.1")]);
    other["metadata"]["namespace"] = json!("payments");
    fake.apply(other);
    let query = ServiceQuery::new("greeter");
    assert!(registry.discover(&query).await.unwrap().is_empty());
    let found = registry
        .discover(&query.clone().with_namespace("payments"))
        .await
        .unwrap();
    assert_eq!(found[0].id, "payments/greeter/10.5.0.1:50051");
}

#[tokio::test]
async fn registration_belongs_to_kubernetes() {
    let (_fake, registry) = fake().await;
    let error = registry
        .register(ServiceInstance::new("x", "greeter", "10.0.0.1", 80))
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        Error::Unsupported {
            operation: "register",
            registry: "kubernetes",
            ..
        }
    ));
    let reason = std::error::Error::source(&error).unwrap().to_string();
    assert!(reason.contains("Kubernetes owns"), "{reason}");
    let error = registry.deregister("x").await.unwrap_err();
    assert!(matches!(
        error,
        Error::Unsupported {
            operation: "deregister",
            ..
        }
    ));
}

#[tokio::test]
async fn a_list_that_never_answers_times_out() {
    let (fake, _) = fake().await;
    fake.stall(true);
    let registry = Cluster::Fake(Arc::clone(&fake))
        .builder()
        .request_timeout(Duration::from_millis(200))
        .build();
    let error = registry
        .discover(&ServiceQuery::new("slow"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Timeout {
                registry: "kubernetes",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn an_unreachable_api_server_is_a_transient_error() {
    let fake = FakeKube::start().await;
    let client = fake.client();
    fake.stop();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let registry = KubernetesRegistry::new(client);
    let error = registry
        .discover(&ServiceQuery::new("x"))
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error:?}");
}

// ===== against a real cluster =====

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --features kubernetes --test kubernetes -- --ignored (namespace: TOWER_SD_TEST_NAMESPACE, default `default`; needs create, patch, delete, list and watch on endpointslices)"]
async fn real_cluster() {
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

// ===== end to end: a generated gRPC client over EndpointSlices =====

#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_follows_endpoint_slices_to_real_servers() {
    use support::grpc::{checks, until_endpoints};
    use support::servers::{TestServer, assert_even_spread};
    use tower_sd::tonic::LoadBalancedChannel;

    let (fake, registry) = fake().await;
    let mut servers = Vec::new();
    for n in 0..3 {
        let server = TestServer::grpc(&format!("pod-{n}")).await;
        // One slice per pod: a slice's endpoints share its port, and each test server has
        // its own port on 127.0.0.1.
        let ports = json!([{ "name": "grpc", "port": server.port }]);
        fake.apply(slice(
            &format!("health-{n}"),
            "health",
            ports,
            vec![ready("127.0.0.1")],
        ));
        servers.push(server);
    }
    let channel = LoadBalancedChannel::builder(Arc::new(registry), "health")
        .connect(Duration::from_secs(10))
        .await
        .unwrap();
    let id = |server: &TestServer| format!("default/health/127.0.0.1:{}", server.port);
    let all: Vec<String> = servers.iter().map(id).collect();
    until_endpoints(
        &channel,
        &all.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    checks(&channel, 6, 500).await;
    assert_even_spread(&servers, 3_000);

    // pod-2 starts terminating: it leaves the set while the others are ready.
    let ports = json!([{ "name": "grpc", "port": servers[2].port }]);
    fake.apply(slice(
        "health-2",
        "health",
        ports,
        vec![draining("127.0.0.1")],
    ));
    until_endpoints(&channel, &[all[0].as_str(), all[1].as_str()]).await;
    let before = servers[2].served();
    checks(&channel, 6, 200).await;
    assert_eq!(
        servers[2].served(),
        before,
        "no request reaches a terminating pod"
    );
}
