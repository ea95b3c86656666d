//! The gateway's side of billing: the usage exporter run on a timer in
//! `serve` (and once by `tollgate billing export`), and Stripe's webhook
//! deliveries. Nothing here is on the inference request path.

use std::time::SystemTime;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{IntCounterVec, Opts, Registry};
use serde_json::{Value, json};
use tollgate_billing::export::{ExportConfig, ExportReport, export_once};
use tollgate_billing::stripe_api::{StripeMeterEvents, client};
use tollgate_billing::webhook::{Event, Plans, WebhookSecrets, apply};

use crate::config::{BillingConfig, Config, StripeConfig};
use crate::keys::cache::KeyCache;
use crate::keys::revocation;

/// The exporter's settings from `[billing]`.
pub fn export_config(billing: &BillingConfig) -> ExportConfig {
    ExportConfig::new(billing.meter_event_name.clone(), billing.bucket)
}

/// Meter events through the configured Stripe.
pub fn meter_events(stripe: &StripeConfig) -> anyhow::Result<StripeMeterEvents> {
    Ok(StripeMeterEvents::new(client(
        stripe.secret_key.expose(),
        stripe.api_base.as_deref(),
    )?))
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
        let config = export_config(&self.billing);
        let mut ticks = tokio::time::interval(self.billing.export_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            match export_once(&self.pool, &config, &events, SystemTime::now()).await {
                Ok(report) if report == ExportReport::default() => {}
                Ok(report) => tracing::info!(?report, "usage exported to Stripe"),
                Err(e) => tracing::warn!(error = %e, "usage export pass failed; next pass retries"),
            }
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
                "Stripe webhook deliveries, by outcome (applied, duplicate, ignored, refused, failed).",
            ),
            &["outcome"],
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
            self.deliveries.with_label_values(&[outcome]).inc();
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
        match apply(pool, &event, &self.plans, SystemTime::now()).await {
            Ok(applied) => {
                let outcome = if applied.duplicate {
                    "duplicate"
                } else if applied.ignored {
                    "ignored"
                } else {
                    "applied"
                };
                self.deliveries.with_label_values(&[outcome]).inc();
                for change in &applied.tier_changes {
                    tracing::info!(account = %change.account_id, from = change.from, to = change.to, event = event.id, "tier changed by Stripe");
                }
                if !applied.tier_changes.is_empty() {
                    keys.invalidate_all();
                    if let Some(url) = &self.redis_url {
                        revocation::publish_account_change(url).await;
                    }
                }
                (200, json!({"received": true}))
            }
            Err(e) => {
                self.deliveries.with_label_values(&["failed"]).inc();
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
