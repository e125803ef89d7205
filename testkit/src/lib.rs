//! What tower-sd's tests, benches and examples share: real servers on loopback and the
//! fakes of the registries that cannot be installed here. Every module is compiled in: the
//! crate depends on tower-sd with every feature. A dev-dependency of tower-sd, not published;
//! `cargo doc -p tower-sd-testkit --open` shows these docs.
//!
//! # How tower-sd is tested
//!
//! The tests exercise real parts: real tonic and hyper servers on 127.0.0.1, a real etcd and a
//! real dnsmasq, and in-repo fakes of the Consul agent and the Kubernetes API server (which cannot
//! be installed here) that follow the documented APIs. The env-gated tests run the same scenarios
//! against real ones: `CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo test --features consul --test consul
//! -- --ignored`, `KUBECONFIG=... cargo test --features kubernetes --test kubernetes -- --ignored`.
//! Timing-dependent logic runs on paused tokio time; every async test has a wall-clock limit
//! ([`limit`]), so a bug fails the run instead of hanging it.
//!
//! # Conformance with servers nobody here wrote
//!
//! `tests/conformance_*.rs`: a behaviour is
//! verified when a server we did not write agrees. gRPC C-core through Python `grpcio`
//! (`testkit/grpcio_server.py`, driven by [`grpcio`], with the server options each test sets): GOAWAY at
//! `max_connection_age` under load, its ping policy (GOAWAY `too_many_pings`, and the
//! defaults against its real policy in a 6-minute test that `.ci/run` runs with `--ignored`),
//! a small `MAX_CONCURRENT_STREAMS` with long streams and more callers than slots, a server
//! killed under load, one failing its calls, deadlines. nginx (h2c and TLS, `grpc_pass` to a
//! tonic server too): the `Host`/`:authority` rule, GOAWAY after `keepalive_requests`, a
//! stream limit of 2. nghttpd (nghttp2): GETs and POSTs over h2c and TLS under a stream limit
//! of 2. Each test counts what the server saw, not only what the client got.
//!
//! # CI
//!
//! `.ci/run` is what CI runs on a fresh machine: it installs etcd, dnsmasq, nginx, nghttpd,
//! grpcio and cargo-hack, checks that the checked-in etcd API code is current, then `cargo fmt
//! --check`, clippy on the workspace and on each feature alone (`cargo hack`), `cargo doc` with
//! `-D warnings`, the README's test command, the 6-minute keepalive conformance test, and the
//! two run commands.
//!
//! # Mutation testing
//!
//! Test strength is measured with mutation testing (not in CI: it takes too long on 2 cores):
//!
//! ```text
//! cargo install cargo-mutants
//! cargo mutants --features http --file 'src/balance/*.rs' --file src/discover.rs \
//!   --timeout 180 -- --test balance --test outlier --test panic_mode --test slow_start \
//!   --test zones --test retries --test weights --test classification --test updater \
//!   --test balance_model --test discover --lib -- --skip stress
//! ```
//!
//! The record below names files as they were when each run was made (`tests/streams.rs` is
//! now `tests/classification.rs`; `tests/outlier.rs` was split by behaviour;
//! `tests/connection_states.rs` and `tests/connection_wire.rs` are now the unit tests in
//! `src/connection/tests/`, run by `--lib`; `driver.rs` is now `pool.rs`, `open.rs`,
//! `task.rs`, `future.rs` and `head.rs`).
//!
//! (511 mutants, 2-3 hours on 2 cores; `--file` one file for a quick look.) Last measured: 400
//! caught, 16 missed, 95 unviable: 96% of the viable ones. The 16 missed are equivalent: fast
//! paths whose slow path gives the same result, ties between two randomly ordered candidates,
//! a boundary whose both sides agree, and a clamp no stored state reaches. The files changed
//! since (`--file src/balance/load.rs --file src/balance/future.rs`, same tests): 47 mutants,
//! 38 caught, 3 missed, 6 unviable; one of the 3 (an abandoned request releasing the probe
//! whoever held it) now has a test, and the other 2 are a fast path and a boundary as above.
//! The in-flight-count change (`git diff 25ecf36 -- src > change.diff`, then `cargo mutants
//! --features http --in-diff change.diff` with the tests above and `--test updater`): 61
//! mutants, 38 caught, 1 missed, 22 unviable; the missed one was a match arm that did nothing
//! (a quiet success on the slow path, which `Health::record` handles alike), now removed. The
//! change that made snapshots hold the endpoints' states (stop 26: `--file
//! src/balance/endpoint.rs --re 'Slot<S, K>>::clone|Slot<S, K>>::drop|in_flight'` with
//! `--test balance --test balance_model --test weights --lib`): 4 mutants, 3 caught, 1
//! unviable; and deleting the clone's count by hand fails 4 tests of `tests/balance.rs`.
//! Every mutant of that change with the full test list above (stop 27: `git diff 62eadeb~1
//! 4580040 -- src/balance src/discover.rs > change.diff`, `--in-diff change.diff`): 6
//! mutants, 5 caught, 1 unviable.
//!
//! The Consul mesh code was measured the same way (`cargo mutants --no-default-features
//! --features consul-connect,tonic,http --file 'src/mesh/*.rs' -- --test consul_connect --test
//! consul_connect_logs --lib`, file by file): on `certs.rs`, `client.rs`, `identity.rs` and
//! `server.rs`, 86 mutants: 35 caught, 14 missed, 37 unviable. 11 of the 14 led to tests or
//! to removing code that did nothing (an unread change counter, an error cleared for nobody,
//! the authorization cache's expiry and bound, the once-per-leaf warning); rerun on the 23
//! mutants of the changed code: 16 caught, 1 missed, 6 unviable. `server.rs` again after its
//! last change: 36 mutants, 17 caught, 2 missed, 17 unviable; one of the 2, an eviction
//! boundary, now has a test (an answer exactly a ttl old is expired when the cache is full).
//! The 2 left are equivalent: `has_certs` (rustls reads it only for TLS 1.2 client auth, and
//! TLS 1.3 is negotiated) and an empty `root_hint_subjects` written another way.
//!
//! The connections, with the tests that drive them (today's names):
//!
//! ```text
//! cargo mutants --features tonic,http --file 'src/connection/*.rs' --timeout 90 -- \
//!   --test tonic_connections --test http_connections --test tonic --test http \
//!   --test classification --lib
//! ```
//!
//! (about 70 minutes on 2 cores; `--re NAME` for the mutants of one function.) The whole run,
//! before `tests/connection_states.rs` existed: 131 mutants, 48 caught, 39 missed, 44
//! unviable. The missed ones led to `tests/connection_states.rs` (one `Connection` against
//! servers at their worst: GOAWAY, a server that closes every connection at once, one that
//! accepts and never answers) and to removing two pieces of code that did nothing (a drained
//! connection's own stream count, since h2 closes such a connection by itself once its last
//! stream ends, and a task-id table for a panicked connection task). Then, with `--re`: the
//! 57 mutants of every function that had a missed one, against `connection_states` alone: 39
//! caught, 7 missed, 11 unviable (2 of the 7 in code since removed, 1 now tested); and the 27
//! of the changed functions and of the rest left in doubt, against all six: 22 caught, 4
//! missed, 1 unviable (1 of the 4 now tested). The 6 left are equivalent: `Sub::is_open ->
//! true`, `forget_closed -> ()` and two `cached_usable` mutants (a stale or closed connection taken
//! anyway: one still open is still in the set, and h2's own `poll_ready` refuses a closed
//! one, so the handle looks again), `cached_usable ->
//! false` (always looking in the set is slower, not wrong), and `||` for `&&` in
//! `poll_connected` (the look after registering for a wake-up does the same). The two files
//! have 127 mutants today; no full run was made after these changes, so the share caught is
//! an estimate: with the 44 unviable of the whole run, 77 of 83 viable (93%).
//!
//! The rest of `src/connection/` the same way (stop 26; `--file` for each, the six test
//! binaries above and `--lib`; `tests/connection_wire.rs` did not exist yet):
//! `retry.rs`, `replay.rs` and `pipe.rs`, 92 mutants: 23 caught, 6 missed, 63 unviable;
//! `ping.rs`, `dial.rs`, `tls.rs` and `settings.rs`, 130 mutants: 63 caught, 15 missed, 52
//! unviable. The missed ones led to `tests/connection_wire.rs` (a request body waits for the
//! server's flow-control window; a unary request goes out whole from one poll; the HTTP/2
//! settings and windows the client advertises), a unit test of every settings setter, Debug
//! checks (a request body, and a `TlsConfig` that never prints its key), and the removal of
//! a Debug impl nothing printed. Rerun on `settings.rs` and `tls.rs` with the new tests: 42
//! mutants, 28 caught, 0 missed, 14 unviable; the three `pipe.rs` mutants were each checked by
//! hand (each fails a new test). Left missed: `Retry::call`'s `buffer > 0` as `>=` (a request
//! head kept for a retry that a 0-byte buffer rules out anyway), `Io::is_write_vectored`
//! forced to `true` or `false` (both streams are vectored; `false` makes h2 copy frames into
//! one buffer: slower, same bytes), and `Io::poll_flush` and `poll_shutdown` doing nothing:
//! an 8 MiB body over TLS into a 4 KiB receive buffer read slowly still arrived whole with
//! the flush gone (h2's next writes push rustls's records out), and the socket closes when
//! the connection is dropped; these two are forwarding code no test here can tell apart.
//!
//! Stop 36, the code #29 and #30 changed (`cargo mutants --features tonic,http`):
//! `src/classify.rs`, `src/endpoint/*.rs`, `src/connection/error.rs` and `room.rs` against
//! `--test tonic_connections --test http_connections --test outlier --test balance --lib`:
//! 98 mutants, 52 caught, 19 missed, 27 unviable. The missed ones led to unit tests (a
//! stream error says whether the server may have seen the request; setting the same
//! readiness wakes no balancer; the classifier's unprocessed requests; waiters served in
//! line) or are equivalent: `Endpoint::plainly_usable -> false` (the slow path gives the
//! same answer), `Readiness::is_usable`'s `len() - 1` and `set`'s `|` for `^` (bits already
//! clear), `set_saturated`'s `&&` / `&` (the early return decides first). Then `--file
//! src/connection/room.rs --file src/connection/replay.rs -- --lib connection::` after the
//! waiters' line and the shared body recording: 103 mutants, 37 caught, 4 missed, 62
//! unviable, none missed in `replay.rs`; the 4 in `room.rs` against the two connection test
//! binaries and `--lib` (`--re 'Room::saturated|is_first|Drop for Waiting|Room::queued'`):
//! 12 mutants, 10 caught, 2 missed (the line's removal of a waiter that gave up), which the
//! property test `the_line_keeps_its_order_whoever_leaves` now catches (each checked by
//! hand).
//!
//! Stop 37, the retry policy, throttle and hedging of #31: `cargo mutants --in-place
//! --features full --file src/connection/policy.rs --file src/connection/hedge.rs
//! --cargo-arg=--lib` (`--cargo-arg`, not `-- --lib`: it keeps the build to the library's
//! tests, about 20 s a mutant instead of 3 minutes): 90 mutants, 72 caught, 7 missed, 11
//! unviable. The missed ones led to assertions (no `grpc-previous-rpc-attempts` on a first
//! attempt; each retry raises the next backoff; hedges won counted in `tests/metrics.rs`,
//! where `hedge_won`'s three mutants are caught) or to removing a branch of
//! `HedgeFuture::poll` that no state reaches (2). Not yet measured: `service_config.rs`,
//! `health.rs`, `http/probe.rs`, `http/retry.rs`.

