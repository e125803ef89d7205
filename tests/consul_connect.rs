//! Connect-native mTLS end to end: real tonic (and hyper) servers and clients on 127.0.0.1,
//! certificates from the fake agent's rcgen CA, intentions evaluated by its authorize
//! endpoint. The real-agent variant runs with `CONSUL_HTTP_ADDR` set (`consul agent -dev`).
#![cfg(all(feature = "consul-connect", feature = "tonic", feature = "http"))]

use tower_sd_testkit as support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Empty;
use support::fake_consul::{FakeConsul, Fault};
use support::grpc::{Callers, check};
use tonic_health::pb::health_client::HealthClient;
use tower_sd::connection::ConnectionSettings;
use tower_sd::endpoint::Connectivity;
use tower_sd::http::DiscoveryLayer;
use tower_sd::mesh::ConsulConnect;
use tower_sd::registry::consul::{ConsulRegistry, MeshRegistration};
use tower_sd::tonic::LoadBalancedChannel;
use tower_sd::{Error, ServiceInstance, ServiceRegistry};

fn consul(address: &str) -> ConsulRegistry {
    ConsulRegistry::builder()
        .address(address)
        .wait(Duration::from_secs(30))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(200))
        .requests_per_second(50.0)
        .mesh_registration(MeshRegistration::Native)
        .mesh_discovery(true)
        .build()
        .unwrap()
}

async fn mesh(consul: &ConsulRegistry, service: &str) -> ConsulConnect {
    ConsulConnect::builder(consul, service)
        .build()
        .await
        .unwrap()
}

/// A Connect-native tonic health server of `service`, registered as `id`.
struct MeshServer {
    /// Connections authorized and served.
    connections: Arc<AtomicUsize>,
    /// The client certificate (DER) of each served connection, in order.
    client_certs: Arc<Mutex<Vec<Vec<u8>>>>,
    mesh: ConsulConnect,
    task: tokio::task::JoinHandle<()>,
}

impl MeshServer {
    async fn start(consul: &ConsulRegistry, service: &str, id: &str) -> Self {
        Self::start_caching(consul, service, id, Duration::from_secs(1)).await
    }

    /// With authorization answers cached for `ttl`.
    async fn start_caching(
        consul: &ConsulRegistry,
        service: &str,
        id: &str,
        ttl: Duration,
    ) -> Self {
        let mesh = ConsulConnect::builder(consul, service)
            .authorization_cache(ttl)
            .build()
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let (counted, certs) = (Arc::clone(&connections), Arc::clone(&client_certs));
        let incoming = mesh.incoming(listener).inspect(move |stream| {
            if let Ok(stream) = stream {
                counted.fetch_add(1, Ordering::SeqCst);
                let cert = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                certs.lock().unwrap().push(cert);
            }
        });
        let (_reporter, health) = tonic_health::server::health_reporter();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(incoming)
                .await;
        });
        consul
            .register(ServiceInstance::new(id, service, "127.0.0.1", port))
            .await
            .unwrap();
        Self {
            connections,
            client_certs,
            mesh,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn client_certs(&self) -> Vec<Vec<u8>> {
        self.client_certs.lock().unwrap().clone()
    }
}

impl Drop for MeshServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A channel to `service`, as the mesh identity `me`.
fn channel(consul: &ConsulRegistry, service: &str, me: &ConsulConnect) -> LoadBalancedChannel {
    LoadBalancedChannel::builder(Arc::new(consul.clone()), service)
        .tls(me.client_tls().unwrap())
        .wait_for_endpoints(Duration::from_secs(3))
        .build()
}

/// The readiness of the balancer's endpoint for instance `id` (on the fake's node).
fn state_of(channel: &LoadBalancedChannel, id: &str) -> Option<Connectivity> {
    let key = format!("{}/{id}", support::fake_consul::AGENT_NODE);
    support::grpc::connectivity(channel, &key)
}

/// An `api` server, a `web` identity calling it, and 8 callers on its channel.
struct UnderLoad {
    fake: Arc<FakeConsul>,
    consul: ConsulRegistry,
    first: MeshServer,
    web: ConsulConnect,
    channel: LoadBalancedChannel,
    callers: Callers,
}

