//! `DnsRegistry` against a real DNS server: dnsmasq on a free loopback port
//! (`dnsmasq-base`; the tests say what to install when it is missing, and `.ci/run` installs
//! it), with records changed mid-test through its `hostsdir`.
#![cfg(feature = "dns")]

use tower_sd_testkit as support;

use std::time::Duration;

use support::dnsmasq::Dnsmasq;
use support::{authorities, follow, next_set};
use tokio::time::{Instant, timeout};
use tower_sd::registry::dns::{DnsRegistry, DnsRegistryBuilder, RecordKind};
use tower_sd::{Error, ServiceInstance, ServiceQuery, ServiceRegistry};

const GREETER: &[&str] = &[
    "srv-host=_grpc._tcp.greeter.test,a.greeter.test,50051,0,10",
    "srv-host=_grpc._tcp.greeter.test,b.greeter.test,50052,0,30",
    // A backup at a higher priority number: a tier of its own.
    "srv-host=_grpc._tcp.greeter.test,c.greeter.test,50053,1,10",
    "host-record=a.greeter.test,10.0.0.1",
    "host-record=c.greeter.test,10.0.0.3",
    "host-record=web.test,10.0.1.1,fd00::1",
    // Priority 0's only target resolves only once a test writes its hosts file: until then
    // it is kept by name.
    "srv-host=_grpc._tcp.backup.test,gone.backup.test,50061,0,10",
    "srv-host=_grpc._tcp.backup.test,spare.backup.test,50062,5,10",
    "host-record=spare.backup.test,10.0.3.2",
    // No priority has a target that resolves: both are kept by name.
    "srv-host=_grpc._tcp.dark.test,x.dark.test,7001,0,1",
    "srv-host=_grpc._tcp.dark.test,y.dark.test,7002,1,1",
    // A target with no address record: dialled by name.
    "srv-host=_http._tcp.named.test,nowhere.test,8080,0,0",
    // No target: dnsmasq answers the record of RFC 2782's "decidedly not available" (`.`).
    "srv-host=_grpc._tcp.closed.test",
];

fn builder(dns: &Dnsmasq) -> DnsRegistryBuilder {
    DnsRegistry::builder()
        .nameservers([dns.addr])
        .min_ttl(Duration::from_millis(100))
        .max_ttl(Duration::from_millis(300))
        .timeout(Duration::from_secs(2))
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

#[tokio::test]
async fn srv_records_give_targets_ports_and_weights() {
    let _limit = support::time_limit(120);
    support::trace_init();
    let Some(dns) = Dnsmasq::start(GREETER, 1).await else {
        return;
    };
    dns.hosts("b", &["10.0.0.2 b.greeter.test"]);
    let registry = builder(&dns).build().unwrap();
    let set = registry
        .discover(&ServiceQuery::new("_grpc._tcp.greeter.test"))
        .await
        .unwrap();
    assert_eq!(
        authorities(&set),
        ["10.0.0.1:50051", "10.0.0.2:50052", "10.0.0.3:50053"],
        "every priority"
    );
    let priorities: Vec<u16> = set.iter().map(|i| i.priority).collect();
    assert_eq!(priorities, [0, 0, 1]);
    assert_eq!(set[0].weight, 10);
    assert_eq!(set[1].weight, 30);
    assert_eq!(set[0].id, "10.0.0.1:50051");
    assert_eq!(set[0].name, "_grpc._tcp.greeter.test");
    assert_eq!(set[0].metadata["srv_target"], "a.greeter.test");
    assert_eq!(set[0].metadata["srv_priority"], "0");

    let named = registry
        .discover(&ServiceQuery::new("_http._tcp.named.test"))
        .await
        .unwrap();
    assert_eq!(authorities(&named), ["nowhere.test:8080"]);
    assert_eq!(named[0].weight, 1, "weight 0 counts as 1");
}

/// Catches "lowest priority only" (the spare would never be in the set, so the balancer
/// could not spill to it) and priorities lost on the way (every instance in one tier): each
/// SRV priority is the instances' tier, whether or not their target resolves.
#[tokio::test]
async fn every_srv_priority_is_a_tier_of_the_set() {
    let _limit = support::time_limit(120);
    support::trace_init();
    let Some(dns) = Dnsmasq::start(GREETER, 1).await else {
        return;
    };
    let registry = builder(&dns).build().unwrap();
    let tiers = |set: &[ServiceInstance]| -> Vec<(String, u16)> {
        set.iter().map(|i| (i.authority(), i.priority)).collect()
    };
    let set = registry
        .discover(&ServiceQuery::new("_grpc._tcp.backup.test"))
        .await
        .unwrap();
    assert_eq!(
        tiers(&set),
        [
            ("10.0.3.2:50062".to_owned(), 5),
            ("gone.backup.test:50061".to_owned(), 0)
        ],
        "the unresolved target by name, and the spare"
    );
    assert_eq!(set[0].metadata["srv_priority"], "5");

    let dark = registry
        .discover(&ServiceQuery::new("_grpc._tcp.dark.test"))
        .await
        .unwrap();
    assert_eq!(
        tiers(&dark),
        [
            ("x.dark.test:7001".to_owned(), 0),
            ("y.dark.test:7002".to_owned(), 1)
        ]
    );

    let mut watch = follow(&registry, "_grpc._tcp.backup.test");
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.3.2:50062", "gone.backup.test:50061"]
    );
    dns.hosts("gone", &["10.0.3.1 gone.backup.test"]);
    assert_eq!(
        next_set(&mut watch).await,
        ["10.0.3.1:50061", "10.0.3.2:50062"],
        "priority 0 resolves: by address"
    );
}

