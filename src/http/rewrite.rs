//! One instance's endpoint: the wrapped client, with requests re-addressed to the instance.

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

/// One instance's endpoint: the client, with requests re-addressed to the instance.
#[derive(Clone)]
pub(super) struct Rewrite<S> {
    inner: S,
    authority: Authority,
    host: HeaderValue,
    host_header: HostHeader,
}

impl<S> Rewrite<S> {
    pub(super) fn new(
        inner: S,
        instance: &ServiceInstance,
        host_header: HostHeader,
    ) -> Result<Self, BoxError> {
        let authority = instance.authority();
        Ok(Self {
            host: HeaderValue::from_str(&authority)?,
            authority: authority.parse()?,
            inner,
            host_header,
        })
    }

    fn readdress<B>(&self, request: Request<B>) -> Result<Request<B>, BoxError> {
        let (mut head, body) = request.into_parts();
        match self.host_header {
            HostHeader::Logical => {
                if let (false, Some(logical)) =
                    (head.headers.contains_key(HOST), head.uri.authority())
                {
                    head.headers
                        .insert(HOST, HeaderValue::from_str(logical.as_str())?);
                }
            }
            HostHeader::Instance => {
                head.headers.insert(HOST, self.host.clone());
            }
        }
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.authority = Some(self.authority.clone());
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

    fn readdressed(instance: &ServiceInstance, policy: HostHeader, uri: &str) -> Request<()> {
        let rewrite = Rewrite::new((), instance, policy).unwrap();
        rewrite
            .readdress(Request::get(uri).body(()).unwrap())
            .unwrap()
    }

    #[test]
    fn rewrites_the_authority_and_keeps_path_and_query() {
        let v4 = ServiceInstance::new("a", "svc", "10.0.0.7", 8080);
        let request = readdressed(&v4, HostHeader::Logical, "http://svc/a/b?c=d");
        assert_eq!(request.uri(), "http://10.0.0.7:8080/a/b?c=d");
        assert_eq!(request.headers()[HOST], "svc");

        let v6 = ServiceInstance::new("b", "svc", "::1", 8080);
        let request = readdressed(&v6, HostHeader::Instance, "http://svc:9999/x");
        assert_eq!(request.uri(), "http://[::1]:8080/x");
        assert_eq!(request.headers()[HOST], "[::1]:8080");
    }

    #[test]
    fn an_existing_host_header_wins_under_the_logical_policy() {
        let instance = ServiceInstance::new("a", "svc", "10.0.0.7", 8080);
        let rewrite = Rewrite::new((), &instance, HostHeader::Logical).unwrap();
        let request = Request::get("http://svc/")
            .header(HOST, "custom")
            .body(())
            .unwrap();
        assert_eq!(
            rewrite.readdress(request).unwrap().headers()[HOST],
            "custom"
        );
    }
}
