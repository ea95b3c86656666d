//! The usage log on this machine's Postgres:
//!
//! 1. the writer's sustained rate: `EVENTS` events recorded through the sink as
//!    the request path does, until flushed into Postgres (rows and rollups), for
//!    `ROUNDS` rounds; the median is reported;
//! 2. report latency over a large log: `LOG_ROWS` events (10 million by
//!    default) across 1,000 accounts in the current month, loaded through the
//!    writer (so with their rollups); then `QUERIES` runs of each report query
//!    for random accounts, p50 / p99.
//!
//! `cargo bench -p tollgate-metering --bench usage_log` (settings by env:
//! EVENTS, ROUNDS, BATCH (the writer's batch size, 10000), LOG_ROWS (0 skips
//! part 2), QUERIES; needs Postgres at
//! DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres; makes and
//! drops its own database). Smaller: `LOG_ROWS=1000000 cargo bench …`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark's setup fails the run by panicking"
)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tollgate_metering::endpoint::Endpoint;
use tollgate_metering::event::{Status, Tokens, UsageEvent, UsageSource};
use tollgate_metering::journal::Journal;
use tollgate_metering::partitions;
use tollgate_metering::report::{self, GroupBy};
use tollgate_metering::spool::Spool;
use tollgate_metering::units::UnitKind;
use tollgate_metering::writer::{self, WriterConfig, WriterStats};
use tollgate_testkit::TestDb;
use uuid::Uuid;

const ACCOUNTS: u64 = 1_000;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn account(i: u64) -> Uuid {
    Uuid::from_u64_pair(0x70_11_6a_7e, i % ACCOUNTS)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = TestDb::migrated().await;
        writer_rate(&db).await;
        if setting("LOG_ROWS", 1) > 0 {
            query_latency(&db).await;
        }
    });
}

/// The `i`th bench event: 1,000 accounts, two models, created at `created_at`.
fn event(i: u64, created_at: SystemTime, tag: &str) -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        created_at,
        request_id: format!("bench-{tag}-{i}"),
        account_id: account(i),
        key_id: account(i),
        tier: "pro".to_owned(),
        model: if i.is_multiple_of(3) {
            "model-a"
        } else {
            "model-b"
        }
        .to_owned(),
        backend: Some("gpu-a".to_owned()),
        kind: Endpoint::ChatCompletions,
        status: Status::Ok,
        tokens: Tokens {
            prompt: 100 + i % 50,
            completion: 20 + i % 30,
        },
        counted_prompt_tokens: Some(100 + i % 50),
        counted_completion_tokens: None,
        usage_source: UsageSource::Backend,
        unit_kind: UnitKind::Tokens,
        units: 120 + i % 80,
        latency_ms: 40,
        ttft_ms: Some(5),
    }
}

/// Records `events` through a fresh sink, as the request path does, and
/// returns how long until all of them were in Postgres.
async fn write(db: &TestDb, events: Vec<UsageEvent>) -> Duration {
    let count = events.len() as u64;
    let dir = std::env::temp_dir().join(format!("tollgate-bench-spool-{}", std::process::id()));
    let spool = Arc::new(Spool::open(&dir).unwrap());
    let config = WriterConfig {
        channel_capacity: events.len().max(1),
        batch_size: setting("BATCH", 10_000) as usize,
        flush_interval: Duration::from_millis(200),
        write_timeout: Duration::from_secs(30),
        journal_sync_interval: Duration::from_millis(200),
    };
    let stats = WriterStats::new().unwrap();
    let (journal, _) = Journal::open(&dir.join("journal"), &spool).unwrap();
    let (sink, task) = writer::channel(db.pool.clone(), spool, Arc::new(journal), config, stats);
    let running = tokio::spawn(task.run(std::future::pending()));
    let started = Instant::now();
    for event in events {
        sink.record(event);
    }
    sink.flush().await;
    let elapsed = started.elapsed();
    assert_eq!(sink.stats().written.get(), count, "every event written");
    assert_eq!(sink.stats().spooled.get(), 0, "nothing spooled");
    running.abort();
    let _ = std::fs::remove_dir_all(&dir);
    elapsed
}

async fn writer_rate(db: &TestDb) {
    let events = setting("EVENTS", 200_000);
    let rounds = setting("ROUNDS", 3);
    let now = SystemTime::now();
    let mut rates = Vec::new();
    for round in 0..rounds {
        let batch = (0..events)
            .map(|i| {
                event(
                    i,
                    now - Duration::from_millis(i % 60_000),
                    &round.to_string(),
                )
            })
            .collect();
        let elapsed = write(db, batch).await;
        let rate = events as f64 / elapsed.as_secs_f64();
        println!("writer round {round}: {events} events in {elapsed:.2?} = {rate:.0} events/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "writer: median {:.0} events/s over {rounds} rounds",
        rates[rates.len() / 2]
    );
}

async fn query_latency(db: &TestDb) {
    let rows = setting("LOG_ROWS", 10_000_000);
    let queries = setting("QUERIES", 200);
    let client = db.pool.get().await.unwrap();
    let month_start = partitions::month_start(SystemTime::now());
    let span = SystemTime::now()
        .duration_since(month_start)
        .unwrap()
        .max(Duration::from_secs(3_600));
    let loading = Instant::now();
    // Through the writer itself, in chunks, spread evenly over the month so far.
    const CHUNK: u64 = 500_000;
    for first in (0..rows).step_by(CHUNK as usize) {
        let chunk = (first..(first + CHUNK).min(rows))
            .map(|i| {
                event(
                    i,
                    month_start + span.mul_f64(i as f64 / rows as f64),
                    "load",
                )
            })
            .collect();
        write(db, chunk).await;
    }
    // One statement per call: VACUUM cannot run in the implicit transaction
    // of a multi-statement batch.
    for table in [
        "usage_events",
        "usage_rollup_minute",
        "usage_rollup_day",
        "usage_rollup_total_day",
    ] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .unwrap();
    }
    let stored: i64 = client
        .query_one("SELECT count(*) FROM usage_events", &[])
        .await
        .unwrap()
        .get(0);
    let count = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    println!(
        "loaded {stored} events ({} minute and {} day rollup rows) in {:.0?}",
        count("usage_rollup_minute").await,
        count("usage_rollup_day").await,
        loading.elapsed()
    );

    let now = SystemTime::now();
    let pick = |i: u64| account(i.wrapping_mul(7_919));
    let client = &client;
    time_queries(
        "per-account usage this month (rollups)",
        queries,
        async |i| {
            report::totals(client, Some(pick(i)), month_start, now, GroupBy::Total)
                .await
                .unwrap();
        },
    )
    .await;
    time_queries(
        "per-account usage this month by model (rollups)",
        queries,
        async |i| {
            report::totals(client, Some(pick(i)), month_start, now, GroupBy::Model)
                .await
                .unwrap();
        },
    )
    .await;
    time_queries(
        "stats: last-60-s rpm/tpm and units this month (rollups)",
        queries,
        async |_| {
            report::live_stats(client).await.unwrap();
        },
    )
    .await;
    time_queries(
        "per-account latest 100 events (raw log)",
        queries,
        async |i| {
            report::account_events(client, pick(i), month_start, now, 100)
                .await
                .unwrap();
        },
    )
    .await;
}

/// Runs `query` `runs` times and prints its p50 and p99.
async fn time_queries(name: &str, runs: u64, query: impl AsyncFn(u64)) {
    let mut samples = Vec::new();
    for i in 0..runs {
        let started = Instant::now();
        query(i).await;
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name}: p50 {:.2} ms, p99 {:.2} ms ({runs} runs)",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
    );
}
