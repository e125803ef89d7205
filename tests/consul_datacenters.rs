//! One query followed across Consul datacenters (`Failover`), against the fake agent made
//! multi-datacenter: each datacenter's own blocking query and index, its place in the order
//! as the instances' priority tier, a datacenter failing and recovering while the others are
//! followed, and the nearest order changing.
#![cfg(feature = "consul")]

use tower_sd_testkit as support;

use std::time::Duration;

use futures_util::StreamExt;
use support::fake_consul::FakeConsul;
use tokio::time::timeout;
use tower_sd::registry::WatchStream;
use tower_sd::registry::consul::{ConsulRegistry, ConsulRegistryBuilder};
use tower_sd::{Error, ServiceInstance, ServiceQuery, ServiceRegistry};

fn builder(fake: &FakeConsul) -> ConsulRegistryBuilder {
    ConsulRegistry::builder()
        .address(fake.url())
        .wait(Duration::from_secs(2))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .requests_per_second(50.0)
}

/// `web` on the agent's node in dc1, on node-2 in dc2 and on node-3 in dc3; dc1, dc2, dc3
/// known in that order.
async fn three_datacenters() -> std::sync::Arc<FakeConsul> {
    let fake = FakeConsul::start(None).await;
    fake.set_datacenters(&["dc1", "dc2", "dc3"]);
    for (node, dc, port) in [("node-2", "dc2", 8080), ("node-3", "dc3", 9090)] {
        fake.set_node_datacenter(node, dc);
        let registration = serde_json::json!({
            "ID": "web", "Name": "web", "Tags": [], "Address": "10.0.0.9", "Port": port,
            "Meta": {}, "Weights": {"Passing": 1, "Warning": 1},
        });
        fake.register_on(node, registration, "passing");
    }
    fake
}

/// Each instance's id and priority.
fn tiers(set: &[ServiceInstance]) -> Vec<(&str, u16)> {
    set.iter().map(|i| (i.id.as_str(), i.priority)).collect()
}

/// The next item within 5 s.
async fn next(watch: &mut WatchStream) -> tower_sd::Result<Vec<ServiceInstance>> {
    timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an item within 5 s")
        .expect("the watch goes on")
}

/// The next set within 5 s, errors skipped.
async fn next_set(watch: &mut WatchStream) -> Vec<ServiceInstance> {
    loop {
        if let Ok(set) = next(watch).await {
            return set;
        }
    }
}

/// Catches a watch of the first datacenter only, priorities that do not follow the order,
/// ids that collide across datacenters (the same service ID on two nodes of two
/// datacenters), one index shared by the datacenters' queries, and a failing datacenter
/// that stops the others or empties its part of the set.
#[tokio::test]
async fn a_listed_failover_follows_each_datacenter_as_a_tier() {
    let _limit = support::time_limit(60);
    let fake = three_datacenters().await;
    let consul = builder(&fake).build().unwrap();
    consul
        .register(ServiceInstance::new("web", "web", "10.0.0.1", 7070))
        .await
        .unwrap();
    let query = ServiceQuery::new("web").with_failover(["dc2", "dc3"]);
    let mut watch = consul.watch(&query);
    let set = next_set(&mut watch).await;
    assert_eq!(
        tiers(&set),
        [
            ("dc1/node-1/web", 0),
            ("dc2/node-2/web", 1),
            ("dc3/node-3/web", 2)
        ]
    );
    assert_eq!(set[1].metadata["consul-datacenter"], "dc2");
    assert_eq!(set[2].port, 9090);
    let requests = fake.requests();
    for dc in ["dc1", "dc2", "dc3"] {
        assert!(
            requests.iter().any(
                |r| r.starts_with("GET health/service/web?") && r.contains(&format!("dc={dc}"))
            ),
            "no query for {dc}: {requests:?}"
        );
    }

    // dc1 unreachable: an error on the stream; dc3 keeps being followed, and dc1's last
    // instances stay.
    fake.set_datacenter_down("dc1", true);
    let error = next(&mut watch)
        .await
        .expect_err("dc1's failure is reported");
    assert!(
        matches!(error, Error::Status { status: 500, .. }),
        "{error:?}"
    );
    fake.set_status_on("node-3", "web", "critical");
    let set = loop {
        let set = next_set(&mut watch).await;
        if set.len() == 2 {
            break set;
        }
    };
    assert_eq!(tiers(&set), [("dc1/node-1/web", 0), ("dc2/node-2/web", 1)]);

    // dc1 back, with a change there: followed again.
    fake.set_datacenter_down("dc1", false);
    consul.deregister("web").await.unwrap();
    let set = loop {
        let set = next_set(&mut watch).await;
        if set.len() == 1 {
            break set;
        }
    };
    assert_eq!(tiers(&set), [("dc2/node-2/web", 1)]);
}

