//! The `triton` protocol: OpenAI chat and completions requests sent to
//! Triton's `generate` / `generate_stream` extension, and Triton's answers
//! turned back into OpenAI's objects and events.
//!
//! Three pieces, called from the gateway's phases in order:
//!
//! - [`translate_request`] reads the client's body once and returns the
//!   Triton path and body plus an [`Exchange`], the few facts the answer's
//!   translation needs (endpoint, stream, include_usage, max_tokens), which
//!   the gateway keeps with the request.
//! - [`translate_response`] turns a whole `generate` answer into a
//!   `chat.completion` or `text_completion`; [`translate_error`] turns a
//!   Triton error answer (`{"error": "message"}`, usually HTTP 400 or 500)
//!   into OpenAI's `{"error": {"message", "type", "param", "code"}}`.
//! - [`StreamTranscoder`] is fed the `generate_stream` body chunk by chunk
//!   (synchronously, from `response_body_filter`) and returns the OpenAI
//!   server-sent events to send instead.
//!
//! # The request
//!
//! The body is `{"text_input", "max_tokens", "parameters"}`. `max_tokens` is
//! top-level because TensorRT-LLM's ensemble takes it as a (required) input;
//! `temperature`, `top_p`, `presence_penalty`, `frequency_penalty`, `seed`
//! (as `random_seed`), `stop` (as `stop_words`, always a list) and `stream`
//! go in `parameters`, under the names of the ensemble's inputs: Triton
//! turns a parameter named like an input into that input, and passes any
//! other on as a request parameter, which may not be a list (a `stop` list
//! is refused whole). A real Triton server checks this in
//! `proxy/tests/gateway/triton.rs`. A request without
//! a limit gets [`DEFAULT_CHAT_MAX_TOKENS`] or
//! [`DEFAULT_COMPLETION_MAX_TOKENS`].
//!
//! Chat `messages` become one prompt in the ChatML layout:
//!
//! ```text
//! <|im_start|>{role}\n{content}<|im_end|>\n     (once per message)
//! <|im_start|>assistant\n                      (the reply's opening)
//! ```
//!
//! `developer` is rendered as `system`, which is what ChatML models know.
//! Content is a string or a list of `text` parts, joined with `\n` as vLLM
//! joins them. The template is fixed: models trained on another layout
//! (Llama 3, Mistral) answer worse through it, and text that contains
//! `<|im_end|>` is tokenised by the backend as whatever its tokenizer makes
//! of it. Both are limits of sending a text prompt, which is all Triton's
//! generate API takes.
//!
//! What the protocol cannot do is refused with a [`TranslateError`] naming
//! the field, rather than silently dropped: `n` or `best_of` above 1, `tools`
//! and `functions`, `logprobs` and `top_logprobs`, `echo`, `suffix`, a
//! `response_format` other than text, non-text content parts (images, audio,
//! files), token-array prompts and more than one prompt.
//!
//! # The answer
//!
//! Triton reports no usage, so completion tokens are counted here with the
//! gateway's [`Encoding`] for the model, over the whole generated text once
//! (BPE counts of pieces do not add up to the count of their
//! concatenation). `finish_reason` is `length` when that count reaches the
//! request's `max_tokens`, else `stop`: Triton does not say why it stopped,
//! and the count is the gateway's encoding's, which may differ from the
//! model's own tokenizer by a few tokens.
//!
//! The ensemble must be deployed with `exclude_input_in_output: true`
//! (TensorRT-LLM's recommended setting for serving), or `text_output`
//! repeats the prompt and that is what the client receives.
//!
//! # Errors
//!
//! Every backend failure becomes a [`BackendError`]. Its OpenAI `type` is
//! `invalid_request_error` when Triton answered 4xx (unknown model, input
//! too long) and `server_error` otherwise; `code` is always `backend_error`
//! and `param` null, since Triton does not say which field was wrong. An
//! error event in a stream (`data: {"error": "..."}` under HTTP 200, as
//! Triton reports a failure after the first token) becomes an OpenAI error
//! event and ends the stream without `[DONE]`, so clients see that the
//! answer is incomplete.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tollgate_metering::capture::{MAX_EVENT_BYTES, MAX_TEXT_BYTES};
pub use tollgate_metering::endpoint::Endpoint;
use tollgate_metering::sse::{EventReader, EventTooLarge};
use tollgate_metering::tokens::Encoding;

pub use super::FinishReason;

/// `max_tokens` for a chat request that sets none. TensorRT-LLM's ensemble
/// requires a limit and the gateway does not know the engine's sequence
/// length; 4096 leaves room for long answers on the usual 8k-context
/// engines. A client that needs a different cap sets `max_tokens`.
pub const DEFAULT_CHAT_MAX_TOKENS: u32 = 4096;

/// `max_tokens` for a completions request that sets none: 16, OpenAI's
/// documented default for `/v1/completions`, which vLLM also uses.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// `max_tokens` sent when the client set none.
fn default_max_tokens(endpoint: Endpoint) -> u32 {
    if endpoint == Endpoint::ChatCompletions {
        DEFAULT_CHAT_MAX_TOKENS
    } else {
        DEFAULT_COMPLETION_MAX_TOKENS
    }
}

/// A client request the triton protocol cannot carry. The gateway answers it
/// with HTTP 400 and an `invalid_request_error` naming `param`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TranslateError {
    pub message: String,
    /// The request field at fault, for OpenAI's `error.param`.
    pub param: Option<&'static str>,
}

impl TranslateError {
    fn new(message: impl Into<String>, param: &'static str) -> Self {
        Self {
            message: message.into(),
            param: Some(param),
        }
    }
}

/// What translating the answer needs to know about the request; small and
/// `Copy`, for the gateway's per-request context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    pub endpoint: Endpoint,
    /// The client asked for a stream (and the request goes to `generate_stream`).
    pub stream: bool,
    /// The client's `stream_options.include_usage`; false when not streaming.
    pub include_usage: bool,
    /// The limit sent to Triton: the client's, or the endpoint's default.
    pub max_tokens: u32,
}

/// A client request translated for Triton.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TritonRequest {
    /// `/v2/models/{model}/generate` or `/v2/models/{model}/generate_stream`,
    /// the model name percent-encoded.
    pub path: String,
    /// The generate body, JSON.
    pub body: Vec<u8>,
    pub exchange: Exchange,
}