impl UnderLoad {
    async fn start() -> Self {
        let fake = FakeConsul::start(None).await;
        let consul = consul(&fake.url());
        let first = MeshServer::start(&consul, "api", "api-1").await;
        let web = mesh(&consul, "web").await;
        let channel = channel(&consul, "api", &web);
        let callers = Callers::start(&channel, 8);
        callers.succeed(100).await;
        Self {
            fake,
            consul,
            first,
            web,
            channel,
            callers,
        }
    }

    /// Waits until `web` presents the leaf the agent has for it now.
    async fn web_has_the_agents_leaf(&self) {
        support::until("web has the agent's current leaf", || {
            self.web.leaf().map(|l| l.serial) == self.fake.leaf_serial("web")
        })
        .await;
    }

    /// Stops the callers and asserts none of their requests failed.
    async fn none_failed(self) {
        let (ok, failed) = self.callers.stop().await;
        assert!(
            failed.is_empty(),
            "{} of {ok} failed: {failed:?}",
            failed.len()
        );
    }
}

/// An allowed call succeeds over mTLS, through both integrations. Catches: a client that
/// presents no certificate (the server requires one), one that expects a DNS name in the
/// server certificate (Consul's leaves carry none), a server that skips authorization.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_call_succeeds() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    fake.set_default_allow(false);
    fake.set_intention("web", "api", true);
    let consul = consul(&fake.url());
    let server = MeshServer::start_caching(&consul, "api", "api-1", Duration::from_secs(60)).await;
    let web = mesh(&consul, "web").await;
    assert_eq!(
        web.leaf().unwrap().id.to_string(),
        support::fake_connect::spiffe("web")
    );

    let mut client = HealthClient::new(channel(&consul, "api", &web));
    for _ in 0..10 {
        check(&mut client).await.unwrap();
    }
    assert_eq!(server.connections(), 1, "one connection, authorized once");
    assert_eq!(fake.authorizations(), 1);
    assert!(
        fake.requests()
            .iter()
            .any(|r| r == "POST connect/authorize web => api: true"),
        "{:?}",
        fake.requests()
    );
    // A second connection from the same certificate: answered from the cache.
    check(&mut HealthClient::new(channel(&consul, "api", &web)))
        .await
        .unwrap();
    assert_eq!(server.connections(), 2);
    assert_eq!(
        fake.authorizations(),
        1,
        "the cached answer served the second connection"
    );

    // A client without the mesh's certificate is refused at the handshake.
    let plain = LoadBalancedChannel::builder(Arc::new(consul.clone()), "api")
        .tls(tower_sd::connection::TlsConfig::with_platform_roots().unwrap())
        .wait_for_endpoints(Duration::from_secs(1))
        .build();
    let status = check(&mut HealthClient::new(plain)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(server.connections(), 2, "the plain client was not served");
    drop(server);
}

/// A client whose certificate comes from another CA (though it trusts this one, and names
/// an allowed service) is refused at the handshake: no authorization is asked, nothing is
/// served. Catches a server that takes any certificate naming a service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_at_the_handshake() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    let server = MeshServer::start(&consul, "api", "api-1").await;
    let elsewhere = FakeConsul::start(None).await;
    elsewhere.trust_root(&fake.root_pem());
    let other_consul = ConsulRegistry::builder()
        .address(elsewhere.url())
        .build()
        .unwrap();
    let stranger = mesh(&other_consul, "web").await;
    assert_eq!(stranger.roots(), 2, "it trusts both CAs");
    let status = check(&mut HealthClient::new(channel(&consul, "api", &stranger)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(server.connections(), 0);
    assert_eq!(fake.authorizations(), 0, "refused before authorization");
}

/// The same identity over `DiscoveryLayer`'s connections, against a hyper server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_layer_takes_the_mesh_tls() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    fake.set_default_allow(false);
    fake.set_intention("web", "api", true);
    fake.set_intention("web", "admin", false);
    let consul = consul(&fake.url());
    let web = mesh(&consul, "web").await;
    for (service, id) in [("api", "api-1"), ("admin", "admin-1")] {
        let mesh = mesh(&consul, service).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut incoming = mesh.incoming(listener);
        tokio::spawn(async move {
            let _keep = mesh;
            while let Some(Ok(stream)) = incoming.next().await {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"hello")),
                    ))
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = builder.serve_connection(io, service).await;
                });
            }
        });
        consul
            .register(ServiceInstance::new(id, service, "127.0.0.1", port))
            .await
            .unwrap();
    }
    let client = DiscoveryLayer::new(Arc::new(consul.clone())).over_connections::<Empty<Bytes>>(
        ConnectionSettings::default().tls(web.client_tls().unwrap()),
    );
    let (status, body) = get(&client, "http://api/").await;
    assert_eq!((status, body.as_str()), (200, "hello"));
    let (status, body) = get(&client, "http://admin/").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("Matched L4 intention: web => admin (deny)"),
        "{body}"
    );
}

