//! Chat and completions requests, validated into what gpu-sim generates.
//!
//! The rules are vLLM's OpenAI server's: the same fields and defaults, the
//! same refusals (a 400 naming the field), unknown fields ignored. Every number
//! a client sends is checked before it is used, and what one request may ask
//! for is bounded by `--max-request-tokens`, so no request can overflow an
//! integer or make the simulator allocate without bound.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Number, Value};
use tollgate_metering::tokens::PromptCounter;

use crate::sim::engine::Engine;
use crate::sim::error::SimError;
use crate::sim::generate::{Completion, MAX_NATURAL_TOKENS, sequence_key, stable_hash};
use crate::sim::options::SimOptions;

/// `max_tokens` of a completions request that sets none: vLLM's
/// `CompletionRequest` default (16), which is also OpenAI's.
const DEFAULT_COMPLETION_MAX_TOKENS: u64 = 16;

/// Most prompts in one completions request: the default of vLLM's
/// `VLLM_MAX_COMPLETION_PROMPTS`.
const MAX_COMPLETION_PROMPTS: usize = 1024;

/// Most `top_logprobs` of a chat request: OpenAI's limit, and vLLM's default
/// `--max-logprobs`.
const MAX_TOP_LOGPROBS: u64 = 20;

/// Most `logprobs` of a completions request: OpenAI's limit for the legacy
/// endpoint.
const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// A `multipart/form-data` body as gpu-sim reads it: text fields by name,
/// and the parts named as files, whole (gpu-sim is a test backend).
#[derive(Default)]
pub struct Form {
    pub text: std::collections::HashMap<String, String>,
    /// `(name, bytes)` of each file part, in order.
    pub files: Vec<(String, axum::body::Bytes)>,
}

impl Form {
    /// Reads `request`'s form; parts named in `file_names` are kept as bytes.
    pub async fn read(
        request: axum::extract::Request,
        file_names: &[&str],
    ) -> Result<Self, SimError> {
        use axum::extract::FromRequest;
        use axum::extract::multipart::{Multipart, MultipartError};
        let bad = |e: MultipartError| SimError::bad_request(e.body_text(), None);
        let mut parts = Multipart::from_request(request, &())
            .await
            .map_err(|e| SimError::bad_request(e.body_text(), None))?;
        let mut form = Self::default();
        while let Some(part) = parts.next_field().await.map_err(bad)? {
            let name = part.name().unwrap_or_default().to_owned();
            if file_names.contains(&name.as_str()) {
                form.files.push((name, part.bytes().await.map_err(bad)?));
            } else {
                form.text.insert(name, part.text().await.map_err(bad)?);
            }
        }
        Ok(form)
    }
}

/// Parses a JSON request body, naming what is wrong when it does not fit.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, SimError> {
    serde_json::from_slice(body).map_err(invalid_body)
}

