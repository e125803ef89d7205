//! What the Connect-native mesh logs: a leaf the agent does not renew is warned about once,
//! not at every poll, and neither the ACL token nor a private key ever appears in the logs or
//! in `Debug` output. Alone in its binary so it can own the global log subscriber.
#![cfg(feature = "consul-connect")]

use tower_sd_testkit as support;

use std::time::Duration;

use support::fake_consul::FakeConsul;
use tower_sd::mesh::ConsulConnect;
use tower_sd::registry::consul::ConsulRegistry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leaf_is_warned_about_once_and_no_secret_is_logged() {
    let _limit = support::time_limit(60);
    const TOKEN: &str = "m3sh-t0k3n-91c4";
    let logs = support::logs::Logs::capture();
    let fake = FakeConsul::start(Some(TOKEN)).await;
    // A 10 s leaf, valid from 1 s back: the renewal point is 1.1 s before it expires.
    fake.set_leaf_lifetime(Duration::from_secs(10));
    fake.set_leaf_renewal(false);
    let consul = ConsulRegistry::builder()
        .address(fake.url())
        .token(TOKEN)
        .build()
        .unwrap();
    let web = ConsulConnect::builder(&consul, "web")
        .build()
        .await
        .unwrap();
    // Past the renewal point the leaf is asked for every second; wait for three such polls.
    let polls = || {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("GET connect/ca/leaf/web") && r.ends_with("wait=1s"))
            .count()
    };
    while polls() < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = logs.text();
    let warnings = text.matches("has not renewed the leaf certificate").count();
    assert_eq!(warnings, 1, "one warning per leaf, not per poll: {text}");
    let debug = format!("{web:?} {:?}", web.client_tls().unwrap());
    for shown in [&text, &debug] {
        assert!(!shown.contains(TOKEN), "the token leaked: {shown}");
        assert!(
            !shown.contains("PRIVATE KEY"),
            "a private key leaked: {shown}"
        );
    }
}
