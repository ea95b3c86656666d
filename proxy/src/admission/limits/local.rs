//! [`LocalLimits`]: the limit state of this process alone, for a single
//! instance without Redis and as the backstop while Redis is unreachable.
//!
//! Everything sits behind one std [`Mutex`]: every call is a few map
//! operations with no `.await` inside, so holding the lock for the whole
//! check-then-charge is cheap and makes each call all or nothing, as the
//! Redis scripts are.
//!
//! With Redis, this store is also the process's copy of what it did there:
//! every reservation made in Redis is held here too ([`LocalLimits::hold`])
//! and every settlement lands here as well, so when Redis fails this store
//! knows the account's usage, and when Redis comes back empty the limiter
//! puts this copy back ([`LocalLimits::snapshot`]).
//!
//! Time is microseconds on this process's monotonic clock. Old state is
//! dropped lazily: lapsed reservations when their account is next touched,
//! other periods' counters once nothing is reserved in them, and, in sweeps
//! whose cost is amortised over the growth of the maps, rate states that are
//! full again (a missing TAT means full) and accounts with nothing current.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    AdmitRequest, HeldReservation, LimitStore, Period, Periods, QuotaState, RateKind, RateRule,
    Reservation, Scope, Settlement, Snapshot, StoreError, Verdict, gcra, period_of,
};

/// Maps are swept when they have doubled since the last sweep, and never
/// below this size: small maps are not worth the walk.
const SWEEP_MIN_LEN: usize = 1024;

pub struct LocalLimits {
    clock: Clock,
    state: Mutex<State>,
}

impl Default for LocalLimits {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalLimits {
    pub fn new() -> Self {
        Self::with_clock(Clock::Monotonic(std::time::Instant::now()))
    }

    fn with_clock(clock: Clock) -> Self {
        Self {
            clock,
            state: Mutex::new(State {
                tats: HashMap::new(),
                accounts: HashMap::new(),
                sweep_tats_at: SWEEP_MIN_LEN,
                sweep_accounts_at: SWEEP_MIN_LEN,
            }),
        }
    }

    /// Holds a reservation another store (Redis) granted, as if granted
    /// here: its units count as reserved in its periods until it is settled
    /// here too or lapses after `ttl`.
    pub fn hold(&self, reservation: &Reservation, ttl: std::time::Duration) {
        let now = self.clock.now_us();
        let ttl = u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX);
        let mut state = self.lock();
        let account = state.accounts.entry(reservation.account).or_default();
        account.purge(now);
        account.end(reservation.id);
        for (map, period) in [
            (&mut account.months, &reservation.periods.month),
            (&mut account.days, &reservation.periods.day),
        ] {
            let counter = map.entry(period.clone()).or_default();
            counter.reserved = counter.reserved.saturating_add(reservation.units);
        }
        account.hold(
            reservation.id,
            Live {
                expires_at: now.saturating_add(ttl),
                month: reservation.periods.month.clone(),
                day: reservation.periods.day.clone(),
                units: reservation.units,
            },
        );
    }

    /// What this store knows of `account` in `periods`: `used`, and the live
    /// reservations made in them.
    pub fn snapshot(&self, account: Uuid, periods: &Periods) -> Snapshot {
        let now = self.clock.now_us();
        let mut state = self.lock();
        let Some(account) = state.accounts.get_mut(&account) else {
            return Snapshot::default();
        };
        account.purge(now);
        Snapshot {
            month_used: Account::counter(&account.months, &periods.month).used,
            day_used: Account::counter(&account.days, &periods.day).used,
            reservations: account
                .live
                .iter()
                .filter(|(_, live)| live.month == periods.month && live.day == periods.day)
                .map(|(&id, live)| HeldReservation {
                    id,
                    units: live.units,
                    remaining: std::time::Duration::from_micros(
                        live.expires_at.saturating_sub(now),
                    ),
                })
                .collect(),
        }
    }

