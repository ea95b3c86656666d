//! Admission end to end: rate limits and their headers, quota reservations
//! under concurrency, limits shared by two instances through Redis, a Redis
//! outage and its end, and the priority queue in front of a gpu-sim with few
//! slots.

use std::sync::Arc;
use std::time::SystemTime;

use fred::prelude::{Builder, ClientLike, Config as RedisConfig};
use futures_util::future::join_all;
use tollgate::admission::limits::redis::RedisLimits;
use tollgate::admission::limits::{LimitStore, QuotaState};
use tollgate::admission::periods::{BillingPeriod, periods};
use tollgate_metering::units::UnitKind;
use uuid::Uuid;

use super::metering::scrape;
use super::*;

/// A redis-server of the test's own, which the test may kill and restart.
struct RedisServer {
    proc: Option<Proc>,
    port: u16,
}

impl RedisServer {
    async fn start() -> Self {
        let mut server = Self {
            proc: None,
            port: free_port(),
        };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        self.proc.take();
    }

    /// Starts it (again) on the same port, with nothing stored.
    async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
        let port = self.port.to_string();
        eventually("redis-server answers PING", || async {
            Command::new("redis-cli")
                .args(["-p", &port, "ping"])
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        })
        .await;
    }
}

/// A second `tollgate serve` on the same database and config (other ports).
struct Peer {
    _proc: Proc,
    url: String,
    config: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

impl Gateway {
    async fn peer(&self) -> Peer {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let port = free_port();
        let mut rewritten = String::new();
        for line in text.lines() {
            let line = match line.split_once(" = ") {
                Some(("listen", _)) => format!("listen = \"127.0.0.1:{port}\""),
                Some(("admin_listen", _)) => {
                    format!("admin_listen = \"127.0.0.1:{}\"", free_port())
                }
                Some(("metrics_listen", _)) => {
                    format!("metrics_listen = \"127.0.0.1:{}\"", free_port())
                }
                // Inside the first instance's spool directory, removed with it.
                Some(("spool_dir", dir)) => {
                    format!("spool_dir = {}/peer\"", dir.trim_end_matches('"'))
                }
                _ => line.to_owned(),
            };
            rewritten.push_str(&line);
            rewritten.push('\n');
        }
        let config = std::env::temp_dir().join(format!("{}.toml", unique("tollgate_peer")));
        std::fs::write(&config, rewritten).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("DATABASE_URL", &self.db.url)
            .env("LOG_LEVEL", "warn");
        if let Some(url) = &self.options.redis {
            command.env("REDIS_URL", url);
        }
        let peer = Peer {
            _proc: Proc(command.spawn().unwrap()),
            url: format!("http://127.0.0.1:{port}"),
            config,
        };
        let health = format!("{}/healthz", peer.url);
        eventually("the peer answers /healthz", || async {
            reqwest::get(&health).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        peer
    }

    pub(super) async fn account_id(&self, name: &str) -> Uuid {
        let (client, connection) = tokio_postgres::connect(&self.db.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .query_one("SELECT id FROM accounts WHERE name = $1", &[&name])
            .await
            .unwrap()
            .get(0)
    }

    /// The account's counters in this gateway's Redis.
    pub(super) async fn quota_state(&self, account: Uuid) -> QuotaState {
        self.quota_state_in(account, None).await
    }

    /// The same, for an account with a subscription's billing period.
    pub(super) async fn quota_state_in(
        &self,
        account: Uuid,
        billing: Option<BillingPeriod>,
    ) -> QuotaState {
        self.quota_state_of(account, billing, UnitKind::Tokens)
            .await
    }

    /// The account's counters in Redis for its quota in `kind`.
    pub(super) async fn quota_state_of(
        &self,
        account: Uuid,
        billing: Option<BillingPeriod>,
        kind: UnitKind,
    ) -> QuotaState {
        let url = self.options.redis.as_deref().unwrap();
        let client = Builder::from_config(RedisConfig::from_url(url).unwrap())
            .build()
            .unwrap();
        client.init().await.unwrap();
        let limits = RedisLimits::new(
            client.clone(),
            self.redis_prefix.clone(),
            Duration::from_secs(5),
        );
        let state = limits
            .quota_state(account, &periods(SystemTime::now(), billing).of_unit(kind))
            .await
            .unwrap();
        let _ = client.quit().await;
        state
    }

    /// Waits until the account has no request in progress: every answer so
    /// far is settled.
    async fn settled(&self, account: Uuid) {
        eventually("reservations settled", || async {
            self.quota_state(account).await.in_progress == 0
        })
        .await;
    }

    pub(super) async fn queues(&self) -> Value {
        let (status, body) = self
            .admin(
                reqwest::Method::GET,
                "/admin/queues",
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The queue depth of `tier` in the (only) pool.
    async fn depth(&self, tier: &str) -> u64 {
        let queues = self.queues().await;
        queues["data"][0]["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tier"] == tier)
            .map_or(0, |t| t["depth"].as_u64().unwrap())
    }
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

fn number(response: &reqwest::Response, name: &str) -> u64 {
    header(response, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing or not a number"))
}

pub(super) fn tiers(text: &str) -> Option<String> {
    Some(text.to_owned())
}

/// gpu-sim answering at once, with `tokens` completion tokens.
pub(super) fn instant_sim(tokens: &str) -> Sim {
    Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--output-tokens",
        tokens,
    ])
}

/// A gateway in front of `sim` with these tiers, its limits in the shared Redis.
pub(super) async fn on_shared_redis(sim: &Sim, tier_lines: &str) -> Gateway {
    Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis_url()),
            tiers: tiers(tier_lines),
            ..Options::default()
        },
    )
    .await
}

#[tokio::test]
async fn requests_per_minute_are_limited_with_openai_headers() {
    let sim = Sim::fast();
    let gateway = on_shared_redis(
        &sim,
        "[[tiers]]\nname = \"pro\"\npriority = 1\nrequests_per_minute = 3\nmonthly_price = 9.0\n",
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    for remaining in [2, 1, 0] {
        let response = gateway
            .post(&key, "/v1/chat/completions", &chat("hi", 2))
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(number(&response, "x-ratelimit-limit-requests"), 3);
        assert_eq!(
            number(&response, "x-ratelimit-remaining-requests"),
            remaining
        );
        assert!(header(&response, "x-ratelimit-reset-requests").is_some_and(|r| r.ends_with('s')));
        assert!(
            header(&response, "x-ratelimit-limit-tokens").is_none(),
            "no token limit, no token headers"
        );
    }
    let refused = gateway
        .post(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(refused.status(), 429);
    // GCRA: one request back every 20 s at 3 per minute.
    let retry_after = number(&refused, "retry-after");
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(number(&refused, "x-ratelimit-remaining-requests"), 0);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(error_code(&body), "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");

    // A refused request is recorded as rejected and billed nothing.
    eventually("four usage events", || async {
        gateway.usage_events().await.len() == 4
    })
    .await;
    let events = gateway.usage_events().await;
    let rejected: Vec<_> = events.iter().filter(|e| e.status == "rejected").collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].units, 0);
}

#[tokio::test]
async fn tokens_per_minute_charge_the_estimate_and_refund_after_the_answer() {
    let sim = instant_sim("3");
    let gateway = on_shared_redis(
        &sim,
        "[[tiers]]\nname = \"pro\"\npriority = 1\ntokens_per_minute = 100\n\
         included_units = 1000000\nhard_cap = false\nmonthly_price = 9.0\n",
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let account = gateway.account_id("acme").await;
    // The prompt "hi" is 8 tokens by OpenAI's chat recipe; max_tokens 40.
    let estimate = 8 + 40;
    let first = gateway
        .post(&key, "/v1/chat/completions", &chat("hi", 40))
        .await;
    assert_eq!(first.status(), 200);
    assert_eq!(number(&first, "x-ratelimit-limit-tokens"), 100);
    assert_eq!(
        number(&first, "x-ratelimit-remaining-tokens"),
        100 - estimate
    );
    drop(first.text().await);
    gateway.settled(account).await;
    // Settled at 8 + 3 = 11 tokens: two more estimates fit, which they
    // would not if the first still counted 48.
    for _ in 0..2 {
        let response = gateway
            .post(&key, "/v1/chat/completions", &chat("hi", 40))
            .await;
        assert_eq!(response.status(), 200);
        drop(response.text().await);
        gateway.settled(account).await;
    }
    assert_eq!(gateway.quota_state(account).await.month_used, 3 * 11);

    // More than a minute's tokens can never be served: refused at once.
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 500))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
}

#[tokio::test]
async fn a_balance_of_50_units_is_never_overspent_by_1000_concurrent_requests() {
    let sim = instant_sim("4");
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis_url()),
            // A thousand scripts at once on a busy machine can take longer
            // than the default budget; this test is about overspending, not
            // about the outage policy.
            redis_extra: "timeout = \"5s\"",
            tiers: tiers(
                "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = 50\nhard_cap = true\n",
            ),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let account = gateway.account_id("acme").await;
    let outcomes = join_all((0..1000).map(|_| {
        let gateway = &gateway;
        let key = &key;
        async move {
            let (status, body) = gateway
                .post_json(key, "/v1/chat/completions", &chat("hi", 4))
                .await;
            (status, error_code(&body).to_owned())
        }
    }))
    .await;
    let served = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let out_of_quota = outcomes
        .iter()
        .filter(|(s, code)| *s == 429 && code == "insufficient_quota")
        .count();
    assert_eq!(served + out_of_quota, 1000, "{outcomes:?}");
    // 8 prompt + 4 completion tokens a request: four fit in 50 units.
    assert_eq!(served, 4);
    gateway.settled(account).await;
    let state = gateway.quota_state(account).await;
    assert!(state.month_used <= 50, "{state:?}");
    assert_eq!(state.month_reserved, 0);
    eventually("every request recorded", || async {
        gateway.usage_events().await.len() == 1000
    })
    .await;
    let billed = gateway.units_logged().await;
    assert_eq!(billed, 48);
    assert_eq!(state.month_used, 48);
}

