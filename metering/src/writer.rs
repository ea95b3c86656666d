//! From the request path to Postgres without waiting and without losing an event.
//!
//! The request path calls [`UsageSink::record`], a non-blocking `try_send`
//! into a bounded channel. One [`UsageWriter`] task drains it in batches (a
//! size trigger and a time trigger) and writes each batch with one
//! `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING` whose `RETURNING`
//! rows feed the minute rollups in the same statement: an event written twice
//! is inserted once and counted once.
//!
//! When Postgres fails or is slower than `write_timeout`, the batch goes to the
//! durable [`Spool`] instead; so does an event that finds the channel full.
//! While the spool holds anything, new batches are appended behind it and the
//! writer replays it oldest-first, so events reach Postgres in the order they
//! were spooled. A spool left by a previous process is replayed the same way.
//!
//! Durability: `record` first appends the event to the write-ahead
//! [`Journal`] (the page cache, which outlives the process), so from the
//! moment it returns a crash cannot lose the event: the next start replays
//! the journal. The writer settles each event in the journal once it is in
//! Postgres or the spool, and `fdatasync`s the journal every
//! `journal_sync_interval` against power loss. SIGTERM flushes the channel
//! ([`UsageSink::flush_for_exit`]). If neither the journal nor the spool can
//! be written, the request path keeps serving: the event is counted in
//! `lost` and logged at error level.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::event::UsageEvent;
use crate::journal::{Journal, JournalMark};
use crate::metric_names;
use crate::partitions;
use crate::spool::Spool;

/// Writer settings (`[metering]` in the config).
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Events waiting in memory before new ones go straight to the spool.
    pub channel_capacity: usize,
    /// Events per Postgres statement.
    pub batch_size: usize,
    /// A batch is written at the latest this long after its first event.
    pub flush_interval: Duration,
    /// A write slower than this counts as failed: the batch is spooled.
    pub write_timeout: Duration,
    /// How often the journal is synced to disk: the most a power loss can
    /// take (a process crash takes nothing).
    pub journal_sync_interval: Duration,
}

/// The writer's counters, exported as Prometheus metrics (register them with
/// [`WriterStats::register`]) and read by tests.
#[derive(Debug, Clone)]
pub struct WriterStats {
    /// Events inserted into Postgres (replays of already-stored events excluded).
    pub written: IntCounter,
    /// Events that were already stored when written again (replays).
    pub duplicates: IntCounter,
    /// Batches written to Postgres.
    pub batches: IntCounter,
    /// Events appended to the spool.
    pub spooled: IntCounter,
    /// Spooled events replayed into Postgres.
    pub replayed: IntCounter,
    /// Events neither written nor spooled: lost.
    pub lost: IntCounter,
    /// Failed Postgres writes.
    pub write_errors: IntCounter,
    /// Failed journal appends or syncs (the event then lives in memory only
    /// until it is written, as without a journal).
    pub journal_errors: IntCounter,
    /// Events in the spool now, waiting for replay.
    pub spool_events: IntGauge,
}

