//! The usage exporter: closed buckets of the usage log sent to Stripe as
//! meter events on a timer, with metrics on what became of each.

use std::time::SystemTime;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use tollgate_billing::export::{ExportConfig, ExportReport, export_once};
use tollgate_billing::stripe_api::StripeMeterEvents;
use tollgate_metering::metric_names;

use super::stripe_client;
use crate::config::{BillingConfig, StripeConfig};

/// The exporter's settings from `[billing]`: one export per meter, token
/// units first, then each unit kind with a meter of its own.
pub fn export_configs(billing: &BillingConfig) -> Vec<ExportConfig> {
    let tokens = ExportConfig::new(billing.meter_event_name.clone(), billing.bucket);
    let others = billing
        .unit_meters
        .iter()
        .map(|(kind, meter)| ExportConfig {
            unit_kind: kind.as_str().to_owned(),
            ..ExportConfig::new(meter.clone(), billing.bucket)
        });
    std::iter::once(tokens).chain(others).collect()
}

/// Meter events through the configured Stripe.
pub fn meter_events(stripe: &StripeConfig) -> anyhow::Result<StripeMeterEvents> {
    Ok(StripeMeterEvents::new(stripe_client(stripe)?))
}

/// Exports every `export_interval`. Several instances may run it: planning
/// takes an advisory lock and each row is leased while it is sent.
pub struct UsageExporter {
    pub pool: Pool,
    pub billing: BillingConfig,
    pub stripe: StripeConfig,
    pub metrics: ExportMetrics,
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
        let configs = export_configs(&self.billing);
        let mut ticks = tokio::time::interval(self.billing.export_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            for config in &configs {
                match export_once(&self.pool, config, &events, SystemTime::now()).await {
                    Ok(report) => {
                        self.metrics.count(&report);
                        if report != ExportReport::default() {
                            tracing::info!(meter = %config.meter_event_name, ?report, "usage exported to Stripe");
                        }
                    }
                    Err(e) => {
                        self.metrics.pass_failed();
                        tracing::warn!(meter = %config.meter_event_name, error = %e, "usage export pass failed; next pass retries");
                    }
                }
            }
            self.metrics.read_pending(&self.pool).await;
        }
    }
}

/// The usage exporter's metrics: what became of each meter event, and the
/// rows still waiting to be sent. Registered by `serve` whether billing is
/// on or not, so the export alerts and panels read 0, not "No data".
pub struct ExportMetrics {
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
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                metric_names::STRIPE_EXPORT_EVENTS_TOTAL,
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
            metric_names::STRIPE_EXPORT_PASS_ERRORS_TOTAL,
            "Usage export passes that failed before sending (Postgres unreachable, planning failed).",
        )?;
        let pending = IntGauge::new(
            metric_names::STRIPE_EXPORT_PENDING_EVENTS,
            "Usage meter events planned and not yet sent to Stripe, after the last pass.",
        )?;
        let oldest_pending = Gauge::new(
            metric_names::STRIPE_EXPORT_OLDEST_PENDING_SECONDS,
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
    /// Rows waiting to be sent, for every meter.
    async fn read_pending(&self, pool: &Pool) {
        let row = match pool.get().await {
            Ok(client) => {
                client
                    .query_one(
                        "SELECT count(*), \
                                coalesce(extract(epoch FROM now() - min(planned_at))::float8, 0) \
                         FROM billing_usage_exports WHERE state = 'pending'",
                        &[],
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
                metric_names::STRIPE_EXPORT_EVENTS_TOTAL,
                metric_names::STRIPE_EXPORT_OLDEST_PENDING_SECONDS,
                metric_names::STRIPE_EXPORT_PASS_ERRORS_TOTAL,
                metric_names::STRIPE_EXPORT_PENDING_EVENTS,
            ]
        );
    }
}
