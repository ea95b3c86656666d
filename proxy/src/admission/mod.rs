//! Admission: between authentication and upstream selection, who goes ahead,
//! who waits and who is turned away.
//!
//! A request passes two gates, in this order:
//! 1. [`Admission::check`]: the tier's rate limits (per key and per account),
//!    its concurrency limit and its quota, decided and reserved in one call
//!    to the [`limiter`] (Redis, or this process). The reservation becomes a
//!    [`Ticket`] that `logging` settles to the actual usage.
//! 2. [`Admission::wait_for_slot`]: a slot in the model's backend pool, from
//!    the [`queue`], by tier priority; refused at once when the expected wait
//!    is beyond the tier's limit.
//!
//! [`AdmissionQueues::signals`] is the one interface the backend fleet reads
//! (depth, oldest and expected wait, shed counts per pool and tier).
//!
//! Layout: [`limits`] (state and its two stores), [`limiter`] (Redis or local,
//! and the outage policy), [`queue`] (one pool's priority queue), [`periods`]
//! (quota months and days), [`headers`] (OpenAI's rate-limit headers),
//! [`reconcile`] (period counters from the usage log).

pub mod headers;
pub mod limiter;
pub mod limits;
pub mod periods;
pub mod queue;
pub mod reconcile;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use uuid::Uuid;

use self::limiter::{Limiter, StoreKind};
use self::limits::redis::RedisLimits;
use self::limits::{
    AdmitRequest, QuotaRule, RateKind, RateRule, Reservation, Scope, Settlement, Verdict, Windows,
};
use self::queue::{AdmissionQueue, PoolSnapshot, Shed, Slot};
use tollgate_backends::fleet::controller::Demand;
use tollgate_backends::fleet::policy::TierWait;
use tollgate_metering::metric_names;
use tollgate_metering::units::UnitKind;

use crate::config::{AdmissionConfig, Config, TierConfig};
use crate::error::ApiError;
use crate::keys::store::KeyRecord;

/// A tier as admission applies it.
struct Plan {
    tier: TierConfig,
    /// Queue rank: the tier's place in priority order, lowest first.
    rank: usize,
    rates: Vec<RateRule>,
    /// The quota of each unit kind the tier limits (tokens' always, even
    /// when it only carries `max_concurrent`).
    quotas: HashMap<UnitKind, QuotaRule>,
}

impl Plan {
    fn new(tier: &TierConfig, rank: usize) -> Self {
        let rules = [
            (Scope::Key, RateKind::Requests, tier.key_requests_per_minute),
            (Scope::Key, RateKind::Tokens, tier.key_tokens_per_minute),
            (Scope::Account, RateKind::Requests, tier.requests_per_minute),
            (Scope::Account, RateKind::Tokens, tier.tokens_per_minute),
        ];
        Self {
            tier: tier.clone(),
            rank,
            rates: rules
                .into_iter()
                .filter_map(|(scope, kind, limit)| {
                    limit.map(|per_minute| RateRule {
                        scope,
                        kind,
                        per_minute,
                    })
                })
                .collect(),
            quotas: UnitKind::ALL
                .into_iter()
                .filter_map(|kind| Some((kind, tier.quota(kind)?)))
                .map(|(kind, quota)| {
                    let rule = QuotaRule {
                        included_units: quota.included,
                        hard_cap: quota.hard_cap,
                        daily_cap: quota.daily_cap,
                        max_concurrent: tier.max_concurrent,
                    };
                    (kind, rule)
                })
                .collect(),
        }
    }

    /// The quota on `kind`: only the concurrency limit for a kind the tier
    /// does not limit.
    fn quota(&self, kind: UnitKind) -> QuotaRule {
        self.quotas.get(&kind).copied().unwrap_or(QuotaRule {
            max_concurrent: self.tier.max_concurrent,
            ..QuotaRule::default()
        })
    }

    /// Nothing to check or reserve for work in `kind`: no round trip.
    fn unlimited(&self, kind: UnitKind) -> bool {
        let q = self.quota(kind);
        self.rates.is_empty()
            && q.included_units.is_none()
            && q.daily_cap.is_none()
            && q.max_concurrent.is_none()
    }

    /// A rule reserves by tokens before the answer: a tokens-per-minute
    /// rate, or a capped quota. Other rules (request rates, concurrency, a
    /// quota billed past its units) are settled from the answer's usage.
    fn reserves_tokens(&self) -> bool {
        self.caps_output() || self.rates.iter().any(|r| r.kind == RateKind::Tokens)
    }

