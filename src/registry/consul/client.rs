//! The HTTP side of the Consul backend: one reqwest client, typed errors, capped bodies.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde_json::json;

use super::MeshRegistration;
use super::api::{Mapping, Registration, Weights};
use super::settings::{HealthCheckKind, Settings, go_duration};
use crate::error::{BoxError, Error, RateLimited, Result};
use crate::instance::{HealthStatus, ServiceInstance};
use crate::registry::Secret;

pub(super) const REGISTRY: &str = "consul";
/// How much of an error body goes into an error (never credentials: Consul does not echo
/// the token).
const ERROR_BODY_BYTES: usize = 512;

pub(crate) struct Client {
    http: reqwest::Client,
    base: Url,
    pub(crate) settings: Settings,
    pub(super) mapping: Mapping,
    /// `X-Consul-Token`'s value, marked sensitive: HTTP/2's HPACK never indexes it.
    pub(super) token: Option<reqwest::header::HeaderValue>,
    /// Whether the warning about an empty answer without a token was given (once).
    pub(super) warned_anonymous: std::sync::atomic::AtomicBool,
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
    pub(super) async fn send_with_headers(
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
    pub(super) async fn expect_ok(
        &self,
        request: RequestBuilder,
    ) -> Result<(Option<u64>, Vec<u8>)> {
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
}

/// The headers of an answer the backend reads.
pub(super) struct Answer {
    pub(super) index: Option<u64>,
    /// `Retry-After`, as a wait from now.
    pub(super) retry_after: Option<Duration>,
    /// `X-Consul-LastContact`: how long since the answering server heard from its leader.
    last_contact: Option<Duration>,
    /// `X-Consul-KnownLeader`.
    known_leader: Option<bool>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`.
    pub(super) filtered: bool,
}

impl Answer {
    /// Whether a `stale` read is fresh enough: its server knows a leader, and (with
    /// `max_stale`) heard from it at most that long ago. An answer without the headers
    /// (which Consul always sends on reads) counts as fresh.
    pub(super) fn fresh_enough(&self, max_stale: Option<Duration>) -> Result<()> {
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
pub(super) fn status_error_after(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Error {
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
}
