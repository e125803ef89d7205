//! A request's head as it goes on the wire: the origin in `:scheme` and `:authority`, and
//! none of the headers HTTP/2 forbids.

use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Uri};

use super::pool::Shared;

/// Puts the origin on the request URI, which h2 sends as `:scheme` and `:authority`: the
/// configured origin, else the authority the request names (a routed request's logical
/// host), else the dialled address. A `Host` header goes: over HTTP/2 it must not differ
/// from `:authority` (RFC 9113, 8.3.1), and nginx refuses a request that has both.
pub(crate) fn set_origin<T>(request: &mut Request<T>, state: &Shared) {
    let (scheme, dialled) = &state.origin;
    request.headers_mut().remove(http::header::HOST);
    let authority = match (&state.settings.origin, request.uri().authority()) {
        (None, Some(named)) => named.clone(),
        _ => dialled.clone(),
    };
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// Removes the connection-specific headers HTTP/2 forbids (RFC 9113, 8.2.2), as hyper does:
/// h2 refuses a request that has them.
pub(crate) fn strip_connection_headers(headers: &mut HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    if headers.is_empty() {
        return;
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}
