//! A fake Consul agent on 127.0.0.1, following the documented HTTP API
//! (`api-docs/agent/service.mdx`, `agent/check.mdx`, `health.mdx`, `features/blocking.mdx`):
//! agent registration with one check per service, TTL checks that expire and services reaped
//! after `DeregisterCriticalServiceAfter`, maintenance mode, `/v1/health/service/:name` with
//! `tag`, `dc`, `filter` (the `Service.Meta["k"] == "v" and ...` form), blocking queries
//! (`index`, `wait`, `X-Consul-Index`), the agent health endpoint, ACL tokens (403), and
//! injected faults.
//!
//! Like Consul, a TTL check starts critical until its first update; other checks are run by
//! the agent, and the fake treats them as passing until a test says otherwise.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

/// A fault the next health query answers with.
#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    Slow(Duration),
    MalformedJson,
    /// Answer normally, but with an `X-Consul-Index` lower than any before.
    IndexBackwards,
    /// Answer normally, with `X-Consul-Index: 0`.
    IndexZero,
}

struct Service {
    registration: Value,
    status: String,
    maintenance: bool,
    ttl: Option<Duration>,
    ttl_deadline: Option<Instant>,
    deregister_after: Option<Duration>,
    critical_since: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    services: BTreeMap<String, Service>,
    index: u64,
    faults: VecDeque<Fault>,
    health_queries: u64,
    requests: Vec<String>,
    /// Each health query's `index` parameter (0 when absent) and the `X-Consul-Index` it
    /// was answered with (`None` for an error answer), in order.
    answers: Vec<(u64, Option<u64>)>,
}

pub struct FakeConsul {
    pub addr: SocketAddr,
    token: Option<String>,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

type Shared = Arc<FakeConsul>;

impl FakeConsul {
    /// Starts an agent; with `token`, every request must carry it as `X-Consul-Token`.
    pub async fn start(token: Option<&str>) -> Shared {
        Self::start_with(token, None).await
    }

    /// Starts an agent serving HTTPS with this certificate chain and key (PEM).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Shared {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::start_with(
            None,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn start_with(token: Option<&str>, tls: Option<tokio_rustls::TlsAcceptor>) -> Shared {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(FakeConsul {
            addr: listener.local_addr().unwrap(),
            token: token.map(str::to_owned),
            inner: Mutex::new(Inner {
                index: 10,
                ..Inner::default()
            }),
            changed: watch::Sender::new(0),
            task: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route("/v1/agent/service/register", put(register))
            .route("/v1/agent/service/deregister/{id}", put(deregister))
            .route("/v1/agent/service/maintenance/{id}", put(maintenance))
            .route("/v1/agent/check/update/{check}", put(update_check))
            .route("/v1/agent/health/service/id/{id}", get(agent_health))
            .route("/v1/health/service/{name}", get(health_service))
            // Every endpoint checks the ACL token first, as the agent does.
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&fake), acl))
            .with_state(Arc::clone(&fake));
        let task = match tls {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(acceptor) => tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (acceptor, app) = (acceptor.clone(), app.clone());
                    connections.spawn(async move {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let service = hyper_util::service::TowerToHyperService::new(app);
                        let builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            }),
        };
        *fake.task.lock().unwrap() = Some(task);
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The HTTPS URL, with the host name the test certificate names.
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Sets a service's check status, as the agent's check would.
    pub fn set_status(&self, id: &str, status: &str) {
        let mut inner = self.inner.lock().unwrap();
        let service = inner.services.get_mut(id).expect("registered");
        set_status(service, status);
        self.bump(&mut inner);
    }

    pub fn inject(&self, fault: Fault) {
        self.inner.lock().unwrap().faults.push_back(fault);
    }

    /// Drops every fault not yet served: the agent recovers.
    pub fn clear_faults(&self) {
        self.inner.lock().unwrap().faults.clear();
    }

    /// Health queries answered so far.
    pub fn health_queries(&self) -> u64 {
        self.inner.lock().unwrap().health_queries
    }

    /// Each health query's `index` and the index it was answered with, in order.
    pub fn answers(&self) -> Vec<(u64, Option<u64>)> {
        self.inner.lock().unwrap().answers.clone()
    }

    /// Every request line seen (method, path and query), in order.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().requests.clone()
    }

    pub fn registration(&self, id: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .services
            .get(id)
            .map(|s| s.registration.clone())
    }

    pub fn index(&self) -> u64 {
        self.inner.lock().unwrap().index
    }

    fn bump(&self, inner: &mut Inner) {
        inner.index += 1;
        self.changed.send_replace(inner.index);
    }

