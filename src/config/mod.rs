//! Registry configuration (YAML or TOML) and the factory that builds the registry.
//!
//! The decision record's YAML is accepted as written:
//!
//! ```
//! use tower_sd::config::RegistryConfig;
//!
//! let config = RegistryConfig::from_yaml_str(r#"
//! registry:
//!   type: memory          # consul | kubernetes | etcd | dns | static | memory
//!   consul:
//!     address: "localhost:8500"
//!     datacenter: "dc1"
//!     scheme: "http"
//!     health_check: { interval: "10s", timeout: "3s", deregister_after: "1m" }
//!   kubernetes:
//!     namespace: "default"
//!     in_cluster: true
//! "#)?;
//! let registry = config.build()?;
//! assert_eq!(registry.kind(), "memory");
//! # Ok::<(), tower_sd::Error>(())
//! ```
//!
//! Durations are human-readable (`500ms`, `10s`, `1m`, `1m30s`, `2h`). Unknown keys are
//! rejected with their path; an unknown `type` lists the valid ones; a backend that is not
//! compiled in names its cargo feature. `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` override
//! the file. Optional wrappers: `cache` (see [`CachedRegistry`](crate::registry::CachedRegistry)) and `fallback`, a list of
//! further registry sections followed when this one fails (see [`FallbackRegistry`](crate::registry::FallbackRegistry)).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod build;

use crate::error::{BoxError, Error, Result};
use crate::instance::ServiceInstance;
use crate::registry::ServiceRegistry;

/// The registry types, as `registry.type` names them.
pub const REGISTRY_TYPES: [&str; 6] = ["consul", "kubernetes", "etcd", "dns", "static", "memory"];

/// A configuration file: one `registry` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry to use.
    pub registry: RegistrySection,
}

/// The `registry` section (and each entry of its `fallback` list).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RegistrySection {
    /// Which registry: one of [`REGISTRY_TYPES`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Consul settings.
    #[serde(default)]
    pub consul: Option<ConsulSection>,
    /// Kubernetes settings.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
    /// etcd settings.
    #[serde(default)]
    pub etcd: Option<EtcdSection>,
    /// DNS settings.
    #[serde(default)]
    pub dns: Option<DnsSection>,
    /// The instances of a `static` registry.
    #[serde(default, rename = "static")]
    pub static_list: Option<StaticSection>,
    /// In-memory registry settings.
    #[serde(default)]
    pub memory: Option<MemorySection>,
    /// Serve the last good sets while the registry fails.
    #[serde(default)]
    pub cache: Option<CacheSection>,
    /// Registries to follow, in order, when this one fails.
    #[serde(default)]
    pub fallback: Vec<RegistrySection>,
    /// How long a failing registry is followed before the next in `fallback` (default 30 s).
    #[serde(default, deserialize_with = "duration_opt")]
    pub failover_after: Option<Duration>,
}

/// `registry.consul`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsulSection {
    /// `host:port` or a URL (default `127.0.0.1:8500`).
    pub address: Option<String>,
    /// `http` or `https`, for an address without a scheme.
    pub scheme: Option<String>,
    /// Datacenter to query.
    pub datacenter: Option<String>,
    /// Namespace (Consul Enterprise).
    pub namespace: Option<String>,
    /// ACL token (never shown in `Debug`).
    pub token: Option<String>,
    /// CA certificate file for `https`.
    pub ca_file: Option<PathBuf>,
    /// Blocking-query wait.
    #[serde(default, deserialize_with = "duration_opt")]
    pub wait: Option<Duration>,
    /// `stale` reads.
    #[serde(default)]
    pub stale: bool,
    /// `cached` reads.
    #[serde(default)]
    pub cached: bool,
    /// Time limit of non-blocking requests.
    #[serde(default, deserialize_with = "duration_opt")]
    pub request_timeout: Option<Duration>,
    /// Metadata key holding the zone.
    pub zone_key: Option<String>,
    /// The health check registered with each instance.
    pub health_check: Option<HealthCheckSection>,
}

impl fmt::Debug for ConsulSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulSection")
            .field("address", &self.address)
            .field("scheme", &self.scheme)
            .field("datacenter", &self.datacenter)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("health_check", &self.health_check)
            .finish_non_exhaustive()
    }
}

