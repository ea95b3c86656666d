//! The gateway's side of billing, none of it on the inference request path:
//! the usage exporter run on a timer in `serve` (and once by `tollgate
//! billing export`) with its metrics; Stripe's webhook deliveries and the
//! past-due sweep, with the fan-out of tier changes; Checkout and Customer
//! Portal sessions; and the `tollgate billing sync-catalog|reconcile`
//! commands over the config.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_billing::StripeClient;
use tollgate_billing::catalog::{Catalog, CatalogTier, Overage, SyncReport, sync_catalog};
use tollgate_billing::checkout::{
    CheckoutUrls, SessionError, TierPrices, checkout_session, portal_session,
};
use tollgate_billing::export::{ExportConfig, ExportReport, export_once};
use tollgate_billing::reconcile::{Day, MeterSummaries, Reconciliation, reconcile};
use tollgate_billing::stripe_api::{StripeMeterEvents, StripeMeterSummaries, client};
use tollgate_billing::webhook::{
    Event, HANDLED_EVENT_TYPES, Plans, TierChange, WebhookSecrets, apply, downgrade_past_due,
};

use uuid::Uuid;

use crate::config::{BillingConfig, Config, StripeConfig};
use crate::error::ApiError;
use crate::keys::cache::KeyCache;
use crate::keys::revocation;

/// The exporter's settings from `[billing]`.
pub fn export_config(billing: &BillingConfig) -> ExportConfig {
    ExportConfig::new(billing.meter_event_name.clone(), billing.bucket)
}

/// A client of the configured Stripe (`STRIPE_SECRET_KEY`, `STRIPE_API_BASE`).
fn stripe_client(stripe: &StripeConfig) -> anyhow::Result<StripeClient> {
    client(stripe.secret_key.expose(), stripe.api_base.as_deref())
}

/// Meter events through the configured Stripe.
pub fn meter_events(stripe: &StripeConfig) -> anyhow::Result<StripeMeterEvents> {
    Ok(StripeMeterEvents::new(stripe_client(stripe)?))
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
                })
            })
            .collect(),
    }
}

/// `tollgate billing sync-catalog`: the catalog created or updated in Stripe.
pub async fn sync_catalog_now(
    config: &Config,
    stripe: &StripeConfig,
) -> anyhow::Result<SyncReport> {
    sync_catalog(&stripe_client(stripe)?, &catalog(config)).await
}

/// `tollgate billing reconcile`: the usage log against the exports and, with
/// `STRIPE_SECRET_KEY` set, Stripe's meter event summaries.
pub async fn reconcile_now(
    pool: &Pool,
    config: &Config,
    from: Day,
    to: Day,
) -> anyhow::Result<Reconciliation> {
    let summaries = match &config.billing.stripe {
        Some(stripe) => Some(StripeMeterSummaries::new(stripe_client(stripe)?)),
        None => None,
    };
    reconcile(
        pool,
        &export_config(&config.billing),
        from,
        to,
        SystemTime::now(),
        summaries.as_ref().map(|s| s as &dyn MeterSummaries),
    )
    .await
}

/// One export pass now: plans every closed bucket and sends what is pending.
pub async fn export_now(
    pool: &Pool,
    billing: &BillingConfig,
    stripe: &StripeConfig,
) -> anyhow::Result<ExportReport> {
    export_once(
        pool,
        &export_config(billing),
        &meter_events(stripe)?,
        SystemTime::now(),
    )
    .await
}

/// Exports every `export_interval`. Several instances may run it: planning
/// takes an advisory lock and each row is leased while it is sent.
pub struct UsageExporter {
    pub pool: Pool,
    pub billing: BillingConfig,
    pub stripe: StripeConfig,
}