    /// Applies TTL expiry and reaping up to now; returns the next deadline.
    fn refresh(&self, inner: &mut Inner) -> Option<Instant> {
        let now = Instant::now();
        let mut changed = false;
        for service in inner.services.values_mut() {
            if let Some(deadline) = service.ttl_deadline
                && deadline <= now
                && service.status != "critical"
            {
                set_status(service, "critical");
                service.critical_since = Some(deadline);
                changed = true;
            }
        }
        let before = inner.services.len();
        inner
            .services
            .retain(|_, s| match (s.critical_since, s.deregister_after) {
                (Some(since), Some(after)) => now < since + after,
                _ => true,
            });
        if changed || inner.services.len() != before {
            self.bump(inner);
        }
        inner
            .services
            .values()
            .flat_map(|s| {
                let ttl = s.ttl_deadline.filter(|_| s.status != "critical");
                let reap = s.critical_since.zip(s.deregister_after).map(|(a, b)| a + b);
                [ttl, reap]
            })
            .flatten()
            .filter(|t| *t > now)
            .min()
    }

    /// The 403 answer when a token is required and the request lacks it.
    fn denied(&self, headers: &HeaderMap) -> Option<Response> {
        let sent = headers.get("X-Consul-Token").and_then(|v| v.to_str().ok());
        match &self.token {
            Some(token) if sent != Some(token.as_str()) => {
                let message = "Permission denied: token lacks permission";
                Some((StatusCode::FORBIDDEN, message).into_response())
            }
            _ => None,
        }
    }

    fn log(&self, line: String) {
        self.inner.lock().unwrap().requests.push(line);
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers 403 when a token is required and the request does not carry it.
async fn acl(
    State(fake): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match fake.denied(request.headers()) {
        Some(denied) => denied,
        None => next.run(request).await,
    }
}

fn set_status(service: &mut Service, status: &str) {
    if status == "critical" && service.status != "critical" {
        service.critical_since = Some(Instant::now());
    } else if status != "critical" {
        service.critical_since = None;
    }
    service.status = status.to_owned();
}

/// Go duration strings as Consul writes them: `10s`, `1m`, `1500ms`, `5m0s`.
fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                0.001
            }
            ('h', _) => 3600.0,
            ('m', _) => 60.0,
            ('s', _) => 1.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(value * unit);
    }
    number.is_empty().then_some(total)
}

async fn register(
    State(fake): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    fake.log(format!("PUT register {q:?}"));
    let Some(id) = body["ID"].as_str().map(str::to_owned) else {
        return (StatusCode::BAD_REQUEST, "missing ID").into_response();
    };
    let check = &body["Check"];
    let ttl = check["TTL"].as_str().and_then(parse_go_duration);
    let deregister_after = check["DeregisterCriticalServiceAfter"]
        .as_str()
        .and_then(parse_go_duration);
    let status =
        check["Status"]
            .as_str()
            .unwrap_or(if ttl.is_some() { "critical" } else { "passing" });
    let mut service = Service {
        registration: body.clone(),
        status: String::new(),
        maintenance: false,
        ttl,
        ttl_deadline: None,
        deregister_after,
        critical_since: None,
    };
    set_status(&mut service, status);
    let mut inner = fake.inner.lock().unwrap();
    inner.services.insert(id, service);
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

async fn deregister(State(fake): State<Shared>, Path(id): Path<String>) -> Response {
    let mut inner = fake.inner.lock().unwrap();
    if inner.services.remove(&id).is_none() {
        return (StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}")).into_response();
    }
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

async fn maintenance(
    State(fake): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut inner = fake.inner.lock().unwrap();
    let Some(service) = inner.services.get_mut(&id) else {
        return (StatusCode::NOT_FOUND, "Unknown service").into_response();
    };
    service.maintenance = q.get("enable").map(String::as_str) == Some("true");
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

async fn update_check(
    State(fake): State<Shared>,
    Path(check): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let id = check.strip_prefix("service:").unwrap_or(&check).to_owned();
    let mut inner = fake.inner.lock().unwrap();
    let Some(service) = inner.services.get_mut(&id) else {
        return (StatusCode::NOT_FOUND, format!("Unknown check ID {check:?}")).into_response();
    };
    let Some(ttl) = service.ttl else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {check:?} does not have associated TTL"),
        )
            .into_response();
    };
    set_status(service, body["Status"].as_str().unwrap_or("passing"));
    service.ttl_deadline = Some(Instant::now() + ttl);
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

fn effective_status(service: &Service) -> &str {
    if service.maintenance {
        "maintenance"
    } else {
        &service.status
    }
}

async fn agent_health(State(fake): State<Shared>, Path(id): Path<String>) -> Response {
    let mut inner = fake.inner.lock().unwrap();
    fake.refresh(&mut inner);
    let Some(service) = inner.services.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"AggregatedStatus": "critical"})),
        )
            .into_response();
    };
    let status = effective_status(service).to_owned();
    let code = match status.as_str() {
        "passing" => StatusCode::OK,
        "warning" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        code,
        Json(json!({"AggregatedStatus": status, "Service": service.registration})),
    )
        .into_response()
}

