//! Active health checking (gRFC A17): each instance's `grpc.health.v1.Health/Watch` stream
//! decides whether the balancer picks it.
//!
//! When a channel's service config names a `healthCheckConfig.serviceName`, every instance
//! gets a task that, whenever its connection is open, watches that service's health over
//! it (tonic-health's client):
//!
//! - an instance is picked only while its last answer is `SERVING`; any other answer
//!   (`NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`) marks it
//!   [not serving](crate::endpoint::Readiness::set_serving): out of the picks, its connection
//!   open, its place in discovery kept, its calls in flight left to finish;
//! - a new connection is not picked until its first answer (A17: no calls race ahead of
//!   the first verdict);
//! - a server without the health service (`UNIMPLEMENTED`) is used as if it had no check,
//!   with one warning for that instance (A17);
//! - a Watch that ends any other way is started again after the connection settings'
//!   reconnect backoff (reset by each answer). **Where we differ from A17**, which marks the
//!   instance failing meanwhile: the instance keeps its last answer, or is used if it had
//!   none, since a broken health stream (a proxy's stream timeout, a health service
//!   restarting) is no answer about health; passive outlier detection still catches an
//!   instance that fails calls.
//!
//! A17 checks each connection; tower-sd checks each instance, over whichever of its
//! connections has room (there is one unless the server's stream limit makes more), since
//! the balancer picks instances. The Watch stream holds one stream of the server's limit,
//! as A17 notes. The task lives exactly as long as the balancer keeps the instance.

use std::sync::Arc;

use crate::endpoint::Signal;
use tonic::body::Body;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::connection::Connection;
use crate::connection::replay::ReplayBody;
use crate::endpoint::{Companion, Connectivity, Readiness};

/// What every instance's health check of one channel shares.
#[derive(Debug)]
pub(crate) struct HealthCheck {
    /// The service name the Watch asks about (`""`: the whole server).
    pub(crate) name: String,
    /// The channel's service, for logs.
    pub(crate) service: Arc<str>,
    /// The backoff between Watch attempts, from the connection settings.
    pub(crate) backoff: Backoff,
}

/// How a Watch ended.
enum Ended {
    /// The server has no health service: the check is off for this instance.
    Unimplemented,
    /// Any other end; whether it answered at least once.
    Broke { answered: bool },
}

/// Starts checking the health of the instance served by `connection`; the check stops
/// when the returned companion is dropped with the endpoint.
pub(crate) fn start(
    check: &Arc<HealthCheck>,
    connection: Connection<Body>,
    instance: String,
) -> Companion {
    let readiness = connection.readiness();
    // Not picked before the first answer.
    readiness.set_serving(false);
    let task = tokio::spawn(run(Arc::clone(check), connection, readiness, instance));
    Companion::task(task.abort_handle())
}

async fn run(
    check: Arc<HealthCheck>,
    connection: Connection<Body>,
    readiness: Readiness,
    instance: String,
) {
    let changed = Arc::new(Signal::default());
    readiness.listen(&changed);
    let mut backoff = check.backoff.clone();
    // Whether the open connection has had an answer.
    let mut answered = false;
    loop {
        if !readiness.until_ready(&changed).await {
            return;
        }
        let ended = watch(&check, &connection, &readiness).await;
        match ended {
            Ended::Unimplemented => {
                warn!(service = %check.service, instance, "the server has no gRPC health service (UNIMPLEMENTED): health checking is off for this instance");
                crate::metrics::health(&check.service, "unimplemented");
                readiness.set_serving(true);
                return;
            }
            Ended::Broke { answered: now } => {
                if now {
                    answered = true;
                    backoff.reset();
                }
            }
        }
        if readiness.get() != Connectivity::Ready {
            // The connection is gone: the next one waits for its own first answer.
            readiness.set_serving(false);
            answered = false;
            continue;
        }
        if !answered && !readiness.is_serving() {
            debug!(service = %check.service, instance, "the health Watch ended before any answer; the instance is used meanwhile");
            readiness.set_serving(true);
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One Watch stream, applying each answer, until it ends.
async fn watch(check: &HealthCheck, connection: &Connection<Body>, readiness: &Readiness) -> Ended {
    let service = connection
        .clone()
        .map_request(|request: http::Request<Body>| request.map(ReplayBody::from));
    let request = HealthCheckRequest {
        service: check.name.clone(),
    };
    let mut stream = match HealthClient::new(service).watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return ended(check, &status, false),
    };
    let mut answered = false;
    loop {
        match stream.message().await {
            Ok(Some(answer)) => {
                answered = true;
                let serving = answer.status() == ServingStatus::Serving;
                debug!(service = %check.service, status = ?answer.status(), "health answer");
                if readiness.is_serving() != serving {
                    let status = if serving { "serving" } else { "not_serving" };
                    crate::metrics::health(&check.service, status);
                }
                readiness.set_serving(serving);
            }
            Ok(None) => return Ended::Broke { answered },
            Err(status) => return ended(check, &status, answered),
        }
    }
}

fn ended(check: &HealthCheck, status: &tonic::Status, answered: bool) -> Ended {
    if status.code() == tonic::Code::Unimplemented {
        return Ended::Unimplemented;
    }
    debug!(service = %check.service, code = ?status.code(), message = status.message(), "the health Watch ended");
    Ended::Broke { answered }
}
