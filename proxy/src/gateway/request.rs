//! What an inference request asks for: the endpoint, and the body, read once
//! (bounded) and read once for the fields the gateway decides on; the rest
//! stays raw bytes, parsed whole only when something needs it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
pub use tollgate_metering::endpoint::Endpoint;
use tollgate_metering::units::UnitKind;

use crate::config::CustomRoute;
use crate::error::ApiError;

/// The JSON field holding the input, which the endpoint requires.
fn input_field(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "messages",
        Endpoint::Completions | Endpoint::ImageGenerations => "prompt",
        Endpoint::Embeddings | Endpoint::Responses | Endpoint::Speech => "input",
        // Neither an upload's body nor a custom route's is JSON.
        Endpoint::Transcription | Endpoint::Translation | Endpoint::Custom => "file",
        Endpoint::ImageEdits => "image",
    }
}

/// The most bytes of request headers (names, values and their separators)
/// a request may carry: nginx's default for a request's headers is 32 KiB
/// (4 buffers of 8k), and OpenAI's SDKs send under 1 KiB.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses headers totalling more than [`MAX_HEADER_BYTES`] (431).
pub fn check_header_size(header: &pingora::http::RequestHeader) -> Result<(), ApiError> {
    let total: usize = header
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if total > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
        });
    }
    Ok(())
}

/// An inference request as later phases need it.
#[derive(Debug)]
pub struct InferenceRequest {
    pub endpoint: Endpoint,
    pub model: String,
    /// What the request is billed in: its endpoint's kind, or its custom
    /// route's.
    pub unit_kind: UnitKind,
    pub stream: bool,
    /// The completion limit the backend honours (see [`completion_limit`]).
    pub max_tokens: Option<u64>,
    /// Sequences the backend generates, each up to `max_tokens`: per prompt
    /// `n`, or `best_of` when larger (1 if unset), times the prompts of a
    /// completions request.
    pub sequences: u64,
    /// The body sent upstream: the client's bytes, unless the proxy had to
    /// change them (then written once, by [`Self::seal_body`]).
    pub upstream_body: Bytes,
    /// An images request's `size` and `quality`, which weigh its units.
    pub image: ImageOptions,
    /// Characters of a speech request's `input` (0 for other endpoints).
    pub characters: u64,
    /// An upload's length in seconds, as its audio file's header declares
    /// it (`None`: not an upload, or a file whose first bytes do not say).
    pub audio_seconds: Option<f64>,
    /// The client's `stream_options`, raw (`None` when absent or null).
    stream_options: Option<Box<RawValue>>,
    /// The client sent `max_completion_tokens` (a cap is written there too).
    sent_completion_limit: bool,
    /// Changes to make to the body, applied together by [`Self::seal_body`].
    rewrites: Rewrites,
    /// The body parsed whole, on first need ([`Self::json`]): the gateway
    /// decides on a few fields, so most requests are never parsed this far.
    parsed: Option<Value>,
}

/// What an images request asks for beyond `n` (empty for other endpoints).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageOptions {
    pub size: Option<String>,
    pub quality: Option<String>,
}

/// What the gateway changes in a body before it goes upstream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Rewrites {
    max_tokens: Option<u64>,
    include_usage: bool,
}

impl InferenceRequest {
    /// A request on a custom route: its body forwarded unread, billed in
    /// the route's unit, served by the route's model.
    pub fn custom(route: &CustomRoute, body: Bytes) -> Self {
        Self::unread(Endpoint::Custom, route.model.clone(), route.unit, body)
    }

    /// An upload (an audio file to transcribe): `head` is the body as far
    /// as it was read before admission (the whole body when it ended
    /// there), forwarded as it came; `audio_seconds` what its file declares.
    pub fn upload(
        endpoint: Endpoint,
        model: String,
        head: Bytes,
        audio_seconds: Option<f64>,
    ) -> Self {
        Self {
            audio_seconds,
            ..Self::unread(endpoint, model, endpoint.unit_kind(), head)
        }
    }

    /// A request whose body the gateway forwards without parsing it as JSON.
    fn unread(endpoint: Endpoint, model: String, unit_kind: UnitKind, body: Bytes) -> Self {
        Self {
            endpoint,
            model,
            unit_kind,
            stream: false,
            max_tokens: None,
            sequences: 1,
            image: ImageOptions::default(),
            characters: 0,
            audio_seconds: None,
            upstream_body: body,
            stream_options: None,
            sent_completion_limit: false,
            rewrites: Rewrites::default(),
            parsed: None,
        }
    }