/// Catches an SRV target of `.` (RFC 2782: the service is decidedly not available here)
/// taken for a host: an instance with no address, which would be dialled.
#[tokio::test]
async fn an_srv_target_of_dot_means_no_instances() {
    let _limit = support::time_limit(120);
    support::trace_init();
    let Some(dns) = Dnsmasq::start(GREETER, 1).await else {
        return;
    };
    let registry = builder(&dns).build().unwrap();
    let closed = registry
        .discover(&ServiceQuery::new("_grpc._tcp.closed.test"))
        .await
        .unwrap();
    assert_eq!(authorities(&closed), Vec::<String>::new());
}

#[tokio::test]
async fn a_and_aaaa_records_on_a_fixed_port() {
    let _limit = support::time_limit(120);
    support::trace_init();
    let Some(dns) = Dnsmasq::start(GREETER, 1).await else {
        return;
    };
    let both = builder(&dns).build().unwrap();
    let set = both
        .discover(&ServiceQuery::new("web.test:8080"))
        .await
        .unwrap();
    assert_eq!(authorities(&set), ["10.0.1.1:8080", "[fd00::1]:8080"]);

    let v4 = builder(&dns)
        .record(RecordKind::A)
        .port(8080)
        .build()
        .unwrap();
    let set = v4.discover(&ServiceQuery::new("web.test")).await.unwrap();
    assert_eq!(authorities(&set), ["10.0.1.1:8080"]);
    let v6 = builder(&dns).record(RecordKind::Aaaa).build().unwrap();
    let set = v6
        .discover(&ServiceQuery::new("web.test:9090"))
        .await
        .unwrap();
    assert_eq!(authorities(&set), ["[fd00::1]:9090"]);

    let error = v6
        .discover(&ServiceQuery::new("web.test"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::InvalidConfig { .. }),
        "no port: {error:?}"
    );
}

