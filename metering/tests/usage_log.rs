//! The usage log against a real Postgres (a fresh database per test, the
//! migrations from `sql/`): the writer, the spool replay, partitions,
//! retention and the report queries.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use tollgate_metering::endpoint::Endpoint;
use tollgate_metering::event::{Status, Tokens, UsageEvent, UsageSource};
use tollgate_metering::journal::Journal;
use tollgate_metering::partitions;
use tollgate_metering::report::{self, GroupBy};
use tollgate_metering::spool::Spool;
use tollgate_metering::units::UnitKind;
use tollgate_metering::writer::{self, WriterConfig};
use tollgate_testkit::TestDb;
use uuid::Uuid;

fn config() -> WriterConfig {
    WriterConfig {
        channel_capacity: 10_000,
        batch_size: 500,
        flush_interval: Duration::from_millis(20),
        write_timeout: Duration::from_secs(5),
        journal_sync_interval: Duration::from_millis(100),
    }
}

fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// 2026-11-15T12:00:00Z
const MID_NOVEMBER: u64 = 1_795_262_400;

fn event(account: Uuid, created_at: SystemTime, prompt: u64, completion: u64) -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        created_at,
        request_id: Uuid::now_v7().to_string(),
        account_id: account,
        key_id: account,
        tier: "pro".to_owned(),
        model: "sim-model".to_owned(),
        backend: Some("b0".to_owned()),
        kind: Endpoint::ChatCompletions,
        status: Status::Ok,
        tokens: Tokens { prompt, completion },
        counted_prompt_tokens: Some(prompt),
        counted_completion_tokens: None,
        usage_source: UsageSource::Backend,
        unit_kind: UnitKind::Tokens,
        units: prompt + completion,
        latency_ms: 12,
        ttft_ms: Some(3),
    }
}

async fn count(pool: &Pool, sql: &str) -> i64 {
    pool.get()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// A journal of its own next to `spool` (each writer in these tests starts
/// afresh, with nothing of an earlier one's to replay).
fn journal_beside(spool: &Spool) -> Arc<Journal> {
    let dir = spool
        .path()
        .with_file_name(format!("journal-{}", Uuid::now_v7()));
    Arc::new(Journal::open(&dir, spool).unwrap().0)
}

/// Runs a writer over `events` (sent through the sink, then flushed).
async fn write_all(pool: &Pool, spool: Arc<Spool>, events: &[UsageEvent]) -> writer::UsageSink {
    let stats = writer::WriterStats::new().unwrap();
    let journal = journal_beside(&spool);
    let (sink, writer) = writer::channel(pool.clone(), spool, journal, config(), stats);
    tokio::spawn(writer.run(std::future::pending()));
    for event in events {
        sink.record(event.clone());
    }
    sink.flush().await;
    sink
}

#[tokio::test]
async fn writing_the_same_events_twice_stores_and_counts_them_once() {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let account = Uuid::now_v7();
    let events: Vec<_> = (0..1_000)
        .map(|i| event(account, at(MID_NOVEMBER + i), 10, 5))
        .collect();
    let sink = write_all(&db.pool, Arc::clone(&spool), &events).await;
    let again = write_all(&db.pool, spool, &events).await;
    assert_eq!(sink.stats().written.get(), 1_000);
    assert_eq!(again.stats().written.get(), 0);
    assert_eq!(again.stats().duplicates.get(), 1_000);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM usage_events").await,
        1_000
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT sum(requests)::int8 FROM usage_rollup_minute"
        )
        .await,
        1_000
    );
    for table in [
        "usage_rollup_minute",
        "usage_rollup_day",
        "usage_rollup_total_day",
    ] {
        let sql =
            format!("SELECT sum(requests)::int8 * 100000 + sum(total_tokens)::int8 FROM {table}");
        assert_eq!(
            count(&db.pool, &sql).await,
            1_000 * 100_000 + 15_000,
            "{table}"
        );
    }
}