    /// A capped token quota must not let the backend generate past the
    /// reservation.
    fn caps_output(&self) -> bool {
        let quota = self.quota(UnitKind::Tokens);
        (quota.hard_cap && quota.included_units.is_some()) || quota.daily_cap.is_some()
    }
}

/// What a request may cost, known before it is forwarded.
#[derive(Debug, Clone, Copy)]
pub enum Estimate {
    /// Token-priced work: the prompt and what may be generated.
    Tokens(TokenEstimate),
    /// Work priced in another unit, whose quantity is known before it is
    /// forwarded (`n` images, the input's characters, the audio's seconds):
    /// reserved whole, since it cannot be shortened to fit a quota.
    Units { kind: UnitKind, units: u64 },
}

/// What a token-priced request may cost.
#[derive(Debug, Clone, Copy)]
pub struct TokenEstimate {
    pub prompt_tokens: u64,
    /// The request's `max_tokens` (`None`: the configured default).
    pub max_tokens: Option<u64>,
    /// Sequences generated (`n` or `best_of`, times the prompts of a
    /// completions request); each may reach `max_tokens`.
    pub sequences: u64,
    /// False for embeddings, which generate nothing.
    pub generates: bool,
    /// Tokens in one unit of quota ([`crate::metering::request::UnitSizes`]).
    pub tokens_per_unit: u64,
}

/// The units `tokens` are billed and counted as: every started unit counts.
pub fn units(tokens: u64, tokens_per_unit: u64) -> u64 {
    tokens.div_ceil(tokens_per_unit.max(1))
}

/// An admitted request's claim on its tier's limits; settled in `logging`.
#[derive(Debug)]
pub struct Ticket {
    reservation: Reservation,
    store: StoreKind,
    /// For the `x-ratelimit-*` headers.
    pub windows: Windows,
    /// The `max_tokens` to send upstream in place of the request's: on a
    /// capped tier, what fits the units reserved (the default when the
    /// request set none), so the backend cannot generate past the reservation.
    pub send_max_tokens: Option<u64>,
}

/// A refusal, with the rate windows to report on it.
pub struct Refusal {
    pub error: ApiError,
    pub windows: Windows,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            windows: Windows::default(),
        }
    }
}

pub struct Admission {
    plans: HashMap<String, Plan>,
    limiter: Limiter,
    queues: Arc<AdmissionQueues>,
    config: AdmissionConfig,
    rejected: IntCounterVec,
    queue_wait: HistogramVec,
}

/// The `reason` label of `tollgate_admission_rejected_total`.
const REFUSAL_REASONS: [&str; 9] = [
    "too_many_tokens",
    "limiter_unavailable",
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "quota_month",
    "quota_day",
    "busy",
    "queue_timeout",
];

impl Admission {
    pub fn new(
        config: &Config,
        redis: Option<RedisLimits>,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let mut by_priority: Vec<&TierConfig> = config.tiers.iter().collect();
        by_priority.sort_by_key(|t| t.priority);
        let plans = by_priority
            .iter()
            .enumerate()
            .map(|(rank, tier)| (tier.name.clone(), Plan::new(tier, rank)))
            .collect();
        let tier_names: Vec<String> = by_priority.iter().map(|t| t.name.clone()).collect();
        let queues = Arc::new(AdmissionQueues::new(config, tier_names.clone(), registry)?);
        let rejected = IntCounterVec::new(
            Opts::new(
                metric_names::ADMISSION_REJECTED_TOTAL,
                "Requests refused at admission, by tier and reason.",
            ),
            &["tier", "reason"],
        )?;
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                metric_names::QUEUE_WAIT_SECONDS,
                "Time admitted requests waited for a GPU slot, by pool and tier.",
            )
            .buckets(vec![
                0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["pool", "tier"],
        )?;
        // Every series from the start, so that `increase` sees the first refusal.
        for tier in &tier_names {
            for reason in REFUSAL_REASONS {
                rejected.with_label_values(&[tier.as_str(), reason]);
            }
        }
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        Ok(Self {
            plans,
            limiter: Limiter::new(
                redis,
                config.redis.timeout,
                &by_priority
                    .iter()
                    .map(|t| (t.name.as_str(), t.on_redis_down))
                    .collect::<Vec<_>>(),
                registry,
            )?,
            queues,
            config: config.admission,
            rejected,
            queue_wait,
        })
    }

