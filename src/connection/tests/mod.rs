//! One [`Connection`] on its own, with no balancer in front, against servers on 127.0.0.1
//! that do what a real one does only at its worst (`states.rs`), and what it puts on the
//! wire (`wire.rs`); with the helpers both use.

mod states;
mod wire;

use std::time::Duration;

use crate::ServiceInstance;
use crate::connection::{Connection, ConnectionSettings, Connector, SendBody};
use crate::endpoint::Connectivity;

/// A request body streamed chunk by chunk, for the tests that pace or drop one.
pub(super) type Chunks = http_body_util::StreamBody<
    futures_util::stream::BoxStream<
        'static,
        Result<http_body::Frame<bytes::Bytes>, std::io::Error>,
    >,
>;

/// How long what must happen may take.
pub(super) const WAIT: Duration = Duration::from_secs(5);

pub(super) fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Settings that reconnect at once, so a test waits for what it checks, not for a backoff.
pub(super) fn settings() -> ConnectionSettings {
    ConnectionSettings::default().reconnect_backoff(ms(1), ms(10))
}

/// A connection to 127.0.0.1:`port`.
pub(super) fn connect<B: SendBody>(port: u16, settings: ConnectionSettings) -> Connection<B> {
    let instance = ServiceInstance::new("raw", "raw", "127.0.0.1", port);
    Connector::new(settings).connect(&instance).unwrap()
}

/// Waits until `connection` reports `want`.
pub(super) async fn until_state<B: SendBody>(connection: &Connection<B>, want: Connectivity) {
    let readiness = connection.readiness();
    tower_sd_testkit::until(&format!("the connection is {want:?}"), || {
        readiness.get() == want
    })
    .await;
}
