//! The limit stores' conformance suite: the same scenarios against both
//! stores ([`LocalLimits`] and [`RedisLimits`], `proxy/src/admission/limits/`),
//! so that falling back from Redis to the local store changes where the state
//! is, not what it means.
//!
//! Each scenario is an `async fn(Store)`; [`on_both_stores!`] makes one test
//! per store of it. The Redis tests need a Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`) and fail without one; each uses its own key
//! prefix and deletes its keys afterwards, pass or fail. Both stores run on
//! real time here (Redis has no other), so assertions allow for refill: a
//! rule only ever gains room as time passes, and bounds are set from the
//! measured elapsed time, never from a guess of how fast things run.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::{Builder, Client, ClientLike, Config, KeysInterface};
use tokio::task::JoinSet;
use tollgate_metering::units::UnitKind;
use tollgate_testkit::eventually;
use uuid::Uuid;

use tollgate::admission::limits::local::LocalLimits;
use tollgate::admission::limits::redis::RedisLimits;
use tollgate::admission::limits::{
    AdmitRequest, HeldReservation, LimitStore, Period, Periods, QuotaRule, QuotaState, RateKind,
    RateRule, Reservation, Scope, Settlement, Snapshot, StoreError, Verdict, Window, Windows,
};

type Store = Arc<dyn LimitStore>;

macro_rules! on_both_stores {
    ($($scenario:ident),+ $(,)?) => {
        mod local_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::on_local(super::$scenario).await;
                }
            )+
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::on_redis(super::$scenario).await;
                }
            )+
        }
    };
}

on_both_stores!(
    rpm_admits_a_minutes_worth_then_refuses,
    token_estimate_is_charged_and_settlement_refunds_the_difference,
    key_rules_and_account_rules_are_independent,
    hard_cap_refuses_past_included_units_until_settlement_frees_some,
    overage_never_refuses_on_the_month,
    daily_cap_refuses_with_the_day_and_the_month_is_checked_first,
    max_concurrent_refuses_until_a_reservation_is_settled,
    refused_requests_change_nothing,
    unsettled_reservation_lapses_and_frees_its_units,
    a_replayed_settlement_counts_once,
    a_capped_quota_grants_the_room_left,
    a_request_never_forwarded_gets_its_request_charge_back,
    reconcile_raises_used_but_never_lowers_it,
    concurrent_admissions_never_pass_a_hard_cap,
    a_dry_run_refuses_like_an_admission_and_changes_nothing,
    quotas_of_two_unit_kinds_are_counted_apart,
);

async fn on_local<F, Fut>(scenario: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    scenario(Arc::new(LocalLimits::new())).await;
}

async fn on_redis<F, Fut>(scenario: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_redis(|store, _, _| scenario(store)).await;
}

/// Runs `scenario` on a [`RedisLimits`] with a fresh prefix, handing it the
/// client and the prefix as well, and deletes the prefix's keys after.
async fn with_redis<F, Fut>(scenario: F)
where
    F: FnOnce(Store, Client, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let client = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    client
        .init()
        .await
        .unwrap_or_else(|e| panic!("no Redis at {url} (set REDIS_URL): {e}"));
    let prefix = format!("tgtest:{}", Uuid::now_v7());
    let store: Store = Arc::new(RedisLimits::new(
        client.clone(),
        prefix.clone(),
        Duration::from_secs(5),
    ));
    // Spawned so that a failed assertion comes back here as an error and
    // the keys are deleted before it is raised again.
    let outcome = tokio::spawn(scenario(store, client.clone(), prefix.clone())).await;
    delete_keys(&client, &prefix).await;
    assert!(
        keys_under(&client, &prefix).await.is_empty(),
        "keys left under {prefix}"
    );
    let _ = client.quit().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .scan_page(cursor, format!("{prefix}:*"), Some(1000), None)
            .await
            .unwrap();
        found.extend(keys);
        if next == "0" {
            return found;
        }
        cursor = next;
    }
}

async fn delete_keys(client: &Client, prefix: &str) {
    let keys = keys_under(client, prefix).await;
    if !keys.is_empty() {
        let _: i64 = client.unlink(keys).await.unwrap();
    }
}

