//! Period counters from the usage log: at start-up and every
//! `admission.reconcile_interval`, each account's `used` units this billing
//! period (its subscription's, else the calendar month) and today, per unit
//! kind, are raised to what the usage log's rollups hold. A Redis flush,
//! a restart of a single instance, or a settlement lost while Redis was down
//! therefore never grants free usage for longer than one interval.
//!
//! Counters are only raised, never lowered: events settle in the limiter
//! before the writer stores them, so the log may briefly trail the limiter.
//!
//! One account's failure (its Redis keys unreadable, a timeout) is counted
//! and logged, and the others are still reconciled: a bad key must not leave
//! every account behind it on free usage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tollgate_metering::units::UnitKind;
use uuid::Uuid;

use super::limiter::Limiter;
use super::periods::{self, BillingPeriod};
use crate::store_errors::{self, PostgresOperation};

/// Bound on one reconciliation's queries.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Units this calendar month and today, per account and unit kind, under
/// its current tier: a paid period that ended this month is not charged to
/// the free tier's month (its units were counted in the period's own counter).
const CALENDAR_UNITS: &str = "\
    SELECT r.account_id, r.unit_kind, \
           SUM(r.units)::bigint, \
           COALESCE(SUM(r.units) FILTER (WHERE r.bucket >= $2), 0)::bigint \
    FROM usage_rollup_day r JOIN accounts a ON a.id = r.account_id AND a.tier = r.tier \
    WHERE r.bucket >= $1 GROUP BY r.account_id, r.unit_kind";

/// The current period of the subscription that grants each account its tier
/// (`accounts.billing_subscription_id`, as in the key lookup).
const BILLING_PERIODS: &str = "\
    SELECT a.id, s.current_period_start, s.current_period_end \
    FROM accounts a JOIN billing_subscriptions s \
      ON s.subscription_id = a.billing_subscription_id AND s.tier = a.tier \
    WHERE s.current_period_start IS NOT NULL";

/// Units since each given start, per unit kind: minute rollups up to the
/// first midnight, day rollups after it (a billing period starts at any
/// time of day).
const UNITS_SINCE: &str = "\
    SELECT p.account_id, u.unit_kind, SUM(u.units)::bigint \
    FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS p(account_id, start, midnight) \
    JOIN LATERAL ( \
        SELECT m.unit_kind, m.units FROM usage_rollup_minute m \
        WHERE m.account_id = p.account_id AND m.bucket >= p.start AND m.bucket < p.midnight \
        UNION ALL \
        SELECT d.unit_kind, d.units FROM usage_rollup_day d \
        WHERE d.account_id = p.account_id AND d.bucket >= p.midnight \
    ) AS u ON true \
    GROUP BY p.account_id, u.unit_kind";

/// What one reconciliation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Accounts' counters set (once per unit kind the account used).
    pub accounts: usize,
    /// Counters that could not be set (each logged).
    pub failed: usize,
}

/// Raises every account's period counters to the usage log's totals.
pub async fn reconcile_once(pool: &Pool, limiter: &Limiter) -> anyhow::Result<Reconciled> {
    let now = SystemTime::now();
    let (month_start, day_start) = periods::starts(now, None);
    // Units per account and unit kind: each kind has its own counters.
    let kind = |row: &tokio_postgres::Row| row.get::<_, &str>(1).parse::<UnitKind>().ok();
    let (calendar, billing, period_units) = tokio::time::timeout(QUERY_TIMEOUT, async {
        let client = pool.get().await?;
        let calendar = client
            .query(CALENDAR_UNITS, &[&month_start, &day_start])
            .await?;
        let mut billing = HashMap::new();
        for row in client.query(BILLING_PERIODS, &[]).await? {
            let period = BillingPeriod {
                start: row.get(1),
                end: row.get(2),
            };
            billing.insert(row.get::<_, Uuid>(0), period);
        }
        let (accounts, starts, midnights): (Vec<Uuid>, Vec<SystemTime>, Vec<SystemTime>) = billing
            .iter()
            .map(|(account, period)| {
                let start = periods::starts(now, Some(*period)).0;
                (*account, start, periods::next_midnight(start))
            })
            .collect();
        let mut period_units: HashMap<(Uuid, UnitKind), i64> = HashMap::new();
        for row in client
            .query(UNITS_SINCE, &[&accounts, &starts, &midnights])
            .await?
        {
            if let Some(kind) = kind(&row) {
                period_units.insert((row.get(0), kind), row.get(2));
            }
        }
        anyhow::Ok((calendar, billing, period_units))
    })
    .await
    .map_err(|_| anyhow::anyhow!("usage query timed out"))
    .and_then(|read| read)
    .inspect_err(|_| store_errors::postgres(PostgresOperation::QuotaReconcile))?;
    let units = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut reconciled = Reconciled::default();
    let mut tally = |account: Uuid, result: Result<(), _>| match result {
        Ok(()) => reconciled.accounts += 1,
        Err(error) => {
            reconciled.failed += 1;
            tracing::warn!(%account, "period counters of this account not reconciled: {error}");
        }
    };
    let mut day_units: HashMap<(Uuid, UnitKind), u64> = HashMap::new();
    for row in &calendar {
        let (account, Some(kind)) = (row.get::<_, Uuid>(0), kind(row)) else {
            continue;
        };
        day_units.insert((account, kind), units(row.get(3)));
        if !billing.contains_key(&account) {
            let result = limiter
                .reconcile(
                    account,
                    &periods::periods(now, None).of_unit(kind),
                    units(row.get(2)),
                    units(row.get(3)),
                )
                .await;
            tally(account, result);
        }
    }
    // A subscriber's kinds with units this period or today; an idle
    // subscriber gets no counters.
    let mut subscribed: Vec<(Uuid, UnitKind)> = period_units
        .keys()
        .chain(
            day_units
                .keys()
                .filter(|(account, _)| billing.contains_key(account)),
        )
        .copied()
        .collect();
    subscribed.sort_unstable();
    subscribed.dedup();
    for (account, kind) in subscribed {
        let Some(period) = billing.get(&account) else {
            continue;
        };
        let result = limiter
            .reconcile(
                account,
                &periods::periods(now, Some(*period)).of_unit(kind),
                units(period_units.get(&(account, kind)).copied().unwrap_or(0)),
                day_units.get(&(account, kind)).copied().unwrap_or(0),
            )
            .await;
        tally(account, result);
    }
    // The local copy has every account's totals (its side never fails).
    limiter.reconciled();
    Ok(reconciled)
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
                Ok(Reconciled { accounts, failed }) => {
                    tracing::debug!(accounts, failed, "period counters reconciled");
                }
                Err(e) => tracing::warn!("period counters not reconciled: {e}"),
            }
        }
    }
}
