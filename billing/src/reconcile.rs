//! Reconciliation: the usage log against what the exporter planned and sent,
//! and against what Stripe aggregated, per customer and UTC day
//! (`tollgate billing reconcile --from DAY --to DAY`).
//!
//! Figures per account (with its Stripe customer) and day:
//!
//! - `logged`: units in the usage log's minute rollups, for accounts with a
//!   `billing_customers` row, in export buckets closed at `now`;
//! - `open`: units in buckets still open at `now` (the bucket has not ended,
//!   or ended less than `settle` ago). The exporter has not planned them
//!   yet, so they are counted but never compared;
//! - `exported`, `pending`, `expired`: units of `billing_usage_exports` rows
//!   for the meter in each state;
//! - `stripe`: Stripe's meter event summaries for the day (when asked and
//!   reached).
//!
//! A day's units are those of the export buckets that *start* on it: the
//! exporter stamps each meter event with its bucket's start, so the log, the
//! exports and Stripe's daily summaries all split days at the same place,
//! whatever the bucket size.
//!
//! A row is a difference when the closed log is not covered by the exports
//! (`logged != exported + pending + expired`: usage that arrived in a closed
//! bucket and is not planned yet, or planned usage the log no longer has),
//! when it has expired units (planned but never confirmed by Stripe within
//! its 24 h identifier window, so not billed), or when Stripe's figure is
//! known and differs from `exported`. Pending units are not a difference:
//! the exporter sends them on its next pass. Two differences are expected
//! to be transient: a bucket that closed after the exporter's last pass, and
//! Stripe's figure, which Stripe aggregates asynchronously and which can
//! already include a pending row whose sender died before marking it sent.
//! One is not: usage in a closed bucket older than the exporter's
//! `lookback` is never planned, so it stays "not exported".
//!
//! Stripe's summaries are per customer: [`MeterSummaries`] is asked for
//! every billing customer (and any other customer an export row names), one
//! listing each.
//!
//! The database figures come from one snapshot (a repeatable-read
//! transaction), so an exporter running at the same time never makes the
//! log and the exports disagree; Stripe is read after it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use time::{Date, Month, OffsetDateTime};
use tokio_postgres::IsolationLevel;
use uuid::Uuid;

use crate::export::ExportConfig;

const DAY_SECS: i64 = 86_400;
/// The Julian day number of 1970-01-01, where [`Day`] counts from.
const EPOCH_JULIAN_DAY: i32 = OffsetDateTime::UNIX_EPOCH.to_julian_day();

/// A UTC calendar day, read and written as `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(i64);

impl Day {
    /// The day `days` after 1970-01-01.
    pub const fn from_days_since_epoch(days: i64) -> Self {
        Self(days)
    }

    pub const fn days_since_epoch(self) -> i64 {
        self.0
    }

    /// The day containing `unix_seconds`.
    pub const fn containing(unix_seconds: i64) -> Self {
        Self(unix_seconds.div_euclid(DAY_SECS))
    }

    /// Its first second (00:00 UTC), in unix seconds.
    pub const fn start(self) -> i64 {
        self.0 * DAY_SECS
    }

    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }

    fn from_date(date: Date) -> Self {
        Self(i64::from(date.to_julian_day()) - i64::from(EPOCH_JULIAN_DAY))
    }

    /// Its calendar date; `None` outside the years -9999 to 9999 that the
    /// `time` crate represents.
    fn date(self) -> Option<Date> {
        let julian = self.0.checked_add(i64::from(EPOCH_JULIAN_DAY))?;
        Date::from_julian_day(i32::try_from(julian).ok()?).ok()
    }
}

/// Not a `YYYY-MM-DD` calendar day.
#[derive(Debug, thiserror::Error)]
#[error("expected a UTC day as YYYY-MM-DD (e.g. 2026-11-01), got {0:?}")]
pub struct ParseDayError(String);