#![allow(dead_code, unused_imports)]

/// Raises this process's soft limit on open files to `at_least` (within the hard limit),
/// for a test that holds many sockets; `false` when the hard limit is lower.
pub fn raise_fd_limit(at_least: u64) -> bool {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|soft| soft >= at_least) {
        return true;
    }
    if limit.maximum.is_some_and(|hard| hard < at_least) {
        return false;
    }
    limit.current = Some(at_least);
    setrlimit(Resource::Nofile, limit).is_ok()
}

pub mod dnsmasq;
pub mod endpoint_slices;
pub mod etcd;
pub mod fake_connect;
pub mod fake_consul;
pub mod fake_kube;
pub mod feed;
pub mod fleet;
pub mod grpc;
pub mod grpcio;
pub mod http_policies;
pub mod limit;
pub mod logs;
pub mod nghttpd;
pub mod nginx;
pub mod numbers;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod raw_h2;
pub mod servers;
pub mod trivial;
pub mod unreliable;

pub use limit::time_limit;
use tower_sd::ServiceInstance;

/// Waits until `done()` holds, checking every millisecond of tokio time (which paused-time
/// tests advance by themselves), and fails the test after 10 s of it, naming `what`.
pub async fn until(what: &str, done: impl FnMut() -> bool) {
    until_within(what, std::time::Duration::from_secs(10), done).await;
}

