//! A fake Kubernetes API server on 127.0.0.1 that serves EndpointSlices
//! (`discovery.k8s.io/v1`) the way kube-apiserver does:
//!
//! - list: `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...`
//!   answers an `EndpointSliceList` whose `metadata.resourceVersion` is the store's;
//! - watch: the same path with `watch=true&resourceVersion=N` streams one JSON event a line
//!   (`ADDED`, `MODIFIED`, `DELETED` with the object's new `resourceVersion`, `BOOKMARK` when
//!   `allowWatchBookmarks=true`), replaying every event after `N`, filtered as the watch
//!   cache filters: an object that enters the selector is `ADDED`, one that leaves it
//!   `DELETED` (its previous content at the event's version); with no `resourceVersion` or
//!   `0`, the current objects come first as synthetic `ADDED` events, not the history; a
//!   `resourceVersion` older than the compaction point answers an `ERROR` event carrying a
//!   410 `Expired` `Status` and ends the stream, as does [`FakeKube::expire_watches`] on a
//!   live watch; `timeoutSeconds` ends a stream, and so does [`FakeKube::close_watches`];
//! - errors are `Status` objects with the HTTP code (`403 Forbidden` from
//!   [`FakeKube::forbid`], for watches only from [`FakeKube::forbid_watch`]: `list` and
//!   `watch` are separate RBAC verbs); [`FakeKube::stall`] leaves lists unanswered.
//!
//! - lists come in pages with `limit`, `metadata.continue` naming the rest; a continue token
//!   from before [`FakeKube::expire_continue_tokens`] is a 410 `Expired`.
//!
//! Not modelled: field selectors, other kinds.
//!
//! Label selectors support `k=v`, `k==v`, `k!=v` and `k` (exists), comma-separated.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::watch;

const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices";

struct Event {
    version: u64,
    namespace: String,
    kind: &'static str,
    object: Value,
    /// The object before this change (for a `MODIFIED`), to tell a watch whose selector it
    /// left or entered.
    previous: Option<Value>,
}

