//! A TCP proxy on 127.0.0.1 that a test can cut: while blocked, open connections are closed
//! and new ones are accepted and closed at once, as if the network between client and
//! server had failed. Frozen, it keeps every connection open and forwards nothing, as a
//! peer that vanished without closing (a half-open connection) looks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    frozen: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    blocked: bool,
    connections: JoinSet<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_delayed(upstream, std::time::Duration::ZERO).await
    }

    /// A proxy that holds each new connection for `delay` before it forwards it: a server
    /// whose connects are slow.
    pub async fn start_delayed(upstream: SocketAddr, delay: std::time::Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            blocked: false,
            connections: JoinSet::new(),
        }));
        let shared = Arc::clone(&state);
        let (frozen, thawed) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut state = shared.lock().unwrap();
                if state.blocked {
                    continue; // dropped: closed at once
                }
                let thawed = thawed.clone();
                state.connections.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Ok(outbound) = TcpStream::connect(upstream).await {
                        let (from_client, to_client) = inbound.into_split();
                        let (from_server, to_server) = outbound.into_split();
                        tokio::join!(
                            forward(from_client, to_server, thawed.clone()),
                            forward(from_server, to_client, thawed),
                        );
                    }
                });
            }
        });
        Self {
            addr,
            state,
            frozen,
            task,
        }
    }

    /// Stops forwarding, keeping every connection open, until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every open connection and refuses new ones until [`unblock`](Self::unblock).
    pub fn block(&self) {
        let mut state = self.state.lock().unwrap();
        state.blocked = true;
        state.connections.abort_all();
    }

    pub fn unblock(&self) {
        self.state.lock().unwrap().blocked = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction, holding what it reads while frozen.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut thawed: watch::Receiver<bool>,
) {
    let mut buf = vec![0; 16 << 10];
    loop {
        let read = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if thawed.wait_for(|frozen| !*frozen).await.is_err()
            || to.write_all(&buf[..read]).await.is_err()
        {
            break;
        }
    }
    let _ = to.shutdown().await;
}
