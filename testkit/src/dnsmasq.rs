//! A real DNS server (`dnsmasq`, package `dnsmasq-base`) on a free loopback port, authoritative
//! for `.test`: fixed records from its configuration (`srv-host=`, `host-record=`) and records
//! the test changes mid-run through its `hostsdir` (read again on every change).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use super::process::{START_ATTEMPTS, Server, free_port, have, scratch_dir};

pub struct Dnsmasq {
    pub addr: SocketAddr,
    server: Server,
}

impl Dnsmasq {
    /// Starts dnsmasq with these configuration lines (besides its own), answering with
    /// `ttl` seconds; `None` (after saying why) when it is not installed.
    pub async fn start(lines: &[&str], ttl: u32) -> Option<Self> {
        if !have("dnsmasq", "dnsmasq-base") {
            return None;
        }
        let dir = scratch_dir("dnsmasq");
        std::fs::create_dir_all(dir.join("hosts")).unwrap();
        let mut server = Server::stopped(&dir);
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut config = vec![
                format!("port={port}"),
                "listen-address=127.0.0.1".into(),
                "bind-interfaces".into(),
                "no-resolv".into(),
                "no-hosts".into(),
                // Names under .test are answered from local data only: unknown ones get
                // NXDOMAIN.
                "local=/test/".into(),
                format!("local-ttl={ttl}"),
                format!("hostsdir={}", dir.join("hosts").display()),
            ];
            config.extend(lines.iter().map(|l| (*l).to_owned()));
            let file = dir.join("dnsmasq.conf");
            std::fs::write(&file, config.join("\n") + "\n").unwrap();
            server.respawn(
                Command::new("dnsmasq")
                    .arg("--keep-in-foreground")
                    .arg(format!("--conf-file={}", file.display()))
                    .arg("--pid-file=")
                    .arg("--log-facility=-"),
            );
            let mut dnsmasq = Self {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                server,
            };
            if dnsmasq.ready().await {
                return Some(dnsmasq);
            }
            let log = dnsmasq.server.log();
            assert!(
                log.contains("Address already in use"),
                "dnsmasq did not start:\n{log}"
            );
            server = dnsmasq.server;
        }
        panic!("dnsmasq found no free port in {START_ATTEMPTS} attempts");
    }

    /// Replaces the hosts file `name` in the hostsdir with these `ip name` lines (written
    /// aside and renamed in, so dnsmasq never reads half a file). No lines removes it.
    pub fn hosts(&self, name: &str, lines: &[&str]) {
        let path = self.server.dir.join("hosts").join(name);
        if lines.is_empty() {
            let _ = std::fs::remove_file(path);
            return;
        }
        let aside = self.server.dir.join(format!("{name}.new"));
        std::fs::write(&aside, lines.join("\n") + "\n").unwrap();
        std::fs::rename(aside, path).unwrap();
    }

    /// Waits until dnsmasq says it started; `false` when it exited (or never said so).
    async fn ready(&mut self) -> bool {
        for _ in 0..250 {
            if self.server.log().contains("started") {
                // It logs before it serves: give it a moment to bind.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return !self.server.exited();
            }
            if self.server.exited() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}
