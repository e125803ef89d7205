//! The cheapest possible endpoint, shared by the balancer bench and `examples/picks.rs`.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use tower::Service;

/// Always ready; answers at once.
#[derive(Clone, Copy, Debug)]
pub struct Trivial;

impl Service<()> for Trivial {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        ready(Ok(()))
    }
}
