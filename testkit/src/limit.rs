//! Every async test runs under a wall-clock time limit, so a bug fails the run instead of
//! hanging CI: `let _limit = support::time_limit(SECS);` as a test's first line. The suite
//! checks that every async test has one (`tests/suite.rs`).
//!
//! The limit is counted on a thread of its own with the wall clock, so it also catches what a
//! `tokio::time::timeout` cannot: a task spinning under paused time, or a runtime parked with
//! no timer to advance to. When it passes, it names the test, kills the server processes the
//! tests started, and ends the test binary with a failure.

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

/// Ends the test binary if the test holding it is still running after `seconds`.
#[must_use = "the limit lasts as long as the guard"]
pub fn time_limit(seconds: u64) -> Limit {
    let name = std::thread::current().name().unwrap_or("a test").to_owned();
    let (done, finished) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) =
            finished.recv_timeout(Duration::from_secs(seconds))
        {
            let _ = writeln!(
                std::io::stderr(),
                "\nTIME LIMIT: `{name}` ran longer than {seconds} s; stopping the test binary"
            );
            super::process::kill_all();
            std::process::exit(101);
        }
    });
    Limit { _done: done }
}

/// Dropping it (the test ended, or panicked) lifts the limit.
pub struct Limit {
    _done: mpsc::Sender<()>,
}
