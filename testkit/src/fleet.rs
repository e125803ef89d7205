//! A fleet of scripted endpoints for the balancer's tests on paused time: each answers its
//! id, or fails while its switch is on, counts its calls, and can hold its answers back or
//! fail `poll_ready`; the fleet feeds them to a [`Balance`] and sends requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tower::{Service, ServiceExt};
use tower_sd::balance::{Balance, BalanceBuilder, EndpointState, OutlierDetection};

/// An endpoint that answers its id, or fails while its switch is on; counts its calls. Its
/// answers can also be held back for ever (`hang`), and its `poll_ready` made to fail.
#[derive(Clone)]
pub struct Flaky {
    pub id: usize,
    pub failing: Arc<AtomicBool>,
    pub calls: Arc<AtomicUsize>,
    pub hang: Arc<AtomicBool>,
    pub unready: Arc<AtomicBool>,
    /// `poll_ready` calls answered "not ready".
    pub refusals: Arc<AtomicUsize>,
}

impl Flaky {
    pub fn new(id: usize, failing: Arc<AtomicBool>, calls: Arc<AtomicUsize>) -> Self {
        Self {
            id,
            failing,
            calls,
            hang: Arc::default(),
            unready: Arc::default(),
            refusals: Arc::default(),
        }
    }
}

impl Service<()> for Flaky {
    type Response = usize;
    type Error = &'static str;
    type Future = futures_util::future::BoxFuture<'static, Result<usize, &'static str>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(if self.unready.load(Ordering::SeqCst) {
            self.refusals.fetch_add(1, Ordering::SeqCst);
            Err("not ready")
        } else {
            Ok(())
        })
    }

    fn call(&mut self, (): ()) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = |failing: &AtomicBool, id| {
            if failing.load(Ordering::SeqCst) {
                Err("boom")
            } else {
                Ok(id)
            }
        };
        if !self.hang.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(answer(&self.failing, self.id)));
        }
        // Held until the switch is turned off, then answered as the endpoint is then.
        let (hang, failing, id) = (Arc::clone(&self.hang), Arc::clone(&self.failing), self.id);
        Box::pin(async move {
            while hang.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            answer(&failing, id)
        })
    }
}

pub struct Fleet {
    pub switches: Vec<Arc<AtomicBool>>,
    pub calls: Vec<Arc<AtomicUsize>>,
    pub hangs: Vec<Arc<AtomicBool>>,
    pub unready: Vec<Arc<AtomicBool>>,
    pub refusals: Vec<Arc<AtomicUsize>>,
    pub feed: crate::feed::Feed<usize, Flaky>,
    pub balance: Balance<Flaky, usize>,
}

impl Fleet {
    pub async fn new(n: usize, builder: BalanceBuilder) -> Self {
        let (feed, fed) = crate::feed::feed();
        let balance = builder.build(fed);
        let mut fleet = Self {
            switches: Vec::new(),
            calls: Vec::new(),
            hangs: Vec::new(),
            unready: Vec::new(),
            refusals: Vec::new(),
            feed,
            balance,
        };
        for _ in 0..n {
            fleet.add().await;
        }
        fleet
    }

    pub async fn add(&mut self) -> usize {
        let id = self.switches.len();
        let flaky = Flaky::new(id, Arc::default(), Arc::default());
        self.switches.push(Arc::clone(&flaky.failing));
        self.calls.push(Arc::clone(&flaky.calls));
        self.hangs.push(Arc::clone(&flaky.hang));
        self.unready.push(Arc::clone(&flaky.unready));
        self.refusals.push(Arc::clone(&flaky.refusals));
        self.feed.insert(id, flaky);
        crate::until("the endpoint is listed", || {
            self.balance.endpoints().iter().any(|e| e.key == id)
        })
        .await;
        id
    }

    /// Calls the endpoint has received, successful or not.
    pub fn calls(&self, id: usize) -> usize {
        self.calls[id].load(Ordering::SeqCst)
    }

    pub fn fail(&self, id: usize, failing: bool) {
        self.switches[id].store(failing, Ordering::SeqCst);
    }

    /// Sends `n` requests; returns successes per endpoint and the number of failures.
    pub async fn send(&self, n: usize) -> (HashMap<usize, usize>, usize) {
        let (mut served, mut failed) = (HashMap::new(), 0);
        for _ in 0..n {
            match self.balance.clone().oneshot(()).await {
                Ok(id) => *served.entry(id).or_default() += 1,
                Err(_) => failed += 1,
            }
        }
        (served, failed)
    }

    pub fn state(&self, id: usize) -> (EndpointState, Option<Duration>) {
        let e = self
            .balance
            .endpoints()
            .into_iter()
            .find(|e| e.key == id)
            .unwrap();
        (e.state, e.ejected_for)
    }
}

pub fn detection() -> OutlierDetection {
    OutlierDetection::default()
        .consecutive_failures(3)
        .base_ejection_time(Duration::from_secs(30))
        .max_ejection_time(Duration::from_secs(75))
}