fn periods() -> Periods {
    Periods {
        month: "2026-11".to_owned(),
        day: "2026-11-23".to_owned(),
    }
}

fn rule(scope: Scope, kind: RateKind, per_minute: u64) -> RateRule {
    RateRule {
        scope,
        kind,
        per_minute,
    }
}

/// One account in the store under test; every scenario starts a new one.
#[derive(Clone)]
struct Account {
    store: Store,
    id: Uuid,
}

impl Account {
    /// A new account whose counters the store knows (in Redis: primed, as
    /// the limiter makes them before a capped admission).
    async fn new(store: &Store) -> Self {
        let id = Uuid::now_v7();
        store
            .restore(id, &periods(), &Snapshot::default())
            .await
            .unwrap();
        Self {
            store: store.clone(),
            id,
        }
    }

    fn request(
        &self,
        key: Uuid,
        rates: &[RateRule],
        quota: QuotaRule,
        units: u64,
        tokens: u64,
    ) -> AdmitRequest {
        AdmitRequest {
            account: self.id,
            key,
            reservation_id: Uuid::now_v7(),
            rates: rates.to_vec(),
            quota,
            estimate_tokens: tokens,
            estimate_units: units,
            min_units: units,
            periods: periods(),
            reservation_ttl: Duration::from_secs(60),
            dry_run: false,
        }
    }

    /// A dry run of an admission with no tokens, as the gateway's precheck.
    async fn dry_run(&self, key: Uuid, rates: &[RateRule], quota: QuotaRule) -> Verdict {
        let request = AdmitRequest {
            min_units: 1,
            dry_run: true,
            ..self.request(key, rates, quota, 0, 0)
        };
        self.store.admit(&request).await.unwrap()
    }

    async fn admit(
        &self,
        key: Uuid,
        rates: &[RateRule],
        quota: QuotaRule,
        units: u64,
        tokens: u64,
    ) -> Verdict {
        self.store
            .admit(&self.request(key, rates, quota, units, tokens))
            .await
            .unwrap()
    }

    async fn settle(&self, reservation: &Reservation, units: u64, tokens: u64) {
        self.store
            .settle(
                reservation,
                Settlement {
                    units,
                    tokens,
                    forwarded: true,
                },
            )
            .await
            .unwrap();
    }

    async fn state(&self) -> QuotaState {
        self.store.quota_state(self.id, &periods()).await.unwrap()
    }
}

fn admitted(verdict: Verdict) -> (Reservation, Windows) {
    match verdict {
        Verdict::Admitted {
            reservation,
            windows,
        } => (reservation, windows),
        other => panic!("expected an admission, got {other:?}"),
    }
}

fn hard_cap(units: u64) -> QuotaRule {
    QuotaRule {
        included_units: Some(units),
        hard_cap: true,
        ..QuotaRule::default()
    }
}

/// Asserts `remaining` is what it would be with no time passed, give or
/// take what a rule of `per_minute` refills in the time since `start`.
fn assert_remaining(window: Option<Window>, expected: u64, per_minute: u64, start: Instant) {
    let window = window.expect("a window for the rule");
    let refilled = (start.elapsed().as_secs_f64() * per_minute as f64 / 60.0).ceil() as u64;
    assert!(
        (expected..=expected + refilled).contains(&window.remaining),
        "remaining {} not within {expected}..={}",
        window.remaining,
        expected + refilled
    );
}

