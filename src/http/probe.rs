//! [`HttpProbe`]: active health checking of HTTP servers, reached around a wrapped client
//! ([`Discovery::health_probe`]) or over tower-sd's connections
//! ([`ConnectionDiscovery::health_probe`]), for registries that know nothing of health
//! (DNS, static lists, etcd).
//!
//! Each instance gets a task that, while its connection is open, sends `GET <path>` over it
//! every `interval`, with the service name as the host. An answer with a healthy status
//! (200-299 by default) within `timeout` marks the instance serving; any other answer, a
//! timeout or an error marks it
//! [not serving](crate::endpoint::Readiness::set_serving): out of the picks, its connection
//! open and its place in discovery kept. A new connection is not picked until its first
//! answer, as with gRPC's health checks. One probe decides each way (no thresholds).
//!
//! Around a wrapped client, the probe goes through the client (which may open a
//! connection for it) and the instance counts as connected throughout.
//!
//! [`Discovery::health_probe`]: super::Discovery::health_probe
//! [`ConnectionDiscovery::health_probe`]: super::ConnectionDiscovery::health_probe

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use crate::endpoint::Signal;
use http::uri::PathAndQuery;
use tower::{Service, ServiceExt};
use tracing::debug;

use crate::endpoint::{Companion, Connectivity, Readiness};
use crate::error::BoxError;

/// An HTTP health probe (see the module docs).
///
/// ```
/// use std::time::Duration;
/// use tower_sd::http::HttpProbe;
///
/// let probe = HttpProbe::new("/healthz")?
///     .interval(Duration::from_secs(2))
///     .timeout(Duration::from_millis(500));
/// # drop(probe);
/// # Ok::<(), http::uri::InvalidUri>(())
/// ```
#[derive(Clone, Debug)]
pub struct HttpProbe {
    path: PathAndQuery,
    interval: Duration,
    timeout: Duration,
    healthy: RangeInclusive<u16>,
}

impl HttpProbe {
    /// Probes `path` (with its query, if any) every 5 s, each answer due within 1 s, 200 to
    /// 299 healthy.
    ///
    /// # Errors
    ///
    /// When `path` is not a valid path and query.
    pub fn new(path: &str) -> Result<Self, http::uri::InvalidUri> {
        Ok(Self {
            path: path.parse()?,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy: 200..=299,
        })
    }

    /// The time between two probes (at least 10 ms).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How long a probe waits for its answer.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The statuses that say healthy.
    #[must_use]
    pub fn healthy_statuses(mut self, statuses: RangeInclusive<u16>) -> Self {
        self.healthy = statuses;
        self
    }
}

/// Starts an instance's health probe, given its endpoint's service `E`, its readiness and
/// the service name; the probing stops when the companion is dropped with the endpoint.
pub(super) type Prober<E> = Arc<dyn Fn(&E, &Readiness, &str) -> Companion + Send + Sync>;

/// The prober, by `probe`, of endpoints whose service takes requests with bodies `B` (the
/// probe sends `B::default()`).
pub(super) fn prober<E, B, RB>(probe: HttpProbe) -> Prober<E>
where
    E: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    E::Error: Into<BoxError>,
    E::Future: Send,
    B: Default + Send + 'static,
{
    let probe = Arc::new(probe);
    Arc::new(move |service, readiness, name| {
        start(&probe, service.clone(), readiness.clone(), name)
    })
}

/// Starts probing the instance served by `service`, whose connection reports to
/// `readiness`, as a host of `service_name`; the probing stops when the returned companion
/// is dropped with the endpoint.
fn start<S, B, RB>(
    probe: &Arc<HttpProbe>,
    service: S,
    readiness: Readiness,
    service_name: &str,
) -> Companion
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Default + Send + 'static,
{
    readiness.set_serving(false);
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(service_name)
        .path_and_query(probe.path.clone())
        .build();
    let (probe, name) = (Arc::clone(probe), Arc::<str>::from(service_name));
    let task = tokio::spawn(async move {
        let Ok(uri) = uri else {
            // A service name that is no host: nothing to probe it as; leave it in use.
            readiness.set_serving(true);
            return;
        };
        let changed = Arc::new(Signal::default());
        readiness.listen(&changed);
        loop {
            if !readiness.until_ready(&changed).await {
                return;
            }
            let serving = healthy(&probe, service.clone(), &uri).await;
            if readiness.is_serving() != serving {
                debug!(service = %name, serving, "HTTP health probe");
                let status = if serving { "serving" } else { "not_serving" };
                crate::metrics::health(&name, status);
            }
            readiness.set_serving(serving);
            tokio::time::sleep(probe.interval).await;
            if readiness.get() != Connectivity::Ready {
                // The connection is gone: the next one waits for its own first answer.
                readiness.set_serving(false);
            }
        }
    });
    Companion::task(task.abort_handle())
}

