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

/// Every async test, and every test that runs its own runtime (`block_on`), starts with a
/// time limit held for the whole test (`let _limit = time_limit(..)`; `let _ =` would drop
/// it at once), so none can hang CI: the test files and the crate's unit tests.
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

/// The tests of the file at `path` that need a time limit (async, or running a runtime of
/// their own) and whose first statement does not hold one.
fn without_time_limit(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut missing = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let line = line.trim_start();
        let sync = line.starts_with("#[test]");
        if !line.starts_with("#[tokio::test") && !sync {
            continue;
        }
        // The body: from the line after the signature's `{` to the next test, roughly.
        let Some(open) = (n..lines.len()).find(|&i| lines[i].trim_end().ends_with('{')) else {
            continue;
        };
        let end = (open + 1..lines.len())
            .find(|&i| lines[i].starts_with('}') || lines[i].starts_with("    }"))
            .unwrap_or(lines.len());
        if sync && !lines[open..end].iter().any(|l| l.contains("block_on(")) {
            continue;
        }
        // The first statement: `use` items and blank lines come before it.
        let first = lines[open + 1..end]
            .iter()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with("use "));
        if !holds_a_limit(first.copied().unwrap_or_default()) {
            missing.push(format!("{}:{}", path.display(), n + 1));
        }
    }
    missing
}

/// Whether `line` binds a time limit for the rest of the test: `let _limit = ...`, never
/// `let _ = ...` (which drops the guard at once).
fn holds_a_limit(line: &str) -> bool {
    let line = line.trim_start();
    line.contains("time_limit(") && line.starts_with("let _") && !line.starts_with("let _ =")
}

/// Catches the check fooled by a limit dropped at once, or missing from a test that runs
/// its own runtime.
#[test]
fn the_time_limit_check_cannot_be_fooled() {
    let _limit = tower_sd_testkit::time_limit(30);
    assert!(holds_a_limit("    let _limit = support::time_limit(60);"));
    assert!(!holds_a_limit("    let _ = support::time_limit(60);"));
    assert!(!holds_a_limit("    support::time_limit(60);"));
    assert!(!holds_a_limit("    let x = 1;"));
    let dir = tower_sd_testkit::process::ScratchDir::new("suite-check");
    let file = dir.join("sample.rs");
    std::fs::write(
        &file,
        "#[tokio::test]\nasync fn a() {\n    let _ = support::time_limit(1);\n}\n\n\
         #[test]\nfn b() {\n    let rt = x();\n    rt.block_on(async {});\n}\n\n\
         #[test]\nfn c() {\n    assert!(true);\n}\n",
    )
    .unwrap();
    let missing = without_time_limit(&file);
    assert_eq!(missing.len(), 2, "{missing:?}");
}

/// The crate's modules in the order data flows through them: a module imports only modules
/// of its own layer or an earlier one (the registries know nothing of balancing, the
/// balancer nothing of HTTP or connections, the connections nothing of the balancer).
const LAYERS: [&[&str]; 8] = [
    &["error", "instance", "backoff", "metrics"],
    &["registry"],
    &["endpoint"],
    &["discover"],
    &["balance"],
    &["connection"],
    &["classify"],
    &["tonic", "http", "mesh", "registration", "config", "lib"],
];

/// The source of `path` without comments and without its `#[cfg(test)] mod tests`.
fn code(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text
        .split_once("#[cfg(test)]\nmod tests")
        .map_or(text.as_str(), |(code, _)| code);
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names that follow `prefix` in `code`: `a` in `prefix a::X` and `a`, `b` in
/// `prefix {a::X, b}`.
fn imported(code: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut names = std::collections::BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(ident));
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|name| !name.is_empty());
    names
}

/// Every `.rs` file under `dir`, its tests directories and generated code left out.
fn sources(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() && name != "tests" && name != "proto" {
                dirs.push(path);
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The cycles in `edges` (a module graph), each as the path that closes it.
fn cycles(
    edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            found.push(cycle);
            return;
        }
        if !done.insert(node.to_owned()) {
            return;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, path, done, found);
        }
        path.pop();
    }
    let mut found = Vec::new();
    let mut done = std::collections::BTreeSet::new();
    for node in edges.keys() {
        visit(node, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

/// Catches an import against the data flow (the connections reaching into the balancer,
/// the error type into the endpoints) and an import cycle, between the crate's modules or
/// between the files of one module.
#[test]
fn modules_import_along_the_data_flow_and_never_in_a_circle() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer = |module: &str| LAYERS.iter().position(|layer| layer.contains(&module));
    let mut modules =
        std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    let mut files = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    let mut against = Vec::new();
    for path in sources(&src) {
        let relative = path.strip_prefix(&src).unwrap();
        let module = relative.iter().next().unwrap().to_string_lossy();
        let module = module.trim_end_matches(".rs").to_owned();
        let from = layer(&module).unwrap_or_else(|| panic!("`{module}` is in no layer"));
        let code = code(&path);
        for to in imported(&code, "crate::") {
            let Some(to_layer) = layer(&to) else { continue };
            if to != module {
                if to_layer > from {
                    against.push(format!("{} imports `{to}`", relative.display()));
                }
                modules.entry(module.clone()).or_default().insert(to);
            }
        }
        // Between the files of one directory: `super::file` and `crate::dir::file`.
        let Some(dir) = relative.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
            continue;
        };
        let file = relative.file_stem().unwrap().to_string_lossy().into_owned();
        let crate_path = format!("crate::{}::", dir.display()).replace('/', "::");
        let siblings = imported(&code, "super::")
            .into_iter()
            .chain(imported(&code, &crate_path));
        for sibling in siblings {
            if sibling != file && src.join(dir).join(format!("{sibling}.rs")).exists() {
                let key = |name: &str| format!("{}/{name}", dir.display());
                files.entry(key(&file)).or_default().insert(key(&sibling));
            }
        }
    }
    assert!(
        against.is_empty(),
        "imports against the data flow: {against:#?}"
    );
    let circles: Vec<_> = cycles(&modules).into_iter().chain(cycles(&files)).collect();
    assert!(circles.is_empty(), "import cycles: {circles:?}");
}
