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
//!     failover: ["dc2", "dc3"]      # or nearest_datacenters: 2; each a priority tier
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
//!
//! # The file
//!
//! With the `config` feature, the architecture decision record's YAML builds the registry
//! (`RegistryConfig::from_path(file)?.build()?` returns an `Arc<dyn ServiceRegistry>`); TOML is
//! accepted too. Durations are human-readable; unknown keys, bad durations, unknown types,
//! backends not compiled in and addresses without a port are errors naming the key by its
//! place in the file (`registry.fallback[0].consul.ca_file`; a backend's builder names its own
//! setter, `ca_file`, and the configuration layer puts it in place). Syntax errors give the
//! line and column, never the text, so a token cannot leak into a log.
//! `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` override the primary Consul section only, never
//! a fallback. `examples/config/` has a file
//! per backend:
//!
//! ```yaml
//! registry:
//!   type: consul
//!   consul:
//!     address: "localhost:8500"
//!     health_check: { interval: "10s", timeout: "3s", deregister_after: "1m" }
//!   cache: { max_stale: "10m", persist: "/var/cache/tower-sd.json" }   # optional
//!   failover_after: "30s"                                                # optional
//!   fallback:                                                            # optional
//!     - type: static
//!       static: { instances: [ { id: "a", name: "api", address: "10.0.0.1", port: 80 } ] }
//! ```
//!
//! With the `tonic` feature, a `service_config` section beside `registry` carries gRPC's
//! service config (see [`ServiceConfig`](crate::tonic::ServiceConfig)), in YAML or TOML:
//!
//! ```yaml
//! service_config:
//!   methodConfig:
//!     - name: [ { service: "helloworld.Greeter" } ]
//!       retryPolicy: { maxAttempts: 3, initialBackoff: "0.1s", maxBackoff: "1s",
//!                      backoffMultiplier: 2, retryableStatusCodes: [ UNAVAILABLE ] }
//!   retryThrottling: { maxTokens: 10, tokenRatio: 0.1 }
//! ```
//!
//! `cargo run --example watch --features config -- --config examples/config/static.yaml greeter`
//! watches any configured registry (`--etcd ENDPOINT SERVICE`, `--dns NAME` and `--kubernetes
//! NAMESPACE SERVICE` without a file); `quickstart` and `tonic_client` accept `--config FILE` too.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

mod build;
mod consul;
mod dns;
mod etcd;
mod kubernetes;
mod local;
mod parse;

pub use consul::{ConsulSection, HealthCheckSection};
pub use dns::DnsSection;
pub use etcd::EtcdSection;
pub use kubernetes::KubernetesSection;
pub use local::{CacheSection, MemorySection, StaticSection};
pub use parse::parse_duration;

use crate::error::Result;
use crate::registry::ServiceRegistry;
use parse::{duration_opt, from_value, invalid, parse_location, syntax_error};

/// The registry types, as `registry.type` names them.
pub const REGISTRY_TYPES: [&str; 6] = ["consul", "kubernetes", "etcd", "dns", "static", "memory"];

/// A configuration file: one `registry` section, and with the `tonic` feature, the gRPC
/// service config of the channels made from it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry to use.
    pub registry: RegistrySection,
    /// gRPC's service config (retry and hedging policies, deadlines, the retry throttle,
    /// health checking; see [`ServiceConfig`](crate::tonic::ServiceConfig)), as the same
    /// structure in YAML or TOML; give it to
    /// [`LoadBalancedChannelBuilder::service_config`](crate::tonic::LoadBalancedChannelBuilder::service_config).
    #[cfg(feature = "tonic")]
    #[serde(default)]
    pub service_config: Option<crate::tonic::ServiceConfig>,
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

impl RegistryConfig {
    /// Parses YAML.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the key (or `(document)` for a syntax error).
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
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for an unreadable file (key `(file)`) or invalid content.
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
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the key and the reason: an unknown type (listing the
    /// valid ones), a backend not compiled in (naming its cargo feature), an address without
    /// a port, invalid instances.
    pub fn build(&self) -> Result<Arc<dyn ServiceRegistry>> {
        let config = self.clone().with_env(|name| std::env::var(name).ok());
        build::build(&config.registry, "registry")
    }
}
