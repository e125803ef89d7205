//! [`Subset`] and [`SubsetRegistry`]: each client follows (and so dials) a deterministic
//! subset of a large service's instances, chosen so that connections and requests spread
//! evenly over the instances across clients.
//!
//! # The algorithm: deterministic aperture
//!
//! As in Finagle's deterministic aperture: the instances are put in a stable order (by
//! XXH64 of their ids, so every client orders them the same whatever the registry's order)
//! and laid side by side on a ring, each a segment of equal length; client `i` of `n`
//! starts at `i/n` of the ring and takes the arc `max(size / instances, 1 / n)` long: the
//! instances whose segments it overlaps (`size`, or one more at an edge). The arcs of all
//! clients cover every point of the ring the same number of times, so every instance is in
//! as many subsets as any other, give or take one. Each instance in a subset gets its weight
//! times the share of its segment the arc covers (in thousandths), so that a client's
//! traffic, spread over its arc by weight, loads every instance equally.
//!
//! Why not gRPC's random subsetting (gRFC A68: each client takes the `size` instances that
//! hash highest with its id): its subsets are independent draws, so the number of clients
//! per instance is binomial. `examples/subsetting.rs` measures both with 10,000 instances
//! and 1,000 clients: with subsets of 100, the busiest instance has 2.3 times the average
//! connections and requests under random subsetting, and exactly the average here. Random
//! subsetting's strength is churn: when 1% of the instances leave, only their connections
//! move (1.0%). Here the ring is laid out by rank, so the others shift a little along it and
//! the arcs' edges take or drop a few instances: 3.5% of connections move with subsets of
//! 100, 1.9% with 200, 6.8% with 50 (the shift is a few instances, whatever the size).
//!
//! The client's index and the number of clients come from the deployment (a StatefulSet
//! ordinal and its replica count, say); they must be right for the spread to be even.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures_core::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use xxhash_rust::xxh64::xxh64;

use super::{ServiceRegistry, WatchStream};
use crate::error::{Error, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};

/// Which subset one client takes: its index among the clients, how many clients there are,
/// and how many instances it wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subset {
    client: usize,
    clients: usize,
    size: usize,
}

impl Subset {
    /// Client `client` of `clients`, taking `size` instances.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `clients` or `size` is 0, or `client` is not below
    /// `clients`.
    pub fn new(client: usize, clients: usize, size: usize) -> Result<Self> {
        let invalid = |key: &str, why: &str| {
            Err(Error::InvalidConfig {
                key: key.to_owned(),
                source: why.to_owned().into(),
            })
        };
        if clients == 0 {
            return invalid("clients", "at least one client");
        }
        if client >= clients {
            return invalid(
                "client",
                "the client's index must be below the number of clients",
            );
        }
        if size == 0 {
            return invalid("size", "a subset of at least one instance");
        }
        Ok(Self {
            client,
            clients,
            size,
        })
    }

    /// This client's subset of `instances`, with its weights (see the module docs); all of
    /// them, unchanged, when there are no more than `size`.
    pub fn select(&self, mut instances: Vec<ServiceInstance>) -> Vec<ServiceInstance> {
        let n = instances.len();
        if n <= self.size {
            return instances;
        }
        instances
            .sort_by_cached_key(|instance| (xxh64(instance.id.as_bytes(), 0), instance.id.clone()));
        // In units of 1 / (instances x clients) of the ring: each segment is `clients` long,
        // the arc starts at `client x instances`.
        let (n, clients) = (n as u128, self.clients as u128);
        let ring = n * clients;
        let width = (self.size as u128 * clients).max(n);
        let start = self.client as u128 * n;
        let covered = |rank: u128| {
            let (from, to) = (rank * clients, (rank + 1) * clients);
            let piece = |a: u128, b: u128| to.min(b).saturating_sub(from.max(a));
            let end = start + width;
            if end <= ring {
                piece(start, end)
            } else {
                piece(start, ring) + piece(0, end - ring)
            }
        };
        instances
            .into_iter()
            .enumerate()
            .filter_map(|(rank, mut instance)| {
                let covered = covered(rank as u128);
                if covered == 0 {
                    return None;
                }
                let thousandths = ((covered * 1000 + clients / 2) / clients).max(1) as u32;
                instance.weight = instance.weight.max(1).saturating_mul(thousandths);
                Some(instance)
            })
            .collect()
    }
}

/// A registry whose `discover` and `watch` give this client's [`Subset`] of each set, so
/// that only the subset is dialled; everything else goes to the inner registry.
///
/// ```
/// use tower_sd::registry::{Subset, SubsetRegistry};
/// use tower_sd::{MemoryRegistry, ServiceInstance, ServiceRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_sd::Error> {
/// let inner = MemoryRegistry::new();
/// for i in 0..100u16 {
///     inner.register(ServiceInstance::new(format!("api-{i}"), "api", "10.0.0.1", 1000 + i)).await?;
/// }
/// // Client 3 of 20, taking 10 of the 100 instances.
/// let registry = SubsetRegistry::new(inner, Subset::new(3, 20, 10)?);
/// let mine = registry.discover(&"api".into()).await?;
/// assert!((10..=11).contains(&mine.len()));
/// # Ok(())
/// # }
/// ```
pub struct SubsetRegistry<R> {
    inner: Arc<R>,
    subset: Subset,
}

impl<R> SubsetRegistry<R> {
    /// `inner`'s sets, each cut to `subset`.
    pub fn new(inner: R, subset: Subset) -> Self {
        Self {
            inner: Arc::new(inner),
            subset,
        }
    }
}