    /// The tier's `priority` (jobs are claimed by it, highest first).
    pub fn priority(&self, tier: &str) -> Result<i32, ApiError> {
        let priority = self.plan(tier)?.tier.priority;
        Ok(priority.clamp(i32::MIN.into(), i32::MAX.into()) as i32)
    }

    fn plan(&self, tier: &str) -> Result<&Plan, ApiError> {
        self.plans
            .get(tier)
            .ok_or_else(|| ApiError::UnknownTier(tier.to_owned()))
    }

    /// Whether `tier`'s limits need the prompt's tokens before the request
    /// is forwarded (an unknown tier says yes: [`Self::check`] refuses it).
    pub fn needs_prompt_tokens(&self, tier: &str) -> bool {
        self.plans.get(tier).is_none_or(Plan::reserves_tokens)
    }

    pub fn queues(&self) -> Arc<AdmissionQueues> {
        Arc::clone(&self.queues)
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Gate 1: rate limits, concurrency and quota, reserved in one call.
    /// `None`: the tier has no limits, so there is nothing to settle.
    pub async fn check(
        &self,
        key: &KeyRecord,
        reservation_id: Uuid,
        estimate: Estimate,
    ) -> Result<Option<Ticket>, Refusal> {
        let plan = self.plan(&key.tier)?;
        match estimate {
            Estimate::Tokens(estimate) => {
                self.check_tokens(plan, key, reservation_id, estimate).await
            }
            Estimate::Units { kind, units } => {
                self.check_units(plan, key, reservation_id, kind, units)
                    .await
            }
        }
    }

    /// [`Self::check`] for work priced in `kind`, `units` of it.
    async fn check_units(
        &self,
        plan: &Plan,
        key: &KeyRecord,
        reservation_id: Uuid,
        kind: UnitKind,
        units: u64,
    ) -> Result<Option<Ticket>, Refusal> {
        if plan.unlimited(kind) {
            return Ok(None);
        }
        let now = SystemTime::now();
        let request = AdmitRequest {
            reservation_id,
            estimate_units: units,
            // All of it or nothing: an image cannot be cut to fit.
            min_units: units.max(1),
            ..self.costing_nothing(plan, key, kind, now)
        };
        let (verdict, store) = self.ask(plan, &request).await?;
        match verdict {
            Verdict::Admitted {
                reservation,
                windows,
            } => Ok(Some(Ticket {
                reservation,
                store,
                windows,
                send_max_tokens: None,
            })),
            refused => Err(self.refusal(plan, refused, now, key, kind)),
        }
    }

    /// [`Self::check`] for token-priced work.
    async fn check_tokens(
        &self,
        plan: &Plan,
        key: &KeyRecord,
        reservation_id: Uuid,
        estimate: TokenEstimate,
    ) -> Result<Option<Ticket>, Refusal> {
        if plan.unlimited(UnitKind::Tokens) {
            return Ok(None);
        }
        let sequences = estimate.sequences.max(1);
        let (completion, least) = if estimate.generates {
            let max_tokens = estimate
                .max_tokens
                .unwrap_or(self.config.default_max_tokens);
            (max_tokens.saturating_mul(sequences), sequences)
        } else {
            (0, 0)
        };
        let tokens = estimate.prompt_tokens.saturating_add(completion);
        let per_unit = estimate.tokens_per_unit.max(1);
        // A request no minute can hold: refuse without a round trip.
        if let Some(rule) = plan
            .rates
            .iter()
            .find(|r| r.kind == RateKind::Tokens && r.per_minute < tokens)
        {
            return Err(self.refuse(
                plan,
                "too_many_tokens",
                ApiError::TooManyTokens {
                    limit: rule.per_minute,
                    requested: tokens,
                },
            ));
        }
        let now = SystemTime::now();
        let request = AdmitRequest {
            reservation_id,
            estimate_tokens: tokens,
            estimate_units: units(tokens, per_unit),
            // The prompt and a token per choice: a capped quota with less room
            // refuses; with more, the answer is shortened to fit.
            min_units: units(estimate.prompt_tokens.saturating_add(least), per_unit),
            ..self.costing_nothing(plan, key, UnitKind::Tokens, now)
        };
        let (verdict, store) = self.ask(plan, &request).await?;
        match verdict {
            Verdict::Admitted {
                reservation,
                windows,
            } => {
                // The tokens the reserved units pay for.
                let granted = reservation.units.saturating_mul(per_unit);
                let room = granted.saturating_sub(estimate.prompt_tokens);
                let send_max_tokens = if !estimate.generates {
                    None
                } else if granted < tokens {
                    Some(room / sequences)
                } else if plan.caps_output() && estimate.max_tokens.is_none() {
                    Some(self.config.default_max_tokens)
                } else {
                    None
                };
                Ok(Some(Ticket {
                    reservation,
                    store,
                    windows,
                    send_max_tokens,
                }))
            }
            refused => Err(self.refusal(plan, refused, now, key, UnitKind::Tokens)),
        }
    }

    /// Before the prompt is counted: refuses what no token count could let
    /// through (a request-rate rule, concurrency, a used-up capped quota)
    /// with a check that charges and reserves nothing, so a throttled key
    /// cannot keep the CPU busy tokenizing. [`Self::check`] decides for
    /// real once the count is known.
    pub async fn precheck(&self, key: &KeyRecord) -> Result<(), Refusal> {
        let plan = self.plan(&key.tier)?;
        if plan.unlimited(UnitKind::Tokens) {
            return Ok(());
        }
        let now = SystemTime::now();
        let request = AdmitRequest {
            dry_run: true,
            ..self.costing_nothing(plan, key, UnitKind::Tokens, now)
        };
        let (verdict, _) = self.ask(plan, &request).await?;
        match verdict {
            Verdict::Admitted { .. } => Ok(()),
            refused => Err(self.refusal(plan, refused, now, key, UnitKind::Tokens)),
        }
    }

    /// An admission of `key` on `plan` at `now`, against its quota in
    /// `kind`, that costs nothing and needs one unit of room: callers set
    /// what theirs costs.
    fn costing_nothing(
        &self,
        plan: &Plan,
        key: &KeyRecord,
        kind: UnitKind,
        now: SystemTime,
    ) -> AdmitRequest {
        AdmitRequest {
            account: key.account_id,
            key: key.key_id,
            reservation_id: Uuid::nil(),
            rates: plan.rates.clone(),
            quota: plan.quota(kind),
            estimate_tokens: 0,
            estimate_units: 0,
            min_units: 1,
            periods: periods::periods(now, key.billing_period).of_unit(kind),
            reservation_ttl: self.config.reservation_ttl,
            dry_run: false,
        }
    }

    /// The limiter's verdict, or the refusal when it cannot give one.
    async fn ask(
        &self,
        plan: &Plan,
        request: &AdmitRequest,
    ) -> Result<(Verdict, StoreKind), Refusal> {
        self.limiter
            .admit(&plan.tier.name, plan.tier.on_redis_down, request)
            .await
            .map_err(|_| self.refuse(plan, "limiter_unavailable", ApiError::LimiterUnavailable))
    }

    /// The answer to a verdict that refused.
    fn refusal(
        &self,
        plan: &Plan,
        verdict: Verdict,
        now: SystemTime,
        key: &KeyRecord,
        unit: UnitKind,
    ) -> Refusal {
        match verdict {
            Verdict::Admitted { .. } => {
                // Not a refusal: never passed here.
                self.refuse(plan, "limiter_unavailable", ApiError::LimiterUnavailable)
            }
            Verdict::RateLimited {
                rule,
                retry_after,
                windows,
            } => {
                let reason = match rule.kind {
                    RateKind::Requests => "requests_per_minute",
                    RateKind::Tokens => "tokens_per_minute",
                };
                let error = ApiError::RateLimited {
                    kind: rule.kind,
                    scope: rule.scope,
                    limit: rule.per_minute,
                    retry_after,
                };
                Refusal {
                    windows,
                    ..self.refuse(plan, reason, error)
                }
            }
            Verdict::Concurrency { limit } => self.refuse(
                plan,
                "max_concurrent",
                ApiError::TooManyConcurrent { limit },
            ),
            Verdict::QuotaExhausted { period } => {
                let reason = match period {
                    limits::Period::Month => "quota_month",
                    limits::Period::Day => "quota_day",
                };
                let retry_after = periods::until_end(period, now, key.billing_period);
                self.refuse(
                    plan,
                    reason,
                    ApiError::InsufficientQuota {
                        period,
                        unit,
                        retry_after,
                    },
                )
            }
        }
    }

    /// Gate 2: a slot in the pool's `queue` (the model's), waiting by tier
    /// priority.
    pub async fn wait_for_slot(
        &self,
        tier: &str,
        queue: &Arc<AdmissionQueue>,
    ) -> Result<Slot, ApiError> {
        let plan = self.plan(tier)?;
        match queue
            .acquire(
                plan.rank,
                plan.tier.max_queue_wait,
                plan.tier.max_expected_wait,
            )
            .await
        {
            Ok(slot) => {
                self.queue_wait
                    .with_label_values(&[queue.pool(), tier])
                    .observe(slot.waited().as_secs_f64());
                Ok(slot)
            }
            Err(shed) => {
                let reason = match shed {
                    Shed::Busy { .. } => "busy",
                    Shed::TimedOut { .. } => "queue_timeout",
                };
                let error = ApiError::ServerBusy {
                    retry_after: shed.retry_after(),
                };
                Err(self.refuse(plan, reason, error).error)
            }
        }
    }

    /// Replaces the ticket's reservation by what the request really used.
    pub async fn settle(&self, ticket: Ticket, actual: Settlement) {
        self.limiter
            .settle(ticket.store, &ticket.reservation, actual)
            .await;
    }

    fn refuse(&self, plan: &Plan, reason: &str, error: ApiError) -> Refusal {
        debug_assert!(REFUSAL_REASONS.contains(&reason), "{reason} not listed");
        self.rejected
            .with_label_values(&[plan.tier.name.as_str(), reason])
            .inc();
        error.into()
    }
}

/// The admission queues, one per backend pool, and their signals.
pub struct AdmissionQueues {
    all: Vec<Arc<AdmissionQueue>>,
}

impl AdmissionQueues {
    fn new(config: &Config, tiers: Vec<String>, registry: &Registry) -> prometheus::Result<Self> {
        let mut capacity: Vec<(&str, u32)> = Vec::new();
        for backend in &config.backends {
            match capacity.iter_mut().find(|(pool, _)| *pool == backend.pool) {
                Some((_, slots)) => *slots = slots.saturating_add(backend.max_concurrency),
                None => capacity.push((&backend.pool, backend.max_concurrency)),
            }
        }
        let all: Vec<_> = capacity
            .into_iter()
            .map(|(pool, slots)| {
                AdmissionQueue::new(pool, slots, tiers.clone(), config.admission.aging)
            })
            .collect();
        let queues = Self { all };
        registry.register(Box::new(QueueCollector::new(queues.all.clone())?))?;
        Ok(queues)
    }

