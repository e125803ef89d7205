//! The balancer's updater task under abuse: settings with durations that overflow any
//! deadline, and a discovery stream that panics (paused time).
//!
//! Wrong implementations these fail: an `Instant + Duration` that panics inside the task
//! (discovery then freezes silently), and a dead updater whose last set is served for ever.

use tower_sd_testkit as support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::ServiceExt;
use tower::discover::Change;
use tower_sd::Error;
use tower_sd::balance::{Balance, LoadMetric, OutlierDetection, ZonePreference};

type Ping = tower::util::BoxCloneSyncService<(), usize, &'static str>;

fn ping(id: usize, fails: bool) -> Ping {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |()| async move {
        if fails { Err("boom") } else { Ok(id) }
    }))
}

#[tokio::test(start_paused = true)]
async fn durations_that_overflow_saturate() {
    let _limit = support::time_limit(60);
    let forever = Duration::MAX;
    let detection = OutlierDetection::default()
        .consecutive_failures(1)
        .base_ejection_time(forever)
        .max_ejection_time(forever);
    let (feed, fed) = support::feed::feed();
    let balance = Balance::builder()
        .wait_for_endpoints(forever)
        .slow_start(forever)
        .outlier_detection(Some(detection))
        .zone_preference(ZonePreference::new("here"))
        .load(LoadMetric::PeakEwma {
            default_rtt: forever,
            decay: forever,
        })
        .build(fed);
    for id in 0..4 {
        feed.insert(id, ping(id, id == 0));
    }
    support::until("listed", || balance.endpoints().len() == 4).await;
    for _ in 0..200 {
        let _ = balance.clone().oneshot(()).await;
        tokio::time::advance(Duration::from_secs(3600)).await;
    }
    // Still following discovery: a change is applied.
    let before = balance.updates();
    feed.remove(3);
    support::until("the change is applied", || balance.updates() > before).await;
    assert_eq!(balance.endpoints().len(), 3);
    let ejected = balance
        .endpoints()
        .into_iter()
        .find(|e| e.key == 0)
        .unwrap();
    assert!(
        ejected.ejected_for.is_some(),
        "ejected, for as good as ever"
    );
}

/// A discovery stream that yields its changes, then panics.
struct Panicking(Vec<Change<usize, Ping>>);

impl futures_core::Stream for Panicking {
    type Item = Result<Change<usize, Ping>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0.pop() {
            Some(change) => Poll::Ready(Some(Ok(change))),
            None => panic!("discovery went wrong"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_updater_fails_picks_instead_of_freezing_the_set() {
    let _limit = support::time_limit(60);
    let logs = support::logs::Logs::capture();
    let balance =
        Balance::builder()
            .service_name("frozen")
            .build(tower_sd::endpoint::Endpoints::new(Panicking(vec![
                Change::Insert(1, ping(1, false)),
            ])));
    support::until("the updater died", || {
        balance.clone().oneshot(()).now_or_never_err()
    })
    .await;
    let error = balance.clone().oneshot(()).await.unwrap_err();
    match error.downcast_ref::<Error>() {
        Some(Error::DiscoveryStopped { service }) => assert_eq!(service, "frozen"),
        other => panic!("expected DiscoveryStopped, got {other:?}"),
    }
    assert!(logs.text().contains("updater panicked"), "{}", logs.text());

    // A caller already waiting for endpoints is woken with the error, not left hanging.
    let empty = Balance::builder()
        .service_name("empty")
        .wait_for_endpoints(Duration::from_secs(3600))
        .build(tower_sd::endpoint::Endpoints::new(Panicking(Vec::new())));
    let started = tokio::time::Instant::now();
    let error = empty.oneshot(()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "woken at once");
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::DiscoveryStopped { .. })
    ));
}

/// Whether a request fails at once (as it does once the updater died).
trait NowOrNeverErr {
    fn now_or_never_err(self) -> bool;
}

impl<F: std::future::Future<Output = Result<usize, tower::BoxError>>> NowOrNeverErr for F {
    fn now_or_never_err(self) -> bool {
        use futures_util::FutureExt;
        matches!(self.now_or_never(), Some(Err(_)))
    }
}
