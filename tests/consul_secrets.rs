//! The Consul ACL token: sent, checked by the agent, and never shown in `Debug` output,
//! errors or logs. Alone in its binary so it can own the global log subscriber.
#![cfg(feature = "consul")]

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::fake_consul::{FakeConsul, Fault};
use tower_sd::registry::consul::ConsulRegistry;
use tower_sd::{Error, ServiceInstance, ServiceRegistry};

#[tokio::test]
async fn acl_tokens_are_sent_checked_and_never_shown() {
    let _limit = support::time_limit(60);
    const TOKEN: &str = "s3cr3t-acl-token-6f1e";
    let fake = FakeConsul::start(Some(TOKEN)).await;

    let wrong = ConsulRegistry::builder()
        .address(fake.url())
        .token("wrong")
        .build()
        .unwrap();
    match wrong.discover(&"svc".into()).await {
        Err(error @ Error::Status { status: 403, .. }) => {
            assert!(!format!("{error:?}").contains("wrong"));
        }
        other => panic!("expected 403, got {other:?}"),
    }

    // Capture every log line while the right token is used, including failures.
    let logs = support::logs::Logs::capture();

    let right = ConsulRegistry::builder()
        .address(fake.url())
        .token(TOKEN)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(20))
        .build()
        .unwrap();
    right
        .register(ServiceInstance::new("a", "svc", "10.0.0.1", 1))
        .await
        .unwrap();
    assert_eq!(right.discover(&"svc".into()).await.unwrap().len(), 1);
    fake.inject(Fault::Status(500));
    let mut watch = right.watch(&"svc".into());
    let first = watch.next().await.unwrap();
    assert!(
        matches!(first, Err(tower_sd::Error::Status { status: 500, .. })),
        "{first:?}"
    );
    let debug = format!("{right:?}");
    assert!(
        debug.contains("redacted") && !debug.contains(TOKEN),
        "{debug}"
    );
    let logs = logs.text();
    assert!(
        logs.contains("consul watch failed"),
        "logs were captured: {logs}"
    );
    assert!(!logs.contains(TOKEN), "the token leaked into logs");
}
