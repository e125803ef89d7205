//! Every log line of a test binary, captured for assertions about what was (not) logged.

use std::sync::{Arc, Mutex};

/// The log captured so far.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Installs a global subscriber (TRACE and up) writing into the returned buffer. Call it
    /// from the binary's only test, so the subscriber sees every thread's events.
    pub fn capture() -> Self {
        let logs = Self::default();
        tracing::subscriber::set_global_default(logs.subscriber()).unwrap();
        logs
    }

    /// Captures what the current thread logs (TRACE and up) until the guard is dropped:
    /// for a test on a current-thread runtime, whose tasks all run on its thread.
    pub fn scoped() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let guard = tracing::subscriber::set_default(logs.subscriber());
        (logs, guard)
    }

    /// A subscriber (TRACE and up) writing into this buffer.
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let logs = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Writer(logs.clone()))
            .finish()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Writer(Logs);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (self.0).0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
