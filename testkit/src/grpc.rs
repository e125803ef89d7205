//! Calling real tonic servers through a `LoadBalancedChannel`, for the end-to-end tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower_sd::tonic::LoadBalancedChannel;

/// One `grpc.health.v1` check; a check that takes over 10 s fails as `DEADLINE_EXCEEDED`.
pub async fn check(client: &mut HealthClient<LoadBalancedChannel>) -> Result<(), tonic::Status> {
    let request = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(10), request).await {
        Ok(answer) => answer.map(drop),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 10 s")),
    }
}

/// `tasks` concurrent clients, each making `each` successful checks.
pub async fn checks(channel: &LoadBalancedChannel, tasks: usize, each: usize) {
    let tasks: Vec<_> = (0..tasks)
        .map(|_| {
            let mut client = HealthClient::new(channel.clone());
            tokio::spawn(async move {
                for _ in 0..each {
                    check(&mut client).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Waits until the channel's balancer lists exactly the instances with these names.
pub async fn until_endpoints(channel: &LoadBalancedChannel, names: &[&str]) {
    let mut want: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    want.sort();
    for _ in 0..5_000 {
        let mut have: Vec<String> = channel.endpoints().into_iter().map(|e| e.key).collect();
        have.sort();
        if have == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("balancer never listed {want:?}");
}

/// The connection state of the balancer's endpoint `key`.
pub fn connectivity(
    channel: &LoadBalancedChannel,
    key: &str,
) -> Option<tower_sd::endpoint::Connectivity> {
    channel
        .endpoints()
        .into_iter()
        .find(|e| e.key == key)
        .and_then(|e| e.connectivity)
}

/// Callers sending checks continuously until stopped, counting their successes.
pub struct Callers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    /// Each caller's successes.
    each: Vec<Arc<AtomicUsize>>,
    tasks: Vec<tokio::task::JoinHandle<Vec<tonic::Status>>>,
}

impl Callers {
    /// `tasks` callers on clones of `channel`.
    pub fn start(channel: &LoadBalancedChannel, tasks: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let each: Vec<_> = (0..tasks).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let tasks = each
            .iter()
            .map(|mine| {
                let mut client = HealthClient::new(channel.clone());
                let (stop, ok, mine) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(mine));
                tokio::spawn(async move {
                    let mut failed = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match check(&mut client).await {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                mine.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(status) => failed.push(status),
                        }
                    }
                    failed
                })
            })
            .collect();
        Self {
            stop,
            ok,
            each,
            tasks,
        }
    }

    /// Each caller's successful checks so far.
    pub fn each(&self) -> Vec<usize> {
        self.each.iter().map(|n| n.load(Ordering::SeqCst)).collect()
    }

    /// Successful checks so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `more` checks have succeeded from now (for at most 30 s): progress
    /// measured in requests, not in time, so a busy machine only makes it slower.
    pub async fn succeed(&self, more: usize) {
        let target = self.ok() + more;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.ok() < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {target} checks succeeded in 30 s",
                self.ok()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Stops the callers; returns the successes and every failure.
    pub async fn stop(self) -> (usize, Vec<tonic::Status>) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failed = Vec::new();
        for task in self.tasks {
            failed.extend(task.await.unwrap());
        }
        (self.ok.load(Ordering::SeqCst), failed)
    }
}
