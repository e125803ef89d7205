use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

use super::*;
use crate::connection::policy::{RetryRules, Retryable, Throttle};
use crate::endpoint::Connectivity;

type Body = ReplayBody<Full<Bytes>>;

/// An inner service that answers with the next scripted outcome and records each
/// request's body (read to the end before answering, unless it never left).
#[derive(Clone)]
struct Script {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    /// When each attempt was sent.
    sent: Arc<Mutex<Vec<tokio::time::Instant>>>,
    /// Each attempt's headers.
    heads: Arc<Mutex<Vec<http::HeaderMap>>>,
    /// The endpoints each attempt was told to avoid; each attempt "picks" the endpoint
    /// numbered by the attempts before it.
    avoided: Arc<Mutex<Vec<Vec<usize>>>>,
    avoid: Vec<usize>,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    /// No connection: nothing of the request was read.
    NeverSent,
    /// Above a GOAWAY's last stream id, after the body went out.
    GoAway,
    /// `REFUSED_STREAM`, after the body went out.
    Refused,
    /// Reset after the server read the request.
    Failed,
    /// A trailers-only answer with this status, and this pushback.
    Status(u32, Option<&'static str>),
}

impl Script {
    fn new(outcomes: &[Outcome]) -> Self {
        let mut outcomes = outcomes.to_vec();
        outcomes.reverse();
        Self {
            outcomes: Arc::new(Mutex::new(outcomes)),
            bodies: Arc::default(),
            sent: Arc::default(),
            heads: Arc::default(),
            avoided: Arc::default(),
            avoid: Vec::new(),
        }
    }

    fn bodies(&self) -> Vec<Bytes> {
        self.bodies.lock().unwrap().clone()
    }

    fn attempts(&self) -> usize {
        self.bodies().len()
    }
}

fn error(outcome: Outcome) -> BoxError {
    let authority = "10.0.0.1:80".to_owned();
    let source = || Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)) as BoxError;
    Box::new(match outcome {
        Outcome::NeverSent => ConnectionError::NotConnected {
            authority,
            state: Connectivity::Connecting,
            source: None,
        },
        Outcome::GoAway => ConnectionError::GoAway {
            authority,
            source: source(),
        },
        Outcome::Refused => ConnectionError::Unprocessed {
            authority,
            source: source(),
        },
        _ => ConnectionError::Request {
            authority,
            source: "reset by the server after it read the request".into(),
        },
    })
}

impl Picks for Script {
    fn picked(&self) -> Option<usize> {
        Some(self.sent.lock().unwrap().len())
    }

    fn avoid(&mut self, endpoints: &[usize]) {
        self.avoid = endpoints.to_vec();
    }
}

type Answered = http::Response<&'static str>;

impl Service<Request<Body>> for Script {
    type Response = Answered;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Answered, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.sent.lock().unwrap().push(tokio::time::Instant::now());
        self.heads.lock().unwrap().push(request.headers().clone());
        self.avoided.lock().unwrap().push(self.avoid.clone());
        let outcome = self
            .outcomes
            .lock()
            .unwrap()
            .pop()
            .expect("a scripted outcome");
        let bodies = Arc::clone(&self.bodies);
        Box::pin(async move {
            if let Outcome::NeverSent = outcome {
                bodies.lock().unwrap().push(Bytes::new());
                return Err(error(outcome));
            }
            let body = request.into_body().collect().await?.to_bytes();
            bodies.lock().unwrap().push(body);
            match outcome {
                Outcome::Ok => Ok(http::Response::new("answered")),
                Outcome::Status(code, pushback) => {
                    let mut answer = http::Response::builder().header("grpc-status", code);
                    if let Some(pushback) = pushback {
                        answer = answer.header("grpc-retry-pushback-ms", pushback);
                    }
                    Ok(answer.body("failed").unwrap())
                }
                outcome => Err(error(outcome)),
            }
        })
    }
}