/// Units of different kinds are stored with their kind and rolled up apart
/// (an image is never added to tokens), and the reports total them by kind.
#[tokio::test]
async fn units_of_each_kind_are_rolled_up_apart() {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let account = Uuid::now_v7();
    let image = |i| UsageEvent {
        kind: Endpoint::ImageGenerations,
        tokens: Tokens::default(),
        counted_prompt_tokens: None,
        usage_source: UsageSource::None,
        unit_kind: UnitKind::Images,
        units: 2,
        ..event(account, at(MID_NOVEMBER + i), 0, 0)
    };
    let mut events: Vec<_> = (0..10).map(image).collect();
    events.extend((0..5).map(|i| event(account, at(MID_NOVEMBER + i), 10, 5)));
    write_all(&db.pool, spool, &events).await;
    for table in [
        "usage_rollup_minute",
        "usage_rollup_day",
        "usage_rollup_total_day",
    ] {
        let sql = format!(
            "SELECT string_agg(unit_kind || '=' || requests || '/' || units, ',' ORDER BY unit_kind) \
             FROM (SELECT unit_kind, sum(requests) AS requests, sum(units) AS units \
                   FROM {table} GROUP BY 1) AS k"
        );
        let client = db.pool.get().await.unwrap();
        let by_kind: String = client.query_one(&sql, &[]).await.unwrap().get(0);
        assert_eq!(by_kind, "images=10/20,tokens=5/75", "{table}");
    }
    let client = db.pool.get().await.unwrap();
    let totals = report::totals(
        &client,
        Some(account),
        at(MID_NOVEMBER - 3600),
        at(MID_NOVEMBER + 3600),
        GroupBy::Total,
    )
    .await
    .unwrap();
    assert_eq!(totals.len(), 1);
    assert_eq!((totals[0].requests, totals[0].units), (15, 75));
    assert_eq!(
        totals[0].units_by_kind,
        [(UnitKind::Images, 20), (UnitKind::Tokens, 75)].into()
    );
}

/// A prompt count handed to the writer (the check beside a backend's own
/// figure, made off the request path) is stored with its event.
#[tokio::test]
async fn a_prompt_count_left_to_the_writer_is_stored_with_its_event() {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let stats = writer::WriterStats::new().unwrap();
    let journal = journal_beside(&spool);
    let (sink, writer) = writer::channel(db.pool.clone(), spool, journal, config(), stats);
    tokio::spawn(writer.run(std::future::pending()));
    let account = Uuid::now_v7();
    for i in 0..3 {
        let mut later = event(account, at(MID_NOVEMBER + i), 10, 5);
        later.counted_prompt_tokens = None;
        sink.record_with_count(later, Some(Box::new(move || 100 + i)));
    }
    let mut without = event(account, at(MID_NOVEMBER + 3), 10, 5);
    without.counted_prompt_tokens = None;
    sink.record(without);
    sink.flush().await;
    let stored = count(
        &db.pool,
        "SELECT coalesce(sum(counted_prompt_tokens), -1)::int8 * 10 + count(counted_prompt_tokens) \
         FROM usage_events",
    )
    .await;
    assert_eq!(stored, (100 + 101 + 102) * 10 + 3);
}

#[tokio::test]
async fn a_spool_left_behind_is_replayed_exactly_once() {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let account = Uuid::now_v7();
    let events: Vec<_> = (0..300)
        .map(|i| event(account, at(MID_NOVEMBER + i), 1, 1))
        .collect();
    {
        // A previous process spooled these (and wrote the first 100 already).
        let spool = Spool::open(dir.path()).unwrap();
        let payloads: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap())
            .collect();
        spool.append(payloads.iter().map(Vec::as_slice)).unwrap();
        spool.sync().unwrap();
    }
    let elsewhere = tempfile::tempdir().unwrap();
    write_all(
        &db.pool,
        Arc::new(Spool::open(elsewhere.path()).unwrap()),
        &events[..100],
    )
    .await;
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    assert_eq!(spool.len(), 300);
    // No event sent: the flush stores what the previous process spooled.
    write_all(&db.pool, Arc::clone(&spool), &[]).await;
    assert!(spool.is_empty());
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM usage_events").await,
        300
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT sum(requests)::int8 FROM usage_rollup_minute"
        )
        .await,
        300
    );
}

#[tokio::test]
async fn a_month_without_a_partition_gets_one_on_demand() {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let account = Uuid::now_v7();
    // 2024-02-10: long before the partitions the migration created.
    let old = event(account, at(1_707_566_400), 7, 3);
    write_all(&db.pool, spool, std::slice::from_ref(&old)).await;
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM usage_events_2024_02").await,
        1
    );
}