/// Translates an OpenAI chat or completions request body for Triton's
/// generate extension; see the module docs for the mapping and what is
/// refused. The Triton model is the request's `model`.
pub fn translate_request(
    endpoint: Endpoint,
    body: &Value,
) -> Result<TritonRequest, TranslateError> {
    let Some(request) = body.as_object() else {
        return Err(TranslateError {
            message: "The request body must be a JSON object.".to_owned(),
            param: None,
        });
    };
    let model = match field(request, "model") {
        Some(Value::String(model)) if !model.is_empty() => model,
        _ => {
            return Err(TranslateError::new(
                "`model` must be a non-empty string.",
                "model",
            ));
        }
    };
    reject_unsupported(request)?;
    let text_input = match endpoint {
        Endpoint::ChatCompletions => match field(request, "messages") {
            Some(Value::Array(messages)) => render_chat_prompt(messages)?,
            _ => {
                return Err(TranslateError::new(
                    "`messages` must be an array of messages.",
                    "messages",
                ));
            }
        },
        Endpoint::Completions => completion_prompt(field(request, "prompt"))?,
        Endpoint::Embeddings
        | Endpoint::Responses
        | Endpoint::ImageGenerations
        | Endpoint::ImageEdits
        | Endpoint::Speech
        | Endpoint::Transcription
        | Endpoint::Translation
        | Endpoint::Custom => {
            return Err(TranslateError::new(
                "Only chat and text completions are served by a Triton generate backend.",
                "model",
            ));
        }
    };
    let stream = optional_bool(request, "stream")?.unwrap_or(false);
    let include_usage = stream && include_usage(request)?;
    let max_tokens = max_tokens(endpoint, request)?;

    let mut parameters = Map::new();
    for name in [
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
    ] {
        match field(request, name) {
            None => {}
            Some(value @ Value::Number(_)) => {
                parameters.insert(name.to_owned(), value.clone());
            }
            Some(_) => {
                return Err(TranslateError::new(
                    format!("`{name}` must be a number."),
                    name,
                ));
            }
        }
    }
    match field(request, "seed") {
        None => {}
        Some(Value::Number(seed)) if seed.is_i64() || seed.is_u64() => {
            parameters.insert("random_seed".to_owned(), Value::Number(seed.clone()));
        }
        Some(_) => return Err(TranslateError::new("`seed` must be an integer.", "seed")),
    }
    if let Some(stop) = stop_list(request)? {
        parameters.insert("stop_words".to_owned(), Value::Array(stop));
    }
    parameters.insert("stream".to_owned(), Value::Bool(stream));

    let generate = json!({
        "text_input": text_input,
        "max_tokens": max_tokens,
        "parameters": parameters,
    });
    let action = if stream {
        "generate_stream"
    } else {
        "generate"
    };
    Ok(TritonRequest {
        path: format!("/v2/models/{}/{action}", path_segment(model)),
        body: generate.to_string().into_bytes(),
        exchange: Exchange {
            endpoint,
            stream,
            include_usage,
            max_tokens,
        },
    })
}

/// Renders chat `messages` as one ChatML prompt (see the module docs),
/// ending with the opening of the assistant's reply.
pub fn render_chat_prompt(messages: &[Value]) -> Result<String, TranslateError> {
    if messages.is_empty() {
        return Err(TranslateError::new(
            "`messages` must contain at least one message.",
            "messages",
        ));
    }
    let mut prompt = String::new();
    for (i, message) in messages.iter().enumerate() {
        let role = match message.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => "system",
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some(role @ ("tool" | "function")) => {
                return Err(TranslateError::new(
                    format!(
                        "messages[{i}] has role `{role}`: tool calling is not supported by the \
                         triton protocol (Triton's generate API has no tools)."
                    ),
                    "messages",
                ));
            }
            Some(other) => {
                return Err(TranslateError::new(
                    format!(
                        "messages[{i}].role `{other}` is not one of system, developer, user, \
                         assistant."
                    ),
                    "messages",
                ));
            }
            None => {
                return Err(TranslateError::new(
                    format!("messages[{i}] must be an object with a string `role`."),
                    "messages",
                ));
            }
        };
        for calls in ["tool_calls", "function_call"] {
            if message.get(calls).is_some_and(is_set) {
                return Err(TranslateError::new(
                    format!(
                        "messages[{i}].{calls}: tool calling is not supported by the triton \
                         protocol (Triton's generate API has no tools)."
                    ),
                    "messages",
                ));
            }
        }
        prompt.push_str("<|im_start|>");
        prompt.push_str(role);
        prompt.push('\n');
        push_content(&mut prompt, i, role, message.get("content"))?;
        prompt.push_str("<|im_end|>\n");
    }
    prompt.push_str("<|im_start|>assistant\n");
    Ok(prompt)
}

/// Appends message `i`'s content: a string, or its `text` parts joined with `\n`.
fn push_content(
    prompt: &mut String,
    i: usize,
    role: &str,
    content: Option<&Value>,
) -> Result<(), TranslateError> {
    match content {
        Some(Value::String(text)) => prompt.push_str(text),
        // An assistant turn may carry no content (OpenAI allows null there).
        None | Some(Value::Null) if role == "assistant" => {}
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                let text = part.get("text").and_then(Value::as_str);
                match (kind, text) {
                    (Some("text"), Some(text)) => {
                        if j > 0 {
                            prompt.push('\n');
                        }
                        prompt.push_str(text);
                    }
                    (Some("text"), None) => {
                        return Err(TranslateError::new(
                            format!("messages[{i}].content[{j}] is a text part without `text`."),
                            "messages",
                        ));
                    }
                    (kind, _) => {
                        let kind = kind.unwrap_or("unknown");
                        return Err(TranslateError::new(
                            format!(
                                "messages[{i}].content[{j}] is of type `{kind}`: the triton \
                                 protocol sends a text prompt only, so images, audio and files \
                                 are not supported by this backend."
                            ),
                            "messages",
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(TranslateError::new(
                format!(
                    "messages[{i}].content must be a string or an array of text content parts."
                ),
                "messages",
            ));
        }
    }
    Ok(())
}

/// A completions `prompt`: a string or a one-element list of one.
fn completion_prompt(prompt: Option<&Value>) -> Result<String, TranslateError> {
    const TOKENS: &str = "token-array prompts are not supported by the triton protocol \
                          (Triton's generate API takes text); send the prompt as a string.";
    match prompt {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(text)] => Ok(text.clone()),
            [Value::Number(_), ..] | [Value::Array(_), ..] => {
                Err(TranslateError::new(format!("`prompt`: {TOKENS}"), "prompt"))
            }
            _ => Err(TranslateError::new(
                "`prompt` must be a string or a list of exactly one string: the triton protocol \
                 sends one prompt per request.",
                "prompt",
            )),
        },
        None => Err(TranslateError::new("`prompt` is required.", "prompt")),
        Some(_) => Err(TranslateError::new(
            "`prompt` must be a string or a list of one string.",
            "prompt",
        )),
    }
}

/// Refuses the fields the triton protocol cannot honour, naming each.
fn reject_unsupported(request: &Map<String, Value>) -> Result<(), TranslateError> {
    for name in ["n", "best_of"] {
        if let Some(value) = field(request, name)
            && value.as_u64() != Some(1)
        {
            return Err(TranslateError::new(
                format!(
                    "`{name}` must be 1: the triton protocol generates one choice per request."
                ),
                name,
            ));
        }
    }
    for name in ["tools", "functions"] {
        if field(request, name).is_some_and(is_set) {
            return Err(TranslateError::new(
                format!(
                    "`{name}` is not supported by the triton protocol: Triton's generate API \
                     has no tool calling."
                ),
                name,
            ));
        }
    }
    for name in ["logprobs", "top_logprobs"] {
        if field(request, name).is_some_and(|v| v != &Value::Bool(false) && v != &json!(0)) {
            return Err(TranslateError::new(
                format!(
                    "`{name}` is not supported by the triton protocol: Triton's generate API \
                     returns text only."
                ),
                name,
            ));
        }
    }
    if field(request, "echo").is_some_and(|v| v != &Value::Bool(false)) {
        return Err(TranslateError::new(
            "`echo` is not supported by the triton protocol.",
            "echo",
        ));
    }
    if field(request, "suffix").is_some_and(|v| v != &json!("")) {
        return Err(TranslateError::new(
            "`suffix` is not supported by the triton protocol.",
            "suffix",
        ));
    }
    if let Some(format) = field(request, "response_format")
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(TranslateError::new(
            "`response_format` other than `text` is not supported by the triton protocol: \
             Triton's generate API cannot constrain output to JSON.",
            "response_format",
        ));
    }
    Ok(())
}

