//! Metering on the request path: count the prompt at admission, ask streaming
//! backends for their usage, watch the answer go by, and record one usage
//! event per request. An answer that ends whole is recorded in
//! `response_body_filter`, before its last byte is released to the client, so
//! once a client has an answer its event is in the write-ahead journal (see
//! [`tollgate_metering::journal`]); any other ending is recorded in `logging`.
//! Nothing here waits on Postgres.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prometheus::{IntCounter, Registry};
use serde_json::Value;
use tollgate_metering::capture::{ReportedUsage, ResponseCapture, Texts};
use tollgate_metering::event::{Status, Tokens, UsageEvent, UsageSource};
use tollgate_metering::tokens::{Encoding, EncodingMap, PromptCounter};
use tollgate_metering::units::UnitKind;
use tollgate_metering::writer::{PromptCount, UsageSink};
use uuid::Uuid;

use crate::admission::limits::Settlement;
use crate::admission::units;
use crate::config::routes::ReportedUnits;
use crate::config::{Config, ImageWeights, MeteringConfig};
use crate::gateway::models::ModelRoute;
use crate::gateway::request::{Endpoint, InferenceRequest};
use crate::keys::store::KeyRecord;

/// The gateway's metering settings and the writer's sink.
pub struct Metering {
    pub sink: UsageSink,
    counting: Counting,
    /// `count_tokens`: count every prompt at admission. Off, backends' usage
    /// is trusted and Tollgate counts only answers that report none.
    count_prompts: bool,
    request_stream_usage: bool,
    mismatch_tolerance: f64,
    blocking_count_bytes: usize,
    /// Requests whose backend-reported prompt tokens differ from our count
    /// by more than the tolerance.
    mismatches: IntCounter,
    unit_sizes: UnitSizes,
    image_weights: ImageWeights,
    /// Audio seconds reserved for an upload whose header declares no length.
    unmeasured_audio_reserve: u64,
}

/// The encodings tokens are counted with and the image charge: used at
/// admission when `count_tokens` is on, and always when a billable answer
/// carries no usage report of its own.
struct Counting {
    encodings: EncodingMap,
    image_tokens: usize,
}

/// How many tokens make one billed unit: a model's own size
/// (`[metering] tokens_per_unit`, read onto its route), else its tier's
/// (`tokens_per_unit`), else one token.
pub struct UnitSizes {
    by_tier: HashMap<String, u64>,
}

impl UnitSizes {
    pub fn from_config(config: &Config) -> Self {
        Self {
            by_tier: config
                .tiers
                .iter()
                .map(|t| (t.name.clone(), t.tokens_per_unit))
                .collect(),
        }
    }

    pub fn tokens_per_unit(&self, tier: &str, route: &ModelRoute) -> u64 {
        route
            .tokens_per_unit
            .or_else(|| self.by_tier.get(tier).copied())
            .unwrap_or(1)
    }
}

impl Metering {
    /// Counting metering loads the tokenizers of `models` (the configured
    /// ones) and of the default encoding before the first request.
    pub fn new(
        config: &MeteringConfig,
        models: &[String],
        unit_sizes: UnitSizes,
        sink: UsageSink,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let mismatches = IntCounter::new(
            tollgate_metering::metric_names::USAGE_COUNT_MISMATCH_TOTAL,
            "Requests whose backend-reported prompt tokens differ from Tollgate's count \
             by more than metering.usage_mismatch_tolerance.",
        )?;
        registry.register(Box::new(mismatches.clone()))?;
        let counting = Counting {
            encodings: EncodingMap::new(config.default_encoding, config.encodings.clone()),
            image_tokens: config.image_tokens,
        };
        if config.count_tokens {
            let mut used: HashSet<Encoding> = models
                .iter()
                .map(|m| counting.encodings.for_model(m))
                .collect();
            used.insert(counting.encodings.default_encoding());
            used.into_iter().for_each(Encoding::preload);
        }
        Ok(Self {
            sink,
            counting,
            count_prompts: config.count_tokens,
            request_stream_usage: config.request_stream_usage,
            mismatch_tolerance: config.usage_mismatch_tolerance,
            blocking_count_bytes: config.blocking_count_bytes,
            mismatches,
            unit_sizes,
            image_weights: config.image_weights.clone(),
            unmeasured_audio_reserve: config.unmeasured_audio_reserve.as_secs(),
        })
    }

