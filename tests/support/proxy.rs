//! A TCP proxy on 127.0.0.1 that a test can cut: while blocked, open connections are closed
//! and new ones are accepted and closed at once, as if the network between client and
//! server had failed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
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
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = shared.lock().unwrap();
                if state.blocked {
                    continue; // dropped: closed at once
                }
                state.connections.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, state, task }
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
