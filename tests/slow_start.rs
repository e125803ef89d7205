//! Slow start on paused time: a new endpoint's share ramps up over the window.

use tower_sd_testkit as support;

use std::collections::HashMap;
use std::time::Duration;

use support::fleet::Fleet;
use tokio::time::advance;
use tower_sd::balance::Balance;

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_a_new_endpoint_up() {
    let _limit = support::time_limit(60);
    let builder = Balance::builder()
        .slow_start(Duration::from_secs(10))
        .outlier_detection(None);
    let mut fleet = Fleet::new(1, builder).await;
    advance(Duration::from_secs(60)).await;
    let new = fleet.add().await;
    let share =
        |served: &HashMap<usize, usize>| served.get(&new).copied().unwrap_or(0) as f64 / 4000.0;

    advance(Duration::from_secs(1)).await;
    let early = share(&fleet.send(4000).await.0);
    advance(Duration::from_secs(4)).await;
    let middle = share(&fleet.send(4000).await.0);
    advance(Duration::from_secs(6)).await;
    let done = share(&fleet.send(4000).await.0);
    // With two idle endpoints P2C splits evenly; the new one keeps ramp x its half.
    assert!(early < 0.10, "at 10% of the window: {early}");
    assert!(
        (0.18..0.32).contains(&middle),
        "at half the window: {middle}"
    );
    assert!((0.44..0.56).contains(&done), "after the window: {done}");
}
