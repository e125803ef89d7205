//! The etcd watch: a prefix get, then a watch from the revision after it.
//!
//! - PUT and DELETE events update the set; a set is emitted after each watch response that
//!   changes it (the first get is always emitted, even empty).
//! - A broken or closed stream is reopened from the revision after the last one seen, so
//!   nothing is missed and nothing is read twice.
//! - A watch whose start revision was compacted (etcd cancels it and reports the compact
//!   revision) gets the prefix again and watches from there: the set is replaced whole,
//!   never emitted half-updated.
//! - Errors are yielded, and the next attempt waits out a full-jitter backoff.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_core::Stream;
use futures_util::stream;
use tracing::debug;

use super::rpc::proto::etcdserverpb::{WatchCreateRequest, WatchResponse};
use super::rpc::proto::mvccpb::event::EventType;
use super::rpc::{Answers, prefix_end};
use super::{Inner, decode, etcd_error};
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::pace::Pace;

struct State {
    inner: Arc<Inner>,
    query: ServiceQuery,
    /// Key -> instance, as of `revision`.
    set: BTreeMap<String, ServiceInstance>,
    /// The revision `set` reflects; `None` until the first get (or after a compaction).
    revision: Option<i64>,
    events: Option<Answers<WatchResponse>>,
    pace: Pace,
}

pub(super) fn stream(
    inner: Arc<Inner>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let state = State {
        pace: Pace::new(
            super::REGISTRY,
            inner.config.retry_base,
            inner.config.retry_max,
        ),
        inner,
        query,
        set: BTreeMap::new(),
        revision: None,
        events: None,
    };
    stream::unfold(state, State::next)
}

impl State {
    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            self.pace.wait().await;
            let Some(revision) = self.revision else {
                match self.inner.get_service(&self.query.name).await {
                    Ok((instances, revision)) => {
                        self.set = instances.into_iter().collect();
                        self.revision = Some(revision);
                        self.events = None;
                        if let Some(set) = self.changed() {
                            return Some((Ok(set), self));
                        }
                        continue;
                    }
                    Err(error) => return Some(self.failed(error)),
                }
            };
            let events = match &mut self.events {
                Some(events) => events,
                None => match self.open(revision + 1).await {
                    Ok(events) => self.events.insert(events),
                    Err(error) => return Some(self.failed(error)),
                },
            };
            match events.message().await {
                Ok(Some(response)) => {
                    self.pace.succeeded();
                    if response.compact_revision > 0 || response.canceled {
                        debug!(
                            service = %self.query.name,
                            from = revision + 1,
                            compacted = response.compact_revision,
                            reason = response.cancel_reason,
                            "etcd watch canceled; getting the service again"
                        );
                        self.revision = None;
                        self.pace.back_off();
                        continue;
                    }
                    self.apply(&response);
                    if let Some(set) = self.changed() {
                        return Some((Ok(set), self));
                    }
                }
                Ok(None) => {
                    let closed = crate::Error::Unreachable {
                        registry: super::REGISTRY,
                        source: "the watch stream closed".into(),
                    };
                    return Some(self.failed(closed));
                }
                Err(status) => return Some(self.failed(etcd_error(status))),
            }
        }
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

    /// The current set, when it differs from the last one emitted.
    fn changed(&mut self) -> Option<Vec<ServiceInstance>> {
        let set: Vec<ServiceInstance> = self
            .set
            .values()
            .filter(|instance| self.query.matches(instance))
            .cloned()
            .collect();
        self.pace.changed(set)
    }

    fn failed(mut self, error: crate::Error) -> (Result<Vec<ServiceInstance>>, Self) {
        self.events = None;
        let failed = self.pace.failed(&self.query, error);
        (failed, self)
    }
}
