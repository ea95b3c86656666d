//! Reading usage back: totals over a period, live statistics, and one
//! account's raw events.
//!
//! Totals and statistics read the rollups, whose primary keys start with
//! `(account_id, bucket)`: whole days from `usage_rollup_day`, the partial
//! days at a period's edges and the last minute from `usage_rollup_minute`.
//! A period's usage is a few index range scans however large the raw log
//! grows; the resolution is one minute (`from` is rounded down to its
//! minute). Only the event listing reads `usage_events`, through
//! `(account_id, created_at)`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use crate::partitions::month_start;
use crate::units::UnitKind;

/// The id of the account called `name`.
pub async fn account_id<C: GenericClient>(
    client: &C,
    name: &str,
) -> Result<Option<Uuid>, tokio_postgres::Error> {
    let row = client
        .query_opt("SELECT id FROM accounts WHERE name = $1", &[&name])
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// How totals are broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One row for the whole period.
    Total,
    Model,
    /// UTC calendar day, `YYYY-MM-DD`.
    Day,
    /// API key id.
    Key,
}

impl GroupBy {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "total" => Some(Self::Total),
            "model" => Some(Self::Model),
            "day" => Some(Self::Day),
            "key" => Some(Self::Key),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::Model => "model",
            Self::Day => "day",
            Self::Key => "key",
        }
    }

    /// The SQL expression of the group, over either rollup table.
    fn expression(self) -> &'static str {
        match self {
            Self::Total => "NULL::text",
            Self::Model => "model",
            Self::Day => "to_char(bucket AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            Self::Key => "key_id::text",
        }
    }
}

/// Totals of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageTotals {
    /// The model, day or key id; absent for [`GroupBy::Total`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub requests: i64,
    pub failed_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Units billed in tokens (what `units` meant before other unit kinds).
    pub units: i64,
    /// Units of every kind used, by kind (`tokens` included).
    pub units_by_kind: BTreeMap<UnitKind, i64>,
}

impl UsageTotals {
    fn zero(group: Option<String>) -> Self {
        Self {
            group,
            requests: 0,
            failed_requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            units: 0,
            units_by_kind: BTreeMap::new(),
        }
    }
}

/// Usage totals of `account` (every account when `None`) in `[from, to)`:
/// whole UTC days from the day rollups, the partial days at either edge from
/// the minute rollups.
pub async fn totals<C: GenericClient>(
    client: &C,
    account: Option<Uuid>,
    from: SystemTime,
    to: SystemTime,
    group_by: GroupBy,
) -> Result<Vec<UsageTotals>, tokio_postgres::Error> {
    let (days_from, days_to) = whole_days(from, to);
    let account_filter = if account.is_some() {
        "account_id = $3 AND"
    } else {
        "$3::uuid IS NULL AND"
    };
    let group = group_by.expression();
    let columns = "unit_kind, requests, failed_requests, prompt_tokens, completion_tokens, \
                   total_tokens, units";
    let sql = format!(
        "SELECT grp, unit_kind,
                coalesce(sum(requests), 0)::int8, coalesce(sum(failed_requests), 0)::int8,
                coalesce(sum(prompt_tokens), 0)::int8, coalesce(sum(completion_tokens), 0)::int8,
                coalesce(sum(total_tokens), 0)::int8, coalesce(sum(units), 0)::int8
         FROM (
             SELECT {group} AS grp, {columns} FROM usage_rollup_day
             WHERE {account_filter} bucket >= $4 AND bucket < $5
             UNION ALL
             SELECT {group} AS grp, {columns} FROM usage_rollup_minute
             WHERE {account_filter} bucket >= date_trunc('minute', $1::timestamptz) AND bucket < $4
             UNION ALL
             SELECT {group} AS grp, {columns} FROM usage_rollup_minute
             WHERE {account_filter} bucket >= $5 AND bucket < $2
         ) AS periods
         GROUP BY grp, unit_kind ORDER BY grp"
    );
    let statement = client.prepare_cached(&sql).await?;
    let rows = client
        .query(&statement, &[&from, &to, &account, &days_from, &days_to])
        .await?;
    // One row per group and unit kind, in group order: folded to one per group.
    let mut totals: Vec<UsageTotals> = Vec::new();
    for row in &rows {
        let group: Option<String> = row.get(0);
        let kind = row.get::<_, &str>(1).parse().unwrap_or_default();
        let units: i64 = row.get(7);
        let same_group = totals.last().is_some_and(|last| last.group == group);
        if !same_group {
            totals.push(UsageTotals::zero(group));
        }
        let Some(total) = totals.last_mut() else {
            continue;
        };
        total.requests += row.get::<_, i64>(2);
        total.failed_requests += row.get::<_, i64>(3);
        total.prompt_tokens += row.get::<_, i64>(4);
        total.completion_tokens += row.get::<_, i64>(5);
        total.total_tokens += row.get::<_, i64>(6);
        if kind == UnitKind::Tokens {
            total.units += units;
        }
        *total.units_by_kind.entry(kind).or_default() += units;
    }
    if totals.is_empty() && group_by == GroupBy::Total {
        // A period with no usage still has a total: zero.
        totals.push(UsageTotals::zero(None));
    }
    Ok(totals)
}