impl FromStr for Day {
    type Err = ParseDayError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseDayError(text.to_owned());
        let bytes = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| {
            let part = text.get(range).ok_or_else(error)?;
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error());
            }
            part.parse::<i64>().map_err(|_| error())
        };
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return Err(error());
        }
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        // Refuses a month or a day the calendar does not have (2026-02-30),
        // rather than rolling it over.
        let month = u8::try_from(month)
            .ok()
            .and_then(|m| Month::try_from(m).ok())
            .ok_or_else(error)?;
        let year = i32::try_from(year).map_err(|_| error())?;
        let day = u8::try_from(day).map_err(|_| error())?;
        let date = Date::from_calendar_date(year, month, day).map_err(|_| error())?;
        Ok(Self::from_date(date))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.date() {
            Some(date) => write!(f, "{date}"),
            // Never a day of usage; printed rather than refused.
            None => write!(f, "{} days from 1970-01-01", self.0),
        }
    }
}

/// Why Stripe's figures are missing from a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum SummariesError {
    /// A connection failure, a timeout, 429 or 5xx: try again later.
    #[error("Stripe not reached: {0}")]
    Unreachable(String),
    /// Stripe has no active meter with this `event_name`.
    #[error("Stripe has no active meter with event_name `{0}`")]
    NoMeter(String),
    /// Any other refusal (a bad key, a bad parameter, an unreadable answer).
    #[error("Stripe refused: {0}")]
    Refused(String),
}

/// Where Stripe's aggregated usage is read: Stripe's meter event summaries
/// ([`crate::stripe_api::StripeMeterSummaries`]).
#[async_trait]
pub trait MeterSummaries: Send + Sync {
    /// Units Stripe aggregated for the meter of `meter_event_name`, per
    /// customer (of `customers`) and UTC day from `from` to `to` inclusive.
    /// Days without usage may be missing.
    async fn daily_units(
        &self,
        meter_event_name: &str,
        customers: &[String],
        from: Day,
        to: Day,
    ) -> Result<BTreeMap<(String, Day), i64>, SummariesError>;
}

/// One account's figures for one day, in units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub account_id: Uuid,
    pub account_name: String,
    pub stripe_customer_id: String,
    pub day: Day,
    /// In the usage log, in buckets closed at the report's `now`.
    pub logged: i64,
    /// In the usage log, in buckets still open at `now`: not compared.
    pub open: i64,
    /// Export rows `sent`: Stripe accepted them.
    pub exported: i64,
    /// Export rows `pending`: the exporter has yet to send them.
    pub pending: i64,
    /// Export rows `expired`: never confirmed within Stripe's identifier
    /// window, so not sent again; not billed unless Stripe's figure shows
    /// them.
    pub expired: i64,
    /// Stripe's daily summary, when Stripe was compared.
    pub stripe: Option<i64>,
}

impl Row {
    /// Closed log units the exports do not cover: positive when the
    /// exporter has not planned them, negative when it planned units the log
    /// no longer has.
    pub fn not_exported(&self) -> i64 {
        self.logged - self.exported - self.pending - self.expired
    }

    /// Stripe's figure minus `exported`, when Stripe was compared.
    pub fn stripe_gap(&self) -> Option<i64> {
        self.stripe.map(|stripe| stripe - self.exported)
    }

    pub fn is_difference(&self) -> bool {
        self.not_exported() != 0 || self.expired != 0 || self.stripe_gap().is_some_and(|g| g != 0)
    }
}

/// What became of the Stripe column.
#[derive(Debug)]
pub enum StripeComparison {
    /// No [`MeterSummaries`] was given.
    NotAsked,
    /// Every row's `stripe` is set.
    Compared,
    /// Asked and failed: no row has a `stripe` figure.
    Failed(SummariesError),
}

/// The sums of every row's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Accounts with any figure.
    pub customers: usize,
    /// Days in the range.
    pub days: i64,
    pub logged: i64,
    pub open: i64,
    pub exported: i64,
    pub pending: i64,
    pub expired: i64,
    pub stripe: Option<i64>,
}

/// The result of [`reconcile`]; its `Display` is the report.
#[derive(Debug)]
pub struct Reconciliation {
    pub from: Day,
    pub to: Day,
    /// Every account and day with any figure, by account name and day.
    pub rows: Vec<Row>,
    pub stripe: StripeComparison,
}

