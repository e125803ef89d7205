//! The Consul ACL token: sent, checked by the agent, and never shown in `Debug` output,
//! errors or logs. Alone in its binary so it can own the global log subscriber.
#![cfg(feature = "consul")]

use tower_sd_testkit as support;

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
    // A token the agent knows that may not read the service: the warning names the ACL
    // problem, never the token.
    const READER: &str = "r34d3r-0f-0th3r-8c2d";
    fake.add_token(
        READER,
        support::fake_consul::Policy {
            read: vec!["other".into()],
            write: false,
        },
    );
    let restricted = ConsulRegistry::builder()
        .address(fake.url())
        .token(READER)
        .build()
        .unwrap();
    let error = restricted.discover(&"svc".into()).await.unwrap_err();
    assert!(!format!("{error:?} {error}").contains(READER));

    let logs = logs.text();
    assert!(
        logs.contains("consul watch failed"),
        "logs were captured: {logs}"
    );
    assert!(
        logs.contains("filtered this answer by ACLs") && logs.contains("service:read"),
        "the ACL problem is named: {logs}"
    );
    assert!(
        !logs.contains(TOKEN) && !logs.contains(READER),
        "a token leaked into logs"
    );
}

/// Run as a separate process by `a_loopback_agent_is_never_reached_through_a_proxy`, with
/// `HTTP_PROXY` set: discovers from the agent it is given, and says how it went.
#[tokio::test]
#[ignore = "helper process for a_loopback_agent_is_never_reached_through_a_proxy"]
async fn proxied_process() {
    let _limit = support::time_limit(60);
    let Ok(agent) = std::env::var("TOWER_SD_AGENT") else {
        return;
    };
    let mut builder = ConsulRegistry::builder().address(agent).token("management");
    if std::env::var_os("TOWER_SD_USE_PROXY").is_some() {
        builder = builder.system_proxy(true);
    }
    let outcome = builder.build().unwrap().discover(&"svc".into()).await;
    println!("OUTCOME {}", if outcome.is_ok() { "ok" } else { "error" });
}

#[tokio::test]
async fn a_loopback_agent_is_never_reached_through_a_proxy() {
    let _limit = support::time_limit(60);
    let agent = FakeConsul::start(Some("management")).await;
    // A "proxy" that records what reaches it (an agent answers proxied requests too).
    let proxy = FakeConsul::start(None).await;
    let run = |use_proxy: bool| {
        let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
        command
            .args(["proxied_process", "--exact", "--ignored", "--nocapture"])
            .env("TOWER_SD_AGENT", agent.url())
            .env("HTTP_PROXY", proxy.url())
            .env("http_proxy", proxy.url())
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .kill_on_drop(true);
        if use_proxy {
            command.env("TOWER_SD_USE_PROXY", "1");
        }
        async move {
            let output = command.output().await.unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    let direct = run(false).await;
    assert!(direct.contains("OUTCOME ok"), "{direct}");
    assert!(
        proxy.tokens_seen().is_empty(),
        "the token went through the proxy"
    );
    assert!(proxy.requests().is_empty());
    // Asked to, it does use the system's proxy (so the check above can fail).
    let proxied = run(true).await;
    assert!(proxied.contains("OUTCOME ok"), "{proxied}");
    assert_eq!(proxy.tokens_seen(), ["management"]);
}
