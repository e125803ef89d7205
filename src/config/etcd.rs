//! `registry.etcd`: [`EtcdSection`], and the registry it builds.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::parse::duration_opt;
use crate::error::Result;
use crate::registry::ServiceRegistry;

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

impl EtcdSection {
    /// The registry this section describes; `path` is where it is in the file.
    #[cfg(feature = "etcd")]
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        use super::build::{Maybe, at};
        use super::parse::invalid;
        use crate::registry::etcd::EtcdRegistry;

        let credentials = match (self.username, self.password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
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
        };
        let builder = EtcdRegistry::builder(self.endpoints)
            .maybe(self.prefix, |b, v| b.prefix(v))
            .maybe(self.lease_ttl, |b, v| b.lease_ttl(v))
            .maybe(credentials, |b, (user, password)| {
                b.credentials(user, password)
            })
            .maybe(self.ca_file, |b, v| b.ca_file(v));
        Ok(Arc::new(
            builder
                .build()
                .map_err(|e| at(e, &format!("{path}.etcd")))?,
        ))
    }

    #[cfg(not(feature = "etcd"))]
    pub(super) fn registry(self, path: &str) -> Result<Arc<dyn ServiceRegistry>> {
        Err(super::build::not_compiled_in("etcd", path))
    }
}
