//! The OpenAI HTTP API as trtllm-serve, vLLM and Triton's OpenAI frontend
//! speak it: models, chat completions, completions and embeddings, streamed
//! and not.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tollgate_metering::tokens::{Encoding, count_chat_prompt};

use super::engine::{Engine, Generation, GenerationRequest, wait_until};
use super::error::SimError;
use super::generate::{FinishReason, mix, stable_hash};
use super::stream::{StreamFormat, sse_response};

/// Embedding width when the request does not ask for `dimensions`.
const DEFAULT_EMBEDDING_DIMENSIONS: usize = 384;
/// Upper bound on `dimensions`, so a request cannot ask for gigabytes.
const MAX_EMBEDDING_DIMENSIONS: usize = 8192;

type SharedEngine = State<Arc<Engine>>;

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Value,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

pub async fn models(State(engine): SharedEngine) -> Response {
    let created = unix_now();
    let data: Vec<Value> = engine
        .options
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "gpu-sim"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn chat_completions(
    State(engine): SharedEngine,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let request: ChatRequest = parse_body(&body?)?;
    if request.messages.is_empty() {
        return Err(SimError::bad_request(
            "`messages` must contain at least one message.",
            Some("messages"),
        ));
    }
    check_n(request.n)?;
    let max_tokens = check_max_tokens(request.max_completion_tokens.or(request.max_tokens))?;
    let encoding = engine.encoding_for(&request.model);
    let prompt_key = serde_json::to_vec(&request.messages).unwrap_or_default();
    let generation = engine
        .start(GenerationRequest {
            model: &request.model,
            prompt_key: &prompt_key,
            prompt_tokens: count_chat_prompt(encoding, &request.messages),
            max_tokens,
        })
        .await?;
    let answer = Answer::new(&engine, Endpoint::Chat, &request.model);
    if request.stream.unwrap_or(false) {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        return Ok(answer.stream(generation, include_usage));
    }
    let text = generation_text(&generation).await;
    let choice = ChatChoice {
        index: 0,
        message: AssistantMessage {
            role: "assistant",
            content: &text,
        },
        logprobs: None,
        finish_reason: generation.completion.finish_reason.as_str(),
    };
    Ok(answer.complete(&generation, choice))
}

pub async fn completions(
    State(engine): SharedEngine,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let request: CompletionRequest = parse_body(&body?)?;
    check_n(request.n)?;
    let max_tokens = check_max_tokens(request.max_tokens)?;
    let encoding = engine.encoding_for(&request.model);
    let prompt = single_prompt(&request.prompt)?;
    let prompt_key = serde_json::to_vec(&request.prompt).unwrap_or_default();
    let generation = engine
        .start(GenerationRequest {
            model: &request.model,
            prompt_key: &prompt_key,
            prompt_tokens: prompt.tokens(encoding),
            max_tokens,
        })
        .await?;
    let answer = Answer::new(&engine, Endpoint::Completion, &request.model);
    if request.stream.unwrap_or(false) {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        return Ok(answer.stream(generation, include_usage));
    }
    let text = generation_text(&generation).await;
    let choice = TextChoice {
        index: 0,
        text: &text,
        logprobs: None,
        finish_reason: generation.completion.finish_reason.as_str(),
    };
    Ok(answer.complete(&generation, choice))
}

pub async fn embeddings(
    State(engine): SharedEngine,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let request: EmbeddingRequest = parse_body(&body?)?;
    if !engine.serves(&request.model) {
        return Err(SimError::UnknownModel(request.model));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(SimError::bad_request(
                format!("`encoding_format` must be \"float\" or \"base64\", not {other:?}."),
                Some("encoding_format"),
            ));
        }
    };
    let dimensions = request.dimensions.unwrap_or(DEFAULT_EMBEDDING_DIMENSIONS);
    if !(1..=MAX_EMBEDDING_DIMENSIONS).contains(&dimensions) {
        return Err(SimError::bad_request(
            format!("`dimensions` must be between 1 and {MAX_EMBEDDING_DIMENSIONS}."),
            Some("dimensions"),
        ));
    }
    let inputs = embedding_inputs(&request.input)?;
    let encoding = engine.encoding_for(&request.model);
    let seed = engine.options.seed;
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += input.tokens(encoding);
            let key = stable_hash(seed, &[request.model.as_bytes(), &input.key()]);
            let vector = embedding_vector(key, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": request.model});
    if !engine.options.no_usage {
        body["usage"] = json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens});
    }
    Ok(Json(body).into_response())
}

