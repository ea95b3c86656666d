//! Reconciliation against real Postgres (a database of its own, with the
//! project's migrations) and the stateful fake of Stripe: a log the exporter
//! sent in full reconciles with no differences, and each way the log, the
//! exports and Stripe can disagree is reported for exactly the customer and
//! day it happened to.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterDefaultAggregation,
    CreateBillingMeterDefaultAggregationFormula,
};
use tollgate_billing::export::{ExportConfig, MeterEvent, MeterEvents, export_once};
use tollgate_billing::reconcile::{
    Day, Reconciliation, Row, StripeComparison, SummariesError, reconcile,
};
use tollgate_billing::stripe_api::{StripeMeterEvents, StripeMeterSummaries, client};
use tollgate_testkit::TestDb;
use tollgate_testkit::stripe::FakeStripe;
use uuid::Uuid;

const HOUR: i64 = 3600;
const METER: &str = "tollgate_units";

/// Three customers (`acct0`–`acct2`) and an account without one (`acct3`),
/// with usage on the three days before today and some in the hour still
/// open at `now`.
struct Log {
    /// account → customer, for `acct0`–`acct2`
    customers: Vec<(Uuid, String)>,
    /// (customer, day) → units in closed hours
    closed: BTreeMap<(String, Day), i64>,
    /// Units of customers in the open hour.
    open: i64,
    /// The report's clock: the start of the current hour.
    now: i64,
    first: Day,
    today: Day,
}

fn days_before(day: Day, days: i64) -> Day {
    Day::from_days_since_epoch(day.days_since_epoch() - days)
}

async fn insert_usage(db: &TestDb, account: Uuid, minute: i64, units: i64) {
    db.execute(
        "INSERT INTO usage_rollup_minute (account_id, bucket, key_id, model, tier, requests, \
         failed_requests, prompt_tokens, completion_tokens, total_tokens, units) \
         VALUES ($1, to_timestamp($2::float8), $3, 'm', 'pro', 1, 0, $4, 0, $4, $4)",
        &[&account, &(minute as f64), &Uuid::now_v7(), &units],
    )
    .await;
}

async fn seed(db: &TestDb) -> Log {
    let real_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let now = real_now - real_now.rem_euclid(HOUR);
    let today = Day::containing(now);
    let first = days_before(today, 3);
    let mut log = Log {
        customers: Vec::new(),
        closed: BTreeMap::new(),
        open: 0,
        now,
        first,
        today,
    };
    for i in 0..4_i64 {
        let account = Uuid::now_v7();
        db.execute(
            "INSERT INTO accounts (id, name, tier) VALUES ($1, $2, 'pro')",
            &[&account, &format!("acct{i}")],
        )
        .await;
        let customer = format!("cus_test{i}");
        let billed = i < 3;
        if billed {
            db.execute(
                "INSERT INTO billing_customers (account_id, stripe_customer_id) VALUES ($1, $2)",
                &[&account, &customer],
            )
            .await;
            log.customers.push((account, customer.clone()));
        }
        for k in 0..3 {
            let day = days_before(today, 3 - k);
            for hour in 0..24 {
                if (hour + i + k) % 3 == 0 {
                    continue; // an idle hour
                }
                let start = day.start() + hour * HOUR;
                for (minute, units) in [(7, 10 * (i + 1) + hour), (42, k + 1)] {
                    insert_usage(db, account, start + minute * 60, units).await;
                    if billed {
                        *log.closed.entry((customer.clone(), day)).or_default() += units;
                    }
                }
            }
        }
        insert_usage(db, account, now + 60, 1000 + i).await;
        if billed {
            log.open += 1000 + i;
        }
    }
    log
}

fn config() -> ExportConfig {
    ExportConfig {
        settle: Duration::ZERO,
        backoff: Duration::from_millis(10),
        ..ExportConfig::new(METER, Duration::from_secs(HOUR as u64))
    }
}

fn at(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix as u64)
}

fn events(fake: &FakeStripe) -> StripeMeterEvents {
    StripeMeterEvents::new(client(fake.secret_key(), Some(fake.base_url())).unwrap())
}

