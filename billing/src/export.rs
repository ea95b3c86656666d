//! Usage export: billable units per customer and closed bucket (an hour by
//! default), sent to Stripe as one meter event each, exactly once in effect.
//!
//! Two steps, each safe to repeat and to run on several instances at once:
//!
//! 1. **Plan** ([`plan`]), under a transaction-scoped advisory lock so only
//!    one instance plans at a time: for every closed bucket, the units in the
//!    usage log's minute rollups beyond what is already planned become a
//!    `pending` row of `billing_usage_exports`, inserted in the transaction
//!    that read them. Usage that arrives after its bucket was planned (a
//!    spool replayed after an outage) becomes a further row, `seq` 1, 2, …,
//!    so nothing is planned twice and nothing is left out.
//! 2. **Send** ([`send_pending`]): each pending row is leased (so two senders
//!    do not send it at once), sent with a deterministic `identifier`
//!    (`{account}:{meter}:{bucket}[:{seq}]`, also the Idempotency-Key) and a
//!    timestamp inside its bucket, then marked `sent`. If the process dies
//!    after Stripe accepted but before the mark, the row is sent again and
//!    Stripe answers that the identifier exists: that counts as delivered.
//!    Stripe remembers identifiers for about a day, so a row whose first
//!    attempt is older than `resend_window` is never sent again but marked
//!    `expired`, for reconciliation to report.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;

/// Key of the advisory lock planners take (any constant unique to Tollgate).
const PLAN_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

/// How the exporter works, for one meter: one unit kind's usage goes to
/// one Billing Meter, so a deployment selling tokens and images runs one
/// export per kind, each exactly once on its own.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The Billing Meter's `event_name`.
    pub meter_event_name: String,
    /// The unit kind whose usage the meter counts (the rollups' `unit_kind`).
    pub unit_kind: String,
    /// The export bucket (`bucket_secs`).
    pub bucket: Duration,
    /// A bucket is planned this long after it ended: the usage writer batches
    /// and may spool, so the last events of a bucket land a little later.
    pub settle: Duration,
    /// How far back buckets are planned. Stripe takes meter events up to 35
    /// days old.
    pub lookback: Duration,
    /// No row is sent again once its first attempt is older than this:
    /// Stripe's identifier deduplication lasts about a day.
    pub resend_window: Duration,
    /// How long a sender holds a row it is sending.
    pub lease: Duration,
    /// Bound on one call to Stripe.
    pub timeout: Duration,
    /// Attempts per row and pass, with doubling backoff from `backoff`.
    pub attempts: u32,
    pub backoff: Duration,
}

