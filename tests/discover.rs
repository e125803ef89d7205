//! `RegistryDiscover`: set diffing (property-tested), failure handling, and driving tower's
//! own `p2c::Balance`.

use tower_sd_testkit as support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::task::Poll;

use futures_util::{FutureExt, StreamExt, stream};
use proptest::prelude::*;
use support::instance;
use tokio::sync::mpsc;
use tower::discover::Change;
use tower::{Service, ServiceExt};
use tower_sd::endpoint::Endpoint;
use tower_sd::{Error, MemoryRegistry, RegistryDiscover, ServiceInstance, ServiceRegistry};

type Feed = mpsc::UnboundedSender<tower_sd::Result<Vec<ServiceInstance>>>;

/// A discover over a hand-fed stream of sets whose "service" is a copy of the instance.
#[allow(clippy::type_complexity)]
fn fed_discover(
    make: impl Fn(&ServiceInstance) -> Result<ServiceInstance, &'static str>,
) -> (
    Feed,
    RegistryDiscover<
        ServiceInstance,
        impl Fn(&ServiceInstance) -> Result<Endpoint<ServiceInstance>, &'static str>,
    >,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watch = stream::poll_fn(move |cx| rx.poll_recv(cx));
    (tx, RegistryDiscover::from_stream("svc", watch, make))
}

/// Every change ready now, without waiting.
fn ready_changes<S, F>(discover: &mut RegistryDiscover<S, F>) -> Vec<Change<String, Endpoint<S>>>
where
    F: Fn(&ServiceInstance) -> Result<Endpoint<S>, &'static str>,
{
    let mut changes = Vec::new();
    while let Some(item) = discover.next().now_or_never() {
        match item {
            Some(Ok(change)) => changes.push(change),
            Some(Err(never)) => match never {},
            None => break,
        }
    }
    changes
}

/// What identifies an endpoint, i.e. everything but tags.
fn endpoint(instance: &ServiceInstance) -> impl PartialEq + std::fmt::Debug {
    (
        instance.id.clone(),
        instance.authority(),
        instance.weight,
        instance.zone.clone(),
        instance.metadata.clone(),
    )
}

