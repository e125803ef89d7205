//! A real etcd (`etcd-server`) on free loopback ports, restartable with its data.

use std::process::Command;
use std::time::Duration;

use super::process::{START_ATTEMPTS, Server, free_ports, have, scratch_dir};

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    server: Server,
    /// With TLS: the CA (here, the self-signed server certificate) clients must trust.
    ca: Option<String>,
    /// More command-line flags.
    flags: Vec<String>,
}

impl Etcd {
    /// Starts etcd, or returns `None` (after saying why) when it is not installed.
    pub async fn start() -> Option<Self> {
        Self::start_with(None, &[]).await
    }

    /// Starts etcd with more command-line flags.
    pub async fn start_with_flags(flags: &[&str]) -> Option<Self> {
        Self::start_with(None, flags).await
    }

    /// Starts etcd serving clients over TLS, with a self-signed certificate for 127.0.0.1.
    pub async fn start_tls() -> Option<Self> {
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        Self::start_with(Some((key.cert.pem(), key.signing_key.serialize_pem())), &[]).await
    }

    async fn start_with(tls: Option<(String, String)>, flags: &[&str]) -> Option<Self> {
        if !have("etcd", "etcd-server") || !have("etcdctl", "etcd-client") {
            return None;
        }
        let dir = scratch_dir("etcd");
        if let Some((cert, key)) = &tls {
            std::fs::write(dir.join("cert.pem"), cert).unwrap();
            std::fs::write(dir.join("key.pem"), key).unwrap();
        }
        let [client_port, peer_port] = free_ports();
        let mut etcd = Self {
            client_port,
            peer_port,
            server: Server::stopped(&dir),
            ca: tls.map(|(cert, _)| cert),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        };
        for _ in 0..START_ATTEMPTS {
            etcd.spawn();
            if etcd.ready().await {
                return Some(etcd);
            }
            let log = etcd.server.log();
            assert!(
                log.contains("address already in use"),
                "etcd did not start:\n{log}"
            );
            [etcd.client_port, etcd.peer_port] = free_ports();
        }
        panic!("etcd found no free ports in {START_ATTEMPTS} attempts");
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The CA file clients of a TLS etcd trust.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.server.dir.join("cert.pem")
    }

    /// Runs `etcdctl` against this etcd (the tests' independent client) and returns its
    /// output, failing the test when it fails or takes longer than 20 s.
    pub async fn ctl(&self, args: &[&str]) -> String {
        let output = tokio::time::timeout(
            Duration::from_secs(20),
            self.etcdctl("10s").args(args).output(),
        )
        .await
        .expect("etcdctl answers within 20 s")
        .expect("etcdctl runs");
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn etcdctl(&self, timeout: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url()))
            .arg(format!("--dial-timeout={timeout}"))
            .arg(format!("--command-timeout={timeout}"))
            .kill_on_drop(true);
        if self.ca.is_some() {
            command.arg(format!("--cacert={}", self.ca_file().display()));
        }
        command
    }

    /// `etcdctl ... -w json`, parsed.
    pub async fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["-w", "json"]);
        serde_json::from_str(&self.ctl(&args).await).unwrap()
    }

    /// Puts `value` at `key`, without a lease.
    pub async fn put(&self, key: &str, value: &[u8]) {
        self.ctl(&["put", key, std::str::from_utf8(value).unwrap()])
            .await;
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) {
        self.ctl(&["del", key]).await;
    }

    /// The lease `key` is attached to (0 for none).
    pub async fn lease_of(&self, key: &str) -> i64 {
        let got = self.ctl_json(&["get", key]).await;
        got["kvs"][0]["lease"].as_i64().unwrap_or(0)
    }

    /// The value at `key`.
    pub async fn value_of(&self, key: &str) -> Vec<u8> {
        let got = self.ctl(&["get", key, "--print-value-only"]).await;
        got.trim_end_matches('\n').as_bytes().to_vec()
    }

    /// The store's current revision.
    pub async fn revision(&self) -> i64 {
        let got = self
            .ctl_json(&["get", "/", "--prefix", "--keys-only"])
            .await;
        got["header"]["revision"].as_i64().unwrap()
    }

    /// Compacts history up to `revision`.
    pub async fn compact(&self, revision: i64) {
        self.ctl(&["compaction", &revision.to_string()]).await;
    }

    /// Revokes a lease (its keys go with it).
    pub async fn revoke(&self, lease: i64) {
        self.ctl(&["lease", "revoke", &format!("{lease:x}")]).await;
    }

    /// The seconds the lease has left; -1 when etcd does not know it.
    pub async fn lease_ttl(&self, lease: i64) -> i64 {
        let got = self
            .ctl_json(&["lease", "timetolive", &format!("{lease:x}")])
            .await;
        got["ttl"].as_i64().unwrap()
    }

    /// Creates `root` with this password and turns authentication on.
    pub async fn enable_auth(&self, password: &str) {
        self.ctl(&["user", "add", &format!("root:{password}")])
            .await;
        self.ctl(&["user", "grant-role", "root", "root"]).await;
        self.ctl(&["auth", "enable"]).await;
    }

    /// Kills etcd (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.spawn();
        assert!(
            self.ready().await,
            "etcd did not start:\n{}",
            self.server.log()
        );
    }

    fn spawn(&mut self) {
        let dir = self.server.dir.clone();
        let tls = self.ca.is_some();
        let mut command = command(&dir, self.client_port, self.peer_port, tls);
        self.server.respawn(command.args(&self.flags));
    }

    /// Waits until etcd answers (it takes about a quarter of a second); `false` when it
    /// exited or did not answer within 20 s.
    async fn ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let answered = self
                .etcdctl("500ms")
                .args(["endpoint", "health"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if tokio::time::timeout(Duration::from_secs(5), answered)
                .await
                .is_ok_and(|status| status.is_ok_and(|s| s.success()))
            {
                return true;
            }
            if self.server.exited() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn command(dir: &std::path::Path, client_port: u16, peer_port: u16, tls: bool) -> Command {
    let scheme = if tls { "https" } else { "http" };
    let client = format!("{scheme}://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new("etcd");
    command
        .arg("--name=test")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=test={peer}"))
        .arg("--log-level=warn");
    if tls {
        command
            .arg(format!("--cert-file={}", dir.join("cert.pem").display()))
            .arg(format!("--key-file={}", dir.join("key.pem").display()));
    }
    command
}
