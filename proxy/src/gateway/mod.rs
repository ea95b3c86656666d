//! The OpenAI-compatible data plane: Tollgate's `ProxyHttp` implementation.
//!
//! Phases and their jobs:
//! - `request_filter`: request id, route, health answers, key check, body
//!   read and parse, model access, prompt count and event id, then
//!   admission (see [`crate::admission`]): limits and quota reserved, a GPU
//!   slot waited for by tier priority. Anything refused is answered here in
//!   OpenAI's error shape, with `Retry-After` when waiting helps.
//! - `upstream_peer`: choose a backend for the model (selection only).
//! - `upstream_request_filter`: swap the client's key for the backend's
//!   credential, frame the body we send.
//! - `request_body_filter`: send the body read in `request_filter`.
//! - `response_filter`: add `x-request-id`, the `x-ratelimit-*` headers and
//!   the queue wait; note whether the answer streams.
//! - `fail_to_connect` / `error_while_proxy` / `fail_to_proxy`: one retry on
//!   another backend when a connection fails, or the backend fails before its
//!   answer began (not on a timeout); the backend's breaker hears of it;
//!   otherwise an OpenAI error, or an SSE error event when a stream was
//!   already under way.
//! - `response_body_filter`: watch the answer for usage and generated text
//!   (see [`crate::metering::request`]); drop the usage chunk we asked for on the client's behalf.
//! - `logging`: release the GPU slot, one usage event per metered request
//!   handed to the writer without waiting, settle the quota reservation;
//!   the request metrics (see [`metrics`]) and one log line per request.

pub mod audio_probe;
pub mod batches;
pub mod comfyui;
pub mod context;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod request;
pub mod routes;
pub mod triton;
pub mod upload;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::Pool;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use secrecy::ExposeSecret;
use serde_json::json;
use tollgate_backends::balance::RequestFacts;
use tollgate_backends::protocol::Protocol;
use tollgate_backends::routing::{Outcome, UpstreamSelector};
use tollgate_metering::units::UnitKind;

use self::audio_probe::AudioProber;
use self::context::{InFlight, Inference, RequestContext};
use self::jobs::wants_async;
use self::metrics::{Observation, RequestMetrics};
use self::models::{ModelRoute, ModelRoutes};
use self::request::{BodyError, Endpoint, InferenceRequest, read_body};
use self::routes::{Resource, Route};
use self::triton::TritonCall;
use self::upload::read_upload;
use crate::admission::headers::{rate_limit_headers, retry_after};
use crate::admission::queue::Slot;
use crate::admission::{Admission, Estimate, Refusal, TokenEstimate};
use crate::billing::{BillingSessions, StripeWebhooks};
use crate::config::{CustomRoute, UpstreamTimeouts};
use crate::error::ApiError;
use crate::jobs::Jobs;
use crate::jobs::pass::JOB_RUN_HEADER;
use crate::keys::cache::KeyCache;
use crate::keys::store::{KeyRecord, StoreError};
use crate::metering::request::{FinishedRequest, Metered, Metering};
use crate::readiness::PostgresReadiness;

pub const REQUEST_ID: &str = "x-request-id";
/// How long the request waited for a GPU slot, in milliseconds.
pub const QUEUE_WAIT: &str = "x-tollgate-queue-wait-ms";
/// On answers to requests held while the fleet woke from zero.
pub const COLD_START: &str = "x-tollgate-cold-start";
/// Attempts per request: the first backend, and one other after a failed connection.
const MAX_ATTEMPTS: usize = 2;
/// Pingora error type for "no backend serves this model".
const NO_BACKEND: &str = "no_backend";
/// The request cannot be put in the chosen backend's protocol.
const UNTRANSLATABLE: &str = "untranslatable";
/// An upload broke its form (or its limit) after forwarding began.
const BAD_UPLOAD: &str = "bad_upload";
/// How long a refused upload is read and dropped before the connection closes
/// (nginx's `lingering_time` plays this role there).
const UPLOAD_DISCARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Pooled upstream connections idle longer than this are not reused: below
/// uvicorn's 5 s keep-alive (vLLM, SGLang), so a POST never lands on a
/// connection the backend is closing (Pingora does not retry POSTs).
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub struct Gateway {
    pub keys: KeyCache,
    pub selector: Arc<dyn UpstreamSelector>,
    /// The header whose value keeps a session on one backend.
    pub session_header: String,
    pub pool: Pool,
    /// Whether Postgres answered lately, for `/readyz`.
    pub readiness: Arc<PostgresReadiness>,
    pub in_flight: Arc<InFlight>,
    pub max_body_bytes: usize,
    /// The limit of an upload (an audio file), which streams.
    pub max_upload_bytes: usize,
    /// Reads uploads' audio lengths in a child process.
    pub audio_prober: AudioProber,
    pub timeouts: UpstreamTimeouts,
    /// Every model a backend serves, resolved from config.
    pub models: ModelRoutes,
    /// Whether revocations arrive through Redis right now (`None`: no Redis).
    pub revocation_fanout: Option<Arc<AtomicBool>>,
    pub metering: Metering,
    pub metrics: RequestMetrics,
    pub admission: Arc<Admission>,
    /// `None` without billing's webhook secret: the route answers 404.
    pub stripe_webhooks: Option<StripeWebhooks>,
    /// `None` with billing off: the `/v1/billing/*` routes answer 404.
    pub billing_sessions: Option<Arc<BillingSessions>>,
    /// `[[routes]]`, in config order.
    pub custom_routes: Vec<CustomRoute>,
    /// Async jobs: their store, results and this gateway's runner.
    pub jobs: Arc<Jobs>,
    /// Where the ComfyUI bridge listens (`None`: no comfyui backend).
    pub comfyui_bridge: Option<std::net::SocketAddr>,
}