    /// The queue of the pool named `pool`.
    pub fn for_pool(&self, pool: &str) -> Option<&Arc<AdmissionQueue>> {
        self.all.iter().find(|q| q.pool() == pool)
    }

    /// Per pool and tier: depth, oldest wait, expected wait, shed counts.
    pub fn signals(&self) -> Vec<PoolSnapshot> {
        self.all.iter().map(|q| q.snapshot()).collect()
    }

    /// [`Self::signals`] as JSON, for `GET /admin/queues`.
    pub fn signals_json(&self) -> serde_json::Value {
        let seconds = |d: Duration| d.as_secs_f64();
        let pools: Vec<_> = self
            .signals()
            .into_iter()
            .map(|pool| {
                let tiers: Vec<_> = pool
                    .tiers
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "tier": t.tier,
                            "depth": t.depth,
                            "oldest_wait_secs": seconds(t.oldest_wait),
                            "expected_wait_secs": t.expected_wait.map(seconds),
                            "admitted": t.admitted_total,
                            "shed_busy": t.shed_busy_total,
                            "shed_timeout": t.shed_timeout_total,
                            "abandoned": t.abandoned_total,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "pool": pool.pool,
                    "slots": pool.capacity,
                    "in_use": pool.in_use,
                    "service_time_secs": pool.service_time.map(seconds),
                    "tiers": tiers,
                })
            })
            .collect();
        serde_json::json!({"object": "list", "data": pools})
    }

    /// Sets a pool's slot count (the fleet calls this as backends come and go).
    pub fn set_capacity(&self, pool: &str, slots: u32) -> bool {
        let queue = self.all.iter().find(|q| q.pool() == pool);
        if let Some(queue) = queue {
            queue.set_capacity(slots);
        }
        queue.is_some()
    }
}