fn arb_set() -> impl Strategy<Value = Vec<ServiceInstance>> {
    let attrs = (
        1u16..4,
        1u32..3,
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        prop::collection::vec(prop::sample::select(vec!["t1", "t2"]), 0..2),
        prop::option::of(prop::sample::select(vec!["v1", "v2"])),
    );
    prop::collection::btree_map(0u8..8, attrs, 0..8).prop_map(|map| {
        map.into_iter()
            .map(|(id, (port, weight, zone, tags, version))| {
                let mut i = instance(&format!("i{id}"), "svc", port).with_weight(weight);
                i.zone = zone.map(str::to_owned);
                i.tags = tags.into_iter().map(str::to_owned).collect();
                if let Some(version) = version {
                    i = i.with_metadata("version", version);
                }
                i
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Applying the emitted changes to a map reproduces every set exactly, and a set equal
    /// to the last (up to tags) emits nothing.
    #[test]
    fn changes_reproduce_every_set(sets in prop::collection::vec(arb_set(), 1..12)) {
        let (feed, mut discover) = fed_discover(|i| Ok(i.clone()));
        let mut applied: HashMap<String, ServiceInstance> = HashMap::new();
        let mut previous: Option<Vec<ServiceInstance>> = None;
        for set in sets {
            feed.send(Ok(set.clone())).unwrap();
            let changes = ready_changes(&mut discover);
            let mut removed_seen = HashSet::new();
            let mut inserting = false;
            for change in &changes {
                match change {
                    Change::Remove(id) => {
                        prop_assert!(!inserting, "removals come before insertions");
                        prop_assert!(applied.remove(id).is_some(), "removed an unknown id {}", id);
                        removed_seen.insert(id.clone());
                    }
                    Change::Insert(id, endpoint) => {
                        inserting = true;
                        prop_assert_eq!(id, &endpoint.service.id);
                        applied.insert(id.clone(), endpoint.service.clone());
                    }
                }
            }
            let want: BTreeMap<_, _> = set.iter().map(|i| (i.id.clone(), endpoint(i))).collect();
            let got: BTreeMap<_, _> = applied.iter().map(|(id, i)| (id.clone(), endpoint(i))).collect();
            prop_assert_eq!(want, got);
            if let Some(previous) = &previous {
                let same = previous.len() == set.len()
                    && previous.iter().zip(&set).all(|(a, b)| !a.endpoint_differs(b) && a.id == b.id);
                prop_assert_eq!(same, changes.is_empty());
            }
            previous = Some(set);
        }
    }
}

#[tokio::test]
async fn make_errors_skip_the_instance_and_watch_errors_remove_nothing() {
    let _limit = support::time_limit(60);
    let (feed, mut discover) = fed_discover(|i| {
        if i.port == 13 {
            Err("unlucky port")
        } else {
            Ok(i.clone())
        }
    });
    feed.send(Ok(vec![instance("a", "svc", 1), instance("b", "svc", 13)]))
        .unwrap();
    let changes = ready_changes(&mut discover);
    assert!(matches!(changes.as_slice(), [Change::Insert(id, _)] if id == "a"));

    // A watch error changes nothing.
    feed.send(Err(Error::unsupported("test", "watch", "injected")))
        .unwrap();
    assert!(ready_changes(&mut discover).is_empty());

    // The skipped instance is retried with the next set; a replacement whose service cannot be
    // made removes the old one (it points at the old address).
    feed.send(Ok(vec![instance("a", "svc", 13), instance("b", "svc", 2)]))
        .unwrap();
    let mut changes: Vec<String> = ready_changes(&mut discover)
        .into_iter()
        .map(|change| match change {
            Change::Insert(id, _) => format!("+{id}"),
            Change::Remove(id) => format!("-{id}"),
        })
        .collect();
    changes.sort();
    assert_eq!(changes, ["+b", "-a"]);
    assert_eq!(discover.instances().count(), 1);
}

#[tokio::test]
async fn end_of_watch_ends_the_stream_for_good() {
    let _limit = support::time_limit(60);
    let (feed, mut discover) = fed_discover(|i| Ok(i.clone()));
    feed.send(Ok(vec![instance("a", "svc", 1)])).unwrap();
    drop(feed);
    assert!(matches!(
        discover.next().await,
        Some(Ok(Change::Insert(..)))
    ));
    for _ in 0..3 {
        assert!(discover.next().await.is_none());
    }
    let printed = format!("{discover:?}");
    assert!(
        printed.contains("\"svc\"")
            && printed.contains("instances: 1")
            && printed.contains("ended: true"),
        "{printed}"
    );
}

/// A service that answers with the id of the instance it was made for.
fn echo_id(
    instance: &ServiceInstance,
) -> Result<tower::util::BoxService<(), String, Infallible>, Infallible> {
    let id = instance.id.clone();
    Ok(tower::util::BoxService::new(tower::service_fn(move |()| {
        let id = id.clone();
        async move { Ok::<_, Infallible>(id) }
    })))
}

#[tokio::test]
async fn drives_tower_p2c_balance_through_registry_changes() {
    let _limit = support::time_limit(60);
    support::trace_init();
    let registry = MemoryRegistry::new();
    registry.register(instance("a", "svc", 1)).await.unwrap();
    registry.register(instance("b", "svc", 2)).await.unwrap();

    let discover = RegistryDiscover::new(&registry, "svc", echo_id);
    let discover = tower::load::PendingRequestsDiscover::new(
        discover,
        tower::load::CompleteOnResponse::default(),
    );
    let mut balance = tower::balance::p2c::Balance::new(discover);

    async fn served(
        balance: &mut impl Service<(), Response = String, Error = tower::BoxError>,
        requests: usize,
    ) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..requests {
            let id = balance.ready().await.unwrap().call(()).await.unwrap();
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    let counts = served(&mut balance, 200).await;
    assert_eq!(counts.keys().len(), 2, "{counts:?}");

    registry.register(instance("c", "svc", 3)).await.unwrap();
    registry.deregister("a").await.unwrap();
    // Let the watch observe the change; tower's balancer applies it on the next poll_ready.
    tokio::task::yield_now().await;
    let counts = served(&mut balance, 300).await;
    assert!(!counts.contains_key("a"), "a was deregistered: {counts:?}");
    assert!(
        counts.contains_key("b") && counts.contains_key("c"),
        "{counts:?}"
    );

    // Everything gone: tower's balancer now reports not ready (it waits for endpoints).
    registry.deregister("b").await.unwrap();
    registry.deregister("c").await.unwrap();
    tokio::task::yield_now().await;
    let poll = std::future::poll_fn(|cx| Poll::Ready(balance.poll_ready(cx))).await;
    assert!(poll.is_pending(), "no endpoints left");
}
