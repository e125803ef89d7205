//! A fake Consul agent on 127.0.0.1, as strict as a real one where the tests can tell.
//!
//! It follows the documented HTTP API (`api-docs/agent/service.mdx`, `agent/check.mdx`,
//! `health.mdx`, `features/blocking.mdx`, `acl/index.mdx`):
//!
//! - **Nodes.** The agent is node `node-1`; services registered through its agent API live
//!   there. [`FakeConsul::register_on`] puts services on other nodes (as their own agents
//!   would), with the same service IDs if the test likes: IDs are unique per agent only.
//!   Each node has a `serfHealth` check ([`FakeConsul::set_node_health`]); a critical node
//!   check makes every service on the node critical.
//! - **Checks.** One check per service, `service:<id>`, validated as the agent does (one
//!   kind, an `Interval` for the kinds it runs, a TTL that is a duration; 400 otherwise). A
//!   TTL check starts critical (unless registered with a `Status`) and turns critical when
//!   its TTL passes, counted from registration and then from each update; an update must
//!   carry a `Status` (400 otherwise). Other checks are run by the agent; the fake treats them as passing
//!   until a test says otherwise. A service critical for `DeregisterCriticalServiceAfter`
//!   is removed, with Consul's minimum of one minute (lower values are raised, as the agent
//!   does).
//! - **Health queries.** `/v1/health/service/:name` (the name, and each `tag`, compared
//!   without regard to case, as Consul does) with `tag`, `dc`, `filter` (the
//!   `Service.Meta["k"] == "v" and ...` form), `passing` (only entries whose checks all pass)
//!   and blocking: with `index` and `wait`, the answer waits until the index moves past the
//!   one asked (not merely differs), or `wait` ends. Each query has its own index, as Consul
//!   keeps one per service: the index of the last write that changed its answer, so writes
//!   to other services do not end it. `wait` is capped at 10 minutes, with Consul's jitter
//!   of up to a sixteenth added; a `wait` that is no duration is a 400. `X-Consul-Index` on
//!   every answer.
//! - **Consistency.** Every health answer carries `X-Consul-KnownLeader` and
//!   `X-Consul-LastContact`; a `stale` read gets what [`FakeConsul::set_leader`] says (a
//!   known leader, contact 0, until told otherwise), any other read the leader's own.
//! - **ACLs** (with [`FakeConsul::start`]`(Some(token))`): default deny. An unknown token
//!   gets 403 (`ACL not found`). A known token, or no token (the anonymous token), without
//!   `service:read` on a service gets 200 with that service's entries removed, and
//!   `X-Consul-Results-Filtered-By-ACLs: true` only for a request with a token (Consul's
//!   servers clear it for requests without one, `maskResultsFilteredByACLs`; the fake has
//!   no agent default token); agent writes without `service:write` get 403.
//! - Maintenance mode of a service (its `_service_maintenance:<id>` check carries the
//!   `ServiceID`) and of a node ([`FakeConsul::set_node_maintenance`]: `_node_maintenance`,
//!   no `ServiceID`, on every entry of the node), checks beyond the service's own
//!   ([`FakeConsul::set_extra_check`]), the agent health endpoint, and injected faults.
//!
//! - **Datacenters.** The agent is in `dc1`; [`FakeConsul::set_node_datacenter`] puts a node
//!   in another, whose services then answer only queries with that `dc`, each with its own
//!   index. `/v1/catalog/datacenters` lists the known ones in the order a test sets (nearest
//!   first); a query for an unknown datacenter, or one made unreachable
//!   ([`FakeConsul::set_datacenter_down`], which also ends its blocking queries), gets 500
//!   `No path to datacenter`.
//!
//! - **Prepared queries** ([`FakeConsul::define_prepared_query`]): `/v1/query/:name/execute`
//!   answers the service's instances without a critical check in the datacenter asked, else
//!   in each failover datacenter in turn, with `Datacenter` and `Failovers`; 404 for an
//!   unknown query.
//!
//! Not modelled: the catalog and KV APIs (but the datacenter list), sessions, prepared
//! query templates, `Near` sorting and the query API beyond execute (queries are defined by
//! the test), round-trip-time estimates (the order is what a test sets), ACL policies beyond
//! service read and write (no `node:read`), checks beyond the registration's own other than
//! through [`FakeConsul::set_extra_check`].

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

/// The agent's own node.
pub const AGENT_NODE: &str = "node-1";
/// Consul raises a lower `DeregisterCriticalServiceAfter` to this.
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);

/// A fault the next health query answers with.
#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    /// 429 with this `Retry-After`, as Consul's rate limiting answers.
    RateLimited(String),
    Slow(Duration),
    MalformedJson,
    /// Answer normally, but with an `X-Consul-Index` lower than any before.
    IndexBackwards,
    /// Answer normally, with `X-Consul-Index: 0`.
    IndexZero,
    /// Answer `307 Temporary Redirect` to this URL.
    Redirect(String),
}