/// What the fleet controller reads and sets.
impl Demand for AdmissionQueues {
    fn demand(&self) -> Vec<(String, Vec<TierWait>)> {
        self.signals()
            .into_iter()
            .map(|pool| {
                let tiers = pool
                    .tiers
                    .into_iter()
                    .map(|t| TierWait {
                        tier: t.tier,
                        depth: t.depth,
                        oldest_wait: t.oldest_wait,
                    })
                    .collect();
                (pool.pool, tiers)
            })
            .collect()
    }

    fn set_capacity(&self, pool: &str, slots: u32) {
        AdmissionQueues::set_capacity(self, pool, slots);
    }
}

/// Publishes the queues' snapshots as Prometheus metrics at scrape time, so
/// the request path updates no gauges.
struct QueueCollector {
    queues: Vec<Arc<AdmissionQueue>>,
    /// One scrape at a time: the shed counters catch up by difference.
    scraping: std::sync::Mutex<()>,
    depth: IntGaugeVec,
    oldest_wait: GaugeVec,
    expected_wait: GaugeVec,
    shed: IntCounterVec,
    slots: IntGaugeVec,
    in_use: IntGaugeVec,
}

impl QueueCollector {
    fn new(queues: Vec<Arc<AdmissionQueue>>) -> prometheus::Result<Self> {
        let tier = &["pool", "tier"];
        Ok(Self {
            queues,
            scraping: std::sync::Mutex::new(()),
            depth: IntGaugeVec::new(
                Opts::new(
                    metric_names::QUEUE_DEPTH,
                    "Requests waiting for a GPU slot.",
                ),
                tier,
            )?,
            oldest_wait: GaugeVec::new(
                Opts::new(
                    metric_names::QUEUE_OLDEST_WAIT_SECONDS,
                    "How long the longest-waiting request of the tier has waited.",
                ),
                tier,
            )?,
            expected_wait: GaugeVec::new(
                Opts::new(
                    metric_names::QUEUE_EXPECTED_WAIT_SECONDS,
                    "Expected wait of a request of the tier arriving now (-1: unknown).",
                ),
                tier,
            )?,
            shed: IntCounterVec::new(
                Opts::new(
                    metric_names::QUEUE_SHED_TOTAL,
                    "Requests refused as server busy: expected wait too long (busy) or waited out (timeout).",
                ),
                &["pool", "tier", "reason"],
            )?,
            slots: IntGaugeVec::new(
                Opts::new(
                    metric_names::POOL_SLOTS,
                    "GPU slots of the pool (its capacity).",
                ),
                &["pool"],
            )?,
            in_use: IntGaugeVec::new(
                Opts::new(
                    metric_names::POOL_SLOTS_IN_USE,
                    "GPU slots held by requests.",
                ),
                &["pool"],
            )?,
        })
    }