async fn rpm_admits_a_minutes_worth_then_refuses(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let rpm = [rule(Scope::Key, RateKind::Requests, 60)];
    let start = Instant::now();
    let mut admitted_count = 0_u64;
    let refusal = loop {
        match account.admit(key, &rpm, QuotaRule::default(), 0, 0).await {
            Verdict::Admitted { windows, .. } => {
                admitted_count += 1;
                if admitted_count == 1 {
                    assert_eq!(
                        windows.requests,
                        Some(Window {
                            limit: 60,
                            remaining: 59,
                            reset: Duration::from_secs(1)
                        })
                    );
                }
                assert!(admitted_count <= 1_000, "never refused");
            }
            other => break other,
        }
    };
    // One request a second comes back while the loop runs.
    let refilled = start.elapsed().as_secs() + 1;
    assert!(
        (60..=60 + refilled).contains(&admitted_count),
        "{admitted_count} admitted"
    );
    let Verdict::RateLimited {
        rule,
        retry_after,
        windows,
    } = refusal
    else {
        panic!("expected a rate limit, got {refusal:?}");
    };
    assert_eq!(rule, rpm[0]);
    assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
    let requests = windows.requests.unwrap();
    assert_eq!((requests.limit, requests.remaining), (60, 0));
    assert!(requests.reset > Duration::from_secs(59));
    assert_eq!(windows.tokens, None);
}

async fn token_estimate_is_charged_and_settlement_refunds_the_difference(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let tpm = [rule(Scope::Account, RateKind::Tokens, 150)];
    let (first, windows) = admitted(account.admit(key, &tpm, QuotaRule::default(), 0, 100).await);
    assert_eq!(windows.tokens.map(|w| w.remaining), Some(50));
    assert_eq!(windows.requests, None);

    // The estimate holds the rule: another 100 would not fit for 20 s.
    match account.admit(key, &tpm, QuotaRule::default(), 0, 100).await {
        Verdict::RateLimited {
            rule, retry_after, ..
        } => {
            assert_eq!(rule, tpm[0]);
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(20));
        }
        other => panic!("expected a rate limit, got {other:?}"),
    }

    // Only 10 were used: the other 90 come back at once.
    account.settle(&first, 0, 10).await;
    let (_, windows) = admitted(account.admit(key, &tpm, QuotaRule::default(), 0, 100).await);
    // Its own 100 (40 s of the rule) plus what is left of the first 10 (at
    // most 4 s): without the refund it would be refused until 80 s had
    // drained.
    let tokens = windows.tokens.unwrap();
    assert!((40..=50).contains(&tokens.remaining), "{tokens:?}");
    assert!(
        (Duration::from_secs(40)..=Duration::from_secs(44)).contains(&tokens.reset),
        "{tokens:?}"
    );
}

async fn key_rules_and_account_rules_are_independent(store: Store) {
    let account = Account::new(&store).await;
    let (key_a, key_b) = (Uuid::now_v7(), Uuid::now_v7());
    let rules = [
        rule(Scope::Key, RateKind::Requests, 2),
        rule(Scope::Account, RateKind::Requests, 3),
    ];
    for _ in 0..2 {
        admitted(
            account
                .admit(key_a, &rules, QuotaRule::default(), 0, 0)
                .await,
        );
    }
    let refused = account
        .admit(key_a, &rules, QuotaRule::default(), 0, 0)
        .await;
    assert!(
        matches!(refused, Verdict::RateLimited { rule, .. } if rule == rules[0]),
        "{refused:?}"
    );

    // Another key of the account has its own key rule but shares the
    // account's: one more fits the account.
    let (_, windows) = admitted(
        account
            .admit(key_b, &rules, QuotaRule::default(), 0, 0)
            .await,
    );
    assert_eq!(
        windows.requests.map(|w| (w.limit, w.remaining)),
        Some((3, 0))
    );
    let refused = account
        .admit(key_b, &rules, QuotaRule::default(), 0, 0)
        .await;
    assert!(
        matches!(refused, Verdict::RateLimited { rule, .. } if rule == rules[1]),
        "{refused:?}"
    );

    // Another account is untouched by all of this.
    let other = Account::new(&store).await;
    let (_, windows) = admitted(
        other
            .admit(Uuid::now_v7(), &rules, QuotaRule::default(), 0, 0)
            .await,
    );
    assert_eq!(
        windows.requests.map(|w| (w.limit, w.remaining)),
        Some((2, 1))
    );
}