    /// Tokens per billed unit for a request of `tier` to `route`'s model.
    pub fn tokens_per_unit(&self, tier: &str, route: &ModelRoute) -> u64 {
        self.unit_sizes.tokens_per_unit(tier, route)
    }

    /// The encoding tokens of `model` are counted with.
    pub fn encoding_for(&self, model: &str) -> Encoding {
        self.counting.encodings.for_model(model)
    }

    fn counter(&self, encoding: Encoding) -> PromptCounter {
        PromptCounter {
            encoding,
            image_tokens: self.counting.image_tokens,
        }
    }

    /// At admission, before anything else: mints the event id and asks a
    /// streaming backend for its usage chunk (in the parsed body, which the
    /// gateway writes out once admission is done).
    pub fn start(&self, request: &mut InferenceRequest) -> RequestUsage {
        let strip_usage_event = self.request_stream_usage && request.request_stream_usage();
        RequestUsage {
            event_id: Uuid::now_v7(),
            admitted_at: SystemTime::now(),
            counted_prompt: None,
            strip_usage_event,
            capture: None,
            upstream_status: None,
            usage_counted_here: false,
            first_byte: None,
            slot_held_since: None,
            unread_answer: !request.endpoint.answers_json(),
            reads_duration: request.endpoint.unit_kind() == UnitKind::AudioSeconds,
            reported: None,
            reported_figure: None,
            answer: Vec::new(),
            answer_ended: false,
            rejected: false,
            metered: None,
        }
    }

    /// Whether counting this request's prompt costs more than a round trip
    /// to the limiter (see [`crate::admission::Admission::precheck`]).
    pub fn counting_is_costly(&self, request: &InferenceRequest) -> bool {
        self.count_prompts && request.upstream_body.len() > self.blocking_count_bytes
    }

    /// Counts the prompt (when `count_tokens` is on), on the blocking pool
    /// when it is long.
    pub async fn count_prompt(
        &self,
        usage: &mut RequestUsage,
        request: &mut InferenceRequest,
        encoding: Encoding,
    ) {
        if !self.count_prompts {
            return;
        }
        let counter = self.counter(encoding);
        let endpoint = request.endpoint;
        usage.counted_prompt = if request.upstream_body.len() <= self.blocking_count_bytes {
            Some(count_prompt(&counter, endpoint, request.json()) as u64)
        } else {
            let json = request.take_json();
            let counted = tokio::task::spawn_blocking(move || {
                let tokens = count_prompt(&counter, endpoint, &json) as u64;
                (json, tokens)
            })
            .await;
            match counted {
                Ok((json, tokens)) => {
                    request.restore_json(json);
                    Some(tokens)
                }
                // Only a panic in the counter gets here: meter without a count.
                Err(error) => {
                    tracing::error!("prompt counting failed: {error}");
                    None
                }
            }
        };
    }

