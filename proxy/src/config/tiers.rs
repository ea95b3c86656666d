//! `[[tiers]]`: each tier's place in the queue, its limits, its quota and
//! its prices. A tier's waits were once fractional seconds
//! (`max_queue_wait_secs = 30`); those keys are still read
//! ([`super::renamed`]).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use tollgate_metering::units::UnitKind;

use super::{ConfigError, HumanDuration, Name, defaults, invalid, renamed};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTier {
    name: Name,
    priority: Option<i64>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    key_requests_per_minute: Option<u64>,
    key_tokens_per_minute: Option<u64>,
    max_concurrent: Option<u64>,
    max_queue_wait: Option<HumanDuration>,
    max_expected_wait: Option<HumanDuration>,
    /// Deprecated: `max_queue_wait`.
    max_queue_wait_secs: Option<f64>,
    /// Deprecated: `max_expected_wait`.
    max_expected_wait_secs: Option<f64>,
    included_units: Option<u64>,
    daily_cap: Option<u64>,
    hard_cap: Option<bool>,
    overage_price: Option<f64>,
    monthly_price: Option<f64>,
    on_redis_down: Option<RedisDownPolicy>,
    stripe_price_lookup_key: Option<String>,
    stripe_overage_lookup_key: Option<String>,
    tokens_per_unit: Option<u64>,
    job_max_wait: Option<HumanDuration>,
    result_retention: Option<HumanDuration>,
    /// Quotas in units other than tokens (`[tiers.units.images]`).
    #[serde(default)]
    units: BTreeMap<UnitKind, RawUnitQuota>,
}

/// `[tiers.units.<kind>]`: the quota and overage of one unit kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnitQuota {
    included: Option<u64>,
    daily_cap: Option<u64>,
    hard_cap: Option<bool>,
    overage_price: Option<f64>,
    stripe_overage_lookup_key: Option<String>,
}

/// A tier's quota in a unit kind other than tokens (the token quota is the
/// tier's own `included_units`, `daily_cap`, `hard_cap`, `overage_price`).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitQuota {
    /// Units included per billing period.
    pub included: Option<u64>,
    /// Units per UTC day, always a hard limit.
    pub daily_cap: Option<u64>,
    /// Refuse requests once `included` are spent; otherwise bill overage.
    pub hard_cap: bool,
    /// USD per unit past `included`.
    pub overage_price: Option<f64>,
    /// Lookup key of the metered overage price on the kind's meter
    /// (`billing.unit_meters`); `None` for tokens, whose key is the tier's.
    pub stripe_overage_lookup_key: Option<String>,
}

/// A tier: its place in the queue, its limits and its quota. `None` is unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    /// Checked by [`Name`] when read.
    pub name: String,
    /// Higher is served first.
    pub priority: i64,
    /// Per account.
    pub requests_per_minute: Option<u64>,
    /// Per account: prompt tokens plus `max_tokens`, corrected after the answer.
    pub tokens_per_minute: Option<u64>,
    pub key_requests_per_minute: Option<u64>,
    pub key_tokens_per_minute: Option<u64>,
    /// Requests in progress (queued or forwarded) per account.
    pub max_concurrent: Option<u64>,
    /// The longest a request waits in the queue for a GPU slot.
    pub max_queue_wait: Duration,
    /// A request whose expected wait is longer is refused at once ("server busy").
    pub max_expected_wait: Duration,
    /// Units included per billing period (the subscription's, else the UTC month).
    pub included_units: Option<u64>,
    /// Units per UTC day, always a hard limit.
    pub daily_cap: Option<u64>,
    /// Refuse requests once `included_units` are spent; otherwise bill overage.
    pub hard_cap: bool,
    /// USD per unit past `included_units` (billing reads it).
    pub overage_price: Option<f64>,
    /// USD per month (0 for a free tier).
    pub monthly_price: f64,
    pub on_redis_down: RedisDownPolicy,
    /// Lookup key of the tier's flat monthly Stripe price.
    pub stripe_price_lookup_key: Option<String>,
    /// Lookup key of its metered overage price.
    pub stripe_overage_lookup_key: Option<String>,
    /// Tokens (prompt plus completion) in one unit; each request's units are
    /// rounded up. 1 unless set (here, or per model in `[metering]`).
    pub tokens_per_unit: u64,
    /// Quotas in other unit kinds; a kind not listed is metered, not limited.
    pub unit_quotas: BTreeMap<UnitKind, UnitQuota>,
    /// How long a job may wait for a GPU, from its submission, before it
    /// fails (a closed connection never ends it; this does).
    pub job_max_wait: Duration,
    /// How long a job's result is kept after it finished.
    pub result_retention: Duration,
}

