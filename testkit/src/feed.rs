//! A discovery stream that a test feeds by hand: the input of a balancer under test.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tower::discover::Change;
use tower_sd::endpoint::Endpoint;

/// What a test feeds: each change reaches the balancer as the next item of [`Fed`].
pub struct Feed<K, S> {
    tx: mpsc::UnboundedSender<Result<Change<K, Endpoint<S>>, Infallible>>,
}

/// The stream a [`Feed`] feeds; it ends when the feed is dropped.
pub struct Fed<K, S> {
    rx: mpsc::UnboundedReceiver<Result<Change<K, Endpoint<S>>, Infallible>>,
}

/// A feed and the discovery stream it feeds.
pub fn feed<K, S>() -> (Feed<K, S>, Fed<K, S>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Feed { tx }, Fed { rx })
}

impl<K, S> Feed<K, S> {
    /// Inserts `service` under `key`, with weight 1, no zone and no readiness.
    pub fn insert(&self, key: K, service: S) {
        self.insert_endpoint(key, Endpoint::new(service));
    }

    /// Inserts `endpoint` under `key`.
    pub fn insert_endpoint(&self, key: K, endpoint: Endpoint<S>) {
        self.send(Change::Insert(key, endpoint));
    }

    /// Removes `key`.
    pub fn remove(&self, key: K) {
        self.send(Change::Remove(key));
    }

    /// Whether the balancer's updater has dropped the stream.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the balancer's updater drops the stream.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    fn send(&self, change: Change<K, Endpoint<S>>) {
        let sent = self.tx.send(Ok(change)).is_ok();
        assert!(sent, "the balancer's updater is running");
    }
}

impl<K, S> Clone for Feed<K, S> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<K, S> futures_core::Stream for Fed<K, S> {
    type Item = Result<Change<K, Endpoint<S>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
