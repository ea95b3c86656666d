//! Rate limits, concurrency limits and quota reservations: the state that
//! decides whether a request may go ahead, shared by every instance.
//!
//! [`LimitStore`] is the interface; [`redis::RedisLimits`] keeps the state in
//! Redis (one Lua script per call, so one round trip per request and nothing
//! half-applied), [`local::LocalLimits`] keeps it in this process with the
//! same semantics for a single instance without Redis, and as the backstop
//! while Redis is unreachable.
//!
//! Semantics (both stores):
//! - **Rate limits** are GCRA (see [`gcra`]): each rule allows `per_minute`
//!   units per minute, refilled evenly, with a burst of one minute's worth.
//!   A request costs 1 against request rules and its token estimate against
//!   token rules. A token rule is corrected at settlement by the difference
//!   between the actual tokens and the estimate.
//! - **Concurrency**: an account holds one live reservation per admitted
//!   request until it is settled (or lapses after `reservation_ttl`); with
//!   `max_concurrent` set, a request is refused while the account holds that many.
//! - **Quotas** are reserve-then-settle per account, unit kind and period
//!   (UTC month and day; see [`Periods::of_unit`]). A request reserves `estimate_units`, or with a hard cap (month)
//!   or a daily cap only the room left under it, `cap - used - reserved`; it
//!   is refused when that room is below `min_units` (the prompt and one
//!   token per choice). The reservation says how many units were granted, so
//!   the caller can shorten `max_tokens` to fit. Settlement moves the
//!   reservation into `used` at the actual units. A reservation never settled
//!   (an instance died) lapses after `reservation_ttl`.
//! - **Settlement happens once.** A settlement whose reservation is no longer
//!   held (settled already, or lapsed and purged) changes nothing, so a
//!   settlement replayed after a lost reply never counts twice; the usage log
//!   (see `reconcile`) restores the units of a lapsed one.
//! - **Corrections**: token rules are corrected at settlement by actual minus
//!   estimated tokens; request rules give the request back when it was never
//!   forwarded (shed from the queue, or its client left).
//! - **All or nothing**: a refused request changes no state.
//! - Check order: quota (month, then day), concurrency, then the rate rules
//!   in the order given; the first that fails is reported.
//! - **Dry runs** (`dry_run`) check the same way and change nothing: the
//!   gateway asks one with no tokens before counting a prompt.
//! - **Caps need known counters.** Redis can lose an account's counters (a
//!   restart with no persistence, a flush); deciding a cap on zeros would
//!   grant free usage. A capped admission on counters Redis does not hold as
//!   known fails with [`StoreError::Unprimed`]; the limiter then
//!   [restores](LimitStore::restore) them from its own copy and asks again.
//!
//! Both stores pass one conformance suite, against a real Redis:
//! `proxy/tests/gateway/limit_stores.rs`.

pub mod gcra;
pub mod local;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use tollgate_metering::units::UnitKind;
use uuid::Uuid;

/// Whose budget a rule spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Key,
    Account,
}

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKind {
    Requests,
    Tokens,
}

/// One GCRA limit: `per_minute` units per minute for the key or the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule {
    pub scope: Scope,
    pub kind: RateKind,
    pub per_minute: u64,
}

/// The quota side of a tier. `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaRule {
    /// Units included per billing period (UTC month).
    pub included_units: Option<u64>,
    /// Refuse past `included_units` (`false`: continue, the rest is overage).
    pub hard_cap: bool,
    /// Units per UTC day; always a hard limit.
    pub daily_cap: Option<u64>,
    /// Requests in progress (queued or forwarded) per account.
    pub max_concurrent: Option<u64>,
}

/// The quota periods a request falls in, e.g. `2026-11` and `2026-11-23`;
/// for a quota in a unit kind other than tokens the kind follows a dot
/// (`2026-11.images`), so each kind has its own counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    pub month: String,
    pub day: String,
}

impl Periods {
    /// The periods of the quota in `kind`. Tokens keep the bare names their
    /// counters always had.
    pub fn of_unit(self, kind: UnitKind) -> Self {
        if kind == UnitKind::Tokens {
            return self;
        }
        Self {
            month: format!("{}.{kind}", self.month),
            day: format!("{}.{kind}", self.day),
        }
    }
}

/// The period a counter's name is in, without its unit kind.
pub fn period_of(name: &str) -> &str {
    name.split_once('.').map_or(name, |(period, _)| period)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Month,
    Day,
}

