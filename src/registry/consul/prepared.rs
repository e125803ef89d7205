//! Prepared queries as a query kind: a query named `<name>.query` (as Consul's DNS
//! interface names them, `<name>.query.consul`) executes the prepared query `<name>`
//! (`/v1/query/:name/execute`), which picks its datacenter and fails over by its own
//! definition. Many Consul users configure failover there rather than in each client.
//!
//! The answer names the datacenter that answered and how many failovers it took: instance
//! ids are qualified by that datacenter (and carry `consul-datacenter`), and a change of
//! either is logged. Prepared queries do not block, so the watch polls: every
//! `poll_interval`, drawn between half of it and all of it, through the same token bucket
//! and shared watch loop as blocking queries (errors back off; a set is emitted only when it
//! changed). Only `datacenter` of the query is sent: the prepared query's definition
//! decides tags and metadata.

use std::sync::Arc;

use futures_core::Stream;
use tracing::info;

use super::client::Client;
use super::watch::TokenBucket;
use crate::backoff::equal_jitter;
use crate::error::Result;
use crate::instance::{ServiceInstance, ServiceQuery};
use crate::registry::watch::{self, Fetched, Source};

/// The suffix that makes a query name a prepared query's.
const SUFFIX: &str = ".query";

/// The prepared query `query` names, if it names one.
pub(crate) fn name(query: &ServiceQuery) -> Option<&str> {
    query
        .name
        .strip_suffix(SUFFIX)
        .filter(|name| !name.is_empty())
}

/// The prepared query's instances, once.
pub(crate) async fn discover(
    client: &Client,
    query: &ServiceQuery,
    name: &str,
) -> Result<Vec<ServiceInstance>> {
    Ok(client.execute_query(query, name).await?.0)
}

/// Polls a prepared query (see the module docs).
struct Polled {
    client: Arc<Client>,
    query: ServiceQuery,
    name: String,
    bucket: TokenBucket,
    /// Whether the next fetch waits out the poll interval first: not the first one, and
    /// not one after an error (which waited out a backoff).
    wait: bool,
    /// The datacenter that answered last, and the failovers it took.
    answered_by: Option<(String, u32)>,
}

pub(crate) fn stream(
    client: Arc<Client>,
    query: ServiceQuery,
    name: &str,
) -> impl Stream<Item = Result<Vec<ServiceInstance>>> + Send + 'static {
    let settings = &client.settings;
    let retry = (settings.retry_base, settings.retry_max);
    let source = Polled {
        bucket: TokenBucket::new(settings.requests_per_second),
        client: Arc::clone(&client),
        query: query.clone(),
        name: name.to_owned(),
        wait: false,
        answered_by: None,
    };
    watch::watch("consul", query, retry, source)
}

impl Source for Polled {
    async fn fetch(&mut self) -> Fetched {
        if self.wait {
            tokio::time::sleep(equal_jitter(self.client.settings.poll_interval)).await;
        }
        self.bucket.take().await;
        match self.client.execute_query(&self.query, &self.name).await {
            Ok((set, datacenter, failovers)) => {
                self.wait = true;
                let by = Some((datacenter, failovers));
                if by != self.answered_by {
                    info!(query = %self.name, datacenter = ?by.as_ref().map(|b| &b.0), failovers = ?by.as_ref().map(|b| b.1), "prepared query answered");
                    self.answered_by = by;
                }
                Fetched::Set(set)
            }
            Err(error) => {
                self.wait = false;
                Fetched::Failed(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_ending_in_query_names_a_prepared_query() {
        assert_eq!(name(&"redis.query".into()), Some("redis"));
        assert_eq!(name(&"redis".into()), None);
        assert_eq!(name(&".query".into()), None);
        assert_eq!(name(&"a.b.query".into()), Some("a.b"));
    }
}
