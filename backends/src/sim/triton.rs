//! Triton's KServe v2 surface: health, model readiness, and the `generate` /
//! `generate_stream` extension as served by TensorRT-LLM's Triton backend.
//!
//! Triton reports no token usage; callers count tokens themselves.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::engine::{Engine, Generation, GenerationRequest};
use super::error::{SimError, TritonError};
use super::generate::Completion;
use super::openai::{check_max_tokens, parse_body};
use super::stream::{StreamFormat, sse_response};

/// The only model version the simulator serves.
const MODEL_VERSION: &str = "1";

type SharedEngine = State<Arc<Engine>>;

/// A generate request. TensorRT-LLM's ensemble takes `max_tokens` as a
/// top-level input; the generate extension also allows a `parameters` object.
#[derive(Deserialize)]
struct GenerateRequest {
    text_input: String,
    max_tokens: Option<u32>,
    #[serde(default)]
    parameters: Map<String, Value>,
}

pub async fn live() -> StatusCode {
    StatusCode::OK
}

pub async fn ready(State(engine): SharedEngine) -> StatusCode {
    match engine.check_ready() {
        Ok(()) => StatusCode::OK,
        Err(e) => e.status(),
    }
}

pub async fn model_ready(
    State(engine): SharedEngine,
    Path(model): Path<String>,
) -> Result<StatusCode, TritonError> {
    if !engine.serves(&model) {
        return Err(SimError::UnknownModel(model).into());
    }
    engine.check_ready()?;
    Ok(StatusCode::OK)
}

pub async fn generate(
    State(engine): SharedEngine,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, TritonError> {
    let generation = start(&engine, &model, &body?).await?;
    generation.finish().await;
    // A Triton request is one prompt and one sequence.
    let text: String = generation.sequences.iter().map(Completion::text).collect();
    let body = json!({
        "model_name": model,
        "model_version": MODEL_VERSION,
        "text_output": text,
    });
    Ok(Json(body).into_response())
}

pub async fn generate_stream(
    State(engine): SharedEngine,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, TritonError> {
    let generation = start(&engine, &model, &body?).await?;
    let prefix = format!(
        "data: {{\"model_name\":{},\"model_version\":\"{MODEL_VERSION}\",\"text_output\":",
        serde_json::to_string(&model).unwrap_or_default()
    );
    Ok(sse_response(generation, TritonEvents { prefix }))
}

async fn start(engine: &Engine, model: &str, body: &[u8]) -> Result<Generation, SimError> {
    engine.check_ready()?;
    let request: GenerateRequest = parse_body(body)?;
    let max_tokens =
        match request.max_tokens {
            Some(n) => Some(n),
            None => match request.parameters.get("max_tokens") {
                None => None,
                Some(v) => Some(v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(
                    || {
                        SimError::bad_request(
                            "`parameters.max_tokens` must be a positive integer.",
                            Some("max_tokens"),
                        )
                    },
                )?),
            },
        };
    let max_tokens = check_max_tokens(max_tokens)?;
    let encoding = engine.encoding_for(model);
    let key = engine.answer_key(model, request.text_input.as_bytes());
    let completion = Completion::plan(key, engine.options.output_tokens, max_tokens.map(u64::from));
    engine
        .start(GenerationRequest {
            model,
            prompt_tokens: encoding.count(&request.text_input),
            sequences: vec![completion],
        })
        .await
}

struct TritonEvents {
    prefix: String,
}

impl StreamFormat for TritonEvents {
    fn token(&mut self, generation: &Generation, sequence: usize, token: usize, out: &mut String) {
        let Some(completion) = generation.sequences.get(sequence) else {
            return;
        };
        let piece = serde_json::to_string(&completion.piece(token)).unwrap_or_default();
        let _ = write!(out, "{}{piece}}}\n\n", self.prefix);
    }

    fn closing(&mut self, _generation: &Generation, _out: &mut String) {
        // Triton ends a stream by closing it; there is no terminator event.
    }

    fn aborted(&self, out: &mut String) -> bool {
        // Triton reports a failure mid-stream as an error event under HTTP 200.
        out.push_str("data: {\"error\":\"Simulated engine abort mid-stream (--abort-mid-stream-rate).\"}\n\n");
        true
    }
}
