//! The gRPC status a call's failure becomes.

use std::time::Duration;

use crate::connection::ConnectionError;
use crate::error::{BoxError, Error};

/// The gRPC status for a request's error: [`Error`]s map by kind, connection errors to
/// `UNAVAILABLE` (nothing reached the server) or by their HTTP/2 reset code.
pub(super) fn status_of(error: BoxError) -> tonic::Status {
    let error = match error.downcast::<Error>() {
        Ok(error) => return tonic::Status::from(*error),
        Err(error) => error,
    };
    match error.downcast::<ConnectionError>() {
        Ok(error) => match *error {
            ConnectionError::Request { source, .. } => status_of_transport(&*source),
            other => tonic::Status::unavailable(crate::error::Chain(&other).to_string()),
        },
        Err(error) => tonic::Status::from_error(error),
    }
}

/// The gRPC status of a transport error, as gRPC maps HTTP/2 reset codes (and tonic does).
pub(super) fn status_of_transport(error: &(dyn std::error::Error + 'static)) -> tonic::Status {
    use tonic::Code;
    let message = crate::error::Chain(error).to_string();
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && let Some(reason) = h2.reason()
        {
            let code = match reason {
                h2::Reason::REFUSED_STREAM => Code::Unavailable,
                h2::Reason::CANCEL => Code::Cancelled,
                h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
                h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
                _ => Code::Internal,
            };
            return tonic::Status::new(code, message);
        }
        cause = error.source();
    }
    // Connection closed, reset, timed out: the server is not reachable.
    tonic::Status::unavailable(message)
}

impl From<Error> for tonic::Status {
    /// The status for the error's kind, with the whole chain of causes as its message.
    fn from(error: Error) -> Self {
        let message = crate::error::Chain(&error).to_string();
        match error {
            Error::NoEndpoints { .. }
            | Error::NoReadyEndpoints { .. }
            | Error::NoHealthyEndpoints { .. }
            | Error::DiscoveryStopped { .. }
            | Error::Unreachable { .. }
            | Error::Timeout { .. } => tonic::Status::unavailable(message),
            Error::InvalidConfig { .. } | Error::InvalidInstance { .. } => {
                tonic::Status::invalid_argument(message)
            }
            Error::Unsupported { .. } => tonic::Status::unimplemented(message),
            _ => tonic::Status::internal(message),
        }
    }
}

/// Says in a failed answer's `grpc-message` how many attempts the call made.
pub(super) fn note_attempts(headers: &mut http::HeaderMap, attempts: u32) {
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default();
    // `grpc-message` is percent-encoded; what is added needs no encoding.
    let noted = format!("{message} ({attempts} attempts)");
    if let Ok(value) = http::HeaderValue::from_str(noted.trim_start()) {
        headers.insert("grpc-message", value);
    }
}

pub(super) fn deadline_exceeded(limit: Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("the call's deadline of {limit:?} passed"))
}