    fn parts(&self) -> [&dyn Collector; 6] {
        [
            &self.depth,
            &self.oldest_wait,
            &self.expected_wait,
            &self.shed,
            &self.slots,
            &self.in_use,
        ]
    }
}

impl Collector for QueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self
            .scraping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for queue in &self.queues {
            let pool = queue.snapshot();
            let name = pool.pool.as_str();
            self.slots
                .with_label_values(&[name])
                .set(i64::from(pool.capacity));
            self.in_use
                .with_label_values(&[name])
                .set(i64::from(pool.in_use));
            for tier in &pool.tiers {
                let labels = [name, tier.tier.as_str()];
                self.depth.with_label_values(&labels).set(tier.depth as i64);
                self.oldest_wait
                    .with_label_values(&labels)
                    .set(tier.oldest_wait.as_secs_f64());
                self.expected_wait
                    .with_label_values(&labels)
                    .set(tier.expected_wait.map_or(-1.0, |w| w.as_secs_f64()));
                for (reason, count) in [
                    ("busy", tier.shed_busy_total),
                    ("timeout", tier.shed_timeout_total),
                ] {
                    // The queue keeps the totals; the counter catches up to them.
                    let counter = self
                        .shed
                        .with_label_values(&[name, tier.tier.as_str(), reason]);
                    counter.inc_by(count.saturating_sub(counter.get()));
                }
            }
        }
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}