    /// The answer's header arrived: start watching its body. Returns whether
    /// the body may be shortened (a usage event stripped from a stream).
    pub fn response_started(
        &self,
        usage: &mut RequestUsage,
        status: u16,
        headers: &http::HeaderMap,
        streaming: bool,
    ) -> bool {
        usage.upstream_status = Some(status);
        if let Some(ReportedUnits::Header(name)) = &usage.reported {
            usage.reported_figure = headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok());
        }
        // Audio (or a custom route's answer) passes through unread: its
        // units come from the request, or from how long it held its slot.
        if usage.unread_answer {
            return false;
        }
        let strip = usage.strip_usage_event && streaming;
        usage.capture = Some(ResponseCapture::new(streaming, strip));
        strip
    }

    /// One chunk of the answer on its way to the client; may replace it.
    pub fn response_chunk(usage: &mut RequestUsage, body: &mut Option<Bytes>, end_of_stream: bool) {
        usage.answer_ended |= end_of_stream;
        let Some(capture) = usage.capture.as_mut() else {
            if let Some(chunk) = body.as_deref().filter(|b| !b.is_empty()) {
                usage.first_byte.get_or_insert_with(Instant::now);
                if (usage.reads_duration || matches!(usage.reported, Some(ReportedUnits::Json(_))))
                    && usage.answer.len() + chunk.len() <= MAX_REPORTING_ANSWER_BYTES
                {
                    usage.answer.extend_from_slice(chunk);
                }
            }
            return;
        };
        if let Some(chunk) = body.as_deref()
            && !chunk.is_empty()
        {
            usage.first_byte.get_or_insert_with(Instant::now);
            if let Some(replacement) = capture.feed(chunk) {
                *body = Some(replacement);
            }
        }
        if end_of_stream && let Some(rest) = capture.finish() {
            *body = Some(match body.take() {
                Some(head) if !head.is_empty() => Bytes::from([head.as_ref(), &rest].concat()),
                _ => rest,
            });
        }
    }

    /// Builds the request's one usage event and hands it to the sink (which
    /// journals it before returning), once: at the end of an answer that
    /// ended whole, before its last byte goes out, or else in `logging`.
    /// Returns what the request used, for its quota settlement and the
    /// request metrics.
    pub fn record(&self, done: FinishedRequest<'_>) -> Metered {
        let usage = done.usage;
        if let Some(metered) = usage.metered {
            return metered;
        }
        // A JSON answer cut short of its end (the client left while it was
        // written) is read as far as it arrived; a finished one is not re-read.
        if let Some(capture) = usage.capture.as_mut() {
            capture.finish();
        }
        let capture = usage.capture.as_ref();
        let reported = capture.and_then(ResponseCapture::usage);
        let status = if usage.rejected {
            Status::Rejected
        } else {
            outcome(
                usage.upstream_status,
                capture,
                done.request.stream,
                usage.answer_ended,
            )
        };
        let billable = matches!(status, Status::Ok | Status::Partial);
        let unit_kind = done.request.unit_kind;
        let measured = match unit_kind {
            UnitKind::Tokens => self.measure_tokens(
                usage,
                done.request,
                (done.encoding, done.tokens_per_unit),
                reported,
                billable,
            ),
            kind => {
                let (units, source) = if billable {
                    self.units_delivered(kind, done.request, usage)
                } else {
                    (0, UsageSource::None)
                };
                Measured {
                    units,
                    tokens: Tokens::default(),
                    counted_prompt: None,
                    counted_completion: None,
                    source,
                    deferred_count: None,
                }
            }
        };
        let Measured {
            units,
            tokens,
            counted_prompt,
            counted_completion,
            source,
            deferred_count,
        } = measured;
        let elapsed =
            |since: Instant| u32::try_from(since.elapsed().as_millis()).unwrap_or(u32::MAX);
        let ttft = usage
            .first_byte
            .filter(|_| done.request.stream)
            .map(|at| at.duration_since(done.started));
        let ttft_ms = ttft.map(|ttft| u32::try_from(ttft.as_millis()).unwrap_or(u32::MAX));
        let event = UsageEvent {
            event_id: usage.event_id,
            created_at: usage.admitted_at,
            request_id: done.request_id.to_owned(),
            account_id: done.key.account_id,
            key_id: done.key.key_id,
            tier: done.key.tier.clone(),
            model: done.request.model.clone(),
            backend: done.backend.map(str::to_owned),
            kind: done.request.endpoint,
            status,
            tokens,
            counted_prompt_tokens: counted_prompt,
            counted_completion_tokens: counted_completion,
            usage_source: source,
            unit_kind,
            units,
            latency_ms: elapsed(done.started),
            ttft_ms,
        };
        self.sink.record_with_count(event, deferred_count);
        let metered = Metered {
            settlement: Settlement {
                units,
                tokens: tokens.total(),
                forwarded: usage.upstream_status.is_some(),
            },
            tokens,
            ttft,
        };
        usage.metered = Some(metered);
        metered
    }

    /// A token-priced request's figures: the backend's usage when it
    /// reported some, else Tollgate's count of what was delivered.
    fn measure_tokens(
        &self,
        usage: &RequestUsage,
        request: &InferenceRequest,
        (encoding, tokens_per_unit): (Encoding, u64),
        reported: Option<ReportedUsage>,
        billable: bool,
    ) -> Measured {
        let capture = usage.capture.as_ref();
        let counter = self.counter(encoding);
        // An answer that reports no usage (cut short, or from a backend that
        // never does) is billed by counting what was delivered: never as zero.
        let counted_completion = (billable && reported.is_none()).then(|| {
            let texts = capture.map(ResponseCapture::completion_texts);
            self.count_blocking(texts.map_or(0, Texts::len), || {
                texts.map_or(0, |t| {
                    t.iter().map(|text| counter.count_text(&text) as u64).sum()
                })
            })
        });
        let counted_prompt = usage.counted_prompt.or_else(|| {
            (billable && reported.is_none()).then(|| {
                self.count_blocking(request.upstream_body.len(), || {
                    let json = request.json_once();
                    count_prompt(&counter, request.endpoint, &json) as u64
                })
            })
        });
        let (tokens, source) = match (reported, billable) {
            (Some(r), _) => (
                Tokens {
                    prompt: r.prompt_tokens,
                    completion: r.completion_tokens,
                },
                // A Triton backend reports nothing: its usage is our count.
                if usage.usage_counted_here {
                    UsageSource::Counted
                } else {
                    UsageSource::Backend
                },
            ),
            (None, true) => (
                Tokens {
                    prompt: counted_prompt.unwrap_or(0),
                    completion: counted_completion.unwrap_or(0),
                },
                UsageSource::Counted,
            ),
            (None, false) => (Tokens::default(), UsageSource::None),
        };
        // The count beside a backend's own figure: made at admission when a
        // limit needed it, else by the writer, off the request path.
        let mut deferred_count = None;
        if let Some(r) = reported.filter(|_| !usage.usage_counted_here) {
            let check = MismatchCheck {
                reported: r.prompt_tokens,
                tolerance: self.mismatch_tolerance,
                mismatches: self.mismatches.clone(),
                event_id: usage.event_id,
            };
            match usage.counted_prompt {
                Some(counted) => check.note(counted),
                None if self.count_prompts => {
                    let (body, endpoint) = (request.upstream_body.clone(), request.endpoint);
                    deferred_count = Some(Box::new(move || {
                        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let counted = count_prompt(&counter, endpoint, &json) as u64;
                        check.note(counted);
                        counted
                    }) as PromptCount);
                }
                None => {}
            }
        }
        Measured {
            units: if billable {
                units(tokens.total(), tokens_per_unit)
            } else {
                0
            },
            tokens,
            counted_prompt,
            counted_completion,
            source,
            deferred_count,
        }
    }

    /// What one image of `request` costs in `images` units.
    fn units_per_image(&self, request: &InferenceRequest) -> u64 {
        self.image_weights.units_per_image(
            request.image.size.as_deref(),
            request.image.quality.as_deref(),
        )
    }

    /// The units a request priced in other than tokens asks for, reserved
    /// before it is forwarded: `n` images times their weight, the
    /// characters to speak.
    pub fn units_asked(&self, request: &InferenceRequest) -> u64 {
        match request.unit_kind {
            UnitKind::Images => request
                .sequences
                .saturating_mul(self.units_per_image(request)),
            UnitKind::Characters => request.characters,
            UnitKind::AudioSeconds => request
                .audio_seconds
                .map_or(self.unmeasured_audio_reserve, |seconds| {
                    seconds.ceil() as u64
                }),
            UnitKind::Requests => 1,
            UnitKind::Tokens | UnitKind::GpuSeconds => 0,
        }
    }

    /// What a billable answer priced in `kind` delivered, and who said so:
    /// the images in it, in the weight they were asked at; the audio
    /// transcribed (the backend's duration, else the file header's, else
    /// the reservation), rounded up; the characters spoken (the whole
    /// input, once the backend answered with audio); the request; the
    /// seconds it held a backend slot, rounded up.
    fn units_delivered(
        &self,
        kind: UnitKind,
        request: &InferenceRequest,
        usage: &RequestUsage,
    ) -> (u64, UsageSource) {
        let ceil = |figure: f64| figure.ceil() as u64;
        match kind {
            UnitKind::Images => (
                usage
                    .capture
                    .as_ref()
                    .map_or(0, ResponseCapture::data_items)
                    .saturating_mul(self.units_per_image(request)),
                UsageSource::Counted,
            ),
            _ if usage.reported.is_some() => {
                (usage.reported_units().map_or(0, ceil), UsageSource::Backend)
            }
            UnitKind::AudioSeconds if usage.reads_duration => match usage.answered_duration() {
                Some(seconds) => (ceil(seconds), UsageSource::Backend),
                None => (self.units_asked(request), UsageSource::Counted),
            },
            UnitKind::GpuSeconds => (
                usage
                    .slot_held_since
                    .map_or(0, |since| ceil(since.elapsed().as_secs_f64())),
                UsageSource::Counted,
            ),
            _ => (self.units_asked(request), UsageSource::Counted),
        }
    }

    /// Runs a count of `bytes` of input here, or for a large one (above
    /// `blocking_count_bytes`) with the runtime told this worker blocks, so
    /// its other tasks move to another worker meanwhile. Recording is
    /// synchronous (it happens inside Pingora's body filter), hence not the
    /// blocking pool.
    fn count_blocking(&self, bytes: usize, count: impl FnOnce() -> u64) -> u64 {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if bytes > self.blocking_count_bytes && multi_thread {
            tokio::task::block_in_place(count)
        } else {
            count()
        }
    }
}