#[async_trait]
impl BackgroundService for UsageExporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let events = match meter_events(&self.stripe) {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "usage export disabled: the Stripe client cannot be built");
                return;
            }
        };
        // Registered here, where the exporter runs: only `serve` runs it.
        let metrics = match ExportMetrics::new(prometheus::default_registry()) {
            Ok(metrics) => Some(metrics),
            Err(e) => {
                tracing::error!(error = %e, "usage export metrics not registered");
                None
            }
        };
        let config = export_config(&self.billing);
        let mut ticks = tokio::time::interval(self.billing.export_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            match export_once(&self.pool, &config, &events, SystemTime::now()).await {
                Ok(report) => {
                    if let Some(metrics) = &metrics {
                        metrics.count(&report);
                    }
                    if report != ExportReport::default() {
                        tracing::info!(?report, "usage exported to Stripe");
                    }
                }
                Err(e) => {
                    if let Some(metrics) = &metrics {
                        metrics.pass_failed();
                    }
                    tracing::warn!(error = %e, "usage export pass failed; next pass retries");
                }
            }
            if let Some(metrics) = &metrics {
                metrics
                    .read_pending(&self.pool, &config.meter_event_name)
                    .await;
            }
        }
    }
}

/// The usage exporter's metrics: what became of each meter event, and the
/// rows still waiting to be sent.
struct ExportMetrics {
    /// Meter events by outcome (see [`EXPORT_OUTCOMES`]).
    events: IntCounterVec,
    /// Export passes that ended in an error (Postgres or the planner).
    failed_passes: prometheus::IntCounter,
    pending: IntGauge,
    oldest_pending: Gauge,
}

/// The `outcome` label of `tollgate_stripe_export_events_total`, one per
/// [`ExportReport`] field: `delivered` (sent), `duplicate` (Stripe already had
/// it), `failed` (retryable, still pending), `rejected` (refused for good),
/// `expired` (unconfirmed past Stripe's identifier window).
const EXPORT_OUTCOMES: [&str; 5] = ["delivered", "duplicate", "failed", "rejected", "expired"];

impl ExportMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "tollgate_stripe_export_events_total",
                "Usage meter events the exporter handled, by outcome (delivered, duplicate, \
                 failed: left pending for a retry, rejected, expired).",
            ),
            &["outcome"],
        )?;
        // Every series from 0, so that `increase` sees the first failure.
        for outcome in EXPORT_OUTCOMES {
            events.with_label_values(&[outcome]);
        }
        let failed_passes = prometheus::IntCounter::new(
            "tollgate_stripe_export_pass_errors_total",
            "Usage export passes that failed before sending (Postgres unreachable, planning failed).",
        )?;
        let pending = IntGauge::new(
            "tollgate_stripe_export_pending_events",
            "Usage meter events planned and not yet sent to Stripe, after the last pass.",
        )?;
        let oldest_pending = Gauge::new(
            "tollgate_stripe_export_oldest_pending_seconds",
            "Age of the oldest meter event still waiting to be sent (0 when none), after the last pass.",
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(failed_passes.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(oldest_pending.clone()))?;
        Ok(Self {
            events,
            failed_passes,
            pending,
            oldest_pending,
        })
    }

    fn count(&self, report: &ExportReport) {
        let by_outcome = [
            report.sent,
            report.duplicates,
            report.retry_later,
            report.rejected,
            report.expired,
        ];
        for (outcome, n) in EXPORT_OUTCOMES.into_iter().zip(by_outcome) {
            self.events.with_label_values(&[outcome]).inc_by(n);
        }
    }

    fn pass_failed(&self) {
        self.failed_passes.inc();
    }

    /// Reads the pending rows' count and oldest age (the partial index on
    /// pending rows keeps it cheap); left as they were when Postgres fails.
    async fn read_pending(&self, pool: &Pool, meter: &str) {
        let row = match pool.get().await {
            Ok(client) => {
                client
                    .query_one(
                        "SELECT count(*), \
                                coalesce(extract(epoch FROM now() - min(planned_at))::float8, 0) \
                         FROM billing_usage_exports WHERE state = 'pending' AND meter = $1",
                        &[&meter],
                    )
                    .await
            }
            Err(e) => {
                tracing::debug!(error = %e, "pending usage exports not read");
                return;
            }
        };
        match row {
            Ok(row) => {
                self.pending.set(row.get(0));
                self.oldest_pending.set(row.get(1));
            }
            Err(e) => tracing::debug!(error = %e, "pending usage exports not read"),
        }
    }
}

