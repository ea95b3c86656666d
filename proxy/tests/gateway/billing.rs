//! Stripe billing end to end: a signed webhook sequence moves an account to
//! its paid tier, and the new limits are live at once.

use std::time::{SystemTime, UNIX_EPOCH};

use tollgate_billing::webhook::sign;

use super::admission::instant_sim;
use super::*;
use tollgate_testkit::stripe::FakeStripe;

const WEBHOOK_SECRET: &str = "whsec_gateway_test";

const PAID_TIERS: &str = "[[tiers]]\nname = \"free\"\npriority = 0\nrequests_per_minute = 1\n\
    [[tiers]]\nname = \"pro\"\npriority = 10\nmonthly_price = 49.0\n\
    stripe_price_lookup_key = \"tollgate_pro_monthly\"\n";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn event(id: &str, event_type: &str, object: Value) -> String {
    event_at(id, event_type, object, now())
}

/// An event created at `created` (unix seconds).
fn event_at(id: &str, event_type: &str, object: Value, created: i64) -> String {
    json!({
        "id": id, "object": "event", "type": event_type, "created": created,
        "livemode": false, "api_version": "2025-03-31.basil", "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "data": {"object": object},
    })
    .to_string()
}

/// An active subscription `id` of `customer` to the price with `lookup_key`,
/// created at the start of its current `period` (unix seconds); `account`
/// goes into its metadata, as Checkout puts it there.
fn subscription(
    id: &str,
    customer: &str,
    account: Option<&str>,
    lookup_key: &str,
    (start, end): (i64, i64),
) -> Value {
    let metadata = match account {
        Some(account) => json!({"account_id": account}),
        None => json!({}),
    };
    json!({
        "id": id, "object": "subscription", "customer": customer,
        "status": "active", "created": start, "cancel_at_period_end": false,
        "metadata": metadata, "livemode": false,
        "items": {"object": "list", "data": [{
            "id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
            "current_period_start": start, "current_period_end": end,
            "price": {"id": format!("price_{lookup_key}"), "object": "price",
                      "lookup_key": lookup_key,
                      "recurring": {"interval": "month", "usage_type": "licensed"}},
        }]},
    })
}

