//! Stripe webhook events applied to real Postgres (a database of its own per
//! test, with the project's migrations), in the orders Stripe really
//! delivers them: twice, out of order, before the customer is linked. The
//! events are whole envelopes in Stripe's wire format, read with
//! `Event::parse` as the gateway does.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use tollgate_testkit::TestDb;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tollgate_billing::webhook::{
    Applied, ApplyError, Event, PeriodChange, Plans, TierChange, apply, downgrade_past_due,
};
use uuid::Uuid;

/// 2025-05-02, when the subscriptions here start.
const T0: i64 = 1_746_144_010;
const DAY: i64 = 86_400;
/// A monthly period as Stripe bills it (May 2 → June 2).
const MONTH: i64 = 31 * DAY;
const GRACE: Duration = Duration::from_secs(3 * DAY as u64);

const PRO: &str = "tollgate_pro_monthly";
const STUDIO: &str = "tollgate_studio_monthly";
const BASIL: &str = "2025-03-31.basil";
const ACACIA: &str = "2024-06-20";

/// The rows these tests read and write, on the test kit's database (a trait:
/// a type of another crate takes no inherent methods).
trait BillingRows {
    async fn account(&self) -> Uuid;
    async fn tier(&self, account: Uuid) -> String;
    async fn customer_of(&self, account: Uuid) -> Option<String>;
    /// (status, tier, past_due_since) of a subscription.
    async fn subscription(&self, id: &str) -> (Option<String>, Option<String>, Option<SystemTime>);
    async fn events_seen(&self) -> i64;
}

impl BillingRows for TestDb {
    async fn account(&self) -> Uuid {
        let id = Uuid::now_v7();
        self.execute(
            "INSERT INTO accounts (id, name, tier) VALUES ($1, $2, 'free')",
            &[&id, &format!("acct-{id}")],
        )
        .await;
        id
    }

    async fn tier(&self, account: Uuid) -> String {
        self.query_one("SELECT tier FROM accounts WHERE id = $1", &[&account])
            .await
            .get(0)
    }

    async fn customer_of(&self, account: Uuid) -> Option<String> {
        self.pool
            .get()
            .await
            .unwrap()
            .query_opt(
                "SELECT stripe_customer_id FROM billing_customers WHERE account_id = $1",
                &[&account],
            )
            .await
            .unwrap()
            .map(|row| row.get(0))
    }

    async fn subscription(&self, id: &str) -> (Option<String>, Option<String>, Option<SystemTime>) {
        let row = self
            .query_one(
                "SELECT status, tier, past_due_since FROM billing_subscriptions
                 WHERE subscription_id = $1",
                &[&id],
            )
            .await;
        (row.get(0), row.get(1), row.get(2))
    }

    async fn events_seen(&self) -> i64 {
        self.query_one("SELECT count(*) FROM billing_webhook_events", &[])
            .await
            .get(0)
    }
}

fn plans() -> Plans {
    Plans::new("free", [(PRO, "pro"), (STUDIO, "studio")]).with_grace(GRACE)
}

fn at(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix as u64)
}

async fn deliver(db: &TestDb, event: &Event, now: i64) -> Applied {
    apply(&db.pool, event, &plans(), at(now)).await.unwrap()
}

fn tier_change(account: Uuid, from: &str, to: &str) -> Vec<TierChange> {
    vec![TierChange {
        account_id: account,
        from: from.to_owned(),
        to: to.to_owned(),
    }]
}

// Events, as Stripe sends them: the envelope around `data.object`, read by
// `Event::parse` like a real delivery. Shapes follow Stripe's API reference
// for the version named in `api_version`; fields Tollgate does not read are
// kept where they show which object this is.

