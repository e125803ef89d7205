//! Registry resilience: the last-known-good cache (with persistence), the fallback chain, and
//! a Consul outage while a balancer serves requests.

use tower_sd_testkit as support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use support::unreliable::Unreliable;
use tower_sd::registry::{CachedRegistry, FallbackRegistry};
use tower_sd::{Error, ServiceInstance, ServiceRegistry, StaticRegistry};

fn instance(id: &str) -> ServiceInstance {
    ServiceInstance::new(id, "api", "10.0.0.1", 80)
}

#[tokio::test]
async fn the_cache_serves_the_last_good_set_until_max_stale() {
    let _limit = support::time_limit(60);
    let switch = Arc::new(Unreliable::default());
    switch.register(instance("a")).await.unwrap();
    let cached = CachedRegistry::builder(switch.clone())
        .max_stale(Duration::from_millis(200))
        .build();
    assert_eq!(cached.discover(&"api".into()).await.unwrap().len(), 1);

    switch.down.store(true, Ordering::SeqCst);
    assert_eq!(
        cached.discover(&"api".into()).await.unwrap().len(),
        1,
        "served from the cache"
    );
    assert!(cached.stats()[0].stale);
    // Never asked before: nothing to serve.
    assert!(matches!(
        cached.discover(&"other".into()).await,
        Err(Error::Unreachable { .. })
    ));

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(
            cached.discover(&"api".into()).await,
            Err(Error::Unreachable { .. })
        ),
        "past max_stale"
    );
}

#[tokio::test]
async fn persisted_sets_seed_a_client_that_starts_while_the_registry_is_down() {
    let _limit = support::time_limit(60);
    let dir = support::process::ScratchDir::new("cache");
    let file = dir.join("cache.json");

    let up = Arc::new(Unreliable::default());
    up.register(instance("a")).await.unwrap();
    up.register(instance("b")).await.unwrap();
    let cached = CachedRegistry::builder(up).persist_to(&file).build();
    assert_eq!(cached.discover(&"api".into()).await.unwrap().len(), 2);
    cached.persisted().await;
    assert!(file.exists());

    // A new process, the registry down.
    let down = Arc::new(Unreliable::default());
    down.down.store(true, Ordering::SeqCst);
    let seeded = CachedRegistry::builder(down).persist_to(&file).build();
    assert_eq!(seeded.discover(&"api".into()).await.unwrap().len(), 2);
    let mut watch = seeded.watch(&"api".into());
    assert_eq!(
        watch.next().await.unwrap().unwrap().len(),
        2,
        "the seed comes first"
    );
    assert!(
        matches!(watch.next().await, Some(Err(Error::Unreachable { .. }))),
        "then the registry's error, not an empty set"
    );

    // A corrupt file is ignored, not fatal.
    std::fs::write(&file, b"{ not json").unwrap();
    let fresh = CachedRegistry::builder(Arc::new(Unreliable::default()))
        .persist_to(&file)
        .build();
    assert!(fresh.stats().is_empty());
}

/// Catches the cache file's instances taken unchecked: an entry edited to port 0, an empty
/// address or a malformed one must be skipped (and logged), never handed out to be dialled.
#[tokio::test]
async fn a_cache_file_entry_that_cannot_be_dialled_is_skipped() {
    let _limit = support::time_limit(60);
    let dir = support::process::ScratchDir::new("cache-bad");
    let file = dir.join("cache.json");
    let up = Arc::new(Unreliable::default());
    for id in ["a", "b", "c", "d"] {
        up.register(instance(id)).await.unwrap();
    }
    let cached = CachedRegistry::builder(up).persist_to(&file).build();
    assert_eq!(cached.discover(&"api".into()).await.unwrap().len(), 4);
    cached.persisted().await;

    let mut entries: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    for instance in entries[0]["instances"].as_array_mut().unwrap() {
        match instance["id"].as_str().unwrap() {
            "b" => instance["port"] = 0.into(),
            "c" => instance["address"] = "".into(),
            "d" => instance["address"] = "not an address!".into(),
            _ => {}
        }
    }
    std::fs::write(&file, serde_json::to_vec(&entries).unwrap()).unwrap();
    let down = Arc::new(Unreliable::default());
    down.down.store(true, Ordering::SeqCst);
    let seeded = CachedRegistry::builder(down).persist_to(&file).build();
    let set = seeded.discover(&"api".into()).await.unwrap();
    let ids: Vec<&str> = set.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a"]);
}