/// What a token may do.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Services it may read; `*` for all.
    pub read: Vec<String>,
    /// Whether it may register, deregister and update services on the agent.
    pub write: bool,
}

impl Policy {
    fn can_read(&self, service: &str) -> bool {
        self.read.iter().any(|s| s == "*" || s == service)
    }

    fn management() -> Self {
        Self {
            read: vec!["*".to_owned()],
            write: true,
        }
    }
}

struct Service {
    node: String,
    registration: Value,
    status: String,
    maintenance: bool,
    ttl: Option<Duration>,
    ttl_deadline: Option<Instant>,
    deregister_after: Option<Duration>,
    critical_since: Option<Instant>,
    /// A sidecar's alias check: the ID of the service whose health it follows.
    alias_of: Option<String>,
    /// Registered through a parent's `SidecarService`.
    sidecar: bool,
    /// Checks beyond `service:<id>`: (check ID, status).
    extra_checks: Vec<(String, String)>,
}

#[derive(Default)]
struct Inner {
    /// By node and service ID.
    services: BTreeMap<(String, String), Service>,
    /// `serfHealth` status by node; absent means passing.
    nodes: BTreeMap<String, String>,
    index: u64,
    faults: VecDeque<Fault>,
    health_queries: u64,
    requests: Vec<String>,
    /// Each health query's `index` parameter (0 when absent) and the `X-Consul-Index` it
    /// was answered with (`None` for an error answer), in order.
    answers: Vec<(u64, Option<u64>)>,
    /// With ACLs on: the known tokens. `None`: ACLs off, everything is allowed.
    tokens: Option<HashMap<String, Policy>>,
    /// Every `X-Consul-Token` value received, for checks that a token went nowhere else.
    tokens_seen: Vec<String>,
    /// What a `stale` read's server says of its leader: whether it knows one, and how long
    /// since it heard from it (`X-Consul-KnownLeader`, `X-Consul-LastContact`).
    leader: (bool, Duration),
    /// Each health query's last answer and its index (see `HealthQuery::answer`).
    query_indexes: HashMap<HealthQuery, (String, u64)>,
    /// The datacenter of each node (`dc1` when unset): its services answer queries for
    /// that datacenter only.
    node_datacenters: BTreeMap<String, String>,
    /// The known datacenters, nearest first (`/v1/catalog/datacenters`); `dc1`, the
    /// agent's, until set.
    datacenters: Vec<String>,
    /// Datacenters whose servers cannot be reached: queries for them get 500.
    datacenters_down: std::collections::BTreeSet<String>,
    /// Prepared queries by name: the service, and the datacenters to fail over to.
    prepared: BTreeMap<String, (String, Vec<String>)>,
    /// Nodes in maintenance (`_node_maintenance`, critical for every service on them).
    node_maintenance: std::collections::BTreeSet<String>,
}

pub struct FakeConsul {
    pub addr: SocketAddr,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The Connect CA and intentions (`fake_connect.rs`).
    pub(super) connect: Mutex<super::fake_connect::Connect>,
    /// Bumped at every Connect change, for blocking queries.
    connect_index: watch::Sender<u64>,
}

type Shared = Arc<FakeConsul>;

impl FakeConsul {
    /// Starts an agent; with `token`, ACLs are on (default deny) and `token` is a
    /// management token.
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
        let tokens = token.map(|token| HashMap::from([(token.to_owned(), Policy::management())]));
        let fake = Arc::new(FakeConsul {
            addr: listener.local_addr().unwrap(),
            inner: Mutex::new(Inner {
                index: 10,
                tokens,
                leader: (true, Duration::ZERO),
                datacenters: vec!["dc1".to_owned()],
                ..Inner::default()
            }),
            changed: watch::Sender::new(0),
            task: Mutex::new(None),
            connect: Mutex::default(),
            connect_index: watch::Sender::new(1),
        });
        let app = axum::Router::new()
            .route("/v1/agent/service/register", put(register))
            .route("/v1/agent/service/deregister/{id}", put(deregister))
            .route("/v1/agent/service/maintenance/{id}", put(maintenance))
            .route("/v1/agent/check/update/{check}", put(update_check))
            .route("/v1/agent/health/service/id/{id}", get(agent_health))
            .route("/v1/health/service/{name}", get(health_service))
            .route("/v1/catalog/datacenters", get(catalog_datacenters))
            .route("/v1/query/{name}/execute", get(execute_query))
            .route("/v1/health/connect/{name}", get(health_connect))
            .route(
                "/v1/agent/connect/ca/roots",
                get(super::fake_connect::roots),
            )
            .route(
                "/v1/agent/connect/ca/leaf/{service}",
                get(super::fake_connect::leaf),
            )
            .route(
                "/v1/agent/connect/authorize",
                axum::routing::post(super::fake_connect::authorize),
            )
            // Every endpoint resolves the ACL token first, as the agent does.
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