/// How `request_filter` ends when it does not forward.
enum Stop {
    /// Answer with this error.
    Refuse(ApiError),
    /// Answer with this JSON (health checks, the model list).
    Answer(u16, serde_json::Value),
    /// Answer with this JSON and these headers (a job's `Location`).
    AnswerWith(u16, serde_json::Value, Vec<(&'static str, String)>),
    /// The answer was written already (a job's result, streamed).
    Written,
    /// The client is gone: nothing to answer.
    ClientGone(Box<Error>),
}

impl From<ApiError> for Stop {
    fn from(error: ApiError) -> Self {
        Self::Refuse(error)
    }
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        Self::Refuse(error.into())
    }
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Self {
        Self::Refuse(refusal.error)
    }
}

impl From<BodyError> for Stop {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::Refuse(error) => Self::Refuse(error),
            BodyError::ClientGone(error) => Self::ClientGone(error),
        }
    }
}

impl Gateway {
    /// Everything `request_filter` decides; `Ok` means forward upstream.
    async fn admit(&self, session: &mut Session, ctx: &mut RequestContext) -> Result<(), Stop> {
        let header = session.req_header();
        request::check_header_size(header)?;
        let route = routes::route(&header.method, header.uri.path(), &self.custom_routes)?;
        // The routes beside inference are rare and their futures large (a
        // Stripe call's is ~20 KiB): each is boxed, so the state of every
        // inference request, moved into a box per request, stays small.
        let endpoint = match route {
            Route::Healthz => return Err(Stop::Answer(200, json!({"status": "ok"}))),
            Route::StripeWebhook => return Err(Box::pin(self.stripe_webhook(session)).await),
            Route::Readyz => return Err(self.readiness()),
            Route::Models
            | Route::Usage
            | Route::BillingCheckout
            | Route::BillingPortal
            | Route::Resource(..)
            | Route::Callbacks => None,
            Route::Inference(endpoint) => Some(endpoint),
            Route::Custom(_) => Some(Endpoint::Custom),
        };
        ctx.endpoint = endpoint;
        // A job's run, sent by this gateway's runner (see `crate::jobs::pass`).
        let run = match header.headers.get(JOB_RUN_HEADER) {
            None => None,
            Some(value) => Some(
                self.jobs
                    .pass
                    .verify(value.as_bytes())
                    .ok_or(ApiError::InvalidKey)?,
            ),
        };
        let key = match &run {
            Some(run) => self.keys.authenticate_hash(run.key_hash).await?,
            None => self.keys.authenticate(bearer_token(header)?).await?,
        };
        let asked_async = run.is_none() && wants_async(header);
        let Some(endpoint) = endpoint else {
            return Err(match route {
                Route::Usage => Stop::Answer(200, Box::pin(self.own_usage(header, &key)).await?),
                Route::Callbacks => Box::pin(self.callbacks_api(session, &key))
                    .await
                    .unwrap_or_else(|stop| stop),
                Route::Resource(Resource::Jobs, action) => {
                    Box::pin(self.jobs_api(action, session, &key))
                        .await
                        .unwrap_or_else(|stop| stop)
                }
                Route::Resource(resource, action) => {
                    Box::pin(self.batches_api(resource, action, session, &key))
                        .await
                        .unwrap_or_else(|stop| stop)
                }
                Route::BillingCheckout | Route::BillingPortal => Stop::Answer(
                    200,
                    Box::pin(self.billing_session(route, session, &key)).await?,
                ),
                _ => Stop::Answer(200, self.model_list(&key)),
            });
        };
        ctx.key = Some(Arc::clone(&key));
        let custom = match route {
            Route::Custom(i) => self.custom_routes.get(i),
            _ => None,
        };
        let mut request = if endpoint.takes_upload() {
            // A job's upload is stored whole: it is read to its end here.
            let upload = read_upload(
                session,
                endpoint,
                self.max_upload_bytes,
                &self.audio_prober,
                asked_async,
            )
            .await?;
            ctx.upload = upload.stream;
            upload.request
        } else {
            let limit = custom.map_or(self.max_body_bytes, |c| c.max_body_bytes);
            let body = read_body(session, limit).await?;
            match custom {
                Some(custom) => InferenceRequest::custom(custom, body),
                None => request::parse(endpoint, body)?,
            }
        };
        let route = self.model_route(&key, &request.model)?;
        if asked_async {
            // The client's bytes, as checked: nothing is rewritten before `start`.
            let header = session.req_header();
            let content_type = header
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let path = header.uri.path().trim_end_matches('/').to_owned();
            let body = request.upstream_body.clone();
            return Err(
                Box::pin(self.submit_job(session, &key, path, content_type, body))
                    .await
                    .unwrap_or_else(|stop| stop),
            );
        }
        let mut usage = self.metering.start(&mut request);
        usage.units_reported_at(custom.and_then(|c| c.reported.clone()));
        let tokens_per_unit = self.metering.tokens_per_unit(&key.tier, &route);
        let Inference {
            route,
            request,
            usage,
            ticket,
            ..
        } = ctx.inference.insert(Inference {
            route,
            request,
            usage,
            tokens_per_unit,
            ticket: None,
        });
        let unit_kind = request.unit_kind;
        // The prompt is counted before forwarding only when something needs
        // the count then (a limit reserving tokens, a Triton backend's
        // usage); otherwise the writer counts it beside the backend's figure.
        if unit_kind == UnitKind::Tokens
            && (route.counts_prompt_first || self.admission.needs_prompt_tokens(&key.tier))
        {
            // A key throttled by a rule that needs no token count is refused
            // before its prompt keeps a CPU busy.
            if self.metering.counting_is_costly(request)
                && let Err(refusal) = self.admission.precheck(&key).await
            {
                ctx.rate_windows = refusal.windows;
                return Err(refusal.into());
            }
            self.metering
                .count_prompt(usage, request, route.encoding)
                .await;
        }
        let estimate = match unit_kind {
            UnitKind::Tokens => Estimate::Tokens(TokenEstimate {
                // Without local counting, a rough prompt size; settlement corrects it.
                prompt_tokens: usage
                    .counted_prompt()
                    .unwrap_or(request.upstream_body.len() as u64 / 4),
                max_tokens: request.max_tokens,
                sequences: request.sequences,
                generates: request.endpoint.generates(),
                tokens_per_unit,
            }),
            kind => Estimate::Units {
                kind,
                // A custom route reserves what its config says (GPU-seconds
                // are only known once the slot is given back).
                units: custom.map_or_else(|| self.metering.units_asked(request), |c| c.reserve),
            },
        };
        match self.admission.check(&key, usage.event_id, estimate).await {
            Ok(Some(granted)) => {
                ctx.rate_windows = granted.windows;
                if let Some(max_tokens) = granted.send_max_tokens {
                    request.set_max_tokens(max_tokens);
                }
                *ticket = Some(granted);
            }
            Ok(None) => {}
            Err(refusal) => {
                ctx.rate_windows = refusal.windows;
                return Err(refusal.into());
            }
        }
        // Every rewrite is made: the body sent upstream is written once.
        request.seal_body();
        if let Some(run) = &run {
            self.jobs
                .note_wait(run, &key.tier, &route.queue.snapshot())
                .await;
        }
        // Waiting costs no thread; a client that leaves stops waiting at once.
        let queued_at = Instant::now();
        let waited = tokio::select! {
            biased;
            slot = self.admission.wait_for_slot(&key.tier, &route.queue) => slot.map_err(Stop::from),
            gone = client_gone(session) => Err(Stop::ClientGone(gone)),
        };
        // Queue time is not Tollgate's overhead, whether a slot came or not.
        ctx.queue_wait = Some(
            waited
                .as_ref()
                .map_or_else(|_| queued_at.elapsed(), Slot::waited),
        );
        ctx.slot = Some(waited?);
        if let Some(run) = &run {
            // The job's request goes to a backend now, or not at all.
            if !self
                .jobs
                .mark_sent(run, &key.tier)
                .await
                .map_err(ApiError::from)?
            {
                return Err(ApiError::Conflict("This job was cancelled.".to_owned()).into());
            }
            // Its event from here is the job's one usage event, whatever its
            // attempts (see `JobRun`); a run refused before it has its own.
            usage.identify_as(run.id, run.submitted_at());
        }
        usage.slot_granted();
        Ok(())
    }

