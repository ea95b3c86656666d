//! What a client asked for: the route, and for inference the body, read once
//! (bounded) and parsed once into the fields later phases need.

use bytes::{Bytes, BytesMut};
use http::Method;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Inference(Endpoint),
    Models,
    /// `GET /v1/usage`: the caller's own usage.
    Usage,
    Healthz,
    Readyz,
    /// `POST /stripe/webhook`: Stripe's event deliveries.
    StripeWebhook,
    /// `POST /v1/billing/checkout`: a Checkout Session for the caller's account.
    BillingCheckout,
    /// `POST /v1/billing/portal`: a Customer Portal session for it.
    BillingPortal,
}

/// The route for `method` and `path`, or the 404/405 to answer.
pub fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let (route, allowed) = match path.trim_end_matches('/') {
        "/v1/chat/completions" => (Route::Inference(Endpoint::ChatCompletions), Method::POST),
        "/v1/completions" => (Route::Inference(Endpoint::Completions), Method::POST),
        "/v1/embeddings" => (Route::Inference(Endpoint::Embeddings), Method::POST),
        "/v1/models" => (Route::Models, Method::GET),
        "/v1/usage" => (Route::Usage, Method::GET),
        "/healthz" => (Route::Healthz, Method::GET),
        "/readyz" => (Route::Readyz, Method::GET),
        "/stripe/webhook" => (Route::StripeWebhook, Method::POST),
        "/v1/billing/checkout" => (Route::BillingCheckout, Method::POST),
        "/v1/billing/portal" => (Route::BillingPortal, Method::POST),
        _ => {
            return Err(ApiError::UnknownRoute {
                method: method.to_string(),
                path: path.to_owned(),
            });
        }
    };
    if *method == allowed || (allowed == Method::GET && *method == Method::HEAD) {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allow: if allowed == Method::GET {
                "GET, HEAD"
            } else {
                "POST"
            },
        })
    }
}

/// An inference request as later phases need it.
#[derive(Debug)]
pub struct InferenceRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Sequences generated per prompt: `n`, or `best_of` when larger (1 if unset).
    pub choices: u64,
    /// The parsed body, for token counting.
    pub json: Value,
    /// The body sent upstream: the client's bytes, unless the proxy had to change them.
    pub upstream_body: Bytes,
}

impl InferenceRequest {
    /// Sets the completion limit in the body sent upstream, in the field the
    /// client used (`max_tokens` if it used none).
    pub fn set_max_tokens(&mut self, max_tokens: u64) {
        let Some(fields) = self.json.as_object_mut() else {
            return;
        };
        let name = if fields
            .get("max_completion_tokens")
            .is_some_and(|v| !v.is_null())
        {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        fields.insert(name.to_owned(), Value::from(max_tokens));
        if let Ok(body) = serde_json::to_vec(&self.json) {
            self.upstream_body = Bytes::from(body);
            self.max_tokens = Some(max_tokens);
        }
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
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .find_map(|name| fields.get(name).filter(|v| !v.is_null()).map(|v| (name, v)))
        .map(|(name, value)| {
            value.as_u64().ok_or_else(|| {
                ApiError::bad_request(
                    format!("`{name}` must be a non-negative integer."),
                    Some(max_tokens_param(name)),
                )
            })
        })
        .transpose()?;
    let mut choices = 1;
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
    Ok(InferenceRequest {
        endpoint,
        model,
        stream,
        max_tokens,
        choices,
        json,
        upstream_body: body,
    })
}

fn max_tokens_param(name: &str) -> &'static str {
    if name == "max_tokens" {
        "max_tokens"
    } else {
        "max_completion_tokens"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
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
    fn routes_match_method_and_path() {
        assert_eq!(
            route(&Method::POST, "/v1/chat/completions").unwrap(),
            Route::Inference(Endpoint::ChatCompletions)
        );
        assert_eq!(route(&Method::GET, "/v1/models/").unwrap(), Route::Models);
        assert!(matches!(
            route(&Method::GET, "/v1/chat/completions"),
            Err(ApiError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            route(&Method::POST, "/v2/anything"),
            Err(ApiError::UnknownRoute { .. })
        ));
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
}