/// What `logging` knows about a request that was admitted.
pub struct FinishedRequest<'a> {
    pub usage: &'a mut RequestUsage,
    pub request: &'a InferenceRequest,
    /// The encoding of the request's model, for counting.
    pub encoding: Encoding,
    pub tokens_per_unit: u64,
    pub key: &'a KeyRecord,
    pub request_id: &'a str,
    pub backend: Option<&'a str>,
    pub started: Instant,
}

/// Most bytes of an answer kept for the units it reports: a render's status
/// answer (a custom route's JSON pointer) is a few hundred bytes, a
/// transcription's JSON a few KiB per minute of audio. A larger answer is
/// not read (a custom route's is billed nothing, with a warning; a
/// transcription by its file's header).
const MAX_REPORTING_ANSWER_BYTES: usize = 1 << 20;

/// A finished request's figures before they become its event.
struct Measured {
    units: u64,
    tokens: Tokens,
    counted_prompt: Option<u64>,
    counted_completion: Option<u64>,
    source: UsageSource,
    /// A prompt count left to the usage writer.
    deferred_count: Option<PromptCount>,
}

/// What a finished request used, as its usage event records it.
#[derive(Debug, Clone, Copy)]
pub struct Metered {
    pub settlement: Settlement,
    pub tokens: Tokens,
    /// To the first byte of the answer, for a request that asked to stream.
    pub ttft: Option<Duration>,
}

