//! A small gRPC service with every kind of call, written by hand (a prost message and
//! tonic's server and client plumbing, no protoc), for end-to-end stream tests:
//!
//! - `Sum` (client streaming): the sum of the numbers sent;
//! - `Count` (server streaming): `0..value`, one number per `pace`;
//! - `Echo` (bidirectional): each number back as it arrives.
//!
//! The server counts `Count` streams that ran to their end and those dropped before it (the
//! client cancelled: its stream was reset).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use super::servers::{Stats, TestServer};

/// The one message: a number.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Num {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

pub const SUM: &str = "/test.Numbers/Sum";
pub const COUNT: &str = "/test.Numbers/Count";
pub const ECHO: &str = "/test.Numbers/Echo";

/// What the server saw of its `Count` streams.
#[derive(Debug, Default)]
pub struct Events {
    pub completed: AtomicUsize,
    pub cancelled: AtomicUsize,
}

impl Events {
    pub fn completed(&self) -> usize {
        self.completed.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }
}

type NumStream = Pin<Box<dyn Stream<Item = Result<Num, Status>> + Send>>;

/// A `Count` stream's end, as the server sees it: counted when the stream is dropped.
struct Watch {
    events: Arc<Events>,
    finished: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let counter = if self.finished {
            &self.events.completed
        } else {
            &self.events.cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// Starts the numbers server on a free loopback port.
pub async fn start(name: &str, events: Arc<Events>, pace: Duration) -> TestServer {
    start_with(name, events, pace, Stats::default()).await
}

/// [`start`], allowing each connection at most `max_streams` concurrent streams.
pub async fn start_limited(
    name: &str,
    events: Arc<Events>,
    pace: Duration,
    max_streams: usize,
) -> TestServer {
    let stats = Stats::default();
    stats.max_streams.store(max_streams, Ordering::SeqCst);
    start_with(name, events, pace, stats).await
}

async fn start_with(name: &str, events: Arc<Events>, pace: Duration, stats: Stats) -> TestServer {
    TestServer::start(name, true, Arc::new(stats), move || {
        let events = Arc::clone(&events);
        tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let events = Arc::clone(&events);
            async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<Num, Num>::default());
                let response = match request.uri().path() {
                    SUM => grpc.client_streaming(tower::service_fn(sum), request).await,
                    COUNT => {
                        let count = move |request: Request<Num>| {
                            let events = Arc::clone(&events);
                            async move { count(request, events, pace) }
                        };
                        grpc.server_streaming(tower::service_fn(count), request)
                            .await
                    }
                    ECHO => grpc.streaming(tower::service_fn(echo), request).await,
                    _ => Status::unimplemented("no such method").into_http(),
                };
                Ok::<_, Infallible>(response)
            }
        })
    })
    .await
}

async fn sum(request: Request<Streaming<Num>>) -> Result<Response<Num>, Status> {
    let mut numbers = request.into_inner();
    let mut total = 0;
    while let Some(number) = numbers.message().await? {
        total += number.value;
    }
    Ok(Response::new(Num { value: total }))
}

fn count(
    request: Request<Num>,
    events: Arc<Events>,
    pace: Duration,
) -> Result<Response<NumStream>, Status> {
    let n = request.into_inner().value;
    let watch = Watch {
        events,
        finished: false,
    };
    let stream = futures_util::stream::unfold((0, watch), move |(i, mut watch)| async move {
        if i == n {
            watch.finished = true;
            drop(watch);
            return None;
        }
        tokio::time::sleep(pace).await;
        Some((Ok(Num { value: i }), (i + 1, watch)))
    });
    Ok(Response::new(Box::pin(stream)))
}

async fn echo(request: Request<Streaming<Num>>) -> Result<Response<NumStream>, Status> {
    let stream = request.into_inner().map(|number| number);
    Ok(Response::new(Box::pin(stream)))
}

/// A client of the numbers service over any channel.
pub struct Client<T> {
    grpc: tonic::client::Grpc<T>,
}

impl<T> Client<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tower::BoxError> + Send,
    T::Error: Into<tower::BoxError>,
{
    pub fn new(channel: T) -> Self {
        Self {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.into().to_string()))
    }

    /// `Sum` of `values`, sent as a stream.
    pub async fn sum(&mut self, values: Vec<u64>) -> Result<u64, Status> {
        self.ready().await?;
        let numbers = futures_util::stream::iter(values.into_iter().map(|value| Num { value }));
        let response = self
            .grpc
            .client_streaming(
                Request::new(numbers),
                PathAndQuery::from_static(SUM),
                ProstCodec::<Num, Num>::default(),
            )
            .await?;
        Ok(response.into_inner().value)
    }

    /// `Count` to `n`: the stream of answers.
    pub async fn count(&mut self, n: u64) -> Result<Streaming<Num>, Status> {
        self.ready().await?;
        let response = self
            .grpc
            .server_streaming(
                Request::new(Num { value: n }),
                PathAndQuery::from_static(COUNT),
                ProstCodec::<Num, Num>::default(),
            )
            .await?;
        Ok(response.into_inner())
    }

    /// `Echo` of `values`: what came back.
    pub async fn echo(&mut self, values: Vec<u64>) -> Result<Vec<u64>, Status> {
        self.ready().await?;
        let numbers = futures_util::stream::iter(values.into_iter().map(|value| Num { value }));
        let response = self
            .grpc
            .streaming(
                Request::new(numbers),
                PathAndQuery::from_static(ECHO),
                ProstCodec::<Num, Num>::default(),
            )
            .await?;
        let mut answers = response.into_inner();
        let mut echoed = Vec::new();
        while let Some(number) = answers.message().await? {
            echoed.push(number.value);
        }
        Ok(echoed)
    }
}
