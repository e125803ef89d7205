//! An HTTP/2 server on 127.0.0.1 written frame by frame, for what no server library lets a
//! test do: change its `MAX_CONCURRENT_STREAMS` on an open connection (a SETTINGS frame
//! mid-connection, RFC 9113 6.5) and answer each stream only when the test says so.
//!
//! It sends its SETTINGS first, acknowledges the client's (noting their parameters, and
//! what the client's WINDOW_UPDATEs add to the connection's window), answers pings, counts
//! its connections and the client's SETTINGS acks, notes when the client closes a
//! connection, reports each request's HEADERS and notes which requests ended, and when
//! asked answers a stream with `:status 200` (HPACK static index 8, one byte), with or
//! without a body, resets it, or sends a GOAWAY. Everything else is read and ignored; it never sends
//! WINDOW_UPDATE, so a client may send it no more than HTTP/2's initial window of request
//! data (65,535 bytes per connection).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;

/// A request's HEADERS: on which connection (counted from 0), on which stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub connection: usize,
    pub stream: u32,
}

/// One accepted connection, as the server sees it.
struct Accepted {
    /// Frames to send on it.
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// SETTINGS frames the client acknowledged.
    acks: usize,
    /// The client closed it (its side read the end of the stream).
    closed: bool,
    /// Streams whose request ended (`END_STREAM` on its HEADERS or DATA), in order.
    ended: Vec<u32>,
    /// The parameters of the client's SETTINGS frames, in order.
    settings: Vec<(u16, u32)>,
    /// What the client's WINDOW_UPDATE frames added to the connection's window.
    window_added: u64,
}

type Connections = Arc<Mutex<Vec<Accepted>>>;

pub struct RawH2 {
    pub port: u16,
    requests: mpsc::UnboundedReceiver<Seen>,
    writers: Connections,
    task: tokio::task::JoinHandle<()>,
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut bytes = vec![len[1], len[2], len[3], kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn max_streams(max: u32) -> Vec<u8> {
    let mut payload = MAX_CONCURRENT_STREAMS.to_be_bytes().to_vec();
    payload.extend_from_slice(&max.to_be_bytes());
    frame(SETTINGS, 0, 0, &payload)
}

impl RawH2 {
    /// Starts the server; each connection begins with `MAX_CONCURRENT_STREAMS = max`.
    pub async fn start(max: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, requests) = mpsc::unbounded_channel();
        let writers = Connections::default();
        let shared = Arc::clone(&writers);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (read, mut write) = tcp.into_split();
                let (out, mut frames) = mpsc::unbounded_channel::<Vec<u8>>();
                let n = {
                    let mut writers = shared.lock().unwrap();
                    writers.push(Accepted {
                        out: out.clone(),
                        acks: 0,
                        closed: false,
                        ended: Vec::new(),
                        settings: Vec::new(),
                        window_added: 0,
                    });
                    writers.len() - 1
                };
                let _ = out.send(max_streams(max));
                tokio::spawn(async move {
                    while let Some(bytes) = frames.recv().await {
                        if write.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
                let connections = Arc::clone(&shared);
                let seen = seen.clone();
                tokio::spawn(async move {
                    read_frames(read, out, seen, Arc::clone(&connections), n).await;
                    connections.lock().unwrap()[n].closed = true;
                });
            }
        });
        Self {
            port,
            requests,
            writers,
            task,
        }
    }

    /// The next request within `within`, if any.
    pub async fn request(&mut self, within: Duration) -> Option<Seen> {
        tokio::time::timeout(within, self.requests.recv())
            .await
            .ok()
            .flatten()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.writers.lock().unwrap().len()
    }

    /// SETTINGS frames the client acknowledged on connection `n`.
    pub fn acks(&self, n: usize) -> usize {
        self.writers.lock().unwrap()[n].acks
    }

    /// Whether the client has closed connection `n`.
    pub fn closed(&self, n: usize) -> bool {
        self.writers.lock().unwrap()[n].closed
    }

    /// The streams of connection `n` whose request has ended, in the order they ended.
    pub fn ended(&self, n: usize) -> Vec<u32> {
        self.writers.lock().unwrap()[n].ended.clone()
    }

    /// The client's SETTINGS parameters on connection `n` (identifier, value), in order.
    pub fn client_settings(&self, n: usize) -> Vec<(u16, u32)> {
        self.writers.lock().unwrap()[n].settings.clone()
    }

    /// What the client's WINDOW_UPDATE frames on connection `n` added to the connection's
    /// receive window.
    pub fn connection_window_added(&self, n: usize) -> u64 {
        self.writers.lock().unwrap()[n].window_added
    }

    /// Sends connection `n` a GOAWAY (no error) that lets streams up to `last` finish.
    pub fn go_away(&self, n: usize, last: u32) {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_be_bytes());
        self.send(n, frame(GOAWAY, 0, 0, &payload));
    }