async fn hard_cap_refuses_past_included_units_until_settlement_frees_some(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let quota = hard_cap(50);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(admitted(account.admit(key, &[], quota, 10, 0).await).0);
    }
    assert!(matches!(
        account.admit(key, &[], quota, 10, 0).await,
        Verdict::QuotaExhausted {
            period: Period::Month
        }
    ));
    let state = account.state().await;
    assert_eq!(
        (state.month_reserved, state.day_reserved, state.in_progress),
        (50, 50, 5)
    );

    // Settling 3 units for a 10-unit reservation frees 7: a request of 10
    // still does not fit (3 used + 40 reserved + 10), one of 7 does.
    account.settle(&held[0], 3, 0).await;
    let state = account.state().await;
    assert_eq!(
        (state.month_used, state.month_reserved, state.in_progress),
        (3, 40, 4)
    );
    assert!(matches!(
        account.admit(key, &[], quota, 10, 0).await,
        Verdict::QuotaExhausted {
            period: Period::Month
        }
    ));
    admitted(account.admit(key, &[], quota, 7, 0).await);
    let state = account.state().await;
    assert_eq!((state.month_used, state.month_reserved), (3, 47));
}

async fn overage_never_refuses_on_the_month(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let quota = QuotaRule {
        included_units: Some(50),
        hard_cap: false,
        ..QuotaRule::default()
    };
    for _ in 0..10 {
        admitted(account.admit(key, &[], quota, 10, 0).await);
    }
    assert_eq!(account.state().await.month_reserved, 100);
}

async fn daily_cap_refuses_with_the_day_and_the_month_is_checked_first(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let daily = QuotaRule {
        daily_cap: Some(20),
        ..QuotaRule::default()
    };
    for _ in 0..2 {
        admitted(account.admit(key, &[], daily, 10, 0).await);
    }
    assert!(matches!(
        account.admit(key, &[], daily, 10, 0).await,
        Verdict::QuotaExhausted {
            period: Period::Day
        }
    ));
    let both = QuotaRule {
        daily_cap: Some(20),
        ..hard_cap(20)
    };
    assert!(matches!(
        account.admit(key, &[], both, 10, 0).await,
        Verdict::QuotaExhausted {
            period: Period::Month
        }
    ));
    let state = account.state().await;
    assert_eq!((state.day_reserved, state.in_progress), (20, 2));
}

/// Regression: the local store forgot a kind's counters when an admission
/// in another kind moved the account's current periods.
async fn quotas_of_two_unit_kinds_are_counted_apart(store: Store) {
    let account = Account::new(&store).await;
    let images = periods().of_unit(UnitKind::Images);
    store
        .restore(account.id, &images, &Snapshot::default())
        .await
        .unwrap();
    let key = Uuid::now_v7();
    let daily = QuotaRule {
        daily_cap: Some(5),
        ..QuotaRule::default()
    };
    let in_images = |units| AdmitRequest {
        periods: images.clone(),
        ..account.request(key, &[], daily, units, 0)
    };
    let (spent, _) = admitted(store.admit(&in_images(5)).await.unwrap());
    account.settle(&spent, 5, 0).await;
    // Tokens have counters of their own: the images spent leave them whole.
    let (tokens, _) = admitted(account.admit(key, &[], daily, 5, 0).await);
    account.settle(&tokens, 5, 0).await;
    assert!(matches!(
        store.admit(&in_images(1)).await.unwrap(),
        Verdict::QuotaExhausted {
            period: Period::Day
        }
    ));
    let in_images = store.quota_state(account.id, &images).await.unwrap();
    assert_eq!((in_images.day_used, in_images.month_used), (5, 5));
    assert_eq!(account.state().await.day_used, 5);
}

async fn max_concurrent_refuses_until_a_reservation_is_settled(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let quota = QuotaRule {
        max_concurrent: Some(2),
        ..QuotaRule::default()
    };
    let (first, _) = admitted(account.admit(key, &[], quota, 1, 0).await);
    admitted(account.admit(key, &[], quota, 1, 0).await);
    assert!(matches!(
        account.admit(key, &[], quota, 1, 0).await,
        Verdict::Concurrency { limit: 2 }
    ));
    // A request that did no work releases its place and counts nothing.
    account.settle(&first, 0, 0).await;
    admitted(account.admit(key, &[], quota, 1, 0).await);
    let state = account.state().await;
    assert_eq!(
        (state.in_progress, state.month_used, state.month_reserved),
        (2, 0, 2)
    );
}