/// [`until`], giving up after `limit`.
pub async fn until_within(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting {limit:?} until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// [`until`] for a condition that is itself asynchronous (a registry query).
pub async fn until_async<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Installs a test-friendly tracing subscriber once; logs show with `--nocapture`.
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_sd=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// An instance of `name` on 127.0.0.1.
pub fn instance(id: &str, name: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(id, name, "127.0.0.1", port)
}

/// The ids of a set, in order.
pub fn ids(set: &[ServiceInstance]) -> Vec<&str> {
    set.iter().map(|instance| instance.id.as_str()).collect()
}

/// A watch followed from a task of its own, as a balancer follows one, so it keeps running
/// while a test changes the registry.
pub type Watch = tokio::sync::mpsc::Receiver<tower_sd::Result<Vec<ServiceInstance>>>;

/// Follows `registry`'s watch of `query`.
pub fn follow(
    registry: &dyn tower_sd::ServiceRegistry,
    query: impl Into<tower_sd::ServiceQuery>,
) -> Watch {
    use futures_util::StreamExt;
    let mut stream = registry.watch(&query.into());
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The watch's next item, within 20 s.
pub async fn next_item(watch: &mut Watch) -> tower_sd::Result<Vec<ServiceInstance>> {
    tokio::time::timeout(std::time::Duration::from_secs(20), watch.recv())
        .await
        .expect("the watch yields in time")
        .expect("the watch never ends")
}

/// The watch's next set, skipping the errors before it (each checked by `expected`) for at
/// most `limit`: a registry that keeps failing fails the test instead of looping.
pub async fn next_set_after_errors(
    watch: &mut Watch,
    limit: std::time::Duration,
    mut expected: impl FnMut(&tower_sd::Error) -> bool,
) -> Vec<ServiceInstance> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let item = tokio::time::timeout(left, watch.recv())
            .await
            .unwrap_or_else(|_| panic!("no set within {limit:?}, only errors"))
            .expect("the watch never ends");
        match item {
            Ok(set) => return set,
            Err(error) => assert!(expected(&error), "unexpected error {error:?}"),
        }
    }
}

/// The `host:port` of each instance, sorted.
pub fn authorities(set: &[ServiceInstance]) -> Vec<String> {
    let mut all: Vec<String> = set.iter().map(ServiceInstance::authority).collect();
    all.sort();
    all
}

/// The authorities of the watch's next set, failing on an error.
pub async fn next_set(watch: &mut Watch) -> Vec<String> {
    authorities(&next_item(watch).await.expect("a set, not an error"))
}