#[tokio::test]
async fn a_capped_request_is_shortened_to_the_balance_left() {
    let sim = instant_sim("1000");
    let gateway = on_shared_redis(
        &sim,
        "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = 30\nhard_cap = true\n",
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    // No max_tokens: the estimate (8 + 1024) is more than the 30 units
    // left, so 30 are reserved and the answer is cut to 30 - 8 = 22 tokens.
    let request = json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &request)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 22);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // The balance is spent: the next one is refused, not served past it.
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &request)
        .await;
    assert_eq!(status, 429);
    assert_eq!(error_code(&body), "insufficient_quota");
    let billed: i64 = {
        eventually("both requests recorded", || async {
            gateway.usage_events().await.len() == 2
        })
        .await;
        gateway.units_logged().await
    };
    assert_eq!(billed, 30);
}

#[tokio::test]
async fn a_tier_of_ten_token_units_caps_and_bills_in_units() {
    let sim = instant_sim("1000");
    let gateway = on_shared_redis(
        &sim,
        "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = 3\nhard_cap = true\n\
         tokens_per_unit = 10\n",
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    // Three units of ten tokens: the answer is cut to 30 - 8 = 22 tokens.
    let request = json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &request)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 22);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &request)
        .await;
    assert_eq!((status, error_code(&body)), (429, "insufficient_quota"));
    eventually("both requests recorded", || async {
        gateway.usage_events().await.len() == 2
    })
    .await;
    let billed = gateway.units_logged().await;
    assert_eq!(billed, 3);
}

