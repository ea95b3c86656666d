//! Usage reports over HTTP and the CLI: `GET /v1/usage` (the caller's own
//! account), `GET /admin/usage`, `GET /admin/usage/events`, `GET /admin/stats`
//! and `DELETE /admin/usage`. Query parameters are parsed here once for all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tollgate_metering::partitions::{self, Purged};
use tollgate_metering::report::{self, GroupBy};
use uuid::Uuid;

use crate::error::ApiError;

/// Reports read Postgres; they must not hang when it does.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reports running at once, whoever asks: any key holder may call
/// `/v1/usage`, and the pool's other connections belong to the usage writer
/// and key lookups, which must not wait behind a flood of reports.
static REPORT_SLOTS: Semaphore = Semaphore::const_new(4);
/// Events listed per request at most.
const MAX_EVENTS: i64 = 1000;

/// The parameters of a usage report.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageQuery {
    pub account: Option<String>,
    pub from: SystemTime,
    pub to: SystemTime,
    pub group_by: GroupBy,
    pub limit: i64,
}

impl UsageQuery {
    /// Parses `account`, `from`, `to` (unix seconds or an RFC 3339 date or
    /// time, UTC), `group_by` (total, model, day, key) and `limit`. The period
    /// defaults to the current UTC month up to now.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let now = SystemTime::now();
        let mut parsed = Self {
            account: None,
            from: partitions::month_start(now),
            to: now,
            group_by: GroupBy::Total,
            limit: 100,
        };
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "account" => parsed.account = Some(value.into_owned()),
                "from" => parsed.from = parse_time(&value, "from")?,
                "to" => parsed.to = parse_time(&value, "to")?,
                "group_by" => {
                    parsed.group_by = GroupBy::parse(&value).ok_or_else(|| {
                        ApiError::bad_request(
                            format!("`group_by` must be total, model, day or key, not {value:?}."),
                            Some("group_by"),
                        )
                    })?;
                }
                "limit" => {
                    parsed.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_EVENTS).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad_request(
                                format!("`limit` must be a number from 1 to {MAX_EVENTS}."),
                                Some("limit"),
                            )
                        })?;
                }
                _ => {
                    return Err(ApiError::bad_request(
                        format!("Unknown query parameter `{name}`."),
                        None,
                    ));
                }
            }
        }
        if parsed.from >= parsed.to {
            return Err(ApiError::bad_request(
                "`from` must be before `to`.",
                Some("from"),
            ));
        }
        Ok(parsed)
    }
}

/// The last second of year 9999: RFC 3339 times end there, and every time
/// a query takes is bounded by it, so no number a caller sends can overflow
/// time arithmetic or fall outside what Postgres stores.
const LATEST_TIME_SECS: u64 = 253_402_300_799;

/// Unix seconds, `YYYY-MM-DD`, or an RFC 3339 time (UTC when no offset), up
/// to the end of year 9999.
pub fn parse_time(value: &str, param: &'static str) -> Result<SystemTime, ApiError> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return (seconds <= LATEST_TIME_SECS)
            .then(|| UNIX_EPOCH + Duration::from_secs(seconds))
            .ok_or_else(|| {
                ApiError::bad_request(format!("`{param}` is past the year 9999."), Some(param))
            });
    }
    let full = if value.len() == 10 {
        format!("{value}T00:00:00Z")
    } else {
        value.to_owned()
    };
    humantime::parse_rfc3339_weak(&full).map_err(|_| {
        ApiError::bad_request(
            format!("`{param}` must be unix seconds, a date (2026-11-01) or an RFC 3339 time."),
            Some(param),
        )
    })
}

/// Usage totals for one account (by id), or for `query.account` by name, or
/// for every account.
pub async fn totals(
    pool: &Pool,
    account: Option<Uuid>,
    query: &UsageQuery,
) -> Result<Value, ApiError> {
    with_client(pool, async |client| {
        let account = match account {
            Some(id) => Some(id),
            None => resolve(client, query.account.as_deref()).await?,
        };
        let rows = report::totals(client, account, query.from, query.to, query.group_by).await?;
        Ok(json!({
            "object": "usage",
            "from": unix(query.from),
            "to": unix(query.to),
            "group_by": query.group_by.as_str(),
            "data": rows,
        }))
    })
    .await
}

