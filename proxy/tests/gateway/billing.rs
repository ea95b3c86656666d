//! Stripe billing end to end: a signed webhook sequence moves an account to
//! its paid tier, and the new limits are live at once.

use std::time::{SystemTime, UNIX_EPOCH};

use tollgate_billing::webhook::sign;

use super::*;

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
    json!({
        "id": id, "object": "event", "type": event_type, "created": now(),
        "livemode": false, "api_version": "2025-03-31.basil", "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "data": {"object": object},
    })
    .to_string()
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
        json!({
            "id": "sub_acme", "object": "subscription", "customer": "cus_acme",
            "status": "active", "created": now(), "cancel_at_period_end": false,
            "metadata": {}, "livemode": false,
            "items": {"object": "list", "data": [{
                "id": "si_1", "object": "subscription_item", "quantity": 1,
                "current_period_start": now(), "current_period_end": now() + 30 * 86_400,
                "price": {"id": "price_pro", "object": "price", "lookup_key": "tollgate_pro_monthly",
                          "recurring": {"interval": "month", "usage_type": "licensed"}},
            }]},
        }),
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
