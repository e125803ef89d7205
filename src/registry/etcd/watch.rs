//! The etcd watch: a prefix get, then a watch from the revision after it.
//!
//! - PUT and DELETE events update the set; a set is emitted after each watch response that
//!   changes it (the first get is always emitted, even empty). The revision the watch
//!   stands at moves only with what a response proves was seen (its events, or a progress
//!   notification), never with the header of the "created" answer, which is the store's
//!   revision and may be past history still to come.
//! - After a broken or closed stream, the next attempt gets the prefix again and watches
//!   from there: the first set after an error is a fresh answer (which a
//!   [`FallbackRegistry`](crate::registry::FallbackRegistry) takes as the registry being
//!   back), never one rebuilt from a watch that has not caught up.
//! - A watch etcd cancels (its start revision was compacted) gets the prefix again the same
//!   way: the set is replaced whole, never emitted half-updated.
//! - Errors are yielded, and the next attempt waits out a full-jitter backoff (the shared
//!   watch loop, `registry/watch.rs`, which also emits only sets that changed).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_core::Stream;
use tracing::debug;

use super::rpc::proto::etcdserverpb::{WatchCreateRequest, WatchResponse};
use super::rpc::proto::mvccpb::event::EventType;
use super::rpc::{Answers, prefix_end};
use super::{Inner, decode, etcd_error};
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::watch::{self, Fetched, Source};

/// etcd's side of the shared watch loop (`registry/watch.rs`).
struct Revisions {
    inner: Arc<Inner>,
    query: ServiceQuery,
    /// Key -> instance, as of `revision`.
    set: BTreeMap<String, ServiceInstance>,
    /// The revision `set` reflects; `None` until the first get (or after a compaction).
    revision: Option<i64>,
    events: Option<Answers<WatchResponse>>,
}

pub(super) fn stream(
    inner: Arc<Inner>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let retry = (inner.settings.retry_base, inner.settings.retry_max);
    let source = Revisions {
        inner,
        query: query.clone(),
        set: BTreeMap::new(),
        revision: None,
        events: None,
    };
    watch::watch(super::REGISTRY, query, retry, source)
}

impl Source for Revisions {
    async fn fetch(&mut self) -> Fetched {
        let Some(revision) = self.revision else {
            return match self.inner.get_service(&self.query.name).await {
                Ok((instances, revision)) => {
                    self.set = instances.into_iter().collect();
                    self.revision = Some(revision);
                    self.events = None;
                    Fetched::Set(self.current())
                }
                Err(error) => Fetched::Failed(error),
            };
        };
        let events = match &mut self.events {
            Some(events) => events,
            None => match self.open(revision + 1).await {
                Ok(events) => self.events.insert(events),
                Err(error) => {
                    self.restart();
                    return Fetched::Failed(error);
                }
            },
        };
        let answer = events.message().await;
        match answer {
            Ok(Some(response)) => {
                if response.compact_revision > 0 || response.canceled {
                    debug!(
                        service = %self.query.name,
                        from = revision + 1,
                        compacted = response.compact_revision,
                        reason = response.cancel_reason,
                        "etcd watch canceled; getting the service again"
                    );
                    self.restart();
                    return Fetched::StartOver;
                }
                self.apply(&response);
                Fetched::Set(self.current())
            }
            Ok(None) => {
                self.restart();
                Fetched::Failed(crate::Error::Unreachable {
                    registry: super::REGISTRY,
                    source: "the watch stream closed".into(),
                })
            }
            Err(status) => {
                self.restart();
                Fetched::Failed(etcd_error(status))
            }
        }
    }
}

impl Revisions {
    /// The next fetch gets the prefix again.
    fn restart(&mut self) {
        self.revision = None;
        self.events = None;
    }

    async fn open(&self, from: i64) -> Result<Answers<WatchResponse>> {
        let client = self.inner.client().await?;
        let dir = self.inner.service_dir(&self.query.name).into_bytes();
        let create = WatchCreateRequest {
            range_end: prefix_end(&dir),
            key: dir,
            start_revision: from,
            // Progress notifications move the resume revision on while nothing changes.
            progress_notify: true,
            ..Default::default()
        };
        // Opening waits for etcd's answer; only the stream that follows is long-lived.
        self.inner.timed(client.watch(create)).await
    }

    /// Applies one watch response. The resume revision moves only with what the response
    /// proves was seen: its events' revisions, or the header of a progress notification. The
    /// header of any other response (the "created" one in particular) is the store's
    /// revision, which may be past events still to come on this stream.
    fn apply(&mut self, response: &WatchResponse) {
        let mut revision = self.revision.unwrap_or(0);
        let progress = response.events.is_empty() && !response.created;
        if let (true, Some(header)) = (progress, &response.header) {
            revision = revision.max(header.revision);
        }
        for event in &response.events {
            let Some(kv) = &event.kv else { continue };
            revision = revision.max(kv.mod_revision);
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            match event.r#type() {
                EventType::Put => match decode(kv, &self.query.name) {
                    Some((key, instance)) => {
                        self.set.insert(key, instance);
                    }
                    None => {
                        self.set.remove(&key);
                    }
                },
                EventType::Delete => {
                    self.set.remove(&key);
                }
            }
        }
        self.revision = Some(revision);
    }

    /// The current set of instances `query` matches.
    fn current(&self) -> Vec<ServiceInstance> {
        self.set
            .values()
            .filter(|instance| self.query.matches(instance))
            .cloned()
            .collect()
    }
}