#[tokio::test]
async fn a_models_unit_size_wins_over_its_tiers_and_started_units_count() {
    let sim = instant_sim("4");
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: tiers("[[tiers]]\nname = \"pro\"\npriority = 1\ntokens_per_unit = 1000\n"),
            metering: "tokens_per_unit = { \"sim-model\" = 5 }",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
        .await;
    assert_eq!(status, 200, "{body}");
    let tokens = body["usage"]["total_tokens"].as_i64().unwrap();
    eventually("the request recorded", || async {
        gateway.usage_events().await.len() == 1
    })
    .await;
    // Units of 5 tokens (not the tier's 1000), every started one billed.
    assert_eq!(gateway.usage_events().await[0].units, (tokens + 4) / 5);
}

#[tokio::test]
async fn overage_tiers_continue_past_their_included_units() {
    let sim = instant_sim("4");
    let gateway = on_shared_redis(
        &sim,
        "[[tiers]]\nname = \"pro\"\npriority = 1\nincluded_units = 20\n\
         overage_price = 0.01\nmonthly_price = 9.0\n",
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let account = gateway.account_id("acme").await;
    for _ in 0..5 {
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    gateway.settled(account).await;
    // 60 units against 20 included: 40 of overage, all in the usage log.
    assert_eq!(gateway.quota_state(account).await.month_used, 60);
}

#[tokio::test]
async fn two_instances_sharing_redis_enforce_one_combined_limit() {
    let sim = Sim::fast();
    let gateway = on_shared_redis(
        &sim,
        "[[tiers]]\nname = \"pro\"\npriority = 1\nrequests_per_minute = 4\nmonthly_price = 9.0\n",
    )
    .await;
    let peer = gateway.peer().await;
    let key = gateway.create_key("acme", &[]);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let base = if i % 2 == 0 { &gateway.url } else { &peer.url };
        let response = gateway
            .client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat("hi", 2))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    // Four in all, not four per instance.
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429, 429]);
}

