//! A query followed across datacenters ([`Failover`]): one blocking-query watch per
//! datacenter, each with its own index, merged into one set whose instances carry their
//! datacenter's place in the order as their priority tier.
//!
//! - The order is the query's first datacenter (its `datacenter`, the registry's, or the
//!   agent's own: the first of `/v1/catalog/datacenters`) then the failover list; for
//!   [`Failover::Nearest`], the first `n` others of `/v1/catalog/datacenters`, which Consul
//!   sorts by estimated round-trip time, read again every `datacenters_refresh`. A new
//!   order restarts the per-datacenter watches.
//! - Instance ids are `<datacenter>/<node>/<service id>`, so the same service in two
//!   datacenters is two instances, and each carries `consul-datacenter`.
//! - The first set is emitted once every datacenter has answered or failed once (not the
//!   first to answer alone, which could put all traffic on a far datacenter for a moment);
//!   after that, on every change of any datacenter's set.
//! - A datacenter that fails is an error on the stream (the watch of that datacenter backs
//!   off and goes on) while the others keep being followed; its last set stays in the
//!   merged one, as a registry's last set stays when it fails.

use std::sync::Arc;

use futures_core::Stream;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{StreamExt, future::join_all};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use super::api::META_DATACENTER;
use super::client::Client;
use super::watch;
use crate::backoff::Backoff;
use crate::error::Result;
use crate::instance::{Failover, ServiceInstance, ServiceQuery};

/// The datacenters `query` follows, in order: its first, then its failover.
async fn order(client: &Client, query: &ServiceQuery) -> Result<Vec<String>> {
    let first = query
        .datacenter
        .clone()
        .or_else(|| client.settings.datacenter.clone());
    let known = match (&first, &query.failover) {
        (Some(_), Failover::Datacenters(_)) => Vec::new(),
        _ => client.datacenters().await?,
    };
    let first = first.unwrap_or_else(|| known[0].clone());
    let mut order = vec![first.clone()];
    match &query.failover {
        Failover::Datacenters(others) => order.extend(others.iter().cloned()),
        Failover::Nearest(n) => order.extend(known.into_iter().filter(|dc| *dc != first).take(*n)),
        Failover::None => {}
    }
    // A datacenter named twice is followed once, at its better place.
    let mut seen = std::collections::HashSet::new();
    order.retain(|dc| seen.insert(dc.clone()));
    Ok(order)
}

/// `set`, from the datacenter at `place` in the order: ids qualified by it, its place as
/// the priority.
fn placed(mut set: Vec<ServiceInstance>, datacenter: &str, place: usize) -> Vec<ServiceInstance> {
    let priority = u16::try_from(place).unwrap_or(u16::MAX);
    for instance in &mut set {
        instance.id = format!("{datacenter}/{}", instance.id);
        instance.priority = priority;
        instance
            .metadata
            .entry(META_DATACENTER.to_owned())
            .or_insert_with(|| datacenter.to_owned());
    }
    set
}

/// The query for one datacenter of the order.
fn in_datacenter(query: &ServiceQuery, datacenter: &str) -> ServiceQuery {
    ServiceQuery {
        datacenter: Some(datacenter.to_owned()),
        failover: Failover::None,
        ..query.clone()
    }
}

/// The instances of every datacenter of the order, once. A datacenter that fails is
/// logged and left out, unless all fail: then the first's error.
pub(crate) async fn discover(
    client: &Client,
    query: &ServiceQuery,
) -> Result<Vec<ServiceInstance>> {
    let order = order(client, query).await?;
    let answers = join_all(order.iter().map(|dc| {
        let query = in_datacenter(query, dc);
        async move { client.health_service(&query, None).await }
    }))
    .await;
    let mut merged = Vec::new();
    let mut errors = Vec::new();
    for (place, (dc, answer)) in order.iter().zip(answers).enumerate() {
        match answer {
            Ok((set, _)) => merged.extend(placed(set, dc, place)),
            Err(error) => {
                warn!(service = %query.name, datacenter = %dc, %error, "a datacenter failed; the others answer");
                errors.push(error);
            }
        }
    }
    if errors.len() == order.len() {
        return Err(errors.remove(0));
    }
    merged.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(merged)
}