impl<R: fmt::Debug> fmt::Debug for SubsetRegistry<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubsetRegistry")
            .field("inner", &self.inner)
            .field("subset", &self.subset)
            .finish()
    }
}

impl<R: ServiceRegistry + 'static> ServiceRegistry for SubsetRegistry<R> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<()>> {
        self.inner.register(instance)
    }

    fn deregister<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.deregister(id)
    }

    fn discover<'a>(
        &'a self,
        query: &'a ServiceQuery,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>>> {
        let subset = self.subset;
        self.inner
            .discover(query)
            .map(move |set| set.map(|set| sorted(subset.select(set))))
            .boxed()
    }

    fn watch(&self, query: &ServiceQuery) -> WatchStream {
        let subset = self.subset;
        self.inner
            .watch(query)
            .map(move |item| item.map(|set| sorted(subset.select(set))))
            .boxed()
    }

    fn health<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<HealthStatus>> {
        self.inner.health(id)
    }

    fn heartbeat<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.heartbeat(id)
    }

    fn set_maintenance<'a>(
        &'a self,
        id: &'a str,
        enable: bool,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.set_maintenance(id, enable, reason)
    }
}

/// Sorted by id, as registries give their sets.
fn sorted(set: Vec<ServiceInstance>) -> Vec<ServiceInstance> {
    let by_id: BTreeMap<String, ServiceInstance> =
        set.into_iter().map(|i| (i.id.clone(), i)).collect();
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<ServiceInstance> {
        (0..n)
            .map(|i| {
                ServiceInstance::new(format!("s{i}"), "api", "10.0.0.1", 1 + (i % 60_000) as u16)
            })
            .collect()
    }

    /// Catches a subset that gives some instances twice the connections of others (random
    /// subsets do), or traffic that is not spread evenly: 1,000 instances, 100 clients of 30
    /// each: every instance in 3 or 4 subsets (3.0 on average), and every instance loaded
    /// within 1% of the average when each client spreads its traffic by weight.
    #[test]
    fn connections_and_traffic_spread_evenly_over_the_instances() {
        let (servers, clients, size) = (1_000, 100, 30);
        let all = fleet(servers);
        let mut subsets = vec![0usize; servers];
        let mut load = vec![0f64; servers];
        for client in 0..clients {
            let mine = Subset::new(client, clients, size)
                .unwrap()
                .select(all.clone());
            assert!((size..=size + 1).contains(&mine.len()), "{}", mine.len());
            let total: f64 = mine.iter().map(|i| f64::from(i.weight)).sum();
            for instance in &mine {
                let index: usize = instance.id[1..].parse().unwrap();
                subsets[index] += 1;
                load[index] += f64::from(instance.weight) / total;
            }
        }
        assert!(
            subsets.iter().all(|&s| (3..=4).contains(&s)),
            "{:?}",
            subsets.iter().max()
        );
        let mean = clients as f64 / servers as f64;
        let worst = load
            .iter()
            .map(|l| (l / mean - 1.0).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 0.01,
            "an instance {:.1}% off the average load",
            worst * 100.0
        );
    }

    /// Catches a subset that depends on the registry's order, or that is not one client's
    /// own: the same subset from any order, and different clients, different subsets.
    #[test]
    fn the_subset_is_the_same_in_any_order_and_its_own_per_client() {
        let all = fleet(200);
        let mut reversed = all.clone();
        reversed.reverse();
        let ids = |set: Vec<ServiceInstance>| -> Vec<String> {
            sorted(set).into_iter().map(|i| i.id).collect()
        };
        let subset = Subset::new(4, 10, 15).unwrap();
        assert_eq!(
            ids(subset.select(all.clone())),
            ids(subset.select(reversed))
        );
        let other = Subset::new(5, 10, 15).unwrap();
        assert_ne!(
            ids(subset.select(all.clone())),
            ids(other.select(all.clone()))
        );
        // No more instances than the subset: all of them, weights unchanged.
        assert_eq!(Subset::new(0, 3, 500).unwrap().select(all.clone()), all);
    }

    /// Catches a wrapper that passes the whole set on (every instance would be dialled):
    /// the watch yields the subset, and follows changes.
    #[tokio::test]
    async fn the_watch_yields_only_the_subset() {
        let _limit = tower_sd_testkit::time_limit(10);
        let inner = crate::MemoryRegistry::new();
        for instance in fleet(50) {
            inner.register(instance).await.unwrap();
        }
        let registry = SubsetRegistry::new(inner.clone(), Subset::new(1, 5, 10).unwrap());
        let mut watch = registry.watch(&"api".into());
        let first = watch.next().await.unwrap().unwrap();
        assert!((10..=11).contains(&first.len()), "{}", first.len());
        assert_eq!(registry.discover(&"api".into()).await.unwrap(), first);
        let member = first[0].id.clone();
        inner.deregister(&member).await.unwrap();
        let next = watch.next().await.unwrap().unwrap();
        assert!(next.iter().all(|i| i.id != member) && (9..=11).contains(&next.len()));
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        for (client, clients, size, key) in
            [(0, 0, 1, "clients"), (3, 3, 1, "client"), (0, 1, 0, "size")]
        {
            let error = Subset::new(client, clients, size).unwrap_err();
            assert!(
                matches!(&error, Error::InvalidConfig { key: k, .. } if k == key),
                "{error:?}"
            );
        }
    }
}
