//! The balancer's metrics, captured with a debugging recorder.
#![cfg(feature = "metrics")]

mod support;

use std::convert::Infallible;

use futures_util::stream;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower::discover::Change;
use tower_sd::balance::{Balance, OutlierDetection};

#[test]
fn requests_ejections_and_updates_are_counted() {
    let _limit = support::time_limit(60);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // A current-thread runtime keeps every task on this thread, under the local recorder.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let good = tower::service_fn(|()| async { Ok::<_, &'static str>(()) });
            let bad = tower::service_fn(|()| async { Err::<(), _>("boom") });
            let changes = vec![
                Ok::<_, Infallible>(Change::Insert(
                    0usize,
                    tower::util::BoxCloneSyncService::new(good),
                )),
                Ok(Change::Insert(
                    1,
                    tower::util::BoxCloneSyncService::new(bad),
                )),
            ];
            let balance = Balance::builder()
                .service_name("metered")
                .outlier_detection(Some(OutlierDetection::default().consecutive_failures(2)))
                .build(stream::iter(changes));
            support::until("both endpoints are listed", || {
                balance.endpoints().len() == 2
            })
            .await;
            for _ in 0..50 {
                let _ = balance.clone().oneshot(()).await;
            }
        });
    });

    let mut values = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        values.insert(format!("{} {}", key.key().name(), labels.join(",")), value);
    }
    let counter = |name: &str| match values.get(name) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!(
            "{name}: {other:?} in {:?}",
            values.keys().collect::<Vec<_>>()
        ),
    };
    assert_eq!(counter("tower_sd_ejections_total service=metered"), 1);
    assert_eq!(
        counter("tower_sd_requests_total service=metered,outcome=failure"),
        2
    );
    assert_eq!(
        counter("tower_sd_requests_total service=metered,outcome=success"),
        48
    );
    assert!(counter("tower_sd_updates_total service=metered") >= 1);
    assert!(values.contains_key("tower_sd_last_update_seconds service=metered"));
    assert!(values.contains_key("tower_sd_endpoints service=metered,state=ready"));
}