    /// Sets the completion limit in the body sent upstream: in `max_tokens`,
    /// which every backend reads (legacy completions read nothing else), and
    /// in `max_completion_tokens` too when the client sent it (chat backends
    /// read it first); a Responses request's in `max_output_tokens`, the
    /// only name it has. Takes effect at [`Self::seal_body`].
    pub fn set_max_tokens(&mut self, max_tokens: u64) {
        self.rewrites.max_tokens = Some(max_tokens);
        self.max_tokens = Some(max_tokens);
    }

    /// For a streamed chat or completion whose client did not ask for the
    /// usage chunk, asks the backend for it (`stream_options.include_usage`,
    /// at [`Self::seal_body`]). Returns whether it did, and so whether the
    /// chunk must be kept from the client; a `stream_options` that is not an
    /// object is left alone (the backend refuses it).
    pub fn request_stream_usage(&mut self) -> bool {
        if !self.stream || !self.endpoint.usage_on_request() {
            return false;
        }
        let wanted = match &self.stream_options {
            None => true,
            Some(raw) => serde_json::from_str::<serde_json::Map<String, Value>>(raw.get())
                .is_ok_and(|options| options.get("include_usage") != Some(&Value::Bool(true))),
        };
        self.rewrites.include_usage |= wanted;
        wanted
    }

    /// Writes the body sent upstream, once, with every rewrite asked for
    /// (the usage option, the cap); the client's bytes go unchanged when
    /// there was none. Only the top level is rewritten: every other member
    /// is copied as the client wrote it.
    pub fn seal_body(&mut self) {
        let rewrites = std::mem::take(&mut self.rewrites);
        if rewrites == Rewrites::default() {
            return;
        }
        let body = match self.rewritten_body(rewrites) {
            Ok(body) => body,
            // Unreachable for a body `parse` accepted; the client's bytes go.
            Err(error) => {
                tracing::error!("could not rewrite a request body: {error}");
                return;
            }
        };
        self.upstream_body = Bytes::from(body);
        self.parsed = None;
    }

    fn rewritten_body(&self, rewrites: Rewrites) -> serde_json::Result<Vec<u8>> {
        let mut members: BTreeMap<String, Cow<'_, RawValue>> =
            serde_json::from_slice::<BTreeMap<String, &RawValue>>(&self.upstream_body)?
                .into_iter()
                .map(|(name, value)| (name, Cow::Borrowed(value)))
                .collect();
        if let Some(max_tokens) = rewrites.max_tokens
            && self.endpoint == Endpoint::Responses
        {
            let value = RawValue::from_string(max_tokens.to_string())?;
            members.insert("max_output_tokens".into(), Cow::Owned(value));
        } else if let Some(max_tokens) = rewrites.max_tokens {
            let value = RawValue::from_string(max_tokens.to_string())?;
            if self.sent_completion_limit {
                members.insert("max_completion_tokens".into(), Cow::Owned(value.clone()));
            }
            members.insert("max_tokens".into(), Cow::Owned(value));
        }
        if rewrites.include_usage {
            let mut options: serde_json::Map<String, Value> = match &self.stream_options {
                Some(raw) => serde_json::from_str(raw.get())?,
                None => serde_json::Map::new(),
            };
            options.insert("include_usage".into(), Value::Bool(true));
            let value = serde_json::value::to_raw_value(&options)?;
            members.insert("stream_options".into(), Cow::Owned(value));
        }
        serde_json::to_vec(&members)
    }

    /// The body as sent upstream, parsed whole once, for what reads more
    /// than the gateway's fields (the prompt count, the Triton translation).
    pub fn json(&mut self) -> &Value {
        let body = &self.upstream_body;
        self.parsed
            .get_or_insert_with(|| serde_json::from_slice(body).unwrap_or(Value::Null))
    }

    /// [`Self::json`] without keeping it (for a request already finished).
    pub fn json_once(&self) -> Cow<'_, Value> {
        match &self.parsed {
            Some(json) => Cow::Borrowed(json),
            None => Cow::Owned(serde_json::from_slice(&self.upstream_body).unwrap_or(Value::Null)),
        }
    }

    /// Takes the parsed body out, for counting on another thread; give it
    /// back with [`Self::restore_json`].
    pub fn take_json(&mut self) -> Value {
        self.json();
        self.parsed.take().unwrap_or(Value::Null)
    }

    pub fn restore_json(&mut self, json: Value) {
        self.parsed = Some(json);
    }
}

/// The fields the gateway decides on, borrowed from the body; every other
/// member is skipped unparsed. A field sent twice is refused: backends
/// disagree on which copy wins, and the limit checked must be the one used.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    background: Option<&'a RawValue>,
    #[serde(borrow)]
    n: Option<&'a RawValue>,
    #[serde(borrow)]
    best_of: Option<&'a RawValue>,
    #[serde(borrow)]
    size: Option<&'a RawValue>,
    #[serde(borrow)]
    quality: Option<&'a RawValue>,
}