/// `POST /stripe/webhook` on the public listener: verified, applied once,
/// and a tier change fanned out to every instance's key cache.
pub struct StripeWebhooks {
    pub secrets: WebhookSecrets,
    pub plans: Plans,
    /// For the fan-out; without Redis only this instance's cache is dropped
    /// at once, and the others' within their TTL.
    pub redis_url: Option<String>,
    deliveries: IntCounterVec,
}

impl StripeWebhooks {
    /// `None` when billing or its webhook secret is not configured.
    pub fn from_config(config: &Config, registry: &Registry) -> anyhow::Result<Option<Self>> {
        let Some(secrets) = config
            .billing
            .stripe
            .as_ref()
            .and_then(|s| s.webhook_secrets.as_ref())
        else {
            return Ok(None);
        };
        let secrets = WebhookSecrets::from_list(secrets.expose())
            .map_err(|e| anyhow::anyhow!("STRIPE_WEBHOOK_SECRET: {e}"))?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                "tollgate_stripe_webhooks_total",
                "Stripe webhook deliveries, by event type (those Tollgate handles, else `other`; \
                 `unverified` when refused before reading) and outcome (applied, duplicate, \
                 ignored, refused, failed).",
            ),
            &["type", "outcome"],
        )?;
        registry.register(Box::new(deliveries.clone()))?;
        Ok(Some(Self {
            secrets,
            plans: plans(config),
            redis_url: config.redis_url.as_ref().map(|u| u.expose().to_owned()),
            deliveries,
        }))
    }

    /// The answer to one delivery: 400 for a bad signature or body (nothing
    /// changes), 500 when a redelivery could succeed (Stripe retries), else 200.
    pub async fn handle(
        &self,
        pool: &Pool,
        keys: &KeyCache,
        signature: Option<&str>,
        body: &[u8],
    ) -> (u16, Value) {
        let refused = |outcome: &str, message: String| {
            self.deliveries
                .with_label_values(&["unverified", outcome])
                .inc();
            (
                400,
                json!({"error": {"message": message, "type": "invalid_request_error"}}),
            )
        };
        let verified = match self.secrets.verify(signature, body, SystemTime::now()) {
            Ok(verified) => verified,
            Err(e) => return refused("refused", e.to_string()),
        };
        let event = match Event::parse(verified.body()) {
            Ok(event) => event,
            Err(e) => return refused("refused", e.to_string()),
        };
        let event_type = if HANDLED_EVENT_TYPES.contains(&event.event_type.as_str()) {
            event.event_type.as_str()
        } else {
            "other"
        };
        match apply(pool, &event, &self.plans, SystemTime::now()).await {
            Ok(applied) => {
                let outcome = if applied.duplicate {
                    "duplicate"
                } else if applied.ignored {
                    "ignored"
                } else {
                    "applied"
                };
                self.deliveries
                    .with_label_values(&[event_type, outcome])
                    .inc();
                log_tier_changes(&applied.tier_changes, &event.id);
                // A new tier, or a new billing period (its quota counters),
                // must reach every instance's cached keys.
                if !applied.tier_changes.is_empty() || !applied.period_changes.is_empty() {
                    announce_account_change(keys, self.redis_url.as_deref()).await;
                }
                (200, json!({"received": true}))
            }
            Err(e) => {
                self.deliveries
                    .with_label_values(&[event_type, "failed"])
                    .inc();
                tracing::warn!(event = event.id, error = %e, "stripe event not applied");
                let status = if e.is_retryable() { 500 } else { 200 };
                (
                    status,
                    json!({"received": status == 200, "error": e.to_string()}),
                )
            }
        }
    }
}

fn log_tier_changes(changes: &[TierChange], cause: &str) {
    for change in changes {
        tracing::info!(account = %change.account_id, from = change.from, to = change.to, cause, "tier changed by billing");
    }
}

/// Drops this instance's cached keys and, through Redis, every other
/// instance's, so an account's new tier or billing period applies within
/// seconds.
async fn announce_account_change(keys: &KeyCache, redis_url: Option<&str>) {
    keys.invalidate_all();
    if let Some(url) = redis_url {
        revocation::publish_account_change(url).await;
    }
}