async fn a_dry_run_refuses_like_an_admission_and_changes_nothing(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let rpm = [rule(Scope::Key, RateKind::Requests, 2)];
    let quota = QuotaRule {
        included_units: Some(10),
        hard_cap: true,
        max_concurrent: Some(5),
        ..QuotaRule::default()
    };
    // Dry runs, however many, charge nothing: both real requests pass after.
    for _ in 0..10 {
        assert!(matches!(
            account.dry_run(key, &rpm, quota).await,
            Verdict::Admitted { .. }
        ));
    }
    let (first, _) = admitted(account.admit(key, &rpm, quota, 4, 0).await);
    admitted(account.admit(key, &rpm, quota, 4, 0).await);
    assert_eq!(account.state().await.in_progress, 2);
    // The minute's requests are spent: the dry run says so too.
    assert!(matches!(
        account.dry_run(key, &rpm, quota).await,
        Verdict::RateLimited { .. }
    ));
    // A used-up capped quota refuses a dry run on any key.
    account.settle(&first, 10, 0).await;
    assert!(matches!(
        account.dry_run(Uuid::now_v7(), &[], quota).await,
        Verdict::QuotaExhausted {
            period: Period::Month
        }
    ));
    let state = account.state().await;
    assert_eq!((state.in_progress, state.month_used), (1, 10));
}