impl Reconciliation {
    pub fn differences(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|row| row.is_difference())
    }

    /// Rows with expired units.
    pub fn not_billed(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|row| row.expired != 0)
    }

    pub fn totals(&self) -> Totals {
        let mut totals = Totals {
            customers: self
                .rows
                .iter()
                .map(|row| row.account_id)
                .collect::<BTreeSet<_>>()
                .len(),
            days: self.to.0 - self.from.0 + 1,
            stripe: matches!(self.stripe, StripeComparison::Compared).then_some(0),
            ..Totals::default()
        };
        for row in &self.rows {
            totals.logged += row.logged;
            totals.open += row.open;
            totals.exported += row.exported;
            totals.pending += row.pending;
            totals.expired += row.expired;
            if let (Some(total), Some(stripe)) = (&mut totals.stripe, row.stripe) {
                *total += stripe;
            }
        }
        totals
    }
}

/// Reconciles the days `from` to `to` (inclusive) for the meter and bucket
/// of `config`, with buckets closed as the exporter's planner closes them at
/// `now`; Stripe is compared too when `stripe` is given and answers.
pub async fn reconcile(
    pool: &Pool,
    config: &ExportConfig,
    from: Day,
    to: Day,
    now: SystemTime,
    stripe: Option<&dyn MeterSummaries>,
) -> anyhow::Result<Reconciliation> {
    if from > to {
        anyhow::bail!("the first day ({from}) is after the last ({to})");
    }
    let mut rows = read_database(pool, config, from, to, now).await?;
    let comparison = match stripe {
        None => StripeComparison::NotAsked,
        Some(stripe) => {
            let customers = rows.customers.keys().cloned().collect::<Vec<_>>();
            match stripe
                .daily_units(&config.meter_event_name, &customers, from, to)
                .await
            {
                Ok(units) => {
                    rows.add_stripe(units);
                    StripeComparison::Compared
                }
                Err(error) => {
                    tracing::warn!(%error, "reconciliation without Stripe's figures");
                    StripeComparison::Failed(error)
                }
            }
        }
    };
    let mut rows: Vec<Row> = rows.rows.into_values().collect();
    rows.sort_by(|a, b| (&a.account_name, a.day).cmp(&(&b.account_name, b.day)));
    Ok(Reconciliation {
        from,
        to,
        rows,
        stripe: comparison,
    })
}

/// Rows being filled in, and who the Stripe customers are.
struct Rows {
    rows: BTreeMap<(Uuid, Day), Row>,
    /// account id → name and its `billing_customers` customer
    accounts: HashMap<Uuid, (String, Option<String>)>,
    /// Stripe customer → account: from `billing_customers`, and from the
    /// export rows (which keep the customer they were planned for).
    customers: BTreeMap<String, Uuid>,
}

impl Rows {
    fn row(&mut self, account_id: Uuid, day: Day, customer: Option<&str>) -> &mut Row {
        let (name, billing_customer) = self
            .accounts
            .get(&account_id)
            .cloned()
            .unwrap_or_else(|| (account_id.to_string(), None));
        self.rows.entry((account_id, day)).or_insert_with(|| Row {
            account_id,
            account_name: name,
            stripe_customer_id: billing_customer
                .or_else(|| customer.map(str::to_owned))
                .unwrap_or_default(),
            day,
            logged: 0,
            open: 0,
            exported: 0,
            pending: 0,
            expired: 0,
            stripe: None,
        })
    }

    fn add_stripe(&mut self, units: BTreeMap<(String, Day), i64>) {
        for row in self.rows.values_mut() {
            row.stripe = Some(0);
        }
        for ((customer, day), units) in units {
            let Some(&account_id) = self.customers.get(&customer) else {
                continue;
            };
            let row = self.row(account_id, day, Some(&customer));
            *row.stripe.get_or_insert(0) += units;
        }
    }
}