/// How often subscriptions unpaid past the grace are looked for: every
/// minute, or a tenth of a grace shorter than ten minutes.
fn past_due_sweep_interval(grace: Duration) -> Duration {
    (grace / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Downgrades accounts whose subscription stayed unpaid past
/// `[billing] grace_days`: webhooks apply the grace only to accounts an
/// event touches, and after a failed payment Stripe may send nothing more.
/// Runs wherever webhooks are received; sweeps on several instances at once
/// are safe (the accounts are locked and the change is idempotent).
pub struct PastDueSweep {
    pub pool: Pool,
    pub plans: Plans,
    pub keys: KeyCache,
    pub redis_url: Option<String>,
}

#[async_trait]
impl BackgroundService for PastDueSweep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticks = tokio::time::interval(past_due_sweep_interval(self.plans.grace()));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            match downgrade_past_due(&self.pool, &self.plans, SystemTime::now()).await {
                Ok(changes) if changes.is_empty() => {}
                Ok(changes) => {
                    log_tier_changes(&changes, "payment overdue past the grace");
                    announce_account_change(&self.keys, self.redis_url.as_deref()).await;
                }
                Err(e) => tracing::warn!(error = %e, "past-due sweep failed; the next one retries"),
            }
        }
    }
}

/// Checkout and Customer Portal sessions: `POST /v1/billing/checkout|portal`
/// for the caller's account, the admin API and `tollgate billing checkout`
/// for any. Each call asks Stripe; none changes a tier (webhooks do).
pub struct BillingSessions {
    pool: Pool,
    stripe: StripeClient,
    /// The tiers that can be bought, by name.
    tiers: HashMap<String, TierPrices>,
    success_url: Option<String>,
    cancel_url: Option<String>,
    portal_return_url: Option<String>,
}

/// `{"tier", "success_url"?, "cancel_url"?}`: the URLs default to `[billing]`'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    pub tier: String,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
}

/// `{"return_url"?}`, defaulting to `[billing] portal_return_url`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    pub return_url: Option<String>,
}

impl BillingSessions {
    /// `None` when billing is off (no `STRIPE_SECRET_KEY`).
    pub fn from_config(config: &Config, pool: Pool) -> anyhow::Result<Option<Self>> {
        let Some(stripe) = &config.billing.stripe else {
            return Ok(None);
        };
        let tiers = config
            .tiers
            .iter()
            .filter_map(|t| {
                Some((
                    t.name.clone(),
                    TierPrices {
                        tier: t.name.clone(),
                        price_lookup_key: t.stripe_price_lookup_key.clone()?,
                        overage_lookup_key: t.stripe_overage_lookup_key.clone(),
                    },
                ))
            })
            .collect();
        Ok(Some(Self {
            pool,
            stripe: stripe_client(stripe)?,
            tiers,
            success_url: config.billing.success_url.clone(),
            cancel_url: config.billing.cancel_url.clone(),
            portal_return_url: config.billing.portal_return_url.clone(),
        }))
    }

