//! The usage exporter against real Postgres (a database of its own, with
//! the project's migrations) and the stateful fake of Stripe: whatever
//! fails on the way, Stripe ends up with exactly the units in the usage log,
//! per customer and hour.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tollgate_billing::export::{
    ExportConfig, ExportReport, MeterEvent, MeterEvents, SendError, export_once,
};
use tollgate_billing::stripe_api::{StripeMeterEvents, client};
use tollgate_testkit::TestDb;
use tollgate_testkit::stripe::{FakeStripe, Fault, Route};
use uuid::Uuid;

const HOUR: i64 = 3600;
const METER: &str = "tollgate_units";

/// Accounts with a Stripe customer (and one without, whose usage is never
/// exported), and a month of usage in the minute rollups: per account and
/// hour, a few minutes with units, from a fixed seed.
struct Month {
    /// account → customer
    customers: Vec<(Uuid, String)>,
    /// (customer, hour start) → units in the usage log
    usage: BTreeMap<(String, i64), u64>,
    /// The end of the month (unix seconds, on an hour).
    end: i64,
}

/// The start of the hour before the current one (unix seconds).
fn last_closed_hour() -> i64 {
    (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / HOUR)
        * HOUR
        - HOUR
}

async fn seed_month(db: &TestDb, hours: i64) -> Month {
    let end = last_closed_hour();
    let start = end - hours * HOUR;
    let mut customers = Vec::new();
    let mut usage = BTreeMap::new();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..4 {
        let account = Uuid::now_v7();
        db.execute(
            "INSERT INTO accounts (id, name, tier) VALUES ($1, $2, 'pro')",
            &[&account, &format!("acct{i}")],
        )
        .await;
        let customer = format!("cus_test{i}");
        if i < 3 {
            db.execute(
                "INSERT INTO billing_customers (account_id, stripe_customer_id) VALUES ($1, $2)",
                &[&account, &customer],
            )
            .await;
            customers.push((account, customer.clone()));
        }
        let mut rows = String::new();
        for hour in (start..end).step_by(HOUR as usize) {
            if next() % 5 == 0 {
                continue; // an idle hour
            }
            for _ in 0..(1 + next() % 3) {
                let minute = hour + (next() % 60) as i64 * 60;
                let units = 1 + next() % 5000;
                rows.push_str(&format!(
                    "('{account}', to_timestamp({minute}), '{}', 'm{}', 'pro', 1, 0, {units}, 0, {units}, {units}),",
                    Uuid::now_v7(),
                    next() % 1000
                ));
                if i < 3 {
                    *usage.entry((customer.clone(), hour)).or_default() += units;
                }
            }
        }
        rows.pop();
        db.execute(
            &format!(
                "INSERT INTO usage_rollup_minute (account_id, bucket, key_id, model, tier, requests, \
                 failed_requests, prompt_tokens, completion_tokens, total_tokens, units) VALUES {rows}"
            ),
            &[],
        )
        .await;
    }
    Month {
        customers,
        usage,
        end,
    }
}

fn config() -> ExportConfig {
    ExportConfig {
        settle: Duration::ZERO,
        lease: Duration::from_millis(300),
        timeout: Duration::from_millis(250),
        backoff: Duration::from_millis(10),
        ..ExportConfig::new(METER, Duration::from_secs(HOUR as u64))
    }
}

fn at(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix as u64)
}

fn stripe(fake: &FakeStripe) -> StripeMeterEvents {
    StripeMeterEvents::new(client(fake.secret_key(), Some(fake.base_url())).unwrap())
}

/// Runs passes until nothing is pending, adding up their reports.
async fn export_until_done(db: &TestDb, events: &dyn MeterEvents, now: SystemTime) -> ExportReport {
    let mut total = ExportReport::default();
    for _ in 0..50 {
        let report = export_once(&db.pool, &config(), events, now).await.unwrap();
        total.planned += report.planned;
        total.sent += report.sent;
        total.duplicates += report.duplicates;
        total.rejected += report.rejected;
        total.expired += report.expired;
        total.retry_later = report.retry_later;
        if report.retry_later == 0 && pending(db).await == 0 {
            return total;
        }
        // The next pass can take the rows that failed once their leases lapse.
        while leased(db).await > 0 {
            tokio::task::yield_now().await;
        }
    }
    panic!("still pending after 50 passes: {total:?}");
}

/// Pending rows a sender still holds.
async fn leased(db: &TestDb) -> i64 {
    db.query_one(
        "SELECT count(*) FROM billing_usage_exports \
         WHERE state = 'pending' AND leased_until > now()",
        &[],
    )
    .await
    .get(0)
}

