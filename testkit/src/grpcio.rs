//! A gRPC C-core server (Python `grpcio`, `testkit/grpcio_server.py`) on loopback, with
//! the server options each test sets, for the conformance tests: what C-core's own HTTP/2
//! transport does (GOAWAY at `max_connection_age`, ping enforcement, stream limits) is what
//! tower-sd must agree with.
//!
//! A missing `python3` or `grpcio` skips the test with the install hint, except under
//! `TOWER_SD_REQUIRE_SERVERS=1` (`.ci/run`, which installs them), where it fails.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::process::{Server, have_with, scratch_dir};

/// The PyPI packages the server needs, as `.ci/run` installs them.
pub const PACKAGES: &str = "grpcio grpcio-health-checking";

/// Whether `python3` can import grpcio and its health service.
pub fn installed() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_health.v1.health"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// What the server saw, from its control port.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Calls of `Check`.
    pub checks: u64,
    /// Calls of `Watch`.
    pub watches: u64,
    /// Distinct client connections (by peer address) that made calls.
    pub connections: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
    /// Calls the client cancelled before they ended.
    pub cancelled: u64,
    /// Calls failed on request (`fail_rate`).
    pub failed: u64,
    /// The time left to the last call's deadline (`grpc-timeout`) when it arrived.
    pub deadline: Option<Duration>,
}

/// A `Check` call the server saw with a `call-id`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub call: String,
    /// Its `grpc-previous-rpc-attempts`.
    pub previous: Option<u32>,
    /// When it arrived, since the server started.
    pub at: Duration,
    /// Whether the server failed it.
    pub failed: bool,
}

pub struct GrpcIo {
    /// The gRPC port.
    pub port: u16,
    control: u16,
    server: Server,
}

impl GrpcIo {
    /// Starts a server with these C-core channel arguments (for example
    /// `("grpc.max_connection_age_ms", 500)`); `None` (after saying why) when grpcio is not
    /// installed.
    pub async fn start(options: &[(&str, i64)]) -> Option<Self> {
        if !have_with("grpcio", installed, &format!("pip install {PACKAGES}")) {
            return None;
        }
        let options: serde_json::Map<String, Value> = options
            .iter()
            .map(|(name, value)| ((*name).to_owned(), json!(value)))
            .collect();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpcio_server.py");
        let dir = scratch_dir("grpcio");
        let mut server = Server::spawn(
            Command::new("python3")
                .arg(script)
                .arg(Value::Object(options).to_string()),
            &dir,
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = server.log().lines().find(|l| l.starts_with("READY ")) {
                let mut ports = line.split_whitespace().skip(1).map(|p| p.parse().unwrap());
                let (port, control) = (ports.next().unwrap(), ports.next().unwrap());
                return Some(Self {
                    port,
                    control,
                    server,
                });
            }
            assert!(
                !server.exited(),
                "the grpcio server did not start:\n{}",
                server.log()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the grpcio server did not start in 30 s:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one control command; its answer.
    pub async fn command(&self, command: Value) -> Value {
        let tcp = TcpStream::connect(("127.0.0.1", self.control))
            .await
            .expect("the control port");
        let (read, mut write) = tcp.into_split();
        write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await.unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// What the server saw so far.
    pub async fn seen(&self) -> Seen {
        let stats = self.command(json!({"op": "stats"})).await;
        let number = |v: &Value| v.as_u64().unwrap_or(0);
        Seen {
            checks: number(&stats["calls"]["Check"]),
            watches: number(&stats["calls"]["Watch"]),
            connections: number(&stats["peers"]),
            in_flight: number(&stats["in_flight"]),
            max_in_flight: number(&stats["max_in_flight"]),
            cancelled: number(&stats["cancelled"]),
            failed: number(&stats["failed"]),
            deadline: stats["deadline"].as_f64().map(Duration::from_secs_f64),
        }
    }

    /// Each `Check` call that carried a `call-id`, in the order they came.
    pub async fn attempts(&self) -> Vec<Attempt> {
        let answer = self.command(json!({"op": "attempts"})).await;
        let list = answer["attempts"].as_array().cloned().unwrap_or_default();
        list.iter()
            .map(|entry| Attempt {
                call: entry[0].as_str().unwrap_or_default().to_owned(),
                previous: entry[1].as_str().and_then(|p| p.parse().ok()),
                at: Duration::from_secs_f64(entry[2].as_f64().unwrap_or(0.0)),
                failed: entry[3].as_bool().unwrap_or(false),
            })
            .collect()
    }

    /// How `Check` answers from now on (see the script: `delay_ms`, `fail_rate`,
    /// `fail_code`, `pushback_ms`, `headers_first`).
    pub async fn set(&self, behaviour: Value) {
        let mut command = behaviour;
        command["op"] = json!("set");
        self.command(command).await;
    }

    /// Sets the health status of `service` (`SERVING`, `NOT_SERVING`, ...).
    pub async fn health(&self, service: &str, status: &str) {
        let command = json!({"op": "health", "service": service, "status": status});
        self.command(command).await;
    }

    /// Kills the server (SIGKILL): its connections die with no GOAWAY.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// The server's output so far, for failure messages.
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// `n` servers with these options, each registered in `registry` as an instance of
    /// `service` named `{prefix}{i}`; `None` when grpcio is missing (the test is skipped,
    /// saying so).
    pub async fn registered(
        registry: &tower_sd::MemoryRegistry,
        service: &str,
        prefix: &str,
        n: usize,
        options: &[(&str, i64)],
    ) -> Option<Vec<Self>> {
        use tower_sd::ServiceRegistry;
        let mut servers = Vec::new();
        for i in 0..n {
            let server = Self::start(options).await?;
            let instance = server.instance(&format!("{prefix}{i}"), service);
            registry.register(instance).await.unwrap();
            servers.push(server);
        }
        Some(servers)
    }

    /// An instance of `service` at this server.
    pub fn instance(&self, id: &str, service: &str) -> tower_sd::ServiceInstance {
        tower_sd::ServiceInstance::new(id, service, "127.0.0.1", self.port)
    }
}