    /// Resets a request's stream with the HTTP/2 error `code` (`0x7` is `REFUSED_STREAM`).
    pub fn reset(&self, seen: Seen, code: u32) {
        let frame = frame(RST_STREAM, 0, seen.stream, &code.to_be_bytes());
        self.send(seen.connection, frame);
    }

    /// Sends connection `n` a SETTINGS frame with a new `MAX_CONCURRENT_STREAMS`.
    pub fn set_max_streams(&self, n: usize, max: u32) {
        self.send(n, max_streams(max));
    }

    /// Answers a request: `200`, no body.
    pub fn respond(&self, seen: Seen) {
        let response = frame(HEADERS, END_HEADERS | END_STREAM, seen.stream, &[0x88]);
        self.send(seen.connection, response);
    }

    /// Answers a request with `200` and leaves the response open (a body still to come).
    pub fn respond_open(&self, seen: Seen) {
        let response = frame(HEADERS, END_HEADERS, seen.stream, &[0x88]);
        self.send(seen.connection, response);
    }

    /// Answers a request with `200`, its `content-length` and a body of one DATA frame
    /// that ends the stream (so no more than 16 KiB, the default largest frame).
    pub fn respond_with_body(&self, seen: Seen, body: &[u8]) {
        // :status 200 (static index 8), then content-length (static index 28) as a literal
        // without indexing: 0x0f and 28 - 15 in the 4-bit prefix integer, the value raw.
        let length = body.len().to_string();
        let mut block = vec![0x88, 0x0f, 28 - 15, u8::try_from(length.len()).unwrap()];
        block.extend_from_slice(length.as_bytes());
        self.send(
            seen.connection,
            frame(HEADERS, END_HEADERS, seen.stream, &block),
        );
        self.send(seen.connection, frame(DATA, END_STREAM, seen.stream, body));
    }

    /// Ends a response left open: one DATA frame with `body` and `END_STREAM`.
    pub fn end_stream(&self, seen: Seen, body: &[u8]) {
        self.send(seen.connection, frame(DATA, END_STREAM, seen.stream, body));
    }

    fn send(&self, n: usize, bytes: Vec<u8>) {
        let writers = self.writers.lock().unwrap();
        writers[n].out.send(bytes).expect("the connection is open");
    }
}

/// Reads connection `n`'s frames: acks SETTINGS, answers pings, counts the client's acks,
/// reports each request's HEADERS and notes each request's end.
async fn read_frames(
    mut read: OwnedReadHalf,
    out: mpsc::UnboundedSender<Vec<u8>>,
    seen: mpsc::UnboundedSender<Seen>,
    connections: Connections,
    n: usize,
) {
    let mut preface = [0; PREFACE.len()];
    if read.read_exact(&mut preface).await.is_err() || preface != PREFACE {
        return;
    }
    let mut head = [0u8; 9];
    while read.read_exact(&mut head).await.is_ok() {
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        if read.read_exact(&mut payload).await.is_err() {
            return;
        }
        match (kind, flags & ACK) {
            (SETTINGS, 0) => {
                let parameters = payload.chunks_exact(6).map(|p| {
                    let value = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                    (u16::from_be_bytes([p[0], p[1]]), value)
                });
                connections.lock().unwrap()[n].settings.extend(parameters);
                let _ = out.send(frame(SETTINGS, ACK, 0, &[]));
            }
            (WINDOW_UPDATE, _) if stream == 0 && payload.len() == 4 => {
                let added = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                connections.lock().unwrap()[n].window_added += u64::from(added & 0x7fff_ffff);
            }
            (SETTINGS, _) => connections.lock().unwrap()[n].acks += 1,
            (PING, 0) => {
                let _ = out.send(frame(PING, ACK, 0, &payload));
            }
            (HEADERS, _) => {
                let _ = seen.send(Seen {
                    connection: n,
                    stream,
                });
            }
            _ => {}
        }
        if matches!(kind, HEADERS | DATA) && flags & END_STREAM != 0 {
            connections.lock().unwrap()[n].ended.push(stream);
        }
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}
