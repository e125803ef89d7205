//! Real servers (etcd, dnsmasq) started by the tests: a free loopback port, a scratch
//! directory, the process killed and the directory removed on drop.
//!
//! A missing binary skips the test with a message saying what to install, except under
//! `TOWER_SD_REQUIRE_SERVERS=1` (set by `.ci/run`, which installs them), where it fails.

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, PoisonError};

/// Whether `binary` can be run. When it cannot, says on the terminal which test is skipped
/// and what to install, and returns `false`; or panics when the environment requires the
/// servers (`TOWER_SD_REQUIRE_SERVERS=1`, set by `.ci/run`, which installs them).
pub fn have(binary: &str, package: &str) -> bool {
    have_with(
        &format!("`{binary}`"),
        || installed(binary),
        &format!("apt-get install -y {package}"),
    )
}

/// [`have`] for a server that `check` finds (a Python package, say), installed by `hint`.
///
/// The line goes to the process's stderr directly, not through `eprintln!`, which the test
/// harness captures and shows only for failing tests: a skip must be seen.
pub fn have_with(what: &str, check: impl FnOnce() -> bool, hint: &str) -> bool {
    if check() {
        return true;
    }
    let message = format!("{what} is not installed (`{hint}`)");
    if required() {
        panic!("{message}, and TOWER_SD_REQUIRE_SERVERS=1");
    }
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let binary_name = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .and_then(|stem| stem.rsplit_once('-').map(|(name, _)| name.to_owned()))
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {binary_name}::{test}: {message}"
    );
    false
}

/// Whether `binary` runs at all (`--version`).
pub fn installed(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// Whether this run must not skip server-backed tests.
pub fn required() -> bool {
    std::env::var_os("TOWER_SD_REQUIRE_SERVERS").is_some_and(|v| v == "1")
}

/// Processes the tests started and have not reaped, killed by [`kill_all`].
static RUNNING: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

fn running() -> std::sync::MutexGuard<'static, Option<HashSet<u32>>> {
    RUNNING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Kills (SIGKILL) every process the tests started that is still running: the time limit
/// does this before it ends a test binary, since no destructor runs then.
pub fn kill_all() {
    let pids: Vec<String> = running()
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    if !pids.is_empty() {
        let _ = Command::new("kill").arg("-9").args(pids).status();
    }
}

/// A port no one listens on now. Another process may take it before the caller binds it,
/// so servers started on one retry with new ports when theirs is taken.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free ports (each held until all are chosen, so none is handed out twice).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A loopback port that refuses connections for as long as the value lives: bound, so no one
/// else can take it, but not listening.
pub struct ClosedPort {
    pub port: u16,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    /// A closed port registered as instance `closed` of `service`.
    pub async fn registered(registry: &tower_sd::MemoryRegistry, service: &str) -> Self {
        use tower_sd::ServiceRegistry;
        let closed = Self::bound();
        let instance = tower_sd::ServiceInstance::new("closed", service, "127.0.0.1", closed.port);
        registry.register(instance).await.unwrap();
        closed
    }

    /// A loopback port bound and never listened on: connecting to it is refused.
    pub fn bound() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self {
            port: socket.local_addr().unwrap().port(),
            _socket: socket,
        }
    }
}

/// Starting a server on ports of its own: a free port may be taken by another process before
/// the server binds it, so a start that fails on a taken port is tried again on new ports.
pub const START_ATTEMPTS: usize = 5;

/// A fresh directory under the system's temporary directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tower-sd-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A scratch directory removed when dropped: when the test ends, failed or not.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A fresh, empty directory named after `name`.
    pub fn new(name: &str) -> Self {
        Self(scratch_dir(name))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// `file` in the directory.
    pub fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process the test spawned itself, killed (SIGKILL) and reaped when dropped: when
/// the test ends, failed or not. Its time limit kills it too.
pub struct KilledChild(pub std::process::Child);

impl KilledChild {
    pub fn new(child: std::process::Child) -> Self {
        running()
            .get_or_insert_with(HashSet::new)
            .insert(child.id());
        Self(child)
    }
}

impl Drop for KilledChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(running) = running().as_mut() {
            running.remove(&self.0.id());
        }
    }
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
        running()
            .get_or_insert_with(HashSet::new)
            .insert(child.id());
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL) and waits for it, keeping the directory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(running) = running().as_mut() {
                running.remove(&child.id());
            }
        }
    }

    /// Whether the process accepts TCP connections on `port` within 10 s; `false` when it
    /// exits first (its log says why: often a port another process took).
    pub async fn accepts_on(&mut self, port: u16) -> bool {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline && !self.exited() {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    /// Whether the process has exited (reaped here; it is not running any more).
    pub fn exited(&mut self) -> bool {
        let exited = self
            .child
            .as_mut()
            .is_none_or(|child| child.try_wait().is_ok_and(|status| status.is_some()));
        if exited {
            self.kill();
        }
        exited
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