/// `max_completion_tokens`, else `max_tokens`, else the endpoint's default.
/// The newer name wins when both are set, as in vLLM.
fn max_tokens(endpoint: Endpoint, request: &Map<String, Value>) -> Result<u32, TranslateError> {
    let (name, value) = match (
        field(request, "max_completion_tokens"),
        field(request, "max_tokens"),
    ) {
        (Some(value), _) => ("max_completion_tokens", value),
        (None, Some(value)) => ("max_tokens", value),
        (None, None) => return Ok(default_max_tokens(endpoint)),
    };
    match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
        Some(n) if n >= 1 => Ok(n),
        _ => Err(TranslateError::new(
            format!("`{name}` must be a positive integer."),
            name,
        )),
    }
}

fn include_usage(request: &Map<String, Value>) -> Result<bool, TranslateError> {
    const MESSAGE: &str = "`stream_options.include_usage` must be a boolean.";
    match field(request, "stream_options") {
        None => Ok(false),
        Some(Value::Object(options)) => match field(options, "include_usage") {
            None => Ok(false),
            Some(Value::Bool(include)) => Ok(*include),
            Some(_) => Err(TranslateError::new(MESSAGE, "stream_options")),
        },
        Some(_) => Err(TranslateError::new(
            "`stream_options` must be an object.",
            "stream_options",
        )),
    }
}

/// `stop` as a list: a string becomes a one-element list.
fn stop_list(request: &Map<String, Value>) -> Result<Option<Vec<Value>>, TranslateError> {
    match field(request, "stop") {
        None => Ok(None),
        Some(Value::String(stop)) => Ok(Some(vec![Value::String(stop.clone())])),
        Some(Value::Array(stops)) if stops.iter().all(Value::is_string) => Ok(Some(stops.clone())),
        Some(_) => Err(TranslateError::new(
            "`stop` must be a string or an array of strings.",
            "stop",
        )),
    }
}

fn optional_bool(
    request: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<bool>, TranslateError> {
    match field(request, name) {
        None => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(TranslateError::new(
            format!("`{name}` must be a boolean."),
            name,
        )),
    }
}

/// A field of the request, with `null` read as absent (the SDKs send nulls).
fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).filter(|value| !value.is_null())
}

/// Whether an optional list-or-object field asks for something: not null,
/// not an empty list.
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Array(items) => !items.is_empty(),
        _ => true,
    }
}

/// `name` as one URL path segment: RFC 3986 unreserved bytes stay, the rest
/// is percent-encoded. A name of only dots is encoded too, so `.` or `..`
/// cannot become a relative path segment.
fn path_segment(name: &str) -> String {
    let only_dots = name.bytes().all(|b| b == b'.');
    let mut segment = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'_' | b'~')
            || (byte == b'.' && !only_dots)
        {
            segment.push(char::from(byte));
        } else {
            let _ = write!(segment, "%{byte:02X}");
        }
    }
    segment
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl UsageCounts {
    pub fn total_tokens(self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// OpenAI's `usage` object.
    fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens(),
        })
    }
}

impl FinishReason {
    /// Triton does not say why it stopped: an answer as long as the limit
    /// was cut by it.
    fn for_count(completion_tokens: u64, max_tokens: u32) -> Self {
        if completion_tokens >= u64::from(max_tokens) {
            Self::Length
        } else {
            Self::Stop
        }
    }
}

/// How the answer is labelled for the client and counted, supplied by the
/// gateway: Triton knows none of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerMeta {
    /// OpenAI's `id`, e.g. `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// OpenAI's `created`: Unix seconds.
    pub created: u64,
    /// The model name the client asked for, echoed in the answer.
    pub model: String,
    /// The prompt tokens the gateway counted.
    pub prompt_tokens: u64,
    /// The encoding completion tokens are counted with.
    pub encoding: Encoding,
}

/// A whole Triton answer in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslatedAnswer {
    /// The `chat.completion` or `text_completion` JSON.
    pub body: Vec<u8>,
    pub usage: UsageCounts,
    pub finish_reason: FinishReason,
}

/// Something went wrong on the backend's side: Triton reported an error, or
/// answered something that is not a generate response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub message: String,
    /// The HTTP status to answer with if the client's answer has not started:
    /// Triton's own 4xx or 5xx, or 502 for an answer the gateway cannot use.
    pub status: u16,
}

impl BackendError {
    /// For a backend answer the gateway could not use (502).
    fn bad_gateway(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            status: 502,
        }
    }

    /// OpenAI's `error.type`: a 4xx from Triton is about the request.
    pub fn error_type(&self) -> &'static str {
        if (400..500).contains(&self.status) {
            "invalid_request_error"
        } else {
            "server_error"
        }
    }

    fn to_json(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.error_type(),
            "param": null,
            "code": "backend_error",
        }})
    }

    /// OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai_body(&self) -> Vec<u8> {
        self.to_json().to_string().into_bytes()
    }

    /// The error object as one server-sent event, for a stream already under way.
    pub fn openai_event(&self) -> Vec<u8> {
        let mut event = b"data: ".to_vec();
        event.extend_from_slice(self.to_json().to_string().as_bytes());
        event.extend_from_slice(b"\n\n");
        event
    }
}

/// Reads a Triton error answer (`{"error": "message"}`) given with HTTP
/// `status`. A body without Triton's message still gives an error naming
/// the status; a status below 400 (not an error answer) becomes 502.
pub fn translate_error(status: u16, triton_body: &[u8]) -> BackendError {
    let message = serde_json::from_slice::<Value>(triton_body)
        .ok()
        .and_then(|body| body.get("error").map(error_message));
    BackendError {
        message: message.unwrap_or_else(|| {
            format!("The backend answered HTTP {status} without a Triton error message.")
        }),
        status: if status >= 400 { status } else { 502 },
    }
}

/// The message of Triton's `error` member: a string, or whatever JSON it is.
fn error_message(error: &Value) -> String {
    match error {
        Value::String(message) => message.clone(),
        other => other.to_string(),
    }
}

/// Translates a whole `generate` answer (HTTP 200) into a `chat.completion`
/// or `text_completion`, counting its completion tokens.
pub fn translate_response(
    exchange: Exchange,
    meta: &AnswerMeta,
    triton_body: &[u8],
) -> Result<TranslatedAnswer, BackendError> {
    #[derive(Deserialize)]
    struct Generated {
        text_output: Option<String>,
        error: Option<Value>,
    }
    let generated: Generated = serde_json::from_slice(triton_body).map_err(|_| {
        BackendError::bad_gateway("The backend's answer is not a Triton generate response.")
    })?;
    if let Some(error) = generated.error {
        return Err(BackendError::bad_gateway(error_message(&error)));
    }
    let Some(text) = generated.text_output else {
        return Err(BackendError::bad_gateway(
            "The backend's answer has no `text_output`.",
        ));
    };
    let usage = UsageCounts {
        prompt_tokens: meta.prompt_tokens,
        completion_tokens: count(meta.encoding, &text),
    };
    let finish_reason = FinishReason::for_count(usage.completion_tokens, exchange.max_tokens);
    let choice = if exchange.endpoint == Endpoint::ChatCompletions {
        json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason.as_str(),
        })
    } else {
        json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish_reason.as_str(),
        })
    };
    let body = json!({
        "id": meta.id,
        "object": exchange.endpoint.answer_object(false),
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage.to_json(),
    });
    Ok(TranslatedAnswer {
        body: body.to_string().into_bytes(),
        usage,
        finish_reason,
    })
}

