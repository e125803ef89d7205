//! `KubernetesRegistry` against the in-repo fake API server, in what only a fake can stage:
//! a 410 mid-watch, a 403, closed streams, bookmarks, stalled lists; and end to end, a tonic
//! client following slices to real servers.
#![cfg(feature = "kubernetes")]

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::endpoint_slices::{grpc, ready, slice};
use support::fake_kube::FakeKube;
use support::{authorities, follow, next_item as next, next_set};
use tower_sd::registry::kubernetes::KubernetesRegistry;
use tower_sd::{Error, ServiceInstance, ServiceQuery, ServiceRegistry};

/// A fake API server and a registry over it.
async fn fake() -> (Arc<FakeKube>, KubernetesRegistry) {
    support::trace_init();
    let fake = FakeKube::start().await;
    let registry = fake.registry().build();
    (fake, registry)
}

#[tokio::test]
async fn a_410_mid_watch_relists_and_the_set_stays_whole() {
    let _limit = support::time_limit(60);
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
    let set = support::next_set_after_errors(&mut watch, Duration::from_secs(20), |error| {
        matches!(error, Error::Status { status: 410, .. })
    })
    .await;
    assert_eq!(
        authorities(&set),
        ["10.1.0.1:50051", "10.1.0.2:50051", "10.1.0.3:50051"],
        "after the relist, the whole set, never a part of it"
    );
    assert_eq!(fake.lists(), 2, "one list, and one relist after the 410");
}

#[tokio::test]
async fn a_403_is_yielded_and_the_watch_goes_on() {
    let _limit = support::time_limit(60);
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
    let set = support::next_set_after_errors(&mut watch, Duration::from_secs(20), |error| {
        matches!(error, Error::Status { status: 403, .. })
    })
    .await;
    assert_eq!(authorities(&set), ["10.2.0.1:50051"]);
}

#[tokio::test]
async fn a_closed_watch_resumes_from_its_version_without_a_relist() {
    let _limit = support::time_limit(60);
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
    // It resumed from the version it had seen (the list's: 100, then the slice's apply),
    // not from none or 0 (which would start over from the current state, hiding a lost
    // version), nor by listing again.
    let requests = fake.requests();
    let watches: Vec<&String> = requests.iter().filter(|r| r.starts_with("watch")).collect();
    assert!(watches.len() >= 2, "{requests:?}");
    assert_eq!(watches[0], "watch rv=101", "{requests:?}");
    assert_eq!(watches[1], watches[0], "resumed where it was: {requests:?}");
}

#[tokio::test]
async fn bookmarks_and_unrelated_changes_emit_nothing() {
    let _limit = support::time_limit(60);
    let (fake, registry) = fake().await;
    fake.apply(slice("a", "quiet", grpc(), vec![ready("10.4.0.1")]));
    let mut watch = follow(&registry, ServiceQuery::new("quiet"));
    assert_eq!(next_set(&mut watch).await.len(), 1);
    fake.watching(1).await;
    fake.bookmark();
    support::until("the bookmark is sent", || fake.bookmarks_sent() == 1).await;
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
    let _limit = support::time_limit(60);
    let (_fake, registry) = fake().await;
    let mut watch = follow(&registry, ServiceQuery::new("nobody"));
    assert!(next_set(&mut watch).await.is_empty());
}