/// `Service.Meta["k"] == "v" and ...`, as the client writes it.
fn filter_matches(filter: &str, meta: &Value) -> bool {
    filter.split(" and ").all(|term| {
        let Some((lhs, rhs)) = term.split_once(" == ") else {
            return false;
        };
        let key = lhs
            .trim()
            .strip_prefix("Service.Meta[")
            .and_then(|k| k.strip_suffix(']'));
        match (
            key.and_then(|k| serde_json::from_str::<String>(k).ok()),
            serde_json::from_str::<String>(rhs.trim()),
        ) {
            (Some(key), Ok(value)) => meta[key.as_str()].as_str() == Some(value.as_str()),
            _ => false,
        }
    })
}

async fn health_service(
    State(fake): State<Shared>,
    Path(name): Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let raw = raw.unwrap_or_default();
    fake.log(format!("GET health/service/{name}?{raw}"));
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&raw).unwrap_or_default();
    let param = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let tags: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.clone())
        .collect();
    if param("dc").is_some_and(|dc| dc != "dc1") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response();
    }

    let asked: u64 = param("index").and_then(|i| i.parse().ok()).unwrap_or(0);
    let fault = {
        let mut inner = fake.inner.lock().unwrap();
        inner.health_queries += 1;
        inner.faults.pop_front()
    };
    match &fault {
        Some(Fault::Status(code)) => {
            fake.inner.lock().unwrap().answers.push((asked, None));
            return (StatusCode::from_u16(*code).unwrap(), "injected fault").into_response();
        }
        Some(Fault::Slow(delay)) => tokio::time::sleep(*delay).await,
        _ => {}
    }

    // Blocking query: wait while the index is unchanged, up to `wait`.
    let wait = param("wait")
        .and_then(|w| parse_go_duration(&w))
        .unwrap_or(Duration::from_secs(300));
    let give_up = Instant::now() + wait;
    let mut changes = fake.changed.subscribe();
    loop {
        let (index, next_deadline) = {
            let mut inner = fake.inner.lock().unwrap();
            let next = fake.refresh(&mut inner);
            (inner.index, next)
        };
        if asked == 0 || index != asked || Instant::now() >= give_up {
            break;
        }
        let until = next_deadline.map_or(give_up, |d| d.min(give_up));
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep_until(until) => {}
        }
    }

    let mut inner = fake.inner.lock().unwrap();
    let entries: Vec<Value> = inner
        .services
        .values()
        .filter(|s| s.registration["Name"].as_str() == Some(name.as_str()))
        .filter(|s| {
            let have = s.registration["Tags"].as_array().cloned().unwrap_or_default();
            tags.iter().all(|t| have.iter().any(|h| h.as_str() == Some(t)))
        })
        .filter(|s| param("filter").is_none_or(|f| filter_matches(&f, &s.registration["Meta"])))
        .map(|s| {
            let r = &s.registration;
            let id = r["ID"].as_str().unwrap_or_default();
            let mut checks = vec![
                json!({"Node": "node-1", "CheckID": "serfHealth", "Status": "passing"}),
                json!({"Node": "node-1", "CheckID": format!("service:{id}"), "Status": s.status, "ServiceID": id}),
            ];
            if s.maintenance {
                checks.push(json!({"CheckID": format!("_service_maintenance:{id}"), "Status": "critical"}));
            }
            json!({
                "Node": {"ID": "40e4a748", "Node": "node-1", "Address": "127.0.0.1", "Datacenter": "dc1",
                         "Meta": {"zone": "node-zone"}, "CreateIndex": 1, "ModifyIndex": 1},
                "Service": {
                    "ID": id, "Service": r["Name"], "Tags": r["Tags"], "Address": r["Address"], "Port": r["Port"],
                    "Meta": if r["Meta"].as_object().is_some_and(|m| m.is_empty()) { Value::Null } else { r["Meta"].clone() },
                    "Weights": r["Weights"], "Namespace": "default", "CreateIndex": 5, "ModifyIndex": inner.index,
                },
                "Checks": checks,
            })
        })
        .collect();
    let index = match fault {
        Some(Fault::IndexBackwards) => 1,
        Some(Fault::IndexZero) => 0,
        _ => inner.index,
    };
    inner.answers.push((asked, Some(index)));
    let body = match fault {
        Some(Fault::MalformedJson) => "[{\"Node\": ".to_owned(),
        _ => Value::Array(entries).to_string(),
    };
    (
        [
            ("X-Consul-Index", index.to_string()),
            ("Content-Type", "application/json".to_owned()),
        ],
        body,
    )
        .into_response()
}