/// Catches an order read once and never again (or a list taken in the wrong order): the
/// local datacenter and the nearest other, as `/v1/catalog/datacenters` lists them, and
/// another once the list's order changes.
#[tokio::test]
async fn the_nearest_datacenters_follow_the_order_consul_gives() {
    let _limit = support::time_limit(60);
    let fake = three_datacenters().await;
    fake.set_datacenters(&["dc1", "dc3", "dc2"]);
    let consul = builder(&fake)
        .datacenters_refresh(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut watch = consul.watch(&ServiceQuery::new("web").with_nearest_datacenters(1));
    let set = next_set(&mut watch).await;
    assert_eq!(
        tiers(&set),
        [("dc3/node-3/web", 1)],
        "dc1 has none, dc3 is nearest"
    );

    fake.set_datacenters(&["dc1", "dc2", "dc3"]);
    let set = next_set(&mut watch).await;
    assert_eq!(tiers(&set), [("dc2/node-2/web", 1)], "dc2 is nearest now");
}

/// Catches a one-shot discover that fails whole when one datacenter does (failover would
/// then fail exactly when it is needed), or that hides every datacenter failing.
#[tokio::test]
async fn discover_leaves_out_a_failed_datacenter_and_fails_when_all_do() {
    let _limit = support::time_limit(60);
    let fake = three_datacenters().await;
    let consul = builder(&fake).build().unwrap();
    let query = ServiceQuery::new("web")
        .with_datacenter("dc2")
        .with_failover(["dc3"]);
    let set = consul.discover(&query).await.unwrap();
    assert_eq!(tiers(&set), [("dc2/node-2/web", 0), ("dc3/node-3/web", 1)]);

    fake.set_datacenter_down("dc2", true);
    let set = consul.discover(&query).await.unwrap();
    assert_eq!(tiers(&set), [("dc3/node-3/web", 1)]);

    fake.set_datacenter_down("dc3", true);
    let error = consul.discover(&query).await.unwrap_err();
    assert!(
        matches!(error, Error::Status { status: 500, .. }),
        "{error:?}"
    );

    // A datacenter Consul does not know is an error of that datacenter, like any other.
    fake.set_datacenter_down("dc2", false);
    let unknown = ServiceQuery::new("web")
        .with_datacenter("dc2")
        .with_failover(["dc9"]);
    let set = consul.discover(&unknown).await.unwrap();
    assert_eq!(tiers(&set), [("dc2/node-2/web", 0)]);
}

/// Catches a prepared query read as a service name (no instances at all), an answer's
/// datacenter lost (ids that collide when the query fails over), a poll that spins (the
/// query does not block) or stops, and an unknown query taken for an empty one.
#[tokio::test]
async fn a_prepared_query_is_polled_and_follows_its_own_failover() {
    let _limit = support::time_limit(60);
    let fake = three_datacenters().await;
    fake.define_prepared_query("web-anywhere", "web", &["dc2", "dc3"]);
    let consul = builder(&fake)
        .poll_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    consul
        .register(ServiceInstance::new("web", "web", "10.0.0.1", 7070))
        .await
        .unwrap();
    let mut watch = consul.watch(&"web-anywhere.query".into());
    let set = next_set(&mut watch).await;
    assert_eq!(tiers(&set), [("dc1/node-1/web", 0)]);
    assert_eq!(set[0].metadata["consul-datacenter"], "dc1");

    // dc1's only instance goes critical: the query fails over to dc2, then, with dc2 gone,
    // to dc3.
    fake.set_status("web", "critical");
    assert_eq!(tiers(&next_set(&mut watch).await), [("dc2/node-2/web", 0)]);
    fake.set_datacenter_down("dc2", true);
    assert_eq!(tiers(&next_set(&mut watch).await), [("dc3/node-3/web", 0)]);

    // Polled every 100-200 ms: over a second, 5 to 10 executions (fewer on a loaded
    // machine, a few more for the bucket's slack), not hundreds, and not none.
    let executions = || {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("GET query/web-anywhere/execute"))
            .count()
    };
    let before = executions();
    let quiet = timeout(Duration::from_secs(1), watch.next()).await;
    assert!(quiet.is_err(), "nothing changed: {quiet:?}");
    let polls = executions() - before;
    assert!((2..=12).contains(&polls), "{polls} executions in 1 s");

    let error = consul.discover(&"nothing.query".into()).await.unwrap_err();
    assert!(
        matches!(error, Error::Status { status: 404, .. }),
        "{error:?}"
    );
}