fn unix(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn read_database(
    pool: &Pool,
    config: &ExportConfig,
    from: Day,
    to: Day,
    now: SystemTime,
) -> anyhow::Result<Rows> {
    let bucket_secs = config.bucket.as_secs().max(1) as f64;
    // The planner's cutoff: buckets starting before it are closed.
    let closed = unix(now) - config.settle.as_secs_f64();
    let until = (closed / bucket_secs).floor() * bucket_secs;
    let (start, end) = (from.start() as f64, to.next().start() as f64);
    let meter = &config.meter_event_name;

    let mut client = pool.get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let accounts = tx
        .query(
            "SELECT a.id, a.name, c.stripe_customer_id
             FROM accounts a
             LEFT JOIN billing_customers c ON c.account_id = a.id
             WHERE c.account_id IS NOT NULL
                OR a.id IN (SELECT account_id FROM billing_usage_exports
                            WHERE meter = $1
                              AND bucket_start >= to_timestamp($2)
                              AND bucket_start < to_timestamp($3))",
            &[meter, &start, &end],
        )
        .await?;
    // A bucket starting on the last day can end after it: the minutes are
    // read up to a bucket past the range and kept by their bucket's start.
    let logged = tx
        .query(
            "SELECT r.account_id,
                    floor(extract(epoch FROM b.bucket_start) / 86400)::bigint,
                    coalesce(sum(r.units) FILTER (WHERE b.bucket_start < to_timestamp($4)), 0)::bigint,
                    coalesce(sum(r.units) FILTER (WHERE b.bucket_start >= to_timestamp($4)), 0)::bigint
             FROM usage_rollup_minute r
             JOIN billing_customers c USING (account_id)
             CROSS JOIN LATERAL (
                 SELECT date_bin($1 * interval '1 second', r.bucket, TIMESTAMPTZ 'epoch') AS bucket_start
             ) b
             WHERE r.bucket >= to_timestamp($2)
               AND r.bucket < to_timestamp($3) + $1 * interval '1 second'
               AND r.unit_kind = $5
               AND b.bucket_start >= to_timestamp($2)
               AND b.bucket_start < to_timestamp($3)
             GROUP BY 1, 2",
            &[&bucket_secs, &start, &end, &until, &config.unit_kind],
        )
        .await?;
    let exports = tx
        .query(
            "SELECT account_id,
                    floor(extract(epoch FROM bucket_start) / 86400)::bigint,
                    stripe_customer_id,
                    coalesce(sum(units) FILTER (WHERE state = 'sent'), 0)::bigint,
                    coalesce(sum(units) FILTER (WHERE state = 'pending'), 0)::bigint,
                    coalesce(sum(units) FILTER (WHERE state = 'expired'), 0)::bigint
             FROM billing_usage_exports
             WHERE meter = $1
               AND bucket_start >= to_timestamp($2)
               AND bucket_start < to_timestamp($3)
             GROUP BY 1, 2, 3",
            &[meter, &start, &end],
        )
        .await?;
    tx.commit().await?;

    let mut rows = Rows {
        rows: BTreeMap::new(),
        accounts: HashMap::new(),
        customers: BTreeMap::new(),
    };
    for account in accounts {
        let id: Uuid = account.get(0);
        let customer: Option<String> = account.get(2);
        if let Some(customer) = &customer {
            rows.customers.insert(customer.clone(), id);
        }
        rows.accounts.insert(id, (account.get(1), customer));
    }
    for usage in logged {
        let row = rows.row(usage.get(0), Day(usage.get(1)), None);
        row.logged += usage.get::<_, i64>(2);
        row.open += usage.get::<_, i64>(3);
    }
    for export in exports {
        let account_id: Uuid = export.get(0);
        let customer: String = export.get(2);
        let row = rows.row(account_id, Day(export.get(1)), Some(&customer));
        row.exported += export.get::<_, i64>(3);
        row.pending += export.get::<_, i64>(4);
        row.expired += export.get::<_, i64>(5);
        rows.customers.entry(customer).or_insert(account_id);
    }
    rows.rows.retain(|_, row| {
        row.logged != 0 || row.open != 0 || row.exported + row.pending + row.expired != 0
    });
    Ok(rows)
}

/// The differences as a table (or one line when there are none), then the
/// expired rows, then what became of the Stripe column.
impl fmt::Display for Reconciliation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let totals = self.totals();
        let differences: Vec<&Row> = self.differences().collect();
        if differences.is_empty() {
            write!(
                f,
                "no differences: {}, {}, {}",
                counted(totals.customers as i64, "customer"),
                counted(totals.days, "day"),
                counted(totals.logged, "unit")
            )?;
        } else {
            let mut table = vec![
                [
                    "day",
                    "account",
                    "customer",
                    "logged",
                    "exported",
                    "pending",
                    "expired",
                    "not exported",
                    "stripe",
                    "stripe - exported",
                ]
                .map(str::to_owned),
            ];
            for row in &differences {
                let stripe = |value: Option<i64>| value.map_or("-".to_owned(), |v| v.to_string());
                table.push([
                    row.day.to_string(),
                    row.account_name.clone(),
                    row.stripe_customer_id.clone(),
                    row.logged.to_string(),
                    row.exported.to_string(),
                    row.pending.to_string(),
                    row.expired.to_string(),
                    row.not_exported().to_string(),
                    stripe(row.stripe),
                    stripe(row.stripe_gap()),
                ]);
            }
            write_table(f, &table, 3)?;
            write!(
                f,
                "{} ({}, {}): {} logged, {} exported, {} pending, {} expired",
                counted(differences.len() as i64, "difference"),
                counted(totals.customers as i64, "customer"),
                counted(totals.days, "day"),
                counted(totals.logged, "unit"),
                totals.exported,
                totals.pending,
                totals.expired
            )?;
            if let Some(stripe) = totals.stripe {
                write!(f, ", {stripe} at Stripe")?;
            }
        }
        if totals.open != 0 {
            write!(
                f,
                "; {} in buckets still open, not compared",
                counted(totals.open, "unit")
            )?;
        }
        writeln!(f)?;
        let not_billed: Vec<&Row> = self.not_billed().collect();
        if !not_billed.is_empty() {
            writeln!(f, "not billed: outside Stripe's 24 h identifier window")?;
            let mut table = vec![["day", "account", "customer", "expired"].map(str::to_owned)];
            for row in not_billed {
                table.push([
                    row.day.to_string(),
                    row.account_name.clone(),
                    row.stripe_customer_id.clone(),
                    row.expired.to_string(),
                ]);
            }
            write_table(f, &table, 3)?;
        }
        match &self.stripe {
            StripeComparison::Compared => Ok(()),
            StripeComparison::NotAsked => {
                writeln!(
                    f,
                    "Stripe not asked: the usage log compared with the exports only"
                )
            }
            StripeComparison::Failed(error) => {
                writeln!(f, "{error}; the usage log compared with the exports only")
            }
        }
    }
}