/// Two to a page, so both the meter list and the summaries are paged.
fn summaries(fake: &FakeStripe) -> StripeMeterSummaries {
    StripeMeterSummaries::new(client(fake.secret_key(), Some(fake.base_url())).unwrap())
        .page_size(2)
}

/// The meter, created before three others so that it is on the second page
/// of the (newest first) list.
async fn create_meters(fake: &FakeStripe) {
    let stripe = client(fake.secret_key(), Some(fake.base_url())).unwrap();
    for (event_name, display_name) in [
        (METER, "Tollgate units"),
        ("other_a", "Other A"),
        ("other_b", "Other B"),
        ("other_c", "Other C"),
    ] {
        CreateBillingMeter::new(
            CreateBillingMeterDefaultAggregation::new(
                CreateBillingMeterDefaultAggregationFormula::Sum,
            ),
            display_name,
            event_name,
        )
        .send(&stripe)
        .await
        .unwrap();
    }
}

/// Seeds the log, exports every closed hour, and checks nothing is left.
async fn exported_log(db: &TestDb, fake: &FakeStripe) -> Log {
    let log = seed(db).await;
    create_meters(fake).await;
    let report = export_once(&db.pool, &config(), &events(fake), at(log.now))
        .await
        .unwrap();
    assert_eq!(report.retry_later + report.rejected, 0, "{report:?}");
    log
}

async fn reconcile_with(
    db: &TestDb,
    log: &Log,
    stripe: Option<&StripeMeterSummaries>,
) -> Reconciliation {
    let stripe = stripe.map(|s| s as &dyn tollgate_billing::reconcile::MeterSummaries);
    reconcile(
        &db.pool,
        &config(),
        log.first,
        log.today,
        at(log.now),
        stripe,
    )
    .await
    .unwrap()
}

fn only_difference(reconciliation: &Reconciliation) -> &Row {
    let differences: Vec<&Row> = reconciliation.differences().collect();
    assert_eq!(differences.len(), 1, "{reconciliation}");
    differences[0]
}

#[tokio::test]
async fn a_fully_exported_log_reconciles_with_no_differences_including_stripe() {
    let db = TestDb::migrated().await;
    let fake = FakeStripe::start().await.unwrap();
    let log = exported_log(&db, &fake).await;

    let reconciliation = reconcile_with(&db, &log, Some(&summaries(&fake))).await;
    assert!(
        matches!(reconciliation.stripe, StripeComparison::Compared),
        "{:?}",
        reconciliation.stripe
    );
    assert_eq!(reconciliation.differences().count(), 0, "{reconciliation}");
    let closed: BTreeMap<(String, Day), i64> = reconciliation
        .rows
        .iter()
        .filter(|row| row.logged != 0)
        .map(|row| ((row.stripe_customer_id.clone(), row.day), row.logged))
        .collect();
    assert_eq!(closed, log.closed, "acct3 has no customer and is left out");
    for row in &reconciliation.rows {
        assert_eq!(row.stripe, Some(row.exported), "{row:?}");
    }
    let totals = reconciliation.totals();
    let logged: i64 = log.closed.values().sum();
    assert_eq!(
        (totals.customers, totals.days, totals.logged, totals.open),
        (3, 4, logged, log.open)
    );
    assert_eq!(
        (
            totals.exported,
            totals.pending,
            totals.expired,
            totals.stripe
        ),
        (logged, 0, 0, Some(logged))
    );
    assert_eq!(
        reconciliation.to_string(),
        format!(
            "no differences: 3 customers, 4 days, {logged} units; {} units in buckets still open, not compared\n",
            log.open
        )
    );

    // Both lists were read page by page.
    let requests = fake.requests();
    let paged = |path: &str| {
        requests
            .iter()
            .filter(|r| r.path.ends_with(path) && r.query.get("starting_after").is_some())
            .count()
    };
    assert!(paged("/v1/billing/meters") >= 1, "the meter list was paged");
    assert!(
        paged("/event_summaries") >= 3,
        "each customer's four days came in pages of two"
    );
    let summary_query = &requests
        .iter()
        .find(|r| r.path.ends_with("/event_summaries"))
        .unwrap()
        .query;
    assert_eq!(summary_query["value_grouping_window"], "day");
    assert_eq!(
        summary_query["start_time"],
        log.first.start().to_string().as_str()
    );
    assert_eq!(
        summary_query["end_time"],
        log.today.next().start().to_string().as_str()
    );
}