#[tokio::test]
async fn redis_outage_fails_free_closed_and_paid_open_then_recovers() {
    let mut redis = RedisServer::start().await;
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis.url()),
            tiers: tiers(
                "[[tiers]]\nname = \"free\"\npriority = 0\nrequests_per_minute = 100\n\
                 [[tiers]]\nname = \"pro\"\npriority = 1\nrequests_per_minute = 3\nmonthly_price = 9.0\n",
            ),
            ..Options::default()
        },
    )
    .await;
    let free = gateway.create_key_on("free-co", "free", &[]);
    let pro = gateway.create_key_on("pro-co", "pro", &[]);
    let status = |key: String| {
        let gateway = &gateway;
        async move {
            gateway
                .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
                .await
        }
    };
    assert_eq!(status(free.clone()).await.0, 200);

    redis.kill();
    // Free fails closed: 503 with Retry-After, never a hung request.
    let response = gateway
        .post(&free, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(response.status(), 503);
    assert!(header(&response, "retry-after").is_some());
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "rate_limiter_unavailable");
    // Pro fails open, with this instance's own limits as the backstop.
    let pro_statuses = [
        status(pro.clone()).await.0,
        status(pro.clone()).await.0,
        status(pro.clone()).await.0,
        status(pro.clone()).await.0,
    ];
    assert_eq!(pro_statuses, [200, 200, 200, 429]);
    let metrics = &gateway.metrics_url;
    assert!(scrape(metrics, "tollgate_redis_errors_total").await >= 1.0);
    assert!(scrape(metrics, "tollgate_admission_redis_fallback_total").await >= 5.0);

    redis.restart().await;
    eventually("free is served again once Redis is back", || async {
        status(free.clone()).await.0 == 200
    })
    .await;
}

/// One slot, 20 tokens a second: `chat("hi", HOLD)` holds it for five
/// seconds (what comes next queues, with time to spare on a busy machine),
/// `chat("hi", 2)` for a tenth of a second.
const HOLD: u32 = 100;

