//! What an inference request asks for: the endpoint, and the body, read once
//! (bounded) and parsed once into the fields later phases need.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The path the backend is asked on, whatever spelling the client used.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// The JSON field holding the input, which the endpoint requires.
    fn input_field(self) -> &'static str {
        match self {
            Self::ChatCompletions => "messages",
            Self::Completions => "prompt",
            Self::Embeddings => "input",
        }
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
    pub stream: bool,
    /// The completion limit the backend honours (see [`completion_limit`]).
    pub max_tokens: Option<u64>,
    /// Sequences the backend generates, each up to `max_tokens`: per prompt
    /// `n`, or `best_of` when larger (1 if unset), times the prompts of a
    /// completions request.
    pub sequences: u64,
    /// The parsed body, for token counting.
    pub json: Value,
    /// The body sent upstream: the client's bytes, unless the proxy had to
    /// change them (then written once, by [`Self::seal_body`]).
    pub upstream_body: Bytes,
    /// [`Self::json`] was changed since the body was last written.
    pub rewritten: bool,
}

impl InferenceRequest {
    /// Sets the completion limit in the body sent upstream: in `max_tokens`,
    /// which every backend reads (legacy completions read nothing else), and
    /// in `max_completion_tokens` too when the client sent it (chat backends
    /// read it first). Takes effect at [`Self::seal_body`].
    pub fn set_max_tokens(&mut self, max_tokens: u64) {
        let Some(fields) = self.json.as_object_mut() else {
            return;
        };
        fields.insert("max_tokens".to_owned(), Value::from(max_tokens));
        if let Some(value) = fields
            .get_mut("max_completion_tokens")
            .filter(|v| !v.is_null())
        {
            *value = Value::from(max_tokens);
        }
        self.max_tokens = Some(max_tokens);
        self.rewritten = true;
    }

    /// Writes the body sent upstream, once, with every rewrite made to
    /// [`Self::json`] (the usage option, the cap); the client's bytes go
    /// unchanged when there was none.
    pub fn seal_body(&mut self) {
        if std::mem::take(&mut self.rewritten)
            && let Ok(body) = serde_json::to_vec(&self.json)
        {
            self.upstream_body = Bytes::from(body);
        }
    }
}

/// The two names of the completion limit.
const LIMIT_FIELDS: [&str; 2] = ["max_completion_tokens", "max_tokens"];

/// The completion limit the backend will honour. Chat backends read
/// `max_completion_tokens` over the older `max_tokens`; legacy completions
/// know only `max_tokens` (vLLM ignores the other there). A body that sets
/// both to different values is refused: backends disagree on which wins,
/// and whichever the reservation trusted, the other could let more through.
fn completion_limit(
    endpoint: Endpoint,
    fields: &serde_json::Map<String, Value>,
) -> Result<Option<u64>, ApiError> {
    let mut limits = [None, None];
    for (limit, name) in limits.iter_mut().zip(LIMIT_FIELDS) {
        if let Some(value) = fields.get(name).filter(|v| !v.is_null()) {
            *limit = Some(value.as_u64().ok_or_else(|| {
                ApiError::bad_request(
                    format!("`{name}` must be a non-negative integer."),
                    Some(name),
                )
            })?);
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
        Endpoint::Embeddings => None,
    })
}

/// How many prompts a completions `prompt` holds: a string or a token array
/// is one, an array of strings or of token arrays one per element.
fn completion_prompts(prompt: Option<&Value>) -> Result<u64, ApiError> {
    match prompt {
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::bad_request(
            "`prompt` must not be an empty list.",
            Some("prompt"),
        )),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => Ok(1),
        Some(Value::Array(items)) => Ok(items.len() as u64),
        _ => Ok(1),
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
    let mut body = BytesMut::with_capacity(declared.unwrap_or(16 * 1024));
    let mut buffering = false;
    loop {
        let remaining = declared.map(|n| n.saturating_sub(body.len()));
        if !buffering && remaining.is_none_or(|r| r <= RETRY_BUFFER_BYTES) {
            session.enable_retry_buffering();
            buffering = true;
        }
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(ApiError::BodyTooLarge { limit }.into());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(BodyError::ClientGone(e.into_down())),
        }
    }
    if !body.is_empty() && session.get_retry_buffer().is_none() {
        // Only a chunked body above 64 KiB gets here: Pingora could not replay it.
        return Err(ApiError::bad_request(
            "Chunked request bodies above 64 KiB are not supported; send Content-Length.",
            None,
        )
        .into());
    }
    Ok(body.freeze())
}

/// Parses and checks an inference body; the error names the field at fault.
pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<InferenceRequest, ApiError> {
    let json: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("Request body is not valid JSON: {e}."), None)
    })?;
    let Some(fields) = json.as_object() else {
        return Err(ApiError::bad_request(
            "Request body must be a JSON object.",
            None,
        ));
    };
    let model = match fields.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`model` must be a non-empty string.",
                Some("model"),
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "You must provide a `model` parameter.",
                Some("model"),
            ));
        }
    };
    let input = endpoint.input_field();
    match fields.get(input) {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                format!("Missing required parameter `{input}`."),
                Some(input),
            ));
        }
        Some(Value::Array(items)) if items.is_empty() && endpoint == Endpoint::ChatCompletions => {
            return Err(ApiError::bad_request(
                "`messages` must contain at least one message.",
                Some("messages"),
            ));
        }
        Some(Value::Array(_)) => {}
        Some(_) if endpoint == Endpoint::ChatCompletions => {
            return Err(ApiError::bad_request(
                "`messages` must be an array of messages.",
                Some("messages"),
            ));
        }
        Some(_) => {}
    }
    let stream = match fields.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`stream` must be a boolean.",
                Some("stream"),
            ));
        }
    };
    if stream && endpoint == Endpoint::Embeddings {
        return Err(ApiError::bad_request(
            "Embeddings cannot be streamed.",
            Some("stream"),
        ));
    }
    let max_tokens = completion_limit(endpoint, fields)?;
    let mut choices: u64 = 1;
    for name in ["n", "best_of"] {
        match fields.get(name) {
            None | Some(Value::Null) => {}
            Some(value) => match value.as_u64() {
                Some(n) if n >= 1 => choices = choices.max(n),
                _ => {
                    return Err(ApiError::bad_request(
                        format!("`{name}` must be a positive integer."),
                        Some(if name == "n" { "n" } else { "best_of" }),
                    ));
                }
            },
        }
    }
    let prompts = match endpoint {
        Endpoint::Completions => completion_prompts(fields.get("prompt"))?,
        Endpoint::ChatCompletions | Endpoint::Embeddings => 1,
    };
    // Every prompt gets every choice: the reservation covers all of them.
    let sequences = choices.checked_mul(prompts).ok_or_else(|| {
        ApiError::bad_request(
            "`n` (or `best_of`) times the number of prompts is too large.",
            Some("n"),
        )
    })?;
    Ok(InferenceRequest {
        endpoint,
        model,
        stream,
        max_tokens,
        sequences,
        json,
        upstream_body: body,
        rewritten: false,
    })
}

#[cfg(test)]
mod tests {
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