impl<'a> Fields<'a> {
    fn input(&self, endpoint: Endpoint) -> Option<&'a RawValue> {
        match endpoint {
            Endpoint::ChatCompletions => self.messages,
            Endpoint::Completions | Endpoint::ImageGenerations => self.prompt,
            Endpoint::Embeddings | Endpoint::Responses | Endpoint::Speech => self.input,
            Endpoint::ImageEdits
            | Endpoint::Transcription
            | Endpoint::Translation
            | Endpoint::Custom => None,
        }
    }
}

/// The JSON type of a raw value, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Object,
    Array,
    String,
    Number,
    Other,
}

fn shape(value: &RawValue) -> Shape {
    match value.get().as_bytes().first() {
        Some(b'{') => Shape::Object,
        Some(b'[') => Shape::Array,
        Some(b'"') => Shape::String,
        Some(b'-' | b'0'..=b'9') => Shape::Number,
        _ => Shape::Other,
    }
}

/// The elements of a raw array, themselves raw.
fn elements(array: &RawValue) -> Vec<&RawValue> {
    serde_json::from_str(array.get()).unwrap_or_default()
}

/// A non-negative integer field; the error names it.
fn count_field(value: &RawValue, name: &'static str, what: &str) -> Result<u64, ApiError> {
    serde_json::from_str::<u64>(value.get())
        .map_err(|_| ApiError::bad_request(format!("`{name}` must be {what}."), Some(name)))
}

/// The two names of the completion limit.
const LIMIT_FIELDS: [&str; 2] = ["max_completion_tokens", "max_tokens"];

/// The completion limit the backend will honour. Chat backends read
/// `max_completion_tokens` over the older `max_tokens`; legacy completions
/// know only `max_tokens` (vLLM ignores the other there). A body that sets
/// both to different values is refused: backends disagree on which wins,
/// and whichever the reservation trusted, the other could let more through.
fn completion_limit(endpoint: Endpoint, fields: &Fields<'_>) -> Result<Option<u64>, ApiError> {
    let mut limits = [None, None];
    let sent = [fields.max_completion_tokens, fields.max_tokens];
    for ((limit, name), value) in limits.iter_mut().zip(LIMIT_FIELDS).zip(sent) {
        if let Some(value) = value {
            *limit = Some(count_field(value, name, "a non-negative integer")?);
        }
    }
    let [completion, legacy] = limits;
    if let (Some(a), Some(b)) = (completion, legacy)
        && a != b
    {
        return Err(ApiError::bad_request(
            format!(
                "`max_completion_tokens` ({a}) and `max_tokens` ({b}) differ; send one of them."
            ),
            Some("max_completion_tokens"),
        ));
    }
    Ok(match endpoint {
        Endpoint::ChatCompletions => completion.or(legacy),
        Endpoint::Completions => legacy,
        // The Responses API knows only its own name for the limit.
        Endpoint::Responses => fields
            .max_output_tokens
            .map(|value| count_field(value, "max_output_tokens", "a non-negative integer"))
            .transpose()?,
        Endpoint::Embeddings
        | Endpoint::ImageGenerations
        | Endpoint::ImageEdits
        | Endpoint::Speech
        | Endpoint::Transcription
        | Endpoint::Translation
        | Endpoint::Custom => None,
    })
}

/// How many prompts a completions `prompt` holds: a string or a token array
/// is one, an array of strings or of token arrays one per element.
fn completion_prompts(prompt: &RawValue) -> Result<u64, ApiError> {
    if shape(prompt) != Shape::Array {
        return Ok(1);
    }
    let items = elements(prompt);
    if items.is_empty() {
        return Err(ApiError::bad_request(
            "`prompt` must not be an empty list.",
            Some("prompt"),
        ));
    }
    if items.iter().all(|item| shape(item) == Shape::Number) {
        Ok(1)
    } else {
        Ok(items.len() as u64)
    }
}

/// Pingora replays a request body upstream only from its retry buffer, which
/// holds 64 KiB (pingora-core's private `BODY_BUF_LIMIT`; re-check on upgrade).
const RETRY_BUFFER_BYTES: usize = 64 * 1024;

/// Why reading the body stopped short.
pub enum BodyError {
    Refuse(ApiError),
    /// The client went away mid-body: nothing to answer.
    ClientGone(Box<pingora::Error>),
}

impl From<ApiError> for BodyError {
    fn from(error: ApiError) -> Self {
        Self::Refuse(error)
    }
}