    /// Adds a token with this policy (ACLs must be on).
    pub fn add_token(&self, token: &str, policy: Policy) {
        let mut inner = self.inner.lock().unwrap();
        inner
            .tokens
            .as_mut()
            .expect("ACLs are on")
            .insert(token.to_owned(), policy);
    }

    /// Every `X-Consul-Token` the agent received.
    pub fn tokens_seen(&self) -> Vec<String> {
        self.inner.lock().unwrap().tokens_seen.clone()
    }

    /// Registers a service on another node, as that node's agent would (a passing check,
    /// unless `status` says otherwise).
    pub fn register_on(&self, node: &str, registration: Value, status: &str) {
        let mut inner = self.inner.lock().unwrap();
        let id = registration["ID"].as_str().unwrap().to_owned();
        let mut service = Service::new(node, registration);
        set_status(&mut service, status);
        inner.services.insert((node.to_owned(), id), service);
        self.bump(&mut inner);
    }

    /// Forgets everything registered on the agent, as a restarted agent without its data
    /// directory does.
    pub fn restart_agent(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.services.retain(|(node, _), _| node != AGENT_NODE);
        self.bump(&mut inner);
    }

    /// What the server answering a `stale` read says of its leader from now on (a read that
    /// is not `stale` goes to the leader: known, contact 0).
    pub fn set_leader(&self, known: bool, last_contact: Duration) {
        self.inner.lock().unwrap().leader = (known, last_contact);
    }

    /// Whether queries for `datacenter` are answered: it is known and not down.
    fn reachable(&self, datacenter: &str) -> bool {
        let inner = self.inner.lock().unwrap();
        inner.datacenters.iter().any(|dc| dc == datacenter)
            && !inner.datacenters_down.contains(datacenter)
    }

    /// Puts a node in a datacenter (`dc1` until set): its services answer only queries for
    /// that datacenter (`?dc=`), as a WAN-federated catalog does; the agent and its leaves
    /// stay `dc1`'s. The datacenter must be known ([`set_datacenters`](Self::set_datacenters)).
    pub fn set_node_datacenter(&self, node: &str, datacenter: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner
            .node_datacenters
            .insert(node.to_owned(), datacenter.to_owned());
        self.bump(&mut inner);
    }

    /// The known datacenters, nearest first, as `/v1/catalog/datacenters` lists them (the
    /// agent's own, `dc1`, first unless a test says otherwise).
    pub fn set_datacenters(&self, datacenters: &[&str]) {
        let mut inner = self.inner.lock().unwrap();
        inner.datacenters = datacenters.iter().map(|dc| (*dc).to_owned()).collect();
        self.bump(&mut inner);
    }

    /// Defines a prepared query (`POST /v1/query`): `name` finds the healthy instances of
    /// `service`, in the datacenter asked (`dc1` by default) or, when it has none (or cannot
    /// be reached), in each of `failover` in turn.
    pub fn define_prepared_query(&self, name: &str, service: &str, failover: &[&str]) {
        let mut inner = self.inner.lock().unwrap();
        let failover = failover.iter().map(|dc| (*dc).to_owned()).collect();
        inner
            .prepared
            .insert(name.to_owned(), (service.to_owned(), failover));
        self.bump(&mut inner);
    }

    /// Makes a datacenter's servers unreachable, or reachable again: its queries get 500
    /// (`No path to datacenter`), and blocking queries on it end with that error.
    pub fn set_datacenter_down(&self, datacenter: &str, down: bool) {
        let mut inner = self.inner.lock().unwrap();
        if down {
            inner.datacenters_down.insert(datacenter.to_owned());
        } else {
            inner.datacenters_down.remove(datacenter);
        }
        self.bump(&mut inner);
    }

    /// Puts a node in maintenance or takes it out (`PUT /v1/agent/maintenance` on its
    /// agent): a critical `_node_maintenance` check on every entry of the node.
    pub fn set_node_maintenance(&self, node: &str, on: bool) {
        let mut inner = self.inner.lock().unwrap();
        if on {
            inner.node_maintenance.insert(node.to_owned());
        } else {
            inner.node_maintenance.remove(node);
        }
        self.bump(&mut inner);
    }