fn invalid_body(e: serde_json::Error) -> SimError {
    let what = if e.is_syntax() || e.is_eof() {
        "Request body is not valid JSON"
    } else {
        "Invalid request body"
    };
    SimError::bad_request(format!("{what}: {e}."), None)
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

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Whether and how an answer is streamed.
#[derive(Debug, Clone, Copy)]
pub struct Streaming {
    pub stream: bool,
    /// `stream_options.include_usage`: end the stream with a usage chunk.
    pub include_usage: bool,
}

impl Streaming {
    fn new(stream: Option<bool>, options: Option<StreamOptions>) -> Self {
        Self {
            stream: stream.unwrap_or(false),
            include_usage: options.and_then(|o| o.include_usage).unwrap_or(false),
        }
    }
}

/// A tool call every choice of a chat answer makes instead of text.
#[derive(Debug, Clone)]
pub struct ToolCall {
    /// The function called: the named one, or the first of `tools`.
    pub name: String,
    /// `tool_choice` named the function. OpenAI and vLLM then finish with
    /// `stop`; `required` finishes with `tool_calls`.
    pub named: bool,
}

/// The fields of a chat request read as typed values; `messages` and `tools`
/// are read from the body as they are.
#[derive(Deserialize)]
struct RawChat {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<Number>,
    max_completion_tokens: Option<Number>,
    n: Option<Number>,
    logprobs: Option<bool>,
    top_logprobs: Option<Number>,
}

/// A validated chat request.
#[derive(Debug)]
pub struct ChatRequest {
    pub model: String,
    pub streaming: Streaming,
    /// Choices to generate.
    pub n: usize,
    /// The honoured limit: `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `top_logprobs` when `logprobs` is true.
    pub logprobs: Option<usize>,
    pub tool_call: Option<ToolCall>,
    /// Messages and tool definitions, counted as the gateway counts them.
    pub prompt_tokens: usize,
    answer_key: u64,
}

impl ChatRequest {
    pub fn parse(engine: &Engine, body: &Value) -> Result<Self, SimError> {
        let raw = RawChat::deserialize(body).map_err(invalid_body)?;
        let messages = body
            .get("messages")
            .filter(|m| m.as_array().is_some_and(|m| !m.is_empty()))
            .ok_or_else(|| {
                SimError::bad_request(
                    "`messages` must contain at least one message.",
                    Some("messages"),
                )
            })?;
        let n = choices(raw.n)?;
        // vLLM: `max_completion_tokens` when set, else `max_tokens`.
        let limit = match raw.max_completion_tokens {
            Some(value) => token_limit(Some(value), "max_completion_tokens")?,
            None => token_limit(raw.max_tokens, "max_tokens")?,
        };
        let logprobs = chat_logprobs(raw.logprobs, raw.top_logprobs)?;
        let tool_call = tool_call(body)?;
        let options = &engine.options;
        let default_tokens = options.output_tokens.map_or(MAX_NATURAL_TOKENS, u64::from);
        let demand = Demand {
            prompts: 1,
            sequences: (n, "n"),
            tokens: limit.map_or((default_tokens, None), |(limit, field)| {
                (limit, Some(field))
            }),
        };
        demand.check(options.max_request_tokens)?;
        let encoding = engine.encoding_for(&raw.model);
        let prompt_key = serde_json::to_vec(messages).unwrap_or_default();
        Ok(Self {
            answer_key: engine.answer_key(&raw.model, &prompt_key),
            prompt_tokens: PromptCounter::new(encoding).count_chat(body),
            model: raw.model,
            streaming: Streaming::new(raw.stream, raw.stream_options),
            n: to_usize(n, "n")?,
            max_tokens: limit.map(|(limit, _)| limit),
            logprobs,
            tool_call,
        })
    }

    /// The sequences to generate: one per choice.
    pub fn plan(&self, options: &SimOptions) -> Vec<Completion> {
        (0..self.n)
            .map(|choice| {
                let key = sequence_key(self.answer_key, choice);
                match &self.tool_call {
                    Some(call) => Completion::tool_arguments(
                        stable_hash(key, &[call.name.as_bytes()]),
                        self.max_tokens,
                    ),
                    None => Completion::plan(key, options.output_tokens, self.max_tokens),
                }
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct RawCompletion {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<Number>,
    n: Option<Number>,
    best_of: Option<Number>,
    logprobs: Option<Number>,
}

/// A validated completions request.
#[derive(Debug)]
pub struct CompletionRequest {
    pub model: String,
    pub streaming: Streaming,
    /// Choices returned per prompt.
    pub n: usize,
    /// Sequences generated per prompt (`best_of`, else `n`); the `n` with
    /// the highest cumulative log probability are returned.
    pub best_of: usize,
    /// The honoured limit: `max_tokens`, or vLLM's default of 16.
    /// `max_completion_tokens` is not a completions field (vLLM's
    /// `CompletionRequest` has none) and is ignored like any unknown field.
    pub max_tokens: u64,
    /// `logprobs`: the top log probabilities per token.
    pub logprobs: Option<usize>,
    /// Tokens of every prompt.
    pub prompt_tokens: usize,
    /// One per prompt, in order.
    answer_keys: Vec<u64>,
}

impl CompletionRequest {
    pub fn parse(engine: &Engine, body: &Value) -> Result<Self, SimError> {
        let raw = RawCompletion::deserialize(body).map_err(invalid_body)?;
        let streaming = Streaming::new(raw.stream, raw.stream_options);
        let n = choices(raw.n)?;
        let best_of = match count(raw.best_of, "best_of")? {
            None => n,
            Some(best_of) if best_of < n => {
                return Err(SimError::bad_request(
                    format!(
                        "`best_of` must be greater than or equal to `n`, got n={n} and \
                         best_of={best_of}."
                    ),
                    Some("best_of"),
                ));
            }
            Some(best_of) => best_of,
        };
        if streaming.stream && best_of > n {
            return Err(SimError::bad_request(
                "`best_of` greater than `n` cannot be streamed: the candidates not \
                 returned would have been sent already.",
                Some("best_of"),
            ));
        }
        let limit = token_limit(raw.max_tokens, "max_tokens")?;
        let logprobs = match count(raw.logprobs, "logprobs")? {
            Some(k) if k > MAX_COMPLETION_LOGPROBS => {
                return Err(SimError::bad_request(
                    format!("`logprobs` must be between 0 and {MAX_COMPLETION_LOGPROBS}."),
                    Some("logprobs"),
                ));
            }
            other => other.map(|k| k as usize),
        };
        let prompts = completion_prompts(body.get("prompt"))?;
        let demand = Demand {
            prompts: prompts.len() as u64,
            sequences: if best_of > n {
                (best_of, "best_of")
            } else {
                (n, "n")
            },
            tokens: limit.map_or((DEFAULT_COMPLETION_MAX_TOKENS, None), |(limit, field)| {
                (limit, Some(field))
            }),
        };
        demand.check(engine.options.max_request_tokens)?;
        let encoding = engine.encoding_for(&raw.model);
        let mut prompt_tokens = 0;
        let mut answer_keys = Vec::with_capacity(prompts.len());
        for prompt in &prompts {
            prompt_tokens += prompt.tokens(|text| encoding.count(text));
            answer_keys.push(engine.answer_key(&raw.model, &prompt.key()));
        }
        Ok(Self {
            model: raw.model,
            streaming,
            n: to_usize(n, "n")?,
            best_of: to_usize(best_of, "best_of")?,
            max_tokens: limit.map_or(DEFAULT_COMPLETION_MAX_TOKENS, |(limit, _)| limit),
            logprobs,
            prompt_tokens,
            answer_keys,
        })
    }

    /// The sequences to generate: `best_of` per prompt, prompt by prompt.
    pub fn plan(&self, options: &SimOptions) -> Vec<Completion> {
        self.answer_keys
            .iter()
            .flat_map(|&answer_key| {
                (0..self.best_of).map(move |sequence| {
                    let key = sequence_key(answer_key, sequence);
                    Completion::plan(key, options.output_tokens, Some(self.max_tokens))
                })
            })
            .collect()
    }

    /// Which of `sequences` (as [`Self::plan`] made them) the answer returns,
    /// in choice order: choice `prompt * n + i` is the `i`-th best of the
    /// prompt's candidates, vLLM's indexing. Without `best_of`, every
    /// sequence in order.
    pub fn returned(&self, sequences: &[Completion]) -> Vec<usize> {
        if self.best_of == self.n {
            return (0..sequences.len()).collect();
        }
        let mut returned = Vec::with_capacity(self.answer_keys.len() * self.n);
        for prompt in 0..self.answer_keys.len() {
            let first = prompt * self.best_of;
            let mut candidates: Vec<(usize, f64)> = (first..first + self.best_of)
                .filter_map(|i| Some((i, sequences.get(i)?.cumulative_logprob())))
                .collect();
            // Best first; ties keep generation order.
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
            returned.extend(candidates.iter().take(self.n).map(|(i, _)| *i));
        }
        returned
    }
}

/// One completions prompt.
enum Prompt<'a> {
    Text(&'a str),
    Tokens(&'a [Value]),
}

impl Prompt<'_> {
    fn tokens(&self, count: impl Fn(&str) -> usize) -> usize {
        match self {
            Self::Text(text) => count(text),
            Self::Tokens(ids) => ids.len(),
        }
    }

    /// The canonical text the answer is derived from: the prompt's JSON.
    fn key(&self) -> Vec<u8> {
        match self {
            Self::Text(text) => serde_json::to_vec(text),
            Self::Tokens(ids) => serde_json::to_vec(ids),
        }
        .unwrap_or_default()
    }
}

/// `prompt` in its four shapes: a string, a list of strings, a token array
/// (one prompt), a list of token arrays. Every prompt must be non-empty, and a
/// list may hold at most [`MAX_COMPLETION_PROMPTS`], as on vLLM.
fn completion_prompts(prompt: Option<&Value>) -> Result<Vec<Prompt<'_>>, SimError> {
    let invalid = |why: &str| {
        SimError::bad_request(
            format!(
                "`prompt` {why}: it must be a non-empty string, a list of strings, a \
                 token array, or a list of token arrays."
            ),
            Some("prompt"),
        )
    };
    let is_token = |v: &Value| v.is_u64();
    match prompt {
        None | Some(Value::Null) => Err(invalid("is required")),
        Some(Value::String(text)) if !text.is_empty() => Ok(vec![Prompt::Text(text)]),
        Some(Value::Array(items)) if items.is_empty() => Err(invalid("is an empty list")),
        Some(Value::Array(items)) if items.iter().all(is_token) => Ok(vec![Prompt::Tokens(items)]),
        Some(Value::Array(items)) => {
            if items.len() > MAX_COMPLETION_PROMPTS {
                return Err(SimError::bad_request(
                    format!(
                        "`prompt` lists {} prompts; at most {MAX_COMPLETION_PROMPTS} are \
                         allowed (vLLM's VLLM_MAX_COMPLETION_PROMPTS).",
                        items.len()
                    ),
                    Some("prompt"),
                ));
            }
            // All strings or all token arrays: vLLM takes `list[str]` or
            // `list[list[int]]`, not a mix.
            let texts: Option<Vec<Prompt<'_>>> = items
                .iter()
                .map(|item| {
                    item.as_str()
                        .filter(|text| !text.is_empty())
                        .map(Prompt::Text)
                })
                .collect();
            let token_arrays = || {
                items
                    .iter()
                    .map(|item| {
                        item.as_array()
                            .filter(|ids| !ids.is_empty() && ids.iter().all(is_token))
                            .map(|ids| Prompt::Tokens(ids))
                    })
                    .collect::<Option<Vec<_>>>()
            };
            texts
                .or_else(token_arrays)
                .ok_or_else(|| invalid("holds an empty, malformed or mixed prompt"))
        }
        Some(_) => Err(invalid("has the wrong type")),
    }
}

/// A client's integer field: `None` when absent or null; anything but a
/// non-negative integer is refused, naming the field.
fn count(value: Option<Number>, field: &'static str) -> Result<Option<u64>, SimError> {
    value
        .map(|number| {
            number.as_u64().ok_or_else(|| {
                SimError::bad_request(
                    format!("`{field}` must be a non-negative integer, not {number}."),
                    Some(field),
                )
            })
        })
        .transpose()
}

/// `n`: 1 when unset, at least 1.
fn choices(n: Option<Number>) -> Result<u64, SimError> {
    match count(n, "n")? {
        None => Ok(1),
        Some(0) => Err(SimError::bad_request("`n` must be at least 1.", Some("n"))),
        Some(n) => Ok(n),
    }
}

/// A token limit with the field it came from; at least 1 when set.
fn token_limit(
    value: Option<Number>,
    field: &'static str,
) -> Result<Option<(u64, &'static str)>, SimError> {
    match count(value, field)? {
        Some(0) => Err(SimError::bad_request(
            format!("`{field}` must be at least 1."),
            Some(field),
        )),
        other => Ok(other.map(|n| (n, field))),
    }
}

/// Chat `logprobs` and `top_logprobs`, with vLLM's checks: the count is
/// 0–[`MAX_TOP_LOGPROBS`], and asking for top log probabilities needs
/// `logprobs: true`.
fn chat_logprobs(
    logprobs: Option<bool>,
    top_logprobs: Option<Number>,
) -> Result<Option<usize>, SimError> {
    let top = count(top_logprobs, "top_logprobs")?.unwrap_or(0);
    if top > MAX_TOP_LOGPROBS {
        return Err(SimError::bad_request(
            format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}."),
            Some("top_logprobs"),
        ));
    }
    let logprobs = logprobs.unwrap_or(false);
    if top > 0 && !logprobs {
        return Err(SimError::bad_request(
            "When using `top_logprobs`, `logprobs` must be set to true.",
            Some("top_logprobs"),
        ));
    }
    Ok(logprobs.then_some(top as usize))
}

/// The tool call `tools` and `tool_choice` ask for, checked as vLLM checks
/// them. `None` when the answer is text: no `tool_choice`, `"none"`, or
/// `"auto"` (the simulator never decides to call a tool by itself).
fn tool_call(body: &Value) -> Result<Option<ToolCall>, SimError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) if tools.is_empty() => {
            return Err(SimError::bad_request(
                "`tools` must not be an empty array. Either provide at least one tool or \
                 omit the field entirely.",
                Some("tools"),
            ));
        }
        Some(Value::Array(tools)) => Some(tools),
        Some(_) => {
            return Err(SimError::bad_request(
                "`tools` must be an array of function tools.",
                Some("tools"),
            ));
        }
    };
    let names = tools
        .into_iter()
        .flatten()
        .map(|tool| {
            tool.get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|name| !name.is_empty())
                .ok_or_else(|| {
                    SimError::bad_request(
                        "Every tool needs a non-empty `function.name`.",
                        Some("tools"),
                    )
                })
        })
        .collect::<Result<Vec<&str>, SimError>>()?;
    let choice = match body.get("tool_choice") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(choice)) if choice == "none" => return Ok(None),
        Some(choice) => choice,
    };
    let Some(first) = names.first() else {
        return Err(SimError::bad_request(
            "When using `tool_choice`, `tools` must be set.",
            Some("tool_choice"),
        ));
    };
    let usage = "Only named tools (`{\"type\": \"function\", \"function\": {\"name\": \
                 \"my_function\"}}`), \"none\", \"auto\" or \"required\" are supported.";
    match choice {
        Value::String(choice) if choice == "auto" => Ok(None),
        Value::String(choice) if choice == "required" => Ok(Some(ToolCall {
            name: (*first).to_owned(),
            named: false,
        })),
        Value::Object(_) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|name| !name.is_empty())
                .ok_or_else(|| {
                    SimError::bad_request(
                        format!("`tool_choice` names no function. {usage}"),
                        Some("tool_choice"),
                    )
                })?;
            if !names.contains(&name) {
                return Err(SimError::bad_request(
                    format!("The tool `{name}` in `tool_choice` is not one of `tools`."),
                    Some("tool_choice"),
                ));
            }
            Ok(Some(ToolCall {
                name: name.to_owned(),
                named: true,
            }))
        }
        other => Err(SimError::bad_request(
            format!("Invalid value for `tool_choice`: {other}. {usage}"),
            Some("tool_choice"),
        )),
    }
}

