//! The HTTP side of the Consul backend: one reqwest client, typed errors, capped bodies.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde_json::json;
use tracing::warn;

use super::MeshRegistration;
use super::api::{HealthEntry, META_DATACENTER, Mapping, PreparedAnswer, Registration, Weights};
use super::settings::{HealthCheckKind, Settings, go_duration};
use crate::error::{BoxError, Error, RateLimited, Result};
use crate::instance::{HealthStatus, ServiceInstance, ServiceQuery};
use crate::registry::Secret;

const REGISTRY: &str = "consul";
/// How much of an error body goes into an error (never credentials: Consul does not echo
/// the token).
const ERROR_BODY_BYTES: usize = 512;

pub(crate) struct Client {
    http: reqwest::Client,
    base: Url,
    pub(crate) settings: Settings,
    mapping: Mapping,
    /// `X-Consul-Token`'s value, marked sensitive: HTTP/2's HPACK never indexes it.
    token: Option<reqwest::header::HeaderValue>,
    /// Whether the warning about an empty answer without a token was given (once).
    warned_anonymous: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `settings.token` is a `Secret`, whose Debug is redacted.
        f.debug_struct("Client")
            .field("address", &self.base.as_str())
            .field("datacenter", &self.settings.datacenter)
            .field("token", &self.settings.token)
            .finish_non_exhaustive()
    }
}

fn invalid(key: &str, source: impl Into<BoxError>) -> Error {
    Error::InvalidConfig {
        key: key.to_owned(),
        source: source.into(),
    }
}

/// A rustls configuration with the ring provider: the configured CA, else the platform's
/// roots for `https`, else none (plain `http` never uses them).
fn tls_config(ca_file: Option<&std::path::Path>, https: bool) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("ca_file", e))?;
    let config = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| invalid("ca_file", e))? {
                roots
                    .add(cert.map_err(|e| invalid("ca_file", e))?)
                    .map_err(|e| invalid("ca_file", e))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None if !https => builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(|e| invalid("ca_file", e))?
                .with_no_client_auth()
        }
    };
    Ok(config)
}