#[tokio::test]
async fn usage_added_to_an_exported_hour_is_reported_for_that_customer_and_day() {
    let db = TestDb::migrated().await;
    let fake = FakeStripe::start().await.unwrap();
    let log = exported_log(&db, &fake).await;
    let (account, customer) = log.customers[1].clone();
    let day = days_before(log.today, 2);
    // A spool replayed late into an hour the exporter has already sent.
    insert_usage(&db, account, day.start() + 5 * HOUR + 30 * 60, 77).await;

    let reconciliation = reconcile_with(&db, &log, Some(&summaries(&fake))).await;
    let row = only_difference(&reconciliation);
    let before = log.closed[&(customer.clone(), day)];
    assert_eq!(
        (
            row.account_name.as_str(),
            row.stripe_customer_id.as_str(),
            row.day
        ),
        ("acct1", customer.as_str(), day)
    );
    assert_eq!(
        (
            row.logged,
            row.exported,
            row.pending,
            row.expired,
            row.stripe
        ),
        (before + 77, before, 0, 0, Some(before))
    );
    assert_eq!((row.not_exported(), row.stripe_gap()), (77, Some(0)));
    let report = reconciliation.to_string();
    let lines: Vec<&str> = report.lines().collect();
    assert!(lines[0].starts_with("day "), "{report}");
    assert!(lines[0].ends_with("not exported  stripe  stripe - exported"));
    let expected = format!(
        "{day}  acct1    {customer}  {}  {before}  0  0  77  {before}  0",
        before + 77
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        expected.split_whitespace().collect::<Vec<_>>(),
        "{report}"
    );
    // Aligned: the columns line up under their headers.
    assert_eq!(lines[0].len(), lines[1].len(), "{report}");
    assert!(
        lines[2].starts_with("1 difference (3 customers, 4 days): "),
        "{report}"
    );

    // The exporter's next pass sends it as a correction: clean again.
    let report = export_once(&db.pool, &config(), &events(&fake), at(log.now))
        .await
        .unwrap();
    assert_eq!((report.planned, report.sent), (1, 1), "{report:?}");
    let reconciliation = reconcile_with(&db, &log, Some(&summaries(&fake))).await;
    assert_eq!(reconciliation.differences().count(), 0, "{reconciliation}");
}

#[tokio::test]
async fn an_extra_meter_event_at_stripe_is_reported_for_that_customer_and_day() {
    let db = TestDb::migrated().await;
    let fake = FakeStripe::start().await.unwrap();
    let log = exported_log(&db, &fake).await;
    let customer = log.customers[2].1.clone();
    let day = days_before(log.today, 1);
    // Someone sent usage to Stripe by hand, outside the exporter.
    events(&fake)
        .send(&MeterEvent {
            identifier: "manual-correction-1".to_owned(),
            event_name: METER.to_owned(),
            stripe_customer_id: customer.clone(),
            value: 5,
            timestamp: day.start() + 12 * HOUR,
        })
        .await
        .unwrap();

    let reconciliation = reconcile_with(&db, &log, Some(&summaries(&fake))).await;
    let row = only_difference(&reconciliation);
    let exported = log.closed[&(customer.clone(), day)];
    assert_eq!(
        (row.stripe_customer_id.as_str(), row.day),
        (customer.as_str(), day)
    );
    assert_eq!(
        (row.logged, row.exported, row.stripe),
        (exported, exported, Some(exported + 5))
    );
    assert_eq!((row.not_exported(), row.stripe_gap()), (0, Some(5)));
}