/// The whole UTC days inside `[from, to)` as `[first, end)`; an empty range
/// at `to` when there is none (then the minute rollups cover everything).
fn whole_days(from: SystemTime, to: SystemTime) -> (SystemTime, SystemTime) {
    const DAY: u64 = 86_400;
    let unix = |at: SystemTime| at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let at = |seconds: u64| UNIX_EPOCH + Duration::from_secs(seconds);
    let (from, to_unix) = (unix(from), unix(to));
    let first = from.div_ceil(DAY) * DAY;
    let end = to_unix / DAY * DAY;
    if first < end {
        (at(first), at(end))
    } else {
        (to, to)
    }
}

/// The classic "how busy are we" figures, from rollups.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveStats {
    /// Requests in the last 60 seconds.
    pub requests_per_minute: f64,
    /// Tokens in the last 60 seconds.
    pub tokens_per_minute: f64,
    /// Token units used by every account in the current UTC month.
    pub units_this_month: i64,
    /// Units of every kind used in the current UTC month, by kind.
    pub units_this_month_by_kind: BTreeMap<UnitKind, i64>,
    pub requests_this_month: i64,
}

/// Live statistics. The last 60 seconds are the current minute bucket plus
/// the previous one weighted by how much of it falls inside the window (the
/// sliding-window estimate), since rollups have minute resolution.
pub async fn live_stats<C: GenericClient>(client: &C) -> Result<LiveStats, tokio_postgres::Error> {
    // Plain bounds: `now()` is stable within a statement, and the month's
    // start comes as a parameter (date_trunc with a time zone would be
    // evaluated once per row). The month reads the all-accounts day totals:
    // at most 31 rows, where the per-account day rollups hold tens of thousands.
    let month_start = month_start(SystemTime::now());
    let row = client
        .query_one(
            "SELECT recent.requests, recent.tokens, month.requests
             FROM (SELECT coalesce(sum(requests * w), 0)::float8 AS requests,
                          coalesce(sum(total_tokens * w), 0)::float8 AS tokens
                   FROM (SELECT requests, total_tokens,
                                CASE WHEN bucket = date_trunc('minute', now()) THEN 1.0
                                     ELSE 1.0 - extract(epoch FROM now() - date_trunc('minute', now())) / 60.0
                                END AS w
                         FROM usage_rollup_minute
                         WHERE bucket >= date_trunc('minute', now()) - interval '1 minute') AS weighted
                  ) AS recent,
                  (SELECT coalesce(sum(requests), 0)::int8 AS requests
                   FROM usage_rollup_total_day
                   WHERE bucket >= $1) AS month",
            &[&month_start],
        )
        .await?;
    let units_this_month_by_kind: BTreeMap<UnitKind, i64> = client
        .query(
            "SELECT unit_kind, sum(units)::int8 FROM usage_rollup_total_day
             WHERE bucket >= $1 GROUP BY unit_kind",
            &[&month_start],
        )
        .await?
        .iter()
        .map(|row| {
            (
                row.get::<_, &str>(0).parse().unwrap_or_default(),
                row.get(1),
            )
        })
        .collect();
    Ok(LiveStats {
        requests_per_minute: row.get(0),
        tokens_per_minute: row.get(1),
        units_this_month: units_this_month_by_kind
            .get(&UnitKind::Tokens)
            .copied()
            .unwrap_or(0),
        units_this_month_by_kind,
        requests_this_month: row.get(2),
    })
}