type Tagged = BoxStream<'static, (usize, Result<Vec<ServiceInstance>>)>;

/// The merged watch's state between items.
struct Merged {
    client: Arc<Client>,
    query: ServiceQuery,
    /// The datacenters followed, in order; empty until the order is first read.
    order: Vec<String>,
    watches: SelectAll<Tagged>,
    /// Each datacenter's last set, and whether it has answered or failed yet.
    sets: Vec<Option<Vec<ServiceInstance>>>,
    heard: Vec<bool>,
    emitted: Option<Vec<ServiceInstance>>,
    /// When to read the order (again): now until it is read, then every refresh for the
    /// nearest datacenters, never for a fixed order.
    read_order_at: Option<Instant>,
    backoff: Backoff,
}

pub(crate) fn stream(
    client: Arc<Client>,
    query: ServiceQuery,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let settings = &client.settings;
    let state = Merged {
        backoff: Backoff::new(settings.retry_base, settings.retry_max),
        client: Arc::clone(&client),
        query,
        order: Vec::new(),
        watches: SelectAll::new(),
        sets: Vec::new(),
        heard: Vec::new(),
        emitted: None,
        read_order_at: Some(Instant::now()),
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let item = state.next().await;
        Some((item, state))
    })
}

impl Merged {
    /// The next item: a merged set that changed, or an error.
    async fn next(&mut self) -> Result<Vec<ServiceInstance>> {
        loop {
            if self.read_order_at.is_some_and(|at| at <= Instant::now()) {
                self.read_order().await?;
            }
            let next = match self.read_order_at {
                Some(at) => tokio::select! {
                    () = sleep_until(at) => continue,
                    item = self.watches.next(), if !self.watches.is_empty() => item,
                },
                None => self.watches.next().await,
            };
            // Every watch goes on after an error, so this is no more than a safeguard: with
            // none left, read the order again and start over.
            let Some((place, item)) = next else {
                self.order.clear();
                self.read_order_at = Some(Instant::now());
                continue;
            };
            self.heard[place] = true;
            match item {
                Ok(set) => {
                    self.sets[place] = Some(placed(set, &self.order[place], place));
                }
                Err(error) => {
                    warn!(service = %self.query.name, datacenter = %self.order[place], %error, "a datacenter's watch failed; following the others");
                    return Err(error);
                }
            }
            if let Some(merged) = self.merged() {
                return Ok(merged);
            }
        }
    }

    /// Reads the order; on a change, restarts the watches. On an error, the order is read
    /// again after a backoff, and the error returned.
    async fn read_order(&mut self) -> Result<()> {
        let order = match order(&self.client, &self.query).await {
            Ok(order) => order,
            Err(error) => {
                let pause = self.backoff.next_delay();
                self.read_order_at = Some(Instant::now() + pause);
                return Err(error);
            }
        };
        self.backoff.reset();
        self.read_order_at = match self.query.failover {
            Failover::Nearest(_) => Some(Instant::now() + self.client.settings.datacenters_refresh),
            _ => None,
        };
        if order != self.order {
            debug!(service = %self.query.name, ?order, "following datacenters");
            self.watches = order
                .iter()
                .enumerate()
                .map(|(place, dc)| {
                    let query = in_datacenter(&self.query, dc);
                    watch::stream(Arc::clone(&self.client), query)
                        .map(move |item| (place, item))
                        .boxed()
                })
                .collect();
            self.sets = vec![None; order.len()];
            self.heard = vec![false; order.len()];
            self.order = order;
        }
        Ok(())
    }

    /// The merged set, once every datacenter was heard from, when it differs from the last
    /// one emitted.
    fn merged(&mut self) -> Option<Vec<ServiceInstance>> {
        if !self.heard.iter().all(|&heard| heard) {
            return None;
        }
        let mut merged: Vec<ServiceInstance> =
            self.sets.iter().flatten().flatten().cloned().collect();
        merged.sort_by(|a, b| a.id.cmp(&b.id));
        if self.emitted.as_ref() == Some(&merged) {
            return None;
        }
        self.emitted = Some(merged.clone());
        Some(merged)
    }
}