/// Parses a JSON request body, naming what is wrong when it does not fit.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, SimError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "Request body is not valid JSON"
        } else {
            "Invalid request body"
        };
        SimError::bad_request(format!("{what}: {e}."), None)
    })
}

/// `max_tokens` must allow at least one token.
pub fn check_max_tokens(max_tokens: Option<u32>) -> Result<Option<u32>, SimError> {
    match max_tokens {
        Some(0) => Err(SimError::bad_request(
            "`max_tokens` must be at least 1.",
            Some("max_tokens"),
        )),
        other => Ok(other),
    }
}

fn check_n(n: Option<u32>) -> Result<(), SimError> {
    match n {
        None | Some(1) => Ok(()),
        Some(_) => Err(SimError::bad_request(
            "gpu-sim generates one choice per request; `n` must be 1.",
            Some("n"),
        )),
    }
}

/// Waits until the generation is done and returns its text.
async fn generation_text(generation: &Generation) -> String {
    wait_until(generation.due(0)).await;
    generation.observe_first_token();
    wait_until(generation.finished_at()).await;
    generation.observe_generated(generation.completion.len());
    generation.completion.text()
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

impl Usage {
    fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A non-streamed answer (`chat.completion` or `text_completion`).
#[derive(Serialize)]
struct CompletionBody<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Clone, Copy)]
enum Endpoint {
    Chat,
    Completion,
}

/// The envelope of one answer: id, timestamps, model, and how usage is counted.
struct Answer {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    report_usage: bool,
}

impl Answer {
    fn new(engine: &Engine, endpoint: Endpoint, model: &str) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            endpoint,
            id: response_id(prefix),
            created: unix_now(),
            model: model.to_owned(),
            report_usage: !engine.options.no_usage,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn complete<C: Serialize>(&self, generation: &Generation, choice: C) -> Response {
        Json(CompletionBody {
            id: &self.id,
            object: self.object(false),
            created: self.created,
            model: &self.model,
            choices: [choice],
            usage: self
                .report_usage
                .then(|| Usage::new(generation.prompt_tokens, generation.completion.len())),
        })
        .into_response()
    }

    fn stream(self, generation: Generation, include_usage: bool) -> Response {
        let include_usage = include_usage && self.report_usage;
        // Every chunk starts the same way; write that part once.
        let chunk_prefix = format!(
            "data: {{\"id\":\"{}\",\"object\":\"{}\",\"created\":{},\"model\":{},\"choices\":[",
            self.id,
            self.object(true),
            self.created,
            json_string(&self.model),
        );
        // OpenAI sends `"usage": null` on every chunk when usage was asked for.
        let chunk_suffix = if include_usage {
            "],\"usage\":null}\n\n"
        } else {
            "]}\n\n"
        };
        sse_response(
            generation,
            OpenAiChunks {
                answer: self,
                chunk_prefix,
                chunk_suffix,
                include_usage,
            },
        )
    }
}

/// A response id unique within this process and unlikely to repeat across
/// processes; ids, unlike the text, need not be reproducible.
fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{:016x}",
        mix(n ^ (u64::from(std::process::id()) << 32))
    )
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

struct OpenAiChunks {
    answer: Answer,
    chunk_prefix: String,
    chunk_suffix: &'static str,
    include_usage: bool,
}

impl OpenAiChunks {
    fn choice(&self, delta_or_text: &str, finish: Option<FinishReason>, out: &mut String) {
        let finish = finish.map_or("null".to_owned(), |f| format!("\"{}\"", f.as_str()));
        out.push_str(&self.chunk_prefix);
        let _ = write!(
            out,
            "{{\"index\":0,{delta_or_text},\"logprobs\":null,\"finish_reason\":{finish}}}"
        );
        out.push_str(self.chunk_suffix);
    }

    fn content(&self, piece: &str) -> String {
        match self.answer.endpoint {
            Endpoint::Chat => format!("\"delta\":{{\"content\":{}}}", json_string(piece)),
            Endpoint::Completion => format!("\"text\":{}", json_string(piece)),
        }
    }
}

impl StreamFormat for OpenAiChunks {
    fn opening(&self, out: &mut String) {
        if let Endpoint::Chat = self.answer.endpoint {
            self.choice(
                "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}",
                None,
                out,
            );
        }
    }

