//! A request is load until its response ends: with `HttpStatus`, the balancer keeps it in
//! flight until the response body ends or is dropped, classifies `grpc-status` in the
//! trailers, and takes the peak-EWMA sample at the end (paused time).
//!
//! Wrong implementations these fail: load released at the response headers (an open stream's
//! endpoint takes its full share), trailers not read (a stream that ends `UNAVAILABLE` is a
//! success), latency measured to the headers, a dropped body counted as a failure or never
//! released.
#![cfg(feature = "http")]

use tower_sd_testkit as support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower::discover::Change;
use tower::util::BoxCloneSyncService;
use tower_sd::balance::{Balance, BalanceBuilder, EndpointState, LoadMetric, OutlierDetection};
use tower_sd::classify::HttpStatus;

type Body = BoxBody<Bytes, Infallible>;
type Svc = BoxCloneSyncService<http::Request<()>, http::Response<Body>, Infallible>;
type Frames = mpsc::UnboundedSender<Frame<Bytes>>;

/// How an endpoint answers: a whole body, or a body streamed by the test.
#[derive(Clone, Default)]
struct Answers {
    /// Streams opened on this endpoint, in order: the test sends their frames.
    streams: Arc<Mutex<Vec<Frames>>>,
}

/// An endpoint `id`: a request with path `/stream` gets a body the test feeds through
/// `answers`; any other gets `id` as a whole body.
fn endpoint(id: usize, answers: &Answers) -> Svc {
    let answers = answers.clone();
    BoxCloneSyncService::new(tower::service_fn(move |request: http::Request<()>| {
        let body: Body = if request.uri().path() == "/stream" {
            let (frames, rx) = mpsc::unbounded_channel();
            answers.streams.lock().unwrap().push(frames);
            let frames = stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|frame| (Ok(frame), rx))
            });
            BodyExt::boxed(StreamBody::new(frames))
        } else {
            BodyExt::boxed(Full::new(Bytes::from(id.to_string())))
        };
        let response = http::Response::builder()
            .header("x-id", id.to_string())
            .body(body)
            .unwrap();
        async move { Ok::<_, Infallible>(response) }
    }))
}

async fn balancer(
    builder: BalanceBuilder,
    n: usize,
) -> (Balance<Svc, usize, HttpStatus>, Vec<Answers>) {
    let answers: Vec<Answers> = (0..n).map(|_| Answers::default()).collect();
    let changes: Vec<_> = (0..n)
        .map(|id| Ok::<_, Infallible>(Change::Insert(id, endpoint(id, &answers[id]))))
        .collect();
    let balance = builder
        .build(tower_sd::endpoint::Endpoints::new(
            stream::iter(changes).chain(stream::pending()),
        ))
        .with_classifier(HttpStatus);
    support::until("listed", || balance.endpoints().len() == n).await;
    (balance, answers)
}

use futures_util::StreamExt as _;

fn get(path: &str) -> http::Request<()> {
    http::Request::get(path).body(()).unwrap()
}