impl Gateway {
    async fn deliver(&self, body: &str, signature: &str) -> u16 {
        self.client
            .post(format!("{}/stripe/webhook", self.url))
            .header("stripe-signature", signature)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

#[tokio::test]
async fn a_paid_subscription_by_webhook_lifts_the_free_limits_at_once() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(PAID_TIERS.to_owned()),
            env: vec![
                ("STRIPE_SECRET_KEY", "sk_test_gateway".to_owned()),
                (
                    "STRIPE_WEBHOOK_SECRET",
                    format!("whsec_old,{WEBHOOK_SECRET}"),
                ),
            ],
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let account = gateway.account_id("acme").await.to_string();
    let request = chat("hi", 1);
    let ask = || gateway.post_json(&key, "/v1/chat/completions", &request);
    assert_eq!(ask().await.0, 200);
    assert_eq!(ask().await.0, 429, "free: one request a minute");

    let checkout = event(
        "evt_checkout",
        "checkout.session.completed",
        json!({
            "id": "cs_test_1", "object": "checkout.session", "mode": "subscription",
            "client_reference_id": account, "customer": "cus_acme",
            "subscription": "sub_acme", "status": "complete", "payment_status": "paid",
            "metadata": {}, "livemode": false, "created": now(),
        }),
    );
    let subscription = event(
        "evt_sub_created",
        "customer.subscription.created",
        subscription(
            "sub_acme",
            "cus_acme",
            None,
            "tollgate_pro_monthly",
            (now(), now() + 30 * 86_400),
        ),
    );

    // Refused without a valid signature, and nothing changes.
    assert_eq!(gateway.deliver(&checkout, "t=1,v1=00").await, 400);
    let forged = sign("whsec_someone_else", checkout.as_bytes(), now() as u64);
    assert_eq!(gateway.deliver(&checkout, &forged).await, 400);
    let stale = sign(WEBHOOK_SECRET, checkout.as_bytes(), (now() - 600) as u64);
    assert_eq!(gateway.deliver(&checkout, &stale).await, 400);
    assert_eq!(ask().await.0, 429);

    for body in [&checkout, &subscription] {
        let signature = sign(WEBHOOK_SECRET, body.as_bytes(), now() as u64);
        assert_eq!(gateway.deliver(body, &signature).await, 200);
    }
    // A redelivery is acknowledged and changes nothing.
    let again = sign(WEBHOOK_SECRET, subscription.as_bytes(), now() as u64);
    assert_eq!(gateway.deliver(&subscription, &again).await, 200);

    // Pro's limits apply to the very next request: no cache to wait out.
    for _ in 0..3 {
        let (status, body) = ask().await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, accounts) = gateway
        .admin(
            reqwest::Method::GET,
            "/admin/accounts",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert!(accounts.to_string().contains("\"pro\""), "{accounts}");
}

/// A grace of 8.64 s (0.0001 days).
const SHORT_GRACE: &str = "8s 640ms";

/// `serve`'s environment with billing on (a Stripe that is never called)
/// and webhooks verified with [`WEBHOOK_SECRET`].
fn stripe_env() -> Vec<(&'static str, String)> {
    vec![
        ("STRIPE_SECRET_KEY", "sk_test_gateway".to_owned()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
    ]
}

/// Free (a request a minute) and a hard-capped `starter` of `included_units`.
fn starter_tiers(included_units: u64) -> String {
    format!(
        "[[tiers]]\nname = \"free\"\npriority = 0\nrequests_per_minute = 1\n\
         [[tiers]]\nname = \"starter\"\npriority = 10\nmonthly_price = 9.0\n\
         included_units = {included_units}\nhard_cap = true\n\
         stripe_price_lookup_key = \"tollgate_starter_monthly\"\n"
    )
}

fn paid_tiers_with_overage() -> String {
    "[[tiers]]\nname = \"free\"\npriority = 0\nrequests_per_minute = 1\n\
     [[tiers]]\nname = \"pro\"\npriority = 10\nmonthly_price = 49.0\nincluded_units = 100000\n\
     overage_price = 0.00002\nhard_cap = false\n\
     stripe_price_lookup_key = \"tollgate_pro_monthly\"\n\
     stripe_overage_lookup_key = \"tollgate_pro_overage\"\n"
        .to_owned()
}

impl Gateway {
    /// `tollgate billing ARGS` against the fake, off the test's runtime
    /// thread: the fake answers on it.
    async fn billing_cli(&self, fake: &FakeStripe, args: &[&str]) -> String {
        let mut command = self.cli(args);
        command
            .env("STRIPE_SECRET_KEY", fake.secret_key())
            .env("STRIPE_API_BASE", fake.base_url());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    async fn admin_portal(&self, account: &str) -> (u16, Value) {
        let path = format!("/admin/accounts/{account}/billing/portal");
        self.admin(reqwest::Method::POST, &path, None, Some(ADMIN_TOKEN))
            .await
    }

    async fn deliver_signed(&self, body: &str) -> u16 {
        let signature = sign(WEBHOOK_SECRET, body.as_bytes(), now() as u64);
        self.deliver(body, &signature).await
    }

    async fn tier_of(&self, account: &str) -> String {
        self.db_client()
            .await
            .query_one("SELECT tier FROM accounts WHERE name = $1", &[&account])
            .await
            .unwrap()
            .get(0)
    }
}

/// An invoice of `subscription` in the API version the events above use
/// (its subscription under `parent`).
fn invoice(id: &str, subscription: &Value, status: &str) -> Value {
    json!({
        "id": id, "object": "invoice", "customer": subscription["customer"],
        "status": status, "livemode": false, "created": now(),
        "parent": {"type": "subscription_details", "subscription_details": {
            "subscription": subscription["id"], "metadata": subscription["metadata"],
        }},
        "lines": {"object": "list", "data": []},
    })
}

#[tokio::test]
async fn checkout_to_paid_tier_and_unpaid_invoice_downgrades_after_the_grace() {
    let fake = FakeStripe::start().await.unwrap();
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(paid_tiers_with_overage()),
            env: vec![
                ("STRIPE_SECRET_KEY", fake.secret_key().to_owned()),
                ("STRIPE_API_BASE", fake.base_url().to_owned()),
                ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
            ],
            tail: format!(
                "[billing]\ngrace = \"{SHORT_GRACE}\"\n\
                 success_url = \"https://example.test/welcome\"\n\
                 cancel_url = \"https://example.test/pricing\"\n"
            ),
            ..Options::default()
        },
    )
    .await;
    let first = gateway
        .billing_cli(&fake, &["billing", "sync-catalog"])
        .await;
    assert!(first.contains("created"), "{first}");
    let second = gateway
        .billing_cli(&fake, &["billing", "sync-catalog"])
        .await;
    assert!(
        !second.contains("created") && !second.contains("updated"),
        "{second}"
    );

    let key = gateway.create_key_on("acme", "free", &[]);
    let request = chat("hi", 1);
    let ask = || gateway.post_json(&key, "/v1/chat/completions", &request);
    assert_eq!(ask().await.0, 200);
    assert_eq!(ask().await.0, 429, "free: one request a minute");

    // No customer yet: nothing to manage.
    let (status, body) = gateway
        .post_json(&key, "/v1/billing/portal", &json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = gateway
        .post_json(&key, "/v1/billing/checkout", &json!({"tier": "free"}))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("tier")),
        "{body}"
    );
    // Stripe down: 503, and nothing of Stripe's error text (keys, request
    // logs) reaches the caller.
    fake.set_reachable(false);
    let (status, body) = gateway
        .post_json(&key, "/v1/billing/checkout", &json!({"tier": "pro"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (503, "billing_unavailable"),
        "{body}"
    );
    assert!(!body.to_string().contains("sk_"), "{body}");
    fake.set_reachable(true);

    // Two tabs: only the newer link can be paid.
    let pro = json!({"tier": "pro"});
    let checkout = || gateway.post_json(&key, "/v1/billing/checkout", &pro);
    let (status, abandoned) = checkout().await;
    assert_eq!(status, 200, "{abandoned}");
    let (status, session) = checkout().await;
    assert_eq!(status, 200, "{session}");
    assert!(
        session["url"]
            .as_str()
            .unwrap()
            .starts_with("https://checkout.stripe.com/")
    );
    assert!(
        fake.complete_checkout(abandoned["id"].as_str().unwrap())
            .is_err(),
        "the older session was expired"
    );

    // The redirect changes nothing: only Stripe's webhooks do.
    let completed = fake
        .complete_checkout(session["id"].as_str().unwrap())
        .unwrap();
    assert_eq!(gateway.tier_of("acme").await, "free");
    // Stripe has the subscription before any webhook arrives: no second one.
    let (status, body) = checkout().await;
    assert_eq!(status, 409, "{body}");
    let subscription: Value = gateway
        .client
        .get(format!(
            "{}/v1/subscriptions/{}",
            fake.base_url(),
            completed["subscription"].as_str().unwrap()
        ))
        .bearer_auth(fake.secret_key())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Stripe's usual order: the subscription, its first invoice, the checkout
    // (a minute ago, so that the failure below is the newer payment signal).
    let paid_at = now() - 60;
    let deliveries = [
        event_at(
            "evt_e2e_sub",
            "customer.subscription.created",
            subscription.clone(),
            paid_at,
        ),
        event_at(
            "evt_e2e_paid",
            "invoice.paid",
            invoice("in_1", &subscription, "paid"),
            paid_at,
        ),
        event_at(
            "evt_e2e_checkout",
            "checkout.session.completed",
            completed,
            paid_at,
        ),
    ];
    for body in &deliveries {
        assert_eq!(gateway.deliver_signed(body).await, 200, "{body}");
    }
    assert_eq!(gateway.tier_of("acme").await, "pro");
    for _ in 0..3 {
        let (status, body) = ask().await;
        assert_eq!(status, 200, "pro's limits are live: {body}");
    }
    // Subscribed: the portal is the way to change plans.
    let (status, portal) = gateway
        .post_json(&key, "/v1/billing/portal", &json!({}))
        .await;
    assert_eq!(status, 200, "{portal}");
    assert!(
        portal["url"]
            .as_str()
            .unwrap()
            .starts_with("https://billing.stripe.com/")
    );
    // The same for any account on the admin API, by (percent-encoded) name.
    let (status, body) = gateway.admin_portal("acme").await;
    assert_eq!(status, 200, "{body}");
    gateway.create_key_on("acme corp", "free", &[]);
    let (status, body) = gateway.admin_portal("acme%20corp").await;
    assert_eq!(status, 409, "found, with no customer yet: {body}");
    assert_eq!(gateway.admin_portal("nobody").await.0, 404);

    // Exported (today's buckets are still open, unless an hour closed while
    // the test ran) and reconciled: the log, the exports and the fake agree.
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let day = tollgate_billing::reconcile::Day::from_days_since_epoch(today as i64).to_string();
    gateway.billing_cli(&fake, &["billing", "export"]).await;
    let report = gateway
        .billing_cli(
            &fake,
            &["billing", "reconcile", "--from", &day, "--to", &day],
        )
        .await;
    assert!(report.contains("no differences"), "{report}");

    // The renewal fails: pro is kept through the grace, then the sweep
    // moves the account to the free tier, with no further event.
    let failed = event(
        "evt_e2e_failed",
        "invoice.payment_failed",
        invoice("in_2", &subscription, "open"),
    );
    assert_eq!(gateway.deliver_signed(&failed).await, 200);
    assert_eq!(gateway.tier_of("acme").await, "pro", "within the grace");
    eventually("the past-due sweep downgrades acme", || async {
        gateway.tier_of("acme").await == "free"
    })
    .await;
    eventually("free's limit is live again", || async {
        ask().await.0 == 429
    })
    .await;
}

#[tokio::test]
async fn a_renewed_billing_period_starts_its_quota_afresh() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(starter_tiers(40)),
            env: stripe_env(),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let account = gateway.account_id("acme").await.to_string();
    let day = 86_400;
    // Subscribed 29 days ago: the period ends tomorrow.
    let subscription = subscription(
        "sub_starter",
        "cus_starter",
        Some(&account),
        "tollgate_starter_monthly",
        (now() - 29 * day, now() + day),
    );
    let created = event(
        "evt_starter_created",
        "customer.subscription.created",
        subscription,
    );
    assert_eq!(gateway.deliver_signed(&created).await, 200);

    let request = chat("hi", 4);
    let ask = || gateway.post_json(&key, "/v1/chat/completions", &request);
    let mut answered = 0;
    let refusal = loop {
        let (status, body) = ask().await;
        if status != 200 {
            break body;
        }
        answered += 1;
        assert!(answered < 40, "the 40 included units never ran out");
    };
    assert_eq!(error_code(&refusal), "insufficient_quota", "{refusal}");

    // Renewed (early: a new billing anchor): the paid invoice carries the
    // new period, and the quota counts from its start.
    let renewed = json!({
        "id": "in_renewal", "object": "invoice", "customer": "cus_starter",
        "status": "paid", "livemode": false, "created": now(),
        "parent": {"type": "subscription_details", "subscription_details": {
            "subscription": "sub_starter", "metadata": {"account_id": account},
        }},
        "lines": {"object": "list", "data": [{
            "id": "il_1", "object": "line_item",
            "period": {"start": now(), "end": now() + 30 * day},
            "parent": {"type": "subscription_item_details",
                       "subscription_item_details": {"subscription": "sub_starter"}},
        }]},
    });
    let paid = event("evt_starter_paid", "invoice.paid", renewed);
    assert_eq!(gateway.deliver_signed(&paid).await, 200);
    let (status, body) = ask().await;
    assert_eq!(status, 200, "a new period, a new quota: {body}");
}

#[tokio::test]
async fn a_redis_flush_restores_a_billing_periods_counter_from_the_usage_log() {
    let sim = instant_sim("4");
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis_url()),
            tiers: Some(starter_tiers(30)),
            admission: "reconcile_interval = \"200ms\"",
            env: stripe_env(),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let account = gateway.account_id("acme").await;
    let (start, end) = (now() - 120, now() + 30 * 86_400);
    let subscription = subscription(
        "sub_flush",
        "cus_flush",
        Some(&account.to_string()),
        "tollgate_starter_monthly",
        (start, end),
    );
    let created = event(
        "evt_flush_created",
        "customer.subscription.created",
        subscription,
    );
    assert_eq!(gateway.deliver_signed(&created).await, 200);
    // 12 units a request: two fit in the period's 30, the third does not.
    for expected in [200, 200, 429] {
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
            .await;
        assert_eq!(status, expected, "{body}");
    }
    eventually("the usage log holds the 24 units", || async {
        gateway.units_logged().await == 24
    })
    .await;
    let period = Some(tollgate::admission::periods::BillingPeriod {
        start: UNIX_EPOCH + std::time::Duration::from_secs(start as u64),
        end: UNIX_EPOCH + std::time::Duration::from_secs(end as u64),
    });
    delete_redis_keys(&redis_url(), &gateway.redis_prefix);
    // Restored under the period's name, which only the subscription gives.
    eventually(
        "the period's counter is restored from the usage log",
        || async { gateway.quota_state_in(account, period).await.month_used == 24 },
    )
    .await;
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (429, "insufficient_quota"),
        "{body}"
    );
}