/// "1 day", "3 days".
fn counted(n: i64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Columns from `numeric_from` on are right-aligned.
fn write_table<const N: usize>(
    f: &mut fmt::Formatter<'_>,
    table: &[[String; N]],
    numeric_from: usize,
) -> fmt::Result {
    let mut widths = [0; N];
    for line in table {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for line in table {
        let mut text = String::new();
        for (column, (cell, width)) in line.iter().zip(widths).enumerate() {
            if column > 0 {
                text.push_str("  ");
            }
            if column >= numeric_from {
                text.push_str(&format!("{cell:>width$}"));
            } else {
                text.push_str(&format!("{cell:<width$}"));
            }
        }
        writeln!(f, "{}", text.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> Day {
        text.parse().unwrap()
    }

    #[test]
    fn days_read_and_print_as_utc_dates() {
        assert_eq!(day("1970-01-01"), Day(0));
        assert_eq!(day("2024-02-29").to_string(), "2024-02-29");
        assert_eq!(day("2024-03-01"), day("2024-02-29").next());
        assert_eq!(
            Day::containing(day("2026-11-01").start() + 86_399),
            day("2026-11-01")
        );
        assert_eq!(Day(-1).to_string(), "1969-12-31");
    }

    #[test]
    fn a_day_that_does_not_exist_is_refused_not_rolled_over() {
        for text in [
            "2023-02-29",
            "2026-04-31",
            "2026-13-01",
            "2026-1-05",
            "26-01-05",
            "2026/01/05",
            "2026-01-05 ",
        ] {
            assert!(text.parse::<Day>().is_err(), "{text}");
        }
    }

    fn row(logged: i64, exported: i64, pending: i64, expired: i64, stripe: Option<i64>) -> Row {
        Row {
            account_id: Uuid::nil(),
            account_name: "acct".to_owned(),
            stripe_customer_id: "cus_1".to_owned(),
            day: Day(0),
            logged,
            open: 0,
            exported,
            pending,
            expired,
            stripe,
        }
    }

    #[test]
    fn pending_units_are_not_a_difference_but_expired_ones_are() {
        assert!(!row(10, 6, 4, 0, Some(6)).is_difference());
        assert!(row(10, 6, 0, 4, Some(6)).is_difference());
        assert!(row(10, 6, 0, 0, None).is_difference());
        assert!(row(10, 10, 0, 0, Some(11)).is_difference());
        assert!(!row(10, 10, 0, 0, None).is_difference());
    }
}