fn count(encoding: Encoding, text: &str) -> u64 {
    u64::try_from(encoding.count(text)).unwrap_or(u64::MAX)
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOutcome {
    /// Triton closed the stream after its last token; `[DONE]` was sent.
    Completed(FinishReason),
    /// Triton reported an error, the stream broke, or it sent more than the
    /// transcoder holds; an OpenAI error event was sent and no `[DONE]`.
    Failed(BackendError),
}

/// Turns Triton's `generate_stream` body into OpenAI's stream, chunk by
/// chunk, without I/O and without panicking on any bytes.
///
/// Call [`feed`](Self::feed) with each body chunk in order and send what it
/// returns; when the body ends, call [`finish`](Self::finish) and send that
/// too. If the upstream connection fails instead, call
/// [`abort`](Self::abort). Chunk boundaries may fall anywhere: inside an
/// event, a UTF-8 character or a CRLF.
///
/// Output, as OpenAI streams it:
/// - chat: a first chunk with `delta: {"role": "assistant", "content": ""}`,
///   one `delta: {"content": piece}` chunk per Triton event, and a last
///   chunk with an empty delta and the `finish_reason`;
/// - completions: one `text` chunk per event, then one with empty text and
///   the `finish_reason`;
/// - then, if the client asked for `include_usage`, the usage chunk
///   (`choices: []`; every other chunk then carries `"usage": null`), and
///   `data: [DONE]`.
///
/// Events the transcoder does not understand (not JSON, or with neither
/// `text_output` nor `error`) are skipped and counted in
/// [`skipped_events`](Self::skipped_events): a Triton model may add outputs
/// or comments, and failing a paid answer over an unknown event would be
/// worse than dropping it. Only an unreadable event the stream *ends*
/// inside fails it, because that is a truncated stream, not an extra event.
#[derive(Debug)]
pub struct StreamTranscoder {
    events: EventReader,
    state: TranscodeState,
}

/// Everything but the event reader, so the two can be borrowed apart.
#[derive(Debug)]
struct TranscodeState {
    endpoint: Endpoint,
    include_usage: bool,
    max_tokens: u32,
    prompt_tokens: u64,
    encoding: Encoding,
    /// `{"id":…,"object":…,"created":…,"model":…,"choices":[`: the start of
    /// every chunk, built once.
    head: String,
    role_sent: bool,
    text: String,
    /// Counted once, when the stream ends.
    completion_tokens: Option<u64>,
    outcome: Option<StreamOutcome>,
    skipped_events: u64,
}

impl StreamTranscoder {
    pub fn new(exchange: Exchange, meta: &AnswerMeta) -> Self {
        let mut head = String::from("{\"id\":");
        head.push_str(&json_string(&meta.id));
        let _ = write!(
            head,
            ",\"object\":\"{}\",\"created\":{},\"model\":{},\"choices\":[",
            exchange.endpoint.answer_object(true),
            meta.created,
            json_string(&meta.model),
        );
        Self {
            events: EventReader::new(MAX_EVENT_BYTES),
            state: TranscodeState {
                endpoint: exchange.endpoint,
                include_usage: exchange.include_usage,
                max_tokens: exchange.max_tokens,
                prompt_tokens: meta.prompt_tokens,
                encoding: meta.encoding,
                head,
                role_sent: false,
                text: String::new(),
                completion_tokens: None,
                outcome: None,
                skipped_events: 0,
            },
        }
    }

    /// Reads the next chunk of Triton's body and returns the OpenAI events it
    /// completes (often empty). After the stream has ended, returns nothing.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        while self.state.outcome.is_none() {
            match self.events.next_data(chunk, &mut at) {
                Ok(Some(data)) => self.state.take_event(data, false, &mut out),
                Ok(None) => break,
                Err(EventTooLarge) => self.state.fail(oversize_message(), &mut out),
            }
        }
        out
    }

    /// Ends a stream Triton closed: the final chunk, the usage chunk if asked
    /// for, and `[DONE]`; or an error event if the stream ended inside an
    /// unreadable event. Returns nothing if the stream already ended.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.state.outcome.is_some() {
            return out;
        }
        if let Some(data) = self.events.end() {
            self.state.take_event(data, true, &mut out);
        }
        if self.state.outcome.is_none() {
            self.state.complete(&mut out);
        }
        out
    }

    /// Ends the stream as failed, for when the upstream body breaks off
    /// (connection reset, timeout): an OpenAI error event with `message`,
    /// no `[DONE]`. Returns nothing if the stream already ended.
    pub fn abort(&mut self, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if self.state.outcome.is_none() {
            self.state.fail(message.to_owned(), &mut out);
        }
        out
    }

    /// How the stream ended; `None` while it is still under way.
    pub fn outcome(&self) -> Option<&StreamOutcome> {
        self.state.outcome.as_ref()
    }

    /// The stream ended with an error event instead of `[DONE]`.
    pub fn failed(&self) -> bool {
        matches!(self.state.outcome, Some(StreamOutcome::Failed(_)))
    }

    /// The text generated so far (all of it, once the stream has ended).
    pub fn generated_text(&self) -> &str {
        &self.state.text
    }

    /// Completion tokens: counted once when the stream ends, however it
    /// ends; before that (a client that went away), counted now over the
    /// text so far.
    pub fn completion_tokens(&self) -> u64 {
        self.state
            .completion_tokens
            .unwrap_or_else(|| count(self.state.encoding, &self.state.text))
    }

    /// The usage to meter: the caller's prompt count and [`Self::completion_tokens`].
    pub fn usage(&self) -> UsageCounts {
        UsageCounts {
            prompt_tokens: self.state.prompt_tokens,
            completion_tokens: self.completion_tokens(),
        }
    }

    /// Events skipped as not understood; see the type's docs.
    pub fn skipped_events(&self) -> u64 {
        self.state.skipped_events
    }
}

fn oversize_message() -> String {
    format!("The backend sent a stream event larger than {MAX_EVENT_BYTES} bytes.")
}

/// One event of Triton's stream, borrowed from the event's data where it
/// has no escapes.
#[derive(Deserialize)]
struct TritonEvent<'a> {
    #[serde(borrow, default)]
    text_output: Option<Cow<'a, str>>,
    #[serde(default)]
    error: Option<Value>,
}