/// Reads the whole request body, refusing more than `limit` bytes.
///
/// Routing needs the body's `model` before `upstream_peer`, so the body is
/// read here, but Pingora then forwards a consumed body only by replaying its
/// retry buffer, through `request_body_filter`. Retry buffering is therefore
/// switched on once at most 64 KiB remain: the buffer then holds the tail of
/// the body, is never truncated, and its replay is the cue to send the whole
/// body from the context instead (see `Gateway::request_body_filter`).
pub async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, BodyError> {
    let mut reader = BodyReader::start(session, limit).await?;
    let mut body = BytesMut::with_capacity(reader.declared.unwrap_or(16 * 1024));
    while let Some(chunk) = reader.next(session).await? {
        body.extend_from_slice(&chunk);
    }
    BodyReader::check_replayable(session, body.len())?;
    Ok(body.freeze())
}

/// A request body read chunk by chunk in `request_filter`, within a limit,
/// with retry buffering on for its last 64 KiB (see [`read_body`]).
pub struct BodyReader {
    /// `Content-Length`, when the body is not chunked.
    pub declared: Option<usize>,
    limit: usize,
    read: usize,
    buffering: bool,
}

impl BodyReader {
    /// Refuses a declared length above `limit`, and answers
    /// `Expect: 100-continue`.
    pub async fn start(session: &mut Session, limit: usize) -> Result<Self, BodyError> {
        let headers = &session.req_header().headers;
        let chunked = headers
            .get(http::header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let declared: Option<usize> = if chunked {
            None
        } else {
            headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        let expects_continue = headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::BodyTooLarge { limit }.into());
        }
        if expects_continue {
            // Pingora never sends 100 Continue itself; without it curl waits a second.
            session
                .write_continue_response()
                .await
                .map_err(|e| BodyError::ClientGone(e.into_down()))?;
        }
        Ok(Self {
            declared,
            limit,
            read: 0,
            buffering: false,
        })
    }

    /// The next chunk, `None` at the end of the body.
    pub async fn next(&mut self, session: &mut Session) -> Result<Option<Bytes>, BodyError> {
        let remaining = self.declared.map(|n| n.saturating_sub(self.read));
        if !self.buffering && remaining.is_none_or(|r| r <= RETRY_BUFFER_BYTES) {
            session.enable_retry_buffering();
            self.buffering = true;
        }
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                self.read += chunk.len();
                if self.read > self.limit {
                    return Err(ApiError::BodyTooLarge { limit: self.limit }.into());
                }
                Ok(Some(chunk))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(BodyError::ClientGone(e.into_down())),
        }
    }

    /// A body read to its end can be sent on only by the replay of its
    /// tail: refuses one Pingora could not replay.
    pub fn check_replayable(session: &Session, read: usize) -> Result<(), ApiError> {
        if read > 0 && session.get_retry_buffer().is_none() {
            // Only a chunked body above 64 KiB gets here: Pingora could not replay it.
            return Err(ApiError::bad_request(
                "Chunked request bodies above 64 KiB are not supported; send Content-Length.",
                None,
            ));
        }
        Ok(())
    }
}