/// What one request asks to generate: `prompts` × `sequences` per prompt ×
/// `tokens` per sequence, each with the field that set it.
struct Demand {
    prompts: u64,
    sequences: (u64, &'static str),
    /// The token limit and its field; no field when it is the default.
    tokens: (u64, Option<&'static str>),
}

impl Demand {
    /// Refuses a demand above `budget` (`--max-request-tokens`), naming the
    /// field that goes past it soonest: the token limit alone, then the
    /// sequences per prompt, then the prompt list.
    fn check(&self, budget: u64) -> Result<(), SimError> {
        let (sequences, sequences_field) = self.sequences;
        let (tokens, tokens_field) = self.tokens;
        let per_prompt = sequences.checked_mul(tokens);
        let total = per_prompt.and_then(|t| t.checked_mul(self.prompts));
        if total.is_some_and(|total| total <= budget) {
            return Ok(());
        }
        let field = if tokens > budget {
            tokens_field
        } else if per_prompt.is_none_or(|t| t > budget) {
            Some(sequences_field)
        } else {
            Some("prompt")
        };
        let total = total.map_or_else(
            || format!("more than {}", u64::MAX),
            |t| format!("up to {t}"),
        );
        let tokens_source = match tokens_field {
            Some(field) => format!("`{field}`"),
            None => "the default length".to_owned(),
        };
        Err(SimError::bad_request(
            format!(
                "This request asks for {total} generated tokens: {} prompt(s) × {sequences} \
                 sequence(s) (`{sequences_field}`) × {tokens} tokens ({tokens_source}); this \
                 server allows {budget} (--max-request-tokens).",
                self.prompts
            ),
            field,
        ))
    }
}

/// A count already checked against the request budget; refuses the
/// impossible case of it not fitting the platform's `usize`.
fn to_usize(n: u64, field: &'static str) -> Result<usize, SimError> {
    usize::try_from(n)
        .map_err(|_| SimError::bad_request(format!("`{field}` is too large."), Some(field)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn demand(prompts: u64, sequences: u64, tokens: u64) -> Result<(), SimError> {
        Demand {
            prompts,
            sequences: (sequences, "n"),
            tokens: (tokens, Some("max_tokens")),
        }
        .check(1000)
    }

    fn param(result: Result<(), SimError>) -> Option<&'static str> {
        match result {
            Err(SimError::BadRequest { param, .. }) => param,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn demand_within_budget_passes() {
        assert!(demand(10, 10, 10).is_ok());
        assert!(demand(1, 1, 1000).is_ok());
    }

    #[test]
    fn demand_past_budget_names_the_field_that_goes_past_it() {
        assert_eq!(param(demand(1, 1, 1001)), Some("max_tokens"));
        assert_eq!(param(demand(1, 1, u64::MAX)), Some("max_tokens"));
        assert_eq!(param(demand(1, 1 << 63, 2)), Some("n"));
        assert_eq!(param(demand(1, u64::MAX, u64::MAX)), Some("max_tokens"));
        assert_eq!(param(demand(1024, 1, 1)), Some("prompt"));
        assert_eq!(param(demand(u64::MAX, u64::MAX, 1)), Some("n"));
    }

    #[test]
    fn prompts_in_their_four_shapes() {
        let count = |v: Value| completion_prompts(Some(&v)).map(|p| p.len());
        assert_eq!(count(json!("a")).unwrap(), 1);
        assert_eq!(count(json!(["a", "b"])).unwrap(), 2);
        assert_eq!(count(json!([1, 2, 3])).unwrap(), 1);
        assert_eq!(count(json!([[1], [2, 3]])).unwrap(), 2);
        for wrong in [
            json!(""),
            json!([]),
            json!([""]),
            json!([[]]),
            json!([-1]),
            json!(["a", [1]]),
            json!({"a": 1}),
            json!(null),
        ] {
            assert!(count(wrong.clone()).is_err(), "{wrong}");
        }
        let many = Value::Array(vec![json!("p"); MAX_COMPLETION_PROMPTS + 1]);
        assert!(count(many).is_err());
    }
}

#[derive(Deserialize)]
struct RawResponses {
    model: String,
    stream: Option<bool>,
    max_output_tokens: Option<Number>,
}

/// A validated Responses API request: one answer to `input` (and
/// `instructions`), up to `max_output_tokens`.
#[derive(Debug)]
pub struct ResponsesRequest {
    pub model: String,
    pub stream: bool,
    pub max_output_tokens: Option<u64>,
    /// `instructions` and `input`, counted as the gateway counts them.
    pub prompt_tokens: usize,
    answer_key: u64,
}

impl ResponsesRequest {
    pub fn parse(engine: &Engine, body: &Value) -> Result<Self, SimError> {
        let raw = RawResponses::deserialize(body).map_err(invalid_body)?;
        let input = match body.get("input") {
            Some(Value::String(text)) if !text.is_empty() => text.as_bytes().to_vec(),
            Some(items @ Value::Array(list)) if !list.is_empty() => {
                serde_json::to_vec(items).unwrap_or_default()
            }
            _ => {
                return Err(SimError::bad_request(
                    "`input` must be a non-empty string or list of input items.",
                    Some("input"),
                ));
            }
        };
        let limit = token_limit(raw.max_output_tokens, "max_output_tokens")?;
        let options = &engine.options;
        let default_tokens = options.output_tokens.map_or(MAX_NATURAL_TOKENS, u64::from);
        Demand {
            prompts: 1,
            sequences: (1, "n"),
            tokens: limit.map_or((default_tokens, None), |(limit, field)| {
                (limit, Some(field))
            }),
        }
        .check(options.max_request_tokens)?;
        let encoding = engine.encoding_for(&raw.model);
        Ok(Self {
            answer_key: engine.answer_key(&raw.model, &input),
            prompt_tokens: PromptCounter::new(encoding).count_responses(body),
            model: raw.model,
            stream: raw.stream.unwrap_or(false),
            max_output_tokens: limit.map(|(limit, _)| limit),
        })
    }

    /// The one sequence generated.
    pub fn plan(&self, options: &SimOptions) -> Vec<Completion> {
        vec![Completion::plan(
            sequence_key(self.answer_key, 0),
            options.output_tokens,
            self.max_output_tokens,
        )]
    }
}