#[tokio::test]
async fn partitions_ahead_are_created_and_purge_drops_whole_old_months() {
    let db = TestDb::migrated().await;
    let client = db.pool.get().await.unwrap();
    let names = partitions::ensure_ahead(&client).await.unwrap();
    assert_eq!(names.len(), 1 + partitions::MONTHS_AHEAD as usize);

    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let account = Uuid::now_v7();
    // 2026-09-15, 2026-10-15, and 2026-11-01..02 (the cutoff's month).
    let mut events = vec![
        event(account, at(1_789_473_600), 1, 0),
        event(account, at(1_792_065_600), 1, 0),
    ];
    let november = 1_793_491_200;
    events.extend((0..25_000).map(|i| event(account, at(november + i * 5), 1, 0)));
    write_all(&db.pool, spool, &events).await;

    // Cut off at 2026-11-01T12:00:00Z: Sep and Oct go whole, Nov in batches.
    let cutoff = at(november + 12 * 3600);
    let purged = partitions::purge(&db.pool, cutoff).await.unwrap();
    assert_eq!(
        purged.partitions,
        ["usage_events_2026_09", "usage_events_2026_10"]
    );
    assert_eq!(purged.rows, 12 * 3600 / 5);
    let left = count(&db.pool, "SELECT count(*) FROM usage_events").await;
    assert_eq!(left, 25_000 - 12 * 3600 / 5);
    let early = client
        .query_one(
            "SELECT count(*) FROM usage_events WHERE created_at < $1",
            &[&cutoff],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(early, 0);
    // Rollups keep their own retention: untouched.
    assert_eq!(
        count(
            &db.pool,
            "SELECT sum(requests)::int8 FROM usage_rollup_minute"
        )
        .await,
        25_002
    );
    // Purging again removes nothing more.
    let again = partitions::purge(&db.pool, cutoff).await.unwrap();
    assert_eq!(again, partitions::Purged::default());
}

#[tokio::test]
async fn per_account_queries_use_their_indexes() {
    let db = TestDb::migrated().await;
    let client = db.pool.get().await.unwrap();
    // A fixed month: its partition exists only once asked for, whatever
    // today's date (the migration creates the current month's and later).
    partitions::ensure(&client, at(MID_NOVEMBER)).await.unwrap();
    // Enough rows, and fresh statistics, that a scan would be the planner's
    // choice if the index did not serve the query.
    client
        .batch_execute(&format!(
            "INSERT INTO usage_events
                 (event_id, created_at, request_id, account_id, key_id, tier, model, kind, status,
                  prompt_tokens, completion_tokens, total_tokens, usage_source, units, latency_ms)
             SELECT gen_random_uuid(), to_timestamp({MID_NOVEMBER}) + make_interval(secs => g % 100000),
                    'r' || g, md5((g % 500)::text)::uuid, md5((g % 500)::text)::uuid, 'pro',
                    'sim-model', 'chat', 'ok', 10, 5, 15, 'backend', 15, 10
             FROM generate_series(1, 100000) AS g;
             INSERT INTO usage_rollup_minute
             SELECT date_trunc('minute', created_at), account_id, key_id, model, tier, count(*), 0,
                    sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(units)
             FROM usage_events GROUP BY 1, 2, 3, 4, 5;
             INSERT INTO usage_rollup_day
             SELECT date_trunc('day', bucket, 'UTC'), account_id, key_id, model, tier, sum(requests),
                    0, sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(units)
             FROM usage_rollup_minute GROUP BY 1, 2, 3, 4, 5;
             ANALYZE usage_events; ANALYZE usage_rollup_minute; ANALYZE usage_rollup_day;"
        ))
        .await
        .unwrap();
    let account: Uuid = client
        .query_one("SELECT md5('7')::uuid", &[])
        .await
        .unwrap()
        .get(0);
    let explain = |sql: String| {
        let client = &client;
        async move {
            let rows = client.query(&format!("EXPLAIN {sql}"), &[]).await.unwrap();
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let period = format!(
        "to_timestamp({MID_NOVEMBER}) AND created_at < to_timestamp({})",
        MID_NOVEMBER + 86_400
    );
    let raw = explain(format!(
        "SELECT * FROM usage_events WHERE account_id = '{account}' AND created_at >= {period}"
    ))
    .await;
    assert!(
        raw.contains("usage_events_2026_11_account_id_created_at_idx"),
        "{raw}"
    );
    assert!(!raw.contains("Seq Scan"), "{raw}");
    let rollup = explain(format!(
        "SELECT sum(units) FROM usage_rollup_minute WHERE account_id = '{account}'
         AND bucket >= to_timestamp({MID_NOVEMBER}) AND bucket < to_timestamp({})",
        MID_NOVEMBER + 86_400
    ))
    .await;
    assert!(rollup.contains("usage_rollup_minute_pkey"), "{rollup}");
    assert!(!rollup.contains("Seq Scan"), "{rollup}");
    let daily = explain(format!(
        "SELECT sum(units) FROM usage_rollup_day WHERE account_id = '{account}'
         AND bucket >= to_timestamp({MID_NOVEMBER}) AND bucket < to_timestamp({})",
        MID_NOVEMBER + 86_400 * 30
    ))
    .await;
    assert!(daily.contains("usage_rollup_day_pkey"), "{daily}");
    assert!(!daily.contains("Seq Scan"), "{daily}");

    // And the report functions answer from them: two whole days from the day
    // rollups, the edges from the minute rollups, adding up to the raw log.
    let totals = report::totals(
        &client,
        Some(account),
        at(MID_NOVEMBER),
        at(MID_NOVEMBER + 200_000),
        GroupBy::Model,
    )
    .await
    .unwrap();
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[0].requests, 200);
    assert_eq!(totals[0].units, 200 * 15);
    let events = report::account_events(
        &client,
        account,
        at(MID_NOVEMBER),
        at(MID_NOVEMBER + 200_000),
        10,
    )
    .await
    .unwrap();
    assert_eq!(events.len(), 10);
    assert!(
        events
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at)
    );
}
