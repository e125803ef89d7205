//! One instance's endpoint: requests re-addressed to the instance, with the host the
//! [`HostHeader`] policy says, written the way the transport underneath carries it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Uri};
use pin_project_lite::pin_project;
use tower::Service;

use super::HostHeader;
use crate::error::BoxError;
use crate::instance::ServiceInstance;

/// What carries the requests to the instance, and so where the host goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wire {
    /// A wrapped client, which dials the URI's authority: the URI names the instance, and
    /// the logical host rides in `Host` (HTTP/1.1's way).
    Client,
    /// tower-sd's own HTTP/2 connection, which dials the instance by itself: the host goes
    /// in the URI, which becomes `:authority`, and no `Host` header is sent (RFC 9113,
    /// 8.3.1: a `Host` that differs from `:authority` must not be sent; nginx rejects a
    /// request with both).
    Http2,
}

/// One instance's endpoint: the client, with requests re-addressed to the instance.
#[derive(Clone)]
pub(super) struct Rewrite<S> {
    inner: S,
    authority: Authority,
    host_header: HostHeader,
    wire: Wire,
}

impl<S> Rewrite<S> {
    pub(super) fn new(
        inner: S,
        instance: &ServiceInstance,
        host_header: HostHeader,
        wire: Wire,
    ) -> Result<Self, BoxError> {
        Ok(Self {
            authority: instance.authority().parse()?,
            inner,
            host_header,
            wire,
        })
    }

    fn readdress<B>(&self, request: Request<B>) -> Result<Request<B>, BoxError> {
        let (mut head, body) = request.into_parts();
        let authority = match (self.wire, self.host_header) {
            (Wire::Client, HostHeader::Logical) => {
                if let (false, Some(logical)) =
                    (head.headers.contains_key(HOST), head.uri.authority())
                {
                    head.headers
                        .insert(HOST, HeaderValue::from_str(logical.as_str())?);
                }
                self.authority.clone()
            }
            (Wire::Http2, HostHeader::Logical) => match head.headers.remove(HOST) {
                // The caller's own host wins, as it does in a `Host` header.
                Some(host) => Authority::try_from(host.as_bytes())?,
                None => match head.uri.authority() {
                    Some(logical) => logical.clone(),
                    None => self.authority.clone(),
                },
            },
            // The transport derives the host from the URI: hyper-util's client writes `Host`
            // over HTTP/1.1 and `:authority` over HTTP/2; tower-sd's connections
            // `:authority`.
            (_, HostHeader::Instance) => {
                head.headers.remove(HOST);
                self.authority.clone()
            }
        };
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.authority = Some(authority);
        uri.scheme.get_or_insert(Scheme::HTTP);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        head.uri = Uri::from_parts(uri)?;
        Ok(Request::from_parts(head, body))
    }
}

impl<S, B> Service<Request<B>> for Rewrite<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RewriteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.readdress(request) {
            Ok(request) => RewriteFuture::Sent {
                inner: self.inner.call(request),
            },
            Err(error) => RewriteFuture::Invalid { error: Some(error) },
        }
    }
}

pin_project! {
    #[project = RewriteProj]
    /// The response future of [`Rewrite`].
    pub(super) enum RewriteFuture<F> {
        Sent { #[pin] inner: F },
        Invalid { error: Option<BoxError> },
    }
}

impl<F, T, E> Future for RewriteFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RewriteProj::Sent { inner } => inner.poll(cx).map_err(Into::into),
            RewriteProj::Invalid { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readdressed(
        instance: &ServiceInstance,
        policy: HostHeader,
        wire: Wire,
        request: Request<()>,
    ) -> Request<()> {
        let rewrite = Rewrite::new((), instance, policy, wire).unwrap();
        rewrite.readdress(request).unwrap()
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    /// Catches the instance lost from the URI (the wrapped client would dial the service
    /// name) and the logical host lost from `Host`.
    #[test]
    fn a_wrapped_client_dials_the_instance_and_sends_the_logical_host() {
        let v4 = ServiceInstance::new("a", "svc", "10.0.0.7", 8080);
        let request = readdressed(
            &v4,
            HostHeader::Logical,
            Wire::Client,
            get("http://svc/a/b?c=d"),
        );
        assert_eq!(request.uri(), "http://10.0.0.7:8080/a/b?c=d");
        assert_eq!(request.headers()[HOST], "svc");

        let v6 = ServiceInstance::new("b", "svc", "::1", 8080);
        let with_host = Request::get("http://svc:9999/x")
            .header(HOST, "custom")
            .body(())
            .unwrap();
        let request = readdressed(&v6, HostHeader::Instance, Wire::Client, with_host);
        assert_eq!(request.uri(), "http://[::1]:8080/x");
        assert!(
            request.headers().get(HOST).is_none(),
            "left to the client, which writes the URI's"
        );
    }

    #[test]
    fn an_existing_host_header_wins_under_the_logical_policy() {
        let instance = ServiceInstance::new("a", "svc", "10.0.0.7", 8080);
        let request = Request::get("http://svc/")
            .header(HOST, "custom")
            .body(())
            .unwrap();
        let request = readdressed(&instance, HostHeader::Logical, Wire::Client, request);
        assert_eq!(request.headers()[HOST], "custom");
    }

    /// Catches a `Host` header sent over HTTP/2 beside `:authority` (nginx answers 400), and
    /// the host lost on the way: it goes in the URI, which the connection sends as
    /// `:authority`.
    #[test]
    fn over_http2_the_host_goes_in_the_authority_and_no_host_header_is_sent() {
        let instance = ServiceInstance::new("a", "svc", "10.0.0.7", 8080);
        let logical = |request| readdressed(&instance, HostHeader::Logical, Wire::Http2, request);
        let request = logical(get("http://svc:81/p?q"));
        assert_eq!(request.uri(), "http://svc:81/p?q");
        assert!(request.headers().get(HOST).is_none());

        let request = logical(
            Request::get("http://svc/")
                .header(HOST, "custom")
                .body(())
                .unwrap(),
        );
        assert_eq!(request.uri(), "http://custom/");
        assert!(request.headers().get(HOST).is_none());

        let request = readdressed(
            &instance,
            HostHeader::Instance,
            Wire::Http2,
            Request::get("http://svc/")
                .header(HOST, "custom")
                .body(())
                .unwrap(),
        );
        assert_eq!(request.uri(), "http://10.0.0.7:8080/");
        assert!(request.headers().get(HOST).is_none());
    }
}