/// One probe: whether the answer came in time with a healthy status.
async fn healthy<S, B, RB>(probe: &HttpProbe, service: S, uri: &http::Uri) -> bool
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    B: Default,
{
    let mut request = http::Request::new(B::default());
    *request.uri_mut() = uri.clone();
    match tokio::time::timeout(probe.timeout, service.oneshot(request)).await {
        Ok(Ok(response)) => probe.healthy.contains(&response.status().as_u16()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, Ordering};

    use super::*;

    /// A server answering each probe after 5 ms with the status it is set to.
    fn server(
        status: &Arc<AtomicU16>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<()>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let status = Arc::clone(status);
        tower::service_fn(move |_: http::Request<()>| {
            let status = status.load(Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let mut response = http::Response::new(());
                *response.status_mut() = http::StatusCode::from_u16(status)?;
                Ok::<_, BoxError>(response)
            }
        })
    }

    /// Whether the instance is serving at each millisecond of the next `ms`.
    async fn serving_over(readiness: &Readiness, ms: u64) -> Vec<bool> {
        let mut seen = Vec::new();
        for _ in 0..ms {
            tokio::time::sleep(Duration::from_millis(1)).await;
            seen.push(readiness.is_serving());
        }
        seen
    }

    /// Catches a probe that drops a healthy instance out between two answers (or while a
    /// probe is in flight), one that keeps a failing instance in, one that serves a new
    /// connection before its first answer, and one that keeps probing a closed connection.
    #[tokio::test(start_paused = true)]
    async fn an_instance_serves_exactly_while_its_last_answer_was_healthy() {
        let _limit = tower_sd_testkit::time_limit(10);
        #[cfg(feature = "metrics")]
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        #[cfg(feature = "metrics")]
        let _recording = metrics::set_default_local_recorder(&recorder);
        let status = Arc::new(AtomicU16::new(200));
        let probe = Arc::new(
            HttpProbe::new("/healthz")
                .unwrap()
                .interval(Duration::from_millis(20)),
        );
        let readiness = Readiness::new(Connectivity::Ready);
        let _companion = start(&probe, server(&status), readiness.clone(), "svc");
        assert!(!readiness.is_serving(), "not before the first answer");
        let seen = serving_over(&readiness, 200).await;
        let first = seen
            .iter()
            .position(|s| *s)
            .expect("serving after the first answer");
        assert!(first <= 6, "{first}");
        assert!(
            seen[first..].iter().all(|s| *s),
            "serving throughout: {seen:?}"
        );

        status.store(503, Ordering::SeqCst);
        let seen = serving_over(&readiness, 100).await;
        assert!(
            seen[30..].iter().all(|s| !*s),
            "out after a failed probe: {seen:?}"
        );

        status.store(200, Ordering::SeqCst);
        readiness.set(Connectivity::Connecting);
        let seen = serving_over(&readiness, 100).await;
        assert!(
            seen[30..].iter().all(|s| !*s),
            "no connection, not serving: {seen:?}"
        );
        readiness.set(Connectivity::Ready);
        assert!(
            !readiness.is_serving(),
            "a new connection waits for its answer"
        );
        let seen = serving_over(&readiness, 100).await;
        assert!(seen[10..].iter().all(|s| *s), "then serves: {seen:?}");

        // Changes are counted, not answers: serving twice (at the start, and on the new
        // connection), out once.
        #[cfg(feature = "metrics")]
        {
            let mut changes: Vec<(String, u64)> = recorder
                .snapshotter()
                .snapshot()
                .into_vec()
                .into_iter()
                .filter(|(key, ..)| key.key().name() == "tower_sd_health_changes_total")
                .map(|(key, _, _, value)| {
                    let status = key.key().labels().find(|l| l.key() == "status");
                    let count = match value {
                        metrics_util::debugging::DebugValue::Counter(n) => n,
                        _ => 0,
                    };
                    (status.unwrap().value().to_owned(), count)
                })
                .collect();
            changes.sort();
            assert_eq!(
                changes,
                [("not_serving".to_owned(), 1), ("serving".to_owned(), 2)]
            );
        }
    }
}