    /// Adds (or sets) a check of a service beyond its own, as a registration's `Checks`
    /// list gives it: the entry's worst check decides.
    pub fn set_extra_check(&self, node: &str, service_id: &str, check_id: &str, status: &str) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(service) = inner
            .services
            .get_mut(&(node.to_owned(), service_id.to_owned()))
        {
            service.extra_checks.retain(|(id, _)| id != check_id);
            service
                .extra_checks
                .push((check_id.to_owned(), status.to_owned()));
        }
        self.bump(&mut inner);
    }

    /// Sets a node's `serfHealth` check: `critical` makes every service on it critical.
    pub fn set_node_health(&self, node: &str, status: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.nodes.insert(node.to_owned(), status.to_owned());
        self.bump(&mut inner);
    }

    /// Sets the check status of a service on the agent's node.
    pub fn set_status(&self, id: &str, status: &str) {
        self.set_status_on(AGENT_NODE, id, status);
    }

    /// Sets the check status of a service on `node`.
    pub fn set_status_on(&self, node: &str, id: &str, status: &str) {
        let mut inner = self.inner.lock().unwrap();
        let service = inner
            .services
            .get_mut(&(node.to_owned(), id.to_owned()))
            .expect("registered");
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

    /// The registration of a service on the agent's node.
    pub fn registration(&self, id: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .services
            .get(&(AGENT_NODE.to_owned(), id.to_owned()))
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

    pub(super) fn log(&self, line: String) {
        self.inner.lock().unwrap().requests.push(line);
    }

    /// The next Connect index (roots and leaves share one counter).
    pub(super) fn next_connect_index(&self) -> u64 {
        self.connect_index.send_modify(|i| *i += 1);
        *self.connect_index.borrow()
    }

    pub(super) fn connect_changed(&self) {
        self.next_connect_index();
    }

    pub(super) fn connect_changes(&self) -> watch::Receiver<u64> {
        self.connect_index.subscribe()
    }

    /// Renews the leaves that are due, as the agent's leaf cache does in the background.
    pub(super) fn renew_leaves(&self) {
        let index = *self.connect_index.borrow() + 1;
        if self.connect.lock().unwrap().renew_due(index) {
            self.next_connect_index();
        }
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Service {
    fn new(node: &str, registration: Value) -> Self {
        Self {
            node: node.to_owned(),
            registration,
            status: "passing".to_owned(),
            maintenance: false,
            ttl: None,
            ttl_deadline: None,
            deregister_after: None,
            critical_since: None,
            alias_of: None,
            sidecar: false,
            extra_checks: Vec::new(),
        }
    }
}

/// The policy the request's token carries, as the agent resolves it.
#[derive(Clone, Debug)]
pub(super) struct Caller(pub(super) Policy);

/// The request carried no token (the agent has no default token here): Consul's servers
/// clear `X-Consul-Results-Filtered-By-ACLs` for it (`maskResultsFilteredByACLs`).
#[derive(Clone, Copy, Debug)]
struct Anonymous(bool);

/// Resolves the ACL token (header or `token` query parameter): an unknown one is 403.
async fn acl(
    State(fake): State<Shared>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = request
        .headers()
        .get("X-Consul-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let policy = {
        let mut inner = fake.inner.lock().unwrap();
        if let Some(token) = &token {
            inner.tokens_seen.push(token.clone());
        }
        match (&inner.tokens, &token) {
            (None, _) => Ok(Policy::management()),
            // The anonymous token: nothing, under default deny.
            (Some(_), None) => Ok(Policy::default()),
            (Some(tokens), Some(token)) => tokens.get(token).cloned().ok_or(()),
        }
    };
    match policy {
        Ok(policy) => {
            request.extensions_mut().insert(Caller(policy));
            request.extensions_mut().insert(Anonymous(token.is_none()));
            next.run(request).await
        }
        Err(()) => (StatusCode::FORBIDDEN, "ACL not found").into_response(),
    }
}

pub(super) fn denied(permission: &str) -> Response {
    let message = format!("Permission denied: token lacks permission '{permission}'");
    (StatusCode::FORBIDDEN, message).into_response()
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
pub(super) fn parse_go_duration(text: &str) -> Option<Duration> {
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
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
    Json(mut body): Json<Value>,
) -> Response {
    fake.log(format!("PUT register {q:?}"));
    if !policy.write {
        return denied("service:write");
    }
    // As the agent's `AgentRegisterService`: a name is required, the ID defaults to it,
    // and weights must be 1..=65535 passing, 0..=65535 warning (`ValidateWeights`).
    let Some(name) = body["Name"].as_str().filter(|n| !n.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "Missing service name").into_response();
    };
    let id = body["ID"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or(name)
        .to_owned();
    let weight = |key: &str| body["Weights"][key].as_i64();
    if body.get("Weights").is_some_and(|w| !w.is_null()) {
        let passing = weight("Passing").unwrap_or(0);
        let warning = weight("Warning").unwrap_or(0);
        if passing < 1 || warning < 0 || passing > 65_535 || warning > 65_535 {
            let message = "Invalid Weights: Passing must be greater than 0";
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    }
    body["ID"] = id.clone().into();
    let check = &body["Check"];
    if let Err(message) = validate_check(check) {
        return (StatusCode::BAD_REQUEST, message).into_response();
    }
    let ttl = check["TTL"].as_str().and_then(parse_go_duration);
    let deregister_after = check["DeregisterCriticalServiceAfter"]
        .as_str()
        .and_then(parse_go_duration)
        .map(|after| after.max(MIN_DEREGISTER_AFTER));
    let status =
        check["Status"]
            .as_str()
            .unwrap_or(if ttl.is_some() { "critical" } else { "passing" });
    let mut service = Service::new(AGENT_NODE, body.clone());
    service.ttl = ttl;
    // A TTL runs from registration: a check registered passing turns critical without an
    // update within it.
    service.ttl_deadline = ttl.map(|ttl| Instant::now() + ttl);
    service.deregister_after = deregister_after;
    set_status(&mut service, status);
    let sidecar = sidecar_of(&body);
    let mut inner = fake.inner.lock().unwrap();
    inner.services.insert((AGENT_NODE.to_owned(), id), service);
    if let Some((sidecar_id, sidecar)) = sidecar {
        inner
            .services
            .insert((AGENT_NODE.to_owned(), sidecar_id), sidecar);
    }
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

/// A check definition as the agent validates it (`CheckType.Validate`): exactly one kind,
/// an `Interval` for the kinds the agent runs, a TTL that is a duration.
fn validate_check(check: &Value) -> Result<(), &'static str> {
    if check.is_null() {
        return Ok(());
    }
    let kinds = [
        "HTTP",
        "TCP",
        "GRPC",
        "H2PING",
        "UDP",
        "TTL",
        "Args",
        "ScriptArgs",
        "AliasService",
        "OSService",
    ];
    let given: Vec<&str> = kinds.into_iter().filter(|k| !check[*k].is_null()).collect();
    match given.as_slice() {
        [] => Err(
            "Invalid check: one of Args, HTTP, TCP, GRPC, H2PING, UDP, TTL or AliasService is required",
        ),
        [_, _, ..] => Err("Invalid check: only one kind of check per definition"),
        ["TTL"] => match check["TTL"].as_str().and_then(parse_go_duration) {
            Some(ttl) if !ttl.is_zero() => Ok(()),
            _ => Err("Invalid check: TTL must be > 0"),
        },
        ["AliasService" | "OSService"] => Ok(()),
        [_] => match check["Interval"].as_str().and_then(parse_go_duration) {
            Some(interval) if !interval.is_zero() => Ok(()),
            _ => Err("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or gRPC checks"),
        },
    }
}

/// The sidecar proxy a registration's `Connect.SidecarService` asks for, with Consul's
/// defaults (`connect/proxies/deploy-sidecar-services.mdx`): ID `<id>-sidecar-proxy`, name
/// `<name>-sidecar-proxy`, the parent's address, tags and meta, a port from 21000 when none
/// is given, and an alias check that follows the parent's health.
fn sidecar_of(body: &Value) -> Option<(String, Service)> {
    let asked = body["Connect"].get("SidecarService")?;
    let (id, name) = (body["ID"].as_str()?, body["Name"].as_str()?);
    let sidecar_id = format!("{id}-sidecar-proxy");
    let registration = json!({
        "ID": sidecar_id,
        "Name": format!("{name}-sidecar-proxy"),
        "Kind": "connect-proxy",
        "Tags": asked.get("Tags").unwrap_or(&body["Tags"]),
        "Meta": asked.get("Meta").unwrap_or(&body["Meta"]),
        "Address": body["Address"],
        "Port": asked.get("Port").cloned().unwrap_or(json!(21000)),
        "Weights": body["Weights"],
        "Proxy": {
            "DestinationServiceName": name,
            "DestinationServiceID": id,
            "LocalServicePort": body["Port"],
            "Upstreams": asked["Proxy"]["Upstreams"],
        },
    });
    let mut service = Service::new(AGENT_NODE, registration);
    service.alias_of = Some(id.to_owned());
    service.sidecar = true;
    Some((sidecar_id, service))
}

async fn deregister(
    State(fake): State<Shared>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    if !policy.write {
        return denied("service:write");
    }
    let mut inner = fake.inner.lock().unwrap();
    if inner
        .services
        .remove(&(AGENT_NODE.to_owned(), id.clone()))
        .is_none()
    {
        return (StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}")).into_response();
    }
    // The agent removes a sidecar registered through its parent's `SidecarService` with
    // the parent (`LocallyRegisteredAsSidecar`), and no other.
    let sidecar = (AGENT_NODE.to_owned(), format!("{id}-sidecar-proxy"));
    if inner.services.get(&sidecar).is_some_and(|s| s.sidecar) {
        inner.services.remove(&sidecar);
    }
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

async fn maintenance(
    State(fake): State<Shared>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !policy.write {
        return denied("service:write");
    }
    let mut inner = fake.inner.lock().unwrap();
    let Some(service) = inner.services.get_mut(&(AGENT_NODE.to_owned(), id)) else {
        return (StatusCode::NOT_FOUND, "Unknown service").into_response();
    };
    service.maintenance = q.get("enable").map(String::as_str) == Some("true");
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

async fn update_check(
    State(fake): State<Shared>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Path(check): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    if !policy.write {
        return denied("service:write");
    }
    let Some(status) = body["Status"]
        .as_str()
        .filter(|s| ["passing", "warning", "critical"].contains(s))
        .map(str::to_owned)
    else {
        return (StatusCode::BAD_REQUEST, "Missing or invalid status").into_response();
    };
    let id = check.strip_prefix("service:").unwrap_or(&check).to_owned();
    let mut inner = fake.inner.lock().unwrap();
    let Some(service) = inner.services.get_mut(&(AGENT_NODE.to_owned(), id)) else {
        return (StatusCode::NOT_FOUND, format!("Unknown check ID {check:?}")).into_response();
    };
    let Some(ttl) = service.ttl else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {check:?} does not have associated TTL"),
        )
            .into_response();
    };
    set_status(service, &status);
    service.ttl_deadline = Some(Instant::now() + ttl);
    fake.bump(&mut inner);
    StatusCode::OK.into_response()
}

fn effective_status(service: &Service, node: &str) -> String {
    if service.maintenance {
        "maintenance".to_owned()
    } else if node == "critical" {
        "critical".to_owned()
    } else {
        service.status.clone()
    }
}

async fn agent_health(
    State(fake): State<Shared>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let mut inner = fake.inner.lock().unwrap();
    fake.refresh(&mut inner);
    let Some(service) = inner.services.get(&(AGENT_NODE.to_owned(), id)) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"AggregatedStatus": "critical"})),
        )
            .into_response();
    };
    if !policy.can_read(service.registration["Name"].as_str().unwrap_or_default()) {
        return denied("service:read");
    }
    let node = inner.nodes.get(AGENT_NODE).cloned().unwrap_or_default();
    let status = effective_status(service, &node);
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

/// What an entry says of its node.
struct NodeState<'a> {
    /// Its `serfHealth` status.
    status: &'a str,
    datacenter: &'a str,
    maintenance: bool,
}