impl TranscodeState {
    /// Acts on the data of one complete event. `at_end`: the stream ended
    /// inside this event, without its blank line.
    fn take_event(&mut self, data: &[u8], at_end: bool, out: &mut Vec<u8>) {
        if data.trim_ascii() == b"[DONE]" {
            // Triton sends no terminator; a proxy in between might.
            return;
        }
        match serde_json::from_slice::<TritonEvent<'_>>(data) {
            Ok(TritonEvent {
                error: Some(error), ..
            }) => self.fail(error_message(&error), out),
            Ok(TritonEvent {
                text_output: Some(piece),
                ..
            }) => self.piece(&piece, out),
            Err(_) if at_end => self.fail(
                "The backend's stream ended inside an event.".to_owned(),
                out,
            ),
            Ok(_) | Err(_) => self.skipped_events += 1,
        }
    }

    fn piece(&mut self, piece: &str, out: &mut Vec<u8>) {
        if piece.is_empty() {
            // Detokenisers emit empty pieces for partial characters; nothing to send.
            return;
        }
        if self.text.len().saturating_add(piece.len()) > MAX_TEXT_BYTES {
            self.fail(
                format!("The backend's answer exceeded {MAX_TEXT_BYTES} bytes."),
                out,
            );
            return;
        }
        self.text.push_str(piece);
        if self.endpoint == Endpoint::ChatCompletions {
            self.send_role(out);
            self.open_chunk(out);
            out.extend_from_slice(b"{\"index\":0,\"delta\":{\"content\":");
            push_json_string(out, piece);
            out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":null}");
        } else {
            self.open_chunk(out);
            out.extend_from_slice(b"{\"index\":0,\"text\":");
            push_json_string(out, piece);
            out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":null}");
        }
        self.close_chunk(out);
    }

    /// The chat stream's first chunk, once.
    fn send_role(&mut self, out: &mut Vec<u8>) {
        if self.endpoint == Endpoint::ChatCompletions && !self.role_sent {
            self.role_sent = true;
            self.open_chunk(out);
            out.extend_from_slice(
                b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\
                  \"logprobs\":null,\"finish_reason\":null}",
            );
            self.close_chunk(out);
        }
    }

    fn count_completion(&mut self) -> u64 {
        let tokens = count(self.encoding, &self.text);
        self.completion_tokens = Some(tokens);
        tokens
    }

    fn complete(&mut self, out: &mut Vec<u8>) {
        let completion_tokens = self.count_completion();
        let finish_reason = FinishReason::for_count(completion_tokens, self.max_tokens);
        self.send_role(out);
        self.open_chunk(out);
        out.extend_from_slice(if self.endpoint == Endpoint::ChatCompletions {
            b"{\"index\":0,\"delta\":{}"
        } else {
            b"{\"index\":0,\"text\":\"\""
        });
        let _ = write!(
            VecWriter(out),
            ",\"logprobs\":null,\"finish_reason\":\"{}\"}}",
            finish_reason.as_str()
        );
        self.close_chunk(out);
        if self.include_usage {
            let usage = UsageCounts {
                prompt_tokens: self.prompt_tokens,
                completion_tokens,
            };
            self.open_chunk(out);
            let _ = write!(VecWriter(out), "],\"usage\":{}}}\n\n", usage.to_json());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        self.outcome = Some(StreamOutcome::Completed(finish_reason));
    }

    fn fail(&mut self, message: String, out: &mut Vec<u8>) {
        self.count_completion();
        let error = BackendError::bad_gateway(message);
        out.extend_from_slice(&error.openai_event());
        self.outcome = Some(StreamOutcome::Failed(error));
    }

    /// `data: ` and the chunk's fixed start, up to the choices list.
    fn open_chunk(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(self.head.as_bytes());
    }

    /// Closes the choices list and the event; OpenAI adds `"usage": null` to
    /// every chunk but the usage chunk when include_usage is on.
    fn close_chunk(&self, out: &mut Vec<u8>) {
        if self.include_usage {
            out.extend_from_slice(b"],\"usage\":null}\n\n");
        } else {
            out.extend_from_slice(b"]}\n\n");
        }
    }
}

/// `fmt::Write` into a byte buffer, for numbers and small formatted pieces.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    // Serialising a str cannot fail.
    serde_json::to_string(text).unwrap_or_default()
}

