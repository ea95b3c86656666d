//! The OpenAI HTTP API as trtllm-serve, vLLM and Triton's OpenAI frontend
//! speak it: models, chat completions, completions and embeddings, streamed
//! and not, image generation and speech.
//!
//! Chat and completions behave as vLLM's server does: prompt lists and `n`
//! choices per prompt (choice `prompt * n + i`), `best_of`, log
//! probabilities, forced tool calls, its limits and its refusals.
//!
//! - [`request`]: validation into what is generated.
//! - [`response`]: the objects of an answer (choices, tool calls, log
//!   probabilities, usage).
//! - [`chunks`]: the same answer streamed.
//! - [`embeddings`]: the `/v1/embeddings` endpoint.
//! - [`images`]: `/v1/images/generations` and `/v1/images/edits`, and their image files.
//! - [`speech`]: the `/v1/audio/speech` endpoint.
//! - [`transcription`]: `/v1/audio/transcriptions` and `/translations`.
//! - [`responses`]: the `/v1/responses` endpoint (OpenAI's Responses API).

mod chunks;
mod embeddings;
mod images;
mod request;
mod response;
mod responses;
mod speech;
mod transcription;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tollgate_metering::endpoint::Endpoint;

use self::chunks::OpenAiChunks;
pub use self::embeddings::embeddings;
pub use self::images::{image_file, images_edits, images_generations};
use self::request::{ChatRequest, CompletionRequest};
pub use self::request::{check_max_tokens, parse_body};
use self::response::{ChoiceStyle, Usage, response_id};
pub use self::responses::responses;
pub use self::speech::speech;
pub use self::transcription::{transcriptions, translations};
use super::engine::{Engine, Generation, GenerationRequest};
use super::error::SimError;
use super::stream::sse_response;

type SharedEngine = State<Arc<Engine>>;

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
    let request = {
        let body: Value = parse_body(&body?)?;
        ChatRequest::parse(&engine, &body)?
    };
    let generation = engine
        .start(GenerationRequest {
            model: &request.model,
            prompt_tokens: request.prompt_tokens,
            sequences: request.plan(&engine.options),
        })
        .await?;
    let answer = Answer::new(&engine, Endpoint::ChatCompletions, &request.model);
    let style = ChoiceStyle {
        logprobs: request.logprobs,
        tool_call: request.tool_call,
    };
    if request.streaming.stream {
        let chunks = OpenAiChunks::new(&answer, style, request.streaming.include_usage);
        return Ok(sse_response(generation, chunks));
    }
    generation.finish().await;
    let choices = generation
        .sequences
        .iter()
        .enumerate()
        .map(|(index, completion)| style.chat_choice(index, completion))
        .collect();
    Ok(answer.complete(&generation, choices))
}

pub async fn completions(
    State(engine): SharedEngine,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let request = {
        let body: Value = parse_body(&body?)?;
        CompletionRequest::parse(&engine, &body)?
    };
    let sequences = request.plan(&engine.options);
    let returned = request.returned(&sequences);
    let generation = engine
        .start(GenerationRequest {
            model: &request.model,
            prompt_tokens: request.prompt_tokens,
            sequences,
        })
        .await?;
    let answer = Answer::new(&engine, Endpoint::Completions, &request.model);
    let style = ChoiceStyle {
        logprobs: request.logprobs,
        tool_call: None,
    };
    if request.streaming.stream {
        // Validation refuses streams with hidden `best_of` candidates: every
        // sequence is returned, in order.
        let chunks = OpenAiChunks::new(&answer, style, request.streaming.include_usage);
        return Ok(sse_response(generation, chunks));
    }
    generation.finish().await;
    let choices = returned
        .iter()
        .filter_map(|&sequence| generation.sequences.get(sequence))
        .enumerate()
        .map(|(index, completion)| style.text_choice(index, completion))
        .collect();
    Ok(answer.complete(&generation, choices))
}

/// A non-streamed answer (`chat.completion` or `text_completion`).
#[derive(Serialize)]
struct CompletionBody<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The envelope of one answer: id, timestamps, model, and whether usage is
/// reported.
struct Answer {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    report_usage: bool,
}

impl Answer {
    fn new(engine: &Engine, endpoint: Endpoint, model: &str) -> Self {
        Self {
            endpoint,
            id: response_id(endpoint.answer_id_prefix()),
            created: unix_now(),
            model: model.to_owned(),
            report_usage: !engine.options.no_usage,
        }
    }

    /// The whole answer. `usage` counts every prompt once and every generated
    /// sequence, `best_of` candidates left out of `choices` included.
    fn complete<C: Serialize>(&self, generation: &Generation, choices: Vec<C>) -> Response {
        Json(CompletionBody {
            id: &self.id,
            object: self.endpoint.answer_object(false),
            created: self.created,
            model: &self.model,
            choices,
            usage: self
                .report_usage
                .then(|| Usage::new(generation.prompt_tokens, generation.completion_tokens())),
        })
        .into_response()
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}
