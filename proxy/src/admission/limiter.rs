//! Which store a request's limits are checked in: Redis when configured and
//! answering, otherwise this process's own, as each tier's `on_redis_down`
//! says.
//!
//! Every Redis call is bounded by `redis.timeout`. After a failure Redis is
//! passed over for [`RETRY_AFTER_FAILURE`] and then probed again by the next
//! request, so an outage costs requests a fallback, not a hang, and its end
//! is noticed within a second. Both transitions are logged once.
//!
//! Caps hold through Redis failures. The local store is this process's copy
//! of everything it did: a reservation made in Redis is also held locally,
//! and every settlement lands in both. So:
//! - while Redis cannot be reached, a tier on `local` decides its caps on
//!   counters that know this process's usage;
//! - an account whose Redis counters fell behind (settled or admitted here
//!   while Redis failed) is restored to Redis from the copy before its next
//!   admission there;
//! - Redis that lost an account's counters (a restart, a flush) says so
//!   ([`StoreError::Unprimed`]), and the copy is put back before the cap is
//!   decided.
//!
//! Until the first reconciliation has read the usage log's totals, the copy
//! knows nothing of earlier usage: a capped quota that needs it is refused
//! (503) rather than decided on zeros.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};
use tollgate_metering::metric_names;
use uuid::Uuid;

use super::limits::local::LocalLimits;
use super::limits::redis::RedisLimits;
use super::limits::{
    AdmitRequest, LimitStore, Periods, Reservation, Settlement, Snapshot, StoreError, Verdict,
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
    /// This process's limits: the store without Redis, the copy with it.
    local: LocalLimits,
    timeout: Duration,
    health: Arc<RedisHealth>,
    fallbacks: IntCounterVec,
    /// Accounts whose Redis counters may be behind the local copy (settled
    /// or admitted here while Redis failed). A std `Mutex`: never held
    /// across an `.await`.
    lagging: Mutex<HashSet<Uuid>>,
    /// The local copy holds the usage log's totals: the first
    /// reconciliation since start-up ran.
    reconciled: AtomicBool,
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

/// The `policy` label of `tollgate_admission_redis_fallback_total`.
fn policy_label(policy: RedisDownPolicy) -> &'static str {
    match policy {
        RedisDownPolicy::Local => "local",
        RedisDownPolicy::Reject => "reject",
    }
}

