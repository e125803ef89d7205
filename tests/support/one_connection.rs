//! One [`Connection`] made on its own, for the tests that check a connection with no
//! balancer in front.

use std::time::Duration;

use tower_sd::ServiceInstance;
use tower_sd::connection::{Connection, ConnectionSettings, Connector, SendBody};
use tower_sd::endpoint::Connectivity;

/// A request body streamed chunk by chunk, for the tests that pace or drop one.
pub type Chunks = http_body_util::StreamBody<
    futures_util::stream::BoxStream<
        'static,
        Result<http_body::Frame<bytes::Bytes>, std::io::Error>,
    >,
>;

/// How long what must happen may take.
pub const WAIT: Duration = Duration::from_secs(5);

pub fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Settings that reconnect at once, so a test waits for what it checks, not for a backoff.
pub fn settings() -> ConnectionSettings {
    ConnectionSettings::default().reconnect_backoff(ms(1), ms(10))
}

/// A connection to 127.0.0.1:`port`.
pub fn connect<B: SendBody>(port: u16, settings: ConnectionSettings) -> Connection<B> {
    let instance = ServiceInstance::new("raw", "raw", "127.0.0.1", port);
    Connector::new(settings).connect(&instance).unwrap()
}

/// Waits until `connection` reports `want`.
pub async fn until_state<B: SendBody>(connection: &Connection<B>, want: Connectivity) {
    let readiness = connection.readiness();
    super::until(&format!("the connection is {want:?}"), || {
        readiness.get() == want
    })
    .await;
}
