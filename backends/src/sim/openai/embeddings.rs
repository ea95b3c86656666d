//! `/v1/embeddings`: deterministic unit vectors, with usage counted per input.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_metering::tokens::Encoding;

use super::request::parse_body;
use crate::sim::engine::Engine;
use crate::sim::error::SimError;
use crate::sim::generate::{mix, stable_hash};

/// Embedding width when the request does not ask for `dimensions`.
const DEFAULT_EMBEDDING_DIMENSIONS: usize = 384;
/// Upper bound on `dimensions`, so a request cannot ask for gigabytes.
const MAX_EMBEDDING_DIMENSIONS: usize = 8192;

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

pub async fn embeddings(
    State(engine): State<Arc<Engine>>,
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
