//! What one admission costs the request path: a `LimitStore::admit` alone,
//! and an `admit` + `settle` pair (a whole request's limit work), on
//! `RedisLimits` against this machine's Redis and on `LocalLimits`.
//!
//! Every request carries what a metered tier does: requests-per-minute and
//! tokens-per-minute rules for both the key and the account, and a month
//! quota with included units under a hard cap. Requests rotate over
//! [`ACCOUNTS`] accounts (one key each) so that rule state is spread as in
//! real traffic; limits are set so that nothing is ever refused (a refusal
//! would be a cheaper, different path; the bench fails if one happens).
//!
//! `redis/ping` is the baseline: one round trip on the same client, no
//! script. The p50 / p99 pass also reports, from Redis's `INFO
//! commandstats`, the time Redis itself spent in the scripts per request:
//! Redis runs scripts one at a time, so that figure bounds the admissions a
//! second one Redis can serve (the count covers every client of the server,
//! so run the bench on an otherwise idle Redis). `admit` alone is timed alone, and each reservation it makes is then
//! settled untimed, so that live reservations do not pile up beyond what
//! real traffic holds. Criterion reports mean and median per call; p50 / p99
//! come from a second pass of `ITERATIONS` calls, one at a time, each timed
//! into an HDR histogram.
//!
//! ```sh
//! cargo bench -p tollgate --bench admission
//! ITERATIONS=20000 REDIS_URL=redis://127.0.0.1:6379 cargo bench -p tollgate --bench admission
//! ```
//!
//! Keys go under a fresh `tgbench:<uuid>` prefix, deleted at the end.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a benchmark's setup fails the run by panicking"
)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use fred::prelude::{Builder, Client, ClientLike, Config, KeysInterface};
use fred::types::InfoKind;
use hdrhistogram::Histogram;
use tollgate::admission::limits::local::LocalLimits;
use tollgate::admission::limits::redis::RedisLimits;
use tollgate::admission::limits::{
    AdmitRequest, LimitStore, Periods, QuotaRule, RateKind, RateRule, Reservation, Scope,
    Settlement, Verdict,
};
use uuid::Uuid;

const ACCOUNTS: usize = 1_000;

/// Rules high enough that rotating over the accounts never reaches them,
/// low enough that every charge moves a TAT (so every rule is written).
const RULES: [RateRule; 4] = [
    RateRule {
        scope: Scope::Key,
        kind: RateKind::Requests,
        per_minute: 6_000_000,
    },
    RateRule {
        scope: Scope::Account,
        kind: RateKind::Requests,
        per_minute: 60_000_000,
    },
    RateRule {
        scope: Scope::Key,
        kind: RateKind::Tokens,
        per_minute: 600_000_000,
    },
    RateRule {
        scope: Scope::Account,
        kind: RateKind::Tokens,
        per_minute: 6_000_000_000,
    },
];

const QUOTA: QuotaRule = QuotaRule {
    included_units: Some(1_000_000_000_000),
    hard_cap: true,
    daily_cap: None,
    max_concurrent: None,
};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Traffic {
    accounts: Vec<(Uuid, Uuid)>,
    next: AtomicUsize,
    refused: AtomicU64,
}

