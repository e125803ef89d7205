//! Real servers (etcd, dnsmasq) started by the tests: a free loopback port, a scratch
//! directory, the process killed and the directory removed on drop.
//!
//! A missing binary skips the test with a message saying what to install, except under
//! `TOWER_SD_REQUIRE_SERVERS=1` (set by `.ci/run`, which installs them), where it fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Whether `binary` is on the PATH (or at this path). When it is not, prints how to install
/// it and returns `false`, or panics when the environment requires the servers.
pub fn have(binary: &str, package: &str) -> bool {
    let found = Command::new(binary)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        let message =
            format!("`{binary}` is not installed: `apt-get install -y {package}` to run this test");
        if std::env::var_os("TOWER_SD_REQUIRE_SERVERS").is_some_and(|v| v == "1") {
            panic!("{message} (TOWER_SD_REQUIRE_SERVERS=1)");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// A port no one listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory under the system's temporary directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tower-sd-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process killed (SIGKILL) when dropped, with its scratch directory removed.
pub struct Server {
    pub child: Option<Child>,
    pub dir: PathBuf,
}

impl Server {
    pub fn spawn(command: &mut Command, dir: &Path) -> Self {
        let mut server = Self::stopped(dir);
        server.respawn(command);
        server
    }

    /// A server not started yet, owning `dir`.
    pub fn stopped(dir: &Path) -> Self {
        Self {
            child: None,
            dir: dir.to_owned(),
        }
    }

    /// Kills the process, if running, and starts `command` in its place (same directory; the
    /// log is appended to).
    pub fn respawn(&mut self, command: &mut Command) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL) and waits for it, keeping the directory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
