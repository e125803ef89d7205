//! Consul service-mesh enrollment and discovery: `Connect` registrations (sidecar and
//! native) and the `/v1/health/connect/:service` watch, against the in-repo fake agent, and
//! against a real agent when `CONSUL_HTTP_ADDR` is set.
#![cfg(feature = "consul")]

use tower_sd_testkit as support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use support::fake_consul::FakeConsul;
use tokio::time::timeout;
use tower_sd::registry::WatchStream;
use tower_sd::registry::consul::{
    ConsulRegistry, ConsulRegistryBuilder, HealthCheck, HealthCheckKind, MeshRegistration,
    SidecarService, Upstream,
};
use tower_sd::{ServiceInstance, ServiceQuery, ServiceRegistry};

fn builder(address: &str) -> ConsulRegistryBuilder {
    ConsulRegistry::builder()
        .address(address)
        .wait(Duration::from_secs(2))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .requests_per_second(50.0)
        .health_check(HealthCheck::new(HealthCheckKind::Ttl(Duration::from_secs(
            30,
        ))))
}

/// The next set within 5 s, errors skipped; `(id suffix after the node, address, port)`.
async fn next(watch: &mut WatchStream) -> Vec<(String, String, u16)> {
    let set = timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(set)) = watch.next().await {
                return set;
            }
        }
    })
    .await
    .expect("a set within 5 s");
    set.iter()
        .inspect(|i| assert_eq!(i.name, "api", "instances keep the service's name"))
        .map(|i| {
            let id = i.id.split_once('/').map_or(&*i.id, |(_, id)| id).to_owned();
            (id, i.address.clone(), i.port)
        })
        .collect()
}

/// A sidecar registration produces Consul's service definition; the mesh watch answers with
/// the sidecar's address and port (not the service's), follows the parent's health through
/// the alias check, and the sidecar leaves with its parent. Catches: no `Connect` block, the
/// plain health endpoint used for mesh discovery (it would answer port 8080, not 21000), the
/// proxy's own name kept, a sidecar left behind.
#[tokio::test]
async fn a_sidecar_registration_is_discovered_at_the_proxy_and_leaves_with_its_service() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let sidecar = SidecarService::new(Some(21000)).upstream(Upstream::new("db", 9191));
    let server = builder(&fake.url())
        .mesh_registration(MeshRegistration::Sidecar(sidecar))
        .build()
        .unwrap();
    server
        .register(ServiceInstance::new("api-1", "api", "127.0.0.1", 8080).with_tag("v2"))
        .await
        .unwrap();
    let registration = fake.registration("api-1").unwrap();
    assert_eq!(
        registration["Connect"],
        json!({"SidecarService": {"Port": 21000, "Proxy": {"Upstreams": [
            {"DestinationName": "db", "LocalBindPort": 9191}
        ]}}})
    );
    server.heartbeat("api-1").await.unwrap();

    let mesh = builder(&fake.url()).mesh_discovery(true).build().unwrap();
    let plain = builder(&fake.url()).build().unwrap();
    let query = ServiceQuery::new("api").with_tag("v2");
    let mut watch = mesh.watch(&query);
    assert_eq!(
        next(&mut watch).await,
        [(
            "api-1-sidecar-proxy".to_owned(),
            "127.0.0.1".to_owned(),
            21000
        )],
        "the sidecar's address and port, with the parent's tags"
    );
    let direct = plain.discover(&query).await.unwrap();
    assert_eq!(direct.len(), 1);
    assert_eq!(
        direct[0].port, 8080,
        "the plain query still answers the service"
    );

    // The parent goes critical: the sidecar's alias check follows, and it leaves the set.
    fake.set_status("api-1", "critical");
    assert_eq!(next(&mut watch).await, []);
    server.heartbeat("api-1").await.unwrap();
    assert_eq!(next(&mut watch).await.len(), 1);

    server.deregister("api-1").await.unwrap();
    assert!(
        fake.registration("api-1-sidecar-proxy").is_none(),
        "the sidecar is gone"
    );
    assert_eq!(next(&mut watch).await, []);
}

/// A Connect-native registration says `Native: true` and is discovered at its own address;
/// an instance that is not in the mesh is not a mesh endpoint. Catches: the flag missing,
/// every instance of the name returned by the mesh query.
#[tokio::test]
async fn a_native_instance_is_a_mesh_endpoint_and_a_plain_one_is_not() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let native = builder(&fake.url())
        .mesh_registration(MeshRegistration::Native)
        .build()
        .unwrap();
    let plain = builder(&fake.url()).build().unwrap();
    native
        .register(ServiceInstance::new("api-1", "api", "127.0.0.1", 7001))
        .await
        .unwrap();
    plain
        .register(ServiceInstance::new("api-2", "api", "127.0.0.1", 7002))
        .await
        .unwrap();
    assert_eq!(
        fake.registration("api-1").unwrap()["Connect"],
        json!({"Native": true})
    );
    assert!(fake.registration("api-2").unwrap().get("Connect").is_none());
    for id in ["api-1", "api-2"] {
        native.heartbeat(id).await.unwrap();
    }
    let mesh = builder(&fake.url()).mesh_discovery(true).build().unwrap();
    let mut watch = mesh.watch(&ServiceQuery::new("api"));
    assert_eq!(
        next(&mut watch).await,
        [("api-1".to_owned(), "127.0.0.1".to_owned(), 7001)]
    );
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.starts_with("GET health/connect/api?") && r.contains("index=")),
        "blocking queries on the connect endpoint: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn a_sidecar_port_of_zero_is_a_configuration_error() {
    let _limit = support::time_limit(10);
    let error = ConsulRegistry::builder()
        .mesh_registration(MeshRegistration::Sidecar(SidecarService::new(Some(0))))
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, tower_sd::Error::InvalidConfig { key, .. } if key == "mesh_registration"),
        "{error:?}"
    );
}

/// The sidecar scenario against a real agent (`consul agent -dev` enables Connect).
#[tokio::test]
#[ignore = "needs a Consul agent: CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo test --features consul --test consul_mesh -- --ignored"]
async fn sidecar_and_native_against_a_real_agent() {
    let _limit = support::time_limit(60);
    let address = std::env::var("CONSUL_HTTP_ADDR").expect("CONSUL_HTTP_ADDR");
    let sidecar = SidecarService::new(Some(21000));
    let server = builder(&address)
        .mesh_registration(MeshRegistration::Sidecar(sidecar))
        .build()
        .unwrap();
    server
        .register(ServiceInstance::new("api-1", "api", "127.0.0.1", 8080))
        .await
        .unwrap();
    server.heartbeat("api-1").await.unwrap();
    let mesh = builder(&address).mesh_discovery(true).build().unwrap();
    let set = mesh.discover(&ServiceQuery::new("api")).await.unwrap();
    // The sidecar's own TCP check fails without a running proxy; the query may be empty,
    // but never answers the service's own port.
    assert!(set.iter().all(|i| i.port == 21000), "{set:?}");
    server.deregister("api-1").await.unwrap();
    let plain = builder(&address).build().unwrap();
    assert!(
        plain
            .discover(&ServiceQuery::new("api-sidecar-proxy"))
            .await
            .unwrap()
            .is_empty(),
        "the sidecar left with its service"
    );
}