impl TierConfig {
    /// Free tiers (no price at all) fail closed when Redis is down.
    pub fn is_paid(&self) -> bool {
        self.monthly_price > 0.0
            || self.overage_price.is_some_and(|p| p > 0.0)
            || self
                .unit_quotas
                .values()
                .any(|q| q.overage_price.is_some_and(|p| p > 0.0))
    }

    /// The tier's quota in `kind`, `None` when that kind is not limited.
    pub fn quota(&self, kind: UnitKind) -> Option<UnitQuota> {
        if kind != UnitKind::Tokens {
            return self.unit_quotas.get(&kind).cloned();
        }
        Some(UnitQuota {
            included: self.included_units,
            daily_cap: self.daily_cap,
            hard_cap: self.hard_cap,
            overage_price: self.overage_price,
            stripe_overage_lookup_key: None,
        })
    }
}

/// What admission does for a tier while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisDownPolicy {
    /// Admit, enforcing the limits in this process alone (per instance).
    Local,
    /// Refuse with 503 until Redis answers again.
    Reject,
}

/// `tiers[i].{key}`, or its deprecated `tiers[i].{key}_secs`: `Some(None)`
/// when the old spelling holds no number of seconds.
fn wait(
    i: usize,
    key: &str,
    value: Option<HumanDuration>,
    old_secs: Option<f64>,
) -> Result<Option<Duration>, ConfigError> {
    let (value, used) = renamed(
        format!("tiers[{i}].{key}"),
        value.map(|d| Some(d.0)),
        format!("tiers[{i}].{key}_secs"),
        old_secs.map(|s| Duration::try_from_secs_f64(s).ok()),
    )?;
    match value {
        None => Ok(None),
        Some(Some(wait)) => Ok(Some(wait)),
        Some(None) => Err(invalid(used, "must be a number of seconds, 0 or more")),
    }
}

fn check_price(key: String, price: Option<f64>) -> Result<(), ConfigError> {
    match price {
        Some(p) if !p.is_finite() || p < 0.0 => {
            Err(invalid(key, "must be a price in USD, 0 or more"))
        }
        _ => Ok(()),
    }
}

/// A quota's `hard_cap`: unset, it is capped unless it has an overage price.
fn quota_hard_cap(
    key: &dyn Fn(&str) -> String,
    hard_cap: Option<bool>,
    overage_price: Option<f64>,
) -> Result<bool, ConfigError> {
    check_price(key("overage_price"), overage_price)?;
    let hard_cap = hard_cap.unwrap_or(overage_price.is_none());
    if hard_cap && overage_price.is_some() {
        return Err(invalid(
            key("overage_price"),
            "a hard-capped quota has no overage: remove overage_price or set hard_cap = false",
        ));
    }
    Ok(hard_cap)
}