impl ExportConfig {
    /// The export of token units to `meter_event_name`.
    pub fn new(meter_event_name: impl Into<String>, bucket: Duration) -> Self {
        Self {
            meter_event_name: meter_event_name.into(),
            unit_kind: "tokens".to_owned(),
            bucket,
            settle: Duration::from_secs(120),
            lookback: Duration::from_secs(30 * 86_400),
            resend_window: Duration::from_secs(23 * 3600),
            lease: Duration::from_secs(60),
            timeout: Duration::from_secs(20),
            attempts: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// One meter event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub stripe_customer_id: String,
    pub value: u64,
    /// Unix seconds, inside the bucket.
    pub timestamp: i64,
}

/// How sending one meter event ended, when not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Stripe already has an event with this identifier: it was delivered
    /// before (the answer was lost, or the sender died before recording it).
    #[error("an event with this identifier already exists")]
    Duplicate,
    /// 429, 5xx, a timeout or a broken connection: try again later.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Refused for good (a bad customer id, a timestamp out of range).
    #[error("rejected: {0}")]
    Rejected(String),
}

/// Where meter events go: Stripe ([`crate::stripe_api::StripeMeterEvents`]).
#[async_trait]
pub trait MeterEvents: Send + Sync {
    async fn send(&self, event: &MeterEvent) -> Result<(), SendError>;
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExportReport {
    pub planned: u64,
    pub sent: u64,
    /// Stripe already had them: delivered by an earlier attempt.
    pub duplicates: u64,
    /// Still pending after this pass's attempts.
    pub retry_later: u64,
    pub rejected: u64,
    pub expired: u64,
}

impl std::ops::AddAssign for ExportReport {
    fn add_assign(&mut self, other: Self) {
        self.planned += other.planned;
        self.sent += other.sent;
        self.duplicates += other.duplicates;
        self.retry_later += other.retry_later;
        self.rejected += other.rejected;
        self.expired += other.expired;
    }
}

fn unix(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Plans every closed bucket's unplanned units as pending rows. Returns how
/// many rows it planned; 0 when another instance holds the planning lock.
pub async fn plan(pool: &Pool, config: &ExportConfig, now: SystemTime) -> anyhow::Result<u64> {
    let bucket_secs = config.bucket.as_secs().max(1) as f64;
    let closed = unix(now) - config.settle.as_secs_f64();
    // The end of the last closed bucket, aligned to the bucket size.
    let until = (closed / bucket_secs).floor() * bucket_secs;
    let from = ((until - config.lookback.as_secs_f64()) / bucket_secs).floor() * bucket_secs;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PLAN_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(0);
    }
    let params: [&(dyn ToSql + Sync); 5] = [
        &config.meter_event_name,
        &bucket_secs,
        &from,
        &until,
        &config.unit_kind,
    ];
    let planned = tx
        .execute(
            "WITH usage AS (
                 SELECT account_id,
                        date_bin($2 * interval '1 second', bucket, TIMESTAMPTZ 'epoch') AS bucket_start,
                        sum(units)::bigint AS units
                 FROM usage_rollup_minute
                 WHERE bucket >= to_timestamp($3) AND bucket < to_timestamp($4)
                   AND unit_kind = $5
                 GROUP BY 1, 2
             ),
             planned AS (
                 SELECT account_id, bucket_start, sum(units)::bigint AS units, max(seq) AS seq
                 FROM billing_usage_exports
                 WHERE meter = $1 AND bucket_start >= to_timestamp($3)
                 GROUP BY 1, 2
             )
             INSERT INTO billing_usage_exports
                 (account_id, meter, bucket_start, seq, units, stripe_customer_id, identifier)
             SELECT u.account_id, $1, u.bucket_start, coalesce(p.seq + 1, 0),
                    u.units - coalesce(p.units, 0), c.stripe_customer_id,
                    u.account_id::text || ':' || $1 || ':'
                        || extract(epoch FROM u.bucket_start)::bigint::text
                        || CASE WHEN p.seq IS NULL THEN '' ELSE ':' || (p.seq + 1)::text END
             FROM usage u
             JOIN billing_customers c USING (account_id)
             LEFT JOIN planned p USING (account_id, bucket_start)
             WHERE u.units > coalesce(p.units, 0)",
            &params,
        )
        .await?;
    tx.commit().await?;
    Ok(planned)
}

/// Sends every pending row once (with up to `attempts` tries each); rows
/// still failing stay pending for the next pass.
pub async fn send_pending(
    pool: &Pool,
    config: &ExportConfig,
    events: &dyn MeterEvents,
) -> anyhow::Result<ExportReport> {
    let mut report = ExportReport::default();
    let client = pool.get().await?;
    let lease = config.lease.as_secs_f64();
    let window = config.resend_window.as_secs_f64();
    // Rows already tried in this pass are skipped (their lease holds them
    // until the next one), so a pass ends.
    loop {
        // Take one row: past the resend window it expires instead.
        let row = client
            .query_opt(
                "UPDATE billing_usage_exports SET
                     leased_until = now() + $1 * interval '1 second',
                     attempts = attempts + 1,
                     first_attempt_at = coalesce(first_attempt_at, now()),
                     state = CASE WHEN first_attempt_at < now() - $2 * interval '1 second'
                                  THEN 'expired' ELSE state END
                 WHERE identifier = (
                     SELECT identifier FROM billing_usage_exports
                     WHERE state = 'pending' AND meter = $3
                       AND (leased_until IS NULL OR leased_until < now())
                     ORDER BY bucket_start, seq
                     LIMIT 1
                     FOR UPDATE SKIP LOCKED)
                 RETURNING identifier, stripe_customer_id, units,
                           extract(epoch FROM bucket_start)::bigint, state",
                &[&lease, &window, &config.meter_event_name],
            )
            .await?;
        let Some(row) = row else {
            return Ok(report);
        };
        let state: String = row.get(4);
        let identifier: String = row.get(0);
        if state == "expired" {
            tracing::error!(
                identifier,
                "usage export not confirmed within Stripe's identifier window; left to reconciliation"
            );
            report.expired += 1;
            continue;
        }
        let units: i64 = row.get(2);
        let event = MeterEvent {
            identifier: identifier.clone(),
            event_name: config.meter_event_name.clone(),
            stripe_customer_id: row.get(1),
            value: u64::try_from(units).unwrap_or(0),
            timestamp: row.get(3),
        };
        match send_with_retries(config, events, &event).await {
            Ok(duplicate) => {
                client
                    .execute(
                        "UPDATE billing_usage_exports
                         SET state = 'sent', sent_at = now(), leased_until = NULL, last_error = NULL
                         WHERE identifier = $1",
                        &[&identifier],
                    )
                    .await?;
                if duplicate {
                    report.duplicates += 1;
                } else {
                    report.sent += 1;
                }
            }
            Err(error) => {
                let rejected = matches!(error, SendError::Rejected(_));
                tracing::warn!(identifier, %error, "usage export not delivered");
                client
                    .execute(
                        "UPDATE billing_usage_exports SET last_error = $2 WHERE identifier = $1",
                        &[&identifier, &error.to_string()],
                    )
                    .await?;
                if rejected {
                    report.rejected += 1;
                } else {
                    report.retry_later += 1;
                }
            }
        }
    }
}

/// `Ok(true)`: Stripe already had it.
async fn send_with_retries(
    config: &ExportConfig,
    events: &dyn MeterEvents,
    event: &MeterEvent,
) -> Result<bool, SendError> {
    let mut backoff = config.backoff;
    let mut attempt = 1;
    loop {
        let outcome = match tokio::time::timeout(config.timeout, events.send(event)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(SendError::Retryable("timed out".to_owned())),
        };
        match outcome {
            Ok(()) => return Ok(false),
            Err(SendError::Duplicate) => return Ok(true),
            Err(SendError::Retryable(_)) if attempt < config.attempts => {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// One pass: plan, then send.
pub async fn export_once(
    pool: &Pool,
    config: &ExportConfig,
    events: &dyn MeterEvents,
    now: SystemTime,
) -> anyhow::Result<ExportReport> {
    let planned = plan(pool, config, now).await?;
    let mut report = send_pending(pool, config, events).await?;
    report.planned = planned;
    Ok(report)
}
