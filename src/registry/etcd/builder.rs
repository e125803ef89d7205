//! [`EtcdRegistryBuilder`] and the [`Settings`] a running [`EtcdRegistry`] reads.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::EtcdRegistry;
use crate::error::{Error, Result};
use crate::registry::Secret;

/// What a running [`EtcdRegistry`] reads: the builder's values, checked, with the CA read.
#[derive(Clone)]
pub(super) struct Settings {
    pub(super) endpoints: Vec<String>,
    /// Without a trailing `/`.
    pub(super) prefix: String,
    pub(super) lease_ttl: Duration,
    pub(super) username: Option<String>,
    pub(super) password: Option<Secret>,
    /// The PEM of the CA to trust.
    pub(super) ca: Option<Vec<u8>>,
    pub(super) request_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) retry_base: Duration,
    pub(super) retry_max: Duration,
    /// The largest answer taken (tonic's default is 4 MiB).
    pub(super) max_response_bytes: usize,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `password` is a `Secret`, whose Debug is redacted.
        f.debug_struct("Settings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("ca", &self.ca.as_ref().map(|_| "<given>"))
            .finish_non_exhaustive()
    }
}

/// Configures an [`EtcdRegistry`]; see [`EtcdRegistry::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct EtcdRegistryBuilder {
    settings: Settings,
    ca_file: Option<PathBuf>,
}

// ===== impl EtcdRegistryBuilder =====

impl EtcdRegistryBuilder {
    pub(super) fn new(endpoints: Vec<String>) -> Self {
        Self {
            settings: Settings {
                endpoints,
                prefix: "/services".into(),
                lease_ttl: Duration::from_secs(10),
                username: None,
                password: None,
                ca: None,
                request_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(5),
                retry_base: Duration::from_millis(100),
                retry_max: Duration::from_secs(10),
                max_response_bytes: 16 << 20,
            },
            ca_file: None,
        }
    }

    /// The key prefix (default `/services`); keys are `{prefix}/{service}/{id}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.prefix = prefix.into();
        self
    }

    /// The lease TTL of registered instances (default 10 s; whole seconds, at least 1).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.settings.lease_ttl = ttl;
        self
    }

    /// Authenticates as this user.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.settings.username = Some(username.into());
        self.settings.password = Some(Secret(password.into()));
        self
    }

    /// Trusts this CA (PEM file) for `https://` endpoints, instead of nothing: with TLS
    /// endpoints a CA is required.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The limit on each request other than watches (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// The largest answer taken (default 16 MiB; tonic's own default, 4 MiB, is a few
    /// thousand instances with metadata). A larger one fails with a `Status` error naming
    /// the limit.
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.settings.max_response_bytes = bytes;
        self
    }

    /// The limit on connecting (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Backoff between watch and keep-alive retries: full jitter from `base`, doubling up
    /// to `max` (default 100 ms to 10 s).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.retry_base = base;
        self.settings.retry_max = max;
        self
    }

    /// Builds the registry. It connects on first use, so building needs no runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for no endpoint, an endpoint that is not an `http://` or
    /// `https://` URL, `https://` without a CA file, a CA file that cannot be read, a prefix
    /// without a leading `/` or a lease TTL under a second.
    pub fn build(self) -> Result<EtcdRegistry> {
        let invalid = |key: &str, why: String| Error::InvalidConfig {
            key: key.to_owned(),
            source: why.into(),
        };
        let mut settings = self.settings;
        if settings.endpoints.is_empty() {
            return Err(invalid(
                "endpoints",
                "at least one endpoint is needed".into(),
            ));
        }
        for endpoint in &settings.endpoints {
            let tls = endpoint.starts_with("https://");
            if !tls && !endpoint.starts_with("http://") {
                return Err(invalid(
                    "endpoints",
                    format!("`{endpoint}` is not an http:// or https:// URL"),
                ));
            }
            if let Err(error) = tonic::transport::Endpoint::from_shared(endpoint.clone()) {
                return Err(invalid(
                    "endpoints",
                    format!("`{endpoint}` is not a valid URL: {error}"),
                ));
            }
            if tls && self.ca_file.is_none() {
                return Err(invalid(
                    "endpoints",
                    format!("`{endpoint}` uses TLS: set a CA file to trust"),
                ));
            }
        }
        let trimmed = settings.prefix.trim_end_matches('/');
        if !settings.prefix.starts_with('/') || trimmed.is_empty() {
            return Err(invalid(
                "prefix",
                format!(
                    "`{}` must start with `/` and name a directory",
                    settings.prefix
                ),
            ));
        }
        settings.prefix = trimmed.to_owned();
        if settings.lease_ttl < Duration::from_secs(1) {
            return Err(invalid("lease_ttl", "must be at least 1s".into()));
        }
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                invalid("ca_file", format!("cannot read `{}`: {e}", path.display()))
            })?;
            settings.ca = Some(pem);
        }
        Ok(EtcdRegistry::with_settings(settings))
    }
}