pub(super) fn slow_sim() -> Sim {
    Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "20",
        "--output-tokens",
        "1000",
        "--max-concurrency",
        "1",
    ])
}

/// Sends a chat request in the background.
pub(super) fn spawn_chat(
    gateway: &Gateway,
    key: &str,
    max_tokens: u32,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let request = gateway
        .client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(key)
        .json(&chat("hi", max_tokens));
    tokio::spawn(async move { request.send().await.unwrap() })
}

const QUEUE_TIERS: &str = "[[tiers]]\nname = \"free\"\npriority = 0\n\
    [[tiers]]\nname = \"pro\"\npriority = 10\nmonthly_price = 49.0\n";

pub(super) fn one_slot(sim: &Sim) -> BackendSpec {
    BackendSpec {
        max_concurrency: Some(1),
        ..BackendSpec::new(&sim.url)
    }
}

#[tokio::test]
async fn a_pro_request_after_ten_queued_free_requests_is_served_first() {
    let sim = slow_sim();
    let gateway = Gateway::start(
        &[one_slot(&sim)],
        Options {
            tiers: tiers(QUEUE_TIERS),
            ..Options::default()
        },
    )
    .await;
    let free = gateway.create_key_on("free-co", "free", &[]);
    let pro = gateway.create_key_on("pro-co", "pro", &[]);
    let finished = Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |key: &str, name: String, max_tokens: u32| {
        let request = spawn_chat(&gateway, key, max_tokens);
        let finished = Arc::clone(&finished);
        tokio::spawn(async move {
            assert_eq!(request.await.unwrap().status(), 200);
            finished.lock().unwrap().push(name);
        })
    };
    let mut tasks = vec![send(&free, "blocker".into(), HOLD)];
    eventually("the blocker holds the slot", || async {
        gateway.queues().await["data"][0]["in_use"] == 1
    })
    .await;
    for i in 0..10 {
        tasks.push(send(&free, format!("free-{i}"), 2));
        // Queued in this order, so FIFO within the tier is observable.
        eventually("queued", || async { gateway.depth("free").await == i + 1 }).await;
    }
    tasks.push(send(&pro, "pro".into(), 2));
    eventually("the pro request queued", || async {
        gateway.depth("pro").await == 1
    })
    .await;
    for task in tasks {
        task.await.unwrap();
    }
    let order = finished.lock().unwrap().clone();
    assert_eq!(order[0], "blocker");
    assert_eq!(order[1], "pro", "{order:?}");
    let free_order: Vec<_> = order[2..].to_vec();
    let expected: Vec<_> = (0..10).map(|i| format!("free-{i}")).collect();
    assert_eq!(free_order, expected, "FIFO within a tier");
}

#[tokio::test]
async fn requests_expected_to_wait_too_long_are_shed_at_once_with_retry_after() {
    let sim = slow_sim();
    let gateway = Gateway::start(
        &[one_slot(&sim)],
        Options {
            tiers: tiers(
                "[[tiers]]\nname = \"free\"\npriority = 0\nmax_expected_wait = \"1500ms\"\n",
            ),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("free-co", "free", &[]);
    // One answer teaches the queue the service time: one second.
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 20))
        .await;
    assert_eq!(status, 200);
    let running = spawn_chat(&gateway, &key, HOLD);
    eventually("the slot is taken", || async {
        gateway.queues().await["data"][0]["in_use"] == 1
    })
    .await;
    // Expected wait 1 s: within 1.5 s, it queues.
    let queued = spawn_chat(&gateway, &key, 20);
    eventually("one request queued", || async {
        gateway.depth("free").await == 1
    })
    .await;
    // Expected wait 2 s: answered at once, not after waiting.
    let shed = gateway
        .post(&key, "/v1/chat/completions", &chat("hi", 20))
        .await;
    assert_eq!(shed.status(), 503);
    // The expected wait, two seconds and a little, in whole seconds.
    assert!((2..=4).contains(&number(&shed, "retry-after")));
    let body: Value = shed.json().await.unwrap();
    assert_eq!(error_code(&body), "server_busy");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Try again in a few minutes")
    );
    assert_eq!(running.await.unwrap().status(), 200);
    assert_eq!(queued.await.unwrap().status(), 200);
    let queues = gateway.queues().await;
    assert_eq!(queues["data"][0]["tiers"][0]["shed_busy"], 1);
}