/// GETs `uri`; the status and the body.
async fn get<S, B>(client: &S, uri: &str) -> (u16, String)
where
    S: tower::Service<http::Request<Empty<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let request = http::Request::get(uri).body(Empty::new()).unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A denied call fails with `PERMISSION_DENIED` and the agent's reason, under an explicit
/// deny intention and under default deny; no connection reaches the service. Catches a
/// server that serves before (or without) asking the agent, and one that ignores a deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_call_fails_with_permission_denied() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    fake.set_intention("web", "api", false);
    let consul = consul(&fake.url());
    let server = MeshServer::start(&consul, "api", "api-1").await;
    let web = mesh(&consul, "web").await;
    let status = check(&mut HealthClient::new(channel(&consul, "api", &web)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("Matched L4 intention: web => api (deny)"),
        "{status:?}"
    );

    // No intention for `billing`, default deny.
    fake.set_default_allow(false);
    let billing = mesh(&consul, "billing").await;
    let status = check(&mut HealthClient::new(channel(&consul, "api", &billing)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("Default behavior"), "{status:?}");
    assert_eq!(server.connections(), 0, "nothing was served");

    // A wildcard allow for the destination opens it to everyone.
    fake.set_intention("*", "api", true);
    tokio::time::sleep(Duration::from_millis(1_100)).await; // past the 1 s cache
    check(&mut HealthClient::new(channel(&consul, "api", &billing)))
        .await
        .unwrap();
    assert_eq!(server.connections(), 1);
    // ...except where an exact intention says otherwise: web's deny is more precise.
    let status = check(&mut HealthClient::new(channel(&consul, "api", &web)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

/// A server whose certificate names another service is rejected by the client's SPIFFE
/// check, though its chain is valid. Catches a client that checks only the chain (or the
/// DNS name, which Consul's leaves do not carry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_naming_another_service_is_rejected() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    fake.impersonate("api", "billing");
    let consul = consul(&fake.url());
    let server = MeshServer::start(&consul, "api", "api-1").await;
    let web = mesh(&consul, "web").await;
    let channel = channel(&consul, "api", &web);
    let status = check(&mut HealthClient::new(channel.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(server.connections(), 0);
    assert_eq!(
        fake.authorizations(),
        0,
        "the client gave up before the server asked"
    );
    assert_ne!(state_of(&channel, "api-1"), Some(Connectivity::Ready));
    assert!(
        status.message().contains("svc/billing")
            && status
                .message()
                .contains("spiffe://*/ns/default/dc/dc1/svc/api"),
        "the failure names what the certificate says and what was expected: {status:?}"
    );
}

/// Leaf rotations of both sides under load from 8 callers fail no request; open
/// connections stay (the server still has its one connection), and a new connection
/// presents the new leaf. Catches a rotation that drops connections, and a client that
/// keeps presenting the certificate it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_rotation_under_load_fails_no_request() {
    let _limit = support::time_limit(120);
    let load = UnderLoad::start().await;
    let (fake, web) = (&load.fake, &load.web);
    let started_with = web.leaf().unwrap().serial;
    for _ in 0..3 {
        fake.rotate_leaf("web");
        fake.rotate_leaf("api");
        load.web_has_the_agents_leaf().await;
        support::until("api has the agent's current leaf", || {
            load.first.mesh.leaf().map(|l| l.serial) == fake.leaf_serial("api")
        })
        .await;
        load.callers.succeed(200).await;
    }
    assert_ne!(web.leaf().unwrap().serial, started_with);
    assert_eq!(load.first.connections(), 1, "the open connection was kept");

    // A new instance: the new connection presents the rotated leaf.
    let second = MeshServer::start(&load.consul, "api", "api-2").await;
    support::until("the new instance serves", || second.connections() == 1).await;
    load.callers.succeed(200).await;
    assert_ne!(
        load.first.client_certs()[0],
        second.client_certs()[0],
        "the new connection presented the new leaf"
    );
    load.none_failed().await;
}

/// A root rotation with cross-signing keeps working while one side still trusts only the
/// old root (the roots answer is frozen at the old set): new leaves carry the new root
/// cross-signed by the old one. Without cross-signing, the same new instance never
/// connects, which shows the test can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_with_cross_signing_keeps_working() {
    let _limit = support::time_limit(120);
    let load = UnderLoad::start().await;
    let (fake, web, channel) = (&load.fake, &load.web, &load.channel);

    fake.freeze_roots(true);
    fake.rotate_root(true);
    load.web_has_the_agents_leaf().await;
    assert_eq!(web.roots(), 1, "the client still trusts only the old root");
    // A new instance with a leaf from the new root and the old roots.
    let second = MeshServer::start(&load.consul, "api", "api-2").await;
    support::until("the new instance takes traffic", || {
        second.connections() == 1
    })
    .await;
    load.callers.succeed(200).await;
    assert_eq!(state_of(channel, "api-2"), Some(Connectivity::Ready));

    // The roots catch up: both roots trusted, still working.
    fake.freeze_roots(false);
    support::until("the client trusts both roots", || web.roots() == 2).await;
    load.callers.succeed(200).await;

    // The control: a rotation without cross-signing, seen by nobody's roots yet.
    fake.freeze_roots(true);
    fake.rotate_root(false);
    load.web_has_the_agents_leaf().await;
    let third = MeshServer::start(&load.consul, "api", "api-3").await;
    support::until("the client tried the new instance and failed", || {
        state_of(channel, "api-3") == Some(Connectivity::TransientFailure)
    })
    .await;
    assert_eq!(third.connections(), 0, "no chain to a trusted root");
    drop(second);
    load.none_failed().await;
}

/// The leaf is asked for again before it expires even when the agent's blocking query
/// would not return: with a 20 s leaf (valid from 2 s back) and a 30 s wait, the next leaf
/// query comes at nine tenths of the lifetime, about 17.8 s after issue, before ValidBefore.
/// Catches a client that blocks for the full wait (30 s), and one that polls instead of
/// blocking (a query within 15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaf_is_asked_for_again_before_it_expires() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    fake.set_leaf_lifetime(Duration::from_secs(20));
    fake.set_leaf_renewal(false);
    let consul = consul(&fake.url());
    let issued = tokio::time::Instant::now();
    let web = mesh(&consul, "web").await;
    let expires = web.leaf().unwrap().not_after;
    let leaf_queries = || {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("GET connect/ca/leaf/web"))
            .count()
    };
    // The first query, the blocking one, then the one its end makes.
    while leaf_queries() < 3 {
        assert!(
            issued.elapsed() < Duration::from_secs(25),
            "no third leaf query"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = issued.elapsed();
    assert!(
        std::time::SystemTime::now() < expires,
        "asked again before ValidBefore"
    );
    assert!(
        asked >= Duration::from_secs(15),
        "blocked until the renewal point: {asked:?}"
    );
}

/// An agent that is down at start, or a token that may not fetch the leaf, is a typed
/// error within the limit, not a hang.
#[tokio::test]
async fn an_agent_down_at_start_is_a_typed_error() {
    let _limit = support::time_limit(30);
    let closed = support::process::ClosedPort::bound();
    let down = consul(&format!("127.0.0.1:{}", closed.port));
    let error = ConsulConnect::builder(&down, "web")
        .certificates_within(Duration::from_secs(2))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Unreachable {
                registry: "consul",
                ..
            }
        ),
        "{error:?}"
    );

    let fake = FakeConsul::start(Some("management")).await;
    fake.add_token(
        "reader",
        support::fake_consul::Policy {
            read: vec!["*".to_owned()],
            write: false,
        },
    );
    let reader = ConsulRegistry::builder()
        .address(fake.url())
        .token("reader")
        .build()
        .unwrap();
    let error = ConsulConnect::builder(&reader, "web")
        .certificates_within(Duration::from_secs(2))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Status { status: 403, .. }),
        "{error:?}"
    );
    assert!(
        !format!("{error:?}").contains("reader"),
        "the token stays out of errors"
    );
}

