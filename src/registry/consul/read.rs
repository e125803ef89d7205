//! What the backend reads from Consul: a service's healthy instances (blocking or not), a
//! prepared query's, and the list of datacenters, each turned into validated instances.

use reqwest::Method;
use tracing::warn;

use super::api::{HealthEntry, META_DATACENTER, PreparedAnswer};
use super::client::{Client, REGISTRY, status_error_after};
use crate::error::{Error, Result};
use crate::instance::{ServiceInstance, ServiceQuery};

impl Client {
    /// `GET /v1/catalog/datacenters`: every known datacenter, the nearest first (by the
    /// agent's estimate of round-trip time), so the agent's own comes first.
    pub(crate) async fn datacenters(&self) -> Result<Vec<String>> {
        let url = self.url(&["v1", "catalog", "datacenters"]);
        let (_, body) = self.expect_ok(self.request(Method::GET, url)).await?;
        let names: Vec<String> = serde_json::from_slice(&body).map_err(|e| Error::Malformed {
            registry: REGISTRY,
            source: e.into(),
        })?;
        if names.is_empty() || names.iter().any(|name| name.trim().is_empty()) {
            return Err(Error::Malformed {
                registry: REGISTRY,
                source: "an empty datacenter list, or an empty name in it".into(),
            });
        }
        Ok(names)
    }

    /// `GET /v1/query/:name/execute`: a prepared query, which picks its datacenter (and
    /// fails over) by its own definition. Returns its healthy instances, ids qualified by
    /// the datacenter that answered, and that datacenter with the failovers it took.
    pub(crate) async fn execute_query(
        &self,
        query: &ServiceQuery,
        name: &str,
    ) -> Result<(Vec<ServiceInstance>, String, u32)> {
        let url = self.url(&["v1", "query", name, "execute"]);
        let mut request = self.request(Method::GET, url);
        if let Some(dc) = query
            .datacenter
            .as_ref()
            .or(self.settings.datacenter.as_ref())
        {
            request = request.query(&[("dc", dc)]);
        }
        let (status, answer, body) = self
            .send_with_headers(request, self.settings.request_timeout)
            .await?;
        if !status.is_success() {
            return Err(status_error_after(status, answer.retry_after, &body));
        }
        let answer: PreparedAnswer =
            serde_json::from_slice(&body).map_err(|e| Error::Malformed {
                registry: REGISTRY,
                source: e.into(),
            })?;
        let datacenter = answer.datacenter;
        let mut instances: Vec<ServiceInstance> = answer
            .nodes
            .into_iter()
            .filter_map(|entry| entry.into_instance(&self.mapping))
            .filter(|instance| crate::registry::dialable(REGISTRY, instance))
            .map(|mut instance| {
                instance.id = format!("{datacenter}/{}", instance.id);
                instance
                    .metadata
                    .entry(META_DATACENTER.to_owned())
                    .or_insert_with(|| datacenter.clone());
                instance
            })
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((instances, datacenter, answer.failovers))
    }

    /// `GET /v1/health/service/:name` (or `/v1/health/connect/:name`) with every filter of `query`; with `blocking`, a blocking
    /// query from that index. Returns the healthy instances sorted by id, and the index.
    pub(crate) async fn health_service(
        &self,
        query: &ServiceQuery,
        blocking: Option<u64>,
    ) -> Result<(Vec<ServiceInstance>, Option<u64>)> {
        let kind = if self.settings.mesh_discovery {
            "connect"
        } else {
            "service"
        };
        let url = self.url(&["v1", "health", kind, &query.name]);
        let mut request = self.request(Method::GET, url);
        for tag in &query.tags {
            request = request.query(&[("tag", tag)]);
        }
        if let Some(dc) = query
            .datacenter
            .as_ref()
            .or(self.settings.datacenter.as_ref())
        {
            request = request.query(&[("dc", dc)]);
        }
        if let (Some(ns), None) = (&query.namespace, &self.settings.namespace) {
            request = request.query(&[("ns", ns)]);
        }
        if let Some(filter) = meta_filter(query) {
            request = request.query(&[("filter", filter)]);
        }
        if self.settings.stale {
            request = request.query(&[("stale", "")]);
        }
        if self.settings.cached {
            request = request.query(&[("cached", "")]);
        }
        let (request, timeout) = self.blocking(request, blocking, self.settings.wait);
        let (status, answer, body) = self.send_with_headers(request, timeout).await?;
        if !status.is_success() {
            return Err(status_error_after(status, answer.retry_after, &body));
        }
        if self.settings.stale {
            answer.fresh_enough(self.settings.max_stale)?;
        }
        let index = answer.index;
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&body).map_err(|e| Error::Malformed {
                registry: REGISTRY,
                source: e.into(),
            })?;
        let mut instances: Vec<ServiceInstance> = entries
            .into_iter()
            .filter_map(|entry| entry.into_instance(&self.mapping))
            // Consul filtered already; this keeps every backend's semantics identical, with
            // Consul's case rules.
            .filter(|instance| matches(query, instance))
            .filter(|instance| crate::registry::dialable(REGISTRY, instance))
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        if instances.is_empty() && self.token.is_none() {
            self.warn_anonymous(&query.name);
        }
        if answer.filtered {
            // A token Consul knows but that may not read (all of) the service: the answer
            // hides instances. Never the token itself in the message.
            warn!(
                service = %query.name,
                instances = instances.len(),
                "Consul filtered this answer by ACLs: the token lacks service:read on the service (or the anonymous token is denied)"
            );
            if instances.is_empty() {
                return Err(Error::Status {
                    registry: REGISTRY,
                    status: 403,
                    source: format!(
                        "every instance of `{}` was filtered out by ACLs: the token lacks service:read",
                        query.name
                    )
                    .into(),
                });
            }
        }
        Ok((instances, index))
    }
}