fn envelope(
    id: &str,
    event_type: &str,
    created: i64,
    api_version: &str,
    object: Value,
    previous: Option<Value>,
) -> Event {
    let mut data = json!({ "object": object });
    if let Some(previous) = previous {
        data["previous_attributes"] = previous;
    }
    let body = json!({
        "id": id,
        "object": "event",
        "api_version": api_version,
        "created": created,
        "data": data,
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": event_type,
    });
    Event::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn checkout_completed(id: &str, created: i64, account: Uuid, customer: &str, sub: &str) -> Event {
    let session = json!({
        "id": format!("cs_test_{id}"),
        "object": "checkout.session",
        "amount_subtotal": 4900,
        "amount_total": 4900,
        "client_reference_id": account.to_string(),
        "created": created - 60,
        "currency": "usd",
        "customer": customer,
        "customer_details": { "email": "dev@example.com", "name": "Ada Lovelace", "tax_exempt": "none" },
        "expires_at": created + DAY,
        "invoice": format!("in_first_{sub}"),
        "livemode": false,
        "metadata": {},
        "mode": "subscription",
        "payment_status": "paid",
        "status": "complete",
        "subscription": sub,
        "success_url": "https://tollgate.example.com/billing/done?session_id={CHECKOUT_SESSION_ID}",
        "ui_mode": "hosted",
        "url": null
    });
    envelope(
        id,
        "checkout.session.completed",
        created,
        BASIL,
        session,
        None,
    )
}

/// A subscription as rendered in 2025-03-31.basil and later: the period on
/// each item.
struct Sub<'a> {
    id: &'a str,
    customer: &'a str,
    status: &'a str,
    lookup_key: &'a str,
    period_start: i64,
    metadata: Value,
}

impl<'a> Sub<'a> {
    fn new(id: &'a str, customer: &'a str, status: &'a str, lookup_key: &'a str) -> Self {
        Self {
            id,
            customer,
            status,
            lookup_key,
            period_start: T0,
            metadata: json!({}),
        }
    }

    fn object(&self) -> Value {
        let canceled = self.status == "canceled";
        json!({
            "id": self.id,
            "object": "subscription",
            "billing_cycle_anchor": T0,
            "cancel_at": null,
            "cancel_at_period_end": false,
            "canceled_at": if canceled { json!(self.period_start + 10 * DAY) } else { Value::Null },
            "collection_method": "charge_automatically",
            "created": T0,
            "currency": "usd",
            "customer": self.customer,
            "ended_at": if canceled { json!(self.period_start + 10 * DAY) } else { Value::Null },
            "items": {
                "object": "list",
                "data": [{
                    "id": format!("si_{}", self.id),
                    "object": "subscription_item",
                    "current_period_end": self.period_start + MONTH,
                    "current_period_start": self.period_start,
                    "price": {
                        "id": format!("price_{}", self.lookup_key),
                        "object": "price",
                        "active": true,
                        "currency": "usd",
                        "lookup_key": self.lookup_key,
                        "recurring": { "interval": "month", "interval_count": 1, "usage_type": "licensed" },
                        "type": "recurring",
                        "unit_amount": 4900
                    },
                    "quantity": 1,
                    "subscription": self.id
                }],
                "has_more": false,
                "url": format!("/v1/subscription_items?subscription={}", self.id)
            },
            "latest_invoice": format!("in_{}_{}", self.id, self.period_start),
            "livemode": false,
            "metadata": self.metadata,
            "start_date": T0,
            "status": self.status
        })
    }

    fn event(&self, id: &str, event_type: &str, created: i64) -> Event {
        let previous = (event_type == "customer.subscription.updated")
            .then(|| json!({ "status": "incomplete" }));
        envelope(id, event_type, created, BASIL, self.object(), previous)
    }
}

