//! [`Keyed`]: keyed ("sticky") routing over a [`Balance`]: requests with the same key go to
//! the same endpoint while it is usable and not overloaded, by consistent hashing with
//! bounded load.
//!
//! - **The ring** (see `ring.rs`): the best priority tier's endpoints, 64 entries per unit
//!   of weight, placed by XXH64 of the endpoint's key; built once per snapshot, by the first
//!   keyed request. When one of N endpoints leaves, only its keys (about 1/N) move.
//! - **Bounded load** (Mirrokni, Thorup and Zadimoghaddam, 2018): an endpoint takes a keyed
//!   request only while it has fewer than `ceil(c x (keyed requests in flight + 1) / N)`
//!   requests in flight (`c` is the balance factor, 1.25 by default); otherwise the request
//!   walks on along the ring to the next endpoint under the bound. So no endpoint holds
//!   more than `c` times the average, however hot a key is. The count an endpoint holds
//!   includes its requests without a key, if the balancer also serves those.
//! - **Unusable endpoints** (failed, ejected, not ready, saturated) are skipped the same
//!   way, so a key comes back to its endpoint once it recovers. When no endpoint of the
//!   best tier is usable, or the request has no key, the request is balanced as the
//!   [`Balance`] balances it (power of two choices, tiers).
//!
//! Where this differs from gRFC A42: A42's ring scales every endpoint's entries to the
//! smallest share of a ring of 1024 to 4096 entries, so an endpoint leaving moves more than
//! its own keys; A42 has no load bound (Envoy's ring hash has, as `hash_balance_factor`); a
//! request without a key gets a random hash there, and P2C here.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures_util::future::Either;
use pin_project_lite::pin_project;
use tower::Service;
use tower::util::{Oneshot, ServiceExt};

use super::classify::Classify;
use super::completion::Completion;
use super::future::ResponseFuture;
use super::ring::{self, Ring};
use super::service::Balance;
use crate::error::BoxError;

/// The hash of a request key for [`Keyed`]: XXH64 (seed 0) of its `Hash` bytes, so that
/// every client gives one key one hash.
///
/// ```
/// let key = tower_sd::balance::key_hash(&"user-42");
/// assert_eq!(key, tower_sd::balance::key_hash(&"user-42"));
/// ```
pub fn key_hash(key: &impl Hash) -> u64 {
    ring::xxh64_of(key)
}

/// Keyed routing over a [`Balance`] (see [`Balance::keyed`] and the module docs of
/// `keyed.rs`, summarized in the [balance docs](super#keyed-routing)).
pub struct Keyed<S, K, C, F> {
    balance: Balance<S, K, C>,
    key: Arc<F>,
    factor: f64,
    /// Keyed requests in flight, over every clone.
    in_flight: Arc<AtomicUsize>,
}

impl<S, K, C> Balance<S, K, C> {
    /// Routes requests by key: `key` gives a request's hash (see [`key_hash`]), or `None`
    /// for a request balanced as usual. Consistent hashing with bounded load over the best
    /// tier's endpoints; see the [balance docs](super#keyed-routing).
    ///
    /// ```
    /// # use tower_sd::balance::{Balance, key_hash};
    /// # #[allow(dead_code)]
    /// # fn keyed(balance: Balance<tower::util::BoxCloneSyncService<http::Request<()>, (), tower::BoxError>>) {
    /// let sticky = balance.keyed(|request: &http::Request<()>| {
    ///     request.headers().get("x-user").map(|user| key_hash(&user.as_bytes()))
    /// });
    /// # drop(sticky);
    /// # }
    /// ```
    pub fn keyed<F>(self, key: F) -> Keyed<S, K, C, F> {
        Keyed {
            balance: self,
            key: Arc::new(key),
            factor: 1.25,
            in_flight: Arc::default(),
        }
    }
}

impl<S, K, C, F> Keyed<S, K, C, F> {
    /// Sets the balance factor `c`: no endpoint takes a keyed request while it holds `c`
    /// times the average (default 1.25; at least 1, which makes the bound tight).
    #[must_use]
    pub fn balance_factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.25
        };
        self
    }
}

impl<S, K, C: Clone, F> Clone for Keyed<S, K, C, F> {
    fn clone(&self) -> Self {
        Self {
            balance: self.balance.clone(),
            key: Arc::clone(&self.key),
            factor: self.factor,
            in_flight: Arc::clone(&self.in_flight),
        }
    }
}

impl<S, K, C, F> fmt::Debug for Keyed<S, K, C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyed")
            .field("service", &self.balance.service_name())
            .field("factor", &self.factor)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<S, K, C, F, Req> Service<Req> for Keyed<S, K, C, F>
where
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    K: Hash + fmt::Debug + Send + Sync + 'static,
    C: Classify<S::Response> + Clone,
    F: Fn(&Req) -> Option<u64>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future =
        Either<Oneshot<Balance<S, K, C>, Req>, KeyedFuture<ResponseFuture<Oneshot<S, Req>, C>>>;

    /// Always ready: each request drives its own endpoint (or the balancer) to readiness in
    /// its response future.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if let Some(hash) = (self.key)(&request) {
            let shared = self.balance.shared();
            let snapshot = shared.snapshot.load();
            if let Some(best) = snapshot.tiers.first().filter(|tier| tier.all.len() > 0) {
                let ring = snapshot
                    .ring
                    .get_or_init(|| Ring::new(&snapshot.slots, &best.all));
                let in_flight = self.in_flight.load(Ordering::Relaxed);
                let bound = ring::bound(in_flight, best.all.len(), self.factor);
                if let Some(index) = ring::pick(&snapshot.slots, ring, hash, bound) {
                    let slot = &snapshot.slots[index];
                    let completion = Completion::start(slot.start(), false);
                    let future = slot.service.clone().oneshot(request);
                    let classify = self.balance.classifier().clone();
                    self.in_flight.fetch_add(1, Ordering::Relaxed);
                    return Either::Right(KeyedFuture {
                        inner: ResponseFuture::new(future, completion, classify),
                        counted: InFlight(Arc::clone(&self.in_flight)),
                    });
                }
            }
        }
        Either::Left(self.balance.clone().oneshot(request))
    }
}

/// One keyed request in flight, counted out when dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// The response future of a keyed request: counted in the keyed load until it ends
    /// or is dropped.
    pub struct KeyedFuture<F> {
        #[pin]
        inner: F,
        counted: InFlight,
    }
}

impl<F: Future> Future for KeyedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

impl<F> fmt::Debug for KeyedFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedFuture").finish_non_exhaustive()
    }
}