#[tokio::test]
async fn records_changed_mid_test_reach_the_watch() {
    let _limit = support::time_limit(120);
    support::trace_init();
    // A 30 s TTL: only the ceiling (`max_ttl`: 300 ms asked, raised to the 1 s floor) makes
    // the changes show in time.
    let Some(dns) = Dnsmasq::start(GREETER, 30).await else {
        return;
    };
    dns.hosts("b", &["10.0.0.2 b.greeter.test"]);
    dns.hosts("api", &["10.0.2.1 api.test"]);
    let registry = builder(&dns).build().unwrap();

    let mut api = follow(&registry, "api.test:8080");
    assert_eq!(next_set(&mut api).await, ["10.0.2.1:8080"]);
    dns.hosts("api", &["10.0.2.1 api.test", "10.0.2.2 api.test"]);
    // The 30 s TTL is above the 1 s ceiling: the change shows within the ceiling (and the
    // resolver's cache does not hold it longer).
    let changed = Instant::now();
    assert_eq!(next_set(&mut api).await, ["10.0.2.1:8080", "10.0.2.2:8080"]);
    assert!(
        changed.elapsed() < Duration::from_secs(3),
        "{:?}",
        changed.elapsed()
    );

    let mut srv = follow(&registry, "_grpc._tcp.greeter.test");
    assert_eq!(
        next_set(&mut srv).await,
        ["10.0.0.1:50051", "10.0.0.2:50052", "10.0.0.3:50053"]
    );
    dns.hosts("b", &["10.0.0.22 b.greeter.test"]);
    assert_eq!(
        next_set(&mut srv).await,
        ["10.0.0.1:50051", "10.0.0.22:50052", "10.0.0.3:50053"],
        "a target moved"
    );
}

#[tokio::test]
async fn nxdomain_empties_the_set_only_when_it_repeats() {
    let _limit = support::time_limit(120);
    support::trace_init();
    let Some(dns) = Dnsmasq::start(&[], 0).await else {
        return;
    };
    dns.hosts("api", &["10.0.3.1 gone.test"]);
    // The records have TTL 0 (as Consul's DNS gives by default) and min_ttl asks for none:
    // the floor of 1 s holds anyway, so the watch does not resolve in a loop.
    let floor = Duration::from_secs(1);
    let registry = builder(&dns)
        .min_ttl(Duration::ZERO)
        .max_ttl(Duration::from_secs(1))
        .empty_after(3)
        .build()
        .unwrap();
    assert!(
        registry
            .discover(&ServiceQuery::new("nothing.test:80"))
            .await
            .unwrap()
            .is_empty()
    );

    let mut watch = follow(&registry, "gone.test:80");
    assert_eq!(next_set(&mut watch).await, ["10.0.3.1:80"]);
    dns.hosts("api", &[]);
    let removed = Instant::now();
    assert!(next_set(&mut watch).await.is_empty());
    // Three missing answers in a row, each at least the floor apart (the first may come at
    // once): a lost answer alone never empties the set.
    let after = removed.elapsed();
    assert!(after >= floor * 2, "emptied after {after:?}");

    dns.hosts("api", &["10.0.3.2 gone.test"]);
    assert_eq!(next_set(&mut watch).await, ["10.0.3.2:80"]);
}

#[tokio::test]
async fn an_unanswering_server_is_a_transient_error_and_the_watch_goes_on() {
    let _limit = support::time_limit(120);
    support::trace_init();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let registry = DnsRegistry::builder()
        .nameservers([silent.local_addr().unwrap()])
        .timeout(Duration::from_millis(200))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap();
    let error = registry
        .discover(&ServiceQuery::new("x.test:80"))
        .await
        .unwrap_err();
    let timed_out = |error: &Error| {
        matches!(
            error,
            Error::Timeout {
                registry: "dns",
                ..
            }
        )
    };
    assert!(timed_out(&error) && error.is_transient(), "{error:?}");
    let mut watch = follow(&registry, "x.test:80");
    for _ in 0..2 {
        let item = timeout(Duration::from_secs(10), watch.recv())
            .await
            .unwrap()
            .unwrap();
        let error = item.unwrap_err();
        assert!(timed_out(&error), "{error:?}");
    }
}