#[tokio::test]
async fn an_expired_export_is_reported_as_not_billed() {
    let db = TestDb::migrated().await;
    let fake = FakeStripe::start().await.unwrap();
    let log = exported_log(&db, &fake).await;
    let (account, customer) = log.customers[0].clone();
    let day = log.first;
    insert_usage(&db, account, day.start() + 2 * HOUR + 60, 50).await;

    // Stripe is down for the pass that plans the late units.
    fake.set_reachable(false);
    let report = export_once(&db.pool, &config(), &events(&fake), at(log.now))
        .await
        .unwrap();
    assert_eq!((report.planned, report.retry_later), (1, 1), "{report:?}");
    // Pending units are on their way: not a difference.
    let reconciliation = reconcile_with(&db, &log, None).await;
    assert!(matches!(reconciliation.stripe, StripeComparison::NotAsked));
    assert_eq!(reconciliation.differences().count(), 0, "{reconciliation}");
    assert_eq!(reconciliation.totals().pending, 50);

    // Stripe stays down past its identifier window: the row expires.
    db.execute(
        "UPDATE billing_usage_exports \
         SET first_attempt_at = now() - interval '2 days', leased_until = NULL \
         WHERE state = 'pending'",
        &[],
    )
    .await;
    fake.set_reachable(true);
    let report = export_once(&db.pool, &config(), &events(&fake), at(log.now))
        .await
        .unwrap();
    assert_eq!(report.expired, 1, "{report:?}");

    let reconciliation = reconcile_with(&db, &log, Some(&summaries(&fake))).await;
    let row = only_difference(&reconciliation);
    let exported = log.closed[&(customer.clone(), day)];
    assert_eq!(
        (row.stripe_customer_id.as_str(), row.day),
        (customer.as_str(), day)
    );
    assert_eq!(
        (row.logged, row.exported, row.expired, row.stripe),
        (exported + 50, exported, 50, Some(exported))
    );
    assert_eq!(row.not_exported(), 0, "planned, but never billed");
    let not_billed: Vec<&Row> = reconciliation.not_billed().collect();
    assert_eq!(not_billed, vec![row]);
    let report = reconciliation.to_string();
    let section = report
        .split_once("not billed: outside Stripe's 24 h identifier window\n")
        .unwrap_or_else(|| panic!("{report}"))
        .1;
    let lines: Vec<&str> = section.lines().collect();
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        [
            day.to_string(),
            "acct0".to_owned(),
            customer,
            "50".to_owned()
        ]
    );
}

#[tokio::test]
async fn with_stripe_unreachable_the_log_is_still_compared_with_the_exports() {
    let db = TestDb::migrated().await;
    let fake = FakeStripe::start().await.unwrap();
    let log = exported_log(&db, &fake).await;
    let (account, customer) = log.customers[1].clone();
    let day = days_before(log.today, 2);
    insert_usage(&db, account, day.start() + 5 * HOUR + 30 * 60, 77).await;
    fake.set_reachable(false);

    let reconciliation = reconcile_with(&db, &log, Some(&summaries(&fake))).await;
    assert!(
        matches!(
            reconciliation.stripe,
            StripeComparison::Failed(SummariesError::Unreachable(_))
        ),
        "{:?}",
        reconciliation.stripe
    );
    let row = only_difference(&reconciliation);
    assert_eq!(
        (row.stripe_customer_id.as_str(), row.day, row.not_exported()),
        (customer.as_str(), day, 77)
    );
    assert!(reconciliation.rows.iter().all(|row| row.stripe.is_none()));
    assert_eq!(reconciliation.totals().stripe, None);
    let report = reconciliation.to_string();
    let last = report.lines().last().unwrap();
    assert!(
        last.starts_with("Stripe not reached: ")
            && last.ends_with("; the usage log compared with the exports only"),
        "{report}"
    );
}

#[tokio::test]
async fn a_meter_stripe_does_not_have_is_reported_not_taken_for_zero_usage() {
    let db = TestDb::migrated().await;
    let fake = FakeStripe::start().await.unwrap();
    let log = seed(&db).await;
    export_once(&db.pool, &config(), &events(&fake), at(log.now))
        .await
        .unwrap();

    let reconciliation = reconcile_with(&db, &log, Some(&summaries(&fake))).await;
    assert!(
        matches!(
            &reconciliation.stripe,
            StripeComparison::Failed(SummariesError::NoMeter(name)) if name == METER
        ),
        "{:?}",
        reconciliation.stripe
    );
    assert_eq!(reconciliation.differences().count(), 0, "{reconciliation}");
}
