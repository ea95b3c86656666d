//! Period counters from the usage log: at start-up and every
//! `admission.reconcile_interval`, each account's `used` units this month and
//! today are raised to what the usage log's day rollups hold. A Redis flush,
//! a restart of a single instance, or a settlement lost while Redis was down
//! therefore never grants free usage for longer than one interval.
//!
//! Counters are only raised, never lowered: events settle in the limiter
//! before the writer stores them, so the log may briefly trail the limiter.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use uuid::Uuid;

use super::limiter::Limiter;
use super::periods;

/// Bound on one reconciliation's query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

const PERIOD_UNITS: &str = "\
    SELECT account_id, \
           SUM(units)::bigint, \
           COALESCE(SUM(units) FILTER (WHERE bucket >= $2), 0)::bigint \
    FROM usage_rollup_day WHERE bucket >= $1 GROUP BY account_id";

/// Raises every account's period counters to the usage log's totals;
/// returns how many accounts it set.
pub async fn reconcile_once(pool: &Pool, limiter: &Limiter) -> anyhow::Result<usize> {
    let now = SystemTime::now();
    let (month_start, day_start) = periods::starts(now);
    let period = periods::periods(now);
    let rows = tokio::time::timeout(QUERY_TIMEOUT, async {
        let client = pool.get().await?;
        anyhow::Ok(
            client
                .query(PERIOD_UNITS, &[&month_start, &day_start])
                .await?,
        )
    })
    .await
    .map_err(|_| anyhow::anyhow!("usage query timed out"))??;
    for row in &rows {
        let account: Uuid = row.get(0);
        let units = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        limiter
            .reconcile(account, &period, units(1), units(2))
            .await?;
    }
    Ok(rows.len())
}

/// Background service: [`reconcile_once`] at start-up and on an interval.
pub struct PeriodReconciler {
    pub pool: Pool,
    pub admission: Arc<super::Admission>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for PeriodReconciler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticks = tokio::time::interval(self.interval);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            match reconcile_once(&self.pool, self.admission.limiter()).await {
                Ok(accounts) => tracing::debug!(accounts, "period counters reconciled"),
                Err(e) => tracing::warn!("period counters not reconciled: {e}"),
            }
        }
    }
}