/// Parses and checks an inference body; the error names the field at fault.
/// Only the fields the gateway decides on are read (see [`Fields`]).
pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<InferenceRequest, ApiError> {
    let opens_object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    let fields: Fields<'_> = serde_json::from_slice(&body).map_err(|e| {
        if opens_object && e.is_data() {
            ApiError::bad_request(format!("Request body is invalid: {e}."), None)
        } else if opens_object || e.is_syntax() || e.is_eof() {
            ApiError::bad_request(format!("Request body is not valid JSON: {e}."), None)
        } else {
            ApiError::bad_request("Request body must be a JSON object.", None)
        }
    })?;
    if !opens_object {
        // A JSON array would fill the fields by position.
        return Err(ApiError::bad_request(
            "Request body must be a JSON object.",
            None,
        ));
    }
    let model = match fields.model {
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(model) if !model.is_empty() => model,
            _ => {
                return Err(ApiError::bad_request(
                    "`model` must be a non-empty string.",
                    Some("model"),
                ));
            }
        },
        None => {
            return Err(ApiError::bad_request(
                "You must provide a `model` parameter.",
                Some("model"),
            ));
        }
    };
    let input_name = input_field(endpoint);
    let Some(input) = fields.input(endpoint) else {
        return Err(ApiError::bad_request(
            format!("Missing required parameter `{input_name}`."),
            Some(input_name),
        ));
    };
    if endpoint == Endpoint::ChatCompletions {
        if shape(input) != Shape::Array {
            return Err(ApiError::bad_request(
                "`messages` must be an array of messages.",
                Some("messages"),
            ));
        }
        if is_empty_array(input) {
            return Err(ApiError::bad_request(
                "`messages` must contain at least one message.",
                Some("messages"),
            ));
        }
    }
    let stream = match fields.stream.map(RawValue::get) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`stream` must be a boolean.",
                Some("stream"),
            ));
        }
    };
    match endpoint {
        Endpoint::Embeddings if stream => {
            return Err(ApiError::bad_request(
                "Embeddings cannot be streamed.",
                Some("stream"),
            ));
        }
        Endpoint::ImageGenerations if stream => {
            return Err(ApiError::bad_request(
                "Streamed image generation is not supported; leave `stream` out.",
                Some("stream"),
            ));
        }
        Endpoint::ImageGenerations if shape(input) != Shape::String => {
            return Err(ApiError::bad_request(
                "`prompt` must be a string.",
                Some("prompt"),
            ));
        }
        // A background response is generated after its request is answered,
        // out of the gateway's sight: nothing would meter it or hold its slot.
        Endpoint::Responses if fields.background.is_some_and(|b| b.get() == "true") => {
            return Err(ApiError::bad_request(
                "`background` responses are not served here: a response is metered as it is \
                 generated, so it is answered in its own request (stream it for long answers).",
                Some("background"),
            ));
        }
        Endpoint::Responses
            if !matches!(shape(input), Shape::String | Shape::Array) || is_empty_array(input) =>
        {
            return Err(ApiError::bad_request(
                "`input` must be a string or a non-empty list of input items.",
                Some("input"),
            ));
        }
        Endpoint::Speech if stream => {
            return Err(ApiError::bad_request(
                "Speech streams as audio by itself; leave `stream` out.",
                Some("stream"),
            ));
        }
        _ => {}
    }
    let characters = if endpoint == Endpoint::Speech {
        match serde_json::from_str::<String>(input.get()) {
            Ok(text) if !text.is_empty() => text.chars().count() as u64,
            _ => {
                return Err(ApiError::bad_request(
                    "`input` must be a non-empty string.",
                    Some("input"),
                ));
            }
        }
    } else {
        0
    };
    let image = if endpoint == Endpoint::ImageGenerations {
        ImageOptions {
            size: optional_string(fields.size, "size")?,
            quality: optional_string(fields.quality, "quality")?,
        }
    } else {
        ImageOptions::default()
    };
    let max_tokens = completion_limit(endpoint, &fields)?;
    let mut choices: u64 = 1;
    let best_of = fields.best_of.filter(|_| endpoint.generates());
    for (name, value) in [("n", fields.n), ("best_of", best_of)] {
        if let Some(value) = value {
            match count_field(value, name, "a positive integer")? {
                0 => {
                    return Err(ApiError::bad_request(
                        format!("`{name}` must be a positive integer."),
                        Some(name),
                    ));
                }
                n => choices = choices.max(n),
            }
        }
    }
    let prompts = match endpoint {
        Endpoint::Completions => completion_prompts(input)?,
        Endpoint::ChatCompletions
        | Endpoint::Embeddings
        | Endpoint::Responses
        | Endpoint::ImageGenerations
        | Endpoint::ImageEdits
        | Endpoint::Speech
        | Endpoint::Transcription
        | Endpoint::Translation
        | Endpoint::Custom => 1,
    };
    // Every prompt gets every choice: the reservation covers all of them.
    let sequences = choices.checked_mul(prompts).ok_or_else(|| {
        ApiError::bad_request(
            "`n` (or `best_of`) times the number of prompts is too large.",
            Some("n"),
        )
    })?;
    let stream_options = fields.stream_options.map(RawValue::to_owned);
    let sent_completion_limit = fields.max_completion_tokens.is_some();
    Ok(InferenceRequest {
        endpoint,
        model,
        unit_kind: endpoint.unit_kind(),
        stream,
        max_tokens,
        sequences,
        image,
        characters,
        audio_seconds: None,
        upstream_body: body,
        stream_options,
        sent_completion_limit,
        rewrites: Rewrites::default(),
        parsed: None,
    })
}

/// A string field that may be absent or null.
fn optional_string(
    value: Option<&RawValue>,
    name: &'static str,
) -> Result<Option<String>, ApiError> {
    match value.map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("`{name}` must be a string."), Some(name))),
    }
}

