//! Per-request state, one plain struct carried through Pingora's phases.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::Notify;
use tollgate_backends::routing::BackendId;

use super::request::{InferenceRequest, Route};
use crate::keys::store::KeyRecord;

pub struct RequestContext {
    pub started: Instant,
    pub request_id: String,
    pub route: Option<Route>,
    pub key: Option<Arc<KeyRecord>>,
    pub request: Option<InferenceRequest>,
    /// Backends tried so far, in order; the last is the current one.
    pub tried: Vec<BackendId>,
    /// The answer is a server-sent-event stream.
    pub streaming_response: bool,
    _in_flight: InFlightGuard,
}

impl RequestContext {
    pub fn new(in_flight: InFlightGuard) -> Self {
        Self {
            started: Instant::now(),
            request_id: String::new(),
            route: None,
            key: None,
            request: None,
            tried: Vec::new(),
            streaming_response: false,
            _in_flight: in_flight,
        }
    }

    pub fn backend(&self) -> Option<BackendId> {
        self.tried.last().copied()
    }
}

/// Requests in progress, so a shutdown can wait for them and no longer.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(self))
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no request is in progress.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counts one request as in progress until dropped with its context.
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
