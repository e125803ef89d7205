//! One resolution: a query name to instances, with the TTL to re-resolve at.
//!
//! - SRV (RFC 2782): every record is used, its priority as the instance's
//!   [priority tier](crate::balance#priority-tiers) (a client "MUST attempt to contact the
//!   target host with the lowest-numbered priority it can reach": the balancer keeps traffic
//!   in the lowest tier while enough of it is reachable, and spills to the next as it is
//!   not), its weight as the weight within the tier. Weight 0 counts as 1 (the balancer has
//!   no "rarely" weight). Each target is resolved to its addresses (from the answer's
//!   additional section when the server sent them), one instance per address; a target
//!   that does not resolve is kept by name. A target of `.` says the service is not
//!   available: no instance.
//! - A, AAAA (or both): one instance per address, on the fixed port.
//!
//! The TTL is the lowest of the records used. "No such name" and "no records" are one
//! outcome, [`Outcome::Missing`], so the watch can tell them from failures.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tracing::debug;

use super::{REGISTRY, RecordKind};
use crate::error::{Error, Result};
use crate::instance::ServiceInstance;

/// What a query name asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Srv(String),
    Addresses {
        host: String,
        port: u16,
        kind: RecordKind,
    },
}

pub(super) enum Outcome {
    Found {
        instances: Vec<ServiceInstance>,
        ttl: Duration,
    },
    /// NXDOMAIN, or the name exists without records of the type.
    Missing,
}

/// Metadata keys of SRV instances.
pub(super) const META_TARGET: &str = "srv_target";
pub(super) const META_PRIORITY: &str = "srv_priority";

pub(super) async fn resolve(
    resolver: &TokioResolver,
    target: &Target,
    service: &str,
) -> Result<Outcome> {
    match target {
        Target::Srv(name) => srv(resolver, name, service).await,
        Target::Addresses { host, port, kind } => {
            let types: &[RecordType] = match kind {
                RecordKind::A => &[RecordType::A],
                RecordKind::Aaaa => &[RecordType::AAAA],
                RecordKind::Srv | RecordKind::Ip => &[RecordType::A, RecordType::AAAA],
            };
            let mut found = Found::default();
            let mut missing = 0;
            for &record_type in types {
                match records(resolver, host, record_type).await? {
                    Some(answers) => found.addresses(&answers),
                    None => missing += 1,
                }
            }
            if missing == types.len() {
                return Ok(Outcome::Missing);
            }
            let instances = found
                .ips
                .iter()
                .map(|ip| instance(service, &ip.to_string(), *port, 1))
                .collect();
            Ok(found.outcome(instances))
        }
    }
}

async fn srv(resolver: &TokioResolver, name: &str, service: &str) -> Result<Outcome> {
    let lookup = match resolver.srv_lookup(name).await {
        Ok(lookup) => lookup,
        Err(error) if error.is_no_records_found() => return Ok(Outcome::Missing),
        Err(error) => return Err(dns_error(error)),
    };
    let mut srvs: Vec<SrvRecord<'_>> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            // A target of `.`: the service is "decidedly not available" (RFC 2782).
            RData::SRV(srv) if !srv.target.is_root() => Some((r, srv)),
            _ => None,
        })
        .collect();
    if srvs.is_empty() {
        return Ok(Outcome::Missing);
    }
    // The lowest priority first: an address listed at two priorities is kept at the lower.
    srvs.sort_by_key(|(_, srv)| srv.priority);
    // Every target at once: a service may have many.
    let targets = join_all(
        srvs.iter()
            .map(|(_, srv)| target_addresses(resolver, &srv.target, lookup.additionals())),
    )
    .await;
    let mut found = Found::default();
    let mut instances = Vec::new();
    for ((record, srv), target) in srvs.into_iter().zip(targets) {
        found.ttl(record.ttl);
        if let Some(ttl) = target.min_ttl {
            found.ttl(ttl);
        }
        let weight = u32::from(srv.weight.max(1));
        let name = srv.target.to_ascii();
        let host = name.trim_end_matches('.');
        let addresses: Vec<String> = if target.ips.is_empty() {
            vec![host.to_owned()]
        } else {
            target.ips.iter().map(ToString::to_string).collect()
        };
        for address in addresses {
            let mut instance =
                instance(service, &address, srv.port, weight).with_priority(srv.priority);
            instance
                .metadata
                .insert(META_TARGET.into(), host.to_owned());
            instance
                .metadata
                .insert(META_PRIORITY.into(), srv.priority.to_string());
            instances.push(instance);
        }
    }
    Ok(found.outcome(instances))
}

