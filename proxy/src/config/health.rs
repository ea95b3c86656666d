//! `[health]`: active probes of every plain-http backend; the defaults are
//! [`ProbeConfig::DEFAULT`], where the probing lives.

use serde::Deserialize;
use tollgate_backends::health::ProbeConfig;

use super::{ConfigError, HumanDuration, invalid};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    interval: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    healthy_after: Option<u32>,
    unhealthy_after: Option<u32>,
    grace: Option<HumanDuration>,
}

pub(super) fn validate(h: RawHealth) -> Result<ProbeConfig, ConfigError> {
    let default = ProbeConfig::DEFAULT;
    let config = ProbeConfig {
        interval: HumanDuration::or(h.interval, default.interval),
        timeout: HumanDuration::or(h.timeout, default.timeout),
        healthy_after: h.healthy_after.unwrap_or(default.healthy_after),
        unhealthy_after: h.unhealthy_after.unwrap_or(default.unhealthy_after),
        grace: HumanDuration::or(h.grace, default.grace),
    };
    if config.interval.is_zero() || config.timeout.is_zero() {
        return Err(invalid(
            "health.interval / health.timeout",
            "must be longer than zero",
        ));
    }
    if config.healthy_after == 0 || config.unhealthy_after == 0 {
        return Err(invalid(
            "health.healthy_after / health.unhealthy_after",
            "must be at least 1",
        ));
    }
    Ok(config)
}