async fn send(
    script: &Script,
    buffer: usize,
    body: &'static str,
) -> Result<&'static str, BoxError> {
    let retry = Retry::new(script.clone(), buffer, Budget::unlimited(), "svc");
    let request = Request::post("/")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    Ok(retry.oneshot(request).await?.into_body())
}

/// Sends `body` under `policy`; the answer, and the attempts the call counted.
async fn send_with(
    script: &Script,
    buffer: usize,
    body: &'static str,
    policy: CallPolicy,
) -> (Result<Answered, BoxError>, u32) {
    let mut retry = Retry::new(script.clone(), buffer, Budget::unlimited(), "svc");
    let request = Request::post("/")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    retry.ready().await.unwrap();
    let mut call = retry.call_with(request, Some(Box::new(policy)));
    let outcome = (&mut call).await;
    (outcome, call.attempts())
}

/// Catches no retry, a retry that sends an empty or partial body, and a second
/// outcome the caller does not see.
#[tokio::test(start_paused = true)]
async fn a_refused_request_is_sent_once_more_with_the_same_body() {
    let _limit = tower_sd_testkit::time_limit(10);
    let script = Script::new(&[Outcome::Refused, Outcome::Ok]);
    assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
    assert_eq!(script.bodies(), ["hello", "hello"]);
}

/// Catches a retry that sends only what the attempt before it sent: an attempt that
/// never left (its body unread) comes between one that sent the body and the last, which
/// must still send it whole. Against nginx closing connections, 1 of some 50,000 calls
/// reached the server with no message ("Missing request message").
#[tokio::test(start_paused = true)]
async fn an_attempt_that_never_left_keeps_the_body_for_the_next() {
    let _limit = tower_sd_testkit::time_limit(10);
    let outcomes = [Outcome::Refused, Outcome::NeverSent, Outcome::GoAway];
    let script = Script::new(&[&outcomes[..], &outcomes[..1], &[Outcome::Ok]].concat());
    assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
    assert_eq!(script.bodies(), ["hello", "", "hello", "hello", "hello"]);
}

/// Catches a refused request surfacing after one retry (refusals come in runs: a
/// server closing connections after so many requests, or one that counts streams a
/// moment longer than the client), and one retried without end.
#[tokio::test(start_paused = true)]
async fn a_refused_request_is_sent_again_up_to_five_attempts() {
    let _limit = tower_sd_testkit::time_limit(10);
    for refusal in [Outcome::GoAway, Outcome::Refused] {
        let mut outcomes = vec![refusal; 4];
        outcomes.push(Outcome::Ok);
        let script = Script::new(&outcomes);
        assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
        assert_eq!(script.bodies(), ["hello"; 5]);

        let script = Script::new(&[refusal; 6]);
        assert!(send(&script, 1024, "hello").await.is_err());
        assert_eq!(script.attempts(), REFUSED_ATTEMPTS as usize);
    }
    let mixed = [
        Outcome::Refused,
        Outcome::GoAway,
        Outcome::Refused,
        Outcome::Ok,
    ];
    assert_eq!(
        send(&Script::new(&mixed), 1024, "hi").await.unwrap(),
        "answered"
    );
}