/// One stored usage event, as listed for an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    pub event_id: Uuid,
    /// Unix milliseconds.
    pub created_at: i64,
    pub request_id: String,
    pub key_id: Uuid,
    pub model: String,
    pub backend: Option<String>,
    pub kind: String,
    pub status: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub counted_prompt_tokens: Option<i64>,
    pub counted_completion_tokens: Option<i64>,
    pub usage_source: String,
    pub unit_kind: String,
    pub units: i64,
    pub latency_ms: i32,
    pub ttft_ms: Option<i32>,
}

/// The per-account raw-log query: newest first, at most `limit`.
pub const ACCOUNT_EVENTS: &str = "
    SELECT event_id, (extract(epoch FROM created_at) * 1000)::int8, request_id, key_id, model,
           backend, kind, status, prompt_tokens, completion_tokens, total_tokens,
           counted_prompt_tokens, counted_completion_tokens, usage_source, units,
           latency_ms, ttft_ms, unit_kind
    FROM usage_events
    WHERE account_id = $1 AND created_at >= $2 AND created_at < $3
    ORDER BY created_at DESC
    LIMIT $4";

/// One account's events in `[from, to)`, newest first.
pub async fn account_events<C: GenericClient>(
    client: &C,
    account: Uuid,
    from: SystemTime,
    to: SystemTime,
    limit: i64,
) -> Result<Vec<StoredEvent>, tokio_postgres::Error> {
    let statement = client.prepare_cached(ACCOUNT_EVENTS).await?;
    let rows = client
        .query(&statement, &[&account, &from, &to, &limit])
        .await?;
    Ok(rows
        .iter()
        .map(|row| StoredEvent {
            event_id: row.get(0),
            created_at: row.get(1),
            request_id: row.get(2),
            key_id: row.get(3),
            model: row.get(4),
            backend: row.get(5),
            kind: row.get(6),
            status: row.get(7),
            prompt_tokens: row.get(8),
            completion_tokens: row.get(9),
            total_tokens: row.get(10),
            counted_prompt_tokens: row.get(11),
            counted_completion_tokens: row.get(12),
            usage_source: row.get(13),
            unit_kind: row.get(17),
            units: row.get(14),
            latency_ms: row.get(15),
            ttft_ms: row.get(16),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn whole_days_are_the_full_utc_days_inside_the_period() {
        let day = 86_400;
        // 1.5 days from mid-day: one whole day.
        assert_eq!(whole_days(at(day / 2), at(2 * day)), (at(day), at(2 * day)));
        // Aligned on both ends: all of it.
        assert_eq!(whole_days(at(day), at(3 * day)), (at(day), at(3 * day)));
        // Inside one day, or across midnight without a whole day: none.
        assert_eq!(whole_days(at(10), at(20)), (at(20), at(20)));
        assert_eq!(
            whole_days(at(day - 10), at(day + 10)),
            (at(day + 10), at(day + 10))
        );
    }
}