/// `[]`, whatever whitespace it holds.
fn is_empty_array(value: &RawValue) -> bool {
    value
        .get()
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .is_some_and(|inner| inner.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse_str(endpoint: Endpoint, body: &str) -> Result<InferenceRequest, ApiError> {
        parse(endpoint, Bytes::copy_from_slice(body.as_bytes()))
    }

    fn param(result: Result<InferenceRequest, ApiError>) -> Option<&'static str> {
        match result {
            Err(ApiError::BadRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    fn json_request(body: Value) -> InferenceRequest {
        parse(Endpoint::ChatCompletions, Bytes::from(body.to_string())).unwrap()
    }

    #[test]
    fn streams_are_asked_for_usage_unless_the_client_already_did() {
        let body =
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
        let mut asked = json_request(body.clone());
        assert!(asked.request_stream_usage());
        asked.seal_body();
        let sent: Value = serde_json::from_slice(&asked.upstream_body).unwrap();
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
        assert_eq!(sent["messages"], body["messages"]);

        let mut own = body.clone();
        own["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": false});
        let mut client_asked = json_request(own);
        let original = client_asked.upstream_body.clone();
        assert!(!client_asked.request_stream_usage());
        client_asked.seal_body();
        assert_eq!(
            client_asked.upstream_body, original,
            "the client's bytes, untouched"
        );

        let mut other_options = body.clone();
        other_options["stream_options"] = json!({"continuous_usage_stats": true});
        let mut merged = json_request(other_options);
        assert!(merged.request_stream_usage());
        merged.seal_body();
        let sent: Value = serde_json::from_slice(&merged.upstream_body).unwrap();
        assert_eq!(
            sent["stream_options"],
            json!({"continuous_usage_stats": true, "include_usage": true})
        );

        let mut plain = json_request(json!({"model": "m", "messages": body["messages"]}));
        assert!(
            !plain.request_stream_usage(),
            "not streamed: nothing to ask"
        );
    }

    #[test]
    fn chat_request_fields_are_extracted() {
        let request = parse_str(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":7}"#,
        )
        .unwrap();
        assert_eq!(request.model, "m");
        assert!(request.stream);
        assert_eq!(request.max_tokens, Some(7));
    }

    #[test]
    fn the_limit_is_read_where_the_backend_honours_it() {
        let chat = |extra: &str| {
            parse_str(
                Endpoint::ChatCompletions,
                &format!(r#"{{"model":"m","messages":[{{}}]{extra}}}"#),
            )
        };
        let completions = |extra: &str| {
            parse_str(
                Endpoint::Completions,
                &format!(r#"{{"model":"m","prompt":"p"{extra}}}"#),
            )
        };
        assert_eq!(
            chat(r#","max_completion_tokens":5"#).unwrap().max_tokens,
            Some(5)
        );
        assert_eq!(chat(r#","max_tokens":7"#).unwrap().max_tokens, Some(7));
        assert_eq!(
            chat(r#","max_tokens":7,"max_completion_tokens":7"#)
                .unwrap()
                .max_tokens,
            Some(7)
        );
        // Legacy completions know only `max_tokens`.
        assert_eq!(
            completions(r#","max_completion_tokens":5"#)
                .unwrap()
                .max_tokens,
            None
        );
        assert_eq!(
            completions(r#","max_tokens":9"#).unwrap().max_tokens,
            Some(9)
        );
    }

    /// Before: `max_completion_tokens` was trusted over `max_tokens` on every
    /// endpoint, so a body with a small one and a large other reserved for
    /// the small one while the backend generated up to the large one.
    #[test]
    fn a_body_with_two_different_limits_is_refused_naming_them() {
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
            let input = if endpoint == Endpoint::Completions {
                r#""prompt":"p""#
            } else {
                r#""messages":[{}]"#
            };
            let result = parse_str(
                endpoint,
                &format!(r#"{{"model":"m",{input},"max_completion_tokens":1,"max_tokens":500}}"#),
            );
            let Err(ApiError::BadRequest { message, param }) = result else {
                panic!("expected a 400");
            };
            assert_eq!(param, Some("max_completion_tokens"));
            assert!(message.contains("max_tokens"), "{message}");
        }
    }

    /// Before: the capped limit went only into the field the client used,
    /// and a legacy completion's backend ignores `max_completion_tokens`.
    #[test]
    fn the_limit_is_written_where_every_backend_reads_it() {
        let mut both = parse_str(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{}],"max_completion_tokens":50,"max_tokens":50}"#,
        )
        .unwrap();
        both.set_max_tokens(3);
        both.seal_body();
        let sent: Value = serde_json::from_slice(&both.upstream_body).unwrap();
        assert_eq!(
            (
                sent["max_completion_tokens"].as_u64(),
                sent["max_tokens"].as_u64()
            ),
            (Some(3), Some(3))
        );
        for body in [
            r#"{"model":"m","prompt":"p"}"#,
            r#"{"model":"m","prompt":"p","max_completion_tokens":9}"#,
        ] {
            let mut completion = parse_str(Endpoint::Completions, body).unwrap();
            completion.set_max_tokens(4);
            completion.seal_body();
            let sent: Value = serde_json::from_slice(&completion.upstream_body).unwrap();
            assert_eq!(sent["max_tokens"], 4, "{body}");
        }
    }

    /// A Responses request's limit has one name, which a cap rewrites; the
    /// chat names are not added (a Responses server refuses them).
    #[test]
    fn a_responses_limit_is_read_and_capped_as_max_output_tokens() {
        let mut request = parse_str(
            Endpoint::Responses,
            r#"{"model":"m","input":"hi","max_output_tokens":50,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(request.max_tokens, Some(50));
        // Its stream always ends with usage: nothing to ask for.
        assert!(!request.request_stream_usage());
        request.set_max_tokens(7);
        request.seal_body();
        let sent: Value = serde_json::from_slice(&request.upstream_body).unwrap();
        assert_eq!(sent["max_output_tokens"], 7);
        assert!(sent.get("max_tokens").is_none() && sent.get("stream_options").is_none());
        for bad in [
            r#"{"model":"m","input":[]}"#,
            r#"{"model":"m","input":3}"#,
            r#"{"model":"m"}"#,
            r#"{"model":"m","input":"hi","background":true}"#,
        ] {
            assert!(parse_str(Endpoint::Responses, bad).is_err(), "{bad}");
        }
    }

    /// Before: a prompt array counted as one prompt, so `n` answers were
    /// reserved where the backend generated `n` per prompt.
    #[test]
    fn every_prompt_of_a_completions_request_counts_its_choices() {
        let sequences = |body: &str| parse_str(Endpoint::Completions, body).unwrap().sequences;
        assert_eq!(sequences(r#"{"model":"m","prompt":"one"}"#), 1);
        assert_eq!(sequences(r#"{"model":"m","prompt":[1,2,3],"n":2}"#), 2);
        assert_eq!(
            sequences(r#"{"model":"m","prompt":["a","b","c"],"n":2}"#),
            6
        );
        assert_eq!(
            sequences(r#"{"model":"m","prompt":[[1],[2]],"best_of":3,"n":2}"#),
            6
        );
        assert_eq!(
            param(parse_str(
                Endpoint::Completions,
                r#"{"model":"m","prompt":[]}"#
            )),
            Some("prompt")
        );
        assert_eq!(
            param(parse_str(
                Endpoint::Completions,
                &format!(r#"{{"model":"m","prompt":["a","b"],"n":{}}}"#, u64::MAX)
            )),
            Some("n")
        );
    }

    /// The gateway reads the fields it decides on once; a body naming one
    /// of them twice is ambiguous (backends keep the first or the last), so
    /// the limit checked could differ from the one used: refused.
    #[test]
    fn a_field_the_gateway_decides_on_sent_twice_is_refused() {
        let twice = r#"{"model":"m","messages":[{}],"max_tokens":1,"max_tokens":900}"#;
        let Err(ApiError::BadRequest { message, .. }) = parse_str(Endpoint::ChatCompletions, twice)
        else {
            panic!("expected a 400");
        };
        assert!(
            message.contains("duplicate field `max_tokens`"),
            "{message}"
        );
        // Other members are the backend's business, passed on as sent.
        let other = r#"{"model":"m","messages":[{}],"x":1,"x":2}"#;
        let request = parse_str(Endpoint::ChatCompletions, other).unwrap();
        assert_eq!(request.upstream_body, other.as_bytes());
    }

    #[test]
    fn the_input_is_read_for_its_shape_without_parsing_it() {
        let chat = |messages: &str| {
            parse_str(
                Endpoint::ChatCompletions,
                &format!(r#"{{"model":"m","messages":{messages}}}"#),
            )
        };
        assert!(chat("[[]]").is_ok(), "one (malformed) message is not none");
        assert!(chat("[ {} ]").is_ok());
        assert_eq!(param(chat("[ \n ]")), Some("messages"));
        assert_eq!(param(chat(r#"{"role":"user"}"#)), Some("messages"));
        assert_eq!(param(chat("null")), Some("messages"));
        let prompts = |prompt: &str| {
            parse_str(
                Endpoint::Completions,
                &format!(r#"{{"model":"m","prompt":{prompt},"n":3}}"#),
            )
            .map(|r| r.sequences)
        };
        assert_eq!(prompts(r#""one""#).unwrap(), 3);
        assert_eq!(prompts("[-1, 2, 3.5]").unwrap(), 3, "one token array");
        assert_eq!(prompts(r#"[[1], "b", {"x": [1, 2]}]"#).unwrap(), 9);
        let escaped = r#"{"model":"\u006d","messages":[{}]}"#;
        assert_eq!(
            parse_str(Endpoint::ChatCompletions, escaped).unwrap().model,
            "m"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let chat = Endpoint::ChatCompletions;
        assert_eq!(param(parse_str(chat, r#"{"messages":[]}"#)), Some("model"));
        assert_eq!(param(parse_str(chat, r#"{"model":"m"}"#)), Some("messages"));
        assert_eq!(
            param(parse_str(chat, r#"{"model":"m","messages":[]}"#)),
            Some("messages")
        );
        assert_eq!(
            param(parse_str(
                chat,
                r#"{"model":"m","messages":[{}],"stream":"yes"}"#
            )),
            Some("stream")
        );
        assert_eq!(
            param(parse_str(
                chat,
                r#"{"model":"m","messages":[{}],"max_tokens":-1}"#
            )),
            Some("max_tokens")
        );
        assert_eq!(
            param(parse_str(Endpoint::Completions, r#"{"model":"m"}"#)),
            Some("prompt")
        );
        assert_eq!(
            param(parse_str(Endpoint::Embeddings, r#"{"model":"m"}"#)),
            Some("input")
        );
        assert_eq!(param(parse_str(chat, "{not json")), None);
        assert_eq!(param(parse_str(chat, "[1,2]")), None);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Any JSON value, nested a few levels, with the request fields
        /// metering and admission read given every kind of value.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                ".{0,12}".prop_map(Value::from),
            ];
            let value = leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::btree_map(
                        prop::sample::select(vec![
                            "model",
                            "messages",
                            "prompt",
                            "input",
                            "stream",
                            "max_tokens",
                            "max_completion_tokens",
                            "n",
                            "best_of",
                            "role",
                            "content",
                            "x",
                        ]),
                        inner,
                        0..6,
                    )
                    .prop_map(|map| Value::Object(
                        map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                    )),
                ]
            });
            value.prop_map(|value| match value {
                Value::Object(mut map) => {
                    map.entry("model").or_insert(Value::from("m"));
                    Value::Object(map)
                }
                other => other,
            })
        }

        fn endpoint() -> impl Strategy<Value = Endpoint> {
            prop::sample::select(vec![
                Endpoint::ChatCompletions,
                Endpoint::Completions,
                Endpoint::Embeddings,
            ])
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn any_body_is_parsed_or_refused_with_a_400(
                endpoint in endpoint(),
                value in json(),
                limit in any::<u64>(),
            ) {
                let body = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
                match parse(endpoint, body.clone()) {
                    Ok(mut request) => {
                        prop_assert!(!request.model.is_empty());
                        prop_assert!(request.sequences >= 1);
                        // Rewriting the limit keeps the body JSON, same model.
                        request.set_max_tokens(limit);
                        request.seal_body();
                        let sent: Value = serde_json::from_slice(&request.upstream_body).unwrap();
                        prop_assert_eq!(sent["model"].as_str(), Some(request.model.as_str()));
                        prop_assert_eq!(request.max_tokens, Some(limit));
                    }
                    Err(error) => prop_assert_eq!(error.status(), 400),
                }
            }

            /// Rewriting only the top level gives the body that applying
            /// the same changes to the whole parsed body would.
            #[test]
            fn the_rewritten_body_is_the_parsed_body_with_the_changes(
                endpoint in endpoint(),
                value in json(),
                limit in any::<u64>(),
                stream_options in prop_oneof![
                    Just(None),
                    Just(Some(Value::Null)),
                    Just(Some(json!({}))),
                    Just(Some(json!({"include_usage": false, "continuous_usage_stats": true}))),
                    Just(Some(json!("not an object"))),
                ],
            ) {
                let mut value = value;
                if let (Value::Object(map), Some(options)) = (&mut value, stream_options) {
                    map.insert("stream".into(), Value::Bool(true));
                    map.insert("stream_options".into(), options);
                }
                let body = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
                if let Ok(mut request) = parse(endpoint, body.clone()) {
                    let asked = request.request_stream_usage();
                    request.set_max_tokens(limit);
                    request.seal_body();
                    let sent: Value = serde_json::from_slice(&request.upstream_body).unwrap();
                    // Read back from the same text, so numbers compare alike.
                    let mut expected: Value = serde_json::from_slice(&body).unwrap();
                    let fields = expected.as_object_mut().unwrap();
                    if fields.get("max_completion_tokens").is_some_and(|v| !v.is_null()) {
                        fields.insert("max_completion_tokens".into(), limit.into());
                    }
                    fields.insert("max_tokens".into(), limit.into());
                    if asked {
                        let options = fields
                            .entry("stream_options")
                            .or_insert_with(|| json!({}));
                        if options.is_null() {
                            *options = json!({});
                        }
                        options["include_usage"] = Value::Bool(true);
                    }
                    prop_assert_eq!(sent, expected);
                }
            }

            #[test]
            fn any_bytes_are_parsed_or_refused_with_a_400(
                endpoint in endpoint(),
                bytes in prop::collection::vec(any::<u8>(), 0..512),
            ) {
                if let Err(error) = parse(endpoint, Bytes::from(bytes)) {
                    prop_assert_eq!(error.status(), 400);
                }
            }

        }
    }
}