pub(super) fn validate(raw: Vec<RawTier>) -> Result<Vec<TierConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut tiers = Vec::new();
    for (i, tier) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("tiers[{i}].{field}");
        if !seen.insert(tier.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("tier `{}` is defined twice", tier.name),
            ));
        }
        let max_queue_wait = wait(
            i,
            "max_queue_wait",
            tier.max_queue_wait,
            tier.max_queue_wait_secs,
        )?
        .unwrap_or(defaults::MAX_QUEUE_WAIT);
        let max_expected_wait = wait(
            i,
            "max_expected_wait",
            tier.max_expected_wait,
            tier.max_expected_wait_secs,
        )?
        .unwrap_or(max_queue_wait);
        let limits = [
            ("requests_per_minute", tier.requests_per_minute),
            ("tokens_per_minute", tier.tokens_per_minute),
            ("key_requests_per_minute", tier.key_requests_per_minute),
            ("key_tokens_per_minute", tier.key_tokens_per_minute),
            ("max_concurrent", tier.max_concurrent),
        ];
        if let Some((field, _)) = limits.iter().find(|(_, v)| *v == Some(0)) {
            return Err(invalid(
                key(field),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        check_price(key("monthly_price"), tier.monthly_price)?;
        let hard_cap = quota_hard_cap(&key, tier.hard_cap, tier.overage_price)?;
        let mut unit_quotas = BTreeMap::new();
        for (kind, quota) in tier.units {
            let key = |field: &str| format!("tiers[{i}].units.{kind}.{field}");
            if kind == UnitKind::Tokens {
                return Err(invalid(
                    format!("tiers[{i}].units.tokens"),
                    "the token quota is the tier's own included_units, daily_cap, hard_cap and overage_price",
                ));
            }
            let hard_cap = quota_hard_cap(&key, quota.hard_cap, quota.overage_price)?;
            if quota.stripe_overage_lookup_key.is_some() && hard_cap {
                return Err(invalid(
                    key("stripe_overage_lookup_key"),
                    "a metered overage price needs hard_cap = false and an overage_price",
                ));
            }
            unit_quotas.insert(
                kind,
                UnitQuota {
                    included: quota.included,
                    daily_cap: quota.daily_cap,
                    hard_cap,
                    overage_price: quota.overage_price,
                    stripe_overage_lookup_key: quota.stripe_overage_lookup_key,
                },
            );
        }
        let mut config = TierConfig {
            name: tier.name.into_string(),
            // Unset: the tier's place in the list (later tiers first).
            priority: tier.priority.unwrap_or(i as i64),
            requests_per_minute: tier.requests_per_minute,
            tokens_per_minute: tier.tokens_per_minute,
            key_requests_per_minute: tier.key_requests_per_minute,
            key_tokens_per_minute: tier.key_tokens_per_minute,
            max_concurrent: tier.max_concurrent,
            max_queue_wait,
            max_expected_wait,
            included_units: tier.included_units,
            daily_cap: tier.daily_cap,
            hard_cap,
            overage_price: tier.overage_price,
            monthly_price: tier.monthly_price.unwrap_or(0.0),
            on_redis_down: RedisDownPolicy::Local,
            stripe_price_lookup_key: tier.stripe_price_lookup_key,
            stripe_overage_lookup_key: tier.stripe_overage_lookup_key,
            tokens_per_unit: match tier.tokens_per_unit {
                None => 1,
                Some(0) => {
                    return Err(invalid(
                        key("tokens_per_unit"),
                        "must be at least 1 (tokens in one billed unit)",
                    ));
                }
                Some(tokens) => tokens,
            },
            unit_quotas,
            job_max_wait: HumanDuration::or(tier.job_max_wait, defaults::JOB_MAX_WAIT),
            result_retention: HumanDuration::or(tier.result_retention, defaults::RESULT_RETENTION),
        };
        if config.stripe_overage_lookup_key.is_some()
            && (config.hard_cap || config.overage_price.is_none())
        {
            return Err(invalid(
                key("stripe_overage_lookup_key"),
                "a tier with a metered overage price needs hard_cap = false and an overage_price",
            ));
        }
        // Unset: free tiers fail closed, paid ones keep serving.
        config.on_redis_down = tier.on_redis_down.unwrap_or(if config.is_paid() {
            RedisDownPolicy::Local
        } else {
            RedisDownPolicy::Reject
        });
        if let Some(same) = tiers
            .iter()
            .find(|t: &&TierConfig| t.priority == config.priority)
        {
            return Err(invalid(
                key("priority"),
                format!(
                    "tier `{}` has the same priority; give each tier its own place in the queue",
                    same.name
                ),
            ));
        }
        tiers.push(config);
    }
    if tiers.is_empty() {
        return Err(invalid(
            "tiers",
            "define at least one [[tiers]] entry (keys are created on a tier)",
        ));
    }
    Ok(tiers)
}

#[cfg(test)]
mod tests {
    use crate::config::testing::error;

    #[test]
    fn duplicate_names_are_rejected() {
        let err = error("[[tiers]]\nname = \"free\"\n");
        assert!(err.contains("tiers[1].name"), "{err}");
    }

    #[test]
    fn tier_mistakes_name_the_key() {
        let cases = [
            ("requests_per_minute = 0", "tiers[1].requests_per_minute"),
            (
                "overage_price = 0.01\nhard_cap = true",
                "tiers[1].overage_price",
            ),
            ("on_redis_down = \"maybe\"", "tiers[1].on_redis_down"),
            ("max_queue_wait_secs = -1", "tiers[1].max_queue_wait_secs"),
            ("max_queue_wait = \"-1s\"", "tiers[1].max_queue_wait"),
            ("priority = 0", "tiers[1].priority"),
            (
                "[tiers.units.images]\noverage_price = 0.02\nhard_cap = true",
                "tiers[1].units.images.overage_price",
            ),
            (
                "[tiers.units.tokens]\nincluded = 5",
                "tiers[1].units.tokens",
            ),
            ("[tiers.units.pixels]\nincluded = 5", "pixels"),
            ("tokens_per_unit = 0", "tiers[1].tokens_per_unit"),
            (
                "hard_cap = false\nstripe_overage_lookup_key = \"pro_overage\"",
                "tiers[1].stripe_overage_lookup_key",
            ),
        ];
        for (line, key) in cases {
            let err = error(&format!("[[tiers]]\nname = \"pro\"\n{line}\n"));
            assert!(err.contains(key), "{line:?} → {err}");
        }
        let err = error("[[tiers]]\nname = \"Pro\"\n");
        assert!(
            err.contains("tiers[1].name") && err.contains("1-64 characters"),
            "{err}"
        );
    }
}