impl WriterStats {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            written: IntCounter::new(
                metric_names::USAGE_EVENTS_WRITTEN_TOTAL,
                "Usage events inserted into Postgres.",
            )?,
            duplicates: IntCounter::new(
                metric_names::USAGE_EVENTS_DUPLICATE_TOTAL,
                "Usage events written again and ignored because they were already stored.",
            )?,
            batches: IntCounter::new(
                metric_names::USAGE_WRITER_BATCHES_TOTAL,
                "Batches of usage events written to Postgres.",
            )?,
            spooled: IntCounter::new(
                metric_names::USAGE_EVENTS_SPOOLED_TOTAL,
                "Usage events appended to the local spool.",
            )?,
            replayed: IntCounter::new(
                metric_names::USAGE_EVENTS_REPLAYED_TOTAL,
                "Spooled usage events replayed into Postgres.",
            )?,
            lost: IntCounter::new(
                metric_names::USAGE_EVENTS_LOST_TOTAL,
                "Usage events neither written to Postgres nor spooled.",
            )?,
            write_errors: IntCounter::new(
                metric_names::USAGE_WRITE_ERRORS_TOTAL,
                "Failed or timed-out usage writes to Postgres.",
            )?,
            journal_errors: IntCounter::new(
                metric_names::USAGE_JOURNAL_ERRORS_TOTAL,
                "Failed appends to or syncs of the usage write-ahead journal.",
            )?,
            spool_events: IntGauge::new(
                metric_names::USAGE_SPOOL_EVENTS,
                "Usage events in the spool awaiting replay.",
            )?,
        })
    }

    /// Adds every metric to `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        for counter in [
            &self.written,
            &self.duplicates,
            &self.batches,
            &self.spooled,
            &self.replayed,
            &self.lost,
            &self.write_errors,
            &self.journal_errors,
        ] {
            registry.register(Box::new(counter.clone()))?;
        }
        registry.register(Box::new(self.spool_events.clone()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    Now,
    ForExit,
}

/// Counts a request's prompt for the event's `counted_prompt_tokens`: the
/// check beside a backend's own figure, which the writer runs off the
/// request path, on the blocking pool, before the event is written. An
/// event that reaches the spool straight from the request path goes without.
pub type PromptCount = Box<dyn FnOnce() -> u64 + Send>;

/// An event on its way to Postgres, and where the journal holds it.
struct Recorded {
    event: UsageEvent,
    /// `None` when the journal could not take it.
    mark: Option<JournalMark>,
    count: Option<PromptCount>,
}

/// Events taken from the channel and not yet written.
#[derive(Default)]
struct Batch {
    events: Vec<UsageEvent>,
    marks: Vec<JournalMark>,
    /// Prompt counts still to run, by index in `events`.
    counts: Vec<(usize, PromptCount)>,
}

impl Batch {
    fn push(&mut self, recorded: Recorded) {
        if let Some(count) = recorded.count {
            self.counts.push((self.events.len(), count));
        }
        self.events.push(recorded.event);
        self.marks.extend(recorded.mark);
    }

    fn extend(&mut self, received: &mut Vec<Recorded>) {
        for recorded in received.drain(..) {
            self.push(recorded);
        }
    }

    /// Runs the batch's prompt counts, all in one trip to the blocking pool.
    async fn count_prompts(&mut self) {
        if self.counts.is_empty() {
            return;
        }
        let counts = std::mem::take(&mut self.counts);
        let counted = tokio::task::spawn_blocking(move || {
            counts
                .into_iter()
                .map(|(index, count)| (index, count()))
                .collect::<Vec<_>>()
        })
        .await;
        match counted {
            Ok(counted) => {
                for (index, tokens) in counted {
                    if let Some(event) = self.events.get_mut(index) {
                        event.counted_prompt_tokens = Some(tokens);
                    }
                }
            }
            // A check, not a billed figure: the events go without it.
            Err(error) => tracing::error!("prompt counts failed: {error}"),
        }
    }

    fn len(&self) -> usize {
        self.events.len()
    }
}

/// The request path's handle: cheap to clone, never waits.
#[derive(Clone)]
pub struct UsageSink {
    events: mpsc::Sender<Recorded>,
    flushes: mpsc::Sender<(Flush, oneshot::Sender<()>)>,
    spool: Arc<Spool>,
    journal: Arc<Journal>,
    stats: Arc<WriterStats>,
}

/// The background task that owns the channel's receiving end.
pub struct UsageWriter {
    events: mpsc::Receiver<Recorded>,
    flushes: mpsc::Receiver<(Flush, oneshot::Sender<()>)>,
    spool: Arc<Spool>,
    journal: Arc<Journal>,
    pool: Pool,
    config: WriterConfig,
    stats: Arc<WriterStats>,
    /// Months whose partition is known to exist.
    partitions: BTreeSet<i64>,
    /// No spool replay before this instant (backoff while Postgres is down).
    replay_after: Instant,
    /// A flush was asked for: the process is about to exit.
    shutting_down: bool,
}

/// Backoff between replay attempts while Postgres is unavailable.
const REPLAY_BACKOFF: Duration = Duration::from_secs(1);
/// Spool batches replayed before the writer looks at its channel again.
const REPLAY_BATCHES_PER_TURN: usize = 8;
/// How long a shutdown flush may try Postgres before spooling instead.
const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Creates the sink for the request path and the writer to run in the background.
pub fn channel(
    pool: Pool,
    spool: Arc<Spool>,
    journal: Arc<Journal>,
    config: WriterConfig,
    stats: WriterStats,
) -> (UsageSink, UsageWriter) {
    let (events_tx, events_rx) = mpsc::channel(config.channel_capacity);
    // Flush requests come from shutdown (and tests): a handful at most.
    let (flush_tx, flush_rx) = mpsc::channel(4);
    let stats = Arc::new(stats);
    let sink = UsageSink {
        events: events_tx,
        flushes: flush_tx,
        spool: Arc::clone(&spool),
        journal: Arc::clone(&journal),
        stats: Arc::clone(&stats),
    };
    let writer = UsageWriter {
        events: events_rx,
        flushes: flush_rx,
        spool,
        journal,
        pool,
        config,
        stats: Arc::clone(&stats),
        partitions: BTreeSet::new(),
        replay_after: Instant::now(),
        shutting_down: false,
    };
    (sink, writer)
}

impl UsageSink {
    /// Hands one event to the writer without waiting, once it is in the
    /// journal: through the channel, or when it is full (or the writer is
    /// gone) into the spool.
    pub fn record(&self, event: UsageEvent) {
        self.record_with_count(event, None);
    }

    /// [`Self::record`], with the event's prompt count to run in the writer.
    pub fn record_with_count(&self, event: UsageEvent, count: Option<PromptCount>) {
        let Some(payload) = serialize(&self.stats, &event) else {
            return;
        };
        let mark = match self.journal.append(&payload) {
            Ok(mark) => Some(mark),
            Err(error) => {
                self.stats.journal_errors.inc();
                tracing::error!(
                    "usage journal append failed; the event is in memory only: {error}"
                );
                None
            }
        };
        let recorded = match self.events.try_send(Recorded { event, mark, count }) {
            Ok(()) => return,
            Err(
                mpsc::error::TrySendError::Full(recorded)
                | mpsc::error::TrySendError::Closed(recorded),
            ) => recorded,
        };
        if append_to_spool(&self.spool, &self.stats, vec![payload], false) {
            self.journal.settle(recorded.mark);
        }
    }

    /// Waits until every event recorded before this call is in Postgres or
    /// in the spool (synced), and the spool is replayed as far as Postgres
    /// takes it: with Postgres up, everything is stored when this returns.
    pub async fn flush(&self) {
        self.request_flush(Flush::Now).await;
    }

    /// [`flush`](Self::flush) before the process exits, after the last
    /// request finished: a write slower than 2 s goes to the spool instead,
    /// and the spool is left for the next start to replay, so this ends soon.
    pub async fn flush_for_exit(&self) {
        self.request_flush(Flush::ForExit).await;
    }

    async fn request_flush(&self, kind: Flush) {
        let (done, flushed) = oneshot::channel();
        if self.flushes.send((kind, done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

/// The event as the spool and the journal store it; `None` (counted as
/// lost) only if it cannot be serialised, which these plain types rule out.
fn serialize(stats: &WriterStats, event: &UsageEvent) -> Option<Vec<u8>> {
    match serde_json::to_vec(event) {
        Ok(payload) => Some(payload),
        Err(error) => {
            stats.lost.inc();
            tracing::error!("USAGE EVENT LOST: not serialisable: {error}");
            None
        }
    }
}

/// Appends `payloads` to the spool; counts them as spooled or lost and says
/// whether they were spooled. The writer syncs (`fdatasync`) after each
/// batch it spools; the request path only appends, so it never waits on the
/// disk (its records survive a process crash at once, and power loss from
/// the writer's next sync).
fn append_to_spool(spool: &Spool, stats: &WriterStats, payloads: Vec<Vec<u8>>, sync: bool) -> bool {
    let count = payloads.len() as u64;
    if let Err(error) = spool.append(payloads.iter().map(Vec::as_slice)) {
        stats.lost.inc_by(count);
        tracing::error!(
            events = count,
            "USAGE EVENTS LOST: neither Postgres nor the spool could take them: {error}"
        );
        return false;
    }
    stats.spooled.inc_by(count);
    stats.spool_events.set(spool.len() as i64);
    if sync && let Err(error) = spool.sync() {
        // Written, so replayed after a crash; only a power loss could take them now.
        tracing::error!("usage spool sync failed: {error}");
    }
    true
}

impl UsageWriter {
    /// Runs until `shutdown` resolves or every sink is dropped, then writes
    /// what is left (to Postgres if it answers quickly, else to the spool).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        self.stats.spool_events.set(self.spool.len() as i64);
        if !self.spool.is_empty() {
            tracing::info!(
                events = self.spool.len(),
                "replaying the usage spool left by a previous run"
            );
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let mut batch = Batch::default();
        let mut received = Vec::with_capacity(self.config.batch_size);
        let mut journal_sync = tokio::time::interval(self.config.journal_sync_interval);
        journal_sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some((kind, done)) = self.flushes.recv() => {
                    if kind == Flush::ForExit {
                        self.prepare_exit();
                    }
                    self.drain_channel(&mut batch).await;
                    self.deliver(&mut batch).await;
                    // Not at exit: what is spooled goes in too, as far as
                    // Postgres takes it (a failure sets `replay_after` ahead).
                    while kind == Flush::Now
                        && !self.spool.is_empty()
                        && Instant::now() >= self.replay_after
                    {
                        self.replay().await;
                    }
                    let _ = done.send(());
                    continue;
                }
                _ = journal_sync.tick() => {
                    self.sync_journal().await;
                    continue;
                }
                count = self.events.recv_many(&mut received, self.config.batch_size) => {
                    if count == 0 {
                        break;
                    }
                    batch.extend(&mut received);
                }
                () = tokio::time::sleep_until(self.replay_after),
                    if !self.shutting_down && !self.spool.is_empty() => {
                    self.replay().await;
                    continue;
                }
            }
            // Fill the batch until it is full or its first event has waited
            // the flush interval.
            let deadline = Instant::now() + self.config.flush_interval;
            while batch.len() < self.config.batch_size {
                let room = self.config.batch_size - batch.len();
                match tokio::time::timeout_at(deadline, self.events.recv_many(&mut received, room))
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => batch.extend(&mut received),
                }
            }
            self.deliver(&mut batch).await;
        }
        self.prepare_exit();
        self.drain_channel(&mut batch).await;
        self.deliver(&mut batch).await;
        self.sync_journal().await;
        // Everything is in Postgres or the spool: the journal has nothing the
        // next start would need.
        self.journal.close();
        while let Ok((_, done)) = self.flushes.try_recv() {
            let _ = done.send(());
        }
    }

    /// From now on, end soon: short writes, no spool replay.
    fn prepare_exit(&mut self) {
        self.shutting_down = true;
        self.config.write_timeout = self.config.write_timeout.min(SHUTDOWN_WRITE_TIMEOUT);
    }

    /// `fdatasync` of the journal (and rotation), on the blocking pool.
    async fn sync_journal(&self) {
        let journal = Arc::clone(&self.journal);
        let synced = tokio::task::spawn_blocking(move || journal.sync_and_rotate()).await;
        if let Ok(Err(error)) = synced {
            self.stats.journal_errors.inc();
            tracing::error!("usage journal sync failed: {error}");
        }
    }

    /// Moves every event waiting in the channel into batches, writing full ones.
    async fn drain_channel(&mut self, batch: &mut Batch) {
        while let Ok(recorded) = self.events.try_recv() {
            batch.push(recorded);
            if batch.len() >= self.config.batch_size {
                self.deliver(batch).await;
            }
        }
    }

    /// Writes a batch: to Postgres when nothing is spooled ahead of it, to the
    /// spool otherwise or when Postgres fails; then the journal lets go of it.
    async fn deliver(&mut self, batch: &mut Batch) {
        if batch.events.is_empty() {
            return;
        }
        batch.count_prompts().await;
        if self.spool.is_empty() {
            match self.write(&batch.events).await {
                Ok(()) => {
                    self.done_with(batch, true);
                    return;
                }
                Err(error) => self.postgres_failed(&error),
            }
        }
        let payloads = batch
            .events
            .iter()
            .filter_map(|event| serialize(&self.stats, event))
            .collect();
        let spooled = append_to_spool(&self.spool, &self.stats, payloads, true);
        self.done_with(batch, spooled);
        // At shutdown the flush must end soon: what is spooled stays for the
        // next start instead of being retried now.
        if !self.shutting_down && Instant::now() >= self.replay_after {
            self.replay().await;
        }
    }

    /// Empties a delivered batch. Events that were not `stored` (neither
    /// written nor spooled) stay in the journal, so the next start replays them.
    fn done_with(&self, batch: &mut Batch, stored: bool) {
        batch.events.clear();
        if stored {
            self.journal.settle(batch.marks.drain(..));
        } else {
            batch.marks.clear();
        }
    }

    /// Replays the spool oldest-first until it is empty, Postgres fails, or
    /// [`REPLAY_BATCHES_PER_TURN`] batches went in (then the channel gets a turn).
    async fn replay(&mut self) {
        for _ in 0..REPLAY_BATCHES_PER_TURN {
            let records = match self.spool.read_batch(self.config.batch_size) {
                Ok(records) if records.is_empty() => return,
                Ok(records) => records,
                Err(error) => {
                    tracing::error!("usage spool unreadable; replay stopped: {error}");
                    self.replay_after = Instant::now() + REPLAY_BACKOFF;
                    return;
                }
            };
            let events: Vec<UsageEvent> = records
                .iter()
                .filter_map(|record| serde_json::from_slice(record).ok())
                .collect();
            match self.write(&events).await {
                Ok(()) => {
                    // Checksummed yet not an event: written by another version.
                    // Counted once, when the batch around it is done with.
                    let unreadable = records.len() - events.len();
                    if unreadable > 0 {
                        self.stats.lost.inc_by(unreadable as u64);
                        tracing::error!(
                            unreadable,
                            "USAGE EVENTS LOST: spool records are not events"
                        );
                    }
                    self.spool.consume(records.len());
                    self.stats.replayed.inc_by(events.len() as u64);
                    self.stats.spool_events.set(self.spool.len() as i64);
                }
                Err(error) => {
                    self.postgres_failed(&error);
                    return;
                }
            }
        }
    }

    fn postgres_failed(&mut self, error: &WriteError) {
        self.stats.write_errors.inc_by(1);
        self.replay_after = Instant::now() + REPLAY_BACKOFF;
        tracing::warn!("usage write failed, spooling: {error}");
    }

    /// One batch into Postgres, creating a missing month partition on demand.
    async fn write(&mut self, events: &[UsageEvent]) -> Result<(), WriteError> {
        if events.is_empty() {
            return Ok(());
        }
        let timeout = self.config.write_timeout;
        // One event per month whose partition is not known to exist.
        let months: BTreeMap<i64, SystemTime> = events
            .iter()
            .map(|e| (partitions::month_index(e.created_at), e.created_at))
            .filter(|(month, _)| !self.partitions.contains(month))
            .collect();
        let inserted = tokio::time::timeout(timeout, async {
            let client = self.pool.get().await?;
            for &at in months.values() {
                partitions::ensure(&client, at).await?;
            }
            match insert_batch(&client, events).await {
                // A partition we knew of is gone (dropped by hand, or by a
                // purge on another instance): create what the batch needs, once.
                Err(error) if error.code() == Some(&SqlState::CHECK_VIOLATION) => {
                    for event in events {
                        partitions::ensure(&client, event.created_at).await?;
                    }
                    Ok(insert_batch(&client, events).await?)
                }
                other => Ok::<_, WriteError>(other?),
            }
        })
        .await
        .map_err(|_| WriteError::Timeout(timeout))??;
        self.partitions.extend(months.into_keys());
        let events_len = events.len() as u64;
        self.stats.written.inc_by(inserted);
        self.stats
            .duplicates
            .inc_by(events_len - inserted.min(events_len));
        self.stats.batches.inc_by(1);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no Postgres connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("Postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("write took longer than {0:?}")]
    Timeout(Duration),
}

/// `ON CONFLICT … DO UPDATE` of a rollup row: add the batch's totals.
const ADD_TO_ROLLUP: &str = "DO UPDATE SET
        requests = r.requests + excluded.requests,
        failed_requests = r.failed_requests + excluded.failed_requests,
        prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = r.completion_tokens + excluded.completion_tokens,
        total_tokens = r.total_tokens + excluded.total_tokens,
        units = r.units + excluded.units";

/// Inserts the events not stored yet and adds exactly those to the rollups
/// (minute, day, and all-accounts day), in one statement (so one
/// transaction). Returns how many were new.
static INSERT_BATCH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "
WITH inserted AS (
    INSERT INTO usage_events (
        event_id, created_at, request_id, account_id, key_id, tier, model, backend,
        kind, status, prompt_tokens, completion_tokens, total_tokens,
        counted_prompt_tokens, counted_completion_tokens, usage_source,
        units, latency_ms, ttft_ms, unit_kind)
    SELECT * FROM unnest(
        $1::uuid[], $2::timestamptz[], $3::text[], $4::uuid[], $5::uuid[], $6::text[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::int8[], $12::int8[],
        $13::int8[], $14::int8[], $15::int8[], $16::text[], $17::int8[], $18::int4[],
        $19::int4[], $20::text[])
    ON CONFLICT DO NOTHING
    RETURNING created_at, account_id, key_id, model, tier, unit_kind, status,
              prompt_tokens, completion_tokens, total_tokens, units
), per_minute AS (
    SELECT date_trunc('minute', created_at) AS minute, account_id, key_id, model, tier,
           unit_kind, count(*) AS requests,
           count(*) FILTER (WHERE status IN ('client_error', 'upstream_error', 'rejected')) AS failed,
           sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion,
           sum(total_tokens) AS total, sum(units) AS units
    FROM inserted
    GROUP BY 1, 2, 3, 4, 5, 6
), by_minute AS (
    INSERT INTO usage_rollup_minute AS r (
        bucket, account_id, key_id, model, tier, unit_kind, requests, failed_requests,
        prompt_tokens, completion_tokens, total_tokens, units)
    SELECT * FROM per_minute
    ON CONFLICT (account_id, bucket, key_id, model, tier, unit_kind) {ADD_TO_ROLLUP}
), by_day AS (
    INSERT INTO usage_rollup_day AS r (
        bucket, account_id, key_id, model, tier, unit_kind, requests, failed_requests,
        prompt_tokens, completion_tokens, total_tokens, units)
    SELECT date_trunc('day', minute, 'UTC'), account_id, key_id, model, tier, unit_kind,
           sum(requests), sum(failed), sum(prompt), sum(completion), sum(total), sum(units)
    FROM per_minute
    GROUP BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (account_id, bucket, key_id, model, tier, unit_kind) {ADD_TO_ROLLUP}
), by_total AS (
    INSERT INTO usage_rollup_total_day AS r (
        bucket, unit_kind, requests, failed_requests, prompt_tokens, completion_tokens,
        total_tokens, units)
    SELECT date_trunc('day', minute, 'UTC'), unit_kind, sum(requests), sum(failed),
           sum(prompt), sum(completion), sum(total), sum(units)
    FROM per_minute
    GROUP BY 1, 2
    ON CONFLICT (bucket, unit_kind) {ADD_TO_ROLLUP}
)
SELECT count(*) FROM inserted"
    )
});

async fn insert_batch(
    client: &deadpool_postgres::Client,
    events: &[UsageEvent],
) -> Result<u64, tokio_postgres::Error> {
    let statement = client.prepare_cached(&INSERT_BATCH).await?;
    let column = |f: fn(&UsageEvent) -> i64| events.iter().map(f).collect::<Vec<i64>>();
    let optional = |f: fn(&UsageEvent) -> Option<i64>| events.iter().map(f).collect::<Vec<_>>();
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let created: Vec<SystemTime> = events.iter().map(|e| e.created_at).collect();
    let request_ids: Vec<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
    let accounts: Vec<Uuid> = events.iter().map(|e| e.account_id).collect();
    let keys: Vec<Uuid> = events.iter().map(|e| e.key_id).collect();
    let tiers: Vec<&str> = events.iter().map(|e| e.tier.as_str()).collect();
    let models: Vec<&str> = events.iter().map(|e| e.model.as_str()).collect();
    let backends: Vec<Option<&str>> = events.iter().map(|e| e.backend.as_deref()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.kind()).collect();
    let statuses: Vec<&str> = events.iter().map(|e| e.status.as_str()).collect();
    let prompt = column(|e| clamp(e.tokens.prompt));
    let completion = column(|e| clamp(e.tokens.completion));
    let total = column(|e| clamp(e.tokens.total()));
    let counted_prompt = optional(|e| e.counted_prompt_tokens.map(clamp));
    let counted_completion = optional(|e| e.counted_completion_tokens.map(clamp));
    let sources: Vec<&str> = events.iter().map(|e| e.usage_source.as_str()).collect();
    let units = column(|e| clamp(e.units));
    let latency: Vec<i32> = events.iter().map(|e| clamp_ms(e.latency_ms)).collect();
    let ttft: Vec<Option<i32>> = events.iter().map(|e| e.ttft_ms.map(clamp_ms)).collect();
    let unit_kinds: Vec<&str> = events.iter().map(|e| e.unit_kind.as_str()).collect();
    let row = client
        .query_one(
            &statement,
            &[
                &event_ids,
                &created,
                &request_ids,
                &accounts,
                &keys,
                &tiers,
                &models,
                &backends,
                &kinds,
                &statuses,
                &prompt,
                &completion,
                &total,
                &counted_prompt,
                &counted_completion,
                &sources,
                &units,
                &latency,
                &ttft,
                &unit_kinds,
            ],
        )
        .await?;
    let inserted: i64 = row.get(0);
    Ok(u64::try_from(inserted).unwrap_or(0))
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn clamp_ms(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}
