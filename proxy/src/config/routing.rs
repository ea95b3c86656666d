//! `[routing]`: how a backend is chosen among those serving a model (the
//! policy, built by [`RoutingPolicy::build`]) and when its circuit breaker
//! opens.

use std::time::Duration;

use serde::Deserialize;
use tollgate_backends::balance::RoutingPolicy;

use super::{ConfigError, HumanDuration, defaults, invalid};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    #[serde(default)]
    policy: RoutingPolicy,
    session_header: Option<String>,
    breaker_failures: Option<u32>,
    breaker_open: Option<HumanDuration>,
}

/// `[routing]`: how a backend is chosen among those serving a model.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub policy: RoutingPolicy,
    /// The request header whose value keeps a session on one backend
    /// (`session_affinity` only).
    pub session_header: String,
    /// Consecutive failures (5xx, resets, timeouts) that open a backend's
    /// circuit breaker; a refused connection opens it at once.
    pub breaker_failures: u32,
    /// How long an open breaker passes the backend over before one probe.
    pub breaker_open: Duration,
}

pub(super) fn validate(r: RawRouting) -> Result<RoutingConfig, ConfigError> {
    let session_header = r
        .session_header
        .unwrap_or_else(|| defaults::SESSION_HEADER.to_owned())
        .to_ascii_lowercase();
    if http::HeaderName::from_bytes(session_header.as_bytes()).is_err() {
        return Err(invalid(
            "routing.session_header",
            "is not a valid header name",
        ));
    }
    let breaker_failures = r.breaker_failures.unwrap_or(defaults::BREAKER_FAILURES);
    if breaker_failures == 0 {
        return Err(invalid("routing.breaker_failures", "must be at least 1"));
    }
    Ok(RoutingConfig {
        policy: r.policy,
        session_header,
        breaker_failures,
        breaker_open: HumanDuration::or(r.breaker_open, defaults::BREAKER_OPEN),
    })
}
