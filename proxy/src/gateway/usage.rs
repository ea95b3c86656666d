//! Metering on the request path: count the prompt at admission, ask streaming
//! backends for their usage, watch the answer go by, and hand one usage event
//! to the writer in `logging`. Nothing here waits on Postgres.

use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde_json::Value;
use tollgate_metering::capture::ResponseCapture;
use tollgate_metering::event::{Kind, Status, Tokens, UsageEvent, UsageSource};
use tollgate_metering::tokens::{EncodingMap, PromptCounter};
use tollgate_metering::writer::UsageSink;
use uuid::Uuid;

use super::request::{Endpoint, InferenceRequest};
use crate::config::MeteringConfig;
use crate::keys::store::KeyRecord;

/// The gateway's metering settings and the writer's sink.
pub struct Metering {
    pub sink: UsageSink,
    /// `None` when `count_tokens = false`: backends' usage is trusted alone.
    counting: Option<Counting>,
    request_stream_usage: bool,
    mismatch_tolerance: f64,
    blocking_count_bytes: usize,
    max_buffered_response_bytes: usize,
}

struct Counting {
    encodings: EncodingMap,
    image_tokens: usize,
}

impl Metering {
    pub fn new(config: &MeteringConfig, sink: UsageSink) -> Self {
        Self {
            sink,
            counting: config.count_tokens.then(|| Counting {
                encodings: EncodingMap::new(config.default_encoding, config.encodings.clone()),
                image_tokens: config.image_tokens,
            }),
            request_stream_usage: config.request_stream_usage,
            mismatch_tolerance: config.usage_mismatch_tolerance,
            blocking_count_bytes: config.blocking_count_bytes,
            max_buffered_response_bytes: config.max_buffered_response_bytes,
        }
    }

    fn counter(&self, model: &str) -> Option<PromptCounter> {
        self.counting.as_ref().map(|c| PromptCounter {
            encoding: c.encodings.for_model(model),
            image_tokens: c.image_tokens,
        })
    }

    /// At admission: mints the event id, counts the prompt (on the blocking
    /// pool when it is long), and asks a streaming backend for its usage
    /// chunk, rewriting the body sent upstream.
    pub async fn admit(&self, request: &mut InferenceRequest) -> RequestUsage {
        let event_id = Uuid::now_v7();
        let admitted_at = SystemTime::now();
        let counted_prompt = match self.counter(&request.model) {
            None => None,
            Some(counter) => {
                let endpoint = request.endpoint;
                if request.upstream_body.len() <= self.blocking_count_bytes {
                    Some(count_prompt(&counter, endpoint, &request.json) as u64)
                } else {
                    let json = std::mem::take(&mut request.json);
                    let counted = tokio::task::spawn_blocking(move || {
                        let tokens = count_prompt(&counter, endpoint, &json) as u64;
                        (json, tokens)
                    })
                    .await;
                    match counted {
                        Ok((json, tokens)) => {
                            request.json = json;
                            Some(tokens)
                        }
                        // Only a panic in the counter gets here: meter without a count.
                        Err(error) => {
                            tracing::error!("prompt counting failed: {error}");
                            None
                        }
                    }
                }
            }
        };
        let strip_usage_event = self.request_stream_usage && request_stream_usage(request);
        RequestUsage {
            event_id,
            admitted_at,
            counted_prompt,
            strip_usage_event,
            capture: None,
            upstream_status: None,
            first_byte: None,
        }
    }

    /// The answer's header arrived: start watching its body. Returns whether
    /// the body may be shortened (a usage event stripped from a stream).
    pub fn response_started(&self, usage: &mut RequestUsage, status: u16, streaming: bool) -> bool {
        usage.upstream_status = Some(status);
        let strip = usage.strip_usage_event && streaming;
        usage.capture = Some(ResponseCapture::new(
            streaming,
            strip,
            self.max_buffered_response_bytes,
        ));
        strip
    }

