//! The cache file: written off the runtime's threads, atomically and durably, and shared
//! safely by processes that use the same path.
//!
//! - One writer at a time per cache: changes only replace the snapshot waiting to be
//!   written, and a blocking task writes the latest one (so writes are coalesced and never
//!   reordered).
//! - Each write takes an advisory lock on `{file}.lock`, reads what other processes wrote,
//!   keeps their queries and replaces this process's ones, so two processes sharing the path
//!   do not erase each other's queries.
//! - The file is written under a unique temporary name, fsynced, renamed over the old one,
//!   and its directory fsynced, so a crash leaves the old file or the new one, never half of
//!   one. It is readable by its owner only.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::warn;

use super::Entry;
use crate::instance::ServiceQuery;

/// At most this many queries are kept in the file, the most recently answered ones.
pub(super) const MAX_FILE_ENTRIES: usize = 4096;

/// Writes a cache's snapshots to its file, the latest one at a time.
pub(super) struct Writer {
    path: PathBuf,
    /// The snapshot waiting to be written, and whether a writer task is running.
    pending: Mutex<(Option<Vec<Entry>>, bool)>,
    /// Woken when the writer has written everything.
    idle: tokio::sync::Notify,
}

impl Writer {
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            pending: Mutex::new((None, false)),
            idle: tokio::sync::Notify::new(),
        }
    }

    /// Waits until every snapshot queued so far is written.
    pub(super) async fn written(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if !self
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1
            {
                return;
            }
            idle.await;
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `entries` to be written; starts a writer off the runtime's threads unless
    /// one is running (it will pick this snapshot up).
    pub(super) fn write(self: &Arc<Self>, entries: Vec<Entry>) {
        let start = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.0 = Some(entries);
            !std::mem::replace(&mut pending.1, true)
        };
        if !start {
            return;
        }
        let writer = Arc::clone(self);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || writer.drain());
            }
            Err(_) => writer.drain(),
        }
    }

    /// Writes snapshots until none is waiting.
    fn drain(&self) {
        loop {
            let entries = {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                match pending.0.take() {
                    Some(entries) => entries,
                    None => {
                        pending.1 = false;
                        self.idle.notify_waiters();
                        return;
                    }
                }
            };
            if let Err(error) = merge_into(&self.path, entries) {
                warn!(path = %self.path.display(), %error, "cannot write the registry cache file");
            }
        }
    }
}

/// Reads the cache file: a missing file is empty; an unreadable or corrupt one is logged
/// and ignored, so it never stops a start.
pub(super) fn load(path: &Path) -> Vec<Entry> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            warn!(path = %path.display(), %error, "ignoring a corrupt registry cache file");
            Vec::new()
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read the registry cache file");
            Vec::new()
        }
    }
}

/// Under the file's lock: what is there, with `ours` replacing the same queries, written
/// back atomically.
fn merge_into(path: &Path, ours: Vec<Entry>) -> std::io::Result<()> {
    let lock = owner_only(OpenOptions::new().create(true).truncate(false).write(true))
        .open(lock_path(path))?;
    lock.lock()?;
    let mut merged: HashMap<ServiceQuery, Entry> = load(path)
        .into_iter()
        .map(|entry| (entry.query.clone(), entry))
        .collect();
    for entry in ours {
        merged.insert(entry.query.clone(), entry);
    }
    let mut entries: Vec<Entry> = merged.into_values().collect();
    entries.sort_by_key(|entry| std::cmp::Reverse(entry.fetched_unix_ms));
    entries.truncate(MAX_FILE_ENTRIES);
    let bytes = serde_json::to_vec_pretty(&entries).map_err(std::io::Error::other)?;
    let written = write_atomically(path, &bytes);
    let _ = lock.unlock();
    written
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    path.with_file_name(name)
}

/// A temporary name beside `path`, unique to this process and write.
fn temporary(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = temporary(path);
    let result = (|| {
        let mut file =
            owner_only(OpenOptions::new().create_new(true).write(true)).open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        sync_directory(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Makes the rename durable: the directory entry is on disk too.
fn sync_directory(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(directory)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Files readable and writable by their owner only (on Unix).
fn owner_only(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}
