//! Month partitions of `usage_events`: created ahead of time, and dropped
//! whole by retention.
//!
//! Partitions are UTC calendar months (`usage_events_2026_11`). Tollgate keeps
//! the current month and the next [`MONTHS_AHEAD`] created (checked at start-up
//! and hourly), and the writer creates a missing one on demand, for instance
//! when a spool written long ago is replayed. Their bounds are kept in
//! `usage_partitions` (see `sql/V2__usage_events.sql`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{GenericClient, Pool};
use time::{Date, Month, OffsetDateTime};

/// Months created beyond the current one: a month boundary never finds its
/// partition missing even if Tollgate was down for weeks around it.
pub const MONTHS_AHEAD: i32 = 2;
/// Rows deleted per statement inside the boundary partition of a purge, so a
/// purge never holds long locks or one huge transaction.
const PURGE_BATCH_ROWS: i64 = 10_000;

/// Months since January 1970 (UTC) of `at`: the cache key of a partition.
pub fn month_index(at: SystemTime) -> i64 {
    let date = utc_date(at);
    (i64::from(date.year()) - 1970) * 12 + i64::from(u8::from(date.month())) - 1
}

/// The first instant of the UTC month containing `at`.
pub fn month_start(at: SystemTime) -> SystemTime {
    let date = utc_date(at);
    first_of(date.year(), date.month())
}

/// The first instant of the UTC month after the one containing `at`.
pub fn next_month_start(at: SystemTime) -> SystemTime {
    let date = utc_date(at);
    let year = match date.month() {
        Month::December => date.year() + 1,
        _ => date.year(),
    };
    first_of(year, date.month().next())
}

/// The UTC calendar date of `at`. Times outside the years -9999 to 9999
/// (which `time` represents, and no usage event is dated in) count as the
/// nearest day it does.
pub fn utc_date(at: SystemTime) -> Date {
    let seconds = match at.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    match OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(at) => at.date(),
        Err(_) if seconds < 0 => Date::MIN,
        Err(_) => Date::MAX,
    }
}

/// Midnight UTC on the first of `month` in `year` (past the last month
/// `time` represents: the last of its days).
fn first_of(year: i32, month: Month) -> SystemTime {
    Date::from_calendar_date(year, month, 1)
        .unwrap_or(Date::MAX)
        .midnight()
        .assume_utc()
        .into()
}

/// Creates the partition for the month containing `at`, if missing.
pub async fn ensure<C: GenericClient>(
    client: &C,
    at: SystemTime,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT usage_ensure_partition($1)", &[&at])
        .await
        .map(drop)
}

/// Creates this month's partition and the next [`MONTHS_AHEAD`]; returns their names.
pub async fn ensure_ahead<C: GenericClient>(
    client: &C,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT usage_ensure_partition(now() + make_interval(months => m))
             FROM generate_series(0, $1) AS m",
            &[&MONTHS_AHEAD],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// What a purge removed.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Purged {
    /// Whole partitions dropped.
    pub partitions: Vec<String>,
    /// Rows deleted one batch at a time from the partition holding the cutoff.
    pub rows: u64,
}

/// Removes usage events created before `before`: partitions that end at or
/// before it are dropped whole; inside the partition holding the cutoff, rows
/// are deleted in bounded batches. Rollups are left alone (their own retention).
pub async fn purge(pool: &Pool, before: SystemTime) -> Result<Purged, PurgeError> {
    let client = pool.get().await?;
    let whole = client
        .query(
            "SELECT name FROM usage_partitions WHERE ends_at <= $1 ORDER BY starts_at",
            &[&before],
        )
        .await?;
    let mut purged = Purged::default();
    for row in whole {
        let name: String = row.get(0);
        // Drop and forget in one transaction, so the two never disagree.
        client.batch_execute("BEGIN").await?;
        let dropped = async {
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", quote_ident(&name)))
                .await?;
            client
                .execute("DELETE FROM usage_partitions WHERE name = $1", &[&name])
                .await
        }
        .await;
        match dropped {
            Ok(_) => client.batch_execute("COMMIT").await?,
            Err(error) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(error.into());
            }
        }
        purged.partitions.push(name);
    }
    let boundary = client
        .query_opt(
            "SELECT name FROM usage_partitions WHERE starts_at < $1 AND ends_at > $1",
            &[&before],
        )
        .await?;
    if let Some(row) = boundary {
        let name = quote_ident(&row.get::<_, String>(0));
        purged.rows = delete_in_batches(&client, &name, "created_at", before).await?;
    }
    Ok(purged)
}

/// Deletes rollup rows older than their retention, in bounded batches:
/// minute rows after `minute_retention`, day rows after `day_retention`.
pub async fn purge_rollups(
    pool: &Pool,
    minute_retention: Duration,
    day_retention: Duration,
) -> Result<u64, PurgeError> {
    let client = pool.get().await?;
    let now = SystemTime::now();
    let mut total = 0;
    for (table, retention) in [
        ("usage_rollup_minute", minute_retention),
        ("usage_rollup_day", day_retention),
        ("usage_rollup_total_day", day_retention),
    ] {
        total += delete_in_batches(&client, table, "bucket", now - retention).await?;
    }
    Ok(total)
}

/// Deletes the rows of `table` whose `column` is before `cutoff`, at most
/// [`PURGE_BATCH_ROWS`] per statement; returns how many.
async fn delete_in_batches<C: GenericClient>(
    client: &C,
    table: &str,
    column: &str,
    cutoff: SystemTime,
) -> Result<u64, tokio_postgres::Error> {
    let delete = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
    );
    let mut total = 0;
    loop {
        let deleted = client
            .execute(&delete, &[&cutoff, &PURGE_BATCH_ROWS])
            .await?;
        total += deleted;
        if deleted < PURGE_BATCH_ROWS as u64 {
            return Ok(total);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("no Postgres connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("Postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn month_index_follows_utc_calendar_months() {
        assert_eq!(month_index(at(0)), 0);
        // 2026-11-30T23:59:59Z and 2026-12-01T00:00:00Z.
        assert_eq!(month_index(at(1_796_083_199)), (2026 - 1970) * 12 + 10);
        assert_eq!(month_index(at(1_796_083_200)), (2026 - 1970) * 12 + 11);
        // 2028-02-29 (leap day) is February.
        assert_eq!(month_index(at(1_835_395_200)), (2028 - 1970) * 12 + 1);
    }

    #[test]
    fn month_start_is_the_first_at_midnight_utc() {
        assert_eq!(month_start(at(1_796_083_199)), at(1_793_491_200)); // 2026-11-01
        assert_eq!(month_start(at(1_796_083_200)), at(1_796_083_200)); // 2026-12-01
        assert_eq!(month_start(at(1_835_395_200)), at(1_832_976_000)); // 2028-02-01
        assert_eq!(month_start(at(0)), at(0));
    }

    #[test]
    fn next_month_start_crosses_years_and_leap_days() {
        // 2026-12-15 → 2027-01-01; 2028-02-29 → 2028-03-01.
        assert_eq!(next_month_start(at(1_797_292_800)), at(1_798_761_600));
        assert_eq!(next_month_start(at(1_835_395_200)), at(1_835_481_600));
        // The last second of November 2026 → 2026-12-01.
        assert_eq!(next_month_start(at(1_796_083_199)), at(1_796_083_200));
    }
}