/// An invoice of a subscription as rendered in 2025-03-31.basil and later:
/// the subscription under `parent`, each line's under its own `parent`.
fn invoice(
    id: &str,
    event_type: &str,
    created: i64,
    customer: &str,
    sub: &str,
    period_start: i64,
) -> Event {
    let paid = event_type == "invoice.paid";
    let invoice_id = format!("in_{sub}_{period_start}");
    let object = json!({
        "id": invoice_id,
        "object": "invoice",
        "amount_due": 4900,
        "amount_paid": if paid { 4900 } else { 0 },
        "amount_remaining": if paid { 0 } else { 4900 },
        "attempt_count": 1,
        "attempted": true,
        "billing_reason": if period_start == T0 { "subscription_create" } else { "subscription_cycle" },
        "collection_method": "charge_automatically",
        "created": period_start,
        "currency": "usd",
        "customer": customer,
        "lines": {
            "object": "list",
            "data": [{
                "id": format!("il_{invoice_id}"),
                "object": "line_item",
                "amount": 4900,
                "currency": "usd",
                "description": "1 × Tollgate Pro (at $49.00 / month)",
                "invoice": invoice_id,
                "parent": {
                    "invoice_item_details": null,
                    "subscription_item_details": {
                        "invoice_item": null,
                        "proration": false,
                        "proration_details": { "credited_items": null },
                        "subscription": sub,
                        "subscription_item": format!("si_{sub}")
                    },
                    "type": "subscription_item_details"
                },
                "period": { "end": period_start + MONTH, "start": period_start },
                "pricing": {
                    "price_details": { "price": "price_tollgate_pro_monthly", "product": "prod_SaBcDe" },
                    "type": "price_details",
                    "unit_amount_decimal": "4900"
                },
                "quantity": 1
            }],
            "has_more": false,
            "total_count": 1,
            "url": format!("/v1/invoices/{invoice_id}/lines")
        },
        "livemode": false,
        "parent": {
            "quote_details": null,
            "subscription_details": { "metadata": {}, "subscription": sub },
            "type": "subscription_details"
        },
        // The period usage was collected in: for a renewal, the one that ended.
        "period_end": period_start,
        "period_start": if period_start == T0 { T0 } else { period_start - MONTH },
        "status": if paid { "paid" } else { "open" },
        "total": 4900
    });
    envelope(id, event_type, created, BASIL, object, None)
}

#[tokio::test]
async fn checkout_then_subscription_created_puts_the_account_on_the_paid_tier() {
    let db = TestDb::migrated().await;
    let account = db.account().await;

    let linked = deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    assert_eq!(linked, Applied::default());
    assert_eq!(db.customer_of(account).await.as_deref(), Some("cus_A"));

    let created = Sub::new("sub_A", "cus_A", "active", PRO).event(
        "evt_2",
        "customer.subscription.created",
        T0,
    );
    let applied = deliver(&db, &created, T0 + 1).await;
    assert_eq!(applied.tier_changes, tier_change(account, "free", "pro"));
    assert_eq!(
        applied.period_changes,
        vec![PeriodChange {
            account_id: account,
            subscription_id: "sub_A".to_owned(),
            start: at(T0),
            end: at(T0 + MONTH),
        }]
    );
    assert_eq!(db.tier(account).await, "pro");
    assert_eq!(
        db.subscription("sub_A").await,
        (Some("active".to_owned()), Some("pro".to_owned()), None)
    );
}

#[tokio::test]
async fn a_redelivered_event_changes_nothing() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    let sub = Sub::new("sub_A", "cus_A", "active", PRO);
    let created = sub.event("evt_2", "customer.subscription.created", T0);
    deliver(&db, &created, T0).await;
    let mut canceled = Sub::new("sub_A", "cus_A", "canceled", PRO);
    canceled.period_start = T0;
    let deleted = canceled.event("evt_3", "customer.subscription.deleted", T0 + 10 * DAY);
    let applied = deliver(&db, &deleted, T0 + 10 * DAY).await;
    assert_eq!(applied.tier_changes, tier_change(account, "pro", "free"));

    // Were `created` applied again, it could not revive the subscription,
    // but the account row would be rewritten: make that visible.
    db.execute(
        "UPDATE accounts SET tier = 'studio' WHERE id = $1",
        &[&account],
    )
    .await;
    for event in [&created, &deleted] {
        let again = deliver(&db, event, T0 + 11 * DAY).await;
        assert_eq!(
            again,
            Applied {
                duplicate: true,
                ..Applied::default()
            }
        );
    }
    assert_eq!(db.tier(account).await, "studio");
    assert_eq!(db.events_seen().await, 3);
}

#[tokio::test]
async fn the_same_event_delivered_twice_at_once_is_applied_once() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    let created = Sub::new("sub_A", "cus_A", "active", PRO).event(
        "evt_2",
        "customer.subscription.created",
        T0,
    );
    let plans = plans();
    let (a, b) = tokio::join!(
        apply(&db.pool, &created, &plans, at(T0)),
        apply(&db.pool, &created, &plans, at(T0)),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.duplicate != b.duplicate, "{a:?} {b:?}");
    let first = if a.duplicate { b } else { a };
    assert_eq!(first.tier_changes, tier_change(account, "free", "pro"));
}

