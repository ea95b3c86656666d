//! Errors the simulator answers with, in each protocol's own shape.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request is refused. Every variant maps to an HTTP status and an
/// OpenAI error object (`SimError` responses) or a Triton one ([`TritonError`]).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("The model `{0}` does not exist.")]
    UnknownModel(String),
    #[error("No route for {0}.")]
    NoRoute(String),
    #[error("Method not allowed.")]
    MethodNotAllowed,
    #[error("Invalid or missing API key.")]
    Unauthorized,
    #[error("Request body is too large.")]
    BodyTooLarge,
    #[error("The model is loading; try again shortly.")]
    NotReady,
    #[error("The inference engine has failed.")]
    EngineFailed,
    #[error("Simulated engine error (--error-rate).")]
    Injected,
}

impl SimError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::UnknownModel(_) | Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotReady | Self::EngineFailed => StatusCode::SERVICE_UNAVAILABLE,
            Self::Injected => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest { .. }
            | Self::UnknownModel(_)
            | Self::NoRoute(_)
            | Self::MethodNotAllowed
            | Self::BodyTooLarge => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::NotReady | Self::EngineFailed | Self::Injected => "server_error",
        }
    }

    /// OpenAI's `error.code`.
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::UnknownModel(_) => Some("model_not_found"),
            Self::NoRoute(_) => Some("unknown_url"),
            Self::MethodNotAllowed => Some("method_not_allowed"),
            Self::Unauthorized => Some("invalid_api_key"),
            Self::BodyTooLarge => Some("request_too_large"),
            Self::NotReady => Some("model_not_ready"),
            Self::EngineFailed => Some("engine_failed"),
            Self::BadRequest { .. } | Self::Injected => None,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { param, .. } => *param,
            Self::UnknownModel(_) => Some("model"),
            _ => None,
        }
    }
}

impl From<BytesRejection> for SimError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::BodyTooLarge
        } else {
            Self::bad_request(rejection.body_text(), None)
        }
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }});
        (self.status(), Json(body)).into_response()
    }
}

/// A [`SimError`] in Triton's shape: `{"error": "message"}`. Triton answers
/// 400 for requests to unknown models.
#[derive(Debug)]
pub struct TritonError(pub SimError);

impl<E: Into<SimError>> From<E> for TritonError {
    fn from(error: E) -> Self {
        Self(error.into())
    }
}

impl IntoResponse for TritonError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            SimError::UnknownModel(_) => StatusCode::BAD_REQUEST,
            other => other.status(),
        };
        (status, Json(json!({"error": self.0.to_string()}))).into_response()
    }
}
