//! Every default in one table, sized for a free-tier box (1 vCPU, 512 MB).
//! `config/tollgate.example.toml` shows the same values.

use std::time::Duration;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

pub const LISTEN: &str = "127.0.0.1:8080";
pub const ADMIN_LISTEN: &str = "127.0.0.1:8081";
pub const METRICS_LISTEN: &str = "127.0.0.1:9091";
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// OpenAI's limit on an audio file for transcription (25 MB).
pub const MAX_UPLOAD_BYTES: usize = 25 * 1024 * 1024;
/// What an upload whose length its header does not declare reserves: ten
/// minutes of audio, settled to the backend's figure.
pub const UNMEASURED_AUDIO_RESERVE: Duration = secs(600);
pub const WORKERS: usize = 1;
pub const DRAIN_TIMEOUT: Duration = secs(30);
pub const CONNECT_TIMEOUT: Duration = secs(2);
/// Long enough for a loaded model's prefill of a large prompt.
pub const READ_TIMEOUT: Duration = secs(120);
pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tollgate";
pub const MAX_OPEN_CONNS: usize = 20;
pub const MAX_IDLE_CONNS: usize = 10;
pub const MAX_LIFETIME: Duration = secs(60);
pub const MAX_IDLE_TIME: Duration = secs(30);
/// Revocation must take effect within 5 s on every instance.
pub const KEY_CACHE_TTL: Duration = secs(5);
pub const NEGATIVE_CACHE_TTL: Duration = secs(2);
/// Long enough to ride out a Postgres restart or failover; short enough
/// that a key deleted in an outage with Redis down too stops soon after.
pub const STALE_WHILE_UNAVAILABLE: Duration = secs(10 * 60);
pub const KEY_CACHE_CAPACITY: usize = 100_000;
pub const BACKEND_MAX_CONCURRENCY: u32 = 64;
/// The Billing Meter's event name.
pub const METER_EVENT_NAME: &str = "tollgate_units";
/// Usage is exported per hour.
pub const BILLING_BUCKET: Duration = secs(3600);
/// A past-due subscription keeps its tier this long.
pub const BILLING_GRACE: Duration = days(3);
/// How often the exporter looks for closed buckets.
pub const BILLING_EXPORT_INTERVAL: Duration = secs(60);
/// How often the fleet controller reads the queues.
pub const FLEET_INTERVAL: Duration = secs(1);
/// A sleeping instance's requests get this long to finish before it stops.
pub const FLEET_DRAIN_TIMEOUT: Duration = secs(300);
pub const REDIS_KEY_PREFIX: &str = "tollgate";
pub const SESSION_HEADER: &str = "x-session-id";
/// One refused connection is retried elsewhere; three in a row mean the
/// backend is down, not unlucky.
pub const BREAKER_FAILURES: u32 = 3;
/// Short enough to notice a restarted backend soon, long enough to spare
/// clients the retries against a dead one.
pub const BREAKER_OPEN: Duration = secs(5);
/// Loopback Redis answers in well under a millisecond; a call this slow
/// means Redis is in trouble, and the request must not hang on it.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
pub const DEFAULT_MAX_TOKENS: u64 = 1024;
/// One rank per minute (at most two): Free overtakes fresh Premium after
/// two minutes, inside its five-minute wait, so it is never starved for
/// good, while short waits keep strict priority.
pub const AGING: Duration = secs(60);
/// Longer than any request: the longest queue wait plus streams of many minutes.
pub const RESERVATION_TTL: Duration = secs(30 * 60);
pub const RECONCILE_INTERVAL: Duration = secs(60);
/// The longest wait in the design brief's tier rules (Free, five minutes).
pub const MAX_QUEUE_WAIT: Duration = secs(300);
pub const IMAGE_TOKENS: usize = tollgate_metering::tokens::DEFAULT_IMAGE_TOKENS;
pub const USAGE_MISMATCH_TOLERANCE: f64 = 0.02;
pub const BLOCKING_COUNT_BYTES: usize = tollgate_metering::tokens::BLOCKING_THRESHOLD_BYTES;
pub const SPOOL_DIR: &str = "spool";
/// OpenAI's Batch API completion window: a job may wait a day for a GPU.
pub const JOB_MAX_WAIT: Duration = days(1);
/// A day to download a result, then its bytes are freed.
pub const RESULT_RETENTION: Duration = days(1);
pub const RESULTS_DIR: &str = "results";
/// A gateway that dies loses its jobs to another within this.
pub const JOB_LEASE: Duration = secs(30);
/// How often a runner looks for jobs submitted through other gateways (its
/// own are claimed at once).
pub const JOB_POLL_INTERVAL: Duration = secs(1);
/// Jobs one gateway runs at once (each waits in the admission queue).
pub const JOB_MAX_RUNNING: usize = 64;
pub const JOB_MAX_QUEUED_PER_ACCOUNT: u64 = 1_000;
/// How often expired results are deleted and the job figures refreshed.
pub const JOB_SWEEP_INTERVAL: Duration = secs(60);
/// Ended jobs' records (not their results) are kept this long.
pub const JOB_RECORD_RETENTION: Duration = days(30);
/// A failing callback is retried for a day (backoff up to an hour).
pub const CALLBACK_RETRY_FOR: Duration = days(1);
/// About a few seconds of traffic at the rates one instance serves.
pub const USAGE_CHANNEL_CAPACITY: usize = 65_536;
pub const USAGE_BATCH_SIZE: usize = 10_000;
pub const USAGE_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
pub const USAGE_WRITE_TIMEOUT: Duration = secs(5);
/// As often as a batch is written: a power loss can take at most the
/// events of the last interval (a process crash takes none).
pub const JOURNAL_SYNC_INTERVAL: Duration = Duration::from_millis(200);
pub const ROLLUP_RETENTION: Duration = days(400);
/// Two billing months and change.
pub const MINUTE_ROLLUP_RETENTION: Duration = days(70);