/// One health entry as Consul renders it.
fn entry(service: &Service, on: &NodeState, alias: Option<String>, index: u64) -> Value {
    let r = &service.registration;
    let id = r["ID"].as_str().unwrap_or_default();
    let node = &service.node;
    let mut checks = vec![
        json!({"Node": node, "CheckID": "serfHealth", "Status": on.status}),
        json!({"Node": node, "CheckID": format!("service:{id}"), "Status": service.status, "ServiceID": id}),
    ];
    if on.maintenance {
        checks.push(json!({"Node": node, "CheckID": "_node_maintenance", "Status": "critical"}));
    }
    if service.maintenance {
        checks.push(json!({"Node": node, "CheckID": format!("_service_maintenance:{id}"), "Status": "critical", "ServiceID": id}));
    }
    for (check, status) in &service.extra_checks {
        checks.push(json!({"Node": node, "CheckID": check, "Status": status, "ServiceID": id}));
    }
    if let Some(status) = alias {
        checks.push(json!({"Node": node, "CheckID": format!("service:{id}:2"), "Status": status, "ServiceID": id}));
    }
    let meta = if r["Meta"].as_object().is_none_or(|m| m.is_empty()) {
        Value::Null
    } else {
        r["Meta"].clone()
    };
    json!({
        "Node": {"ID": format!("id-{node}"), "Node": node, "Address": "127.0.0.1", "Datacenter": on.datacenter,
                 "Meta": {"zone": "node-zone"}, "CreateIndex": 1, "ModifyIndex": 1},
        "Service": {
            // Go's zero values where the registration left a field out: "" and 0 (a nil
            // slice of tags is null).
            "ID": id, "Service": r["Name"], "Tags": r["Tags"],
            "Address": r.get("Address").cloned().unwrap_or(json!("")),
            "Port": r.get("Port").cloned().unwrap_or(json!(0)),
            "Meta": meta, "Weights": r["Weights"], "Namespace": "default", "CreateIndex": 5, "ModifyIndex": index,
            "Kind": r.get("Kind").cloned().unwrap_or(json!("")),
            // Consul renders an empty proxy block for services that are not proxies.
            "Proxy": r.get("Proxy").cloned().unwrap_or(json!({"MeshGateway": {}, "Expose": {}})),
            "Connect": r.get("Connect").cloned().unwrap_or(json!({})),
        },
        "Checks": checks,
    })
}