/// Catches a request refused with `REFUSED_STREAM` sent again at once (the server that
/// refused it is still counting the stream that made it full), a pause that does not
/// grow, and a pause after a GOAWAY (the next attempt goes to another connection).
#[tokio::test(start_paused = true)]
async fn a_refused_stream_waits_a_growing_moment_and_a_goaway_none() {
    let _limit = tower_sd_testkit::time_limit(10);
    let outcomes = [Outcome::Refused; 4].into_iter().chain([Outcome::Ok]);
    let script = Script::new(&outcomes.collect::<Vec<_>>());
    assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
    let sent = script.sent.lock().unwrap().clone();
    let pauses: Vec<Duration> = sent.windows(2).map(|w| w[1] - w[0]).collect();
    let ms = Duration::from_millis;
    let bounds = [
        (ms(2), ms(4)),
        (ms(4), ms(8)),
        (ms(8), ms(16)),
        (ms(16), ms(32)),
    ];
    for (pause, (low, high)) in pauses.iter().zip(bounds) {
        assert!((low..=high).contains(pause), "{pauses:?}");
    }
    assert_eq!(pauses.len(), 4);

    let script = Script::new(&[Outcome::GoAway, Outcome::GoAway, Outcome::Ok]);
    assert_eq!(send(&script, 1024, "hello").await.unwrap(), "answered");
    let sent = script.sent.lock().unwrap().clone();
    assert!(sent.windows(2).all(|w| w[1] == w[0]), "no pause: {sent:?}");
}

/// Catches a request that never left the client given up after one retry, or with a
/// 0-byte buffer (nothing of its body was read, so nothing needs keeping), and one
/// retried without end.
#[tokio::test(start_paused = true)]
async fn a_request_that_never_left_is_sent_again_whatever_the_buffer() {
    let _limit = tower_sd_testkit::time_limit(10);
    let mut outcomes = vec![Outcome::NeverSent; 9];
    outcomes.push(Outcome::Ok);
    let script = Script::new(&outcomes);
    assert_eq!(send(&script, 0, "hello").await.unwrap(), "answered");
    assert_eq!(
        script.bodies().last().unwrap(),
        "hello",
        "sent whole at last"
    );

    let script = Script::new(&[Outcome::NeverSent; 11]);
    assert!(send(&script, 0, "hello").await.is_err());
    assert_eq!(script.attempts(), NEVER_SENT_ATTEMPTS as usize);
}

/// Catches retrying a request the server may have processed (not idempotent-safe).
#[tokio::test(start_paused = true)]
async fn a_request_that_may_have_been_processed_is_not_sent_again() {
    let _limit = tower_sd_testkit::time_limit(10);
    let script = Script::new(&[Outcome::Failed, Outcome::Ok]);
    let error = send(&script, 1024, "hello").await.unwrap_err();
    assert!(
        crate::error::Chain(&*error)
            .to_string()
            .contains("reset by the server"),
        "{error}"
    );
    assert_eq!(script.attempts(), 1);
}

/// Catches a retry that sends a body it could not keep: past the buffer, the bytes
/// already sent are gone, so the caller sees the error.
#[tokio::test(start_paused = true)]
async fn a_body_larger_than_the_buffer_is_not_sent_again() {
    let _limit = tower_sd_testkit::time_limit(10);
    let script = Script::new(&[Outcome::Refused, Outcome::Ok]);
    let error = send(&script, 4, "hello").await.unwrap_err();
    assert!(error.downcast_ref::<ConnectionError>().is_some(), "{error}");
    assert_eq!(script.bodies(), ["hello"]);
    let script = Script::new(&[Outcome::Refused, Outcome::Ok]);
    assert_eq!(send(&script, 5, "hello").await.unwrap(), "answered");
}

fn unavailable_policy(max_attempts: u32, throttle: Option<Arc<Throttle>>) -> CallPolicy {
    let rules = RetryRules {
        max_attempts,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        multiplier: 2.0,
        retryable: Retryable::Grpc(1 << 14),
    };
    CallPolicy::new(Some(Arc::new(rules)), throttle, false)
}

fn status_of(answer: &Answered) -> Option<u32> {
    super::super::policy::grpc_status(answer.headers())
}