type SrvRecord<'a> = (&'a Record, &'a hickory_resolver::proto::rr::rdata::SRV);

/// A SRV target's addresses: those the server sent along, else a lookup of our own. A
/// target that does not resolve has none (and is then used by name).
async fn target_addresses(
    resolver: &TokioResolver,
    target: &Name,
    additionals: &[Record],
) -> Found {
    let mut found = Found::default();
    found.addresses_of(target, additionals);
    if !found.ips.is_empty() {
        return found;
    }
    let host = target.to_ascii();
    let (a, aaaa) = futures_util::join!(
        records(resolver, &host, RecordType::A),
        records(resolver, &host, RecordType::AAAA)
    );
    for answer in [a, aaaa] {
        match answer {
            Ok(Some(answers)) => found.addresses(&answers),
            Ok(None) => {}
            Err(error) => debug!(%target, %error, "SRV target did not resolve"),
        }
    }
    found
}

/// The answers of one type; `None` when there are none.
async fn records(
    resolver: &TokioResolver,
    host: &str,
    record_type: RecordType,
) -> Result<Option<Vec<Record>>> {
    match resolver.lookup(host, record_type).await {
        Ok(lookup) => Ok(Some(lookup.answers().to_vec())),
        Err(error) if error.is_no_records_found() => Ok(None),
        Err(error) => Err(dns_error(error)),
    }
}

/// Addresses and the lowest TTL seen.
#[derive(Default)]
struct Found {
    ips: Vec<IpAddr>,
    min_ttl: Option<u32>,
}

impl Found {
    fn ttl(&mut self, ttl: u32) {
        self.min_ttl = Some(self.min_ttl.map_or(ttl, |t| t.min(ttl)));
    }

    fn addresses(&mut self, records: &[Record]) {
        for record in records {
            let ip = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                _ => continue,
            };
            self.ttl(record.ttl);
            if !self.ips.contains(&ip) {
                self.ips.push(ip);
            }
        }
    }

    fn addresses_of(&mut self, name: &Name, additionals: &[Record]) {
        let of_name: Vec<Record> = additionals
            .iter()
            .filter(|r| r.name.eq_case(name))
            .cloned()
            .collect();
        self.addresses(&of_name);
    }

    /// The instances, deduplicated by id and sorted, with the lowest TTL.
    /// The instances, one per id (the first of those with one id), and the TTL.
    fn outcome(self, instances: Vec<ServiceInstance>) -> Outcome {
        let mut unique: BTreeMap<String, ServiceInstance> = BTreeMap::new();
        for instance in instances {
            unique.entry(instance.id.clone()).or_insert(instance);
        }
        Outcome::Found {
            instances: unique.into_values().collect(),
            ttl: Duration::from_secs(self.min_ttl.unwrap_or(0).into()),
        }
    }
}

fn instance(service: &str, address: &str, port: u16, weight: u32) -> ServiceInstance {
    let mut instance = ServiceInstance::new("", service, address, port).with_weight(weight);
    instance.id = instance.authority();
    instance
}

/// A lookup's error as the crate's: a timeout is [`Error::Timeout`] (its limit is filled in
/// by [`resolve`]'s caller, which knows it), a bad answer [`Error::Malformed`], anything
/// else [`Error::Unreachable`].
fn dns_error(error: NetError) -> Error {
    match error {
        NetError::Timeout => Error::Timeout {
            registry: REGISTRY,
            source: crate::error::Elapsed(Duration::ZERO),
        },
        NetError::Proto(_) => Error::Malformed {
            registry: REGISTRY,
            source: error.into(),
        },
        other => Error::Unreachable {
            registry: REGISTRY,
            source: other.into(),
        },
    }
}