fn id_of<B>(response: &http::Response<B>) -> usize {
    response.headers()["x-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn in_flight(balance: &Balance<Svc, usize, HttpStatus>, id: usize) -> u64 {
    balance.endpoints()[id].in_flight
}

#[tokio::test(start_paused = true)]
async fn an_open_stream_counts_as_load_until_it_ends() {
    let _limit = support::time_limit(60);
    let (balance, answers) = balancer(Balance::builder(), 3).await;
    let stream = balance.clone().oneshot(get("/stream")).await.unwrap();
    let streaming = id_of(&stream);
    assert_eq!(
        in_flight(&balance, streaming),
        1,
        "the open stream is in flight"
    );

    // 1,000 unary calls while it is open: its endpoint is the busier of any pair it is in.
    let mut served = [0usize; 3];
    for _ in 0..1_000 {
        let response = balance.clone().oneshot(get("/")).await.unwrap();
        served[id_of(&response)] += 1;
        response.into_body().collect().await.unwrap();
    }
    assert!(
        served[streaming] < 50,
        "the streaming endpoint took {served:?}"
    );

    // The stream ends (data, then trailers): the load is released.
    let frames = answers[streaming].streams.lock().unwrap().pop().unwrap();
    frames.send(Frame::data(Bytes::from("last"))).unwrap();
    frames
        .send(Frame::trailers(http::HeaderMap::new()))
        .unwrap();
    drop(frames);
    stream.into_body().collect().await.unwrap();
    assert_eq!(in_flight(&balance, streaming), 0);
    let mut served = [0usize; 3];
    for _ in 0..900 {
        let response = balance.clone().oneshot(get("/")).await.unwrap();
        served[id_of(&response)] += 1;
    }
    assert!(served[streaming] > 150, "back to its share: {served:?}");
}

#[tokio::test(start_paused = true)]
async fn grpc_status_in_the_trailers_counts_as_a_failure() {
    let _limit = support::time_limit(60);
    let detection = OutlierDetection::default().consecutive_failures(2);
    let (balance, answers) =
        balancer(Balance::builder().outlier_detection(Some(detection)), 2).await;
    let mut unavailable = http::HeaderMap::new();
    unavailable.insert("grpc-status", http::HeaderValue::from_static("14"));
    let mut ok = http::HeaderMap::new();
    ok.insert("grpc-status", http::HeaderValue::from_static("0"));

    // Streams on endpoint 0 that send data, then end UNAVAILABLE.
    let mut failed_on_zero = 0;
    while failed_on_zero < 2 {
        let response = balance.clone().oneshot(get("/stream")).await.unwrap();
        let id = id_of(&response);
        let frames = answers[id].streams.lock().unwrap().pop().unwrap();
        frames.send(Frame::data(Bytes::from("partial"))).unwrap();
        let trailers = if id == 0 { &unavailable } else { &ok };
        frames.send(Frame::trailers(trailers.clone())).unwrap();
        drop(frames);
        response.into_body().collect().await.unwrap();
        failed_on_zero += usize::from(id == 0);
    }
    assert_eq!(balance.endpoints()[0].state, EndpointState::Ejected);
    assert_eq!(
        balance.endpoints()[1].state,
        EndpointState::Ready,
        "OK trailers succeed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_before_its_end_is_released_and_not_a_failure() {
    let _limit = support::time_limit(60);
    let detection = OutlierDetection::default().consecutive_failures(1);
    let (balance, answers) =
        balancer(Balance::builder().outlier_detection(Some(detection)), 2).await;
    for _ in 0..20 {
        let response = balance.clone().oneshot(get("/stream")).await.unwrap();
        let id = id_of(&response);
        let frames = answers[id].streams.lock().unwrap().pop().unwrap();
        frames.send(Frame::data(Bytes::from("first"))).unwrap();
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(in_flight(&balance, id), 1);
        drop(body); // the caller gives up mid-stream
        assert_eq!(in_flight(&balance, id), 0, "released with the body");
    }
    let states: Vec<EndpointState> = balance.endpoints().iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [EndpointState::Ready; 2],
        "cancelling is not the endpoint's fault"
    );
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_measures_until_the_body_ends() {
    let _limit = support::time_limit(60);
    let load = LoadMetric::PeakEwma {
        default_rtt: Duration::from_millis(1),
        decay: Duration::from_secs(10),
    };
    let (balance, answers) = balancer(Balance::builder().load(load), 1).await;
    // Headers at once, the body's end 500 ms later.
    let response = balance.clone().oneshot(get("/stream")).await.unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    let frames = answers[0].streams.lock().unwrap().pop().unwrap();
    frames.send(Frame::data(Bytes::from("done"))).unwrap();
    drop(frames);
    response.into_body().collect().await.unwrap();
    let ewma = balance.endpoints()[0].ewma.unwrap();
    assert!(ewma >= Duration::from_millis(400), "{ewma:?}");
}

#[tokio::test(start_paused = true)]
async fn a_response_without_a_body_completes_at_once() {
    let _limit = support::time_limit(60);
    let (balance, _answers) = balancer(Balance::builder(), 1).await;
    let response = balance.clone().oneshot(get("/")).await.unwrap();
    // A whole body that has not been read is still in flight...
    assert_eq!(in_flight(&balance, 0), 1);
    response.into_body().collect().await.unwrap();
    assert_eq!(in_flight(&balance, 0), 0);
    // ...and an empty one is complete with its headers.
    let empty = BoxCloneSyncService::new(tower::service_fn(|_: http::Request<()>| async {
        let body: Body = BodyExt::boxed(http_body_util::Empty::new());
        Ok::<_, Infallible>(http::Response::builder().status(503).body(body).unwrap())
    }));
    let detection = OutlierDetection::default()
        .consecutive_failures(1)
        .max_ejection_percent(100);
    let balance = Balance::builder()
        .outlier_detection(Some(detection))
        .build(tower_sd::endpoint::Endpoints::new(
            stream::iter([Ok::<_, Infallible>(Change::Insert(0usize, empty))])
                .chain(stream::pending()),
        ))
        .with_classifier(HttpStatus);
    support::until("listed", || balance.endpoints().len() == 1).await;
    let response = balance.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(balance.endpoints()[0].in_flight, 0);
    assert_eq!(
        balance.endpoints()[0].state,
        EndpointState::Ejected,
        "a 503 is a failure"
    );
    drop(response);
}

/// The wrapped body answers for the body inside: hyper sends `content-length` from
/// `size_hint` and ends a stream with its headers when `is_end_stream` says so, so a
/// wrapper that answered "unknown" and "not ended" would turn every proxied response into a
/// chunked one with an empty DATA frame. Catches defaults in place of delegation.
#[tokio::test(start_paused = true)]
async fn the_response_body_reports_the_size_and_end_of_the_body_it_wraps() {
    let _limit = support::time_limit(60);
    let (balance, _answers) = balancer(Balance::builder(), 1).await;
    let response = balance.clone().oneshot(get("/")).await.unwrap();
    let body = response.into_body();
    assert_eq!(http_body::Body::size_hint(&body).exact(), Some(1), "`0`");
    assert!(!http_body::Body::is_end_stream(&body));
    assert!(format!("{body:?}").contains("ended: false"), "{body:?}");
    let mut body = std::pin::pin!(body);
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "0");
    assert!(http_body::Body::is_end_stream(&*body), "Full is done");
    assert!(format!("{body:?}").contains("ended: true"), "{body:?}");

    let (streaming, _answers) = balancer(Balance::builder(), 1).await;
    let body = streaming.clone().oneshot(get("/stream")).await.unwrap();
    let hint = http_body::Body::size_hint(body.body());
    assert_eq!(
        (hint.lower(), hint.upper()),
        (0, None),
        "a stream's size is unknown"
    );
}

/// What a `Debug` print of the balancer's parts says: enough to tell them apart in a log.
#[tokio::test(start_paused = true)]
async fn debug_output_says_what_each_part_holds() {
    let _limit = support::time_limit(60);
    let (balance, _answers) = balancer(Balance::builder().service_name("web"), 2).await;
    let printed = format!("{balance:?}");
    assert!(
        printed.contains("\"web\"") && printed.contains("endpoints: 2"),
        "{printed}"
    );
    let mut ready = balance.clone();
    std::future::poll_fn(|cx| tower::Service::poll_ready(&mut ready, cx))
        .await
        .unwrap();
    let future = tower::Service::call(&mut ready, get("/"));
    let printed = format!("{future:?}");
    assert!(
        printed.contains("ResponseFuture") && printed.contains("probe: false"),
        "{printed}"
    );
    drop(future.await);
}
