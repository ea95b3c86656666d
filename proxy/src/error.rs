//! Every way the gateway refuses or fails a request, and its OpenAI-shaped
//! answer: `{"error": {"message", "type", "param", "code"}}`. Each variant maps
//! to a status with no catch-all, so a new variant forces a decision.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tollgate_metering::units::UnitKind;

use crate::admission::limits::{Period, RateKind, Scope};
use crate::keys::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("Missing API key: send it as `Authorization: Bearer tg_...`.")]
    MissingKey,
    #[error("Invalid API key.")]
    InvalidKey,
    #[error("This API key has been revoked.")]
    RevokedKey,
    #[error("This API key has expired.")]
    ExpiredKey,
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("Unknown request URL: {method} {path}.")]
    UnknownRoute { method: String, path: String },
    #[error("Method {method} is not allowed on {path}.")]
    MethodNotAllowed {
        method: String,
        path: String,
        /// The `Allow` header's value.
        allow: &'static str,
    },
    #[error("Request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    /// An upload that holds a GPU slot while arriving slower than this.
    #[error(
        "The upload arrived slower than {bytes_per_second} bytes a second while holding a GPU \
         slot; send it faster, or from closer."
    )]
    UploadTooSlow { bytes_per_second: u64 },
    #[error("Request headers total more than the limit of {limit} bytes.")]
    HeadersTooLarge { limit: usize },
    #[error("The backend refused or dropped the connection.")]
    BadGateway,
    #[error("No backend is available for model `{0}`.")]
    NoBackend(String),
    #[error("The backend did not answer in time ({phase}).")]
    GatewayTimeout { phase: &'static str },
    #[error("Authentication is temporarily unavailable; retry shortly.")]
    AuthUnavailable,
    #[error("The database is temporarily unavailable; retry shortly.")]
    DatabaseUnavailable,
    #[error("Admin token missing or invalid.")]
    AdminUnauthorized,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "Rate limit reached for {} per minute ({}): limit {limit}. Try again in {}.",
        kind_name(*kind), scope_name(*scope), seconds(*retry_after)
    )]
    RateLimited {
        kind: RateKind,
        scope: Scope,
        limit: u64,
        retry_after: Duration,
    },
    #[error(
        "Request too large for this tier's tokens per minute: limit {limit}, requested \
         {requested} (prompt plus max_tokens). Lower max_tokens or shorten the prompt."
    )]
    TooManyTokens { limit: u64, requested: u64 },
    #[error(
        "Too many requests in progress for this account (limit {limit}); wait for one to finish."
    )]
    TooManyConcurrent { limit: u64 },
    #[error("This account has {limit} jobs queued, its limit; wait for some to start.")]
    TooManyJobs { limit: u64 },
    #[error(
        "You exceeded your {} {}quota for this tier. It renews in {}.",
        period_name(*period), unit_name(*unit), seconds(*retry_after)
    )]
    InsufficientQuota {
        period: Period,
        unit: UnitKind,
        retry_after: Duration,
    },
    #[error(
        "Server busy: every GPU is taken and your tier's wait limit would be passed. \
         Try again in a few minutes (Retry-After: {} s).",
        crate::admission::headers::retry_after(*retry_after)
    )]
    ServerBusy { retry_after: Duration },
    #[error("Rate limiting is temporarily unavailable for this tier; retry shortly.")]
    LimiterUnavailable,
    /// The account's tier is not in this instance's config (start-up checks
    /// existing accounts; this catches one created under another config).
    #[error("This account's tier `{0}` is not configured on this server.")]
    UnknownTier(String),
    /// Stripe did not answer as needed (or its catalog is not synced).
    #[error("Billing is temporarily unavailable: {0}")]
    BillingUnavailable(String),
}

fn kind_name(kind: RateKind) -> &'static str {
    match kind {
        RateKind::Requests => "requests",
        RateKind::Tokens => "tokens",
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Key => "this API key",
        Scope::Account => "this account",
    }
}

fn period_name(period: Period) -> &'static str {
    match period {
        Period::Month => "monthly",
        Period::Day => "daily",
    }
}