/// Per-request metering state, carried in the request context.
pub struct RequestUsage {
    pub event_id: Uuid,
    admitted_at: SystemTime,
    counted_prompt: Option<u64>,
    /// We added `include_usage`; the client did not ask for the usage chunk.
    strip_usage_event: bool,
    capture: Option<ResponseCapture>,
    upstream_status: Option<u16>,
    /// The backend's answer carries a usage Tollgate computed (a Triton
    /// backend reports none): the event says `counted`.
    usage_counted_here: bool,
    first_byte: Option<Instant>,
    /// When the request got its backend slot (GPU-seconds are measured from it).
    slot_held_since: Option<Instant>,
    /// The answer is audio or a custom route's, passed through unread (no capture).
    unread_answer: bool,
    /// A transcription: its (bounded) answer is kept for the duration the
    /// backend reports.
    reads_duration: bool,
    /// A custom route whose backend reports the units, and where.
    reported: Option<ReportedUnits>,
    /// The backend's figure, once read.
    reported_figure: Option<f64>,
    /// The answer's bytes, kept (bounded) for a JSON pointer to read.
    answer: Vec<u8>,
    /// The answer's last byte went by.
    answer_ended: bool,
    /// Refused at admission: recorded as `rejected`, never forwarded.
    rejected: bool,
    /// Recorded already: the event went to the sink.
    metered: Option<Metered>,
}

