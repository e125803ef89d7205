//! nginx (Debian's `nginx-light`) as an HTTP/2 server on a free loopback port, h2c or TLS
//! (or HTTP/1.1), with a configuration written per test: `keepalive_requests` (after which
//! nginx closes a connection with GOAWAY), `http2_max_concurrent_streams`, and what a
//! location answers (`return 200`, or `grpc_pass` to a gRPC server, so gRPC calls go
//! through nginx's own HTTP/2 stack). Two switches, files nginx looks for on each request,
//! make it fail every request with 503, or only `/healthz` (which answers 200 otherwise).
//!
//! Its access log is what the server saw: one line per request with its connection's serial
//! number, the request's number on that connection, the status, `$host`, the protocol and
//! the path.

use std::process::Command;
use std::time::Duration;

use super::pki::Leaf;
use super::process::{START_ATTEMPTS, Server, free_port, have, scratch_dir};

/// What an nginx test server does.
#[derive(Clone, Debug)]
pub struct Config {
    /// Requests per connection before nginx sends GOAWAY (its default is 1000).
    pub keepalive_requests: u32,
    /// `http2_max_concurrent_streams` (its default is 128).
    pub max_streams: u32,
    /// The location's body: `return 200 "ok";`, `grpc_pass grpc://...;`.
    pub location: String,
    /// Serve TLS with this certificate (ALPN `h2`), instead of h2c.
    pub tls: Option<(String, String)>,
    /// Serve HTTP/1.1 instead of h2c (plain TCP only).
    pub http1: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            keepalive_requests: 1000,
            max_streams: 128,
            location: "return 200 \"ok\";".into(),
            tls: None,
            http1: false,
        }
    }
}

impl Config {
    /// Passes every request to the gRPC server on 127.0.0.1:`port` (h2c).
    pub fn grpc_pass(port: u16) -> Self {
        Self {
            location: format!("grpc_pass grpc://127.0.0.1:{port};"),
            ..Self::default()
        }
    }

    #[must_use]
    pub fn keepalive_requests(mut self, requests: u32) -> Self {
        self.keepalive_requests = requests;
        self
    }

    #[must_use]
    pub fn max_streams(mut self, streams: u32) -> Self {
        self.max_streams = streams;
        self
    }

    /// Serves HTTP/1.1 (plain TCP) instead of h2c.
    #[must_use]
    pub fn http1(mut self) -> Self {
        self.http1 = true;
        self
    }

    #[must_use]
    pub fn tls(mut self, leaf: &Leaf) -> Self {
        self.tls = Some((leaf.cert_pem.clone(), leaf.key_pem.clone()));
        self
    }
}

/// One request as nginx logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// The connection's serial number.
    pub connection: u64,
    /// The request's number on its connection (1 for the first).
    pub request: u64,
    pub status: u16,
    /// `$host`: from `:authority` (nginx answers 400 to an HTTP/2 request that also has a
    /// `Host` header).
    pub host: String,
    pub protocol: String,
    /// `$uri`: the path.
    pub path: String,
}

pub struct Nginx {
    pub port: u16,
    server: Server,
}

impl Nginx {
    /// Starts nginx with `config`; `None` (after saying why) when it is not installed.
    pub async fn start(config: &Config) -> Option<Self> {
        if !have("nginx", "nginx-light") {
            return None;
        }
        let dir = scratch_dir("nginx");
        let mut server = Server::stopped(&dir);
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let file = dir.join("nginx.conf");
            std::fs::write(&file, render(config, port, &dir)).unwrap();
            server.respawn(
                Command::new("nginx")
                    .arg("-p")
                    .arg(&dir)
                    .arg("-c")
                    .arg(&file)
                    .args(["-e", "stderr"]),
            );
            if server.accepts_on(port).await {
                return Some(Self { port, server });
            }
            let log = server.log();
            assert!(
                log.contains("Address already in use"),
                "nginx did not start:\n{log}"
            );
        }
        panic!("nginx found no free port in {START_ATTEMPTS} attempts");
    }

    /// Every request nginx has logged so far.
    pub fn requests(&self) -> Vec<Logged> {
        let log = std::fs::read_to_string(self.server.dir.join("access.log")).unwrap_or_default();
        log.lines()
            .map(|line| {
                let mut fields = line.split(' ');
                let mut next = || fields.next().unwrap_or_default().to_owned();
                Logged {
                    connection: next().parse().unwrap_or_default(),
                    request: next().parse().unwrap_or_default(),
                    status: next().parse().unwrap_or_default(),
                    host: next(),
                    protocol: next(),
                    path: next(),
                }
            })
            .collect()
    }

    /// The first `count` requests nginx logs, once it has logged them: nginx writes a
    /// request's line after it sent the answer, so a client may read the answer first.
    pub async fn logged(&self, count: usize) -> Vec<Logged> {
        crate::until("nginx logs the requests", || self.requests().len() >= count).await;
        self.requests()
    }

    /// Makes every request but `/healthz` answer 503 (`true`) or as configured (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.switch("failing", failing);
    }

    /// Makes `/healthz` answer 503 (`true`) or 200 (`false`, the start).
    pub fn set_unhealthy(&self, unhealthy: bool) {
        self.switch("unhealthy", unhealthy);
    }

    /// nginx tests for the file on each request (`if (-f ...)`).
    fn switch(&self, name: &str, on: bool) {
        let file = self.server.dir.join(name);
        if on {
            std::fs::write(file, "").unwrap();
        } else {
            let _ = std::fs::remove_file(file);
        }
    }

    /// The requests for `path` nginx has logged so far.
    pub fn requests_for(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.path == path).count()
    }

    /// The connections that carried requests.
    pub fn connections(&self) -> usize {
        let mut seen: Vec<u64> = self.requests().iter().map(|r| r.connection).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// nginx's own log, for failure messages.
    pub fn log(&self) -> String {
        let errors = std::fs::read_to_string(self.server.dir.join("error.log")).unwrap_or_default();
        format!("{}{errors}", self.server.log())
    }

    /// An instance of `service` at this server.
    pub fn instance(&self, id: &str, service: &str) -> tower_sd::ServiceInstance {
        tower_sd::ServiceInstance::new(id, service, "127.0.0.1", self.port)
    }
}

fn render(config: &Config, port: u16, dir: &std::path::Path) -> String {
    let dir = dir.display();
    let (listen, tls) = match &config.tls {
        None if config.http1 => (format!("listen 127.0.0.1:{port};"), String::new()),
        None => (format!("listen 127.0.0.1:{port} http2;"), String::new()),
        Some((cert, key)) => {
            std::fs::write(format!("{dir}/cert.pem"), cert).unwrap();
            std::fs::write(format!("{dir}/key.pem"), key).unwrap();
            (
                format!("listen 127.0.0.1:{port} ssl http2;"),
                format!("ssl_certificate {dir}/cert.pem; ssl_certificate_key {dir}/key.pem;"),
            )
        }
    };
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format counted '$connection $connection_requests $status $host $server_protocol $uri';
    access_log {dir}/access.log counted;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests {keepalive};
    http2_max_concurrent_streams {streams};
    server {{
        {listen}
        {tls}
        location = /healthz {{ if (-f {dir}/unhealthy) {{ return 503; }} return 200 "ok"; }}
        location / {{ if (-f {dir}/failing) {{ return 503; }} {location} }}
    }}
}}
"#,
        keepalive = config.keepalive_requests,
        streams = config.max_streams,
        location = config.location,
    )
}