/// One admission check.
#[derive(Debug, Clone)]
pub struct AdmitRequest {
    pub account: Uuid,
    pub key: Uuid,
    /// Names the reservation (the request's usage event id).
    pub reservation_id: Uuid,
    pub rates: Vec<RateRule>,
    pub quota: QuotaRule,
    /// Charged against token rules: prompt tokens plus `max_tokens`.
    pub estimate_tokens: u64,
    /// Reserved against the quota.
    pub estimate_units: u64,
    /// The least a capped quota may grant: below it the request is refused.
    pub min_units: u64,
    pub periods: Periods,
    /// How long an unsettled reservation holds.
    pub reservation_ttl: Duration,
    /// Only check: whatever the verdict, charge no rule and reserve nothing.
    pub dry_run: bool,
}

/// A rate window as OpenAI's `x-ratelimit-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window is full again.
    pub reset: Duration,
}

/// The tightest window (least remaining) per kind, after this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Windows {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

#[derive(Debug, Clone)]
pub enum Verdict {
    Admitted {
        reservation: Reservation,
        windows: Windows,
    },
    RateLimited {
        rule: RateRule,
        /// When this request would conform.
        retry_after: Duration,
        windows: Windows,
    },
    Concurrency {
        limit: u64,
    },
    QuotaExhausted {
        period: Period,
    },
}

/// What settlement needs to undo or complete an admission.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub account: Uuid,
    pub key: Uuid,
    pub id: Uuid,
    pub periods: Periods,
    /// Units granted: the estimate, or less under a capped quota.
    pub units: u64,
    pub tokens: u64,
    /// The rules charged, to correct at settlement.
    pub rules: Vec<RateRule>,
}

/// A request's actual usage: zero for one that did no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settlement {
    pub units: u64,
    pub tokens: u64,
    /// False when the request never reached a backend: its request-rule
    /// charge is given back.
    pub forwarded: bool,
}

impl Reservation {
    /// Per charged rule, the change in cost that settling at `actual` makes:
    /// tokens actual minus estimated; a request not forwarded, minus one.
    pub fn corrections(&self, actual: Settlement) -> Vec<(RateRule, i64)> {
        let token_delta = i128::from(actual.tokens) - i128::from(self.tokens);
        let token_delta =
            i64::try_from(token_delta).unwrap_or(if token_delta < 0 { i64::MIN } else { i64::MAX });
        self.rules
            .iter()
            .map(|rule| match rule.kind {
                RateKind::Tokens => (*rule, token_delta),
                RateKind::Requests => (*rule, if actual.forwarded { 0 } else { -1 }),
            })
            .filter(|(_, delta)| *delta != 0)
            .collect()
    }
}

/// Period counters of one account (for reconciliation and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaState {
    pub month_used: u64,
    pub month_reserved: u64,
    pub day_used: u64,
    pub day_reserved: u64,
    /// Live reservations (requests in progress).
    pub in_progress: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis answered {0}")]
    Protocol(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The store lost the account's counters (a Redis restart or flush), or
    /// never had them: [`LimitStore::restore`] must put them back before a
    /// cap can be decided there.
    #[error("the account's counters are not known here; restore them first")]
    Unprimed,
    /// Nothing to restore from yet: this process has not read the usage
    /// log's totals since it started.
    #[error("this process has not reconciled with the usage log yet")]
    NotReconciled,
}

#[async_trait]
pub trait LimitStore: Send + Sync {
    /// Checks every rule and, when all pass, charges them and reserves.
    async fn admit(&self, request: &AdmitRequest) -> Result<Verdict, StoreError>;

    /// Replaces a reservation by the actual usage (zero releases it). Once
    /// only: when the reservation is no longer held, nothing changes.
    async fn settle(&self, reservation: &Reservation, actual: Settlement)
    -> Result<(), StoreError>;

    /// Raises the account's `used` counters to at least the given totals
    /// (from the usage log), never lowers them.
    async fn reconcile(
        &self,
        account: Uuid,
        periods: &Periods,
        month_units: u64,
        day_units: u64,
    ) -> Result<(), StoreError>;

    async fn quota_state(&self, account: Uuid, periods: &Periods)
    -> Result<QuotaState, StoreError>;

    /// Puts back what `known` says of an account's counters in `periods`:
    /// raises `used` to its figures, adds the reservations it holds that the
    /// store lacks, and marks the account's counters known again, which a
    /// capped admission requires. A store that never loses state (this
    /// process's own) has nothing to do.
    async fn restore(
        &self,
        account: Uuid,
        periods: &Periods,
        known: &Snapshot,
    ) -> Result<(), StoreError>;
}

/// What this process knows of one account's counters in some periods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub month_used: u64,
    pub day_used: u64,
    /// Live reservations made in those periods.
    pub reservations: Vec<HeldReservation>,
}

/// A live reservation as a snapshot carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldReservation {
    pub id: Uuid,
    pub units: u64,
    /// Until it lapses.
    pub remaining: Duration,
}
