//! [`Claim`]: the endpoint `poll_ready` picked, held for the request until `call` hands it
//! to the request's [`Completion`], and released if the caller gives up first.

use std::fmt;
use std::sync::Arc;

use super::completion::Completion;
use super::slot::SlotState;

/// The endpoint picked by `poll_ready`, and the clone of its service that `call` uses.
pub(super) struct Chosen<S, K> {
    pub(super) claim: Claim<S, K>,
    pub(super) service: S,
}

/// The chosen endpoint, claimed for the request: it counts as in flight from the pick (so
/// concurrent pickers see it), and holds the endpoint's outlier probe if the pick is one.
/// `call` turns it into the request's [`Completion`]; dropped before that (the caller gave
/// up, or the endpoint failed or left), it releases both.
pub(super) struct Claim<S, K> {
    /// `None` only once handed to the request.
    pub(super) state: Option<Arc<SlotState<S, K>>>,
    pub(super) probe: bool,
}

impl<S, K> Claim<S, K> {
    #[inline]
    pub(super) fn state(&self) -> &SlotState<S, K> {
        self.state.as_deref().expect("claimed until call")
    }
}

impl<S, K> Claim<S, K>
where
    S: Send + Sync + 'static,
    K: fmt::Debug + Send + Sync + 'static,
{
    /// The request takes the claim over.
    #[inline]
    pub(super) fn into_completion(mut self) -> Completion {
        let state = self.state.take().expect("claimed until call");
        Completion::start(state, self.probe)
    }
}

impl<S, K> Drop for Claim<S, K> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take()
            && self.probe
            && let Some(detector) = &state.detector
        {
            state.health.release_probe(detector);
        }
    }
}
