//! Runs a fixed number of requests through `Balance` over trivial endpoints, so tools that
//! count rather than time can measure one request.
//!
//! ```text
//! cargo build --release --example picks
//! # instructions per request (divide the `run_requests` inclusive Ir by REQUESTS):
//! valgrind --tool=callgrind --toggle-collect='picks::run_requests*' \
//!     target/release/examples/picks 16 1000000
//! # allocations per request: compare the block totals of two request counts
//! valgrind --tool=dhat target/release/examples/picks 16 0
//! valgrind --tool=dhat target/release/examples/picks 16 1000000
//! ```
//!
//! Arguments: the number of endpoints (default 16), of requests (default 1,000,000), and
//! `off` to turn outlier detection off or `weighted` to give the endpoints weights 1 to 4.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use futures_util::stream;
use tower::Service;
use tower::discover::Change;
use tower_sd::balance::Balance;
use tower_sd::endpoint::Endpoint;

use tower_sd_testkit::trivial;

use trivial::Trivial;

/// The measured loop: `requests` times poll_ready, call, and poll the response.
#[inline(never)]
fn run_requests(balance: &mut Balance<Trivial, usize>, requests: u64) {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..requests {
        assert!(balance.poll_ready(&mut cx).is_ready());
        let response = pin!(balance.call(()));
        assert!(response.poll(&mut cx).is_ready());
    }
}

fn main() {
    let mut args = std::env::args().skip(1).take(2).map(|a| a.parse::<u64>());
    let endpoints = args.next().unwrap_or(Ok(16)).expect("endpoints: a number");
    let requests = args
        .next()
        .unwrap_or(Ok(1_000_000))
        .expect("requests: a number");
    let mode = std::env::args().nth(3);
    let outlier_off = mode.as_deref() == Some("off");
    let weighted = mode.as_deref() == Some("weighted");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut balance = rt.block_on(async {
        let changes: Vec<_> = (0..endpoints as usize)
            .map(|key| {
                let weight = if weighted { 1 + (key % 4) as u32 } else { 1 };
                Ok::<_, Infallible>(Change::Insert(key, Endpoint::new(Trivial).weight(weight)))
            })
            .collect();
        let builder = if outlier_off {
            Balance::builder().outlier_detection(None)
        } else {
            Balance::builder()
        };
        let balance = builder.build(stream::iter(changes));
        while balance.endpoints().len() < endpoints as usize {
            tokio::task::yield_now().await;
        }
        balance
    });
    // One request outside the measurement, so lazy thread-local set-up is not counted.
    run_requests(&mut balance, 1);
    run_requests(&mut balance, requests);
    println!("{requests} requests over {endpoints} endpoints");
}