#[tokio::test]
async fn a_query_namespace_overrides_the_registry_namespace() {
    let _limit = support::time_limit(60);
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
    let _limit = support::time_limit(60);
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
    let _limit = support::time_limit(60);
    let (fake, _) = fake().await;
    fake.stall(true);
    let registry = fake
        .registry()
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
    let _limit = support::time_limit(60);
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

// ===== end to end: a generated gRPC client over EndpointSlices =====

#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_follows_endpoint_slices_to_real_servers() {
    let _limit = support::time_limit(60);
    use support::endpoint_slices::draining;
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

/// The fake, as strict as kube-apiserver's watch cache: a slice relabelled to another
/// service leaves this one's watch as a DELETED event (the fake used to send nothing, so a
/// watch kept the slice for ever), and a Role that grants `list` but not `watch` fails the
/// watch, not the list.
#[tokio::test]
async fn a_relabelled_slice_leaves_and_watch_is_its_own_permission() {
    let _limit = support::time_limit(60);
    let (fake, registry) = fake().await;
    fake.apply(slice("a", "moving", grpc(), vec![ready("10.4.0.1")]));
    fake.apply(slice("b", "moving", grpc(), vec![ready("10.4.0.2")]));
    let mut watch = follow(&registry, ServiceQuery::new("moving"));
    assert_eq!(next_set(&mut watch).await.len(), 2);
    fake.apply(slice("a", "elsewhere", grpc(), vec![ready("10.4.0.1")]));
    assert_eq!(next_set(&mut watch).await, ["10.4.0.2:50051"]);
    fake.apply(slice("a", "moving", grpc(), vec![ready("10.4.0.3")]));
    assert_eq!(
        next_set(&mut watch).await,
        ["10.4.0.2:50051", "10.4.0.3:50051"],
        "and comes back as ADDED"
    );

    fake.forbid_watch(true);
    assert_eq!(registry.discover(&"moving".into()).await.unwrap().len(), 2);
    let mut watch = follow(&registry, ServiceQuery::new("moving"));
    assert_eq!(next_set(&mut watch).await.len(), 2, "the list is allowed");
    let error = next(&mut watch).await.unwrap_err();
    assert!(
        matches!(error, Error::Status { status: 403, .. }),
        "{error:?}"
    );
}

/// The fake's watch from no version (or "0") starts from the current state as synthetic
/// ADDED events, not from the beginning of history: a slice created and deleted before
/// is not replayed.
#[tokio::test]
async fn a_watch_from_no_version_starts_from_the_current_state() {
    let _limit = support::time_limit(60);
    let (fake, _) = fake().await;
    fake.apply(slice("gone", "history", grpc(), vec![ready("10.5.0.1")]));
    fake.delete("default", "gone");
    fake.apply(slice("here", "history", grpc(), vec![ready("10.5.0.2")]));
    let url = format!(
        "{}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?watch=true&timeoutSeconds=1",
        fake.url()
    );
    for url in [url.clone(), format!("{url}&resourceVersion=0")] {
        let body = get(&url).await;
        let events: Vec<serde_json::Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seen: Vec<(&str, &str)> = events
            .iter()
            .map(|e| {
                let name = e["object"]["metadata"]["name"].as_str().unwrap();
                (e["type"].as_str().unwrap(), name)
            })
            .collect();
        assert_eq!(seen, [("ADDED", "here")], "{url}");
    }
}

/// The body of a GET, whole.
async fn get(url: &str) -> String {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Lists in pages (the watcher asks 500 at a time): 520 slices all reach the set, and a
/// list whose continue token expired mid-way (a 410, as after etcd compacted the version it
/// was reading) is an error the watch yields before it lists again, never a partial set.
#[tokio::test]
async fn a_paged_list_is_whole_and_an_expired_continue_lists_again() {
    let _limit = support::time_limit(60);
    let (fake, registry) = fake().await;
    for n in 0..520 {
        let address = format!("10.6.{}.{}", n / 256, n % 256);
        fake.apply(slice(
            &format!("s{n:03}"),
            "big",
            grpc(),
            vec![ready(&address)],
        ));
    }
    let mut watch = follow(&registry, ServiceQuery::new("big"));
    assert_eq!(next_set(&mut watch).await.len(), 520);
    assert!(
        fake.requests().iter().filter(|r| *r == "list").count() >= 2,
        "paged"
    );

    fake.expire_continue_tokens();
    let mut watch = follow(&registry, ServiceQuery::new("big"));
    let error = next(&mut watch).await.unwrap_err();
    assert!(
        matches!(error, Error::Status { status: 410, .. }),
        "{error:?}"
    );
    fake.apply(slice("s520", "big", grpc(), vec![ready("10.6.2.8")]));
    let set = support::next_set_after_errors(&mut watch, Duration::from_secs(20), |error| {
        matches!(error, Error::Status { status: 410, .. })
    })
    .await;
    assert_eq!(set.len(), 521, "whole, never a part");
}