/// Catches a retry policy that does not resend the body, a retry that goes back to the
/// instance that failed (each attempt must avoid all those before it), a missing or
/// wrong `grpc-previous-rpc-attempts`, and a backoff skipped.
#[tokio::test(start_paused = true)]
async fn a_retryable_status_is_retried_elsewhere_with_the_attempt_count() {
    let _limit = tower_sd_testkit::time_limit(10);
    let unavailable = Outcome::Status(14, None);
    let script = Script::new(&[unavailable, unavailable, Outcome::Ok]);
    let started = tokio::time::Instant::now();
    let (answer, attempts) = send_with(&script, 1024, "hello", unavailable_policy(5, None)).await;
    assert_eq!(answer.unwrap().into_body(), "answered");
    assert_eq!(attempts, 3);
    assert_eq!(script.bodies(), ["hello"; 3]);
    let avoided = script.avoided.lock().unwrap().clone();
    assert_eq!(avoided, [vec![], vec![0], vec![0, 1]]);
    let previous: Vec<Option<String>> = script
        .heads
        .lock()
        .unwrap()
        .iter()
        .map(|h| {
            h.get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(previous, [None, Some("1".into()), Some("2".into())]);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "within the two ceilings"
    );

    // The fourth attempt's answer is kept at maxAttempts 4.
    let script = Script::new(&[unavailable; 5]);
    let (answer, attempts) = send_with(&script, 1024, "hi", unavailable_policy(4, None)).await;
    assert_eq!(status_of(&answer.unwrap()), Some(14));
    assert_eq!((attempts, script.attempts()), (4, 4));
}

/// Catches a committed answer retried (response headers without a status), a code the
/// policy does not list retried, and a body past the buffer replayed.
#[tokio::test(start_paused = true)]
async fn a_committed_answer_a_fatal_code_and_an_outgrown_body_are_kept() {
    let _limit = tower_sd_testkit::time_limit(10);
    for (outcome, buffer) in [
        (Outcome::Ok, 1024),
        (Outcome::Status(13, None), 1024),
        (Outcome::Status(14, None), 4),
    ] {
        let script = Script::new(&[outcome, Outcome::Ok]);
        let (answer, attempts) =
            send_with(&script, buffer, "hello", unavailable_policy(5, None)).await;
        answer.unwrap();
        assert_eq!((attempts, script.attempts()), (1, 1), "{outcome:?}");
    }
}

/// Catches pushback ignored (the retry must wait exactly the time the server asked)
/// and a retry after a pushback that forbids it.
#[tokio::test(start_paused = true)]
async fn pushback_sets_when_the_retry_goes_or_forbids_it() {
    let _limit = tower_sd_testkit::time_limit(10);
    let script = Script::new(&[Outcome::Status(14, Some("200")), Outcome::Ok]);
    let (answer, _) = send_with(&script, 1024, "hello", unavailable_policy(5, None)).await;
    answer.unwrap();
    let sent = script.sent.lock().unwrap().clone();
    assert_eq!(sent[1] - sent[0], Duration::from_millis(200));

    let script = Script::new(&[Outcome::Status(14, Some("-1")), Outcome::Ok]);
    let (answer, attempts) = send_with(&script, 1024, "hello", unavailable_policy(5, None)).await;
    assert_eq!(status_of(&answer.unwrap()), Some(14));
    assert_eq!(attempts, 1);
}

/// Catches a throttle that does not stop retries once half its tokens are gone.
#[tokio::test(start_paused = true)]
async fn the_throttle_stops_retries() {
    let _limit = tower_sd_testkit::time_limit(10);
    let throttle = Arc::new(Throttle::new(3_000, 1_000));
    let unavailable = Outcome::Status(14, None);
    // 3 tokens: the first failure leaves 2 (> 1.5), the second 1: throttled.
    let script = Script::new(&[unavailable; 4]);
    let policy = unavailable_policy(5, Some(Arc::clone(&throttle)));
    let (answer, attempts) = send_with(&script, 1024, "hello", policy).await;
    assert_eq!(status_of(&answer.unwrap()), Some(14));
    assert_eq!(attempts, 2);
    assert_eq!(throttle.milli_tokens(), 1_000);
}