/// `registry.consul.health_check`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthCheckSection {
    /// `http` (default), `tcp`, `grpc` or `ttl`.
    pub kind: Option<String>,
    /// URL of an `http` check (default `http://{address}:{port}/healthz`).
    pub http: Option<String>,
    /// TTL of a `ttl` check.
    #[serde(default, deserialize_with = "duration_opt")]
    pub ttl: Option<Duration>,
    /// Check interval.
    #[serde(default, deserialize_with = "duration_opt")]
    pub interval: Option<Duration>,
    /// Check timeout.
    #[serde(default, deserialize_with = "duration_opt")]
    pub timeout: Option<Duration>,
    /// `DeregisterCriticalServiceAfter`.
    #[serde(default, deserialize_with = "duration_opt")]
    pub deregister_after: Option<Duration>,
}

/// `registry.kubernetes`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KubernetesSection {
    /// Namespace of the services.
    pub namespace: Option<String>,
    /// Use the in-cluster configuration (else kubeconfig).
    pub in_cluster: Option<bool>,
    /// The Service port name to use.
    pub port_name: Option<String>,
    /// Extra label selector.
    pub label_selector: Option<String>,
}

/// `registry.etcd`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EtcdSection {
    /// Endpoint URLs.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Key prefix (default `/services`).
    pub prefix: Option<String>,
    /// Lease TTL (default 10 s).
    #[serde(default, deserialize_with = "duration_opt")]
    pub lease_ttl: Option<Duration>,
    /// User name.
    pub username: Option<String>,
    /// Password (never shown in `Debug`).
    pub password: Option<String>,
    /// CA certificate (PEM file) to trust for `https://` endpoints.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for EtcdSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSection")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// `registry.dns`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DnsSection {
    /// Name servers, `ip:port` (default: the system's).
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Re-resolve no sooner than this.
    #[serde(default, deserialize_with = "duration_opt")]
    pub min_ttl: Option<Duration>,
    /// Re-resolve no later than this.
    #[serde(default, deserialize_with = "duration_opt")]
    pub max_ttl: Option<Duration>,
    /// `srv` (default), `a`, `aaaa` or `ip` (A and AAAA).
    pub record: Option<String>,
    /// Port of A/AAAA instances whose query name has none.
    pub port: Option<u16>,
}

/// `registry.static`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticSection {
    /// The instances.
    pub instances: Vec<ServiceInstance>,
}

/// `registry.memory`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MemorySection {
    /// The registry's datacenter (default `dc1`).
    pub datacenter: Option<String>,
    /// The registry's namespace (default `default`).
    pub namespace: Option<String>,
    /// TTL check for every registration.
    #[serde(default, deserialize_with = "duration_opt")]
    pub ttl: Option<Duration>,
    /// Remove instances critical this long.
    #[serde(default, deserialize_with = "duration_opt")]
    pub deregister_after: Option<Duration>,
}

/// `registry.cache`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheSection {
    /// Serve cached sets at most this long after the last good answer (default: for ever).
    #[serde(default, deserialize_with = "duration_opt")]
    pub max_stale: Option<Duration>,
    /// Persist the good sets to this file and seed from it at start.
    pub persist: Option<PathBuf>,
}

/// Parses a human-readable duration: `500ms`, `10s`, `1m`, `1m30s`, `2h`.
///
/// # Errors
///
/// A message saying what was expected.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("invalid duration `{text}`: expected e.g. 500ms, 10s, 1m, 1m30s, 2h");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let part = Duration::try_from_secs_f64(value * seconds).map_err(|_| bad())?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("duration `{text}` is too long (more than {} s)", u64::MAX))?;
    }
    Ok(total)
}

fn duration_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
        .transpose()
}

fn invalid(key: impl Into<String>, why: impl Into<BoxError>) -> Error {
    Error::InvalidConfig {
        key: key.into(),
        source: why.into(),
    }
}

/// `line L column C: what` as (L, C, what).
fn parse_location(text: &str) -> Option<(usize, usize, &str)> {
    let rest = text.strip_prefix("line ")?;
    let (line, rest) = rest.split_once(" column ")?;
    let (column, what) = rest.split_once(": ")?;
    Some((line.parse().ok()?, column.parse().ok()?, what))
}

/// Keys whose values are secrets: an error about one never repeats its value.
const SECRET_KEYS: [&str; 2] = ["token", "password"];

/// Turns a deserialization error of the parsed document into the key it concerns.
fn from_value(value: serde_json::Value) -> Result<RegistryConfig> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let secret = SECRET_KEYS
            .iter()
            .any(|key| path.rsplit('.').next() == Some(*key));
        let key = if path == "." {
            "(document)".to_owned()
        } else {
            path
        };
        let message = if secret {
            "invalid value (not shown: it is a secret)".to_owned()
        } else {
            error.into_inner().to_string()
        };
        invalid(key, message)
    })
}