    /// The account named `name`, for the admin API and the CLI.
    pub async fn account_id(&self, name: &str) -> Result<Uuid, ApiError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|_| ApiError::DatabaseUnavailable)?;
        client
            .query_opt("SELECT id FROM accounts WHERE name = $1", &[&name])
            .await
            .map_err(|_| ApiError::DatabaseUnavailable)?
            .map(|row| row.get(0))
            .ok_or_else(|| ApiError::NotFound(format!("no account `{name}`")))
    }

    /// A Checkout Session from a JSON [`CheckoutRequest`].
    pub async fn checkout_json(&self, account_id: Uuid, body: &[u8]) -> Result<Value, ApiError> {
        self.checkout(account_id, parse_body(body)?).await
    }

    /// A Customer Portal session from a JSON [`PortalRequest`] (or an empty body).
    pub async fn portal_json(&self, account_id: Uuid, body: &[u8]) -> Result<Value, ApiError> {
        let request = if body.iter().all(u8::is_ascii_whitespace) {
            PortalRequest::default()
        } else {
            parse_body(body)?
        };
        self.portal(account_id, request).await
    }

    /// A Checkout Session subscribing the account to `body.tier`.
    pub async fn checkout(
        &self,
        account_id: Uuid,
        body: CheckoutRequest,
    ) -> Result<Value, ApiError> {
        let prices = self.tiers.get(&body.tier).ok_or_else(|| {
            let mut buyable: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
            buyable.sort_unstable();
            ApiError::bad_request(
                format!(
                    "Tier `{}` cannot be bought; tiers with a Stripe price: {}.",
                    body.tier,
                    buyable.join(", ")
                ),
                Some("tier"),
            )
        })?;
        let url = |given: Option<String>, default: &Option<String>, param: &'static str| {
            given.or_else(|| default.clone()).ok_or_else(|| {
                ApiError::bad_request(
                    format!(
                        "`{param}` is required: the server sets no default ([billing] {param})."
                    ),
                    Some(param),
                )
            })
        };
        let urls = CheckoutUrls {
            success_url: url(body.success_url, &self.success_url, "success_url")?,
            cancel_url: url(body.cancel_url, &self.cancel_url, "cancel_url")?,
        };
        let session = checkout_session(&self.pool, &self.stripe, account_id, prices, &urls)
            .await
            .map_err(session_error)?;
        Ok(json!({
            "object": "billing.checkout_session",
            "id": session.id,
            "url": session.url,
            "tier": prices.tier,
        }))
    }

    /// A Customer Portal session for the account's Stripe customer.
    pub async fn portal(&self, account_id: Uuid, body: PortalRequest) -> Result<Value, ApiError> {
        let return_url = body.return_url.or_else(|| self.portal_return_url.clone());
        let session = portal_session(&self.pool, &self.stripe, account_id, return_url.as_deref())
            .await
            .map_err(session_error)?;
        Ok(json!({
            "object": "billing.portal_session",
            "id": session.id,
            "url": session.url,
        }))
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}"), None))
}

fn session_error(error: SessionError) -> ApiError {
    match error {
        SessionError::AlreadySubscribed { .. } | SessionError::NoCustomer => {
            ApiError::Conflict(error.to_string())
        }
        SessionError::Refused { message, param } => {
            let param = ["success_url", "cancel_url", "return_url"]
                .into_iter()
                .find(|p| param.as_deref() == Some(*p));
            ApiError::bad_request(format!("Stripe refused it: {message}"), param)
        }
        // Stripe's own error text names keys and request logs: the
        // operator's log has it; the caller learns only that it failed.
        SessionError::PriceMissing(_) | SessionError::Stripe(_) => {
            tracing::warn!(error = %error, "billing session not created");
            ApiError::BillingUnavailable(
                "Stripe could not create the session; try again shortly.".to_owned(),
            )
        }
        SessionError::Database(_) | SessionError::Pool(_) => {
            tracing::warn!(error = %error, "billing session not created");
            ApiError::DatabaseUnavailable
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_report_fields_count_under_their_outcomes() {
        let registry = Registry::new();
        let metrics = ExportMetrics::new(&registry).unwrap();
        // Every outcome is exported from 0 before the first pass.
        assert!(
            EXPORT_OUTCOMES
                .iter()
                .all(|o| metrics.events.with_label_values(&[*o]).get() == 0)
        );
        metrics.count(&ExportReport {
            planned: 9,
            sent: 5,
            duplicates: 1,
            retry_later: 2,
            rejected: 3,
            expired: 4,
        });
        let count = |outcome: &str| metrics.events.with_label_values(&[outcome]).get();
        assert_eq!(
            EXPORT_OUTCOMES.map(count),
            [5, 1, 2, 3, 4],
            "{EXPORT_OUTCOMES:?}"
        );
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "tollgate_stripe_export_events_total",
                "tollgate_stripe_export_oldest_pending_seconds",
                "tollgate_stripe_export_pass_errors_total",
                "tollgate_stripe_export_pending_events",
            ]
        );
    }
}
