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
//! The shared watch loop (`registry/watch.rs`) emits a set when it differs from the last
//! one (the first list always, even empty), yields errors and backs off before the next poll
//! of the watcher; the stream never ends on its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_core::Stream;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use tracing::debug;

use super::slices::{self, PortError, SliceEndpoint};
use super::{Inner, port_error, watcher_error};
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::watch::{self, Fetched, Source};

type Events = BoxStream<'static, Result<Event<EndpointSlice>, watcher::Error>>;
type Slices = BTreeMap<String, Mapped>;

/// Kubernetes' side of the shared watch loop (`registry/watch.rs`).
struct Slicewatch {
    inner: Arc<Inner>,
    query: ServiceQuery,
    /// Started on first fetch, once the client exists.
    events: Option<Events>,
    /// The namespace watched, known once started.
    namespace: String,
    fold: Fold,
}

pub(super) fn stream(
    inner: Arc<Inner>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let retry = (inner.settings.retry_base, inner.settings.retry_max);
    let source = Slicewatch {
        inner,
        query: query.clone(),
        events: None,
        namespace: String::new(),
        fold: Fold::default(),
    };
    watch::watch(super::REGISTRY, query, retry, source)
}

impl Source for Slicewatch {
    async fn fetch(&mut self) -> Fetched {
        let events = match &mut self.events {
            Some(events) => events,
            None => match self.start().await {
                Ok(events) => events,
                Err(error) => return Fetched::Failed(error),
            },
        };
        let event = match events.next().await {
            Some(Ok(event)) => event,
            Some(Err(error)) => return Fetched::Failed(watcher_error(error)),
            // The watcher never ends; if it did, the next fetch starts a new one.
            None => {
                self.events = None;
                return Fetched::Nothing;
            }
        };
        let step = self.step(event);
        if !self.fold.apply(step) {
            return Fetched::Nothing;
        }
        match self.fold.set(&self.query) {
            Ok(set) => Fetched::Set(set),
            Err(error) => Fetched::Failed(error),
        }
    }
}

impl Slicewatch {
    /// The watcher's event, its slice mapped to endpoints.
    fn step(&self, event: Event<EndpointSlice>) -> Step {
        let map = |slice: &EndpointSlice| {
            let mapped = slices::endpoints_of(
                slice,
                &self.namespace,
                &self.query.name,
                self.inner.settings.port_name.as_deref(),
            );
            (key(slice), mapped)
        };
        match event {
            Event::Init => Step::Init,
            Event::InitApply(slice) => {
                let (key, mapped) = map(&slice);
                Step::InitApply(key, mapped)
            }
            Event::InitDone => {
                debug!(service = %self.query.name, "EndpointSlices listed");
                Step::InitDone
            }
            Event::Apply(slice) => {
                let (key, mapped) = map(&slice);
                Step::Apply(key, mapped)
            }
            Event::Delete(slice) => Step::Delete(key(&slice)),
        }
    }

    async fn start(&mut self) -> Result<&mut Events> {
        let (api, namespace) = self.inner.slices(self.query.namespace.as_deref()).await?;
        let config = watcher::Config::default().labels(&self.inner.selector(&self.query.name));
        self.namespace = namespace;
        Ok(self.events.insert(watcher::watcher(api, config).boxed()))
    }
}

