//! Stripe's webhook deliveries: proving they came from Stripe, then reading
//! the event envelope.
//!
//! A delivery is handled in two steps, in this order:
//!
//! 1. [`WebhookSecrets::verify`] checks the `Stripe-Signature` header against
//!    the raw body (`signature.rs`). It must see the bytes as received: JSON
//!    parsed and written out again would not match the signature.
//! 2. [`VerifiedPayload::event`] (or [`Event::parse`]) reads the envelope
//!    common to every event type; what is inside `data.object` depends on
//!    the type and is left as JSON for the handler of that type.
//!
//! Either step's error is meant to be answered with 400 and its message,
//! changing nothing: Stripe shows the message on the delivery and retries.
//! [`sign`] makes valid headers for tests and tools.

pub mod apply;
mod signature;

use serde::Deserialize;

pub use apply::{
    ACCOUNT_METADATA_KEY, Applied, ApplyError, DEFAULT_GRACE, HANDLED_EVENT_TYPES, PeriodChange,
    Plans, TierChange, apply, downgrade_past_due,
};
pub use signature::{
    DEFAULT_TOLERANCE, SIGNATURE_HEADER, SecretsError, SignatureError, VerifiedPayload,
    WebhookSecrets, sign,
};

/// The envelope of a Stripe event (a "snapshot" event, `"object": "event"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `evt_…`; Stripe may deliver the same event more than once, so this is
    /// the key to handle it once.
    pub id: String,
    /// `type`, e.g. `customer.subscription.updated`.
    pub event_type: String,
    /// When the event happened (Unix seconds). Deliveries can arrive out of
    /// order; this orders them.
    pub created: i64,
    /// `false` for test-mode events.
    pub livemode: bool,
    /// The API version `data.object` is rendered in; `null` for some events
    /// from before Stripe versioned its API.
    pub api_version: Option<String>,
    /// `data.object`: the object the event is about, as it was at `created`.
    pub data_object: serde_json::Value,
}

/// Why a body is not a Stripe event envelope.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("webhook body is not a Stripe event: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "webhook body is a `{object}`, not an `event`: point only snapshot event destinations \
         at this endpoint"
    )]
    NotAnEvent { object: String },
}

// No `deny_unknown_fields` on these: Stripe adds fields to events without a
// new API version (`pending_webhooks`, `request`, `context`, …).
#[derive(Deserialize)]
struct ObjectKind {
    object: String,
}

#[derive(Deserialize)]
struct RawEvent {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    created: i64,
    livemode: bool,
    api_version: Option<String>,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: serde_json::Value,
}

impl Event {
    /// Reads the envelope from a delivery's body. Does not check the
    /// signature: call it on a [`VerifiedPayload`]'s body.
    pub fn parse(body: &[u8]) -> Result<Event, EventError> {
        // `object` first, so a thin event (`v2.core.event`, whose fields
        // differ) is named as such instead of failing on some field.
        let kind: ObjectKind = serde_json::from_slice(body)?;
        if kind.object != "event" {
            return Err(EventError::NotAnEvent {
                object: kind.object,
            });
        }
        let raw: RawEvent = serde_json::from_slice(body)?;
        Ok(Event {
            id: raw.id,
            event_type: raw.event_type,
            created: raw.created,
            livemode: raw.livemode,
            api_version: raw.api_version,
            data_object: raw.data.object,
        })
    }
}