/// Every background task stops: dropping `Incoming` closes the listener, and dropping the
/// last handle (with no TLS configuration made from it alive) stops the refresh. Catches
/// tasks that outlive what started them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handles_stops_the_tasks() {
    let _limit = support::time_limit(30);
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    let api = mesh(&consul, "api").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let incoming = api.incoming(listener);
    tokio::net::TcpStream::connect(address).await.unwrap();
    drop(incoming);
    support::until_async("the listener is closed", || async {
        tokio::net::TcpStream::connect(address).await.is_err()
    })
    .await;

    let tls = api.client_tls().unwrap();
    drop(api);
    let leaf_queries = || {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("GET connect/ca/leaf/api"))
            .count()
    };
    fake.rotate_leaf("api");
    support::until("a TLS configuration keeps the refresh going", || {
        leaf_queries() >= 3
    })
    .await;
    drop(tls);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = leaf_queries();
    fake.rotate_leaf("api");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        leaf_queries(),
        before,
        "the refresh stopped with the last user"
    );
}

/// The allowed call against a real agent (`consul agent -dev`, Connect on, ACLs off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Consul agent: CONSUL_HTTP_ADDR=127.0.0.1:8500 cargo test --all-features --test consul_connect -- --ignored"]
async fn an_allowed_call_against_a_real_agent() {
    let _limit = support::time_limit(60);
    let address = std::env::var("CONSUL_HTTP_ADDR").expect("CONSUL_HTTP_ADDR");
    let consul = consul(&address);
    let server = MeshServer::start(&consul, "tower-sd-api", "tower-sd-api-1").await;
    let web = mesh(&consul, "tower-sd-web").await;
    let mut client = HealthClient::new(channel(&consul, "tower-sd-api", &web));
    let result = check(&mut client).await;
    consul.deregister("tower-sd-api-1").await.unwrap();
    result.unwrap();
    assert_eq!(server.connections(), 1);
}

