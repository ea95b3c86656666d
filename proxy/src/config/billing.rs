//! `[billing]` and the Stripe environment (`STRIPE_SECRET_KEY`,
//! `STRIPE_WEBHOOK_SECRET`, `STRIPE_API_BASE`: secrets stay out of files).

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use tollgate_metering::units::UnitKind;

use super::{ConfigError, Env, HumanDuration, Name, defaults, invalid, renamed};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBilling {
    meter_event_name: Option<Name>,
    #[serde(default)]
    unit_meters: BTreeMap<UnitKind, Name>,
    bucket: Option<HumanDuration>,
    /// Deprecated: `bucket`.
    bucket_secs: Option<u64>,
    grace: Option<HumanDuration>,
    /// Deprecated: `grace` (fractions of a day allowed).
    grace_days: Option<f64>,
    export_interval: Option<HumanDuration>,
    success_url: Option<String>,
    cancel_url: Option<String>,
    portal_return_url: Option<String>,
}

/// `[billing]` and the Stripe environment.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// The Billing Meter's `event_name` token units are sent under.
    pub meter_event_name: String,
    /// The meters of other unit kinds (`unit_meters = { images =
    /// "tollgate_images" }`); a kind not listed is not exported.
    pub unit_meters: BTreeMap<UnitKind, String>,
    /// Usage is exported per account and bucket of this length.
    pub bucket: Duration,
    /// A subscription past due this long is downgraded to the free tier.
    pub grace: Duration,
    /// How often the exporter runs.
    pub export_interval: Duration,
    /// Where Checkout sends the customer after paying, and after giving
    /// up; a checkout request may name its own.
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    /// Where the Customer Portal's "return" link leads.
    pub portal_return_url: Option<String>,
    /// `None` without `STRIPE_SECRET_KEY`: billing is off.
    pub stripe: Option<StripeConfig>,
}

/// How Stripe is reached (environment only: secrets stay out of files).
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// `STRIPE_SECRET_KEY`.
    pub secret_key: SecretString,
    /// `STRIPE_WEBHOOK_SECRET`: one secret, or several comma-separated while
    /// one is rotated out.
    pub webhook_secrets: Option<SecretString>,
    /// `STRIPE_API_BASE`: scheme, host and port of another Stripe (a fake in
    /// tests); Stripe's own when unset.
    pub api_base: Option<String>,
}

/// The longest grace: a quarter of a year unpaid is not a grace period.
const MAX_GRACE: Duration = Duration::from_secs(90 * 86_400);

