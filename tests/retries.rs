//! Retries around the balancer on paused time: tower's `Retry` with a budget reaches another
//! endpoint (the failing one ejected), and stops when the budget is spent.

use tower_sd_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use support::fleet::Fleet;
use tower::{BoxError, Service, ServiceExt};
use tower_sd::balance::{Balance, EndpointState, OutlierDetection};

/// A retry policy with tower's budget: retries failed requests while the budget allows.
#[derive(Clone)]
struct RetryFailures(Arc<tower::retry::budget::TpsBudget>);

impl tower::retry::Policy<(), usize, BoxError> for RetryFailures {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _: &mut (), result: &mut Result<usize, BoxError>) -> Option<Self::Future> {
        use tower::retry::budget::Budget;
        match result {
            Ok(_) => {
                self.0.deposit();
                None
            }
            Err(_) => self.0.withdraw().then(|| std::future::ready(())),
        }
    }

    fn clone_request(&mut self, (): &()) -> Option<()> {
        Some(())
    }
}

#[tokio::test(start_paused = true)]
async fn retries_with_a_budget_reach_another_endpoint() {
    let _limit = support::time_limit(60);
    // With a single failure ejecting, a retried request cannot land on the endpoint that just
    // failed it: the retry's own pick sees that endpoint ejected.
    let once = OutlierDetection::default().consecutive_failures(1);
    let fleet = Fleet::new(3, Balance::builder().outlier_detection(Some(once))).await;
    fleet.fail(0, true);
    let budget = Arc::new(tower::retry::budget::TpsBudget::new(
        Duration::from_secs(10),
        10,
        0.2,
    ));
    let mut retrying = tower::ServiceBuilder::new()
        .retry(RetryFailures(budget))
        .service(fleet.balance.clone());
    for _ in 0..100 {
        let id = retrying.ready().await.unwrap().call(()).await.unwrap();
        assert_ne!(id, 0);
    }
    // Endpoint 0 failed one request (which the retry then served elsewhere) and was ejected.
    assert_eq!(fleet.calls(0), 1);
    assert_eq!(fleet.state(0).0, EndpointState::Ejected);
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_retry_budget_stops_retrying() {
    let _limit = support::time_limit(60);
    // Every endpoint fails, so every attempt withdraws from the budget and none deposits:
    // its reserve (min_per_sec x ttl = 5 retries; time does not pass) is all the retrying
    // there is, whatever the number of requests.
    let fleet = Fleet::new(3, Balance::builder().outlier_detection(None)).await;
    for id in 0..3 {
        fleet.fail(id, true);
    }
    let budget = Arc::new(tower::retry::budget::TpsBudget::new(
        Duration::from_secs(1),
        5,
        0.0,
    ));
    let mut retrying = tower::ServiceBuilder::new()
        .retry(RetryFailures(budget))
        .service(fleet.balance.clone());
    for _ in 0..20 {
        assert!(retrying.ready().await.unwrap().call(()).await.is_err());
    }
    let attempts: usize = (0..3).map(|id| fleet.calls(id)).sum();
    assert_eq!(
        attempts,
        20 + 5,
        "each request once, plus the budget's 5 retries"
    );
}