    /// One chunk of the answer on its way to the client; may replace it.
    pub fn response_chunk(usage: &mut RequestUsage, body: &mut Option<Bytes>, end_of_stream: bool) {
        let Some(capture) = usage.capture.as_mut() else {
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

    /// In `logging`: builds the request's one usage event and hands it over.
    pub async fn finish(&self, done: FinishedRequest<'_>) {
        let usage = done.usage;
        let capture = usage.capture.as_ref();
        let reported = capture.and_then(ResponseCapture::usage);
        let status = outcome(usage.upstream_status, capture);
        // The generated text is counted when the backend reported no usage.
        let counted_completion = match (&self.counting, reported, status) {
            (Some(_), None, Status::Ok | Status::Partial) => {
                let text = capture.map_or("", ResponseCapture::completion_text);
                self.count_completion(done.request.model.as_str(), text)
                    .await
            }
            _ => None,
        };
        let (tokens, source) = match reported {
            Some(r) => (
                Tokens {
                    prompt: r.prompt_tokens,
                    completion: r.completion_tokens,
                },
                UsageSource::Backend,
            ),
            None if matches!(status, Status::Ok | Status::Partial) && self.counting.is_some() => (
                Tokens {
                    prompt: usage.counted_prompt.unwrap_or(0),
                    completion: counted_completion.unwrap_or(0),
                },
                UsageSource::Counted,
            ),
            None => (Tokens::default(), UsageSource::None),
        };
        if let (Some(r), Some(counted)) = (reported, usage.counted_prompt)
            && mismatched(r.prompt_tokens, counted, self.mismatch_tolerance)
        {
            tracing::info!(
                request_id = done.request_id,
                model = %done.request.model,
                reported = r.prompt_tokens,
                counted,
                "backend's prompt tokens differ from Tollgate's count (tokenizer or encoding map?)"
            );
        }
        let billable = matches!(status, Status::Ok | Status::Partial);
        let elapsed =
            |since: Instant| u32::try_from(since.elapsed().as_millis()).unwrap_or(u32::MAX);
        let ttft_ms = usage.first_byte.map(|at| {
            u32::try_from(at.duration_since(done.started).as_millis()).unwrap_or(u32::MAX)
        });
        self.sink.record(UsageEvent {
            event_id: usage.event_id,
            created_at: usage.admitted_at,
            request_id: done.request_id.to_owned(),
            account_id: done.key.account_id,
            key_id: done.key.key_id,
            tier: done.key.tier.clone(),
            model: done.request.model.clone(),
            backend: done.backend.map(str::to_owned),
            kind: kind(done.request.endpoint),
            status,
            tokens,
            counted_prompt_tokens: usage.counted_prompt,
            counted_completion_tokens: counted_completion,
            usage_source: source,
            units: if billable { tokens.total() } else { 0 },
            latency_ms: elapsed(done.started),
            ttft_ms: if done.request.stream { ttft_ms } else { None },
        });
    }

    async fn count_completion(&self, model: &str, text: &str) -> Option<u64> {
        let counter = self.counter(model)?;
        if text.len() <= self.blocking_count_bytes {
            return Some(counter.count_text(text) as u64);
        }
        let text = text.to_owned();
        tokio::task::spawn_blocking(move || counter.count_text(&text) as u64)
            .await
            .ok()
    }
}

/// What `logging` knows about a request that was admitted.
pub struct FinishedRequest<'a> {
    pub usage: &'a RequestUsage,
    pub request: &'a InferenceRequest,
    pub key: &'a KeyRecord,
    pub request_id: &'a str,
    pub backend: Option<&'a str>,
    pub started: Instant,
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
    first_byte: Option<Instant>,
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
    }
}

/// For a streamed chat or completion the client did not ask usage for,
/// sets `stream_options.include_usage` in the body sent upstream. Returns
/// whether it did (and so whether the usage chunk must be kept from the client).
fn request_stream_usage(request: &mut InferenceRequest) -> bool {
    if !request.stream || request.endpoint == Endpoint::Embeddings {
        return false;
    }
    let Some(fields) = request.json.as_object_mut() else {
        return false;
    };
    let options = fields
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Default::default()));
    if options.is_null() {
        *options = Value::Object(Default::default());
    }
    let Some(options) = options.as_object_mut() else {
        // Not an object: the backend will refuse it; leave the client's body alone.
        return false;
    };
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return false;
    }
    options.insert("include_usage".to_owned(), Value::Bool(true));
    match serde_json::to_vec(&request.json) {
        Ok(body) => {
            request.upstream_body = Bytes::from(body);
            true
        }
        Err(_) => false,
    }
}

fn kind(endpoint: Endpoint) -> Kind {
    match endpoint {
        Endpoint::ChatCompletions => Kind::Chat,
        Endpoint::Completions => Kind::Completion,
        Endpoint::Embeddings => Kind::Embedding,
    }
}

/// How an admitted request ended: a 2xx answer is `ok` only when it arrived
/// whole and without an error event; otherwise the work done so far is billed
/// as `partial`.
fn outcome(upstream_status: Option<u16>, capture: Option<&ResponseCapture>) -> Status {
    match upstream_status {
        None => Status::UpstreamError,
        Some(200..=299) if capture.is_some_and(|c| c.completed() && !c.backend_error()) => {
            Status::Ok
        }
        Some(200..=299) => Status::Partial,
        Some(400..=499) => Status::ClientError,
        Some(_) => Status::UpstreamError,
    }
}

fn mismatched(reported: u64, counted: u64, tolerance: f64) -> bool {
    let counted = counted as f64;
    let reported = reported as f64;
    (reported - counted).abs() > tolerance * reported.max(counted).max(1.0)
}
