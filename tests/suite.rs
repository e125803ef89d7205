//! Rules the whole suite keeps, and which server-backed tests this run skips. Each skipped
//! test says so itself when it runs; the summary here is worked out from the installed
//! servers and the test sources, so it needs no place in the order the binaries run in.

use tower_sd_testkit as support;

use std::io::Write;

use support::process::{installed, required};

/// A server some tests start.
struct Server {
    /// What the tests run.
    what: &'static str,
    /// Whether it is installed.
    installed: fn() -> bool,
    /// How to install it.
    install: &'static str,
    /// What a test calls to start it.
    marker: &'static str,
    /// The test files whose tests skip without it, when compiled in this run.
    files: &'static [(&'static str, bool)],
}

const SERVERS: [Server; 5] = [
    Server {
        what: "etcd and etcdctl",
        installed: || installed("etcd") && installed("etcdctl"),
        install: "apt-get install -y etcd-server etcd-client",
        marker: "Etcd::start",
        files: &[
            ("tests/etcd.rs", cfg!(feature = "etcd")),
            ("tests/etcd_secrets.rs", cfg!(feature = "etcd")),
        ],
    },
    Server {
        what: "dnsmasq",
        installed: || installed("dnsmasq"),
        install: "apt-get install -y dnsmasq-base",
        marker: "Dnsmasq::start",
        files: &[("tests/dns.rs", cfg!(feature = "dns"))],
    },
    Server {
        what: "Python grpcio",
        installed: support::grpcio::installed,
        install: "pip install grpcio grpcio-health-checking",
        marker: "servers(&registry,",
        files: &[("tests/conformance_grpc.rs", cfg!(feature = "tonic"))],
    },
    Server {
        what: "nginx",
        installed: || installed("nginx"),
        install: "apt-get install -y nginx-light",
        marker: "Nginx::start",
        files: &[(
            "tests/conformance_nginx.rs",
            cfg!(all(feature = "http", feature = "tonic")),
        )],
    },
    Server {
        what: "nghttpd",
        installed: || installed("nghttpd"),
        install: "apt-get install -y nghttp2-server",
        marker: "Nghttpd::start",
        files: &[("tests/conformance_nghttpd.rs", cfg!(feature = "http"))],
    },
];

fn source(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// One line on the terminal (not captured by the harness) per server this run lacks, and
/// one summing up; under `TOWER_SD_REQUIRE_SERVERS=1`, a failure instead.
#[test]
fn skipped_server_tests() {
    let mut skipped = 0;
    let mut lines = Vec::new();
    for server in SERVERS {
        if (server.installed)() {
            continue;
        }
        let compiled: Vec<&str> = server
            .files
            .iter()
            .filter(|(_, compiled)| *compiled)
            .map(|(file, _)| *file)
            .collect();
        let tests: usize = compiled
            .iter()
            .map(|file| source(file).matches(server.marker).count())
            .sum();
        if tests > 0 {
            skipped += tests;
            lines.push(format!(
                "  {tests} tests in {} need {}: {}",
                compiled.join(", "),
                server.what,
                server.install
            ));
        }
    }
    let mut stderr = std::io::stderr();
    if skipped == 0 {
        let _ = writeln!(stderr, "server-backed tests: none skipped");
        return;
    }
    assert!(
        !required(),
        "server-backed tests skipped under TOWER_SD_REQUIRE_SERVERS=1:\n{}",
        lines.join("\n")
    );
    let _ = writeln!(
        stderr,
        "\nSKIPPED in this run: {skipped} server-backed tests do not run\n{}\n",
        lines.join("\n")
    );
}

/// Every async test starts with a time limit (`time_limit`), so none can hang CI: the test
/// files and the crate's unit tests.
#[test]
fn every_async_test_has_a_time_limit() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    let mut dirs = vec![root.join("tests"), root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                missing.extend(without_time_limit(&path));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "async tests without `let _limit = time_limit(..);` first: {missing:?}"
    );
}

/// The async tests of the file at `path` whose first statement is not a time limit.
fn without_time_limit(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut missing = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        if !line.trim_start().starts_with("#[tokio::test") {
            continue;
        }
        // The body's first statement, after the signature.
        let body = lines
            .by_ref()
            .skip_while(|(_, l)| !l.trim_end().ends_with('{'))
            .nth(1);
        if !body.is_some_and(|(_, l)| l.contains("time_limit(")) {
            missing.push(format!("{}:{}", path.display(), n + 1));
        }
    }
    missing
}