/// A stand-in for an Envoy sidecar in front of a `tcp` service (Consul's default protocol):
/// it terminates the mesh's mTLS with the service's leaf, negotiating no ALPN, and passes
/// the bytes to a plain tonic server.
async fn sidecar(consul: &ConsulRegistry, service: &str) -> tokio::task::JoinHandle<()> {
    let identity = mesh(consul, service).await;
    let mut config = (*identity.server_config().unwrap()).clone();
    config.alpn_protocols.clear();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = support::servers::TestServer::grpc("app").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    consul
        .register(ServiceInstance::new("sidecar", service, "127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _identity = identity;
        let _app = &app;
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app_port) = (acceptor.clone(), app.port);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut upstream = tokio::net::TcpStream::connect(("127.0.0.1", app_port))
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    })
}

/// Catches a mesh client that refuses a sidecar negotiating no ALPN (Envoy does for `tcp`
/// services, Consul's default protocol, whose bytes it passes through as they are): the
/// call must succeed over HTTP/2. Without `http2_without_alpn`, the dial fails with an
/// error that names the Consul setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_of_a_tcp_service_is_reached_over_http2_without_alpn() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    let _tcp = sidecar(&consul, "api").await;
    let web = mesh(&consul, "web").await;
    let mut client = HealthClient::new(channel(&consul, "api", &web));
    for _ in 0..3 {
        check(&mut client).await.unwrap();
    }

    let strict = LoadBalancedChannel::builder(Arc::new(consul.clone()), "api")
        .tls(web.client_tls().unwrap().http2_without_alpn(false))
        .wait_for_endpoints(Duration::from_secs(1))
        .build();
    let status = check(&mut HealthClient::new(strict)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("it chose none") && status.message().contains("service-defaults"),
        "{status:?}"
    );
}

/// Catches an accept loop that silent sockets can fill: 1,100 TCP connections that never
/// start their TLS handshake (more than the 1,024 handshakes the loop used to hold, for
/// 10 s each) must not keep a valid client out: its call succeeds at once, each newcomer
/// taking the place of the oldest silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_sockets_do_not_keep_a_client_out() {
    let _limit = support::time_limit(60);
    assert!(
        support::raise_fd_limit(4096),
        "this test needs 4,096 open files"
    );
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    let server = MeshServer::start(&consul, "api", "api-1").await;
    let port = consul.discover(&"api".into()).await.unwrap()[0].port;
    let mut silent = Vec::new();
    for _ in 0..1_100 {
        let socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        silent.push(socket.unwrap());
    }
    let web = mesh(&consul, "web").await;
    let mut client = HealthClient::new(channel(&consul, "api", &web));
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), check(&mut client))
        .await
        .expect("the valid client got in within 3 s")
        .unwrap();
    assert_eq!(server.connections(), 1);
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(silent);
}