    /// The route of `model`, if `key` may use it.
    fn model_route(&self, key: &KeyRecord, model: &str) -> Result<Arc<ModelRoute>, ApiError> {
        match self.models.get(model) {
            Some(route) if key.allows_model(model) => Ok(Arc::clone(route)),
            _ => Err(ApiError::ModelNotFound(model.to_owned())),
        }
    }

    /// Records the request's usage event, once (see [`Metering::record`]);
    /// `None` for a request that never reached metering.
    fn record_usage(&self, ctx: &mut RequestContext) -> Option<Metered> {
        let backend = ctx.backend().and_then(|id| self.selector.backend(id));
        let (inference, key) = (ctx.inference.as_mut()?, ctx.key.as_ref()?);
        Some(self.metering.record(FinishedRequest {
            usage: &mut inference.usage,
            request: &inference.request,
            encoding: inference.route.encoding,
            tokens_per_unit: inference.tokens_per_unit,
            key,
            request_id: &ctx.request_id,
            backend: backend.as_deref().map(|b| b.name.as_str()),
            started: ctx.started,
        }))
    }

    /// The request in Triton's generate protocol, for this attempt.
    fn triton_call(&self, ctx: &mut RequestContext) -> Result<TritonCall, ApiError> {
        let Some(inference) = &mut ctx.inference else {
            return Err(ApiError::BadGateway);
        };
        TritonCall::new(
            &mut inference.request,
            &ctx.request_id,
            // Config requires counting for Triton backends; 0 only if the
            // counter failed, and then the event says so by its mismatch.
            inference.usage.counted_prompt().unwrap_or(0),
            inference.route.encoding,
        )
    }
}