async fn health_service(
    State(fake): State<Shared>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    axum::Extension(Anonymous(anonymous)): axum::Extension<Anonymous>,
    Path(name): Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    health(fake, (policy, anonymous), name, raw, false).await
}

/// `/v1/health/connect/:name`: the service's sidecar proxies and its Connect-native
/// instances, with the same parameters and blocking as `/v1/health/service`.
async fn health_connect(
    State(fake): State<Shared>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    axum::Extension(Anonymous(anonymous)): axum::Extension<Anonymous>,
    Path(name): Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    health(fake, (policy, anonymous), name, raw, true).await
}

/// Whether `service` answers a health query for `name` (`connect`: a mesh query).
/// Names compare without regard to case, as Consul's state store indexes them lower-cased.
fn answers_for(service: &Service, name: &str, connect: bool) -> bool {
    let r = &service.registration;
    let is = |value: &Value| value.as_str().is_some_and(|v| same_lowered(v, name));
    if !connect {
        return is(&r["Name"]);
    }
    let proxy_for = r["Kind"] == "connect-proxy" && is(&r["Proxy"]["DestinationServiceName"]);
    let native = is(&r["Name"]) && r["Connect"]["Native"] == true;
    proxy_for || native
}

/// Equal once lower-cased, as Consul compares service names and tags (`strings.ToLower`).
fn same_lowered(a: &str, b: &str) -> bool {
    a.to_lowercase() == b.to_lowercase()
}

