//! What recording a usage event costs the request path, before and after the
//! write-ahead journal: a `try_send` into the writer's channel (all recording
//! was before), and `UsageSink::record` now (serialise the event, append it
//! to the journal with one `pwrite` into the page cache, then the same
//! `try_send`). No writer drains the channel and nothing is fsynced: the
//! request path does neither.
//!
//! `cargo bench -p tollgate-metering --bench journal`

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark's setup fails the run by panicking"
)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate_metering::endpoint::Endpoint;
use tollgate_metering::event::{Status, Tokens, UsageEvent, UsageSource};
use tollgate_metering::journal::Journal;
use tollgate_metering::spool::Spool;
use tollgate_metering::units::UnitKind;
use tollgate_metering::writer::{self, WriterConfig, WriterStats};
use uuid::Uuid;

/// Events per timed batch: each batch gets a fresh journal, so the files a
/// long run appends stay a few tens of MiB.
const BATCH: u64 = 50_000;

/// An event shaped like a chat completion's.
fn event() -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        created_at: SystemTime::now(),
        request_id: "01938f0e-7c3a-7d2e-9b1a-5f0c2e8d4a11".to_owned(),
        account_id: Uuid::now_v7(),
        key_id: Uuid::now_v7(),
        tier: "pro".to_owned(),
        model: "llama-3.1-8b-instruct".to_owned(),
        backend: Some("gpu-a".to_owned()),
        kind: Endpoint::ChatCompletions,
        status: Status::Ok,
        tokens: Tokens {
            prompt: 812,
            completion: 240,
        },
        counted_prompt_tokens: Some(812),
        counted_completion_tokens: None,
        usage_source: UsageSource::Backend,
        unit_kind: UnitKind::Tokens,
        units: 1052,
        latency_ms: 912,
        ttft_ms: Some(41),
    }
}

fn recording(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("record a usage event");
    group.bench_function("before: try_send into the channel", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for batch in batches(iterations) {
                let (sender, receiver) = tokio::sync::mpsc::channel(batch as usize);
                let events: Vec<_> = (0..batch).map(|_| event()).collect();
                let started = Instant::now();
                for event in events {
                    sender.try_send(event).unwrap();
                }
                total += started.elapsed();
                drop(receiver);
            }
            total
        });
    });
    group.bench_function("now: journal append, then try_send", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for batch in batches(iterations) {
                let dir = tempfile::tempdir().unwrap();
                let spool = Arc::new(Spool::open(dir.path()).unwrap());
                let (journal, _) = Journal::open(&dir.path().join("journal"), &spool).unwrap();
                let config = WriterConfig {
                    channel_capacity: batch as usize,
                    batch_size: 1000,
                    flush_interval: Duration::from_secs(60),
                    write_timeout: Duration::from_secs(5),
                    journal_sync_interval: Duration::from_secs(60),
                };
                // Never connected to: no writer runs.
                let pool = deadpool_postgres::Config {
                    dbname: Some("unused".to_owned()),
                    ..deadpool_postgres::Config::new()
                }
                .create_pool(None, tokio_postgres::NoTls)
                .unwrap();
                let (sink, writer) = writer::channel(
                    pool,
                    spool,
                    Arc::new(journal),
                    config,
                    WriterStats::new().unwrap(),
                );
                let events: Vec<_> = (0..batch).map(|_| event()).collect();
                let started = Instant::now();
                for event in events {
                    sink.record(event);
                }
                total += started.elapsed();
                drop(writer);
            }
            total
        });
    });
    group.finish();
}

/// `iterations` as batches of at most [`BATCH`].
fn batches(iterations: u64) -> impl Iterator<Item = u64> {
    (0..iterations.div_ceil(BATCH)).map(move |i| (iterations - i * BATCH).min(BATCH))
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = recording
}
criterion_main!(benches);
