//! A real etcd (`etcd-server`) on free loopback ports, restartable with its data.

use std::process::Command;
use std::time::Duration;

use super::process::{Server, free_port, have, scratch_dir};

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
        if !have("etcd", "etcd-server") {
            return None;
        }
        let dir = scratch_dir("etcd");
        if let Some((cert, key)) = &tls {
            std::fs::write(dir.join("cert.pem"), cert).unwrap();
            std::fs::write(dir.join("key.pem"), key).unwrap();
        }
        let mut etcd = Self {
            client_port: free_port(),
            peer_port: free_port(),
            server: Server::stopped(&dir),
            ca: tls.map(|(cert, _)| cert),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        };
        etcd.restart().await; // the first start
        Some(etcd)
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The CA file clients of a TLS etcd trust.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.server.dir.join("cert.pem")
    }

    /// A client of its own, for the test's direct writes.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], Some(self.options()))
            .await
            .unwrap()
    }

    fn options(&self) -> etcd_client::ConnectOptions {
        let options = etcd_client::ConnectOptions::new();
        match &self.ca {
            Some(ca) => options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(ca)),
            ),
            None => options,
        }
    }

    /// Kills etcd (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        let dir = self.server.dir.clone();
        let tls = self.ca.is_some();
        let mut command = command(&dir, self.client_port, self.peer_port, tls);
        self.server.respawn(command.args(&self.flags));
        self.ready().await;
    }

    /// Waits until etcd answers (it takes about a quarter of a second).
    async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let options = self
                .options()
                .with_connect_timeout(Duration::from_millis(200))
                .with_timeout(Duration::from_millis(500));
            if let Ok(mut client) = etcd_client::Client::connect([self.url()], Some(options)).await
                && client.get("ready", None).await.is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd did not start:\n{}",
                self.server.log()
            );
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