/// Catches a server that fails open: while the agent's authorize endpoint fails (500) or
/// answers later than the request timeout, calls fail `UNAVAILABLE` and no connection is
/// served; the failures are not cached, so once the agent answers, calls go through. The
/// fake requires `ClientCertSerial`, colon-hex, as the docs do: the library sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_authorize_fails_closed() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    let impatient = ConsulRegistry::builder()
        .address(fake.url())
        .request_timeout(Duration::from_millis(500))
        .mesh_registration(MeshRegistration::Native)
        .mesh_discovery(true)
        .build()
        .unwrap();
    let server = MeshServer::start(&impatient, "api", "api-1").await;
    let web = mesh(&consul, "web").await;
    for fault in [Fault::Status(500), Fault::Slow(Duration::from_secs(2))] {
        fake.set_authorize_fault(Some(fault.clone()));
        let status = check(&mut HealthClient::new(channel(&consul, "api", &web)))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "{fault:?}: {status:?}"
        );
        assert_eq!(server.connections(), 0, "{fault:?}: nothing served");
    }
    fake.set_authorize_fault(None);
    check(&mut HealthClient::new(channel(&consul, "api", &web)))
        .await
        .unwrap();
    assert_eq!(server.connections(), 1);
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.starts_with("POST connect/authorize web => api")),
        "the agent answered once the fault was gone"
    );
}

/// Catches a server checked against the caller's datacenter instead of the instance's
/// (#33 item 9): when Consul places the instance in dc2, its server must say dc2; this
/// one's leaf says dc1, so the call is refused at the handshake, and goes through once the
/// instance is back in dc1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_must_name_the_datacenter_of_the_instance_dialled() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    let server = MeshServer::start(&consul, "api", "api-1").await;
    let web = mesh(&consul, "web").await;
    fake.set_datacenters(&["dc1", "dc2"]);
    fake.set_node_datacenter(support::fake_consul::AGENT_NODE, "dc2");
    let api_in_dc2 = tower_sd::ServiceQuery::new("api").with_datacenter("dc2");
    let instance = consul.discover(&api_in_dc2).await.unwrap().remove(0);
    assert_eq!(instance.metadata["consul-datacenter"], "dc2");
    let in_dc2 = LoadBalancedChannel::builder(Arc::new(consul.clone()), api_in_dc2)
        .tls(web.client_tls().unwrap())
        .wait_for_endpoints(Duration::from_secs(1))
        .build();
    let status = check(&mut HealthClient::new(in_dc2)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("dc2"), "{status:?}");
    assert_eq!(server.connections(), 0, "refused before any request");

    fake.set_node_datacenter(support::fake_consul::AGENT_NODE, "dc1");
    check(&mut HealthClient::new(channel(&consul, "api", &web)))
        .await
        .unwrap();
    assert_eq!(server.connections(), 1);
}

/// Catches a service-name check that needs both of its faults to refuse (`||` taken for
/// `&&`), and an identity that does not say which service it is.
#[tokio::test]
async fn a_bad_service_name_is_refused_and_an_identity_names_its_service() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    for bad in ["", "a/b"] {
        let error = ConsulConnect::builder(&consul, bad)
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::InvalidConfig { key, .. } if key == "service"),
            "{bad:?}: {error:?}"
        );
    }
    assert_eq!(mesh(&consul, "web").await.service(), "web");
}

/// Catches an accept loop that outlives its `Incoming`: once it is dropped, the listener is
/// closed and connections are refused (a loop left running would hold the port and take
/// them, answering none).
#[tokio::test]
async fn dropping_incoming_stops_accepting() {
    let _limit = support::time_limit(60);
    let fake = FakeConsul::start(None).await;
    let consul = consul(&fake.url());
    let api = mesh(&consul, "api").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let incoming = api.incoming(listener);
    tokio::net::TcpStream::connect(address)
        .await
        .expect("accepting while it lives");
    drop(incoming);
    support::until_async("the port is closed", || async {
        tokio::net::TcpStream::connect(address).await.is_err()
    })
    .await;
}
