//! `[admission]`: what the tiers' queues and reservations share. The tiers
//! themselves are in [`super::tiers`].

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, HumanDuration, defaults, invalid};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmission {
    default_max_tokens: Option<u64>,
    aging: Option<HumanDuration>,
    reservation_ttl: Option<HumanDuration>,
    reconcile_interval: Option<HumanDuration>,
}

/// `[admission]`: what the tiers share.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    /// Token estimate for the completion when a request sets no `max_tokens`;
    /// also sent upstream as `max_tokens` for hard-capped tiers, so the
    /// reservation bounds what the backend may generate.
    pub default_max_tokens: u64,
    /// A queued request gains one tier rank per `aging` waited (`None`: strict priority).
    pub aging: Option<Duration>,
    /// How long a reservation holds when it is never settled (its instance died).
    pub reservation_ttl: Duration,
    /// How often period counters are raised to the usage log's totals.
    pub reconcile_interval: Duration,
}

pub(super) fn validate(a: RawAdmission) -> Result<AdmissionConfig, ConfigError> {
    let aging = HumanDuration::or(a.aging, defaults::AGING);
    let config = AdmissionConfig {
        default_max_tokens: a.default_max_tokens.unwrap_or(defaults::DEFAULT_MAX_TOKENS),
        aging: (!aging.is_zero()).then_some(aging),
        reservation_ttl: HumanDuration::or(a.reservation_ttl, defaults::RESERVATION_TTL),
        reconcile_interval: HumanDuration::or(a.reconcile_interval, defaults::RECONCILE_INTERVAL),
    };
    if config.default_max_tokens == 0 {
        return Err(invalid(
            "admission.default_max_tokens",
            "must be at least 1",
        ));
    }
    if config.reservation_ttl < Duration::from_secs(60) || config.reconcile_interval.is_zero() {
        return Err(invalid(
            "admission.reservation_ttl / admission.reconcile_interval",
            "reservation_ttl must be at least 60s (longer than any request), reconcile_interval above zero",
        ));
    }
    Ok(config)
}
