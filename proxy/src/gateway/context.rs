//! Per-request state, one plain struct carried through Pingora's phases.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tollgate_backends::routing::{BackendId, Lease};

use super::models::ModelRoute;
use super::request::{Endpoint, InferenceRequest};
use super::triton::TritonCall;
use super::upload::UploadStream;
use crate::admission::Ticket;
use crate::admission::limits::Windows;
use crate::admission::queue::Slot;
use crate::error::ApiError;
use crate::keys::store::KeyRecord;
use crate::metering::request::RequestUsage;

pub struct RequestContext {
    pub started: Instant,
    pub request_id: String,
    /// The key the request authenticated with.
    pub key: Option<Arc<KeyRecord>>,
    /// The inference request, once its body is parsed and its model resolved.
    pub inference: Option<Inference>,
    /// The rate windows reported in `x-ratelimit-*` headers.
    pub rate_windows: Windows,
    /// The GPU slot held while the request is forwarded.
    pub slot: Option<Slot>,
    /// How long the request waited for its slot.
    pub queue_wait: Option<Duration>,
    /// The inference endpoint asked for; `None` for the other routes, which
    /// the request metrics leave out.
    pub endpoint: Option<Endpoint>,
    /// When the first attempt's request header went to a backend.
    pub upstream_sent: Option<Instant>,
    /// When the answer's last byte arrived from the backend.
    pub upstream_done: Option<Instant>,
    /// Backends tried so far, in order; the last is the current one.
    pub tried: Vec<BackendId>,
    /// Counts the request in flight on the current backend.
    pub lease: Option<Lease>,
    /// The current backend's failure was reported to its breaker already.
    pub failure_reported: bool,
    /// Set when the current backend speaks Triton: the translation both ways.
    pub triton: Option<TritonCall>,
    /// Why the request could not be put in the backend's protocol (400).
    pub untranslatable: Option<ApiError>,
    /// The rest of an upload, streamed after admission.
    pub upload: Option<UploadStream>,
    /// The answer is a server-sent-event stream.
    pub streaming_response: bool,
    /// The last bytes of the stream sent so far.
    pub stream_tail: StreamTail,
    _in_flight: InFlightGuard,
}

impl RequestContext {
    pub fn new(in_flight: InFlightGuard) -> Self {
        Self {
            started: Instant::now(),
            request_id: String::new(),
            key: None,
            inference: None,
            rate_windows: Windows::default(),
            slot: None,
            queue_wait: None,
            endpoint: None,
            upstream_sent: None,
            upstream_done: None,
            tried: Vec::new(),
            lease: None,
            failure_reported: false,
            triton: None,
            untranslatable: None,
            upload: None,
            streaming_response: false,
            stream_tail: StreamTail::default(),
            _in_flight: in_flight,
        }
    }

    pub fn backend(&self) -> Option<BackendId> {
        self.tried.last().copied()
    }

    /// From the request sent upstream to the answer's last byte (or to now,
    /// when the answer did not end); zero when nothing went upstream.
    pub fn upstream_time(&self) -> Duration {
        self.upstream_sent.map_or(Duration::ZERO, |sent| {
            self.upstream_done
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(sent)
        })
    }

    /// The status the backend answered with (metering notes it).
    pub fn upstream_status(&self) -> Option<u16> {
        self.inference
            .as_ref()
            .and_then(|inference| inference.usage.upstream_status())
    }

    /// The backends that may serve the request (none before it is resolved).
    pub fn serving(&self) -> &[BackendId] {
        self.inference
            .as_ref()
            .map_or(&[], |inference| &inference.route.backends)
    }
}

/// An inference request's facts, resolved once after its body is parsed;
/// every later phase reads them from here.
pub struct Inference {
    /// The requested model as configured: backends, queue, encoding, label.
    pub route: Arc<ModelRoute>,
    pub request: InferenceRequest,
    /// Metering state; a request refused from here on is recorded as `rejected`.
    pub usage: RequestUsage,
    /// Tokens in one billed unit for the key's tier and this model.
    pub tokens_per_unit: u64,
    /// The reservation against the tier's limits, settled in `logging`.
    pub ticket: Option<Ticket>,
}

/// The last two bytes sent of a stream: whether it stopped between events
/// (after a blank line) or in the middle of one.
#[derive(Default)]
pub struct StreamTail([u8; 2]);

impl StreamTail {
    pub fn record(&mut self, chunk: &[u8]) {
        match chunk {
            [] => {}
            [only] => self.0 = [self.0[1], *only],
            [.., a, b] => self.0 = [*a, *b],
        }
    }

    /// True before anything was sent, and after an event's closing blank line.
    pub fn at_event_boundary(&self) -> bool {
        matches!(self.0, [0, 0] | [b'\n', b'\n'])
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

#[cfg(test)]
mod tests {
    use super::StreamTail;

    #[test]
    fn stream_tail_knows_event_boundaries_across_chunks() {
        let mut tail = StreamTail::default();
        assert!(tail.at_event_boundary());
        tail.record(b"data: {\"a\":1}\n");
        assert!(!tail.at_event_boundary());
        tail.record(b"\n");
        assert!(tail.at_event_boundary());
        tail.record(b"data: {\"half");
        assert!(!tail.at_event_boundary());
    }
}