#[tokio::test]
async fn a_queued_client_that_leaves_frees_its_place_and_its_reservation() {
    let sim = slow_sim();
    let gateway = Gateway::start(
        &[one_slot(&sim)],
        Options {
            redis: Some(redis_url()),
            tiers: tiers(
                "[[tiers]]\nname = \"free\"\npriority = 0\nmax_concurrent = 1\nincluded_units = 1000\n\
                 [[tiers]]\nname = \"pro\"\npriority = 10\nmonthly_price = 49.0\n",
            ),
            ..Options::default()
        },
    )
    .await;
    let pro = gateway.create_key_on("pro-co", "pro", &[]);
    let free = gateway.create_key_on("free-co", "free", &[]);
    let account = gateway.account_id("free-co").await;
    let blocker = spawn_chat(&gateway, &pro, HOLD);
    eventually("the blocker holds the slot", || async {
        gateway.queues().await["data"][0]["in_use"] == 1
    })
    .await;
    let leaving = spawn_chat(&gateway, &free, 2);
    eventually("the free request queued", || async {
        gateway.depth("free").await == 1
    })
    .await;
    assert_eq!(gateway.quota_state(account).await.in_progress, 1);
    leaving.abort();
    eventually("the queue forgets the client that left", || async {
        gateway.depth("free").await == 0
    })
    .await;
    eventually("its reservation is released", || async {
        let state = gateway.quota_state(account).await;
        state.in_progress == 0 && state.month_reserved == 0
    })
    .await;
    let queues = gateway.queues().await;
    assert_eq!(queues["data"][0]["tiers"][0]["abandoned"], 1);
    // With max_concurrent = 1, this succeeds only because the reservation was freed.
    let (status, body) = gateway
        .post_json(&free, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(blocker.await.unwrap().status(), 200);
    // The slot is released in `logging`, which may run just after the client
    // has read the whole answer.
    eventually("every slot is free again", || async {
        gateway.queues().await["data"][0]["in_use"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_redis_flush_does_not_grant_free_usage() {
    let sim = instant_sim("4");
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis_url()),
            tiers: tiers(
                "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = 30\nhard_cap = true\n",
            ),
            admission: "reconcile_interval = \"200ms\"",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let account = gateway.account_id("acme").await;
    // 12 units each: two fit in 30, the third does not.
    for expected in [200, 200, 429] {
        let (status, _) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
            .await;
        assert_eq!(status, expected);
    }
    eventually("the usage log holds 24 units", || async {
        gateway.units_logged().await == 24
    })
    .await;
    delete_redis_keys(&redis_url(), &gateway.redis_prefix);
    eventually("the counters are restored from the usage log", || async {
        gateway.quota_state(account).await.month_used == 24
    })
    .await;
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
        .await;
    assert_eq!(status, 429);
    assert_eq!(error_code(&body), "insufficient_quota");
}

#[tokio::test]
async fn serve_refuses_to_start_when_an_account_is_on_an_unknown_tier() {
    let sim = Sim::fast();
    let mut gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    gateway.create_key("acme", &[]);
    gateway.sigterm();
    assert!(gateway.wait_exit().success());
    // The same config without the `pro` tier the account is on.
    let text = std::fs::read_to_string(&gateway.config).unwrap();
    let without_pro = text.replace("[[tiers]]\nname = \"pro\"\npriority = 10\n", "");
    assert_ne!(text, without_pro);
    std::fs::write(&gateway.config, without_pro).unwrap();
    let output = gateway.cli(&["serve"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tiers the config does not define: pro"),
        "{stderr}"
    );
}
