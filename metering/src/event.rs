//! The usage event: one per admitted request, the unit everything downstream
//! (the usage log, rollups, quotas, billing) is computed from.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::endpoint::Endpoint;
use crate::units::UnitKind;

/// How a request ended, for billing and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Answered in full.
    Ok,
    /// A stream cut short (client gone, backend abort): the tokens generated
    /// so far are billed.
    Partial,
    /// The backend refused the request (4xx).
    ClientError,
    /// The backend failed or could not be reached.
    UpstreamError,
    /// Refused by admission (quota, rate limit, overload) before forwarding.
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Partial => "partial",
            Self::ClientError => "client_error",
            Self::UpstreamError => "upstream_error",
            Self::Rejected => "rejected",
        }
    }
}

/// Where the billed token figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The backend's `usage` report: authoritative.
    Backend,
    /// Tollgate's own count: the backend reported none.
    Counted,
    /// Neither: counting is off and the backend reported nothing.
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backend => "backend",
            Self::Counted => "counted",
            Self::None => "none",
        }
    }
}

/// Token figures of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
}

impl Tokens {
    /// Saturating: the figures come from backends.
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// One request's usage, as written to `usage_events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// UUIDv7 minted at admission; the idempotency key of every write.
    pub event_id: Uuid,
    /// Admission time. Fixed with the event id, so a replay lands in the
    /// same partition and conflicts with the first write.
    pub created_at: SystemTime,
    pub request_id: String,
    pub account_id: Uuid,
    pub key_id: Uuid,
    pub tier: String,
    pub model: String,
    pub backend: Option<String>,
    /// The endpoint asked, serialised as the kind of work (`chat`, …).
    pub kind: Endpoint,
    pub status: Status,
    /// The billed figures (see `usage_source`).
    pub tokens: Tokens,
    /// Tollgate's own prompt count, `None` when counting is off.
    pub counted_prompt_tokens: Option<u64>,
    /// Tollgate's count of the generated text, when the backend reported no
    /// usage (it is not counted otherwise).
    pub counted_completion_tokens: Option<u64>,
    pub usage_source: UsageSource,
    /// What `units` count. Events spooled or journaled before unit kinds
    /// existed were all tokens.
    #[serde(default)]
    pub unit_kind: UnitKind,
    /// What the account is charged, in `unit_kind`.
    pub units: u64,
    pub latency_ms: u32,
    pub ttft_ms: Option<u32>,
}