/// Stripe does not order deliveries: the first payment's `updated` (a
/// second later) can arrive before `created`.
#[tokio::test]
async fn updated_before_created_ends_in_the_updated_state() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;

    let updated = Sub::new("sub_A", "cus_A", "active", STUDIO).event(
        "evt_3",
        "customer.subscription.updated",
        T0 + 1,
    );
    let applied = deliver(&db, &updated, T0 + 2).await;
    assert_eq!(applied.tier_changes, tier_change(account, "free", "studio"));

    let created = Sub::new("sub_A", "cus_A", "incomplete", PRO).event(
        "evt_2",
        "customer.subscription.created",
        T0,
    );
    let applied = deliver(&db, &created, T0 + 3).await;
    assert!(applied.tier_changes.is_empty(), "{applied:?}");
    assert_eq!(db.tier(account).await, "studio");
    assert_eq!(
        db.subscription("sub_A").await,
        (Some("active".to_owned()), Some("studio".to_owned()), None)
    );
}

/// Created `incomplete` and updated `active` in the same second, delivered
/// in reverse: `updated` wins the tie.
#[tokio::test]
async fn within_one_second_updated_wins_over_created() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    let updated = Sub::new("sub_A", "cus_A", "active", PRO).event(
        "evt_3",
        "customer.subscription.updated",
        T0,
    );
    let created = Sub::new("sub_A", "cus_A", "incomplete", PRO).event(
        "evt_2",
        "customer.subscription.created",
        T0,
    );
    deliver(&db, &updated, T0).await;
    deliver(&db, &created, T0).await;
    assert_eq!(db.tier(account).await, "pro");
}

#[tokio::test]
async fn a_stale_updated_after_deleted_stays_free() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    deliver(
        &db,
        &Sub::new("sub_A", "cus_A", "active", PRO).event(
            "evt_2",
            "customer.subscription.created",
            T0,
        ),
        T0,
    )
    .await;
    let deleted = Sub::new("sub_A", "cus_A", "canceled", PRO).event(
        "evt_4",
        "customer.subscription.deleted",
        T0 + 10 * DAY,
    );
    deliver(&db, &deleted, T0 + 10 * DAY).await;
    assert_eq!(db.tier(account).await, "free");

    // An `updated` from before the cancellation, delivered after it.
    let stale = Sub::new("sub_A", "cus_A", "active", STUDIO).event(
        "evt_3",
        "customer.subscription.updated",
        T0 + 5 * DAY,
    );
    let applied = deliver(&db, &stale, T0 + 10 * DAY + 5).await;
    assert!(
        !applied.duplicate && applied.tier_changes.is_empty(),
        "{applied:?}"
    );
    assert_eq!(db.tier(account).await, "free");
    assert_eq!(
        db.subscription("sub_A").await.0.as_deref(),
        Some("canceled")
    );
}

#[tokio::test]
async fn an_unknown_event_type_is_ignored_but_recorded() {
    let db = TestDb::migrated().await;
    let event = envelope(
        "evt_1",
        "customer.created",
        T0,
        BASIL,
        json!({ "id": "cus_A", "object": "customer", "email": "dev@example.com", "metadata": {} }),
        None,
    );
    let applied = deliver(&db, &event, T0).await;
    assert_eq!(
        applied,
        Applied {
            ignored: true,
            ..Applied::default()
        }
    );
    assert_eq!(db.events_seen().await, 1);
    assert!(deliver(&db, &event, T0).await.duplicate);
}

#[tokio::test]
async fn trial_will_end_changes_nothing() {
    let db = TestDb::migrated().await;
    let event = Sub::new("sub_A", "cus_A", "trialing", PRO).event(
        "evt_1",
        "customer.subscription.trial_will_end",
        T0,
    );
    assert_eq!(deliver(&db, &event, T0).await, Applied::default());
    assert_eq!(db.events_seen().await, 1);
}