fn key(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

type Mapped = std::result::Result<Vec<SliceEndpoint>, PortError>;

/// A watcher event, with its slice already mapped.
#[derive(Debug)]
enum Step {
    Init,
    InitApply(String, Mapped),
    InitDone,
    Apply(String, Mapped),
    Delete(String),
}

/// A service's slices, folded from watcher events.
#[derive(Debug, Default)]
struct Fold {
    /// The slices of the last complete list, kept up to date by later events.
    current: Slices,
    /// Slices of a (re)list in progress.
    listing: Option<Slices>,
}

impl Fold {
    /// Applies one step; `true` when the current slices may have changed (never while a
    /// list is in progress: a list replaces them whole at its end).
    fn apply(&mut self, step: Step) -> bool {
        match step {
            Step::Init => {
                self.listing = Some(Slices::new());
                false
            }
            Step::InitApply(key, mapped) => {
                self.listing
                    .get_or_insert_with(Slices::new)
                    .insert(key, mapped);
                false
            }
            Step::InitDone => {
                self.current = self.listing.take().unwrap_or_default();
                true
            }
            Step::Apply(key, mapped) => {
                self.current.insert(key, mapped);
                true
            }
            Step::Delete(key) => self.current.remove(&key).is_some(),
        }
    }

    /// The union of the current slices that `query` matches, or the first slice's port
    /// error.
    fn set(&self, query: &ServiceQuery) -> Result<Vec<ServiceInstance>> {
        let mut endpoints = Vec::with_capacity(self.current.len());
        for mapped in self.current.values() {
            match mapped {
                Ok(list) => endpoints.push(list.as_slice()),
                Err(error) => return Err(port_error(error.clone())),
            }
        }
        let mut set = slices::union(endpoints);
        set.retain(|instance| query.matches(instance));
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::registry::kubernetes::slices::test_endpoint;

    /// A slice's endpoints: hosts from a small pool, so slices overlap.
    fn endpoints() -> impl Strategy<Value = Vec<SliceEndpoint>> {
        prop::collection::vec((0u8..5, any::<bool>()), 0..4).prop_map(|hosts| {
            hosts
                .into_iter()
                .map(|(host, ready)| test_endpoint(host, ready, true, !ready))
                .collect()
        })
    }

    /// What happens on the API server, and what the watcher makes of it.
    #[derive(Clone, Debug)]
    enum Op {
        /// A slice is created or changed, and the watch delivers it.
        Put(u8, Vec<SliceEndpoint>),
        /// A slice is deleted, and the watch delivers it.
        Delete(u8),
        /// A slice changes while the watch is down: only a relist shows it.
        Missed(u8, Option<Vec<SliceEndpoint>>),
        /// A relist (after a 410), cut short `cut` times before it completes.
        Relist { cut: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..4, endpoints()).prop_map(|(n, e)| Op::Put(n, e)),
            1 => (0u8..4).prop_map(Op::Delete),
            1 => (0u8..4, prop::option::of(endpoints())).prop_map(|(n, e)| Op::Missed(n, e)),
            1 => (0u8..3).prop_map(|cut| Op::Relist { cut }),
        ]
    }

    fn union_of(store: &BTreeMap<String, Vec<SliceEndpoint>>) -> Vec<ServiceInstance> {
        slices::union(store.values().map(Vec::as_slice))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Sets are emitted only when whole: after a list completes the set is exactly the
        /// server's; while a relist runs nothing is emitted and the set stays as it was.
        #[test]
        fn sets_are_whole_across_relists(ops in prop::collection::vec(op(), 1..40)) {
            let query = ServiceQuery::new("svc");
            let mut server: BTreeMap<String, Vec<SliceEndpoint>> = BTreeMap::new();
            let mut seen: BTreeMap<String, Vec<SliceEndpoint>> = BTreeMap::new();
            let mut fold = Fold::default();
            // The first list.
            prop_assert!(!fold.apply(Step::Init));
            prop_assert!(fold.apply(Step::InitDone));
            prop_assert!(fold.set(&query).unwrap().is_empty());
            for op in ops {
                let before = fold.set(&query).unwrap();
                match op {
                    Op::Put(n, endpoints) => {
                        let key = format!("s{n}");
                        server.insert(key.clone(), endpoints.clone());
                        seen.insert(key.clone(), endpoints.clone());
                        prop_assert!(fold.apply(Step::Apply(key, Ok(endpoints))));
                    }
                    Op::Delete(n) => {
                        let key = format!("s{n}");
                        server.remove(&key);
                        seen.remove(&key);
                        fold.apply(Step::Delete(key));
                    }
                    Op::Missed(n, endpoints) => {
                        let key = format!("s{n}");
                        match endpoints {
                            Some(endpoints) => server.insert(key, endpoints),
                            None => server.remove(&key),
                        };
                    }
                    Op::Relist { cut } => {
                        for attempt in 0..=cut {
                            prop_assert!(!fold.apply(Step::Init));
                            let listed: Vec<_> = server.iter().collect();
                            // A cut-short list delivers only part of the slices.
                            let take = if attempt < cut { listed.len() / 2 } else { listed.len() };
                            for (key, endpoints) in listed.into_iter().take(take) {
                                let step = Step::InitApply(key.clone(), Ok(endpoints.clone()));
                                prop_assert!(!fold.apply(step));
                                prop_assert_eq!(&fold.set(&query).unwrap(), &before, "unchanged while listing");
                            }
                        }
                        prop_assert!(fold.apply(Step::InitDone));
                        seen = server.clone();
                    }
                }
                prop_assert_eq!(fold.set(&query).unwrap(), union_of(&seen));
            }
        }
    }
}