/// A second `tollgate serve` on this gateway's database and Redis, on ports
/// of its own: another instance of the same deployment.
struct Instance {
    _proc: Proc,
    url: String,
}

impl Gateway {
    async fn another_instance(&self) -> Instance {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let mut ours = config.clone();
        for listener in ["listen", "admin_listen", "metrics_listen"] {
            let line = config
                .lines()
                .find(|l| l.starts_with(&format!("{listener} = ")))
                .unwrap();
            ours = ours.replace(line, &format!("{listener} = \"127.0.0.1:{}\"", free_port()));
        }
        // One process per spool directory.
        let spool_dir = std::env::temp_dir().join(unique("tollgate_spool_b"));
        ours = ours.replace(
            &format!("spool_dir = \"{}\"", self.spool_dir.display()),
            &format!("spool_dir = \"{}\"", spool_dir.display()),
        );
        let path = std::env::temp_dir().join(format!("{}.toml", unique("tollgate_b")));
        std::fs::write(&path, &ours).unwrap();
        let url = format!(
            "http://{}",
            ours.lines()
                .find(|l| l.starts_with("listen = "))
                .unwrap()
                .trim_start_matches("listen = ")
                .trim_matches('"')
        );
        let mut serve = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        serve
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .env("DATABASE_URL", &self.db.url)
            .env("LOG_LEVEL", "warn");
        if let Some(redis) = &self.options.redis {
            serve.env("REDIS_URL", redis);
        }
        for (name, value) in &self.options.env {
            serve.env(name, value);
        }
        let instance = Instance {
            _proc: Proc(serve.spawn().unwrap()),
            url,
        };
        let client = &self.client;
        let readyz = format!("{}/readyz", instance.url);
        eventually("the second instance listens for fan-out", || async {
            match client.get(&readyz).send().await {
                Ok(answer) => answer
                    .json::<Value>()
                    .await
                    .is_ok_and(|r| r["revocation_fanout"] == "subscribed"),
                Err(_) => false,
            }
        })
        .await;
        instance
    }
}

#[tokio::test]
async fn a_tier_change_reaches_every_instance_through_redis() {
    let sim = Sim::fast();
    // A ten-minute key cache: only the Redis fan-out can make the change land.
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis_url()),
            keys: "cache_ttl = \"10m\"",
            tiers: Some(PAID_TIERS.to_owned()),
            env: stripe_env(),
            ..Options::default()
        },
    )
    .await;
    let other = gateway.another_instance().await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let account = gateway.account_id("acme").await.to_string();
    let request = chat("hi", 1);
    let ask_other = || async {
        gateway
            .client
            .post(format!("{}/v1/chat/completions", other.url))
            .bearer_auth(&key)
            .json(&request)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ask_other().await, 200);
    assert_eq!(ask_other().await, 429, "free, cached on the other instance");

    // Stripe reaches this instance only.
    let created = event(
        "evt_fanout_created",
        "customer.subscription.created",
        subscription(
            "sub_fanout",
            "cus_fanout",
            Some(&account),
            "tollgate_pro_monthly",
            (now(), now() + 30 * 86_400),
        ),
    );
    assert_eq!(gateway.deliver_signed(&created).await, 200);
    eventually("the other instance serves acme as pro", || async {
        ask_other().await == 200
    })
    .await;
}