#[derive(Default)]
struct Inner {
    /// (namespace, name) -> object, with its `metadata.resourceVersion`.
    objects: BTreeMap<(String, String), Value>,
    version: u64,
    events: Vec<Event>,
    /// Watches from a version below this are answered with 410.
    compacted: u64,
    /// Bumped to end live watches with a 410 (`expired`) or cleanly (`closed`).
    expired: u64,
    closed: u64,
    bookmarks: u64,
    /// `BOOKMARK` events actually sent on watch streams.
    bookmarks_sent: u64,
    /// Continue tokens from before this version are expired (410).
    continue_floor: u64,
    /// The verbs RBAC refuses (`list`, `watch`).
    forbidden: Vec<&'static str>,
    stalled: bool,
    requests: Vec<String>,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

type Shared = Arc<FakeKube>;

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    label_selector: Option<String>,
    watch: Option<bool>,
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
    allow_watch_bookmarks: Option<bool>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

impl FakeKube {
    pub async fn start() -> Shared {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(FakeKube {
            addr: listener.local_addr().unwrap(),
            inner: Mutex::new(Inner {
                version: 100,
                ..Inner::default()
            }),
            changed: watch::Sender::new(0),
            task: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route(PATH, get(endpoint_slices))
            .with_state(Arc::clone(&fake));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *fake.task.lock().unwrap() = Some(task);
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server, with `default` as its namespace.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().unwrap());
        config.read_timeout = Some(Duration::from_secs(30));
        kube::Client::try_from(config).unwrap()
    }

    /// A registry builder over this server: namespace `default`, quick retries.
    pub fn registry(&self) -> tower_sd::registry::kubernetes::KubernetesRegistryBuilder {
        tower_sd::registry::kubernetes::KubernetesRegistry::builder()
            .client(self.client())
            .namespace("default")
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
    }

    pub fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Creates or replaces a slice (`metadata.namespace` defaults to `default`).
    pub fn apply(&self, mut slice: Value) {
        let mut inner = self.inner.lock().unwrap();
        let namespace = slice["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = slice["metadata"]["name"].as_str().unwrap().to_owned();
        inner.version += 1;
        let version = inner.version;
        slice["metadata"]["namespace"] = json!(namespace);
        slice["metadata"]["resourceVersion"] = json!(version.to_string());
        let previous = inner
            .objects
            .insert((namespace.clone(), name), slice.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.events.push(Event {
            version,
            namespace,
            kind,
            object: slice,
            previous,
        });
        self.bump(&inner);
    }

    pub fn delete(&self, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        let Some(mut object) = inner
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        inner.version += 1;
        object["metadata"]["resourceVersion"] = json!(inner.version.to_string());
        let version = inner.version;
        inner.events.push(Event {
            version,
            namespace: namespace.to_owned(),
            kind: "DELETED",
            object,
            previous: None,
        });
        self.bump(&inner);
    }

    /// Compacts history: every version up to now is too old to watch from, and live watches
    /// receive a 410 `ERROR` event (before any change made after this call) and end.
    pub fn expire_watches(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.compacted = inner.version;
        inner.expired += 1;
        self.bump(&inner);
    }

    /// Expires every continue token handed out so far: the next page of a list in progress
    /// is a 410, as after etcd compacted the version the list was reading.
    pub fn expire_continue_tokens(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.continue_floor = inner.version + 1;
    }

    /// Ends live watch streams cleanly, as `timeoutSeconds` would.
    pub fn close_watches(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.closed += 1;
        self.bump(&inner);
    }

    /// Sends a `BOOKMARK` on live watches that asked for them.
    pub fn bookmark(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.bookmarks += 1;
        self.bump(&inner);
    }

    /// `BOOKMARK` events sent so far (to watches that asked for them).
    pub fn bookmarks_sent(&self) -> u64 {
        self.inner.lock().unwrap().bookmarks_sent
    }

    /// Never answers list requests while `true`, as an overloaded API server might.
    pub fn stall(&self, stalled: bool) {
        self.inner.lock().unwrap().stalled = stalled;
    }

    /// Answers every request with 403 Forbidden while `true`, as RBAC would.
    pub fn forbid(&self, forbidden: bool) {
        self.inner.lock().unwrap().forbidden = if forbidden {
            vec!["list", "watch"]
        } else {
            Vec::new()
        };
    }

    /// Refuses watches (403) but not lists, as a Role granting `list` without `watch` does.
    pub fn forbid_watch(&self, forbidden: bool) {
        self.inner.lock().unwrap().forbidden = if forbidden { vec!["watch"] } else { Vec::new() };
    }

    /// Requests seen, as `list` or `watch rv=N`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Waits until `n` watch requests have arrived (the last one is then live).
    pub async fn watching(&self, n: usize) {
        let watches = || {
            self.requests()
                .iter()
                .filter(|r| r.starts_with("watch"))
                .count()
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while watches() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the client watches");
    }

    pub fn lists(&self) -> usize {
        self.requests().iter().filter(|r| *r == "list").count()
    }

    fn bump(&self, inner: &Inner) {
        self.changed
            .send_replace(inner.version + inner.expired + inner.closed + inner.bookmarks);
    }
}

async fn endpoint_slices(
    State(fake): State<Shared>,
    Path(namespace): Path<String>,
    Query(params): Query<Params>,
) -> Response {
    let selector = match Selector::parse(params.label_selector.as_deref().unwrap_or("")) {
        Ok(selector) => selector,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let watch = params.watch.unwrap_or(false);
    let stalled = {
        let mut inner = fake.inner.lock().unwrap();
        let line = match (&params.resource_version, watch) {
            (Some(rv), true) => format!("watch rv={rv}"),
            (None, true) => "watch".to_owned(),
            (_, false) => "list".to_owned(),
        };
        inner.requests.push(line);
        let verb = if watch { "watch" } else { "list" };
        if inner.forbidden.contains(&verb) {
            let message = format!(
                "endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:{namespace}:client\" cannot {verb} resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"{namespace}\"",
            );
            return status(StatusCode::FORBIDDEN, "Forbidden", &message);
        }
        inner.stalled && !watch
    };
    if stalled {
        std::future::pending::<()>().await;
    }
    if watch {
        // "0" or none: start from the current state, sent as synthetic ADDED events, not
        // from the beginning of history (kube-apiserver's watch semantics).
        let from = params
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse().ok())
            .filter(|rv| *rv != 0);
        let timeout = Duration::from_secs(params.timeout_seconds.unwrap_or(1800));
        let bookmarks = params.allow_watch_bookmarks.unwrap_or(false);
        return watch_stream(fake, namespace, selector, from, timeout, bookmarks);
    }
    let inner = fake.inner.lock().unwrap();
    // Pages: `limit` items from after the continue token's key, the token naming the version
    // the list reads (kube-apiserver's are opaque; these are `<version>/<namespace>/<name>`).
    let after = match params.continue_token.as_deref().map(parse_continue) {
        None => None,
        Some(Some((version, key))) if version >= inner.continue_floor => Some(key),
        Some(Some(_)) => {
            let message = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.";
            return status(StatusCode::GONE, "Expired", message);
        }
        Some(None) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid continue token",
            );
        }
    };
    let matching = inner
        .objects
        .iter()
        .filter(|((ns, _), object)| *ns == namespace && selector.matches(object));
    let mut items: Vec<(&(String, String), &Value)> = matching
        .filter(|(key, _)| after.as_ref().is_none_or(|after| *key > after))
        .collect();
    let rest = params
        .limit
        .filter(|limit| *limit > 0 && items.len() > *limit)
        .map(|limit| {
            let rest = items.len() - limit;
            items.truncate(limit);
            rest
        });
    let mut metadata = json!({ "resourceVersion": inner.version.to_string() });
    if let (Some(rest), Some(((ns, name), _))) = (rest, items.last()) {
        metadata["continue"] = json!(format!("{}/{ns}/{name}", inner.version));
        metadata["remainingItemCount"] = json!(rest);
    }
    let items: Vec<Value> = items
        .into_iter()
        .map(|(_, object)| {
            let mut item = object.clone();
            // Items of a typed list carry no kind or apiVersion.
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    axum::Json(json!({
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": metadata,
        "items": items,
    }))
    .into_response()
}

/// A continue token's version and the key after which the next page starts.
fn parse_continue(token: &str) -> Option<(u64, (String, String))> {
    let mut parts = token.splitn(3, '/');
    let version = parts.next()?.parse().ok()?;
    let (namespace, name) = (parts.next()?, parts.next()?);
    Some((version, (namespace.to_owned(), name.to_owned())))
}

/// A watch event line for `object`, with the kind and version a typed object carries.
fn event_line(kind: &str, mut object: Value) -> Value {
    object["kind"] = json!("EndpointSlice");
    object["apiVersion"] = json!("discovery.k8s.io/v1");
    json!({ "type": kind, "object": object })
}

/// A `Status` error response, as kube-apiserver sends it.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        axum::Json(status_object(code.as_u16(), reason, message)),
    )
        .into_response()
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

struct WatchState {
    fake: Shared,
    namespace: String,
    selector: Selector,
    /// The synthetic `ADDED` events of a watch from the current state, sent first.
    initial: VecDeque<Value>,
    sent: u64,
    expired: u64,
    closed: u64,
    bookmarks: u64,
    allow_bookmarks: bool,
    deadline: tokio::time::Instant,
    changed: watch::Receiver<u64>,
    done: bool,
}

fn watch_stream(
    fake: Shared,
    namespace: String,
    selector: Selector,
    from: Option<u64>,
    timeout: Duration,
    allow_bookmarks: bool,
) -> Response {
    let (expired, closed, bookmarks, from, initial) = {
        let inner = fake.inner.lock().unwrap();
        let initial: VecDeque<Value> = match from {
            Some(_) => VecDeque::new(),
            None => inner
                .objects
                .iter()
                .filter(|((ns, _), object)| *ns == namespace && selector.matches(object))
                .map(|(_, object)| event_line("ADDED", object.clone()))
                .collect(),
        };
        let from = from.unwrap_or(inner.version);
        (inner.expired, inner.closed, inner.bookmarks, from, initial)
    };
    let state = WatchState {
        changed: fake.changed.subscribe(),
        fake,
        namespace,
        selector,
        initial,
        sent: from,
        expired,
        closed,
        bookmarks,
        allow_bookmarks,
        deadline: tokio::time::Instant::now() + timeout,
        done: false,
    };
    let lines = futures_util::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            state.changed.mark_unchanged();
            if let Some(line) = state.next_line() {
                let mut bytes = serde_json::to_vec(&line).unwrap();
                bytes.push(b'\n');
                return Some((Ok::<_, Infallible>(Bytes::from(bytes)), state));
            }
            if state.done {
                return None;
            }
            let wait = tokio::time::timeout_at(state.deadline, state.changed.changed()).await;
            if !matches!(wait, Ok(Ok(()))) {
                return None;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(lines))
        .unwrap()
}

impl WatchState {
    /// The next event line to send, if any; sets `done` when the stream must end.
    fn next_line(&mut self) -> Option<Value> {
        if let Some(line) = self.initial.pop_front() {
            return Some(line);
        }
        let mut inner = self.fake.inner.lock().unwrap();
        if self.sent < inner.compacted || inner.expired != self.expired {
            self.done = true;
            let message = format!(
                "too old resource version: {} ({})",
                self.sent, inner.compacted
            );
            return Some(json!({
                "type": "ERROR",
                "object": status_object(410, "Expired", &message),
            }));
        }
        if inner.closed != self.closed {
            self.done = true;
            return None;
        }
        // As the watch cache filters: an object that entered the selector is ADDED, one
        // that left it DELETED (its previous content, at the event's version).
        let selector = &self.selector;
        let seen = |object: &Option<Value>| object.as_ref().is_some_and(|o| selector.matches(o));
        let next = inner
            .events
            .iter()
            .filter(|e| e.version > self.sent && e.namespace == self.namespace)
            .find_map(|e| {
                let now = e.kind != "DELETED" && selector.matches(&e.object);
                let before = if e.kind == "DELETED" {
                    selector.matches(&e.object)
                } else {
                    seen(&e.previous)
                };
                let line = match (before, now) {
                    (false, true) => event_line("ADDED", e.object.clone()),
                    (true, true) => event_line(e.kind, e.object.clone()),
                    (true, false) => {
                        let mut gone = e.previous.clone().unwrap_or_else(|| e.object.clone());
                        gone["metadata"]["resourceVersion"] = json!(e.version.to_string());
                        event_line("DELETED", gone)
                    }
                    (false, false) => return None,
                };
                Some((e.version, line))
            });
        // Versions skipped by the filter are passed too.
        let last = inner
            .events
            .iter()
            .filter(|e| e.version > self.sent)
            .map(|e| e.version)
            .max();
        if let Some((version, line)) = next {
            self.sent = version;
            return Some(line);
        }
        if let Some(last) = last {
            self.sent = last;
        }
        if inner.bookmarks != self.bookmarks {
            self.bookmarks = inner.bookmarks;
            if self.allow_bookmarks {
                self.sent = self.sent.max(inner.version);
                inner.bookmarks_sent += 1;
                return Some(json!({
                    "type": "BOOKMARK",
                    "object": {
                        "kind": "EndpointSlice",
                        "apiVersion": "discovery.k8s.io/v1",
                        "metadata": { "resourceVersion": self.sent.to_string() },
                    },
                }));
            }
        }
        None
    }
}

/// A parsed label selector.
#[derive(Debug, Default)]
struct Selector(Vec<(String, Requirement)>);

#[derive(Debug)]
enum Requirement {
    Equals(String),
    NotEquals(String),
    Exists,
}

impl Selector {
    fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((key, value)) = part.split_once("!=") {
                (key, Requirement::NotEquals(value.trim().to_owned()))
            } else if let Some((key, value)) = part.split_once("==") {
                (key, Requirement::Equals(value.trim().to_owned()))
            } else if let Some((key, value)) = part.split_once('=') {
                (key, Requirement::Equals(value.trim().to_owned()))
            } else {
                (part, Requirement::Exists)
            };
            let key = requirement.0.trim();
            if key.is_empty() || key.contains(' ') {
                return Err(format!("unable to parse requirement: {part:?}"));
            }
            requirements.push((key.to_owned(), requirement.1));
        }
        Ok(Self(requirements))
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.0.iter().all(|(key, requirement)| {
            let value = labels.get(key).and_then(Value::as_str);
            match requirement {
                Requirement::Equals(wanted) => value == Some(wanted.as_str()),
                Requirement::NotEquals(unwanted) => value != Some(unwanted.as_str()),
                Requirement::Exists => value.is_some(),
            }
        })
    }
}
