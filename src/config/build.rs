//! From a parsed [`RegistrySection`] to a registry: the backend its `type` names (each
//! section builds its own, in the file of its section), then the cache and the fallback
//! chain around it.

use std::sync::Arc;

use super::parse::invalid;
use super::{REGISTRY_TYPES, RegistrySection};
use crate::error::{Error, Result};
use crate::registry::{FallbackRegistry, ServiceRegistry};

pub(super) fn build(section: &RegistrySection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    let section = section.clone();
    let registry = match section.kind.as_str() {
        "memory" => section.memory.unwrap_or_default().registry(),
        "static" => section.static_list.unwrap_or_default().registry(path)?,
        "consul" => section.consul.unwrap_or_default().registry(path)?,
        "kubernetes" => section.kubernetes.unwrap_or_default().registry(path)?,
        "etcd" => section.etcd.unwrap_or_default().registry(path)?,
        "dns" => section.dns.unwrap_or_default().registry(path)?,
        other => {
            return Err(invalid(
                format!("{path}.type"),
                format!(
                    "unknown registry type `{other}`; valid types: {}",
                    REGISTRY_TYPES.join(", ")
                ),
            ));
        }
    };
    let registry = match &section.cache {
        Some(cache) => cache.around(registry),
        None => registry,
    };
    if section.fallback.is_empty() {
        return Ok(registry);
    }
    let mut chain = FallbackRegistry::builder()
        .then(registry)
        .maybe(section.failover_after, |b, v| b.failover_after(v));
    for (i, fallback) in section.fallback.iter().enumerate() {
        chain = chain.then(build(fallback, &format!("{path}.fallback[{i}]"))?);
    }
    Ok(Arc::new(chain.build()?))
}

/// Sets what a section gives, on a builder: `builder.maybe(section.wait, |b, v| b.wait(v))`
/// in place of `if let Some(wait) = section.wait { builder = builder.wait(wait) }`.
pub(super) trait Maybe: Sized {
    fn maybe<T>(self, value: Option<T>, set: impl FnOnce(Self, T) -> Self) -> Self {
        match value {
            Some(value) => set(self, value),
            None => self,
        }
    }
}

impl<B> Maybe for B {}

/// A backend's configuration error, which names the backend's own setting (`ca_file`), put
/// at its place in the file: `section` is e.g. `registry.fallback[0].consul`.
#[cfg(any(feature = "consul", feature = "etcd", feature = "dns"))]
pub(super) fn at(error: Error, section: &str) -> Error {
    match error {
        Error::InvalidConfig { key, source } => Error::InvalidConfig {
            key: format!("{section}.{key}"),
            source,
        },
        other => other,
    }
}

/// A registry type whose backend this build leaves out.
#[cfg(not(all(
    feature = "consul",
    feature = "kubernetes",
    feature = "etcd",
    feature = "dns"
)))]
pub(super) fn not_compiled_in(kind: &str, path: &str) -> Error {
    invalid(
        format!("{path}.type"),
        format!(
            "registry type `{kind}` is not available in this build: the `{kind}` backend (cargo feature `{kind}`) is not compiled in"
        ),
    )
}