/// The key from `Authorization: Bearer …`.
fn bearer_token(header: &RequestHeader) -> Result<&str, ApiError> {
    let value = header
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::MissingKey)?;
    let value = value.to_str().map_err(|_| ApiError::InvalidKey)?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::InvalidKey)?;
    if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
        Ok(token.trim())
    } else {
        Err(ApiError::InvalidKey)
    }
}

/// Resolves when the client closes its connection while its request waits.
/// Once the body is read, Pingora reads one byte as a probe: end of stream
/// is the client leaving; bytes are a request pipelined behind this one,
/// which Pingora refuses (pipelining is off) and which therefore also ends
/// it. A body still arriving (an upload streamed on after admission) is not
/// probed: the byte read would be one of its own; it never resolves then.
async fn client_gone(session: &mut Session) -> Box<Error> {
    if !session.is_body_done() {
        return std::future::pending().await;
    }
    match session.read_body_or_idle(true).await {
        Err(error) => error.into_down(),
        Ok(_) => std::future::pending().await,
    }
}

/// The client's `x-request-id` when it is sane, else a new UUIDv7.
fn request_id(header: &RequestHeader) -> String {
    header
        .headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned)
}

/// Writes a complete JSON answer from `request_filter` or `fail_to_proxy`.
async fn respond_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
) -> pingora::Result<()> {
    respond_json_with(session, status, body, request_id, Vec::new()).await
}