impl RequestUsage {
    pub fn counted_prompt(&self) -> Option<u64> {
        self.counted_prompt
    }

    pub fn upstream_status(&self) -> Option<u16> {
        self.upstream_status
    }

    pub fn reject(&mut self) {
        self.rejected = true;
    }

    /// The event of a job's run: the job's id, dated at its submission, so
    /// every attempt writes the same event and only the first is kept.
    pub fn identify_as(&mut self, event_id: Uuid, at: SystemTime) {
        self.event_id = event_id;
        self.admitted_at = at;
    }

    /// The request got its backend slot now.
    pub fn slot_granted(&mut self) {
        self.slot_held_since = Some(Instant::now());
    }

    /// A custom route whose backend reports the units, at `reported`.
    pub fn units_reported_at(&mut self, reported: Option<ReportedUnits>) {
        self.reported = reported;
    }

    /// The backend's figure: from its header, or read from its JSON answer
    /// at the pointer; `None` when it gave none (the request is then billed
    /// nothing, and a warning says so).
    fn reported_units(&self) -> Option<f64> {
        let figure = match &self.reported {
            Some(ReportedUnits::Json(pointer)) => serde_json::from_slice::<Value>(&self.answer)
                .ok()
                .and_then(|answer| answer.pointer(pointer).and_then(Value::as_f64)),
            _ => self.reported_figure,
        }
        .filter(|figure| figure.is_finite() && *figure >= 0.0);
        if figure.is_none() {
            tracing::warn!(event_id = %self.event_id, reported = ?self.reported,
                "the backend reported no units for a custom route's answer; billed 0");
        }
        figure
    }

    /// The seconds of audio a transcription's JSON answer reports: OpenAI's
    /// `usage` of type `duration`, else `duration` (`verbose_json`, and
    /// servers that predate `usage`); `None` for a text answer (`text`,
    /// `srt`, `vtt`) or one without either.
    fn answered_duration(&self) -> Option<f64> {
        let answer: Value = serde_json::from_slice(&self.answer).ok()?;
        let usage = answer
            .get("usage")
            .filter(|u| u.get("type").and_then(Value::as_str) == Some("duration"))
            .and_then(|u| u.get("seconds"));
        usage
            .or_else(|| answer.get("duration"))
            .and_then(Value::as_f64)
            .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
    }

    /// The answer comes from Tollgate's own translation, usage included.
    pub fn set_usage_counted_here(&mut self, counted_here: bool) {
        self.usage_counted_here = counted_here;
    }
}