/// A subscribed account whose renewal at T0 + MONTH fails.
async fn renewal_fails(db: &TestDb) -> Uuid {
    let account = db.account().await;
    deliver(
        db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    deliver(
        db,
        &Sub::new("sub_A", "cus_A", "active", PRO).event(
            "evt_2",
            "customer.subscription.created",
            T0,
        ),
        T0,
    )
    .await;
    let renewal = T0 + MONTH;
    let failed = invoice(
        "evt_3",
        "invoice.payment_failed",
        renewal + 5,
        "cus_A",
        "sub_A",
        renewal,
    );
    let applied = deliver(db, &failed, renewal + 60).await;
    assert!(applied.tier_changes.is_empty(), "{applied:?}");
    let mut past_due = Sub::new("sub_A", "cus_A", "past_due", PRO);
    past_due.period_start = renewal;
    let updated = past_due.event("evt_4", "customer.subscription.updated", renewal + 5);
    let applied = deliver(db, &updated, renewal + 60).await;
    assert!(applied.tier_changes.is_empty(), "{applied:?}");
    account
}

#[tokio::test]
async fn a_failed_payment_keeps_the_tier_for_the_grace_period_then_the_sweep_downgrades() {
    let db = TestDb::migrated().await;
    let account = renewal_fails(&db).await;
    let failed_at = T0 + MONTH + 5;
    assert_eq!(
        db.subscription("sub_A").await,
        (
            Some("past_due".to_owned()),
            Some("pro".to_owned()),
            Some(at(failed_at))
        )
    );
    assert_eq!(db.tier(account).await, "pro");

    let plans = plans();
    let within = downgrade_past_due(&db.pool, &plans, at(failed_at + 3 * DAY - 1))
        .await
        .unwrap();
    assert!(within.is_empty(), "{within:?}");
    assert_eq!(db.tier(account).await, "pro");

    let after = downgrade_past_due(&db.pool, &plans, at(failed_at + 3 * DAY))
        .await
        .unwrap();
    assert_eq!(after, tier_change(account, "pro", "free"));
    assert_eq!(db.tier(account).await, "free");
    let again = downgrade_past_due(&db.pool, &plans, at(failed_at + 4 * DAY))
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test]
async fn invoice_paid_clears_past_due_and_starts_the_new_period() {
    let db = TestDb::migrated().await;
    let account = renewal_fails(&db).await;
    let renewal = T0 + MONTH;
    // Stripe's retry succeeds a day later.
    let paid = invoice(
        "evt_5",
        "invoice.paid",
        renewal + DAY,
        "cus_A",
        "sub_A",
        renewal,
    );
    let applied = deliver(&db, &paid, renewal + DAY + 1).await;
    assert!(applied.tier_changes.is_empty(), "{applied:?}");
    assert_eq!(db.subscription("sub_A").await.2, None);
    // The period advanced already with the `past_due` update (it carries the
    // new period): reported once, not again.
    assert!(applied.period_changes.is_empty(), "{applied:?}");
    let row = db
        .query_one(
            "SELECT current_period_start, current_period_end FROM billing_subscriptions",
            &[],
        )
        .await;
    assert_eq!(
        (row.get::<_, SystemTime>(0), row.get::<_, SystemTime>(1)),
        (at(renewal), at(renewal + MONTH))
    );
    let swept = downgrade_past_due(&db.pool, &plans(), at(renewal + 10 * DAY))
        .await
        .unwrap();
    assert!(swept.is_empty(), "{swept:?}");
    assert_eq!(db.tier(account).await, "pro");
}

#[tokio::test]
async fn paying_after_the_downgrade_restores_the_tier() {
    let db = TestDb::migrated().await;
    let account = renewal_fails(&db).await;
    let renewal = T0 + MONTH;
    downgrade_past_due(&db.pool, &plans(), at(renewal + 4 * DAY))
        .await
        .unwrap();
    assert_eq!(db.tier(account).await, "free");
    let paid = invoice(
        "evt_5",
        "invoice.paid",
        renewal + 5 * DAY,
        "cus_A",
        "sub_A",
        renewal,
    );
    let applied = deliver(&db, &paid, renewal + 5 * DAY).await;
    assert_eq!(applied.tier_changes, tier_change(account, "free", "pro"));
    // The `active` update, a second earlier, delivered after: changes nothing.
    let mut active = Sub::new("sub_A", "cus_A", "active", PRO);
    active.period_start = renewal;
    let updated = active.event(
        "evt_6",
        "customer.subscription.updated",
        renewal + 5 * DAY - 1,
    );
    let applied = deliver(&db, &updated, renewal + 5 * DAY + 1).await;
    assert!(applied.tier_changes.is_empty(), "{applied:?}");
    assert_eq!(db.tier(account).await, "pro");
}

/// A renewal paid on time, with the invoice arriving before the
/// subscription's `updated` that moves its period.
#[tokio::test]
async fn a_renewal_reports_the_new_period_once() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    deliver(
        &db,
        &Sub::new("sub_A", "cus_A", "active", PRO).event(
            "evt_2",
            "customer.subscription.created",
            T0,
        ),
        T0,
    )
    .await;
    let renewal = T0 + MONTH;
    let paid = invoice(
        "evt_3",
        "invoice.paid",
        renewal + 3,
        "cus_A",
        "sub_A",
        renewal,
    );
    let applied = deliver(&db, &paid, renewal + 4).await;
    assert_eq!(
        applied.period_changes,
        vec![PeriodChange {
            account_id: account,
            subscription_id: "sub_A".to_owned(),
            start: at(renewal),
            end: at(renewal + MONTH),
        }]
    );
    let mut renewed = Sub::new("sub_A", "cus_A", "active", PRO);
    renewed.period_start = renewal;
    let updated = renewed.event("evt_4", "customer.subscription.updated", renewal);
    let applied = deliver(&db, &updated, renewal + 5).await;
    assert!(applied.period_changes.is_empty(), "{applied:?}");
    assert_eq!(db.tier(account).await, "pro");
}