/// The unit a quota counts, for messages: none for tokens (the quota most
/// tiers have), else e.g. "images ".
fn unit_name(unit: UnitKind) -> String {
    match unit {
        UnitKind::Tokens => String::new(),
        other => format!("{} ", other.as_str().replace('_', " ")),
    }
}

/// A wait as "42s", for messages.
fn seconds(wait: Duration) -> String {
    format!("{}s", wait.as_secs_f64().ceil().max(1.0) as u64)
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Self::MissingKey
            | Self::InvalidKey
            | Self::RevokedKey
            | Self::ExpiredKey
            | Self::AdminUnauthorized => 401,
            Self::BadRequest { .. } => 400,
            Self::ModelNotFound(_) | Self::UnknownRoute { .. } | Self::NotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::Conflict(_) => 409,
            Self::UploadTooSlow { .. } => 408,
            Self::BodyTooLarge { .. } => 413,
            Self::HeadersTooLarge { .. } => 431,
            Self::RateLimited { .. }
            | Self::TooManyTokens { .. }
            | Self::TooManyConcurrent { .. }
            | Self::TooManyJobs { .. }
            | Self::InsufficientQuota { .. } => 429,
            Self::UnknownTier(_) => 500,
            Self::BadGateway => 502,
            Self::NoBackend(_)
            | Self::AuthUnavailable
            | Self::DatabaseUnavailable
            | Self::ServerBusy { .. }
            | Self::LimiterUnavailable
            | Self::BillingUnavailable(_) => 503,
            Self::GatewayTimeout { .. } => 504,
        }
    }

    /// OpenAI's `error.type`.
    fn kind(&self) -> &'static str {
        match self {
            Self::MissingKey
            | Self::InvalidKey
            | Self::RevokedKey
            | Self::ExpiredKey
            | Self::AdminUnauthorized => "authentication_error",
            Self::BadRequest { .. }
            | Self::ModelNotFound(_)
            | Self::UnknownRoute { .. }
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge { .. }
            | Self::UploadTooSlow { .. }
            | Self::HeadersTooLarge { .. }
            | Self::Conflict(_)
            | Self::NotFound(_) => "invalid_request_error",
            // OpenAI's rate-limit errors name what ran out.
            Self::RateLimited { kind, .. } => kind_name(*kind),
            Self::TooManyTokens { .. } => "tokens",
            Self::TooManyConcurrent { .. } | Self::TooManyJobs { .. } => "requests",
            Self::InsufficientQuota { .. } => "insufficient_quota",
            Self::BadGateway
            | Self::NoBackend(_)
            | Self::GatewayTimeout { .. }
            | Self::AuthUnavailable
            | Self::DatabaseUnavailable
            | Self::ServerBusy { .. }
            | Self::LimiterUnavailable
            | Self::UnknownTier(_)
            | Self::BillingUnavailable(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`.
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::MissingKey
            | Self::InvalidKey
            | Self::RevokedKey
            | Self::ExpiredKey
            | Self::AdminUnauthorized => Some("invalid_api_key"),
            Self::ModelNotFound(_) => Some("model_not_found"),
            Self::UnknownRoute { .. } => Some("unknown_url"),
            Self::MethodNotAllowed { .. } => Some("method_not_allowed"),
            Self::BodyTooLarge { .. } => Some("request_too_large"),
            Self::UploadTooSlow { .. } => Some("upload_too_slow"),
            Self::HeadersTooLarge { .. } => Some("request_header_fields_too_large"),
            Self::BadGateway => Some("bad_gateway"),
            Self::NoBackend(_) => Some("no_backend_available"),
            Self::GatewayTimeout { .. } => Some("gateway_timeout"),
            Self::AuthUnavailable => Some("auth_unavailable"),
            Self::DatabaseUnavailable => Some("database_unavailable"),
            Self::RateLimited { .. }
            | Self::TooManyTokens { .. }
            | Self::TooManyConcurrent { .. }
            | Self::TooManyJobs { .. } => Some("rate_limit_exceeded"),
            Self::InsufficientQuota { .. } => Some("insufficient_quota"),
            Self::ServerBusy { .. } => Some("server_busy"),
            Self::LimiterUnavailable => Some("rate_limiter_unavailable"),
            Self::UnknownTier(_) => Some("unknown_tier"),
            Self::BillingUnavailable(_) => Some("billing_unavailable"),
            Self::BadRequest { .. } | Self::Conflict(_) | Self::NotFound(_) => None,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { param, .. } => *param,
            Self::ModelNotFound(_) | Self::NoBackend(_) => Some("model"),
            Self::MissingKey
            | Self::InvalidKey
            | Self::RevokedKey
            | Self::ExpiredKey
            | Self::UnknownRoute { .. }
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge { .. }
            | Self::UploadTooSlow { .. }
            | Self::HeadersTooLarge { .. }
            | Self::BadGateway
            | Self::GatewayTimeout { .. }
            | Self::AuthUnavailable
            | Self::DatabaseUnavailable
            | Self::AdminUnauthorized
            | Self::Conflict(_)
            | Self::NotFound(_)
            | Self::RateLimited { .. }
            | Self::TooManyTokens { .. }
            | Self::TooManyConcurrent { .. }
            | Self::TooManyJobs { .. }
            | Self::InsufficientQuota { .. }
            | Self::ServerBusy { .. }
            | Self::LimiterUnavailable
            | Self::UnknownTier(_)
            | Self::BillingUnavailable(_) => None,
        }
    }

    /// The `Retry-After` to send, when waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::InsufficientQuota { retry_after, .. }
            | Self::ServerBusy { retry_after } => Some(*retry_after),
            Self::TooManyConcurrent { .. } | Self::LimiterUnavailable => {
                Some(Duration::from_secs(1))
            }
            // Queued jobs start at the pace of the GPUs: not within a second.
            Self::TooManyJobs { .. } => Some(Duration::from_secs(10)),
            // Retrying the same request cannot help, or the cause is not a wait.
            Self::TooManyTokens { .. }
            | Self::MissingKey
            | Self::InvalidKey
            | Self::RevokedKey
            | Self::ExpiredKey
            | Self::BadRequest { .. }
            | Self::ModelNotFound(_)
            | Self::UnknownRoute { .. }
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge { .. }
            | Self::UploadTooSlow { .. }
            | Self::HeadersTooLarge { .. }
            | Self::BadGateway
            | Self::NoBackend(_)
            | Self::GatewayTimeout { .. }
            | Self::AuthUnavailable
            | Self::DatabaseUnavailable
            | Self::AdminUnauthorized
            | Self::Conflict(_)
            | Self::NotFound(_)
            | Self::UnknownTier(_)
            | Self::BillingUnavailable(_) => None,
        }
    }

    /// The error object as JSON bytes.
    pub fn body(&self) -> Bytes {
        Bytes::from(self.json().to_string())
    }

    pub fn json(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }})
    }

    /// The error as one server-sent event, to end a stream that fails midway.
    pub fn sse_event(&self) -> Bytes {
        Bytes::from(format!("data: {}\n\n", self.json()))
    }
}

/// A store's failure as the client sees it: what it said of the request, or
/// (for the database itself) a retry later, logged here.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(message) => Self::NotFound(message),
            StoreError::Conflict(message) => Self::Conflict(message),
            StoreError::Pool(_) | StoreError::Db(_) | StoreError::Timeout => {
                tracing::error!("{error}");
                Self::DatabaseUnavailable
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openai_shape() {
        let error = ApiError::ModelNotFound("gpt-x".into());
        let json = error.json();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["code"], "model_not_found");
        assert_eq!(json["error"]["param"], "model");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("gpt-x"))
        );
        assert_eq!(error.status(), 404);
    }

    #[test]
    fn sse_error_event_is_one_data_line() {
        let event = ApiError::BadGateway.sse_event();
        let text = std::str::from_utf8(&event).unwrap_or_default();
        assert!(text.starts_with("data: {\"error\""));
        assert!(text.ends_with("\n\n"));
    }
}