fn push_json_string(out: &mut Vec<u8>, text: &str) {
    // Serialising a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_body(messages: Value) -> Value {
        json!({"model": "ensemble", "messages": messages})
    }

    fn translate(endpoint: Endpoint, body: Value) -> (TritonRequest, Value) {
        let request = translate_request(endpoint, &body).unwrap();
        let generate = serde_json::from_slice(&request.body).unwrap();
        (request, generate)
    }

    fn refused(endpoint: Endpoint, body: Value) -> TranslateError {
        translate_request(endpoint, &body).unwrap_err()
    }

    #[test]
    fn chat_request_renders_chatml_and_maps_parameters() {
        let mut body = chat_body(json!([
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [
                {"type": "text", "text": "What is"},
                {"type": "text", "text": "ML?"},
            ]},
        ]));
        body["max_tokens"] = json!(64);
        body["temperature"] = json!(0.5);
        body["top_p"] = json!(0.9);
        body["presence_penalty"] = json!(0.1);
        body["frequency_penalty"] = json!(-0.2);
        body["seed"] = json!(7);
        body["stop"] = json!("\n\n");
        body["user"] = json!("ignored");
        let (request, generate) = translate(Endpoint::ChatCompletions, body);
        assert_eq!(request.path, "/v2/models/ensemble/generate");
        assert_eq!(
            request.exchange,
            Exchange {
                endpoint: Endpoint::ChatCompletions,
                stream: false,
                include_usage: false,
                max_tokens: 64,
            }
        );
        assert_eq!(
            generate,
            json!({
                "text_input": "<|im_start|>system\nBe brief.<|im_end|>\n\
                               <|im_start|>user\nHi<|im_end|>\n\
                               <|im_start|>assistant\nHello!<|im_end|>\n\
                               <|im_start|>user\nWhat is\nML?<|im_end|>\n\
                               <|im_start|>assistant\n",
                "max_tokens": 64,
                "parameters": {
                    "temperature": 0.5,
                    "top_p": 0.9,
                    "presence_penalty": 0.1,
                    "frequency_penalty": -0.2,
                    "random_seed": 7,
                    "stop_words": ["\n\n"],
                    "stream": false,
                },
            })
        );
    }

    #[test]
    fn stream_goes_to_generate_stream_and_include_usage_needs_stream() {
        let mut body = chat_body(json!([{"role": "user", "content": "Hi"}]));
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body["stop"] = json!(["a", "b"]);
        let (request, generate) = translate(Endpoint::ChatCompletions, body.clone());
        assert_eq!(request.path, "/v2/models/ensemble/generate_stream");
        assert!(request.exchange.stream && request.exchange.include_usage);
        assert_eq!(generate["parameters"]["stream"], true);
        assert_eq!(generate["parameters"]["stop_words"], json!(["a", "b"]));
        assert_eq!(generate["max_tokens"], DEFAULT_CHAT_MAX_TOKENS);

        body["stream"] = json!(false);
        let (request, _) = translate(Endpoint::ChatCompletions, body.clone());
        assert!(
            !request.exchange.include_usage,
            "usage chunks exist only in streams"
        );

        body["stream"] = json!("yes");
        assert_eq!(
            refused(Endpoint::ChatCompletions, body).param,
            Some("stream")
        );
    }

    #[test]
    fn max_completion_tokens_wins_and_limits_must_be_positive() {
        let mut body = chat_body(json!([{"role": "user", "content": "Hi"}]));
        body["max_tokens"] = json!(10);
        body["max_completion_tokens"] = json!(20);
        let (request, generate) = translate(Endpoint::ChatCompletions, body.clone());
        assert_eq!(request.exchange.max_tokens, 20);
        assert_eq!(generate["max_tokens"], 20);

        body["max_completion_tokens"] = json!(0);
        assert_eq!(
            refused(Endpoint::ChatCompletions, body.clone()).param,
            Some("max_completion_tokens")
        );
        body["max_completion_tokens"] = Value::Null;
        body["max_tokens"] = json!(1.5);
        assert_eq!(
            refused(Endpoint::ChatCompletions, body.clone()).param,
            Some("max_tokens")
        );
        body["max_tokens"] = json!(u64::from(u32::MAX) + 1);
        assert_eq!(
            refused(Endpoint::ChatCompletions, body).param,
            Some("max_tokens")
        );
    }

    #[test]
    fn completions_take_a_string_or_one_string_list() {
        for prompt in [json!("Once upon"), json!(["Once upon"])] {
            let (request, generate) = translate(
                Endpoint::Completions,
                json!({"model": "m", "prompt": prompt}),
            );
            assert_eq!(generate["text_input"], "Once upon");
            assert_eq!(generate["max_tokens"], DEFAULT_COMPLETION_MAX_TOKENS);
            assert_eq!(request.exchange.endpoint, Endpoint::Completions);
        }
        for (prompt, says) in [
            (json!([1, 2, 3]), "token-array"),
            (json!([[1, 2]]), "token-array"),
            (json!(["a", "b"]), "one prompt"),
            (json!([]), "one prompt"),
            (json!(42), "string"),
        ] {
            let error = refused(
                Endpoint::Completions,
                json!({"model": "m", "prompt": prompt}),
            );
            assert_eq!(error.param, Some("prompt"));
            assert!(error.message.contains(says), "{}", error.message);
        }
        let error = refused(Endpoint::Completions, json!({"model": "m"}));
        assert_eq!(error.param, Some("prompt"));
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let base = chat_body(json!([{"role": "user", "content": "Hi"}]));
        for (name, value) in [
            ("n", json!(2)),
            ("best_of", json!(3)),
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("functions", json!([{"name": "f"}])),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("echo", json!(true)),
            ("suffix", json!("end")),
            ("response_format", json!({"type": "json_object"})),
        ] {
            let mut body = base.clone();
            body[name] = value;
            let error = refused(Endpoint::ChatCompletions, body);
            assert_eq!(error.param, Some(name), "{name}");
            assert!(error.message.contains(name), "{}", error.message);
        }
        // The harmless values of the same fields pass.
        let mut body = base;
        for (name, value) in [
            ("n", json!(1)),
            ("tools", json!([])),
            ("functions", Value::Null),
            ("logprobs", json!(false)),
            ("top_logprobs", json!(0)),
            ("response_format", json!({"type": "text"})),
        ] {
            body[name] = value;
        }
        translate(Endpoint::ChatCompletions, body);
    }

    #[test]
    fn non_text_content_parts_and_tool_turns_are_refused() {
        let image = chat_body(json!([{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]}]));
        let error = refused(Endpoint::ChatCompletions, image);
        assert_eq!(error.param, Some("messages"));
        assert!(error.message.contains("image_url"), "{}", error.message);
        assert!(error.message.contains("images"), "{}", error.message);

        for messages in [
            json!([{"role": "tool", "content": "42", "tool_call_id": "c1"}]),
            json!([{"role": "assistant", "content": null,
                    "tool_calls": [{"id": "c1", "type": "function"}]}]),
            json!([{"role": "wizard", "content": "x"}]),
            json!([{"content": "no role"}]),
            json!([{"role": "user", "content": 5}]),
            json!([{"role": "user"}]),
            json!([]),
        ] {
            let error = refused(Endpoint::ChatCompletions, chat_body(messages.clone()));
            assert_eq!(error.param, Some("messages"), "{messages}");
        }
        // An assistant turn without content is allowed.
        let (_, generate) = translate(
            Endpoint::ChatCompletions,
            chat_body(json!([
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": null},
                {"role": "user", "content": "?"},
            ])),
        );
        assert!(
            generate["text_input"]
                .as_str()
                .unwrap()
                .contains("<|im_start|>assistant\n<|im_end|>\n")
        );
    }

    #[test]
    fn model_name_is_one_encoded_path_segment() {
        for (model, segment) in [
            ("ensemble", "ensemble"),
            ("llama-3.1_8b~v2", "llama-3.1_8b~v2"),
            ("org/model", "org%2Fmodel"),
            ("a b?c#é", "a%20b%3Fc%23%C3%A9"),
            ("..", "%2E%2E"),
        ] {
            let (request, _) = translate(
                Endpoint::Completions,
                json!({"model": model, "prompt": "x"}),
            );
            assert_eq!(request.path, format!("/v2/models/{segment}/generate"));
        }
        for model in [json!(""), json!(3), Value::Null] {
            let error = refused(
                Endpoint::Completions,
                json!({"model": model, "prompt": "x"}),
            );
            assert_eq!(error.param, Some("model"));
        }
        assert_eq!(refused(Endpoint::ChatCompletions, json!([1])).param, None);
    }

    fn meta() -> AnswerMeta {
        AnswerMeta {
            id: "chatcmpl-1".to_owned(),
            created: 1_700_000_000,
            model: "my-model".to_owned(),
            prompt_tokens: 11,
            encoding: Encoding::Cl100k,
        }
    }

    fn exchange(endpoint: Endpoint, include_usage: bool, max_tokens: u32) -> Exchange {
        Exchange {
            endpoint,
            stream: true,
            include_usage,
            max_tokens,
        }
    }

    /// A Triton stream as TensorRT-LLM writes it, plus what the format
    /// allows and a proxy may add: CRLF and lone-CR line ends, a comment, an
    /// event with extra outputs, an event split over two `data` lines,
    /// multi-byte characters and JSON escapes.
    const TRITON_STREAM: &str = concat!(
        "data: {\"model_name\":\"ensemble\",\"model_version\":\"1\",\"text_output\":\"Héllo\"}\n\n",
        ": keep-alive\n\n",
        "data: {\"model_name\":\"ensemble\",\"model_version\":\"1\",\"text_output\":\" wörld\"}\r\n\r\n",
        "data: {\"model_name\":\"ensemble\",\"text_output\":\" 😀\",\"batch_index\":0}\r\r",
        "data: {\"model_name\":\"ensemble\",\r\ndata: \"text_output\":\" two\\u0020lines\"}\r\n\r\n",
        "data: {\"model_name\":\"ensemble\",\"model_version\":\"1\",\"text_output\":\"\"}\n\n",
        "data: {\"model_name\":\"ensemble\",\"model_version\":\"1\",\"text_output\":\" \\\"quoted\\\"\\n\"}\n\n",
    );
    const TRITON_TEXT: &str = "Héllo wörld 😀 two lines \"quoted\"\n";

    fn transcode_whole(exchange: Exchange, stream: &[u8]) -> (Vec<u8>, StreamTranscoder) {
        let mut transcoder = StreamTranscoder::new(exchange, &meta());
        let mut out = transcoder.feed(stream);
        out.extend(transcoder.finish());
        (out, transcoder)
    }

    /// The `data:` payloads of an SSE body.
    fn events(out: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.split_terminator("\n\n")
            .map(|event| event.strip_prefix("data: ").unwrap().to_owned())
            .collect()
    }

    #[test]
    fn every_split_of_a_stream_transcodes_the_same() {
        for (endpoint, include_usage) in [
            (Endpoint::ChatCompletions, true),
            (Endpoint::ChatCompletions, false),
            (Endpoint::Completions, true),
        ] {
            let exchange = exchange(endpoint, include_usage, 100);
            let bytes = TRITON_STREAM.as_bytes();
            let (whole, _) = transcode_whole(exchange, bytes);
            for split in 0..=bytes.len() {
                let (head, tail) = bytes.split_at(split);
                let mut transcoder = StreamTranscoder::new(exchange, &meta());
                let mut out = transcoder.feed(head);
                out.extend(transcoder.feed(tail));
                out.extend(transcoder.finish());
                assert_eq!(out, whole, "split at {split}");
                assert_eq!(transcoder.generated_text(), TRITON_TEXT);
            }
            let mut transcoder = StreamTranscoder::new(exchange, &meta());
            let mut out = Vec::new();
            for byte in bytes {
                out.extend(transcoder.feed(std::slice::from_ref(byte)));
            }
            out.extend(transcoder.finish());
            assert_eq!(out, whole, "one byte at a time");
        }
    }

    #[test]
    fn chat_stream_is_openai_shaped() {
        let (out, transcoder) = transcode_whole(
            exchange(Endpoint::ChatCompletions, true, 100),
            TRITON_STREAM.as_bytes(),
        );
        let events = events(&out);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let completion_tokens = Encoding::Cl100k.count(TRITON_TEXT) as u64;
        // role, five non-empty pieces, finish, usage.
        assert_eq!(chunks.len(), 8, "{events:#?}");
        for chunk in &chunks {
            assert_eq!(chunk["id"], "chatcmpl-1");
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["created"], 1_700_000_000);
            assert_eq!(chunk["model"], "my-model");
        }
        assert_eq!(
            chunks[0]["choices"],
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}])
        );
        assert_eq!(chunks[0]["usage"], Value::Null);
        assert!(chunks[0].as_object().unwrap().contains_key("usage"));
        let content: String = chunks[1..6]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(content, TRITON_TEXT);
        assert_eq!(
            chunks[6]["choices"],
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}])
        );
        assert_eq!(chunks[7]["choices"], json!([]));
        assert_eq!(
            chunks[7]["usage"],
            json!({"prompt_tokens": 11, "completion_tokens": completion_tokens,
                   "total_tokens": 11 + completion_tokens})
        );
        assert_eq!(
            transcoder.outcome(),
            Some(&StreamOutcome::Completed(FinishReason::Stop))
        );
        assert!(!transcoder.failed());
        assert_eq!(transcoder.completion_tokens(), completion_tokens);
        assert_eq!(transcoder.usage().total_tokens(), 11 + completion_tokens);
        assert_eq!(transcoder.skipped_events(), 0);
    }

    #[test]
    fn completions_stream_is_openai_shaped_and_has_no_usage_unless_asked() {
        let (out, _) = transcode_whole(
            exchange(Endpoint::Completions, false, 100),
            TRITON_STREAM.as_bytes(),
        );
        let events = events(&out);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks.len(), 6, "five pieces and the finish: {events:#?}");
        for chunk in &chunks {
            assert_eq!(chunk["object"], "text_completion");
            assert!(chunk.get("usage").is_none(), "{chunk}");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
        }
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, TRITON_TEXT);
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], Value::Null);
    }

    #[test]
    fn finish_reason_is_length_when_the_answer_reaches_max_tokens() {
        let stream = "data: {\"text_output\":\"one\"}\n\ndata: {\"text_output\":\" two\"}\n\n";
        for (max_tokens, reason) in [
            (2, FinishReason::Length),
            (1, FinishReason::Length),
            (3, FinishReason::Stop),
        ] {
            let (out, transcoder) = transcode_whole(
                exchange(Endpoint::ChatCompletions, false, max_tokens),
                stream.as_bytes(),
            );
            assert_eq!(
                transcoder.outcome(),
                Some(&StreamOutcome::Completed(reason))
            );
            let events = events(&out);
            let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
            assert_eq!(finish["choices"][0]["finish_reason"], reason.as_str());
        }
    }

    /// Regression: counting per piece overcounts, since BPE merges across
    /// piece boundaries ("hello" split as "hel" + "lo" is one token whole).
    #[test]
    fn completion_tokens_count_the_whole_text_not_the_pieces() {
        let stream = "data: {\"text_output\":\"hel\"}\n\ndata: {\"text_output\":\"lo\"}\n\n";
        let (_, transcoder) = transcode_whole(
            exchange(Endpoint::ChatCompletions, true, 100),
            stream.as_bytes(),
        );
        assert_eq!(
            Encoding::Cl100k.count("hel") + Encoding::Cl100k.count("lo"),
            2
        );
        assert_eq!(transcoder.completion_tokens(), 1);
    }

    #[test]
    fn error_event_mid_stream_ends_it_without_done_or_usage() {
        let stream = concat!(
            "data: {\"text_output\":\"Hello\"}\n\n",
            "data: {\"error\":\"Simulated engine abort mid-stream.\"}\n\n",
            "data: {\"text_output\":\" ignored\"}\n\n",
        );
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
            let (out, mut transcoder) =
                transcode_whole(exchange(endpoint, true, 100), stream.as_bytes());
            let events = events(&out);
            let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
            assert_eq!(
                last,
                json!({"error": {"message": "Simulated engine abort mid-stream.",
                                 "type": "server_error", "param": null, "code": "backend_error"}})
            );
            assert!(
                !events
                    .iter()
                    .any(|e| e == "[DONE]" || e.contains("\"usage\":{"))
            );
            assert!(transcoder.failed());
            assert_eq!(transcoder.generated_text(), "Hello");
            assert_eq!(transcoder.completion_tokens(), 1);
            assert!(
                transcoder
                    .feed(b"data: {\"text_output\":\"x\"}\n\n")
                    .is_empty()
            );
            assert!(transcoder.finish().is_empty());
            assert!(transcoder.abort("late").is_empty());
        }
    }

    #[test]
    fn abort_fails_the_stream_and_keeps_what_was_generated() {
        let mut transcoder =
            StreamTranscoder::new(exchange(Endpoint::ChatCompletions, true, 100), &meta());
        let out = transcoder.feed(b"data: {\"text_output\":\"Hi there\"}\n\ndata: {\"text_out");
        assert_eq!(events(&out).len(), 2);
        let out = transcoder.abort("The backend connection was reset.");
        let error: Value = serde_json::from_str(&events(&out)[0]).unwrap();
        assert_eq!(
            error["error"]["message"],
            "The backend connection was reset."
        );
        assert!(transcoder.failed());
        assert_eq!(transcoder.completion_tokens(), 2);
    }

    #[test]
    fn garbage_events_are_skipped_but_a_truncated_last_event_fails() {
        let stream = concat!(
            "data: not json\n\n",
            "data: {\"model_name\":\"m\"}\n\n",
            "event: ping\ndata: [1,2]\n\n",
            "data: {\"text_output\": 5}\n\n",
            "data: [DONE]\n\n",
            "data: {\"text_output\":\"ok\"}\n\n",
        );
        let (out, transcoder) = transcode_whole(
            exchange(Endpoint::Completions, false, 100),
            stream.as_bytes(),
        );
        assert!(!transcoder.failed());
        assert_eq!(transcoder.generated_text(), "ok");
        assert_eq!(transcoder.skipped_events(), 4);
        assert!(out.ends_with(b"data: [DONE]\n\n"));

        // The last event lacks its blank line but is whole: it counts.
        let (_, transcoder) = transcode_whole(
            exchange(Endpoint::ChatCompletions, false, 100),
            b"data: {\"text_output\":\"a\"}\n\ndata: {\"text_output\":\"b\"}",
        );
        assert_eq!(transcoder.generated_text(), "ab");
        assert!(!transcoder.failed());

        // The stream broke off inside an event.
        let (out, transcoder) = transcode_whole(
            exchange(Endpoint::ChatCompletions, false, 100),
            b"data: {\"text_output\":\"a\"}\n\ndata: {\"text_out",
        );
        assert!(transcoder.failed());
        assert!(!out.ends_with(b"data: [DONE]\n\n"));
        assert!(
            std::str::from_utf8(&out)
                .unwrap()
                .contains("ended inside an event")
        );
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        let stream = "data: {\"text_output\":\ndata: \"joined\"}\n\n";
        let (_, transcoder) = transcode_whole(
            exchange(Endpoint::ChatCompletions, false, 100),
            stream.as_bytes(),
        );
        assert_eq!(transcoder.generated_text(), "joined");
    }

    #[test]
    fn an_oversize_event_fails_the_stream_and_frees_its_buffer() {
        let mut transcoder =
            StreamTranscoder::new(exchange(Endpoint::ChatCompletions, true, 100), &meta());
        let mut out = transcoder.feed(b"data: {\"text_output\":\"");
        let filler = vec![b'x'; 64 * 1024];
        let mut fed = 0;
        while !transcoder.failed() && fed <= MAX_EVENT_BYTES {
            out.extend(transcoder.feed(&filler));
            fed += filler.len();
        }
        assert!(transcoder.failed(), "held {fed} bytes");
        assert_eq!(transcoder.events.capacity(), 0);
        assert!(std::str::from_utf8(&out).unwrap().contains("larger than"));
        assert!(transcoder.finish().is_empty());
    }

    /// Arbitrary bytes never panic, and the transcoder always ends with
    /// either `[DONE]` or an error event.
    #[test]
    fn arbitrary_bytes_never_panic() {
        const ALPHABET: &[u8] = b"\n\r:data {}[]\",text_output error DONE\\\xff\xc3\xa9\x00";
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // xorshift64: deterministic, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            let mut transcoder =
                StreamTranscoder::new(exchange(Endpoint::ChatCompletions, true, 5), &meta());
            let mut out = Vec::new();
            for piece in bytes.chunks(1 + (next() % 7) as usize) {
                out.extend(transcoder.feed(piece));
            }
            out.extend(transcoder.finish());
            assert!(transcoder.outcome().is_some());
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.ends_with("data: [DONE]\n\n") || text.contains("\"code\":\"backend_error\""),
                "{text:?}"
            );
        }
    }

    #[test]
    fn whole_answers_translate_to_completion_objects() {
        let triton = br#"{"model_name":"ensemble","model_version":"1","text_output":"Machine learning is fun."}"#;
        let tokens = Encoding::Cl100k.count("Machine learning is fun.") as u64;
        let chat = exchange(Endpoint::ChatCompletions, false, 100);
        let answer = translate_response(chat, &meta(), triton).unwrap();
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "my-model",
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": "Machine learning is fun."},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": tokens, "total_tokens": 11 + tokens},
            })
        );
        assert_eq!(
            answer.usage,
            UsageCounts {
                prompt_tokens: 11,
                completion_tokens: tokens
            }
        );

        let completions = exchange(Endpoint::Completions, false, u32::try_from(tokens).unwrap());
        let answer = translate_response(completions, &meta(), triton).unwrap();
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"][0]["text"], "Machine learning is fun.");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(answer.finish_reason, FinishReason::Length);
    }

    #[test]
    fn backend_errors_become_openai_errors() {
        let error = translate_error(
            400,
            br#"{"error":"Request for unknown model: 'x' is not found"}"#,
        );
        assert_eq!(error.status, 400);
        let body: Value = serde_json::from_slice(&error.openai_body()).unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": "Request for unknown model: 'x' is not found",
                             "type": "invalid_request_error", "param": null, "code": "backend_error"}})
        );

        let error = translate_error(500, b"<html>oops</html>");
        assert_eq!(error.status, 500);
        assert_eq!(error.error_type(), "server_error");
        assert!(error.message.contains("HTTP 500"), "{}", error.message);
        assert_eq!(translate_error(200, b"{}").status, 502);

        let chat = exchange(Endpoint::ChatCompletions, false, 100);
        let error = translate_response(chat, &meta(), br#"{"error":"engine failed"}"#).unwrap_err();
        assert_eq!(
            (error.message.as_str(), error.status),
            ("engine failed", 502)
        );
        for garbage in [&b"not json"[..], b"{}", br#"{"text_output":3}"#] {
            let error = translate_response(chat, &meta(), garbage).unwrap_err();
            assert_eq!(error.status, 502);
            assert_eq!(error.error_type(), "server_error");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn meta() -> AnswerMeta {
            AnswerMeta {
                id: "chatcmpl-prop".to_owned(),
                created: 0,
                model: "ensemble".to_owned(),
                prompt_tokens: 3,
                encoding: Encoding::Cl100k,
            }
        }

        fn exchange() -> impl Strategy<Value = Exchange> {
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<u32>()).prop_map(
                |(chat, stream, include_usage, max_tokens)| Exchange {
                    endpoint: if chat {
                        Endpoint::ChatCompletions
                    } else {
                        Endpoint::Completions
                    },
                    stream,
                    include_usage: stream && include_usage,
                    max_tokens,
                },
            )
        }

        /// Triton's answers are `data: {...}` events and JSON bodies; these
        /// pieces make both, broken in every way, and any byte.
        fn answer() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                prop::sample::select(vec![
                    "data: ",
                    "\n",
                    "\n\n",
                    "\r\n",
                    "{",
                    "}",
                    "\"",
                    ":",
                    ",",
                    "\"text_output\"",
                    "\"error\"",
                    "\"model_name\"",
                    "\"x\"",
                    "null",
                    "\"\\u00e9\"",
                    "\"hi there\"",
                    "é",
                    "[",
                    "]",
                    "42",
                ])
                .prop_map(|s: &str| s.as_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 1..4),
            ];
            prop::collection::vec(piece, 0..80).prop_map(|parts| parts.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            #[test]
            fn any_triton_answer_is_translated_or_reported_without_a_panic(
                exchange in exchange(),
                bytes in answer(),
                chunk in 1usize..64,
                status in prop::sample::select(vec![200u16, 400, 500, 503]),
            ) {
                let mut transcoder = StreamTranscoder::new(exchange, &meta());
                for piece in bytes.chunks(chunk) {
                    transcoder.feed(piece);
                }
                transcoder.finish();
                let _ = transcoder.usage();
                let _ = translate_response(exchange, &meta(), &bytes);
                let _ = translate_error(status, &bytes).openai_body();
            }

            #[test]
            fn any_request_is_translated_or_refused_with_a_param(
                chat in any::<bool>(),
                max_tokens in any::<i64>(),
                n in any::<i64>(),
                stream in any::<bool>(),
                text in ".{0,40}",
            ) {
                let endpoint = if chat { Endpoint::ChatCompletions } else { Endpoint::Completions };
                let body = json!({
                    "model": text.clone(),
                    "messages": [{"role": "user", "content": text.clone()}],
                    "prompt": text,
                    "max_tokens": max_tokens,
                    "n": n,
                    "stream": stream,
                });
                let _ = translate_request(endpoint, &body);
            }
        }
    }
}
