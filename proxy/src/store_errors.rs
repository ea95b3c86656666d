//! Failed calls to Postgres and Redis, counted by operation: one family per
//! store, so an operator sees a store in trouble in one place whichever part
//! of Tollgate met it.
//!
//! Process-wide, like the stores themselves: the places that fail are many
//! and deep (the key cache, background writers, a pub/sub listener), and a
//! handle threaded through each would carry nothing but these two counters.
//! Usage writes keep their own `tollgate_usage_write_errors_total`: the
//! writer lives in the metering crate and also reports what it spooled.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, Opts, Registry};
use tollgate_metering::metric_names;

/// What Tollgate was doing with Postgres when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresOperation {
    /// A key-cache miss reading the key and its account.
    KeyLookup,
    /// Writing lifecycle transitions to `instance_events`.
    InstanceEvents,
    /// Reading `instance_events` at start-up to adopt rented instances.
    FleetRecovery,
    /// Creating usage partitions ahead and purging old rollups.
    UsageUpkeep,
    /// Reading the usage log to raise quota counters to it.
    QuotaReconcile,
}

impl PostgresOperation {
    const ALL: [Self; 5] = [
        Self::KeyLookup,
        Self::InstanceEvents,
        Self::FleetRecovery,
        Self::UsageUpkeep,
        Self::QuotaReconcile,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::KeyLookup => "key_lookup",
            Self::InstanceEvents => "instance_events",
            Self::FleetRecovery => "fleet_recovery",
            Self::UsageUpkeep => "usage_upkeep",
            Self::QuotaReconcile => "quota_reconcile",
        }
    }
}

/// What Tollgate was doing with Redis when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOperation {
    /// Checking and reserving limits at admission.
    Admit,
    /// Replacing a reservation by what the request used.
    Settle,
    /// Publishing a revoked key or an account change to other instances.
    Publish,
    /// The subscription that receives those messages.
    Subscribe,
    /// Raising quota counters to the usage log's totals.
    QuotaReconcile,
    /// Putting this process's copy of an account's counters back into Redis.
    Restore,
}

impl RedisOperation {
    const ALL: [Self; 6] = [
        Self::Admit,
        Self::Settle,
        Self::Publish,
        Self::Subscribe,
        Self::QuotaReconcile,
        Self::Restore,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Admit => "admit",
            Self::Settle => "settle",
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
            Self::QuotaReconcile => "quota_reconcile",
            Self::Restore => "restore",
        }
    }
}

struct Counters {
    postgres: IntCounterVec,
    redis: IntCounterVec,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    postgres: counter(
        metric_names::POSTGRES_ERRORS_TOTAL,
        &format!(
            "Postgres calls that failed or timed out, by operation (usage writes: {}).",
            metric_names::USAGE_WRITE_ERRORS_TOTAL
        ),
    ),
    redis: counter(
        metric_names::REDIS_ERRORS_TOTAL,
        "Redis calls that failed or timed out, by operation.",
    ),
});

#[allow(clippy::expect_used)] // Fixed, valid names: only a typo here could fail.
fn counter(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &["operation"]).expect("valid metric options")
}

pub fn postgres(operation: PostgresOperation) {
    COUNTERS
        .postgres
        .with_label_values(&[operation.as_str()])
        .inc();
}

pub fn redis(operation: RedisOperation) {
    COUNTERS
        .redis
        .with_label_values(&[operation.as_str()])
        .inc();
}

/// Registers both families with every operation at 0, so that `increase`
/// sees the first error and a dashboard shows a flat line, not no data.
pub fn register(registry: &Registry) -> prometheus::Result<()> {
    for operation in PostgresOperation::ALL {
        COUNTERS.postgres.with_label_values(&[operation.as_str()]);
    }
    for operation in RedisOperation::ALL {
        COUNTERS.redis.with_label_values(&[operation.as_str()]);
    }
    registry.register(Box::new(COUNTERS.postgres.clone()))?;
    registry.register(Box::new(COUNTERS.redis.clone()))
}