impl Client {
    /// Consul says nothing when it hides every instance from a request without a token:
    /// its servers clear `X-Consul-Results-Filtered-By-ACLs` for those
    /// (`maskResultsFilteredByACLs`). So an empty answer without a token may be ACLs, and
    /// the user is told once what to do.
    fn warn_anonymous(&self, service: &str) {
        if self
            .warned_anonymous
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        warn!(
            service,
            "Consul answered no instances, and no ACL token is configured: if the agent enforces ACLs with default deny, the anonymous token cannot read the service and Consul hides its instances without saying so; configure a token with service:read (ConsulRegistry::builder().token, or `token` in the configuration file). Said once."
        );
    }
}

/// Whether `instance` answers `query` as Consul decides it: the service name and the tags
/// compared without regard to case (its state store indexes names in lower case, and its
/// tag filter lowers both sides), the metadata exactly (its filter expressions compare
/// strings as they are).
fn matches(query: &ServiceQuery, instance: &ServiceInstance) -> bool {
    let same = |a: &str, b: &str| a == b || a.to_lowercase() == b.to_lowercase();
    same(&instance.name, &query.name)
        && query
            .tags
            .iter()
            .all(|tag| instance.tags.iter().any(|have| same(have, tag)))
        && query
            .metadata
            .iter()
            .all(|(key, value)| instance.metadata.get(key) == Some(value))
}

/// Metadata filters as a Consul filter expression: `Service.Meta["k"] == "v" and ...`.
fn meta_filter(query: &ServiceQuery) -> Option<String> {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let terms: Vec<String> = query
        .metadata
        .iter()
        .map(|(key, value)| format!("Service.Meta[{}] == {}", quote(key), quote(value)))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" and "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches exact matching of names or tags (Consul's are case-insensitive: a service
    /// registered as `Greeter` is the one `http://greeter/` asks for), and case-insensitive
    /// metadata (Consul's filter expressions are not).
    #[test]
    fn names_and_tags_match_without_regard_to_case_and_metadata_exactly() {
        let instance = ServiceInstance::new("g1", "Greeter", "10.0.0.1", 1)
            .with_tag("Primary")
            .with_tag("EU")
            .with_metadata("version", "V2");
        let query = ServiceQuery::new("greeter")
            .with_tag("primary")
            .with_tag("eu");
        assert!(matches(&query, &instance));
        assert!(matches(
            &query.clone().with_metadata("version", "V2"),
            &instance
        ));
        assert!(!matches(
            &query.clone().with_metadata("version", "v2"),
            &instance
        ));
        assert!(!matches(&query.clone().with_tag("canary"), &instance));
        assert!(!matches(&ServiceQuery::new("greeters"), &instance));
        let unicode = ServiceInstance::new("g2", "ÉCOLE", "10.0.0.1", 1);
        assert!(matches(&ServiceQuery::new("école"), &unicode));
    }

    #[test]
    fn metadata_becomes_a_quoted_filter_expression() {
        let query = ServiceQuery::new("svc")
            .with_metadata("version", "2")
            .with_metadata("odd \"key\"", "a b");
        assert_eq!(
            meta_filter(&query).unwrap(),
            r#"Service.Meta["odd \"key\""] == "a b" and Service.Meta["version"] == "2""#
        );
        assert_eq!(meta_filter(&ServiceQuery::new("svc")), None);
    }
}