impl Limiter {
    /// `tiers`: each tier's name and its `on_redis_down`, whose fallback
    /// series are exported from zero (with Redis configured).
    pub fn new(
        redis: Option<RedisLimits>,
        timeout: Duration,
        tiers: &[(&str, RedisDownPolicy)],
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let fallbacks = IntCounterVec::new(
            Opts::new(
                metric_names::ADMISSION_REDIS_FALLBACK_TOTAL,
                "Admissions decided without Redis, by tier and on_redis_down policy.",
            ),
            &["tier", "policy"],
        )?;
        if redis.is_some() {
            // So that a panel shows 0 and `increase` sees the first fallback.
            for (tier, policy) in tiers {
                fallbacks.with_label_values(&[*tier, policy_label(*policy)]);
            }
        }
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
            lagging: Mutex::new(HashSet::new()),
            reconciled: AtomicBool::new(false),
        })
    }

    /// Checks and reserves, in Redis when it answers, else as `policy` says.
    pub async fn admit(
        &self,
        tier: &str,
        policy: RedisDownPolicy,
        request: &AdmitRequest,
    ) -> Result<(Verdict, StoreKind), RedisDown> {
        let capped = request.quota.hard_cap && request.quota.included_units.is_some()
            || request.quota.daily_cap.is_some();
        if let Some(redis) = &self.redis {
            if !self.health.passed_over() {
                match self.admit_in_redis(redis, request).await {
                    Ok(verdict) => {
                        self.health.answered();
                        if let Verdict::Admitted { reservation, .. } = &verdict
                            && !request.dry_run
                        {
                            self.local.hold(reservation, request.reservation_ttl);
                        }
                        return Ok((verdict, StoreKind::Redis));
                    }
                    Err(StoreError::NotReconciled) => return Err(RedisDown),
                    Err(error) => {
                        store_errors::redis(RedisOperation::Admit);
                        self.health.failed(&error.to_string());
                    }
                }
            }
            self.fallbacks
                .with_label_values(&[tier, policy_label(policy)])
                .inc();
            if policy == RedisDownPolicy::Reject {
                return Err(RedisDown);
            }
        }
        if capped && !self.reconciled.load(Ordering::Acquire) {
            return Err(RedisDown);
        }
        // Only a poisoned lock could fail here; the local store has no I/O.
        let verdict = self.local.admit(request).await.map_err(|_| RedisDown)?;
        if self.redis.is_some() && matches!(verdict, Verdict::Admitted { .. }) && !request.dry_run {
            // Redis does not know of this reservation.
            self.lag(request.account);
        }
        Ok((verdict, StoreKind::Local))
    }

    /// An admission in Redis, on counters brought up to the local copy
    /// first when they are behind or lost.
    async fn admit_in_redis(
        &self,
        redis: &RedisLimits,
        request: &AdmitRequest,
    ) -> Result<Verdict, StoreError> {
        if self.is_lagging(request.account) {
            self.restore(redis, request).await?;
        }
        match bounded(self.timeout, redis.admit(request)).await {
            // New to Redis this period, or lost by it (a restart, a flush).
            Err(StoreError::Unprimed) => {
                self.restore(redis, request).await?;
                bounded(self.timeout, redis.admit(request)).await
            }
            other => other,
        }
    }

    /// Puts the local copy of the request's account back into Redis.
    async fn restore(&self, redis: &RedisLimits, request: &AdmitRequest) -> Result<(), StoreError> {
        if !self.reconciled.load(Ordering::Acquire) {
            return Err(StoreError::NotReconciled);
        }
        let known = self.local.snapshot(request.account, &request.periods);
        if known != Snapshot::default() {
            tracing::info!(account = %request.account, used = known.month_used, reservations = known.reservations.len(), "restoring an account's counters to Redis from this process's copy");
        }
        bounded(
            self.timeout,
            redis.restore(request.account, &request.periods, &known),
        )
        .await
        .inspect_err(|_| store_errors::redis(RedisOperation::Restore))?;
        self.lagging_set().remove(&request.account);
        Ok(())
    }

    pub async fn settle(&self, store: StoreKind, reservation: &Reservation, actual: Settlement) {
        // The local copy always: a reservation made in Redis is held here too.
        if let Err(error) = self.local.settle(reservation, actual).await {
            tracing::warn!(reservation = %reservation.id, "local settlement failed: {error}");
        }
        let Some(redis) = &self.redis else {
            return;
        };
        // A reservation made here while Redis failed may have been restored
        // there since: settling it there too is harmless if not.
        if store == StoreKind::Local && self.health.passed_over() {
            self.lag(reservation.account);
            return;
        }
        if let Err(error) = bounded(SETTLE_TIMEOUT, redis.settle(reservation, actual)).await {
            // Redis is behind this process for the account until restored;
            // a lapsed reservation is given back after its TTL.
            store_errors::redis(RedisOperation::Settle);
            self.lag(reservation.account);
            tracing::warn!(reservation = %reservation.id, "settlement in Redis failed: {error}");
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

    /// The local copy now holds the usage log's totals of every account:
    /// caps may be decided on it, and restored from it.
    pub fn reconciled(&self) {
        self.reconciled.store(true, Ordering::Release);
    }

    fn lag(&self, account: Uuid) {
        self.lagging_set().insert(account);
    }

    fn is_lagging(&self, account: Uuid) -> bool {
        self.lagging_set().contains(&account)
    }

    fn lagging_set(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        // A set of ids: no half-made change to fear from a poisoned lock.
        self.lagging.lock().unwrap_or_else(PoisonError::into_inner)
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