/// Catches a failover time added to the clock unchecked (`Duration::MAX` would panic in
/// the watch): such a chain never fails over, and reports the primary's errors.
#[tokio::test(start_paused = true)]
async fn a_huge_failover_time_never_fails_over_and_never_panics() {
    let _limit = support::time_limit(60);
    let primary = Arc::new(Unreliable::default());
    primary.down.store(true, Ordering::SeqCst);
    let backup = StaticRegistry::builder()
        .instances(vec![instance("backup")])
        .build()
        .unwrap();
    let chain = FallbackRegistry::builder()
        .then(primary)
        .then(backup)
        .failover_after(Duration::MAX)
        .build()
        .unwrap();
    let mut watch = chain.watch(&"api".into());
    assert!(
        matches!(watch.next().await, Some(Err(Error::Unreachable { .. }))),
        "the primary's error"
    );
    let year = Duration::from_secs(365 * 24 * 60 * 60);
    let next = tokio::time::timeout(year, watch.next()).await;
    assert!(next.is_err(), "no failover within a year: {next:?}");
}

#[tokio::test]
async fn fallback_discover_asks_down_the_chain() {
    let _limit = support::time_limit(60);
    let primary = Arc::new(Unreliable::default());
    primary.register(instance("primary")).await.unwrap();
    let backup = StaticRegistry::builder()
        .instances(vec![instance("backup")])
        .build()
        .unwrap();
    let chain = FallbackRegistry::builder()
        .then(primary.clone())
        .then(backup)
        .build()
        .unwrap();
    assert_eq!(
        chain.discover(&"api".into()).await.unwrap()[0].id,
        "primary"
    );
    primary.down.store(true, Ordering::SeqCst);
    assert_eq!(chain.discover(&"api".into()).await.unwrap()[0].id, "backup");
    // Registration goes to the primary.
    chain.register(instance("new")).await.unwrap();
    assert_eq!(
        primary.inner.discover(&"api".into()).await.unwrap().len(),
        2
    );
    assert!(matches!(
        FallbackRegistry::builder().build(),
        Err(Error::InvalidConfig { .. })
    ));
}

/// A scratch directory for cache files.
#[tokio::test]
async fn a_persisted_set_older_than_max_stale_is_not_served() {
    let _limit = support::time_limit(60);
    let dir = support::process::ScratchDir::new("cache-stale");
    let file = dir.join("cache.json");
    let up = Arc::new(Unreliable::default());
    up.register(instance("a")).await.unwrap();
    let cached = CachedRegistry::builder(up).persist_to(&file).build();
    cached.discover(&"api".into()).await.unwrap();
    cached.persisted().await;

    // The saved answer is an hour old.
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let ms = hour_ago
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    saved[0]["fetched_unix_ms"] = ms.into();
    std::fs::write(&file, serde_json::to_vec(&saved).unwrap()).unwrap();

    let down = Arc::new(Unreliable::default());
    down.down.store(true, Ordering::SeqCst);
    let strict = CachedRegistry::builder(down.clone())
        .persist_to(&file)
        .max_stale(Duration::from_secs(600))
        .build();
    assert!(strict.stats()[0].from_file);
    assert!(
        matches!(
            strict.discover(&"api".into()).await,
            Err(Error::Unreachable { .. })
        ),
        "too old to serve: the registry's error"
    );
    let mut watch = strict.watch(&"api".into());
    assert!(
        matches!(watch.next().await, Some(Err(Error::Unreachable { .. }))),
        "no seed: the registry's error first"
    );

    // Within max_stale it is served, and said to come from the file until the registry
    // answers.
    let lenient = CachedRegistry::builder(down.clone())
        .persist_to(&file)
        .max_stale(Duration::from_secs(7200))
        .build();
    let mut watch = lenient.watch(&"api".into());
    assert_eq!(watch.next().await.unwrap().unwrap().len(), 1);
    assert!(lenient.stats()[0].from_file);
    down.down.store(false, Ordering::SeqCst);
    down.register(instance("a")).await.unwrap();
    assert_eq!(lenient.discover(&"api".into()).await.unwrap().len(), 1);
    assert!(!lenient.stats()[0].from_file);
}