/// Consul's longest blocking wait.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A random duration below `most` (Consul's blocking-query jitter).
fn jitter(most: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    most.mul_f64(unit)
}

/// What a health query asks, for its answer and its index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HealthQuery {
    datacenter: String,
    /// Lower-cased, as Consul indexes names.
    name: String,
    connect: bool,
    tags: Vec<String>,
    filter: Option<String>,
    passing_only: bool,
}

impl HealthQuery {
    /// The entries that answer it now (their `ModifyIndex` left for [`indexed`]), whether
    /// ACLs hid some, and its index: as Consul keeps an index per service, the index of
    /// the last write that changed this answer, not of the last write anywhere.
    fn answer(&self, inner: &mut Inner, policy: &Policy) -> (Vec<Value>, bool, u64) {
        let mut filtered = false;
        let entries: Vec<Value> = inner
            .services
            .values()
            .filter(|s| answers_for(s, &self.name, self.connect))
            .filter(|s| {
                let dc = inner
                    .node_datacenters
                    .get(&s.node)
                    .map_or("dc1", String::as_str);
                dc == self.datacenter
            })
            .filter(|_| {
                let readable = policy.can_read(&self.name);
                filtered |= !readable;
                readable
            })
            .filter(|s| {
                let have = s.registration["Tags"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                self.tags.iter().all(|t| {
                    have.iter()
                        .any(|h| h.as_str().is_some_and(|h| same_lowered(h, t)))
                })
            })
            .filter(|s| {
                let meta = &s.registration["Meta"];
                self.filter.as_ref().is_none_or(|f| filter_matches(f, meta))
            })
            .map(|s| {
                let node_status = inner
                    .nodes
                    .get(&s.node)
                    .cloned()
                    .unwrap_or_else(|| "passing".to_owned());
                let alias = s.alias_of.as_ref().map(|parent| {
                    inner
                        .services
                        .get(&(s.node.clone(), parent.clone()))
                        .map_or("critical".to_owned(), |p| effective_status(p, &node_status))
                });
                let on = NodeState {
                    status: &node_status,
                    datacenter: inner
                        .node_datacenters
                        .get(&s.node)
                        .map_or("dc1", String::as_str),
                    maintenance: inner.node_maintenance.contains(&s.node),
                };
                entry(s, &on, alias, 0)
            })
            .filter(|entry| {
                !self.passing_only
                    || entry["Checks"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|check| check["Status"] == "passing")
            })
            .collect();
        let content = Value::Array(entries.clone()).to_string();
        let global = inner.index;
        let index = match inner.query_indexes.get(self) {
            Some((seen, index)) if *seen == content => *index,
            _ => {
                inner.query_indexes.insert(self.clone(), (content, global));
                global
            }
        };
        (entries, filtered, index)
    }
}

/// `entry` with the answer's index as its service's `ModifyIndex`.
fn indexed(mut entry: Value, index: u64) -> Value {
    entry["Service"]["ModifyIndex"] = index.into();
    entry
}

/// `GET /v1/catalog/datacenters`: every known datacenter, nearest first. Needs no ACL.
async fn catalog_datacenters(State(fake): State<Shared>) -> Response {
    fake.log("GET catalog/datacenters".to_owned());
    let datacenters = fake.inner.lock().unwrap().datacenters.clone();
    Json(datacenters).into_response()
}

/// `GET /v1/query/:name/execute`: the healthy instances (no critical check, as Consul
/// filters by default) of the query's service in the datacenter asked, else in its failover
/// datacenters in turn; the answer names the datacenter and the failovers taken. Does not
/// block. An unknown query is a 404.
async fn execute_query(
    State(fake): State<Shared>,
    axum::Extension(Caller(policy)): axum::Extension<Caller>,
    Path(name): Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let raw = raw.unwrap_or_default();
    fake.log(format!("GET query/{name}/execute?{raw}"));
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&raw).unwrap_or_default();
    let asked = pairs
        .iter()
        .find(|(k, _)| k == "dc")
        .map_or_else(|| "dc1".to_owned(), |(_, v)| v.clone());
    let Some((service, failover)) = fake.inner.lock().unwrap().prepared.get(&name).cloned() else {
        return (StatusCode::NOT_FOUND, "Query not found").into_response();
    };
    if !fake.reachable(&asked) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response();
    }
    let mut answer = (asked.clone(), Vec::new(), 0);
    for (failovers, datacenter) in std::iter::once(&asked).chain(&failover).enumerate() {
        if !fake.reachable(datacenter) {
            continue;
        }
        let query = HealthQuery {
            datacenter: datacenter.clone(),
            name: service.to_lowercase(),
            connect: false,
            tags: Vec::new(),
            filter: None,
            passing_only: false,
        };
        let entries: Vec<Value> = {
            let mut inner = fake.inner.lock().unwrap();
            fake.refresh(&mut inner);
            query.answer(&mut inner, &policy).0
        };
        let healthy: Vec<Value> = entries
            .into_iter()
            .filter(|entry| {
                let checks = entry["Checks"].as_array().cloned().unwrap_or_default();
                checks.iter().all(|check| check["Status"] != "critical")
            })
            .collect();
        answer = (datacenter.clone(), healthy, failovers);
        if !answer.1.is_empty() {
            break;
        }
    }
    let (datacenter, nodes, failovers) = answer;
    Json(json!({
        "Service": service, "Nodes": nodes, "DNS": {"TTL": ""},
        "Datacenter": datacenter, "Failovers": failovers,
    }))
    .into_response()
}