/// [`respond_json`] with more headers (`Allow` on a 405, `Retry-After` and
/// the rate-limit headers on a 429).
async fn respond_json_with(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: Vec<(&'static str, String)>,
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(status, Some(5 + extra.len()))?;
    header.insert_header(header::CONTENT_TYPE, "application/json")?;
    for (name, value) in extra {
        header.insert_header(name, value)?;
    }
    header.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(REQUEST_ID, request_id)?;
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// The status of the final response already sent, if any. A `100 Continue`
/// (sent while reading the body) is not one: an error can still be answered.
fn final_status(session: &Session) -> Option<u16> {
    session
        .response_written()
        .map(|r| r.status)
        .filter(|status| !status.is_informational())
        .map(|status| status.as_u16())
}

/// Reads and drops the rest of a refused upload, for a bounded time. A client
/// still sending when the connection closes gets a broken pipe instead of our
/// 413; like nginx's lingering close, this lets it finish and read the answer.
async fn discard_upload(session: &mut Session) {
    let headers = &session.req_header().headers;
    // A client that asked `Expect: 100-continue` for a body declared too large
    // never got the 100, so it is not sending: nothing to wait for.
    let withheld = headers.contains_key(header::CONTENT_LENGTH)
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let drained = !withheld
        && matches!(
            tokio::time::timeout(UPLOAD_DISCARD_TIMEOUT, session.drain_request_body()).await,
            Ok(Ok(()))
        );
    if !drained {
        session.set_keepalive(None);
    }
}

/// What a request's backend did, for its breaker: a 5xx, or an error on
/// the backend's side (reset, timeout) is a failure; a client that left
/// first, or whose upload was cut off, gives no verdict.
fn backend_outcome(status: Option<u16>, error: Option<&Error>) -> Outcome {
    match (status, error) {
        (Some(500..), _) => Outcome::Failed,
        (Some(_), _) => Outcome::Answered,
        (None, Some(e))
            if !matches!(e.esource(), ErrorSource::Downstream)
                && e.etype() != &ErrorType::Custom(BAD_UPLOAD) =>
        {
            Outcome::Failed
        }
        (None, _) => Outcome::Abandoned,
    }
}

/// A backend's `host:port` as a socket address. A name (a compose service,
/// a DNS name) is looked up without blocking the event loop; Pingora's own
/// `HttpPeer::new` would look it up blocking, and panic when it fails.
async fn resolve(address: &str) -> std::io::Result<std::net::SocketAddr> {
    if let Ok(address) = address.parse() {
        return Ok(address);
    }
    tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the name has no address"))
}

/// The OpenAI error for a proxying failure; `None` when the client is gone.
fn classify(error: &Error, ctx: &RequestContext) -> Option<ApiError> {
    if matches!(error.esource(), ErrorSource::Downstream) {
        return None;
    }
    Some(match error.etype() {
        ErrorType::Custom(UNTRANSLATABLE) => ctx.untranslatable.clone()?,
        ErrorType::Custom(BAD_UPLOAD) => ctx.upload.as_ref()?.refused.clone()?,
        ErrorType::Custom(NO_BACKEND) => ApiError::NoBackend(
            ctx.inference
                .as_ref()
                .map(|i| i.request.model.clone())
                .unwrap_or_default(),
        ),
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => {
            ApiError::GatewayTimeout { phase: "connect" }
        }
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            ApiError::GatewayTimeout { phase: "read" }
        }
        _ => ApiError::BadGateway,
    })
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestContext;

    fn new_ctx(&self) -> RequestContext {
        RequestContext::new(self.in_flight.enter())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> pingora::Result<bool> {
        ctx.request_id = request_id(session.req_header());
        // A client that stops reading must not hold a backend slot forever.
        session.set_write_timeout(Some(self.timeouts.read));
        match self.admit(session, ctx).await {
            Ok(()) => Ok(false),
            Err(Stop::Refuse(error)) => {
                if let Some(inference) = ctx.inference.as_mut() {
                    inference.usage.reject();
                }
                let mut headers = rate_limit_headers(&ctx.rate_windows);
                if let ApiError::MethodNotAllowed { allow, .. } = &error {
                    headers.push(("allow", (*allow).to_owned()));
                }
                if let Some(wait) = error.retry_after() {
                    headers.push(("retry-after", retry_after(wait)));
                }
                let body = error.body();
                respond_json_with(session, error.status(), body, &ctx.request_id, headers).await?;
                if let ApiError::BodyTooLarge { .. } = error {
                    discard_upload(session).await;
                }
                Ok(true)
            }
            Err(Stop::Answer(status, body)) => {
                let body = Bytes::from(body.to_string());
                respond_json(session, status, body, &ctx.request_id).await?;
                Ok(true)
            }
            Err(Stop::AnswerWith(status, body, headers)) => {
                let body = Bytes::from(body.to_string());
                respond_json_with(session, status, body, &ctx.request_id, headers).await?;
                Ok(true)
            }
            Err(Stop::Written) => Ok(true),
            Err(Stop::ClientGone(error)) => {
                if let Some(inference) = ctx.inference.as_mut() {
                    inference.usage.reject();
                }
                Err(error)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> pingora::Result<Box<HttpPeer>> {
        let facts = RequestFacts {
            session: session
                .req_header()
                .headers
                .get(self.session_header.as_str())
                .and_then(|v| v.to_str().ok()),
        };
        // Backends that cannot carry this request (a Triton one for `n > 1`,
        // tools, embeddings) are passed over for others of the model.
        let mut excluded = ctx.tried.clone();
        ctx.untranslatable = None;
        let (id, backend, lease, triton) = loop {
            let Some((id, backend, lease)) = self.selector.select(ctx.serving(), &excluded, &facts)
            else {
                if ctx.untranslatable.is_some() {
                    return Err(Error::explain(
                        ErrorType::Custom(UNTRANSLATABLE),
                        "request not expressible in the protocol of any backend",
                    ));
                }
                return Err(Error::explain(
                    ErrorType::Custom(NO_BACKEND),
                    "no backend left for the model",
                ));
            };
            match backend.protocol {
                Protocol::OpenAi => break (id, backend, lease, None),
                Protocol::Triton => match self.triton_call(ctx) {
                    Ok(call) => break (id, backend, lease, Some(call)),
                    Err(refusal) => {
                        ctx.untranslatable = Some(refusal);
                        excluded.push(id);
                    }
                },
                Protocol::ComfyUi if ctx.endpoint == Some(Endpoint::ImageGenerations) => {
                    break (id, backend, lease, None);
                }
                Protocol::ComfyUi => {
                    ctx.untranslatable = Some(ApiError::bad_request(
                        "This model is served by ComfyUI, which takes image generations \
                         (/v1/images/generations) only.",
                        None,
                    ));
                    excluded.push(id);
                }
            }
        };
        if let Some(inference) = ctx.inference.as_mut() {
            inference.usage.set_usage_counted_here(triton.is_some());
        }
        ctx.triton = triton;
        ctx.tried.push(id);
        ctx.lease = Some(lease);
        ctx.failure_reported = false;
        let bridged = backend.protocol == Protocol::ComfyUi;
        let address = match self.comfyui_bridge.filter(|_| bridged) {
            // The bridge calls the backend (see `comfyui`).
            Some(bridge) => bridge,
            None => resolve(&backend.address).await.map_err(|e| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("backend {} ({}): {e}", backend.name, backend.address),
                )
            })?,
        };
        let mut peer = HttpPeer::new(address, backend.tls && !bridged, backend.host.clone());
        peer.options.connection_timeout = Some(self.timeouts.connect);
        peer.options.total_connection_timeout = Some(self.timeouts.connect);
        peer.options.read_timeout = Some(self.timeouts.read);
        peer.options.write_timeout = Some(self.timeouts.read);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestContext,
        mut error: Box<Error>,
    ) -> Box<Error> {
        if let Some(backend) = ctx.backend() {
            self.selector.report(backend, Outcome::Unreachable);
            ctx.failure_reported = true;
        }
        // Nothing reached the backend yet: one more try, on another backend.
        if ctx.tried.len() < MAX_ATTEMPTS && ctx.serving().len() > ctx.tried.len() {
            error.set_retry(true);
        }
        error
    }

    /// The backend failed after the connection was made (reset, timeout).
    /// Its breaker hears of it; a request whose answer has not begun is
    /// tried once more on another backend, unless the backend was merely
    /// slow (a timeout: another would likely be too, at twice the GPU cost).
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        error: Box<Error>,
        ctx: &mut RequestContext,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut error = error.more_context(format!("Peer: {peer}"));
        if error.etype() == &ErrorType::Custom(BAD_UPLOAD) {
            // The client's body was at fault, not the backend.
            return error;
        }
        let backend_fault = !matches!(error.esource(), ErrorSource::Downstream);
        if backend_fault && let Some(backend) = ctx.backend() {
            self.selector.report(backend, Outcome::Failed);
            ctx.failure_reported = true;
        }
        let timed_out = matches!(
            error.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        let retry = backend_fault
            && !timed_out
            && ctx.upstream_status().is_none()
            && final_status(session).is_none()
            && ctx.tried.len() < MAX_ATTEMPTS
            && ctx.serving().len() > ctx.tried.len()
            // An upload's body streams once: what went could not go again.
            && !ctx.upload.as_ref().is_some_and(|u| u.started());
        error.set_retry(retry);
        error
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> pingora::Result<()> {
        upstream.remove_header(&header::AUTHORIZATION);
        upstream.remove_header(JOB_RUN_HEADER);
        let backend = ctx
            .backend()
            .and_then(|id| Some((id, self.selector.backend(id)?)));
        if let Some((id, backend)) = backend {
            upstream.insert_header(header::HOST, backend.address.as_str())?;
            if backend.protocol == Protocol::ComfyUi {
                upstream.insert_header(comfyui::BACKEND_HEADER, id.to_string())?;
            }
            if let Some(credential) = &backend.credential {
                upstream.insert_header(
                    header::AUTHORIZATION,
                    format!("Bearer {}", credential.expose_secret()),
                )?;
            }
        }
        upstream.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        // Metering reads every answer: a compressed one could not be read, so
        // none is asked for (the client's own Accept-Encoding is not passed on).
        upstream.insert_header(header::ACCEPT_ENCODING, "identity")?;
        // Pingora sends the header right after this filter; a retry's
        // attempt counts as time spent on the upstream.
        ctx.upstream_sent.get_or_insert_with(Instant::now);
        if let Some(call) = &ctx.triton {
            upstream.set_uri(
                call.path
                    .parse()
                    .map_err(|_| Error::new(ErrorType::InternalError))?,
            );
            upstream.remove_header(&header::TRANSFER_ENCODING);
            upstream.remove_header(&header::EXPECT);
            upstream.insert_header(header::CONTENT_TYPE, "application/json")?;
            upstream.insert_header(header::CONTENT_LENGTH, call.body.len().to_string())?;
        } else if let Some(Inference { request, .. }) = &ctx.inference {
            // The canonical path (a client's trailing slash would earn a
            // redirect); a custom route's requests keep their own.
            if let Some(path) = request.endpoint.path()
                && upstream.uri.path() != path
            {
                let uri = match upstream.uri.query() {
                    Some(query) => format!("{path}?{query}"),
                    None => path.to_owned(),
                };
                upstream.set_uri(
                    uri.parse()
                        .map_err(|_| Error::new(ErrorType::InternalError))?,
                );
            }
            upstream.remove_header(&header::EXPECT);
            // We send the body ourselves, with its own length; an upload
            // streams on in the client's framing.
            if ctx.upload.is_none() {
                upstream.remove_header(&header::TRANSFER_ENCODING);
                upstream.insert_header(
                    header::CONTENT_LENGTH,
                    request.upstream_body.len().to_string(),
                )?;
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> pingora::Result<()> {
        // Pingora replays the tail of the body it buffered (see `read_body`);
        // what goes upstream is the whole body, once per attempt. An upload
        // streams on, checked chunk by chunk (see [`upload`]).
        if let Some(upload) = ctx.upload.as_mut() {
            if let Err(refusal) = upload.pass(body, end_of_stream) {
                upload.refused = Some(refusal);
                if let Some(inference) = ctx.inference.as_mut() {
                    inference.usage.reject();
                }
                return Err(Error::explain(
                    ErrorType::Custom(BAD_UPLOAD),
                    "the upload broke its form",
                ));
            }
        } else if let Some(call) = &ctx.triton {
            *body = end_of_stream.then(|| call.body.clone());
        } else if let Some(Inference { request, .. }) = &ctx.inference {
            *body = end_of_stream.then(|| request.upstream_body.clone());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestContext,
    ) -> pingora::Result<()> {
        response.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        for (name, value) in rate_limit_headers(&ctx.rate_windows) {
            response.insert_header(name, value)?;
        }
        if let Some(wait) = ctx.queue_wait {
            response.insert_header(QUEUE_WAIT, wait.as_millis().to_string())?;
        }
        if ctx.slot.as_ref().is_some_and(Slot::cold_start) {
            response.insert_header(COLD_START, "true")?;
        }
        if let Some(call) = ctx.triton.as_mut() {
            call.response_started(response)?;
        }
        ctx.streaming_response = response
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if let Some(Inference { usage, .. }) = ctx.inference.as_mut() {
            let reframe = self.metering.response_started(
                usage,
                response.status.as_u16(),
                &response.headers,
                ctx.streaming_response,
            );
            if reframe {
                // We drop an event from the stream: its declared length no longer holds.
                response.remove_header(&header::CONTENT_LENGTH);
                response.insert_header(header::TRANSFER_ENCODING, "chunked")?;
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> pingora::Result<Option<Duration>> {
        if end_of_stream {
            ctx.upstream_done = Some(Instant::now());
        }
        if let Some(call) = ctx.triton.as_mut() {
            call.response_chunk(body, end_of_stream);
        }
        if let Some(Inference { usage, .. }) = ctx.inference.as_mut() {
            Metering::response_chunk(usage, body, end_of_stream);
        }
        if let Some(chunk) = body.as_deref()
            && ctx.streaming_response
        {
            ctx.stream_tail.record(chunk);
        }
        if end_of_stream {
            // The answer is whole: its event is journaled before the last
            // chunk goes to the client, so a crash from here on bills it.
            self.record_usage(ctx);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut RequestContext,
    ) -> FailToProxy {
        let gone = FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
        let Some(api_error) = classify(error, ctx) else {
            return gone;
        };
        // The connection closes after a proxying failure: say so.
        session.set_keepalive(None);
        let written = if final_status(session).is_none() {
            respond_json(
                session,
                api_error.status(),
                api_error.body(),
                &ctx.request_id,
            )
            .await
        } else if ctx.streaming_response {
            // Mid-stream: end the stream with an error event, never a silent
            // cut; first close an event the backend left half-written.
            let event = if ctx.stream_tail.at_event_boundary() {
                api_error.sse_event()
            } else {
                Bytes::from([b"\n\n".as_slice(), &api_error.sse_event()].concat())
            };
            session.write_response_body(Some(event), true).await
        } else {
            return gone;
        };
        if let Err(e) = written {
            tracing::debug!(request_id = %ctx.request_id, "could not send the error: {e}");
        } else if error.etype() == &ErrorType::Custom(BAD_UPLOAD) {
            // Like a 413 at admission: let a client still sending read it.
            discard_upload(session).await;
        }
        FailToProxy {
            error_code: api_error.status(),
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        error: Option<&Error>,
        ctx: &mut RequestContext,
    ) {
        // The next queued request need not wait for our bookkeeping.
        drop(ctx.slot.take());
        drop(ctx.lease.take());
        if let Some(backend) = ctx.backend()
            && !ctx.failure_reported
        {
            self.selector
                .report(backend, backend_outcome(ctx.upstream_status(), error));
        }
        let metered = self.record_usage(ctx);
        let ticket = ctx.inference.as_mut().and_then(|i| i.ticket.take());
        if let (Some(ticket), Some(used)) = (ticket, &metered) {
            self.admission.settle(ticket, used.settlement).await;
        }
        let status = final_status(session).unwrap_or(0);
        let backend = ctx.backend().and_then(|id| self.selector.backend(id));
        let backend = backend.as_deref().map_or("-", |b| b.name.as_str());
        let account = ctx.key.as_ref().map_or("-", |k| k.account_name.as_str());
        if let Some(endpoint) = ctx.endpoint {
            self.metrics.observe(&Observation {
                endpoint,
                tier: ctx.key.as_ref().map(|k| k.tier.as_str()),
                model: ctx
                    .inference
                    .as_ref()
                    .map(|i| i.route.label)
                    .unwrap_or_default(),
                status: final_status(session),
                total: ctx.started.elapsed(),
                upstream: ctx.upstream_time(),
                queue_wait: ctx.queue_wait.unwrap_or_default(),
                // Only an answer that streamed has a first token to time.
                ttft: metered
                    .as_ref()
                    .and_then(|m| m.ttft)
                    .filter(|_| ctx.streaming_response),
                tokens: metered.as_ref().map(|m| m.tokens),
            });
        }
        // One line per request, with what an operator searches by (id,
        // account, tier, model) and what it cost (units, tokens, timings).
        tracing::info!(
            request_id = %ctx.request_id,
            status,
            account,
            tier = ctx.key.as_ref().map_or("-", |k| k.tier.as_str()),
            model = ctx.inference.as_ref().map_or("-", |i| i.route.name.as_str()),
            backend,
            units = metered.as_ref().map(|m| m.settlement.units),
            prompt_tokens = metered.as_ref().map(|m| m.tokens.prompt),
            completion_tokens = metered.as_ref().map(|m| m.tokens.completion),
            elapsed_ms = ctx.started.elapsed().as_millis() as u64,
            queue_ms = ctx.queue_wait.map(|w| w.as_millis() as u64),
            upstream_ms = ctx.upstream_sent.map(|_| ctx.upstream_time().as_millis() as u64),
            error = error.map(|e| e.to_string()),
            "request"
        );
    }
}
