//! `[fleet]`: the lifecycle controller's thresholds and timing. Defaults are
//! [`FleetPolicy::default`], where the policy lives; the durations that were
//! once whole seconds (`idle_stop_secs`, …) are read under those old names
//! too ([`super::renamed`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;
use tollgate_backends::fleet::controller::ControllerTiming;
use tollgate_backends::fleet::policy::FleetPolicy;

use super::{ConfigError, HumanDuration, TierConfig, defaults, invalid, renamed};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    min_hot: Option<u32>,
    max_hot: Option<u32>,
    resume_queue_depth: Option<usize>,
    create_queue_depth: Option<usize>,
    scale_in_queue_depth: Option<usize>,
    idle_stop: Option<HumanDuration>,
    warm_release: Option<HumanDuration>,
    scale_in_after: Option<HumanDuration>,
    wake_standby_wait: Option<BTreeMap<String, HumanDuration>>,
    rent_overflow_wait: Option<BTreeMap<String, HumanDuration>>,
    failed_retry: Option<HumanDuration>,
    start_timeout: Option<HumanDuration>,
    interval: Option<HumanDuration>,
    drain_timeout: Option<HumanDuration>,
    // Deprecated spellings in whole seconds, read as the keys above.
    idle_stop_secs: Option<u64>,
    warm_release_secs: Option<u64>,
    scale_in_after_secs: Option<u64>,
    wake_standby_wait_secs: Option<BTreeMap<String, u64>>,
    rent_overflow_wait_secs: Option<BTreeMap<String, u64>>,
    failed_retry_secs: Option<u64>,
    start_timeout_secs: Option<u64>,
    drain_timeout_secs: Option<u64>,
}

/// `[fleet]`: the lifecycle controller's thresholds and timing.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub policy: FleetPolicy,
    pub timing: ControllerTiming,
}

/// `fleet.{key}`, or its deprecated `fleet.{key}_secs`, else `default`.
fn seconds(
    key: &str,
    value: Option<HumanDuration>,
    old: Option<u64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let (value, _) = renamed(
        format!("fleet.{key}"),
        value.map(|d| d.0),
        format!("fleet.{key}_secs"),
        old.map(Duration::from_secs),
    )?;
    Ok(value.unwrap_or(default))
}

/// A per-tier table of waits. One given must name configured tiers; the
/// defaults apply to the tiers of those names that exist.
fn waits(
    key: &str,
    value: Option<BTreeMap<String, HumanDuration>>,
    old: Option<BTreeMap<String, u64>>,
    default: &HashMap<String, Duration>,
    tiers: &[TierConfig],
) -> Result<HashMap<String, Duration>, ConfigError> {
    let configured = |tier: &str| tiers.iter().any(|t| t.name == tier);
    let (table, key) = renamed(
        format!("fleet.{key}"),
        value.map(|t| t.into_iter().map(|(tier, d)| (tier, d.0)).collect()),
        format!("fleet.{key}_secs"),
        old.map(|t| {
            t.into_iter()
                .map(|(tier, s)| (tier, Duration::from_secs(s)))
                .collect::<BTreeMap<_, _>>()
        }),
    )?;
    match table {
        None => Ok(default
            .iter()
            .filter(|(tier, _)| configured(tier))
            .map(|(tier, wait)| (tier.clone(), *wait))
            .collect()),
        Some(table) => table
            .into_iter()
            .map(|(tier, wait)| {
                if configured(&tier) {
                    Ok((tier, wait))
                } else {
                    Err(invalid(
                        &key,
                        format!("names tier `{tier}`, which is not configured"),
                    ))
                }
            })
            .collect(),
    }
}

pub(super) fn validate(f: RawFleet, tiers: &[TierConfig]) -> Result<FleetConfig, ConfigError> {
    let default = FleetPolicy::default();
    let policy = FleetPolicy {
        min_hot: f.min_hot.unwrap_or(default.min_hot),
        max_hot: f.max_hot.unwrap_or(default.max_hot),
        idle_stop: seconds(
            "idle_stop",
            f.idle_stop,
            f.idle_stop_secs,
            default.idle_stop,
        )?,
        warm_release: seconds(
            "warm_release",
            f.warm_release,
            f.warm_release_secs,
            default.warm_release,
        )?,
        resume_queue_depth: f.resume_queue_depth.unwrap_or(default.resume_queue_depth),
        create_queue_depth: f.create_queue_depth.unwrap_or(default.create_queue_depth),
        scale_in_queue_depth: f
            .scale_in_queue_depth
            .unwrap_or(default.scale_in_queue_depth),
        scale_in_after: seconds(
            "scale_in_after",
            f.scale_in_after,
            f.scale_in_after_secs,
            default.scale_in_after,
        )?,
        wake_standby_wait: waits(
            "wake_standby_wait",
            f.wake_standby_wait,
            f.wake_standby_wait_secs,
            &default.wake_standby_wait,
            tiers,
        )?,
        rent_overflow_wait: waits(
            "rent_overflow_wait",
            f.rent_overflow_wait,
            f.rent_overflow_wait_secs,
            &default.rent_overflow_wait,
            tiers,
        )?,
        failed_retry: seconds(
            "failed_retry",
            f.failed_retry,
            f.failed_retry_secs,
            default.failed_retry,
        )?,
        start_timeout: seconds(
            "start_timeout",
            f.start_timeout,
            f.start_timeout_secs,
            default.start_timeout,
        )?,
    };
    if policy.max_hot == 0 || policy.min_hot > policy.max_hot {
        return Err(invalid(
            "fleet.max_hot",
            "must be at least 1 and at least min_hot",
        ));
    }
    if policy.create_queue_depth < policy.resume_queue_depth
        || policy.scale_in_queue_depth > policy.resume_queue_depth
    {
        return Err(invalid(
            "fleet.scale_in_queue_depth",
            "needs scale_in_queue_depth <= resume_queue_depth <= create_queue_depth, or the fleet would flap",
        ));
    }
    let timing = ControllerTiming {
        interval: HumanDuration::or(f.interval, defaults::FLEET_INTERVAL),
        // A woken instance is probed this often: the cold-start wait is its
        // start-up time plus at most this.
        poll: Duration::from_millis(250),
        drain_timeout: seconds(
            "drain_timeout",
            f.drain_timeout,
            f.drain_timeout_secs,
            defaults::FLEET_DRAIN_TIMEOUT,
        )?,
    };
    if timing.interval.is_zero() {
        return Err(invalid("fleet.interval", "must be more than zero"));
    }
    Ok(FleetConfig { policy, timing })
}