    fn token(&self, piece: &str, out: &mut String) {
        self.choice(&self.content(piece), None, out);
    }

    fn closing(&self, finish: FinishReason, generation: &Generation, out: &mut String) {
        let last = match self.answer.endpoint {
            Endpoint::Chat => "\"delta\":{}".to_owned(),
            Endpoint::Completion => "\"text\":\"\"".to_owned(),
        };
        self.choice(&last, Some(finish), out);
        if self.include_usage {
            let usage = Usage::new(generation.prompt_tokens, generation.completion.len());
            let usage = serde_json::to_string(&usage).unwrap_or_default();
            out.push_str(&self.chunk_prefix);
            let _ = write!(out, "],\"usage\":{usage}}}\n\n");
        }
        out.push_str("data: [DONE]\n\n");
    }

    fn aborted(&self, _out: &mut String) -> bool {
        // An OpenAI stream has no abort event: the connection just drops.
        false
    }
}

/// A completion prompt: one text or one token array.
enum Prompt<'a> {
    Text(&'a str),
    Tokens(usize),
}

impl Prompt<'_> {
    fn tokens(&self, encoding: Encoding) -> usize {
        match self {
            Self::Text(text) => encoding.count(text),
            Self::Tokens(n) => *n,
        }
    }
}

fn single_prompt(prompt: &Value) -> Result<Prompt<'_>, SimError> {
    let invalid = || {
        SimError::bad_request(
            "`prompt` must be a string, a token array, or a list holding one of those \
             (gpu-sim answers one prompt per request).",
            Some("prompt"),
        )
    };
    match prompt {
        Value::String(text) => Ok(Prompt::Text(text)),
        Value::Array(items) if items.iter().all(Value::is_u64) && !items.is_empty() => {
            Ok(Prompt::Tokens(items.len()))
        }
        Value::Array(items) if items.len() == 1 => match &items[0] {
            Value::String(text) => Ok(Prompt::Text(text)),
            Value::Array(tokens) if tokens.iter().all(Value::is_u64) && !tokens.is_empty() => {
                Ok(Prompt::Tokens(tokens.len()))
            }
            _ => Err(invalid()),
        },
        _ => Err(invalid()),
    }
}

/// One embeddings input: text or a token array.
enum EmbeddingInput<'a> {
    Text(&'a str),
    Tokens(&'a [Value]),
}

impl EmbeddingInput<'_> {
    fn tokens(&self, encoding: Encoding) -> usize {
        match self {
            Self::Text(text) => encoding.count(text),
            Self::Tokens(tokens) => tokens.len(),
        }
    }

    fn key(&self) -> Vec<u8> {
        match self {
            Self::Text(text) => text.as_bytes().to_vec(),
            Self::Tokens(tokens) => Value::Array(tokens.to_vec()).to_string().into_bytes(),
        }
    }
}

fn embedding_inputs(input: &Value) -> Result<Vec<EmbeddingInput<'_>>, SimError> {
    let invalid = || {
        SimError::bad_request(
            "`input` must be a non-empty string, array of strings, token array, \
             or array of token arrays.",
            Some("input"),
        )
    };
    match input {
        Value::String(text) if !text.is_empty() => Ok(vec![EmbeddingInput::Text(text)]),
        Value::Array(items) if !items.is_empty() => {
            if let Some(tokens) = token_array(input) {
                return Ok(vec![EmbeddingInput::Tokens(tokens)]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) if !text.is_empty() => Ok(EmbeddingInput::Text(text)),
                    other => token_array(other)
                        .map(|t| EmbeddingInput::Tokens(t.as_slice()))
                        .ok_or_else(invalid),
                })
                .collect()
        }
        _ => Err(invalid()),
    }
}

/// `v` as a non-empty array of token ids.
fn token_array(v: &Value) -> Option<&Vec<Value>> {
    v.as_array()
        .filter(|t| !t.is_empty() && t.iter().all(Value::is_u64))
}

/// A unit-length vector derived from `key`.
fn embedding_vector(key: u64, dimensions: usize) -> Vec<f32> {
    let raw: Vec<f64> = (0..dimensions as u64)
        .map(|i| (mix(key ^ i) >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    raw.iter().map(|x| (x / norm) as f32).collect()
}