impl Client {
    pub(crate) fn new(settings: Settings) -> Result<Self> {
        let address = if settings.address.contains("://") {
            settings.address.clone()
        } else {
            format!("http://{}", settings.address)
        };
        let base = Url::parse(&address).map_err(|e| invalid("address", e))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(invalid(
                "address",
                format!(
                    "`{}`: expected http(s)://host:port or host:port",
                    settings.address
                ),
            ));
        }
        // reqwest is built without a crypto provider and the library never installs a
        // process-wide one, so it always gets a preconfigured rustls with ring.
        let tls = tls_config(settings.ca_file.as_deref(), base.scheme() == "https")?;
        // The token stays with the agent: never follow a redirect (reqwest would resend
        // `X-Consul-Token`, which it does not know to strip, to wherever it points), and
        // never send it through a system proxy to a loopback agent unless asked to.
        let mut http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none());
        let loopback = is_loopback(&base);
        if !settings.system_proxy.unwrap_or(!loopback) {
            http = http.no_proxy();
        }
        let http = http.build().map_err(|e| invalid("address", e))?;
        let mapping = Mapping {
            zone_key: settings.zone_key.clone(),
            tagged_address: settings.tagged_address.clone(),
            mesh: settings.mesh_discovery,
        };
        let token = match &settings.token {
            Some(Secret(token)) => {
                // Never the token itself in the error.
                let mut value = reqwest::header::HeaderValue::from_str(token)
                    .map_err(|_| invalid("token", "not a valid HTTP header value"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self {
            http,
            base,
            settings,
            mapping,
            token,
            warned_anonymous: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs have paths")
            .pop_if_empty()
            .extend(segments);
        url
    }

    pub(crate) fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token.clone());
        }
        if let Some(namespace) = &self.settings.namespace {
            request = request.query(&[("ns", namespace)]);
        }
        request
    }

    /// Sends a request; returns the status, the `X-Consul-Index` and the body (capped).
    pub(crate) async fn send(
        &self,
        request: RequestBuilder,
        timeout: Duration,
    ) -> Result<(StatusCode, Option<u64>, Vec<u8>)> {
        let (status, headers, body) = self.send_with_headers(request, timeout).await?;
        Ok((status, headers.index, body))
    }

    /// [`send`](Self::send), with the headers the backend reads.
    async fn send_with_headers(
        &self,
        request: RequestBuilder,
        timeout: Duration,
    ) -> Result<(StatusCode, Answer, Vec<u8>)> {
        let transport = |error| transport(error, timeout);
        let mut response = request.timeout(timeout).send().await.map_err(transport)?;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let answer = Answer {
            index: header("X-Consul-Index").and_then(|v| v.parse::<u64>().ok()),
            retry_after: header("Retry-After").and_then(|v| retry_after(&v)),
            last_contact: header("X-Consul-LastContact")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis),
            known_leader: header("X-Consul-KnownLeader").map(|v| v == "true"),
            filtered: header("X-Consul-Results-Filtered-By-ACLs").is_some_and(|v| v == "true"),
        };
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > self.settings.max_body_bytes {
                return Err(Error::Malformed {
                    registry: REGISTRY,
                    source: format!("response body over {} bytes", self.settings.max_body_bytes)
                        .into(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, answer, body))
    }

    /// With `index`, makes `request` a blocking query from it waiting at most `wait`, and
    /// returns the time limit to give it (the wait, Consul's jitter of up to wait/16, and
    /// slack); without, the request timeout.
    pub(crate) fn blocking(
        &self,
        request: RequestBuilder,
        index: Option<u64>,
        wait: Duration,
    ) -> (RequestBuilder, Duration) {
        match index {
            Some(index) => (
                request.query(&[("index", index.to_string()), ("wait", go_duration(wait))]),
                wait + wait / 16 + Duration::from_secs(5),
            ),
            None => (request, self.settings.request_timeout),
        }
    }

    /// Sends a request that must succeed (2xx), or maps the status to an error.
    async fn expect_ok(&self, request: RequestBuilder) -> Result<(Option<u64>, Vec<u8>)> {
        let (status, index, body) = self.send(request, self.settings.request_timeout).await?;
        if status.is_success() {
            Ok((index, body))
        } else {
            Err(status_error(status, &body))
        }
    }

    pub(crate) async fn register(&self, instance: &ServiceInstance) -> Result<()> {
        let check = self.check_json(instance);
        let body = Registration {
            id: &instance.id,
            name: &instance.name,
            tags: &instance.tags,
            address: &instance.address,
            port: instance.port,
            meta: &instance.metadata,
            weights: Weights {
                passing: instance.weight,
                warning: 1,
            },
            check,
            connect: self.settings.mesh.as_ref().map(MeshRegistration::to_json),
        };
        let url = self.url(&["v1", "agent", "service", "register"]);
        let request = self
            .request(Method::PUT, url)
            .query(&[("replace-existing-checks", "true")])
            .json(&body);
        self.expect_ok(request).await.map(drop)
    }

    fn check_json(&self, instance: &ServiceInstance) -> serde_json::Value {
        let check = &self.settings.check;
        let mut value = json!({
            "CheckID": format!("service:{}", instance.id),
            "Name": format!("{} health", instance.name),
            "DeregisterCriticalServiceAfter": go_duration(check.deregister_after),
        });
        let timing = |value: &mut serde_json::Value| {
            value["Interval"] = json!(go_duration(check.interval));
            value["Timeout"] = json!(go_duration(check.timeout));
        };
        match &check.kind {
            HealthCheckKind::Http(url) => {
                let url = url
                    .clone()
                    .unwrap_or_else(|| format!("http://{}/healthz", instance.authority()));
                value["HTTP"] = json!(url);
                timing(&mut value);
            }
            HealthCheckKind::Tcp => {
                value["TCP"] = json!(instance.authority());
                timing(&mut value);
            }
            HealthCheckKind::Grpc => {
                value["GRPC"] = json!(instance.authority());
                timing(&mut value);
            }
            HealthCheckKind::Ttl(ttl) => value["TTL"] = json!(go_duration(*ttl)),
        }
        value
    }

    pub(crate) async fn deregister(&self, id: &str) -> Result<()> {
        let url = self.url(&["v1", "agent", "service", "deregister", id]);
        match self.expect_ok(self.request(Method::PUT, url)).await {
            // Deregistering what is not registered succeeds.
            Err(Error::Status { status: 404, .. }) => Ok(()),
            other => other.map(drop),
        }
    }

    pub(crate) async fn maintenance(&self, id: &str, enable: bool, reason: &str) -> Result<()> {
        let url = self.url(&["v1", "agent", "service", "maintenance", id]);
        let request = self.request(Method::PUT, url).query(&[
            ("enable", if enable { "true" } else { "false" }),
            ("reason", reason),
        ]);
        self.expect_ok(request).await.map(drop)
    }

    pub(crate) async fn pass_ttl(&self, id: &str) -> Result<()> {
        let check = format!("service:{id}");
        let url = self.url(&["v1", "agent", "check", "update", &check]);
        let request = self
            .request(Method::PUT, url)
            .json(&json!({ "Status": "passing" }));
        self.expect_ok(request).await.map(drop)
    }

    pub(crate) async fn agent_health(&self, id: &str) -> Result<HealthStatus> {
        let url = self.url(&["v1", "agent", "health", "service", "id", id]);
        let (status, _, body) = self
            .send(
                self.request(Method::GET, url),
                self.settings.request_timeout,
            )
            .await?;
        // The body's AggregatedStatus tells maintenance from critical (both answer 503).
        let aggregated = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("AggregatedStatus")?.as_str().map(str::to_owned));
        match status.as_u16() {
            200 => Ok(HealthStatus::Passing),
            429 => Ok(HealthStatus::Warning),
            503 if aggregated.as_deref() == Some("maintenance") => Ok(HealthStatus::Maintenance),
            503 => Ok(HealthStatus::Critical),
            404 => Ok(HealthStatus::Unknown),
            _ => Err(status_error(status, &body)),
        }
    }

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

/// The headers of an answer the backend reads.
struct Answer {
    index: Option<u64>,
    /// `Retry-After`, as a wait from now.
    retry_after: Option<Duration>,
    /// `X-Consul-LastContact`: how long since the answering server heard from its leader.
    last_contact: Option<Duration>,
    /// `X-Consul-KnownLeader`.
    known_leader: Option<bool>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`.
    filtered: bool,
}

impl Answer {
    /// Whether a `stale` read is fresh enough: its server knows a leader, and (with
    /// `max_stale`) heard from it at most that long ago. An answer without the headers
    /// (which Consul always sends on reads) counts as fresh.
    fn fresh_enough(&self, max_stale: Option<Duration>) -> Result<()> {
        let stale = |source: String| Error::Stale {
            registry: REGISTRY,
            source: source.into(),
        };
        if self.known_leader == Some(false) {
            return Err(stale("the answering server knows no leader".to_owned()));
        }
        match (self.last_contact, max_stale) {
            (Some(contact), Some(max)) if contact > max => Err(stale(format!(
                "the answering server last heard from its leader {contact:?} ago (max_stale {max:?})"
            ))),
            _ => Ok(()),
        }
    }
}

/// Whether the agent is on this machine (`localhost`, `127.0.0.0/8`, `::1`).
fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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

fn transport(error: reqwest::Error, timeout: Duration) -> Error {
    if error.is_timeout() {
        Error::Timeout {
            registry: REGISTRY,
            source: crate::error::Elapsed(timeout),
        }
    } else {
        Error::Unreachable {
            registry: REGISTRY,
            source: Box::new(error.without_url()),
        }
    }
}

pub(crate) fn status_error(status: StatusCode, body: &[u8]) -> Error {
    status_error_after(status, None, body)
}

/// [`status_error`], with the answer's `Retry-After` kept in a 429's [`RateLimited`].
fn status_error_after(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_BYTES)]);
    let text = text.trim().to_owned();
    let source: BoxError = match status.as_u16() {
        403 => format!("ACL denied: {text}").into(),
        429 => Box::new(RateLimited {
            retry_after,
            message: text,
        }),
        _ => text.into(),
    };
    Error::Status {
        registry: REGISTRY,
        status: status.as_u16(),
        source,
    }
}

/// The longest `Retry-After` honoured: Consul's longest blocking wait.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A `Retry-After` value (RFC 9110: delta-seconds, or an HTTP-date) as a wait from now, at
/// most [`MAX_RETRY_AFTER`]; a date in the past is no wait.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds.min(MAX_RETRY_AFTER.as_secs())),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
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

    /// Catches a `Retry-After` read in the wrong unit, an HTTP-date not read, a huge value
    /// not capped (or overflowing), and garbage taken for a wait.
    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(retry_after("18446744073709551615"), Some(MAX_RETRY_AFTER));
        let soon = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = retry_after(&httpdate::fmt_http_date(soon)).unwrap();
        assert!(
            wait > Duration::from_secs(115) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
        assert_eq!(retry_after("-1"), None);
        let error = status_error_after(
            StatusCode::TOO_MANY_REQUESTS,
            retry_after("3"),
            b"slow down",
        );
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(
            crate::error::Chain(&error).to_string(),
            "consul registry answered with status 429: rate limited: slow down"
        );
        let other = status_error_after(StatusCode::SERVICE_UNAVAILABLE, retry_after("3"), b"");
        assert_eq!(other.retry_after(), None, "only a 429 asks to wait");
    }

    /// Catches a stale read taken from a server without a leader, or older than
    /// `max_stale`, and a fresh one refused (at the limit, or with no limit).
    #[test]
    fn a_stale_read_is_taken_only_from_a_server_in_touch_with_its_leader() {
        let answer = |contact_ms: u64, leader: bool| Answer {
            index: None,
            filtered: false,
            retry_after: None,
            last_contact: Some(Duration::from_millis(contact_ms)),
            known_leader: Some(leader),
        };
        let max = Some(Duration::from_secs(2));
        assert!(answer(2_000, true).fresh_enough(max).is_ok());
        let old = answer(2_001, true).fresh_enough(max).unwrap_err();
        assert!(
            matches!(old, Error::Stale { .. }) && old.is_transient(),
            "{old:?}"
        );
        assert!(answer(60_000, true).fresh_enough(None).is_ok());
        assert!(answer(0, false).fresh_enough(None).is_err());
        let silent = Answer {
            index: None,
            filtered: false,
            retry_after: None,
            last_contact: None,
            known_leader: None,
        };
        assert!(silent.fresh_enough(max).is_ok());
    }

    /// Catches the token sent as an ordinary header (HPACK would index it in the connection's
    /// table), and a token that is no header value accepted (the error must not show it).
    #[test]
    fn the_token_header_is_sensitive_and_checked() {
        let settings = |token: &str| Settings {
            token: Some(Secret(token.to_owned())),
            ..Settings::default()
        };
        let client = Client::new(settings("s3cr3t")).unwrap();
        let url = client.url(&["v1", "agent", "self"]);
        let request = client.request(Method::GET, url).build().unwrap();
        let token = &request.headers()["X-Consul-Token"];
        assert!(token.is_sensitive());
        assert_eq!(token, "s3cr3t");
        let error = Client::new(settings("bad\ntoken")).unwrap_err();
        let message = crate::error::Chain(&error).to_string();
        assert!(
            message.contains("token") && !message.contains("bad"),
            "{message}"
        );
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