impl Traffic {
    fn new() -> Self {
        Self {
            accounts: (0..ACCOUNTS)
                .map(|_| (Uuid::now_v7(), Uuid::now_v7()))
                .collect(),
            next: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn request(&self) -> AdmitRequest {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.accounts.len();
        let (account, key) = self.accounts[i];
        AdmitRequest {
            account,
            key,
            reservation_id: Uuid::now_v7(),
            rates: RULES.to_vec(),
            quota: QUOTA,
            estimate_tokens: 500,
            estimate_units: 500,
            min_units: 1,
            periods: Periods {
                month: "2026-11".to_owned(),
                day: "2026-11-23".to_owned(),
            },
            reservation_ttl: Duration::from_secs(300),
            dry_run: false,
        }
    }

    async fn admit(&self, store: &dyn LimitStore, request: &AdmitRequest) -> Option<Reservation> {
        match store.admit(request).await.unwrap() {
            Verdict::Admitted { reservation, .. } => Some(reservation),
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Settles below the estimate, so token rules get a correction.
    async fn settle(&self, store: &dyn LimitStore, reservation: Option<Reservation>) {
        if let Some(reservation) = reservation {
            let actual = Settlement {
                units: 300,
                tokens: 300,
                forwarded: true,
            };
            store.settle(&reservation, actual).await.unwrap();
        }
    }

    /// Time spent in `admit` (and in `settle` too when `settle_timed`) over
    /// `iterations` requests, each settled before the next.
    async fn run(
        &self,
        store: &dyn LimitStore,
        iterations: u64,
        settle_timed: bool,
        mut record: impl FnMut(Duration),
    ) {
        for _ in 0..iterations {
            let request = self.request();
            let start = Instant::now();
            let reservation = black_box(self.admit(store, &request).await);
            if settle_timed {
                self.settle(store, reservation).await;
                record(start.elapsed());
            } else {
                record(start.elapsed());
                self.settle(store, reservation).await;
            }
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let client = runtime.block_on(async {
        let client = Builder::from_config(Config::from_url(&url).unwrap())
            .build()
            .unwrap();
        client
            .init()
            .await
            .unwrap_or_else(|e| panic!("no Redis at {url} (set REDIS_URL): {e}"));
        client
    });
    let prefix = format!("tgbench:{}", Uuid::now_v7());
    let redis = RedisLimits::new(client.clone(), prefix.clone(), Duration::from_secs(5));
    let local = LocalLimits::new();
    let traffic = Traffic::new();
    let stores: [(&str, &dyn LimitStore); 2] = [("redis", &redis), ("local", &local)];

    let mut criterion = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    {
        let mut group = criterion.benchmark_group("admission");
        group.bench_function("redis/ping", |b| {
            b.iter(|| runtime.block_on(ping(&client)));
        });
        for (name, store) in stores {
            for (what, settle_timed) in [("admit", false), ("admit+settle", true)] {
                group.bench_function(format!("{name}/{what}"), |b| {
                    b.iter_custom(|iterations| {
                        let mut spent = Duration::ZERO;
                        runtime.block_on(traffic.run(store, iterations, settle_timed, |d| {
                            spent += d;
                        }));
                        spent
                    });
                });
            }
        }
        group.finish();
    }
    criterion.final_summary();

    let iterations = setting("ITERATIONS", 20_000);
    println!("\nlatency per call over {iterations} calls, one at a time (µs):");
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>14}",
        "", "p50", "p99", "max", "in scripts/req"
    );
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    runtime.block_on(async {
        for _ in 0..iterations {
            let start = Instant::now();
            ping(&client).await;
            record(&mut histogram, start.elapsed());
        }
    });
    report("redis/ping", &histogram, None);
    for (name, store) in stores {
        for (what, settle_timed) in [("admit", false), ("admit+settle", true)] {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
            let before = runtime.block_on(script_usec(&client));
            runtime.block_on(traffic.run(store, iterations, settle_timed, |d| {
                record(&mut histogram, d);
            }));
            // Settlement runs untimed for `admit` alone, so its script time
            // is not the admit's: only the pair gets the whole figure.
            let in_scripts = (name == "redis" && settle_timed).then(|| {
                let spent = runtime.block_on(script_usec(&client)) - before;
                spent / iterations as f64
            });
            report(&format!("{name}/{what}"), &histogram, in_scripts);
        }
    }

    runtime.block_on(delete_keys(&client, &prefix));
    let refused = traffic.refused.load(Ordering::Relaxed);
    assert_eq!(
        refused, 0,
        "{refused} admissions refused: the figures mix in the refusal path"
    );
}

async fn ping(client: &Client) {
    let pong: String = client.ping(None).await.unwrap();
    black_box(pong);
}

/// Histograms hold nanoseconds, 1 ns to 10 s at 3 significant digits.
fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    histogram.saturating_record(nanos.max(1));
}

fn report(name: &str, histogram: &Histogram<u64>, in_scripts: Option<f64>) {
    let us = |nanos: u64| nanos as f64 / 1_000.0;
    println!(
        "{name:<22} {:>8.1} {:>8.1} {:>8.1} {:>14}",
        us(histogram.value_at_quantile(0.50)),
        us(histogram.value_at_quantile(0.99)),
        us(histogram.max()),
        in_scripts.map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"))
    );
}

/// Microseconds Redis has spent in `EVALSHA` since its stats were reset,
/// from `cmdstat_evalsha:calls=…,usec=…,…`.
async fn script_usec(client: &Client) -> f64 {
    let info: String = client.info(Some(InfoKind::CommandStats)).await.unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:"))
        .and_then(|fields| {
            fields
                .split(',')
                .find_map(|field| field.strip_prefix("usec="))
        })
        .and_then(|usec| usec.parse().ok())
        .unwrap_or(0.0)
}

async fn delete_keys(client: &Client, prefix: &str) {
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .scan_page(cursor, format!("{prefix}:*"), Some(1000), None)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = client.unlink(keys).await.unwrap();
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    let _ = client.quit().await;
}