async fn pending(db: &TestDb) -> i64 {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM billing_usage_exports WHERE state = 'pending'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_month_of_usage_reaches_stripe_exactly_once_per_customer_hour() {
    let db = TestDb::migrated().await;
    let month = seed_month(&db, 30 * 24).await;
    let fake = FakeStripe::start().await.unwrap();
    let events = Route::post("/v1/billing/meter_events");
    fake.seed_faults(7);
    for (probability, fault) in [
        (0.05, Fault::ServerError),
        (
            0.03,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        ),
        (0.05, Fault::ResponseLost),
        (0.03, Fault::ResponseLost500),
        (0.01, Fault::Timeout),
    ] {
        fake.fail_randomly(events.clone(), probability, fault);
    }
    let report = export_until_done(&db, &stripe(&fake), at(month.end)).await;
    assert_eq!(fake.meter_event_totals(), month.usage);
    assert_eq!(
        report.sent + report.duplicates,
        month.usage.len() as u64,
        "{report:?}"
    );
    let faulted = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v1/billing/meter_events") && r.status != Some(200))
        .count();
    assert!(faulted > 100, "faults were injected: {faulted}");
    fake.clear_faults();

    // Nothing new: a second pass plans and sends nothing.
    let again = export_once(&db.pool, &config(), &stripe(&fake), at(month.end))
        .await
        .unwrap();
    assert_eq!(again, ExportReport::default());
    assert_eq!(month.customers.len(), 3);
}

/// Sends through Stripe, then "dies" before the exporter can record it: the
/// call never returns (the test's timeout cuts it off, as a killed process
/// would), for every `nth` event.
struct DiesAfterAccept {
    inner: StripeMeterEvents,
    nth: u32,
    calls: AtomicU32,
}

#[async_trait]
impl MeterEvents for DiesAfterAccept {
    async fn send(&self, event: &MeterEvent) -> Result<(), SendError> {
        self.inner.send(event).await?;
        if self
            .calls
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.nth)
        {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_exporter_that_dies_after_stripe_accepted_sends_nothing_twice() {
    let db = TestDb::migrated().await;
    let month = seed_month(&db, 48).await;
    let fake = FakeStripe::start().await.unwrap();
    let dying = DiesAfterAccept {
        inner: stripe(&fake),
        nth: 4,
        calls: AtomicU32::new(0),
    };
    export_until_done(&db, &dying, at(month.end)).await;
    assert_eq!(fake.meter_event_totals(), month.usage);
    let posts = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v1/billing/meter_events"))
        .count();
    assert!(
        posts > month.usage.len(),
        "every fourth event was sent again after its sender died: {posts} posts"
    );
}

#[tokio::test]
async fn two_exporters_at_once_never_send_an_event_twice() {
    let db = TestDb::migrated().await;
    let month = seed_month(&db, 72).await;
    let fake = FakeStripe::start().await.unwrap();
    let (a, b) = (stripe(&fake), stripe(&fake));
    let config = config();
    let (ra, rb) = tokio::join!(
        export_once(&db.pool, &config, &a, at(month.end)),
        export_once(&db.pool, &config, &b, at(month.end)),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.sent + rb.sent, month.usage.len() as u64, "{ra:?} {rb:?}");
    assert_eq!(ra.duplicates + rb.duplicates, 0, "no event was sent twice");
    assert_eq!(fake.meter_event_totals(), month.usage);
}

#[tokio::test]
async fn usage_that_arrives_after_its_hour_was_exported_is_sent_as_a_correction() {
    let db = TestDb::migrated().await;
    let mut month = seed_month(&db, 6).await;
    let fake = FakeStripe::start().await.unwrap();
    export_until_done(&db, &stripe(&fake), at(month.end)).await;

    // A spool replayed late: more units in an hour already exported.
    let (account, customer) = month.customers[0].clone();
    let hour = month.end - 2 * HOUR;
    db.execute(
        "INSERT INTO usage_rollup_minute (account_id, bucket, key_id, model, tier, requests, \
         failed_requests, prompt_tokens, completion_tokens, total_tokens, units) \
         VALUES ($1, to_timestamp($2::float8), $3, 'late', 'pro', 1, 0, 77, 0, 77, 77)",
        &[&account, &((hour + 300) as f64), &Uuid::now_v7()],
    )
    .await;
    *month.usage.entry((customer, hour)).or_default() += 77;
    let report = export_until_done(&db, &stripe(&fake), at(month.end)).await;
    assert_eq!((report.planned, report.sent), (1, 1), "{report:?}");
    assert_eq!(fake.meter_event_totals(), month.usage);
}

/// Each unit kind goes to its own meter, exactly once: tokens and images
/// of the same customer and hour are never added together.
#[tokio::test]
async fn each_unit_kind_reaches_its_own_meter_exactly_once() {
    const IMAGES_METER: &str = "tollgate_images";
    let db = TestDb::migrated().await;
    let end = last_closed_hour();
    let account = Uuid::now_v7();
    db.execute(
        "INSERT INTO accounts (id, name, tier) VALUES ($1, 'acme', 'pro')",
        &[&account],
    )
    .await;
    db.execute(
        "INSERT INTO billing_customers (account_id, stripe_customer_id) VALUES ($1, 'cus_acme')",
        &[&account],
    )
    .await;
    for (kind, units, minute) in [
        ("tokens", 1500_i64, 0),
        ("images", 12, 0),
        ("images", 3, 10),
    ] {
        db.execute(
            "INSERT INTO usage_rollup_minute (account_id, bucket, key_id, model, tier, unit_kind, \
             requests, failed_requests, prompt_tokens, completion_tokens, total_tokens, units) \
             VALUES ($1, to_timestamp($2::int8), $1, 'm', 'pro', $3, 1, 0, 0, 0, 0, $4)",
            &[&account, &(end - HOUR + minute * 60), &kind, &units],
        )
        .await;
    }
    let fake = FakeStripe::start().await.unwrap();
    let images = ExportConfig {
        unit_kind: "images".to_owned(),
        meter_event_name: IMAGES_METER.to_owned(),
        ..config()
    };
    for pass in 0..2 {
        for export in [config(), images.clone()] {
            let report = export_once(&db.pool, &export, &stripe(&fake), at(end))
                .await
                .unwrap();
            let expected = if pass == 0 { 1 } else { 0 };
            assert_eq!(
                (report.planned, report.sent),
                (expected, expected),
                "{export:?}"
            );
        }
    }
    let mut by_meter: BTreeMap<String, u64> = BTreeMap::new();
    for event in fake.meter_events() {
        *by_meter.entry(event.event_name).or_default() +=
            event.payload["value"].parse::<u64>().unwrap();
    }
    assert_eq!(
        by_meter,
        [(METER.to_owned(), 1500), (IMAGES_METER.to_owned(), 15)].into()
    );
}
