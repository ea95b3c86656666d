//! Which store a request's limits are checked in: Redis when configured and
//! answering, otherwise this process's own, as each tier's `on_redis_down`
//! says.
//!
//! Every Redis call is bounded by `redis.timeout`. After a failure Redis is
//! passed over for [`RETRY_AFTER_FAILURE`] and then probed again by the next
//! request, so an outage costs requests a fallback, not a hang, and its end
//! is noticed within a second. Both transitions are logged once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};
use uuid::Uuid;

use super::limits::local::LocalLimits;
use super::limits::redis::RedisLimits;
use super::limits::{
    AdmitRequest, LimitStore, Periods, Reservation, Settlement, StoreError, Verdict,
};
use crate::config::RedisDownPolicy;
use crate::store_errors::{self, RedisOperation};

/// How long Redis is passed over after a failed call.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Settlement runs after the answer is sent; it gets longer than an
/// admission (the store's own settle timeout is 2 s).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a reservation was made, so it is settled in the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Redis,
    Local,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Local => "local",
        }
    }
}

pub struct Limiter {
    redis: Option<RedisLimits>,
    local: LocalLimits,
    timeout: Duration,
    health: Arc<RedisHealth>,
    fallbacks: IntCounterVec,
}

/// Whether the last Redis call worked, and when to try again if not.
struct RedisHealth {
    epoch: Instant,
    down: AtomicBool,
    /// Milliseconds since `epoch` before which Redis is not tried.
    retry_at_ms: AtomicU64,
}

impl RedisHealth {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn passed_over(&self) -> bool {
        self.down.load(Ordering::Relaxed)
            && self.now_ms() < self.retry_at_ms.load(Ordering::Relaxed)
    }

    fn failed(&self, error: &str) {
        let retry_at = self.now_ms() + RETRY_AFTER_FAILURE.as_millis() as u64;
        self.retry_at_ms.store(retry_at, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "Redis limiter unreachable ({error}): tiers fall back to their on_redis_down policy"
            );
        }
    }

    fn answered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::warn!("Redis limiter answers again: shared limits restored");
        }
    }
}

impl Limiter {
    pub fn new(
        redis: Option<RedisLimits>,
        timeout: Duration,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "tollgate_admission_redis_fallback_total",
                "Admissions decided without Redis, by tier and on_redis_down policy.",
            ),
            &["tier", "policy"],
        )?;
        registry.register(Box::new(fallbacks.clone()))?;
        Ok(Self {
            redis,
            local: LocalLimits::new(),
            timeout,
            health: Arc::new(RedisHealth {
                epoch: Instant::now(),
                down: AtomicBool::new(false),
                retry_at_ms: AtomicU64::new(0),
            }),
            fallbacks,
        })
    }

    /// Checks and reserves, in Redis when it answers, else as `policy` says.
    pub async fn admit(
        &self,
        tier: &str,
        policy: RedisDownPolicy,
        request: &AdmitRequest,
    ) -> Result<(Verdict, StoreKind), RedisDown> {
        if let Some(redis) = &self.redis {
            if !self.health.passed_over() {
                match bounded(self.timeout, redis.admit(request)).await {
                    Ok(verdict) => {
                        self.health.answered();
                        return Ok((verdict, StoreKind::Redis));
                    }
                    Err(error) => {
                        store_errors::redis(RedisOperation::Admit);
                        self.health.failed(&error.to_string());
                    }
                }
            }
            let policy_name = match policy {
                RedisDownPolicy::Local => "local",
                RedisDownPolicy::Reject => "reject",
            };
            self.fallbacks.with_label_values(&[tier, policy_name]).inc();
            if policy == RedisDownPolicy::Reject {
                return Err(RedisDown);
            }
        }
        // Only a poisoned lock could fail here; the local store has no I/O.
        let verdict = self.local.admit(request).await.map_err(|_| RedisDown)?;
        Ok((verdict, StoreKind::Local))
    }

    pub async fn settle(&self, store: StoreKind, reservation: &Reservation, actual: Settlement) {
        let result = match (store, &self.redis) {
            (StoreKind::Redis, Some(redis)) => {
                bounded(SETTLE_TIMEOUT, redis.settle(reservation, actual)).await
            }
            _ => self.local.settle(reservation, actual).await,
        };
        if let Err(error) = result {
            // Admissions notice an outage themselves; this reservation lapses
            // after its TTL, and reconciliation restores `used` from the log.
            if store == StoreKind::Redis {
                store_errors::redis(RedisOperation::Settle);
            }
            tracing::warn!(reservation = %reservation.id, "settlement failed: {error}");
        }
    }

    /// Raises period counters in every store to the usage log's totals.
    pub async fn reconcile(
        &self,
        account: Uuid,
        periods: &Periods,
        month_units: u64,
        day_units: u64,
    ) -> Result<(), StoreError> {
        self.local
            .reconcile(account, periods, month_units, day_units)
            .await?;
        if let Some(redis) = &self.redis {
            bounded(
                self.timeout,
                redis.reconcile(account, periods, month_units, day_units),
            )
            .await
            .inspect_err(|_| store_errors::redis(RedisOperation::QuotaReconcile))?;
        }
        Ok(())
    }
}

/// `call`, given up after `timeout` (the store's own timeout should fire
/// first; this guards against one that does not).
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)))
}

/// Redis is unreachable and the tier's policy is to refuse.
#[derive(Debug)]
pub struct RedisDown;