impl VerifiedPayload<'_> {
    /// The event this verified body carries.
    pub fn event(&self) -> Result<Event, EventError> {
        Event::parse(self.body)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    // Trimmed from real deliveries (API version 2025-03-31.basil); field
    // names and shapes as in Stripe's API reference.
    const CHECKOUT_SESSION_COMPLETED: &str = r#"{
      "id": "evt_1R8kLmC4xQ2bN7pZ0aB1cD2e",
      "object": "event",
      "api_version": "2025-03-31.basil",
      "created": 1743465612,
      "data": {
        "object": {
          "id": "cs_test_a1B2c3D4e5F6g7H8i9J0kLmNoPqRsTuVwXyZ",
          "object": "checkout.session",
          "amount_subtotal": 2000,
          "amount_total": 2000,
          "client_reference_id": "0193f0b4-7c1e-7a2b-9d3e-4f5a6b7c8d9e",
          "created": 1743465540,
          "currency": "usd",
          "customer": "cus_S2aBcDeFgHiJkL",
          "customer_details": {
            "address": null,
            "email": "dev@example.com",
            "name": "Ada Lovelace",
            "phone": null,
            "tax_exempt": "none",
            "tax_ids": []
          },
          "expires_at": 1743551940,
          "invoice": "in_1R8kLkC4xQ2bN7pZ3fG4hI5j",
          "livemode": false,
          "metadata": {},
          "mode": "subscription",
          "payment_status": "paid",
          "status": "complete",
          "subscription": "sub_1R8kLkC4xQ2bN7pZkLmNoPqR",
          "success_url": "https://tollgate.example.com/billing/done?session_id={CHECKOUT_SESSION_ID}",
          "ui_mode": "hosted",
          "url": null
        }
      },
      "livemode": false,
      "pending_webhooks": 1,
      "request": { "id": null, "idempotency_key": null },
      "type": "checkout.session.completed"
    }"#;

    const CUSTOMER_SUBSCRIPTION_UPDATED: &str = r#"{
      "id": "evt_1R9aZyC4xQ2bN7pZfGhIjKlM",
      "object": "event",
      "api_version": "2025-03-31.basil",
      "created": 1746144012,
      "data": {
        "object": {
          "id": "sub_1R8kLkC4xQ2bN7pZkLmNoPqR",
          "object": "subscription",
          "billing_cycle_anchor": 1743465610,
          "cancel_at": null,
          "cancel_at_period_end": false,
          "canceled_at": null,
          "collection_method": "charge_automatically",
          "created": 1743465610,
          "currency": "usd",
          "customer": "cus_S2aBcDeFgHiJkL",
          "items": {
            "object": "list",
            "data": [
              {
                "id": "si_S2aBcDeFgHiJkM",
                "object": "subscription_item",
                "current_period_end": 1748736010,
                "current_period_start": 1746144010,
                "price": {
                  "id": "price_1R8kAbC4xQ2bN7pZpro0001",
                  "object": "price",
                  "lookup_key": "tollgate_pro_monthly",
                  "recurring": { "interval": "month", "interval_count": 1, "usage_type": "licensed" },
                  "unit_amount": 2000
                },
                "quantity": 1,
                "subscription": "sub_1R8kLkC4xQ2bN7pZkLmNoPqR"
              }
            ],
            "has_more": false,
            "url": "/v1/subscription_items?subscription=sub_1R8kLkC4xQ2bN7pZkLmNoPqR"
          },
          "latest_invoice": "in_1R9aZxC4xQ2bN7pZuVwXyZ01",
          "livemode": false,
          "metadata": {},
          "start_date": 1743465610,
          "status": "past_due"
        },
        "previous_attributes": { "status": "active" }
      },
      "livemode": false,
      "pending_webhooks": 2,
      "request": { "id": null, "idempotency_key": null },
      "type": "customer.subscription.updated"
    }"#;

    const INVOICE_PAYMENT_FAILED: &str = r#"{
      "id": "evt_1R9aZxC4xQ2bN7pZnOpQrStU",
      "object": "event",
      "api_version": "2025-03-31.basil",
      "created": 1746144011,
      "data": {
        "object": {
          "id": "in_1R9aZxC4xQ2bN7pZuVwXyZ01",
          "object": "invoice",
          "amount_due": 2000,
          "amount_paid": 0,
          "amount_remaining": 2000,
          "attempt_count": 1,
          "attempted": true,
          "billing_reason": "subscription_cycle",
          "collection_method": "charge_automatically",
          "created": 1746144010,
          "currency": "usd",
          "customer": "cus_S2aBcDeFgHiJkL",
          "customer_email": "dev@example.com",
          "hosted_invoice_url": "https://invoice.stripe.com/i/acct_1Q0aBcC4xQ2bN7pZ/test_YWNjdF8x",
          "livemode": false,
          "next_payment_attempt": 1746403210,
          "parent": {
            "quote_details": null,
            "subscription_details": {
              "metadata": {},
              "subscription": "sub_1R8kLkC4xQ2bN7pZkLmNoPqR"
            },
            "type": "subscription_details"
          },
          "period_end": 1746144010,
          "period_start": 1743465610,
          "status": "open",
          "total": 2000
        }
      },
      "livemode": false,
      "pending_webhooks": 1,
      "request": { "id": null, "idempotency_key": null },
      "type": "invoice.payment_failed"
    }"#;

    #[test]
    fn reads_checkout_session_completed() {
        let event = Event::parse(CHECKOUT_SESSION_COMPLETED.as_bytes()).unwrap();
        assert_eq!(event.id, "evt_1R8kLmC4xQ2bN7pZ0aB1cD2e");
        assert_eq!(event.event_type, "checkout.session.completed");
        assert_eq!(event.created, 1_743_465_612);
        assert!(!event.livemode);
        assert_eq!(event.api_version.as_deref(), Some("2025-03-31.basil"));
        let session = &event.data_object;
        assert_eq!(session["object"], "checkout.session");
        assert_eq!(
            session["client_reference_id"],
            "0193f0b4-7c1e-7a2b-9d3e-4f5a6b7c8d9e"
        );
        assert_eq!(session["customer"], "cus_S2aBcDeFgHiJkL");
        assert_eq!(session["subscription"], "sub_1R8kLkC4xQ2bN7pZkLmNoPqR");
    }

    #[test]
    fn reads_customer_subscription_updated() {
        let event = Event::parse(CUSTOMER_SUBSCRIPTION_UPDATED.as_bytes()).unwrap();
        assert_eq!(event.event_type, "customer.subscription.updated");
        assert_eq!(event.created, 1_746_144_012);
        let subscription = &event.data_object;
        assert_eq!(subscription["status"], "past_due");
        assert_eq!(
            subscription["items"]["data"][0]["price"]["lookup_key"],
            "tollgate_pro_monthly"
        );
        assert_eq!(
            subscription["items"]["data"][0]["current_period_end"],
            1_748_736_010
        );
    }

    #[test]
    fn reads_invoice_payment_failed() {
        let event = Event::parse(INVOICE_PAYMENT_FAILED.as_bytes()).unwrap();
        assert_eq!(event.event_type, "invoice.payment_failed");
        let invoice = &event.data_object;
        assert_eq!(invoice["attempt_count"], 1);
        assert_eq!(invoice["amount_remaining"], 2000);
        // Since 2025-03-31.basil the subscription is under `parent`.
        assert_eq!(
            invoice["parent"]["subscription_details"]["subscription"],
            "sub_1R8kLkC4xQ2bN7pZkLmNoPqR"
        );
    }

    #[test]
    fn a_null_api_version_is_none() {
        let body = r#"{"id":"evt_1","object":"event","type":"invoice.paid","created":1,
            "livemode":true,"api_version":null,"data":{"object":{"object":"invoice"}}}"#;
        let event = Event::parse(body.as_bytes()).unwrap();
        assert_eq!(event.api_version, None);
        assert!(event.livemode);
    }

    #[test]
    fn a_thin_event_is_named_as_such() {
        let body = r#"{"id":"evt_test_65R9","object":"v2.core.event",
            "type":"v1.billing.meter.error_report_triggered","created":"2025-04-01T00:00:00.000Z",
            "related_object":{"id":"mtr_1","type":"billing.meter"}}"#;
        let error = Event::parse(body.as_bytes()).unwrap_err();
        assert!(
            matches!(&error, EventError::NotAnEvent { object } if object == "v2.core.event"),
            "{error}"
        );
    }

    #[test]
    fn rejects_bodies_that_are_not_events() {
        for body in [
            "",
            "not json",
            "[]",
            r#"{"object":"event","id":"evt_1","type":"x","created":1,"livemode":false}"#,
            r#"{"object":"event","id":"evt_1","type":"x","created":1,"livemode":false,"data":{}}"#,
            r#"{"object":"event","id":"evt_1","created":1,"livemode":false,"data":{"object":{}}}"#,
        ] {
            let error = Event::parse(body.as_bytes()).unwrap_err();
            assert!(matches!(error, EventError::Json(_)), "{body:?}: {error}");
        }
    }

    #[test]
    fn signed_delivery_round_trip() {
        let secrets = WebhookSecrets::from_list("whsec_old,whsec_new").unwrap();
        let body = INVOICE_PAYMENT_FAILED.as_bytes();
        let header = sign("whsec_new", body, 1_746_144_012);
        let now = UNIX_EPOCH + Duration::from_secs(1_746_144_020);
        let payload = secrets.verify(Some(&header), body, now).unwrap();
        assert_eq!(payload.secret_index(), 1);
        assert_eq!(payload.event().unwrap().id, "evt_1R9aZxC4xQ2bN7pZnOpQrStU");
    }
}
