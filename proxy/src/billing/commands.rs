//! `tollgate billing …`: one export pass, the catalog synced to Stripe, and
//! the usage log reconciled against the exports and Stripe's summaries.

use std::time::SystemTime;

use deadpool_postgres::Pool;
use tollgate_billing::catalog::{SyncReport, sync_catalog};
use tollgate_billing::export::{ExportReport, export_once};
use tollgate_billing::reconcile::{Day, MeterSummaries, Reconciliation, reconcile};
use tollgate_billing::stripe_api::StripeMeterSummaries;

use super::export::{export_configs, meter_events};
use super::{catalog, stripe_client};
use crate::config::{BillingConfig, Config, StripeConfig};

/// `tollgate billing sync-catalog`: the catalog created or updated in Stripe.
pub async fn sync_catalog_now(
    config: &Config,
    stripe: &StripeConfig,
) -> anyhow::Result<SyncReport> {
    sync_catalog(&stripe_client(stripe)?, &catalog(config)).await
}

/// `tollgate billing reconcile`: the usage log against the exports and, with
/// `STRIPE_SECRET_KEY` set, Stripe's meter event summaries; one
/// reconciliation per meter, with its event name.
pub async fn reconcile_now(
    pool: &Pool,
    config: &Config,
    from: Day,
    to: Day,
) -> anyhow::Result<Vec<(String, Reconciliation)>> {
    let summaries = match &config.billing.stripe {
        Some(stripe) => Some(StripeMeterSummaries::new(stripe_client(stripe)?)),
        None => None,
    };
    let mut reconciliations = Vec::new();
    for export in export_configs(&config.billing) {
        let reconciliation = reconcile(
            pool,
            &export,
            from,
            to,
            SystemTime::now(),
            summaries.as_ref().map(|s| s as &dyn MeterSummaries),
        )
        .await?;
        reconciliations.push((export.meter_event_name, reconciliation));
    }
    Ok(reconciliations)
}

/// One export pass now, for every meter: plans every closed bucket and
/// sends what is pending.
pub async fn export_now(
    pool: &Pool,
    billing: &BillingConfig,
    stripe: &StripeConfig,
) -> anyhow::Result<ExportReport> {
    let events = meter_events(stripe)?;
    let mut total = ExportReport::default();
    for export in export_configs(billing) {
        total += export_once(pool, &export, &events, SystemTime::now()).await?;
    }
    Ok(total)
}