#[test]
fn registration_and_bad_settings_are_typed_errors() {
    let _limit = support::time_limit(30);
    let registry = DnsRegistry::builder()
        .nameservers(["127.0.0.1:53".parse().unwrap()])
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let error = runtime
        .block_on(registry.register(ServiceInstance::new("a", "b", "10.0.0.1", 1)))
        .unwrap_err();
    assert!(matches!(
        error,
        Error::Unsupported {
            operation: "register",
            registry: "dns",
            ..
        }
    ));
    assert!(matches!(
        runtime.block_on(registry.health("a")),
        Err(Error::Unsupported {
            operation: "health",
            registry: "dns",
            ..
        })
    ));

    let error = DnsRegistry::builder()
        .min_ttl(Duration::from_secs(10))
        .max_ttl(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert!(matches!(error, Error::InvalidConfig { ref key, .. } if key == "min_ttl"));
    assert!("mx".parse::<RecordKind>().is_err());
    assert_eq!("AAAA".parse::<RecordKind>().unwrap(), RecordKind::Aaaa);
}

/// Real tonic servers behind SRV records of `name`, one per priority given, each target
/// resolving to 127.0.0.1; a channel to them, once it lists them all. `None` when dnsmasq
/// is missing (the test then skips, saying so).
#[cfg(feature = "tonic")]
async fn srv_servers(
    name: &str,
    priorities: &[u16],
) -> Option<(
    Vec<support::servers::TestServer>,
    tower_sd::tonic::LoadBalancedChannel,
    Dnsmasq,
)> {
    use std::sync::Arc;

    support::trace_init();
    let mut servers = Vec::new();
    for n in 0..priorities.len() {
        servers.push(support::servers::TestServer::grpc(&format!("s{n}")).await);
    }
    let lines: Vec<String> = servers
        .iter()
        .zip(priorities)
        .enumerate()
        .flat_map(|(n, (server, priority))| {
            [
                format!(
                    "srv-host=_grpc._tcp.{name},s{n}.{name},{},{priority},10",
                    server.port
                ),
                format!("host-record=s{n}.{name},127.0.0.1"),
            ]
        })
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let dns = Dnsmasq::start(&lines, 1).await?;
    let registry = builder(&dns).build().unwrap();
    let channel = tower_sd::tonic::LoadBalancedChannel::builder(
        Arc::new(registry),
        format!("_grpc._tcp.{name}"),
    )
    .connect(Duration::from_secs(10))
    .await
    .unwrap();
    let ids: Vec<String> = servers
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    support::grpc::until_endpoints(
        &channel,
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    Some((servers, channel, dns))
}

#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_follows_srv_records_to_real_servers() {
    let _limit = support::time_limit(120);
    let Some((servers, channel, _dns)) = srv_servers("health.test", &[0, 0, 0]).await else {
        return;
    };
    support::grpc::checks(&channel, 6, 500).await;
    support::servers::assert_even_spread(&servers, 3_000);
}

/// Catches SRV priorities that do not reach the balancer as tiers: with two real servers at
/// priority 0 and one at priority 1, the spare serves nothing while the first two are up,
/// and everything once both are gone.
#[cfg(feature = "tonic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_keeps_to_the_lowest_srv_priority_and_spills_when_it_dies() {
    let _limit = support::time_limit(120);
    use support::grpc::checks;

    let Some((servers, channel, _dns)) = srv_servers("tiers.test", &[0, 0, 1]).await else {
        return;
    };
    // A connecting endpoint is not healthy, so until priority 0 is connected its share
    // spills to the spare: wait for every connection first.
    support::until("every endpoint is connected", || {
        channel
            .endpoints()
            .iter()
            .all(|e| e.connectivity == Some(tower_sd::endpoint::Connectivity::Ready))
    })
    .await;
    checks(&channel, 4, 100).await;
    assert_eq!(servers[2].served(), 0, "the priority-1 spare served");
    assert!(servers[0].served() > 100 && servers[1].served() > 100);

    servers[0].crash();
    servers[1].crash();
    support::until("priority 1 takes every call", || {
        channel
            .tiers()
            .iter()
            .map(|t| (t.priority, t.percent))
            .collect::<Vec<_>>()
            == [(0, 0), (1, 100)]
    })
    .await;
    checks(&channel, 4, 100).await;
    assert_eq!(servers[2].served(), 400, "the spare serves every call");
}
