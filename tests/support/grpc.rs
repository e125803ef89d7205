//! Calling real tonic servers through a `LoadBalancedChannel`, for the end-to-end tests.

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
        let mut have: Vec<String> = channel
            .balance()
            .endpoints()
            .into_iter()
            .map(|e| e.key)
            .collect();
        have.sort();
        if have == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("balancer never listed {want:?}");
}