    /// A poisoned lock is taken over rather than reported: no code under the
    /// lock can panic halfway through a change (no indexing, no unchecked
    /// arithmetic), so the state behind it is whole.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where "now" comes from: the process's monotonic clock, or in unit tests
/// a hand-moved one, so that refill and lapse are tested at exact times.
enum Clock {
    Monotonic(std::time::Instant),
    #[cfg(test)]
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    /// Microseconds since the clock's start.
    fn now_us(&self) -> u64 {
        match self {
            Self::Monotonic(start) => {
                u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
            }
            #[cfg(test)]
            Self::Manual(now) => now.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

struct State {
    /// GCRA TATs, µs on the store's clock; missing means full.
    tats: HashMap<RateKey, u64>,
    accounts: HashMap<Uuid, Account>,
    sweep_tats_at: usize,
    sweep_accounts_at: usize,
}

/// Whose rule state this is: the key's (`Some`) or the account's, per
/// kind. A key's state is filed under its account, as in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RateKey {
    account: Uuid,
    key: Option<Uuid>,
    kind: RateKind,
}

impl RateKey {
    fn new(rule: &RateRule, account: Uuid, key: Uuid) -> Self {
        Self {
            account,
            key: match rule.scope {
                Scope::Key => Some(key),
                Scope::Account => None,
            },
            kind: rule.kind,
        }
    }
}

#[derive(Default)]
struct Account {
    /// The periods of the account's latest admission: what sweeps keep.
    /// Per account, as each may have its own billing period.
    current: Option<Periods>,
    months: HashMap<String, Counter>,
    days: HashMap<String, Counter>,
    /// Reservations not yet settled, by id.
    live: HashMap<Uuid, Live>,
    /// The same by expiry, so that finding the lapsed ones is no scan.
    expiries: BTreeSet<(u64, Uuid)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    used: u64,
    reserved: u64,
}

struct Live {
    expires_at: u64,
    month: String,
    day: String,
    units: u64,
}

impl Account {
    fn counter(map: &HashMap<String, Counter>, period: &str) -> Counter {
        map.get(period).copied().unwrap_or_default()
    }

    /// Returns a reservation's units to the periods it was made in.
    fn unreserve(&mut self, live: &Live) {
        for (map, period) in [(&mut self.months, &live.month), (&mut self.days, &live.day)] {
            if let Some(counter) = map.get_mut(period) {
                counter.reserved = counter.reserved.saturating_sub(live.units);
            }
        }
    }

    fn hold(&mut self, id: Uuid, live: Live) {
        self.expiries.insert((live.expires_at, id));
        self.live.insert(id, live);
    }

    /// Ends a reservation if it is still live; returns whether it was.
    fn end(&mut self, id: Uuid) -> bool {
        let Some(live) = self.live.remove(&id) else {
            return false;
        };
        self.expiries.remove(&(live.expires_at, id));
        self.unreserve(&live);
        true
    }

    /// Ends the reservations that lapsed by `now`.
    fn purge(&mut self, now: u64) {
        while let Some(&(expires_at, id)) = self.expiries.first()
            && expires_at <= now
        {
            self.expiries.pop_first();
            if let Some(live) = self.live.remove(&id) {
                self.unreserve(&live);
            }
        }
    }

    /// Forgets counters that no admission reads again: other periods' once
    /// nothing is reserved in them, and zeros (a missing counter is zero).
    /// The current period's counters of every unit kind are kept.
    fn keep_only(&mut self, periods: &Periods) {
        let keep = |current: bool, counter: &Counter| {
            counter.reserved > 0 || (current && counter.used > 0)
        };
        let (month, day) = (period_of(&periods.month), period_of(&periods.day));
        self.months
            .retain(|name, counter| keep(period_of(name) == month, counter));
        self.days
            .retain(|name, counter| keep(period_of(name) == day, counter));
    }

    fn is_empty(&self) -> bool {
        self.months.is_empty() && self.days.is_empty() && self.live.is_empty()
    }
}

impl State {
    fn sweep(&mut self, now: u64) {
        if self.tats.len() > self.sweep_tats_at {
            self.tats.retain(|_, tat| *tat > now);
            self.sweep_tats_at = (self.tats.len() * 2).max(SWEEP_MIN_LEN);
        }
        if self.accounts.len() > self.sweep_accounts_at {
            self.accounts.retain(|_, account| {
                account.purge(now);
                if let Some(current) = account.current.take() {
                    account.keep_only(&current);
                    account.current = Some(current);
                }
                !account.is_empty()
            });
            self.sweep_accounts_at = (self.accounts.len() * 2).max(SWEEP_MIN_LEN);
        }
    }

    fn admit(&mut self, now: u64, request: &AdmitRequest) -> Verdict {
        self.sweep(now);
        let Self { tats, accounts, .. } = self;
        let account = accounts.entry(request.account).or_default();
        account.purge(now);
        account.keep_only(&request.periods);
        if account.current.as_ref() != Some(&request.periods) {
            account.current = Some(request.periods.clone());
        }

        // Quota: month, then day, then concurrency. A capped quota grants
        // the room left under it, refused below `min_units`.
        let quota = &request.quota;
        let mut units = request.estimate_units;
        let month = Account::counter(&account.months, &request.periods.month);
        let day = Account::counter(&account.days, &request.periods.day);
        let caps = [
            (
                Period::Month,
                quota.included_units.filter(|_| quota.hard_cap),
                month,
            ),
            (Period::Day, quota.daily_cap, day),
        ];
        for (period, cap, counter) in caps {
            if let Some(cap) = cap {
                let room = cap.saturating_sub(counter.used.saturating_add(counter.reserved));
                if room < request.min_units.max(1) {
                    return Verdict::QuotaExhausted { period };
                }
                units = units.min(room);
            }
        }
        if let Some(limit) = quota.max_concurrent
            && account.live.len() as u64 >= limit
        {
            return Verdict::Concurrency { limit };
        }

        // Rates, in order; nothing is written until all conform. A rule that
        // shares its state with an earlier one (the same scope and kind
        // twice) sees that rule's charge.
        let mut charged: Vec<(RateKey, u64)> = Vec::with_capacity(request.rates.len());
        let mut before = Vec::with_capacity(request.rates.len());
        let mut after = Vec::with_capacity(request.rates.len());
        let mut refused = None;
        for rule in &request.rates {
            let key = RateKey::new(rule, request.account, request.key);
            let stored = tats.get(&key).copied().unwrap_or(0);
            before.push(stored.saturating_sub(now));
            let tat = charged
                .iter()
                .rev()
                .find(|(charged_key, _)| *charged_key == key)
                .map_or(stored, |(_, tat)| *tat);
            let cost = match rule.kind {
                RateKind::Requests => 1,
                RateKind::Tokens => request.estimate_tokens,
            };
            match gcra::check(tat, now, cost, rule.per_minute) {
                Ok((next, _)) => {
                    charged.push((key, next));
                    after.push(next.saturating_sub(now));
                }
                Err(nonconforming) => {
                    refused.get_or_insert((*rule, nonconforming.retry_after));
                    after.push(0);
                }
            }
        }
        if let Some((rule, retry_after)) = refused {
            return Verdict::RateLimited {
                rule,
                retry_after,
                windows: gcra::tightest(&request.rates, &before),
            };
        }
        if request.dry_run {
            return Verdict::Admitted {
                reservation: reservation(request, 0),
                windows: gcra::tightest(&request.rates, &before),
            };
        }

        // Everything conforms: charge and reserve.
        for (key, tat) in charged {
            if tat > now {
                tats.insert(key, tat);
            }
        }
        // An id admitted twice replaces its reservation instead of holding two.
        account.end(request.reservation_id);
        for (map, period) in [
            (&mut account.months, &request.periods.month),
            (&mut account.days, &request.periods.day),
        ] {
            let counter = map.entry(period.clone()).or_default();
            counter.reserved = counter.reserved.saturating_add(units);
        }
        let ttl = u64::try_from(request.reservation_ttl.as_micros()).unwrap_or(u64::MAX);
        account.hold(
            request.reservation_id,
            Live {
                expires_at: now.saturating_add(ttl),
                month: request.periods.month.clone(),
                day: request.periods.day.clone(),
                units,
            },
        );
        Verdict::Admitted {
            reservation: reservation(request, units),
            windows: gcra::tightest(&request.rates, &after),
        }
    }

    fn settle(&mut self, now: u64, reservation: &Reservation, actual: Settlement) {
        let account = self.accounts.entry(reservation.account).or_default();
        // Not held (settled already, or lapsed and purged): nothing to do.
        if !account.end(reservation.id) {
            return;
        }
        if actual.units > 0 {
            for (map, period) in [
                (&mut account.months, &reservation.periods.month),
                (&mut account.days, &reservation.periods.day),
            ] {
                let counter = map.entry(period.clone()).or_default();
                counter.used = counter.used.saturating_add(actual.units);
            }
        }
        for (rule, delta) in reservation.corrections(actual) {
            let key = RateKey::new(&rule, reservation.account, reservation.key);
            let tat = self.tats.get(&key).copied().unwrap_or(0);
            let corrected = gcra::adjust(tat, now, delta, rule.per_minute);
            if corrected > now {
                self.tats.insert(key, corrected);
            } else {
                self.tats.remove(&key);
            }
        }
    }

    fn reconcile(&mut self, account: Uuid, periods: &Periods, month_units: u64, day_units: u64) {
        let account = self.accounts.entry(account).or_default();
        for (map, period, total) in [
            (&mut account.months, &periods.month, month_units),
            (&mut account.days, &periods.day, day_units),
        ] {
            let counter = map.entry(period.clone()).or_default();
            counter.used = counter.used.max(total);
        }
        // These are the account's periods now: what a sweep keeps.
        account.current = Some(periods.clone());
    }

    fn quota_state(&mut self, now: u64, account: Uuid, periods: &Periods) -> QuotaState {
        let Some(account) = self.accounts.get_mut(&account) else {
            return QuotaState::default();
        };
        account.purge(now);
        let month = Account::counter(&account.months, &periods.month);
        let day = Account::counter(&account.days, &periods.day);
        QuotaState {
            month_used: month.used,
            month_reserved: month.reserved,
            day_used: day.used,
            day_reserved: day.reserved,
            in_progress: account.live.len() as u64,
        }
    }
}

/// What an admitted request holds until it is settled: `units` granted.
pub(super) fn reservation(request: &AdmitRequest, units: u64) -> Reservation {
    Reservation {
        account: request.account,
        key: request.key,
        id: request.reservation_id,
        periods: request.periods.clone(),
        units,
        tokens: request.estimate_tokens,
        rules: request.rates.clone(),
    }
}

#[async_trait]
impl LimitStore for LocalLimits {
    async fn admit(&self, request: &AdmitRequest) -> Result<Verdict, StoreError> {
        let now = self.clock.now_us();
        Ok(self.lock().admit(now, request))
    }

    async fn settle(
        &self,
        reservation: &Reservation,
        actual: Settlement,
    ) -> Result<(), StoreError> {
        let now = self.clock.now_us();
        self.lock().settle(now, reservation, actual);
        Ok(())
    }

    async fn reconcile(
        &self,
        account: Uuid,
        periods: &Periods,
        month_units: u64,
        day_units: u64,
    ) -> Result<(), StoreError> {
        self.lock()
            .reconcile(account, periods, month_units, day_units);
        Ok(())
    }

    async fn quota_state(
        &self,
        account: Uuid,
        periods: &Periods,
    ) -> Result<QuotaState, StoreError> {
        let now = self.clock.now_us();
        Ok(self.lock().quota_state(now, account, periods))
    }

    /// This process's own state is never lost while it runs.
    async fn restore(&self, _: Uuid, _: &Periods, _: &Snapshot) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::super::QuotaRule;
    use super::*;

    const SECOND: u64 = 1_000_000;

    /// A store on a hand-moved clock.
    struct Fixture {
        store: LocalLimits,
        now: Arc<AtomicU64>,
        account: Uuid,
        key: Uuid,
    }

    impl Fixture {
        fn new() -> Self {
            let now = Arc::new(AtomicU64::new(0));
            Self {
                store: LocalLimits::with_clock(Clock::Manual(now.clone())),
                now,
                account: Uuid::now_v7(),
                key: Uuid::now_v7(),
            }
        }

        fn advance(&self, by: Duration) {
            self.now.fetch_add(by.as_micros() as u64, Ordering::Relaxed);
        }

        fn request(
            &self,
            rates: &[RateRule],
            quota: QuotaRule,
            units: u64,
            tokens: u64,
        ) -> AdmitRequest {
            AdmitRequest {
                account: self.account,
                key: self.key,
                reservation_id: Uuid::now_v7(),
                rates: rates.to_vec(),
                quota,
                estimate_tokens: tokens,
                estimate_units: units,
                min_units: units,
                periods: periods("2026-11-23"),
                reservation_ttl: Duration::from_secs(60),
                dry_run: false,
            }
        }

        async fn admit(&self, request: &AdmitRequest) -> Verdict {
            self.store.admit(request).await.unwrap()
        }

        async fn state(&self, day: &str) -> QuotaState {
            self.store
                .quota_state(self.account, &periods(day))
                .await
                .unwrap()
        }
    }

    fn periods(day: &str) -> Periods {
        Periods {
            month: day[..7].to_owned(),
            day: day.to_owned(),
        }
    }

    fn rule(scope: Scope, kind: RateKind, per_minute: u64) -> RateRule {
        RateRule {
            scope,
            kind,
            per_minute,
        }
    }

    fn admitted(verdict: Verdict) -> (Reservation, super::super::Windows) {
        match verdict {
            Verdict::Admitted {
                reservation,
                windows,
            } => (reservation, windows),
            other => panic!("expected admission, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn rpm_refills_one_request_per_interval() {
        let f = Fixture::new();
        let rpm = [rule(Scope::Key, RateKind::Requests, 60)];
        for _ in 0..60 {
            admitted(f.admit(&f.request(&rpm, QuotaRule::default(), 0, 0)).await);
        }
        let Verdict::RateLimited {
            retry_after,
            windows,
            ..
        } = f.admit(&f.request(&rpm, QuotaRule::default(), 0, 0)).await
        else {
            panic!("61st request admitted");
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        assert_eq!(windows.requests.map(|w| w.remaining), Some(0));
        assert_eq!(
            windows.requests.map(|w| w.reset),
            Some(Duration::from_secs(60))
        );

        f.advance(Duration::from_millis(999));
        assert!(matches!(
            f.admit(&f.request(&rpm, QuotaRule::default(), 0, 0)).await,
            Verdict::RateLimited { .. }
        ));
        f.advance(Duration::from_millis(1));
        let (_, windows) = admitted(f.admit(&f.request(&rpm, QuotaRule::default(), 0, 0)).await);
        assert_eq!(windows.requests.map(|w| w.remaining), Some(0));

        // Thirty seconds give back thirty requests, no more.
        f.advance(Duration::from_secs(30));
        for _ in 0..30 {
            admitted(f.admit(&f.request(&rpm, QuotaRule::default(), 0, 0)).await);
        }
        let Verdict::RateLimited { retry_after, .. } =
            f.admit(&f.request(&rpm, QuotaRule::default(), 0, 0)).await
        else {
            panic!("more than thirty refilled");
        };
        assert_eq!(retry_after, Duration::from_secs(1));
    }

    #[tokio::test]
    async fn reservation_lapses_exactly_at_its_ttl() {
        let f = Fixture::new();
        let quota = QuotaRule {
            max_concurrent: Some(1),
            ..QuotaRule::default()
        };
        let mut request = f.request(&[], quota, 10, 0);
        request.reservation_ttl = Duration::from_secs(1);
        let (held, _) = admitted(f.admit(&request).await);

        f.advance(Duration::from_micros(SECOND - 1));
        assert_eq!(f.state("2026-11-23").await.in_progress, 1);
        assert!(matches!(
            f.admit(&f.request(&[], quota, 1, 0)).await,
            Verdict::Concurrency { limit: 1 }
        ));

        f.advance(Duration::from_micros(1));
        let state = f.state("2026-11-23").await;
        assert_eq!(
            (state.in_progress, state.month_reserved, state.day_reserved),
            (0, 0, 0)
        );

        // The lapsed request finishes after all: nothing changes (its units
        // come back from the usage log, never twice).
        let (next, _) = admitted(f.admit(&f.request(&[], quota, 5, 0)).await);
        f.store
            .settle(
                &held,
                Settlement {
                    units: 4,
                    tokens: 0,
                    forwarded: true,
                },
            )
            .await
            .unwrap();
        let state = f.state("2026-11-23").await;
        assert_eq!(
            (state.month_used, state.month_reserved, state.in_progress),
            (0, 5, 1)
        );
        f.store.settle(&next, Settlement::default()).await.unwrap();
        assert_eq!(f.state("2026-11-23").await, QuotaState::default());
    }

    #[tokio::test]
    async fn refund_never_banks_allowance_and_overuse_is_charged() {
        let f = Fixture::new();
        let tpm = [rule(Scope::Account, RateKind::Tokens, 150)];
        let (held, windows) = admitted(
            f.admit(&f.request(&tpm, QuotaRule::default(), 0, 100))
                .await,
        );
        assert_eq!(windows.tokens.map(|w| w.remaining), Some(50));

        // A minute later the rule is full again; refunding 100 must not make
        // room for more than 150.
        f.advance(Duration::from_secs(60));
        f.store
            .settle(
                &held,
                Settlement {
                    units: 0,
                    tokens: 0,
                    forwarded: true,
                },
            )
            .await
            .unwrap();
        let (_, windows) = admitted(
            f.admit(&f.request(&tpm, QuotaRule::default(), 0, 150))
                .await,
        );
        assert_eq!(windows.tokens.map(|w| w.remaining), Some(0));

        // Using more than estimated pushes the rule past its burst: the next
        // request waits for the overuse to drain.
        f.advance(Duration::from_secs(60));
        let (held, _) = admitted(
            f.admit(&f.request(&tpm, QuotaRule::default(), 0, 100))
                .await,
        );
        f.store
            .settle(
                &held,
                Settlement {
                    units: 0,
                    tokens: 250,
                    forwarded: true,
                },
            )
            .await
            .unwrap();
        let Verdict::RateLimited {
            retry_after,
            windows,
            ..
        } = f.admit(&f.request(&tpm, QuotaRule::default(), 0, 1)).await
        else {
            panic!("admitted while 250 tokens of a 150 TPM rule were in use");
        };
        // Level 100 s, plus 0.4 s for this token, less the 60 s burst.
        assert_eq!(retry_after, Duration::from_millis(40_400));
        assert_eq!(
            windows.tokens.map(|w| w.reset),
            Some(Duration::from_secs(100))
        );
    }

    #[tokio::test]
    async fn a_rule_repeated_in_one_request_is_charged_twice() {
        let f = Fixture::new();
        let rules = [
            rule(Scope::Key, RateKind::Requests, 2),
            rule(Scope::Key, RateKind::Requests, 2),
        ];
        admitted(
            f.admit(&f.request(&rules, QuotaRule::default(), 0, 0))
                .await,
        );
        let Verdict::RateLimited { windows, .. } = f
            .admit(&f.request(&rules, QuotaRule::default(), 0, 0))
            .await
        else {
            panic!("the shared state was charged once");
        };
        assert_eq!(windows.requests.map(|w| w.remaining), Some(0));
    }

    #[tokio::test]
    async fn a_new_day_forgets_yesterday_but_yesterdays_reservation_still_returns() {
        let f = Fixture::new();
        let quota = QuotaRule {
            daily_cap: Some(10),
            ..QuotaRule::default()
        };
        let (late, _) = admitted(f.admit(&f.request(&[], quota, 6, 0)).await);
        let mut today = f.request(&[], quota, 10, 0);
        today.periods = periods("2026-11-24");
        let (early, _) = admitted(f.admit(&today).await);
        assert_eq!(f.state("2026-11-23").await.day_reserved, 6);
        assert_eq!(f.state("2026-11-24").await.day_reserved, 10);

        f.store
            .settle(
                &late,
                Settlement {
                    units: 6,
                    tokens: 0,
                    forwarded: true,
                },
            )
            .await
            .unwrap();
        f.store
            .settle(
                &early,
                Settlement {
                    units: 10,
                    tokens: 0,
                    forwarded: true,
                },
            )
            .await
            .unwrap();
        let state = f.state("2026-11-24").await;
        assert_eq!((state.month_used, state.month_reserved), (16, 0));
        assert_eq!((state.day_used, state.day_reserved), (10, 0));

        // The next admission drops the 23rd's counter: nothing is reserved
        // in it and no admission reads it again.
        // (Today's cap is spent: this one asks for no quota.)
        today.reservation_id = Uuid::now_v7();
        today.estimate_units = 0;
        today.quota = QuotaRule::default();
        admitted(f.admit(&today).await);
        assert_eq!(f.state("2026-11-23").await.day_used, 0);
    }

    #[tokio::test]
    async fn sweeps_drop_full_rate_states_and_idle_accounts() {
        let f = Fixture::new();
        let rpm = [rule(Scope::Key, RateKind::Requests, 60)];
        for _ in 0..=SWEEP_MIN_LEN {
            let mut request = f.request(&rpm, QuotaRule::default(), 0, 0);
            request.account = Uuid::now_v7();
            request.key = Uuid::now_v7();
            request.reservation_ttl = Duration::from_secs(1);
            admitted(f.admit(&request).await);
        }
        {
            let state = f.store.lock();
            assert_eq!(state.tats.len(), SWEEP_MIN_LEN + 1);
            assert_eq!(state.accounts.len(), SWEEP_MIN_LEN + 1);
        }
        f.advance(Duration::from_secs(2));
        admitted(f.admit(&f.request(&rpm, QuotaRule::default(), 0, 0)).await);
        let state = f.store.lock();
        assert_eq!(state.tats.len(), 1);
        assert_eq!(state.accounts.len(), 1);
    }
}