/// `caller`: the token's policy, and whether there was no token.
async fn health(
    fake: Shared,
    (policy, anonymous): (Policy, bool),
    name: String,
    raw: Option<String>,
    connect: bool,
) -> Response {
    let raw = raw.unwrap_or_default();
    let kind = if connect { "connect" } else { "service" };
    fake.log(format!("GET health/{kind}/{name}?{raw}"));
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&raw).unwrap_or_default();
    let param = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let tags: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.clone())
        .collect();
    let datacenter = param("dc").unwrap_or_else(|| "dc1".to_owned());
    if !fake.reachable(&datacenter) {
        fake.inner.lock().unwrap().answers.push((0, None));
        return (StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response();
    }
    let passing_only = param("passing").is_some_and(|p| p != "false");

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
        Some(Fault::RateLimited(after)) => {
            fake.inner.lock().unwrap().answers.push((asked, None));
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", after.clone())],
                "rate limit exceeded",
            )
                .into_response();
        }
        Some(Fault::Redirect(to)) => {
            fake.inner.lock().unwrap().answers.push((asked, None));
            return (
                StatusCode::TEMPORARY_REDIRECT,
                [("Location", to.clone())],
                "moved",
            )
                .into_response();
        }
        Some(Fault::Slow(delay)) => tokio::time::sleep(*delay).await,
        _ => {}
    }

    // Blocking query: wait until this query's index moves past the one asked, up to `wait`
    // (at most 10 minutes), plus Consul's jitter of up to wait/16.
    let wait = match param("wait").map(|w| parse_go_duration(&w)) {
        None => Duration::from_secs(300),
        Some(Some(wait)) => wait.min(MAX_WAIT),
        Some(None) => {
            fake.inner.lock().unwrap().answers.push((asked, None));
            return (StatusCode::BAD_REQUEST, "Invalid wait time").into_response();
        }
    };
    let give_up = Instant::now() + wait + jitter(wait / 16);
    let query = HealthQuery {
        datacenter: datacenter.clone(),
        name: name.to_lowercase(),
        connect,
        tags,
        filter: param("filter"),
        passing_only,
    };
    let mut changes = fake.changed.subscribe();
    let (entries, filtered, query_index) = loop {
        let (answer, next_deadline) = {
            let mut inner = fake.inner.lock().unwrap();
            let next = fake.refresh(&mut inner);
            (query.answer(&mut inner, &policy), next)
        };
        if !fake.reachable(&datacenter) {
            return (StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response();
        }
        if asked == 0 || answer.2 > asked || Instant::now() >= give_up {
            break answer;
        }
        let until = next_deadline.map_or(give_up, |d| d.min(give_up));
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep_until(until) => {}
        }
    };

    let mut inner = fake.inner.lock().unwrap();
    let (known_leader, last_contact) = match param("stale") {
        Some(_) => inner.leader,
        None => (true, Duration::ZERO),
    };
    let index = match fault {
        Some(Fault::IndexBackwards) => 1,
        Some(Fault::IndexZero) => 0,
        _ => query_index,
    };
    inner.answers.push((asked, Some(index)));
    let body = match fault {
        Some(Fault::MalformedJson) => "[{\"Node\": ".to_owned(),
        _ => Value::Array(entries.into_iter().map(|e| indexed(e, index)).collect()).to_string(),
    };
    let mut response = (
        [
            ("X-Consul-Index", index.to_string()),
            ("X-Consul-KnownLeader", known_leader.to_string()),
            ("X-Consul-LastContact", last_contact.as_millis().to_string()),
            ("Content-Type", "application/json".to_owned()),
        ],
        body,
    )
        .into_response();
    if filtered && !anonymous {
        response
            .headers_mut()
            .insert("X-Consul-Results-Filtered-By-ACLs", "true".parse().unwrap());
    }
    response
}