async fn refused_requests_change_nothing(store: Store) {
    let account = Account::new(&store).await;
    let (key_a, key_b, key_c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let with_key_rule = [
        rule(Scope::Account, RateKind::Requests, 10),
        rule(Scope::Key, RateKind::Requests, 1),
        rule(Scope::Account, RateKind::Tokens, 100),
    ];
    let start = Instant::now();
    admitted(
        account
            .admit(key_a, &with_key_rule, QuotaRule::default(), 10, 10)
            .await,
    );
    let before = account.state().await;

    // Refused by the key rule: the account's rules before it are not
    // charged, and the windows reported are the account's as they stand.
    match account
        .admit(key_a, &with_key_rule, QuotaRule::default(), 10, 10)
        .await
    {
        Verdict::RateLimited { rule, windows, .. } => {
            assert_eq!(rule, with_key_rule[1]);
            assert_remaining(windows.tokens, 90, 100, start);
        }
        other => panic!("expected a rate limit, got {other:?}"),
    }
    assert_eq!(account.state().await, before);

    // Refused on quota, with rate rules that would pass: nothing charged.
    let refusals = [
        (hard_cap(30), 25),
        (
            QuotaRule {
                daily_cap: Some(15),
                ..QuotaRule::default()
            },
            6,
        ),
        (
            QuotaRule {
                max_concurrent: Some(1),
                ..QuotaRule::default()
            },
            1,
        ),
    ];
    for (quota, units) in refusals {
        let verdict = account.admit(key_b, &with_key_rule, quota, units, 10).await;
        assert!(
            matches!(
                verdict,
                Verdict::QuotaExhausted { .. } | Verdict::Concurrency { .. }
            ),
            "{verdict:?}"
        );
        assert_eq!(account.state().await, before);
    }

    // Key B's own one-a-minute rule was never charged, and the account's
    // rules hold only the admitted requests.
    admitted(
        account
            .admit(key_b, &with_key_rule, QuotaRule::default(), 5, 10)
            .await,
    );
    let account_only = [with_key_rule[0], with_key_rule[2]];
    let (_, windows) = admitted(
        account
            .admit(key_c, &account_only, QuotaRule::default(), 1, 10)
            .await,
    );
    assert_remaining(windows.requests, 7, 10, start);
    assert_remaining(windows.tokens, 70, 100, start);
    let state = account.state().await;
    assert_eq!((state.month_reserved, state.in_progress), (16, 3));
}

async fn unsettled_reservation_lapses_and_frees_its_units(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let quota = QuotaRule {
        max_concurrent: Some(1),
        ..hard_cap(10)
    };
    let mut request = account.request(key, &[], quota, 10, 0);
    request.reservation_ttl = Duration::from_millis(200);
    let (held, _) = admitted(store.admit(&request).await.unwrap());
    let state = account.state().await;
    assert!(
        state.in_progress <= 1 && state.month_reserved <= 10,
        "{state:?}"
    );

    // Real time for Redis's sake: wait for the lapse to show.
    eventually("the reservation lapses", || async {
        account.state().await.in_progress == 0
    })
    .await;
    assert_eq!(account.state().await, QuotaState::default());

    // Its place and units are free again.
    let (next, _) = admitted(account.admit(key, &[], quota, 6, 0).await);
    // The lapsed request settling late changes nothing: its reservation was
    // given back when it lapsed, and its units come back from the usage log
    // (reconcile), never twice.
    account.settle(&held, 4, 0).await;
    let state = account.state().await;
    assert_eq!(
        (
            state.month_used,
            state.month_reserved,
            state.day_reserved,
            state.in_progress
        ),
        (0, 6, 6, 1)
    );
    account.settle(&next, 6, 0).await;
    let state = account.state().await;
    assert_eq!(
        (state.month_used, state.month_reserved, state.in_progress),
        (6, 0, 0)
    );
}

async fn a_replayed_settlement_counts_once(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let (held, _) = admitted(account.admit(key, &[], hard_cap(50), 10, 0).await);
    account.settle(&held, 7, 0).await;
    account.settle(&held, 7, 0).await;
    let state = account.state().await;
    assert_eq!((state.month_used, state.month_reserved), (7, 0));
}

async fn a_capped_quota_grants_the_room_left(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let (first, _) = admitted(account.admit(key, &[], hard_cap(50), 40, 0).await);
    assert_eq!(first.units, 40);
    // 10 left: an estimate of 30 is granted 10, when at least 5 will do.
    let mut request = account.request(key, &[], hard_cap(50), 30, 0);
    request.min_units = 5;
    let (second, _) = admitted(store.admit(&request).await.unwrap());
    assert_eq!(second.units, 10);
    // Nothing left: even a request needing one unit is refused.
    let mut request = account.request(key, &[], hard_cap(50), 30, 0);
    request.min_units = 1;
    assert!(matches!(
        store.admit(&request).await.unwrap(),
        Verdict::QuotaExhausted {
            period: Period::Month
        }
    ));
    // The same with a daily cap: room 8 of 8, then refused below min_units.
    let daily = QuotaRule {
        daily_cap: Some(8),
        ..QuotaRule::default()
    };
    let other = Account::new(&store).await;
    let mut request = other.request(key, &[], daily, 30, 0);
    request.min_units = 3;
    let (granted, _) = admitted(store.admit(&request).await.unwrap());
    assert_eq!(granted.units, 8);
    assert!(matches!(
        store.admit(&request).await.unwrap(),
        Verdict::QuotaExhausted {
            period: Period::Day
        }
    ));
    account.settle(&first, 0, 0).await;
    account.settle(&second, 0, 0).await;
    other.settle(&granted, 0, 0).await;
}

async fn a_request_never_forwarded_gets_its_request_charge_back(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let rpm = [rule(Scope::Account, RateKind::Requests, 2)];
    let (first, _) = admitted(account.admit(key, &rpm, QuotaRule::default(), 1, 1).await);
    let (second, _) = admitted(account.admit(key, &rpm, QuotaRule::default(), 1, 1).await);
    assert!(matches!(
        account.admit(key, &rpm, QuotaRule::default(), 1, 1).await,
        Verdict::RateLimited { .. }
    ));
    // Shed from the queue: never reached a backend.
    store
        .settle(
            &second,
            Settlement {
                units: 0,
                tokens: 0,
                forwarded: false,
            },
        )
        .await
        .unwrap();
    let (third, _) = admitted(account.admit(key, &rpm, QuotaRule::default(), 1, 1).await);
    account.settle(&first, 1, 1).await;
    account.settle(&third, 1, 1).await;
}

async fn reconcile_raises_used_but_never_lowers_it(store: Store) {
    let account = Account::new(&store).await;
    let key = Uuid::now_v7();
    let (held, _) = admitted(account.admit(key, &[], QuotaRule::default(), 5, 0).await);
    account.settle(&held, 5, 0).await;

    store.reconcile(account.id, &periods(), 3, 2).await.unwrap();
    let state = account.state().await;
    assert_eq!((state.month_used, state.day_used), (5, 5));

    store.reconcile(account.id, &periods(), 8, 6).await.unwrap();
    let state = account.state().await;
    assert_eq!((state.month_used, state.day_used), (8, 6));

    // An account this store never saw gets the usage log's totals.
    let other = Account::new(&store).await;
    store.reconcile(other.id, &periods(), 7, 1).await.unwrap();
    let state = other.state().await;
    assert_eq!(
        (state.month_used, state.day_used, state.month_reserved),
        (7, 1, 0)
    );
    // And they count against a hard cap.
    assert!(matches!(
        other.admit(key, &[], hard_cap(10), 4, 0).await,
        Verdict::QuotaExhausted {
            period: Period::Month
        }
    ));
}

/// The one that matters: a thousand admissions at once against a hard cap
/// of 50 units. No interleaving may reserve past the cap, and the refused
/// ones must leave no trace in the quota or the rate rules.
async fn concurrent_admissions_never_pass_a_hard_cap(store: Store) {
    const REQUESTS: u64 = 1_000;
    const TPM: u64 = 100_000;
    let account = Account::new(&store).await;
    let quota = hard_cap(50);
    let rates = [rule(Scope::Account, RateKind::Tokens, TPM)];
    let start = Instant::now();

    let mut tasks = JoinSet::new();
    for i in 0..REQUESTS {
        let account = account.clone();
        tasks.spawn(async move {
            let units = i % 10 + 1;
            let key = Uuid::from_u64_pair(0, i % 7);
            account.admit(key, &rates, quota, units, units * 10).await
        });
    }
    let mut held = Vec::new();
    for verdict in tasks.join_all().await {
        match verdict {
            Verdict::Admitted { reservation, .. } => held.push(reservation),
            Verdict::QuotaExhausted {
                period: Period::Month,
            } => {}
            other => panic!("unexpected verdict {other:?}"),
        }
    }
    let reserved: u64 = held.iter().map(|r| r.units).sum();
    assert!(
        reserved <= 50,
        "{reserved} units reserved against a cap of 50"
    );
    // A refusal means the cap was within its estimate (at most 10) of full.
    assert!(
        reserved > 40,
        "only {reserved} units reserved: refused too early"
    );
    let state = account.state().await;
    assert_eq!(
        state,
        QuotaState {
            month_used: 0,
            month_reserved: reserved,
            day_used: 0,
            day_reserved: reserved,
            in_progress: held.len() as u64,
        }
    );

    let mut tasks = JoinSet::new();
    for reservation in held.clone() {
        let account = account.clone();
        tasks.spawn(async move {
            account
                .settle(&reservation, reservation.units, reservation.tokens)
                .await;
        });
    }
    tasks.join_all().await;
    let state = account.state().await;
    assert_eq!(
        state,
        QuotaState {
            month_used: reserved,
            month_reserved: 0,
            day_used: reserved,
            day_reserved: 0,
            in_progress: 0,
        }
    );

    // The token rule holds the admitted requests' tokens only (refill can
    // only add room; the refused requests' ~55,000 tokens would show).
    let (_, windows) = admitted(
        account
            .admit(Uuid::now_v7(), &rates, QuotaRule::default(), 0, 0)
            .await,
    );
    assert_remaining(windows.tokens, TPM - reserved * 10, TPM, start);
}

/// Redis only: every key a script writes expires (a key without a ttl would
/// outlive its account's activity forever), with the ttl its role needs,
/// and reservations settled leave no reservation keys behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_all_expire() {
    with_redis(|store, client, prefix| async move {
        const DAY_MS: i64 = 86_400_000;
        let account = Account::new(&store).await;
        let key = Uuid::now_v7();
        let rules = [
            rule(Scope::Key, RateKind::Requests, 60),
            rule(Scope::Key, RateKind::Tokens, 1_000),
            rule(Scope::Account, RateKind::Requests, 600),
            rule(Scope::Account, RateKind::Tokens, 10_000),
        ];
        let (held, _) = admitted(account.admit(key, &rules, hard_cap(100), 10, 100).await);
        let mut keys = keys_under(&client, &prefix).await;
        keys.sort();
        assert_eq!(keys.len(), 8, "{keys:?}");

        // A refusal creates nothing.
        assert!(matches!(
            account
                .admit(Uuid::now_v7(), &rules, hard_cap(5), 10, 100)
                .await,
            Verdict::QuotaExhausted { .. }
        ));
        assert_eq!(keys_under(&client, &prefix).await.len(), 8);

        let ttl = |key: String| {
            let client = client.clone();
            async move {
                let ttl: i64 = client.pttl(&key).await.unwrap();
                (key, ttl)
            }
        };
        for key in keys {
            let (key, ttl) = ttl(key).await;
            let expected = if key.contains(":rate:") {
                // Full again within 6 s at most here, plus the margin.
                1..=7_000
            } else if key.contains(":q:d:") {
                2 * DAY_MS..=3 * DAY_MS
            } else {
                // Month hashes and the reservation keys that point into them.
                39 * DAY_MS..=40 * DAY_MS
            };
            assert!(expected.contains(&ttl), "{key}: ttl {ttl} ms");
        }

        // Settled: the reservation keys empty out and go; the token rules
        // were refunded to nothing (actual 0 tokens), so their keys go too.
        account.settle(&held, 10, 0).await;
        let mut left = keys_under(&client, &prefix).await;
        left.sort();
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(
            left.iter()
                .all(|k| !k.ends_with(":res") && !k.ends_with(":resv"))
        );
        assert!(left.iter().all(|k| !k.ends_with(":tpm")));
        for key in left {
            let (key, ttl) = ttl(key).await;
            assert!(ttl > 0, "{key}: ttl {ttl} ms");
        }

        // Reconciliation of periods never written before gives them ttls too.
        let next = Periods {
            month: "2026-12".to_owned(),
            day: "2026-12-01".to_owned(),
        };
        store.reconcile(account.id, &next, 5, 5).await.unwrap();
        for key in keys_under(&client, &prefix).await {
            let (key, ttl) = ttl(key).await;
            assert!(ttl > 0, "{key}: ttl {ttl} ms");
        }
    })
    .await;
}

