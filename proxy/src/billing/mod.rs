//! The gateway's side of billing, none of it on the inference request path
//! (the Stripe calls and the usage-log logic live in `tollgate-billing`):
//! - [`export`]: the usage exporter, run on a timer in `serve`, and its metrics;
//! - [`webhooks`]: Stripe's webhook deliveries and the past-due sweep, with
//!   the fan-out of tier changes to every instance's key cache;
//! - [`sessions`]: Checkout and Customer Portal sessions;
//! - [`commands`]: `tollgate billing export|sync-catalog|reconcile`.
//!
//! Here: what the config sells, and how Stripe is reached.

pub mod commands;
pub mod export;
pub mod sessions;
pub mod webhooks;

use secrecy::ExposeSecret;
use tollgate_billing::StripeClient;
use tollgate_billing::catalog::{Catalog, CatalogTier, Overage, UnitOverage};
use tollgate_billing::stripe_api::client;
use tollgate_billing::webhook::Plans;

use crate::config::{Config, StripeConfig};

pub use self::commands::{export_now, reconcile_now, sync_catalog_now};
pub use self::export::UsageExporter;
pub use self::sessions::{BillingSessions, CheckoutRequest, PortalRequest};
pub use self::webhooks::{PastDueSweep, StripeWebhooks};

/// A client of the configured Stripe (`STRIPE_SECRET_KEY`, `STRIPE_API_BASE`).
pub(crate) fn stripe_client(stripe: &StripeConfig) -> anyhow::Result<StripeClient> {
    client(
        stripe.secret_key.expose_secret(),
        stripe.api_base.as_deref(),
    )
}

/// What `[[tiers]]` sell in Stripe: the paid tiers' prices and the meter.
pub fn catalog(config: &Config) -> Catalog {
    Catalog {
        meter_event_name: config.billing.meter_event_name.clone(),
        currency: "usd".to_owned(),
        tiers: config
            .tiers
            .iter()
            .filter_map(|t| {
                Some(CatalogTier {
                    name: t.name.clone(),
                    price_lookup_key: t.stripe_price_lookup_key.clone()?,
                    monthly_price_cents: (t.monthly_price * 100.0).round() as i64,
                    included_units: t.included_units.unwrap_or(0),
                    overage: t
                        .stripe_overage_lookup_key
                        .clone()
                        .map(|lookup_key| Overage {
                            lookup_key,
                            // Config requires overage_price with this lookup key.
                            usd_per_unit: t.overage_price.unwrap_or(0.0),
                        }),
                    // Config requires a meter for every kind sold this way.
                    unit_overages: t
                        .unit_quotas
                        .iter()
                        .filter_map(|(kind, quota)| {
                            Some(UnitOverage {
                                meter_event_name: config.billing.unit_meters.get(kind)?.clone(),
                                included_units: quota.included.unwrap_or(0),
                                overage: Overage {
                                    lookup_key: quota.stripe_overage_lookup_key.clone()?,
                                    usd_per_unit: quota.overage_price.unwrap_or(0.0),
                                },
                            })
                        })
                        .collect(),
                })
            })
            .collect(),
    }
}

/// Price lookup keys → tiers, from `[[tiers]]`; the free tier is the lowest
/// priority tier without a price.
pub fn plans(config: &Config) -> Plans {
    let free = config
        .tiers
        .iter()
        .filter(|t| !t.is_paid())
        .min_by_key(|t| t.priority)
        .or_else(|| config.tiers.iter().min_by_key(|t| t.priority))
        .map(|t| t.name.clone())
        .unwrap_or_default();
    Plans::new(
        free,
        config
            .tiers
            .iter()
            .filter_map(|t| Some((t.stripe_price_lookup_key.clone()?, t.name.clone()))),
    )
    .with_grace(config.billing.grace)
}
