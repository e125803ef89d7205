//! From a parsed [`RegistrySection`] to a registry: one builder per backend, then the cache
//! and the fallback chain around it.

use std::sync::Arc;

use super::{
    ConsulSection, DnsSection, EtcdSection, KubernetesSection, REGISTRY_TYPES, RegistrySection,
    invalid,
};
use crate::error::{Error, Result};
use crate::registry::{
    CachedRegistry, FallbackRegistry, MemoryRegistry, ServiceRegistry, StaticRegistry,
};

pub(super) fn build(section: &RegistrySection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    let registry: Arc<dyn ServiceRegistry> = match section.kind.as_str() {
        "memory" => {
            let memory = section.memory.clone().unwrap_or_default();
            let mut builder = MemoryRegistry::builder();
            if let Some(dc) = memory.datacenter {
                builder = builder.datacenter(dc);
            }
            if let Some(ns) = memory.namespace {
                builder = builder.namespace(ns);
            }
            if let Some(ttl) = memory.ttl {
                builder = builder.ttl(ttl);
            }
            if let Some(after) = memory.deregister_after {
                builder = builder.deregister_critical_after(after);
            }
            Arc::new(builder.build())
        }
        "static" => {
            let instances = section.static_list.clone().unwrap_or_default().instances;
            Arc::new(
                StaticRegistry::new(instances)
                    .map_err(|e| invalid(format!("{path}.static.instances"), e))?,
            )
        }
        "consul" => consul(section.consul.clone().unwrap_or_default(), path)?,
        "kubernetes" => kubernetes(section.kubernetes.clone().unwrap_or_default(), path)?,
        "etcd" => etcd(section.etcd.clone().unwrap_or_default(), path)?,
        "dns" => dns(section.dns.clone().unwrap_or_default(), path)?,
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
    let registry: Arc<dyn ServiceRegistry> = match &section.cache {
        Some(cache) => {
            let mut builder = CachedRegistry::builder(registry);
            if let Some(max) = cache.max_stale {
                builder = builder.max_stale(max);
            }
            if let Some(file) = &cache.persist {
                builder = builder.persist_to(file);
            }
            Arc::new(builder.build())
        }
        None => registry,
    };
    if section.fallback.is_empty() {
        return Ok(registry);
    }
    let mut chain = vec![registry];
    for (i, fallback) in section.fallback.iter().enumerate() {
        chain.push(build(fallback, &format!("{path}.fallback[{i}]"))?);
    }
    let mut fallback = FallbackRegistry::new(chain)?;
    if let Some(after) = section.failover_after {
        fallback = fallback.failover_after(after);
    }
    Ok(Arc::new(fallback))
}

#[cfg(feature = "consul")]
fn consul(section: ConsulSection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    use crate::registry::consul::{ConsulRegistry, HealthCheck, HealthCheckKind};

    let path = &format!("{path}.consul");

    let mut builder = ConsulRegistry::builder();
    if let Some(address) = &section.address {
        let (scheme, rest) = match address.split_once("://") {
            Some((scheme, rest)) => (scheme.to_owned(), rest),
            None => (
                section.scheme.clone().unwrap_or_else(|| "http".to_owned()),
                address.as_str(),
            ),
        };
        let host_port = rest.split('/').next().unwrap_or_default();
        let has_port = host_port
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !has_port {
            return Err(invalid(
                format!("{path}.address"),
                format!("`{address}` has no port; expected host:port, e.g. localhost:8500"),
            ));
        }
        builder = builder.address(format!("{scheme}://{rest}"));
    }
    if let Some(dc) = section.datacenter {
        builder = builder.datacenter(dc);
    }
    if let Some(ns) = section.namespace {
        builder = builder.namespace(ns);
    }
    if let Some(token) = section.token {
        builder = builder.token(token);
    }
    if let Some(ca) = section.ca_file {
        builder = builder.ca_file(ca);
    }
    if let Some(wait) = section.wait {
        builder = builder.wait(wait);
    }
    if let Some(timeout) = section.request_timeout {
        builder = builder.request_timeout(timeout);
    }
    if let Some(key) = section.zone_key {
        builder = builder.zone_key(key);
    }
    builder = builder.stale(section.stale).cached(section.cached);
    if let Some(check) = section.health_check {
        let kind = match check.kind.as_deref().unwrap_or("http") {
            "http" => HealthCheckKind::Http(check.http),
            "tcp" => HealthCheckKind::Tcp,
            "grpc" => HealthCheckKind::Grpc,
            "ttl" => HealthCheckKind::Ttl(check.ttl.ok_or_else(|| {
                invalid(
                    format!("{path}.health_check.ttl"),
                    "a ttl check needs `ttl`",
                )
            })?),
            other => {
                return Err(invalid(
                    format!("{path}.health_check.kind"),
                    format!("unknown check kind `{other}`; valid kinds: http, tcp, grpc, ttl"),
                ));
            }
        };
        let mut template = HealthCheck::new(kind);
        if let Some(interval) = check.interval {
            template = template.interval(interval);
        }
        if let Some(timeout) = check.timeout {
            template = template.timeout(timeout);
        }
        if let Some(after) = check.deregister_after {
            template = template.deregister_after(after);
        }
        builder = builder.health_check(template);
    }
    Ok(Arc::new(builder.build().map_err(|e| at(e, path))?))
}

#[cfg(not(feature = "consul"))]
fn consul(_section: ConsulSection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    Err(not_compiled_in("consul", path))
}

#[cfg(feature = "kubernetes")]
#[allow(clippy::unnecessary_wraps)] // the same signature as without the feature
fn kubernetes(section: KubernetesSection, _path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    use crate::registry::kubernetes::KubernetesRegistry;

    let mut builder = KubernetesRegistry::builder().in_cluster(section.in_cluster.unwrap_or(false));
    if let Some(namespace) = section.namespace {
        builder = builder.namespace(namespace);
    }
    if let Some(port_name) = section.port_name {
        builder = builder.port_name(port_name);
    }
    if let Some(selector) = section.label_selector {
        builder = builder.label_selector(selector);
    }
    Ok(Arc::new(builder.build()))
}

#[cfg(not(feature = "kubernetes"))]
fn kubernetes(_section: KubernetesSection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    Err(not_compiled_in("kubernetes", path))
}

#[cfg(feature = "etcd")]
fn etcd(section: EtcdSection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    use crate::registry::etcd::EtcdRegistry;

    let mut builder = EtcdRegistry::builder(section.endpoints);
    if let Some(prefix) = section.prefix {
        builder = builder.prefix(prefix);
    }
    if let Some(ttl) = section.lease_ttl {
        builder = builder.lease_ttl(ttl);
    }
    match (section.username, section.password) {
        (Some(user), Some(password)) => builder = builder.credentials(user, password),
        (None, None) => {}
        (Some(_), None) => {
            return Err(invalid(
                format!("{path}.etcd.password"),
                "a username needs a password",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                format!("{path}.etcd.username"),
                "a password needs a username",
            ));
        }
    }
    if let Some(ca_file) = section.ca_file {
        builder = builder.ca_file(ca_file);
    }
    Ok(Arc::new(
        builder
            .build()
            .map_err(|e| at(e, &format!("{path}.etcd")))?,
    ))
}

#[cfg(not(feature = "etcd"))]
fn etcd(_section: EtcdSection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    Err(not_compiled_in("etcd", path))
}

#[cfg(feature = "dns")]
fn dns(section: DnsSection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    use crate::registry::dns::{DnsRegistry, RecordKind};

    let mut builder = DnsRegistry::builder();
    let mut servers = Vec::with_capacity(section.nameservers.len());
    for (i, server) in section.nameservers.iter().enumerate() {
        let addr = server.parse::<std::net::SocketAddr>().map_err(|e| {
            invalid(
                format!("{path}.dns.nameservers[{i}]"),
                format!("`{server}` is not `ip:port`: {e}"),
            )
        })?;
        servers.push(addr);
    }
    builder = builder.nameservers(servers);
    if let Some(min) = section.min_ttl {
        builder = builder.min_ttl(min);
    }
    if let Some(max) = section.max_ttl {
        builder = builder.max_ttl(max);
    }
    if let Some(record) = section.record {
        builder = builder.record(
            record
                .parse::<RecordKind>()
                .map_err(|e| at(e, &format!("{path}.dns")))?,
        );
    }
    if let Some(port) = section.port {
        builder = builder.port(port);
    }
    Ok(Arc::new(
        builder.build().map_err(|e| at(e, &format!("{path}.dns")))?,
    ))
}

#[cfg(not(feature = "dns"))]
fn dns(_section: DnsSection, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
    Err(not_compiled_in("dns", path))
}

/// A backend's configuration error, which names the backend's own setting (`ca_file`), put
/// at its place in the file: `section` is e.g. `registry.fallback[0].consul`.
#[cfg(any(feature = "consul", feature = "etcd", feature = "dns"))]
fn at(error: Error, section: &str) -> Error {
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
fn not_compiled_in(kind: &str, path: &str) -> Error {
    invalid(
        format!("{path}.type"),
        format!(
            "registry type `{kind}` is not available in this build: the `{kind}` backend (cargo feature `{kind}`) is not compiled in"
        ),
    )
}
