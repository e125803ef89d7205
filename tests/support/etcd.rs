//! A real etcd (`etcd-server`) on free loopback ports, restartable with its data.

use std::process::Command;
use std::time::Duration;

use super::process::{Server, free_port, have, scratch_dir};

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    server: Server,
}

impl Etcd {
    /// Starts etcd, or returns `None` (after saying why) when it is not installed.
    pub async fn start() -> Option<Self> {
        if !have("etcd", "etcd-server") {
            return None;
        }
        let dir = scratch_dir("etcd");
        let (client_port, peer_port) = (free_port(), free_port());
        let server = Server::spawn(&mut command(&dir, client_port, peer_port), &dir);
        let etcd = Self {
            client_port,
            peer_port,
            server,
        };
        etcd.ready().await;
        Some(etcd)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A client of its own, for the test's direct writes.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None)
            .await
            .unwrap()
    }

    /// Kills etcd (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        let dir = self.server.dir.clone();
        self.server
            .respawn(&mut command(&dir, self.client_port, self.peer_port));
        self.ready().await;
    }

    /// Waits until etcd answers (it takes about a quarter of a second).
    async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let options = etcd_client::ConnectOptions::new()
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

fn command(dir: &std::path::Path, client_port: u16, peer_port: u16) -> Command {
    let client = format!("http://127.0.0.1:{client_port}");
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
    command
}