/// One account's raw events, newest first.
pub async fn events(pool: &Pool, query: &UsageQuery) -> Result<Value, ApiError> {
    let Some(name) = query.account.as_deref() else {
        return Err(ApiError::bad_request(
            "`account` is required.",
            Some("account"),
        ));
    };
    with_client(pool, async |client| {
        let account = resolve(client, Some(name)).await?.unwrap_or_default();
        let events =
            report::account_events(client, account, query.from, query.to, query.limit).await?;
        Ok(json!({"object": "list", "data": events}))
    })
    .await
}

/// Requests and tokens in the last minute, and this month's units.
pub async fn stats(pool: &Pool) -> Result<Value, ApiError> {
    with_client(pool, async |client| {
        Ok(serde_json::to_value(report::live_stats(client).await?).unwrap_or_default())
    })
    .await
}

/// The newest cutoff a purge accepts: a day ago. A spool being replayed
/// holds recent events; deleting their period would let a replay of events
/// already counted in the rollups count them again.
const PURGE_MIN_AGE: Duration = Duration::from_secs(86_400);

/// Deletes usage events created before `before` (the admin API and CLI).
pub async fn purge(pool: &Pool, before: SystemTime) -> Result<Purged, ApiError> {
    if before > SystemTime::now() - PURGE_MIN_AGE {
        return Err(ApiError::bad_request(
            "`before` must be at least a day in the past.",
            Some("before"),
        ));
    }
    partitions::purge(pool, before).await.map_err(|error| {
        tracing::error!("usage purge failed: {error}");
        ApiError::DatabaseUnavailable
    })
}

/// The account named `name`; 404 when there is none.
async fn resolve(
    client: &deadpool_postgres::Client,
    name: Option<&str>,
) -> Result<Option<Uuid>, QueryError> {
    let Some(name) = name else {
        return Ok(None);
    };
    match report::account_id(client, name).await? {
        Some(id) => Ok(Some(id)),
        None => Err(QueryError::Api(ApiError::NotFound(format!(
            "No account named {name:?}."
        )))),
    }
}

enum QueryError {
    Api(ApiError),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for QueryError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Db(error)
    }
}

/// Runs `query` on a pooled connection, at most [`REPORT_SLOTS`] at once and
/// bounded by [`REPORT_TIMEOUT`]; any Postgres trouble answers 503.
async fn with_client<T>(
    pool: &Pool,
    query: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, QueryError>,
) -> Result<T, ApiError> {
    let outcome = tokio::time::timeout(REPORT_TIMEOUT, async {
        let _slot = REPORT_SLOTS
            .acquire()
            .await
            .map_err(|_| ApiError::DatabaseUnavailable)?;
        let client = pool.get().await.map_err(|e| {
            tracing::error!("usage report: no Postgres connection: {e}");
            ApiError::DatabaseUnavailable
        })?;
        query(&client).await.map_err(|error| match error {
            QueryError::Api(error) => error,
            QueryError::Db(error) => {
                tracing::error!("usage report failed: {error}");
                ApiError::DatabaseUnavailable
            }
        })
    })
    .await;
    outcome.unwrap_or(Err(ApiError::DatabaseUnavailable))
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_defaults_to_this_month_and_parses_dates() {
        let query = UsageQuery::parse(Some("from=2026-11-01&to=1796083200&group_by=day")).unwrap();
        assert_eq!(query.from, UNIX_EPOCH + Duration::from_secs(1_793_491_200));
        assert_eq!(query.to, UNIX_EPOCH + Duration::from_secs(1_796_083_200));
        assert_eq!(query.group_by, GroupBy::Day);
        let default = UsageQuery::parse(None).unwrap();
        assert_eq!(default.from, partitions::month_start(SystemTime::now()));
    }

    #[test]
    fn bad_parameters_name_themselves() {
        for (query, param) in [
            ("group_by=hour", Some("group_by")),
            ("from=yesterday", Some("from")),
            ("from=2026-12-01&to=2026-11-01", Some("from")),
            ("limit=0", Some("limit")),
            ("color=blue", None),
        ] {
            match UsageQuery::parse(Some(query)) {
                Err(ApiError::BadRequest { param: p, .. }) => assert_eq!(p, param, "{query}"),
                other => panic!("{query}: expected a 400, got {other:?}"),
            }
        }
    }
}