#[tokio::test]
async fn the_cache_keeps_a_bounded_number_of_queries_and_never_drops_a_watched_one() {
    let _limit = support::time_limit(60);
    let registry = Arc::new(Unreliable::default());
    let cached = CachedRegistry::builder(registry.clone())
        .max_entries(3)
        .build();
    let watched: tower_sd::ServiceQuery = "watched".into();
    let mut watch = cached.watch(&watched);
    assert!(watch.next().await.unwrap().unwrap().is_empty());
    for n in 0..20 {
        cached.discover(&format!("svc-{n}").into()).await.unwrap();
    }
    let stats = cached.stats();
    assert!(stats.len() <= 3, "{} queries kept", stats.len());
    assert!(
        stats.iter().any(|s| s.query == watched),
        "the watched query stays"
    );
    // Once no watch follows it, it may go like the others.
    drop(watch);
    for n in 20..40 {
        cached.discover(&format!("svc-{n}").into()).await.unwrap();
    }
    assert!(!cached.stats().iter().any(|s| s.query == watched));
}

#[tokio::test]
async fn processes_sharing_a_cache_file_keep_each_others_queries() {
    let _limit = support::time_limit(60);
    let dir = support::process::ScratchDir::new("cache-shared");
    let file = dir.join("cache.json");
    let registry = Arc::new(Unreliable::default());
    registry.register(instance("a")).await.unwrap();
    registry
        .register(ServiceInstance::new("w", "web", "10.0.0.2", 80))
        .await
        .unwrap();
    // Two caches on one file, as two processes would have.
    let first = CachedRegistry::builder(registry.clone())
        .persist_to(&file)
        .build();
    let second = CachedRegistry::builder(registry.clone())
        .persist_to(&file)
        .build();
    first.discover(&"api".into()).await.unwrap();
    first.persisted().await;
    second.discover(&"web".into()).await.unwrap();
    second.persisted().await;
    let saved: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let mut names: Vec<&str> = saved
        .iter()
        .map(|e| e["query"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["api", "web"], "neither erased the other's query");
    // Owner-only, and no temporary file left behind.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[cfg(feature = "consul")]
mod with_consul {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use support::fake_consul::{FakeConsul, Fault};
    use tokio::time::timeout;
    use tower::ServiceExt;
    use tower_sd::balance::Balance;
    use tower_sd::registry::WatchStream;
    use tower_sd::registry::consul::ConsulRegistry;

    fn consul(fake: &FakeConsul) -> Arc<dyn ServiceRegistry> {
        Arc::new(
            ConsulRegistry::builder()
                .address(fake.url())
                .wait(Duration::from_secs(1))
                .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
                .requests_per_second(5.0)
                .build()
                .unwrap(),
        )
    }

    /// The ids of a set, as registered: Consul's discovered ids carry their node
    /// (`node-1/a`), the static list's do not.
    fn ids(set: &[ServiceInstance]) -> Vec<String> {
        set.iter()
            .map(|i| i.id.rsplit('/').next().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn the_watch_fails_over_and_back_without_an_empty_set() {
        let _limit = support::time_limit(60);
        let fake = FakeConsul::start(None).await;
        let primary = consul(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        let backup = StaticRegistry::builder()
            .instances(vec![instance("from-static")])
            .build()
            .unwrap();
        let chain = FallbackRegistry::builder()
            .then(primary.clone())
            .then(backup)
            .failover_after(Duration::from_millis(300))
            .build()
            .unwrap();
        let mut watch = chain.watch(&"api".into());
        let mut sets = Vec::new();
        let next = async |watch: &mut WatchStream, sets: &mut Vec<Vec<String>>| loop {
            match timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("a set in time")
            {
                Some(Ok(set)) => {
                    sets.push(ids(&set));
                    return ids(&set);
                }
                Some(Err(_)) => {}
                None => panic!("the watch ended"),
            }
        };
        assert_eq!(next(&mut watch, &mut sets).await, ["from-consul"]);

        for _ in 0..10_000 {
            fake.inject(Fault::Status(500));
        }
        // The blocking query in flight returns on the next change.
        primary.register(instance("from-consul-2")).await.unwrap();
        assert_eq!(
            next(&mut watch, &mut sets).await,
            ["from-static"],
            "failed over"
        );

        fake.clear_faults();
        assert_eq!(
            next(&mut watch, &mut sets).await,
            ["from-consul", "from-consul-2"],
            "switched back"
        );
        assert!(
            sets.iter().all(|set| !set.is_empty()),
            "never an empty set: {sets:?}"
        );
        // The first query after the errors asked from index 0, so it answered at once: one
        // that kept the old index would block until the service changed.
        let answers = fake.answers();
        let last_error = answers
            .iter()
            .rposition(|(_, index)| index.is_none())
            .unwrap();
        assert_eq!(answers[last_error + 1].0, 0, "{:?}", &answers[last_error..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_fails_no_request_and_sees_only_bounded_retries() {
        let _limit = support::time_limit(60);
        let fake = FakeConsul::start(None).await;
        let cached: Arc<dyn ServiceRegistry> =
            Arc::new(CachedRegistry::builder(consul(&fake)).build());
        cached.register(instance("a")).await.unwrap();
        let balance = Balance::builder()
            .wait_for_endpoints(Duration::from_millis(100))
            .build(tower_sd::RegistryDiscover::new(&*cached, "api", |i| {
                let id = i.id.clone();
                Ok::<_, std::convert::Infallible>(tower::service_fn(move |()| {
                    let id = id.clone();
                    async move { Ok::<_, std::convert::Infallible>(id) }
                }))
            }));
        balance
            .await_endpoints(Duration::from_secs(5))
            .await
            .unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (balance, stop) = (balance.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0usize, 0usize);
                while !stop.load(Ordering::SeqCst) {
                    match balance.clone().oneshot(()).await {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    tokio::task::yield_now().await;
                }
                (ok, failed)
            })
        };

        // The outage: every query fails for 2 s (scaled down from a minute: backoff 20-200 ms
        // and 5 queries/s keep the same shape).
        for _ in 0..100_000 {
            fake.inject(Fault::Status(500));
        }
        cached.register(instance("poke")).await.unwrap(); // ends the blocking query in flight
        let before = fake.health_queries();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A balancer that starts mid-outage (a new client, a service used for the first
        // time) gets its endpoints from the cache: Consul itself answers nothing but errors.
        let late = Balance::builder()
            .wait_for_endpoints(Duration::from_secs(5))
            .build(tower_sd::RegistryDiscover::new(&*cached, "api", |i| {
                let id = i.id.clone();
                Ok::<_, std::convert::Infallible>(tower::service_fn(move |()| {
                    let id = id.clone();
                    async move { Ok::<_, std::convert::Infallible>(id) }
                }))
            }));
        // The cached set: `a`, and `poke` if its change was answered before the outage.
        let served = late.oneshot(()).await.expect("served from the cache");
        assert!(
            ["node-1/a", "node-1/poke"].contains(&served.as_str()),
            "{served}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = fake.health_queries() - before;
        assert!(during <= 15, "{during} queries in a 2 s outage");

        // Recovery: the next query sees the change.
        fake.clear_faults();
        cached.register(instance("b")).await.unwrap();
        let recovered = timeout(Duration::from_secs(2), async {
            while !balance.endpoints().iter().any(|e| e.key == "node-1/b") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(recovered.is_ok(), "the set updated after recovery");

        stop.store(true, Ordering::SeqCst);
        let (ok, failed) = sender.await.unwrap();
        assert!(ok > 100, "{ok} requests");
        assert_eq!(failed, 0, "no request failed for lack of endpoints");
    }

    /// The ids of each set the watch yields within `limit`, until one equals `want`
    /// (errors skipped); fails if it never does.
    async fn until_set(
        watch: &mut WatchStream,
        want: &[&str],
        limit: Duration,
    ) -> Vec<Vec<String>> {
        let mut sets = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match timeout(left, watch.next()).await {
                Ok(Some(Ok(set))) => {
                    let ids = ids(&set);
                    let done = ids == want;
                    sets.push(ids);
                    if done {
                        return sets;
                    }
                }
                Ok(Some(Err(_))) => {}
                Ok(None) => panic!("the watch ended"),
                Err(_) => panic!("never saw {want:?} within {limit:?}; saw {sets:?}"),
            }
        }
    }

    fn outage(fake: &FakeConsul) {
        for _ in 0..100_000 {
            fake.inject(Fault::Status(500));
        }
    }

    fn chain(
        primary: Arc<dyn ServiceRegistry>,
        rest: Vec<Arc<dyn ServiceRegistry>>,
    ) -> FallbackRegistry {
        rest.into_iter()
            .fold(FallbackRegistry::builder().then(primary), |chain, next| {
                chain.then(next)
            })
            .failover_after(Duration::from_millis(300))
            .build()
            .unwrap()
    }

    fn last_resort() -> Arc<dyn ServiceRegistry> {
        Arc::new(
            StaticRegistry::builder()
                .instances(vec![instance("from-static")])
                .build()
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn the_fallback_comes_back_when_the_primary_recovers_with_the_same_set() {
        let _limit = support::time_limit(60);
        let fake = FakeConsul::start(None).await;
        let primary = consul(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        let mut watch = chain(primary.clone(), vec![last_resort()]).watch(&"api".into());
        until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;

        // An outage longer than failover_after in which nothing changes (the blocking query
        // in flight is ended by a registration that the outage then hides).
        outage(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        until_set(&mut watch, &["from-static"], Duration::from_secs(5)).await;
        fake.clear_faults();
        let sets = until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;
        assert!(sets.iter().all(|set| !set.is_empty()), "{sets:?}");
    }

    #[tokio::test]
    async fn a_flapping_primary_is_followed_whenever_it_answers() {
        let _limit = support::time_limit(60);
        let fake = FakeConsul::start(None).await;
        let primary = consul(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        let mut watch = chain(primary.clone(), vec![last_resort()]).watch(&"api".into());
        until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;
        for _ in 0..3 {
            outage(&fake);
            primary.register(instance("from-consul")).await.unwrap();
            until_set(&mut watch, &["from-static"], Duration::from_secs(5)).await;
            fake.clear_faults();
            until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;
        }
    }

    #[tokio::test]
    async fn a_three_registry_chain_falls_through_and_comes_back() {
        let _limit = support::time_limit(60);
        let fake = FakeConsul::start(None).await;
        let primary = consul(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        // The second registry is down too: the chain goes on to the third.
        let second = Arc::new(Unreliable::default());
        second.down.store(true, Ordering::SeqCst);
        let mut watch = chain(primary.clone(), vec![second, last_resort()]).watch(&"api".into());
        until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;
        outage(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        let sets = until_set(&mut watch, &["from-static"], Duration::from_secs(5)).await;
        assert!(sets.iter().all(|set| !set.is_empty()), "{sets:?}");
        fake.clear_faults();
        until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_failing_fallback_keeps_the_last_set_until_the_primary_is_back() {
        let _limit = support::time_limit(60);
        let fake = FakeConsul::start(None).await;
        let primary = consul(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        let broken = Arc::new(Unreliable::default());
        broken.down.store(true, Ordering::SeqCst);
        let mut watch = chain(primary.clone(), vec![broken]).watch(&"api".into());
        until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;
        outage(&fake);
        primary.register(instance("from-consul")).await.unwrap();
        // A second outside the primary and with a broken fallback: only errors, no set.
        let quiet = timeout(Duration::from_secs(1), async {
            loop {
                if let Some(Ok(set)) = watch.next().await {
                    return set;
                }
            }
        })
        .await;
        assert!(quiet.is_err(), "no set while nothing answers: {quiet:?}");
        fake.clear_faults();
        until_set(&mut watch, &["from-consul"], Duration::from_secs(5)).await;
    }
}