/// Stripe sends `checkout.session.completed` after the subscription's own
/// events, so they often find no linked customer: a retryable error, the
/// event not recorded, and Stripe's redelivery after the checkout applies.
#[tokio::test]
async fn a_subscription_of_an_unlinked_customer_is_retried_until_checkout_links_it() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    let created = Sub::new("sub_A", "cus_A", "active", PRO).event(
        "evt_2",
        "customer.subscription.created",
        T0,
    );
    let error = apply(&db.pool, &created, &plans(), at(T0))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ApplyError::UnknownCustomer { customer, subscription }
            if customer == "cus_A" && subscription == "sub_A"),
        "{error}"
    );
    assert!(error.is_retryable());
    assert_eq!(db.events_seen().await, 0);
    // So is an invoice of it.
    let paid = invoice("evt_3", "invoice.paid", T0 + 1, "cus_A", "sub_A", T0);
    let error = apply(&db.pool, &paid, &plans(), at(T0)).await.unwrap_err();
    assert!(error.is_retryable(), "{error}");

    deliver(
        &db,
        &checkout_completed("evt_1", T0 + 2, account, "cus_A", "sub_A"),
        T0 + 2,
    )
    .await;
    let applied = deliver(&db, &created, T0 + 60).await;
    assert_eq!(applied.tier_changes, tier_change(account, "free", "pro"));
    assert!(!deliver(&db, &paid, T0 + 60).await.duplicate);
}

/// Subscriptions Tollgate creates carry the account in their metadata: no
/// wait for the checkout event.
#[tokio::test]
async fn metadata_account_id_needs_no_linked_customer() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    let mut sub = Sub::new("sub_A", "cus_A", "active", PRO);
    sub.metadata = json!({ "account_id": account.to_string() });
    let applied = deliver(
        &db,
        &sub.event("evt_2", "customer.subscription.created", T0),
        T0,
    )
    .await;
    assert_eq!(applied.tier_changes, tier_change(account, "free", "pro"));

    // Naming an account that does not exist is refused for good.
    let mut stray = Sub::new("sub_B", "cus_B", "active", PRO);
    let missing = Uuid::now_v7();
    stray.metadata = json!({ "account_id": missing.to_string() });
    let error = apply(
        &db.pool,
        &stray.event("evt_3", "customer.subscription.created", T0),
        &plans(),
        at(T0),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, ApplyError::UnknownAccount { account_id } if account_id == missing),
        "{error}"
    );
    assert!(!error.is_retryable());
}

/// The first invoice is often delivered before `customer.subscription.created`.
#[tokio::test]
async fn invoice_paid_before_the_subscription_is_known() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    let paid = invoice("evt_3", "invoice.paid", T0 + 1, "cus_A", "sub_A", T0);
    let applied = deliver(&db, &paid, T0 + 2).await;
    assert!(applied.tier_changes.is_empty(), "{applied:?}");
    assert_eq!(applied.period_changes.len(), 1, "{applied:?}");
    assert_eq!(db.tier(account).await, "free");

    let created = Sub::new("sub_A", "cus_A", "active", PRO).event(
        "evt_2",
        "customer.subscription.created",
        T0,
    );
    let applied = deliver(&db, &created, T0 + 3).await;
    assert_eq!(applied.tier_changes, tier_change(account, "free", "pro"));
    assert!(applied.period_changes.is_empty(), "{applied:?}");
}