pub(super) fn validate(b: RawBilling, env: &dyn Env) -> Result<BillingConfig, ConfigError> {
    let (bucket, bucket_key) = renamed(
        "billing.bucket".into(),
        b.bucket.map(|d| d.0),
        "billing.bucket_secs".into(),
        b.bucket_secs.map(Duration::from_secs),
    )?;
    let bucket = bucket.unwrap_or(defaults::BILLING_BUCKET);
    let bucket_secs = bucket.as_secs();
    if bucket.subsec_nanos() != 0
        || !(60..=86_400).contains(&bucket_secs)
        || 86_400 % bucket_secs != 0
    {
        return Err(invalid(
            bucket_key,
            "must divide a day into whole buckets of at least 60 seconds (\"1h\" by default)",
        ));
    }
    // An old `grace_days` that is no number of days (negative, NaN) reads
    // as `Some(None)` and is refused with the range.
    let (grace, grace_key) = renamed(
        "billing.grace".into(),
        b.grace.map(|d| Some(d.0)),
        "billing.grace_days".into(),
        b.grace_days
            .map(|days| Duration::try_from_secs_f64(days * 86_400.0).ok()),
    )?;
    let grace = match grace {
        None => defaults::BILLING_GRACE,
        Some(Some(grace)) if grace <= MAX_GRACE => grace,
        Some(_) => {
            return Err(invalid(
                grace_key,
                "must be between 0 and 90 days (fractions allowed)",
            ));
        }
    };
    let api_base = env.var("STRIPE_API_BASE");
    if let Some(base) = &api_base {
        let uri: Option<http::Uri> = base.parse().ok();
        let plain = uri.as_ref().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some()
                && matches!(u.path(), "" | "/")
        });
        if !plain {
            return Err(invalid(
                "STRIPE_API_BASE",
                "must be a scheme, host and port only, like http://127.0.0.1:12111",
            ));
        }
    }
    let meter_event_name = b
        .meter_event_name
        .map_or_else(|| defaults::METER_EVENT_NAME.to_owned(), Name::into_string);
    let mut unit_meters = BTreeMap::new();
    for (kind, name) in b.unit_meters {
        let key = format!("billing.unit_meters.{kind}");
        if kind == UnitKind::Tokens {
            return Err(invalid(key, "token units go to billing.meter_event_name"));
        }
        let taken = name.as_ref() == meter_event_name
            || unit_meters
                .values()
                .any(|other: &String| other == name.as_ref());
        if taken {
            return Err(invalid(
                key,
                format!("meter `{name}` already counts another unit kind; give each kind its own"),
            ));
        }
        unit_meters.insert(kind, name.into_string());
    }
    Ok(BillingConfig {
        meter_event_name,
        unit_meters,
        bucket,
        grace,
        export_interval: HumanDuration::or(b.export_interval, defaults::BILLING_EXPORT_INTERVAL),
        success_url: b.success_url,
        cancel_url: b.cancel_url,
        portal_return_url: b.portal_return_url,
        stripe: env.var("STRIPE_SECRET_KEY").map(|key| StripeConfig {
            secret_key: SecretString::from(key),
            webhook_secrets: env.var("STRIPE_WEBHOOK_SECRET").map(SecretString::from),
            api_base: api_base.map(|b| b.trim_end_matches('/').to_owned()),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::testing::{MINIMAL, no_env, parse};

    fn billing(lines: &str) -> Result<(Duration, Duration), String> {
        parse(&format!("{MINIMAL}\n[billing]\n{lines}\n"), &no_env())
            .map(|c| (c.billing.bucket, c.billing.grace))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn grace_days_take_fractions_within_bounds() {
        let grace = |value: &str| billing(&format!("grace_days = {value}")).map(|(_, g)| g);
        assert_eq!(grace("3"), Ok(Duration::from_secs(3 * 86_400)));
        assert_eq!(grace("0.5"), Ok(Duration::from_secs(43_200)));
        for bad in ["-1", "91", "nan"] {
            assert!(
                grace(bad).unwrap_err().contains("billing.grace_days"),
                "{bad}"
            );
        }
    }

    #[test]
    fn grace_and_bucket_are_durations_within_bounds() {
        assert_eq!(
            billing("grace = \"12h\"\nbucket = \"15m\""),
            Ok((Duration::from_secs(900), Duration::from_secs(43_200)))
        );
        assert_eq!(
            billing("bucket_secs = 900").map(|(b, _)| b),
            Ok(Duration::from_secs(900))
        );
        for (line, key) in [
            ("grace = \"91d\"", "billing.grace"),
            ("bucket = \"7m\"", "billing.bucket"),
            ("bucket = \"30s\"", "billing.bucket"),
            ("bucket_secs = 7", "billing.bucket_secs"),
            ("grace = \"1d\"\ngrace_days = 1", "billing.grace_days"),
        ] {
            let err = billing(line).unwrap_err();
            assert!(err.contains(key), "{line:?} → {err}");
        }
    }

    #[test]
    fn each_unit_kind_has_a_meter_of_its_own() {
        let meters = |lines: &str| {
            parse(&format!("{MINIMAL}\n[billing]\n{lines}\n"), &no_env())
                .map(|c| c.billing.unit_meters)
                .map_err(|e| e.to_string())
        };
        let images = meters("unit_meters = { images = \"tollgate_images\" }").unwrap();
        assert_eq!(
            images.get(&tollgate_metering::units::UnitKind::Images),
            Some(&"tollgate_images".to_owned())
        );
        for (line, key) in [
            (
                "unit_meters = { tokens = \"t\" }",
                "billing.unit_meters.tokens",
            ),
            (
                "unit_meters = { images = \"tollgate_units\" }",
                "billing.unit_meters.images",
            ),
            (
                "unit_meters = { images = \"m\", characters = \"m\" }",
                "billing.unit_meters",
            ),
        ] {
            let err = meters(line).unwrap_err();
            assert!(err.contains(key), "{line:?} → {err}");
        }
    }
}