fn count_prompt(counter: &PromptCounter, endpoint: Endpoint, json: &Value) -> usize {
    match endpoint {
        Endpoint::ChatCompletions => counter.count_chat(json),
        Endpoint::Completions => {
            counter.count_completion_prompt(json.get("prompt").unwrap_or(&Value::Null))
        }
        Endpoint::Embeddings => {
            counter.count_embedding_input(json.get("input").unwrap_or(&Value::Null))
        }
        Endpoint::Responses => counter.count_responses(json),
        // Billed per image, character, request or GPU-second, not per token.
        Endpoint::ImageGenerations
        | Endpoint::ImageEdits
        | Endpoint::Speech
        | Endpoint::Transcription
        | Endpoint::Translation
        | Endpoint::Custom => 0,
    }
}

/// How an admitted request ended. A 2xx answer is `ok` when it arrived whole
/// without an error; a stream cut short, or ended by an error event, bills
/// the work done so far as `partial`; a JSON error under a 2xx status did no
/// work. An answer passed through unread (audio) is `ok` once it `ended`.
fn outcome(
    upstream_status: Option<u16>,
    capture: Option<&ResponseCapture>,
    streamed: bool,
    ended: bool,
) -> Status {
    let Some(status) = upstream_status else {
        return Status::UpstreamError;
    };
    match (status, capture) {
        (200..=299, None) if ended => Status::Ok,
        (200..=299, Some(c)) if !streamed && c.backend_error() => Status::UpstreamError,
        (200..=299, Some(c)) if c.completed() && !c.backend_error() => Status::Ok,
        (200..=299, _) => Status::Partial,
        (400..=499, _) => Status::ClientError,
        _ => Status::UpstreamError,
    }
}

/// Compares a backend's prompt tokens with Tollgate's count of them.
struct MismatchCheck {
    reported: u64,
    tolerance: f64,
    mismatches: IntCounter,
    event_id: Uuid,
}

impl MismatchCheck {
    fn note(&self, counted: u64) {
        if mismatched(self.reported, counted, self.tolerance) {
            self.mismatches.inc();
            // Debug, not info: with a self-hosted model's own tokenizer every
            // request differs; the metric is where an operator looks.
            tracing::debug!(
                event_id = %self.event_id,
                reported = self.reported,
                counted,
                "backend's prompt tokens differ from Tollgate's count (tokenizer or encoding map?)"
            );
        }
    }
}

fn mismatched(reported: u64, counted: u64, tolerance: f64) -> bool {
    let counted = counted as f64;
    let reported = reported as f64;
    (reported - counted).abs() > tolerance * reported.max(counted).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_follows_the_status_and_how_the_answer_ended() {
        let whole = {
            let mut capture = ResponseCapture::new(true, false);
            capture.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
            capture.finish();
            capture
        };
        let cut = {
            let mut capture = ResponseCapture::new(true, false);
            capture.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
            capture
        };
        let json_error = {
            let mut capture = ResponseCapture::new(false, false);
            capture.feed(br#"{"error":{"message":"engine died"}}"#);
            capture.finish();
            capture
        };
        assert_eq!(outcome(Some(200), Some(&whole), true, true), Status::Ok);
        assert_eq!(outcome(Some(200), Some(&cut), true, false), Status::Partial);
        assert_eq!(
            outcome(Some(200), Some(&json_error), false, true),
            Status::UpstreamError
        );
        // Audio, passed through unread: whole once its last byte went by.
        assert_eq!(outcome(Some(200), None, false, true), Status::Ok);
        assert_eq!(outcome(Some(200), None, false, false), Status::Partial);
        assert_eq!(outcome(Some(429), None, false, true), Status::ClientError);
        assert_eq!(outcome(Some(503), None, false, true), Status::UpstreamError);
        assert_eq!(outcome(None, None, false, false), Status::UpstreamError);
    }

    #[test]
    fn mismatch_is_relative_to_the_larger_count() {
        assert!(!mismatched(100, 101, 0.02));
        assert!(mismatched(100, 110, 0.02));
        assert!(!mismatched(0, 0, 0.02));
        assert!(mismatched(0, 5, 0.02));
    }
}