/// Endpoints pinned to an API version before 2025-03-31.basil get the
/// period on the subscription and the subscription on the invoice.
#[tokio::test]
async fn older_api_versions_are_read_too() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    let subscription = json!({
        "id": "sub_A",
        "object": "subscription",
        "cancel_at_period_end": false,
        "created": T0,
        "current_period_end": T0 + MONTH,
        "current_period_start": T0,
        "customer": "cus_A",
        "items": { "object": "list", "data": [{
            "id": "si_A", "object": "subscription_item",
            "plan": { "id": "price_pro", "object": "plan", "interval": "month" },
            "price": { "id": "price_pro", "object": "price", "lookup_key": PRO },
            "quantity": 1, "subscription": "sub_A"
        }], "has_more": false },
        "metadata": {},
        "plan": { "id": "price_pro", "object": "plan", "interval": "month" },
        "status": "active"
    });
    let created = envelope(
        "evt_2",
        "customer.subscription.created",
        T0,
        ACACIA,
        subscription,
        None,
    );
    let applied = deliver(&db, &created, T0).await;
    assert_eq!(applied.tier_changes, tier_change(account, "free", "pro"));
    assert_eq!(applied.period_changes[0].end, at(T0 + MONTH));

    let renewal = T0 + MONTH;
    let invoice = json!({
        "id": "in_renewal",
        "object": "invoice",
        "billing_reason": "subscription_cycle",
        "customer": "cus_A",
        "lines": { "object": "list", "data": [{
            "id": "il_1", "object": "line_item", "type": "subscription",
            "period": { "start": renewal, "end": renewal + MONTH },
            "price": { "id": "price_pro", "object": "price", "lookup_key": PRO },
            "proration": false, "subscription": "sub_A", "subscription_item": "si_A"
        }], "has_more": false },
        "period_end": renewal,
        "period_start": T0,
        "status": "paid",
        "subscription": "sub_A",
        "subscription_details": { "metadata": {} }
    });
    let paid = envelope("evt_3", "invoice.paid", renewal + 2, ACACIA, invoice, None);
    let applied = deliver(&db, &paid, renewal + 3).await;
    assert_eq!(
        applied.period_changes,
        vec![PeriodChange {
            account_id: account,
            subscription_id: "sub_A".to_owned(),
            start: at(renewal),
            end: at(renewal + MONTH),
        }]
    );
}

#[tokio::test]
async fn checkout_links_keeps_or_replaces_the_customer() {
    let db = TestDb::migrated().await;
    let account = db.account().await;
    let other = db.account().await;
    deliver(
        &db,
        &checkout_completed("evt_1", T0, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    deliver(
        &db,
        &checkout_completed("evt_2", T0 + 1, account, "cus_A", "sub_A"),
        T0,
    )
    .await;
    assert_eq!(db.customer_of(account).await.as_deref(), Some("cus_A"));
    // A second checkout under a new customer: it pays from now on.
    deliver(
        &db,
        &checkout_completed("evt_3", T0 + 2, account, "cus_B", "sub_B"),
        T0,
    )
    .await;
    assert_eq!(db.customer_of(account).await.as_deref(), Some("cus_B"));

    // A customer that pays for one account is not taken over by another.
    let error = apply(
        &db.pool,
        &checkout_completed("evt_4", T0 + 3, other, "cus_B", "sub_C"),
        &plans(),
        at(T0),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, ApplyError::CustomerOfAnotherAccount { .. }),
        "{error}"
    );
    assert!(!error.is_retryable());
    assert_eq!(db.customer_of(other).await, None);

    // A session for an account that does not exist.
    let error = apply(
        &db.pool,
        &checkout_completed("evt_5", T0 + 4, Uuid::now_v7(), "cus_C", "sub_C"),
        &plans(),
        at(T0),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, ApplyError::UnknownAccount { .. }),
        "{error}"
    );
    assert_eq!(db.events_seen().await, 3);
}
