//! What the checker reads from Tollgate's Postgres: every usage event, and every
//! account's units (sql/V1__accounts_and_keys.sql, sql/V2__usage_events.sql).
//!
//! The soak's database is its own, so every row in it came from the soak.

use anyhow::Context;
use tokio_postgres::NoTls;

/// The columns of one `usage_events` row the checks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEventRow {
    pub event_id: String,
    pub request_id: String,
    /// `ok`, `partial`, `client_error`, `upstream_error` or `rejected`.
    pub status: String,
    /// Billed completion tokens.
    pub completion_tokens: u64,
    pub units: u64,
}

/// One account's units over all its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUsage {
    pub account: String,
    pub tier: String,
    pub units: u64,
}

pub struct StoredUsage {
    pub events: Vec<UsageEventRow>,
    pub accounts: Vec<AccountUsage>,
}

pub async fn read_usage(database_url: &str) -> anyhow::Result<StoredUsage> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .context("connecting to the soak's Postgres")?;
    // The connection task ends when `client` is dropped at the end of this function.
    let connection = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT event_id::text, request_id, status, completion_tokens, units FROM usage_events",
            &[],
        )
        .await
        .context("reading usage_events")?;
    let events = rows
        .iter()
        .map(|row| {
            Ok(UsageEventRow {
                event_id: row.try_get(0)?,
                request_id: row.try_get(1)?,
                status: row.try_get(2)?,
                completion_tokens: non_negative(row.try_get(3)?)?,
                units: non_negative(row.try_get(4)?)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rows = client
        .query(
            "SELECT a.name, a.tier, COALESCE(sum(e.units), 0)::bigint \
             FROM accounts a LEFT JOIN usage_events e ON e.account_id = a.id \
             GROUP BY a.name, a.tier ORDER BY a.name",
            &[],
        )
        .await
        .context("reading the accounts' units")?;
    let accounts = rows
        .iter()
        .map(|row| {
            Ok(AccountUsage {
                account: row.try_get(0)?,
                tier: row.try_get(1)?,
                units: non_negative(row.try_get(2)?)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    drop(client);
    connection
        .await
        .context("the Postgres connection task")?
        .context("the Postgres connection")?;
    Ok(StoredUsage { events, accounts })
}

fn non_negative(value: i64) -> anyhow::Result<u64> {
    u64::try_from(value).with_context(|| format!("a negative count ({value}) in usage_events"))
}
