//! The EndpointSlice watch: kube-runtime's watcher, folded into whole service sets.
//!
//! The watcher lists, then watches from the list's `resourceVersion`, and relists when the
//! API server answers 410 Gone. Its events are folded here:
//!
//! - `Init`, `InitApply`, `InitDone`: a (re)list. Slices are collected aside and replace the
//!   current ones only at `InitDone`, so neither the first set nor the set after a relist is
//!   ever partial, and the current set stays whole while a relist runs.
//! - `Apply`, `Delete`: one slice changed; the union is recomputed.
//!
//! A set is emitted when it differs from the last one emitted (the first list is always
//! emitted, even empty). Errors are yielded and the next poll of the watcher waits out a
//! full-jitter backoff; the stream never ends on its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_core::Stream;
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use tracing::debug;

use super::slices::{self, PortError, SliceEndpoint};
use super::{Inner, port_error, watcher_error};
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::pace::Pace;

type Events = BoxStream<'static, Result<Event<EndpointSlice>, watcher::Error>>;
type Slices = BTreeMap<String, Result<Vec<SliceEndpoint>, PortError>>;

struct State {
    inner: Arc<Inner>,
    query: ServiceQuery,
    /// Started on first poll, once the client exists.
    events: Option<Events>,
    /// The namespace watched, known once started.
    namespace: String,
    /// The slices of the last complete list, kept up to date by later events.
    current: Slices,
    /// Slices of a (re)list in progress.
    listing: Option<Slices>,
    pace: Pace,
}

pub(super) fn stream(
    inner: Arc<Inner>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let state = State {
        pace: Pace::new(
            super::REGISTRY,
            inner.settings.retry_base,
            inner.settings.retry_max,
        ),
        inner,
        query,
        events: None,
        namespace: String::new(),
        current: Slices::new(),
        listing: None,
    };
    stream::unfold(state, State::next)
}

impl State {
    async fn next(mut self) -> Option<(Result<Vec<ServiceInstance>>, Self)> {
        loop {
            self.pace.wait().await;
            let events = match &mut self.events {
                Some(events) => events,
                None => match self.start().await {
                    Ok(()) => continue,
                    Err(error) => return Some(self.failed(error)),
                },
            };
            let event = match events.next().await {
                Some(Ok(event)) => event,
                Some(Err(error)) => return Some(self.failed(watcher_error(error))),
                // The watcher never ends; if it did, start a new one.
                None => {
                    self.events = None;
                    continue;
                }
            };
            self.pace.succeeded();
            let map = |slice: &EndpointSlice| {
                slices::endpoints_of(
                    slice,
                    &self.namespace,
                    &self.query.name,
                    self.inner.settings.port_name.as_deref(),
                )
            };
            match event {
                Event::Init => self.listing = Some(Slices::new()),
                Event::InitApply(slice) => {
                    let mapped = map(&slice);
                    self.listing
                        .get_or_insert_with(Slices::new)
                        .insert(key(&slice), mapped);
                }
                Event::InitDone => {
                    self.current = self.listing.take().unwrap_or_default();
                    debug!(service = %self.query.name, slices = self.current.len(), "EndpointSlices listed");
                    if let Some(item) = self.emit() {
                        return Some((item, self));
                    }
                }
                Event::Apply(slice) => {
                    let mapped = map(&slice);
                    self.current.insert(key(&slice), mapped);
                    if let Some(item) = self.emit() {
                        return Some((item, self));
                    }
                }
                Event::Delete(slice) => {
                    self.current.remove(&key(&slice));
                    if let Some(item) = self.emit() {
                        return Some((item, self));
                    }
                }
            }
        }
    }

    async fn start(&mut self) -> Result<()> {
        let (api, namespace) = self.inner.slices(self.query.namespace.as_deref()).await?;
        let config = watcher::Config::default().labels(&self.inner.selector(&self.query.name));
        self.events = Some(watcher::watcher(api, config).boxed());
        self.namespace = namespace;
        Ok(())
    }

    fn failed(mut self, error: crate::Error) -> (Result<Vec<ServiceInstance>>, Self) {
        let failed = self.pace.failed(&self.query, error);
        (failed, self)
    }

    /// The union of the current slices, when it differs from the last one emitted.
    fn emit(&mut self) -> Option<Result<Vec<ServiceInstance>>> {
        let mut endpoints = Vec::with_capacity(self.current.len());
        for mapped in self.current.values() {
            match mapped {
                Ok(list) => endpoints.push(list.as_slice()),
                Err(error) => return Some(Err(port_error(error.clone()))),
            }
        }
        let mut set = slices::union(endpoints);
        set.retain(|instance| self.query.matches(instance));
        self.pace.changed(set).map(Ok)
    }
}

fn key(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}
