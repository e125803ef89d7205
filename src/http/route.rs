//! How a request is routed: whether its host is a service name, and the policies the
//! layer applies ([`HostHeader`], [`UnknownHosts`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

/// Which host a routed request names: the service name the caller wrote, or the chosen
/// instance's address.
///
/// What goes on the wire depends on the transport:
///
/// | policy | wrapped client (HTTP/1.1) | [`over_connections`](super::DiscoveryLayer::over_connections) (HTTP/2) |
/// | --- | --- | --- |
/// | [`Logical`](Self::Logical) | `Host: greeter`, the request line to the instance | `:authority: greeter`, no `Host` |
/// | [`Instance`](Self::Instance) | `Host: 10.0.0.7:8080` (written by the client from the URI) | `:authority: 10.0.0.7:8080`, no `Host` |
///
/// Over HTTP/2 a `Host` header that differs from `:authority` must not be sent (RFC 9113,
/// 8.3.1), and nginx rejects any request that has both ("client sent duplicate host
/// header"), so a caller's `Host` header becomes `:authority` there. A wrapped client that
/// speaks HTTP/2 dials the URI's authority, the instance, and sends it as `:authority`:
/// with it, use [`Instance`](Self::Instance) (or `over_connections`, which sends the
/// logical host as `:authority`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostHeader {
    /// The logical authority the caller wrote (`greeter`), unless the request already has a
    /// `Host` header (the default): virtual hosting and logs see the service name.
    #[default]
    Logical,
    /// The chosen instance's address (`10.0.0.7:8080`); a `Host` header the request had is
    /// dropped.
    Instance,
}

/// What happens to a request whose host is not a service name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownHosts {
    /// Send it to the wrapped client unchanged (the default).
    #[default]
    PassThrough,
    /// Fail it with [`UnknownHost`](super::UnknownHost).
    Fail,
}

/// The settings the running layer reads (the builder methods of [`DiscoveryLayer`] set them).
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub(super) host_header: HostHeader,
    pub(super) unknown_hosts: UnknownHosts,
    /// Lowercase; `None` for any single-label host.
    pub(super) services: Option<Arc<HashSet<String>>>,
    pub(super) idle_timeout: Duration,
    pub(super) max_services: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            host_header: HostHeader::default(),
            unknown_hosts: UnknownHosts::default(),
            services: None,
            idle_timeout: Duration::from_secs(300),
            max_services: 256,
        }
    }
}

/// Where a request goes.
pub(super) enum Route<'a> {
    /// Through the balancer of this service (lowercase).
    Service(Cow<'a, str>),
    /// Its host is not a service name: [`UnknownHosts`] decides.
    Other,
}

impl Settings {
    pub(super) fn route<'a>(&self, uri: &'a Uri) -> Route<'a> {
        self.service_of(uri).map_or(Route::Other, Route::Service)
    }

    /// The service name of a request's host, lowercase, if it is one.
    fn service_of<'a>(&self, uri: &'a Uri) -> Option<Cow<'a, str>> {
        let host = uri.host()?;
        let host: Cow<'a, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let is_service = match &self.services {
            Some(names) => names.contains(host.as_ref()),
            None => {
                let single_label =
                    !host.contains('.') && !host.contains(':') && !host.starts_with('[');
                single_label && host != "localhost" && host.parse::<IpAddr>().is_err()
            }
        };
        is_service.then_some(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_of(settings: &Settings, uri: &str) -> Option<String> {
        settings
            .service_of(&uri.parse().unwrap())
            .map(Cow::into_owned)
    }

    fn listed(names: &[&str]) -> Settings {
        let names = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        Settings {
            services: Some(Arc::new(names)),
            ..Settings::default()
        }
    }

    #[test]
    fn service_names_are_single_labels_unless_listed() {
        let any = Settings::default();
        let name = |uri: &str| service_of(&any, uri);
        assert_eq!(name("http://greeter/x").as_deref(), Some("greeter"));
        assert_eq!(name("http://greeter:80/x").as_deref(), Some("greeter"));
        for other in [
            "http://localhost/",
            "http://127.0.0.1/",
            "http://[::1]/",
            "http://a.b/",
        ] {
            assert_eq!(name(other), None, "{other}");
        }
        let listed = listed(&["api.internal"]);
        assert!(service_of(&listed, "http://api.internal/").is_some());
        assert!(service_of(&listed, "http://greeter/").is_none());
    }

    #[test]
    fn service_names_are_matched_case_insensitively() {
        let any = Settings::default();
        assert_eq!(
            service_of(&any, "http://Greeter/x").as_deref(),
            Some("greeter")
        );
        assert!(service_of(&listed(&["API"]), "http://api/").is_some());
    }
}
