//! nghttpd (Debian's `nghttp2-server`), nghttp2's own HTTP/2 server, on a free loopback
//! port, h2c or TLS: a third HTTP/2 implementation beside hyper's and nginx's. It serves
//! the files of a scratch directory (`hello` holds `hello from nghttpd`) and echoes what is
//! POSTed, with the stream limit each test sets.

use std::process::Command;
use std::time::Duration;

use super::pki::Leaf;
use super::process::{START_ATTEMPTS, Server, free_port, have, scratch_dir};

/// What `/hello` answers.
pub const HELLO: &str = "hello from nghttpd";

pub struct Nghttpd {
    pub port: u16,
    server: Server,
}

impl Nghttpd {
    /// Starts nghttpd allowing `max_streams` concurrent streams per connection, over TLS
    /// with `tls` when given; `None` (after saying why) when it is not installed.
    pub async fn start(max_streams: u32, tls: Option<&Leaf>) -> Option<Self> {
        if !have("nghttpd", "nghttp2-server") {
            return None;
        }
        let dir = scratch_dir("nghttpd");
        let htdocs = dir.join("htdocs");
        std::fs::create_dir_all(&htdocs).unwrap();
        std::fs::write(htdocs.join("hello"), HELLO).unwrap();
        let mut server = Server::stopped(&dir);
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut command = Command::new("nghttpd");
            command
                .args(["-a", "127.0.0.1", "--echo-upload"])
                .arg(format!("--max-concurrent-streams={max_streams}"))
                .arg(format!("--htdocs={}", htdocs.display()))
                .arg(port.to_string());
            match tls {
                None => {
                    command.arg("--no-tls");
                }
                Some(leaf) => {
                    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
                    std::fs::write(&key, &leaf.key_pem).unwrap();
                    std::fs::write(&cert, &leaf.cert_pem).unwrap();
                    command.arg(&key).arg(&cert);
                }
            }
            server.respawn(&mut command);
            if server.accepts_on(port).await {
                return Some(Self { port, server });
            }
            let log = server.log();
            assert!(
                log.contains("Address already in use") || log.contains("bind"),
                "nghttpd did not start:\n{log}"
            );
        }
        panic!("nghttpd found no free port in {START_ATTEMPTS} attempts");
    }

    /// nghttpd's output, for failure messages.
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// An instance of `service` at this server.
    pub fn instance(&self, id: &str, service: &str) -> tower_sd::ServiceInstance {
        tower_sd::ServiceInstance::new(id, service, "127.0.0.1", self.port)
    }
}
