//! The etcd password: used to authenticate, and never shown in `Debug` output, errors or
//! logs. Alone in its binary so it can own the global log subscriber.
#![cfg(feature = "etcd")]

use tower_sd_testkit as support;

use std::time::Duration;

use futures_util::StreamExt;
use support::etcd::Etcd;
use tower_sd::registry::etcd::EtcdRegistry;
use tower_sd::{ServiceQuery, ServiceRegistry};

#[tokio::test]
async fn passwords_are_never_shown() {
    let _limit = support::time_limit(120);
    const PASSWORD: &str = "pa55-w0rd-91c2";
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    etcd.enable_auth(PASSWORD).await;
    let logs = support::logs::Logs::capture();

    let right = EtcdRegistry::builder([etcd.url()])
        .credentials("root", PASSWORD)
        .build()
        .unwrap();
    assert!(
        right
            .discover(&ServiceQuery::new("svc"))
            .await
            .unwrap()
            .is_empty()
    );

    // A wrong password fails; the watch logs the failure and goes on.
    const WRONG: &str = "wr0ng-pa55-77ab";
    let wrong = EtcdRegistry::builder([etcd.url()])
        .credentials("root", WRONG)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(20))
        .build()
        .unwrap();
    let mut watch = wrong.watch(&ServiceQuery::new("svc"));
    for _ in 0..2 {
        let error = watch.next().await.unwrap().unwrap_err();
        assert!(
            matches!(
                error,
                tower_sd::Error::Status {
                    registry: "etcd",
                    ..
                }
            ),
            "a refused password is etcd's answer: {error:?}"
        );
        let shown = format!("{error:?} {error}");
        assert!(!shown.contains(WRONG), "{shown}");
    }
    let debug = format!("{right:?} {wrong:?}");
    assert!(debug.contains("<redacted>") && !debug.contains(PASSWORD) && !debug.contains(WRONG));

    let logs = logs.text();
    assert!(
        logs.contains("etcd watch failed"),
        "logs were captured: {logs}"
    );
    assert!(
        !logs.contains(PASSWORD) && !logs.contains(WRONG),
        "a password leaked into logs"
    );
}
