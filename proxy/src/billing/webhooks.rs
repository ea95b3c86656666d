//! Stripe's webhook deliveries, verified and applied once, and the sweep
//! that downgrades subscriptions unpaid past the grace; both fan a tier
//! change out to every instance's key cache.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{IntCounterVec, Opts, Registry};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tollgate_billing::webhook::{
    Event, HANDLED_EVENT_TYPES, Plans, TierChange, WebhookSecrets, apply, downgrade_past_due,
};
use tollgate_metering::metric_names;

use super::plans;
use crate::config::Config;
use crate::keys::cache::KeyCache;
use crate::keys::revocation;

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
        let secrets = WebhookSecrets::from_list(secrets.expose_secret())
            .map_err(|e| anyhow::anyhow!("STRIPE_WEBHOOK_SECRET: {e}"))?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                metric_names::STRIPE_WEBHOOKS_TOTAL,
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
            redis_url: config
                .redis_url
                .as_ref()
                .map(|u| u.expose_secret().to_owned()),
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