/// A syntax error as `line L, column C: what`, without the source line the parsers quote
/// (which may hold a token or password), and with any secret's value scrubbed besides.
fn syntax_error(line: usize, column: usize, what: &str, source: &str) -> Error {
    let mut message = format!("syntax error at line {line}, column {column}: {what}");
    for value in secret_values(source) {
        message = message.replace(value, "<redacted>");
    }
    invalid("(document)", message)
}

/// The values written after a secret key (`token: ...`, `password = ...`), unparsed.
fn secret_values(source: &str) -> impl Iterator<Item = &str> {
    source.lines().filter_map(|line| {
        let line = line.trim_start();
        let key = SECRET_KEYS.iter().find(|key| line.starts_with(*key))?;
        let rest = line[key.len()..].trim_start();
        let value = rest.strip_prefix([':', '='])?.trim();
        let value = value.trim_matches(['"', '\''].as_slice());
        (value.len() >= 3).then_some(value)
    })
}

impl RegistryConfig {
    /// Parses YAML.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the key (or `(document)` for a syntax error).
    pub fn from_yaml_str(yaml: &str) -> Result<Self> {
        let value: serde_json::Value = serde_saphyr::from_str(yaml).map_err(|error| {
            // The first line says where and what; the rest quotes the source.
            let text = error.to_string();
            let first = text.lines().next().unwrap_or_default();
            let what = first.strip_prefix("error: ").unwrap_or(first);
            let (line, column, what) = parse_location(what).unwrap_or((0, 0, what));
            syntax_error(line, column, what, yaml)
        })?;
        from_value(value)
    }

    /// Parses TOML.
    ///
    /// # Errors
    ///
    /// As for [`from_yaml_str`](Self::from_yaml_str).
    pub fn from_toml_str(toml: &str) -> Result<Self> {
        let value: serde_json::Value = toml::from_str(toml).map_err(|error| {
            let start = error.span().map_or(0, |span| span.start).min(toml.len());
            let before = &toml[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            syntax_error(line, column, error.message().trim(), toml)
        })?;
        from_value(value)
    }

    /// Reads a file: TOML when it ends in `.toml`, else YAML.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an unreadable file (key `(file)`) or invalid content.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("(file)", format!("{}: {e}", path.display())))?;
        if path.extension().is_some_and(|ext| ext == "toml") {
            Self::from_toml_str(&text)
        } else {
            Self::from_yaml_str(&text)
        }
    }

    /// Applies environment overrides, as Consul's own tools do: `CONSUL_HTTP_ADDR` and
    /// `CONSUL_HTTP_TOKEN` replace the address and token of the primary registry when it is
    /// Consul. Consul sections further down a fallback chain are left as the file says (they
    /// are other agents, often in other datacenters). `lookup` reads a variable
    /// ([`build`](Self::build) uses the process environment).
    #[must_use]
    pub fn with_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let primary = &mut self.registry;
        if primary.kind == "consul" {
            let consul = primary.consul.get_or_insert_with(ConsulSection::default);
            if let Some(address) = lookup("CONSUL_HTTP_ADDR").filter(|a| !a.is_empty()) {
                consul.address = Some(address);
            }
            if let Some(token) = lookup("CONSUL_HTTP_TOKEN").filter(|t| !t.is_empty()) {
                consul.token = Some(token);
            }
        }
        self
    }

    /// Builds the configured registry (with its cache and fallbacks), after the environment
    /// overrides.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the key and the reason: an unknown type (listing the
    /// valid ones), a backend not compiled in (naming its cargo feature), an address without
    /// a port, invalid instances.
    pub fn build(&self) -> Result<Arc<dyn ServiceRegistry>> {
        let config = self.clone().with_env(|name| std::env::var(name).ok());
        build::build(&config.registry, "registry")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_that_overflow_are_errors() {
        let error = parse_duration("10000000000000000000s10000000000000000000s").unwrap_err();
        assert!(error.contains("too long"), "{error}");
        assert!(parse_duration("1e30h").is_err());
    }

    #[test]
    fn secret_values_are_found_in_yaml_and_toml() {
        let source = "registry:\n  consul:\n    token: \"abc-123\n    password = 'pw-456'\n    tokenish: no\n";
        let values: Vec<&str> = secret_values(source).collect();
        assert_eq!(values, ["abc-123", "pw-456"]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "10", "s", "10 parsecs", "1x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