/// Before: Redis restarted empty gave a capped account its whole cap again
/// until the next reconciliation. Now a capped admission on counters Redis
/// does not hold as known is refused until they are restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_counters_refuse_a_cap_until_restored() {
    with_redis(|store, client, prefix| async move {
        let account = Account::new(&store).await;
        let key = Uuid::now_v7();
        let (used, _) = admitted(account.admit(key, &[], hard_cap(100), 10, 0).await);
        account.settle(&used, 60, 0).await;
        let (live, _) = admitted(account.admit(key, &[], hard_cap(100), 10, 0).await);

        // A restart with no persistence: every key is gone.
        delete_keys(&client, &prefix).await;
        let request = account.request(key, &[], hard_cap(100), 10, 0);
        assert!(matches!(
            store.admit(&request).await,
            Err(StoreError::Unprimed)
        ));

        let known = Snapshot {
            month_used: 60,
            day_used: 60,
            reservations: vec![HeldReservation {
                id: live.id,
                units: 10,
                remaining: Duration::from_secs(60),
            }],
        };
        for _ in 0..2 {
            // Restoring twice puts nothing back twice.
            store.restore(account.id, &periods(), &known).await.unwrap();
            let state = account.state().await;
            assert_eq!(
                (state.month_used, state.month_reserved, state.in_progress),
                (60, 10, 1)
            );
        }
        // 30 of 100 left.
        assert!(matches!(
            account.admit(key, &[], hard_cap(100), 31, 0).await,
            Verdict::QuotaExhausted { .. }
        ));
        admitted(account.admit(key, &[], hard_cap(100), 30, 0).await);
        // The restored reservation settles as if it had never left.
        account.settle(&live, 5, 0).await;
        let state = account.state().await;
        assert_eq!((state.month_used, state.month_reserved), (65, 30));
    })
    .await;
}
