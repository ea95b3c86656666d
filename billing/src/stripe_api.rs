//! Stripe through `async-stripe`, pointed at Stripe or, in tests, at a fake
//! (`STRIPE_API_BASE`).

use std::collections::HashMap;

use async_trait::async_trait;
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;

use crate::export::{MeterEvent, MeterEvents, SendError};

/// A Stripe API client for `secret_key`; `api_base` (scheme, host and port)
/// replaces Stripe's own address when set.
pub fn client(secret_key: &str, api_base: Option<&str>) -> anyhow::Result<Client> {
    let mut builder = ClientBuilder::new(secret_key);
    if let Some(base) = api_base {
        builder = builder.url(base);
    }
    Ok(builder.build()?)
}

/// Meter events sent to Stripe's `POST /v1/billing/meter_events`.
pub struct StripeMeterEvents {
    client: Client,
}

impl StripeMeterEvents {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl MeterEvents for StripeMeterEvents {
    async fn send(&self, event: &MeterEvent) -> Result<(), SendError> {
        let payload = HashMap::from([
            (
                "stripe_customer_id".to_owned(),
                event.stripe_customer_id.clone(),
            ),
            ("value".to_owned(), event.value.to_string()),
        ]);
        let key = IdempotencyKey::new(&event.identifier)
            .map_err(|e| SendError::Rejected(format!("identifier as Idempotency-Key: {e}")))?;
        CreateBillingMeterEvent::new(event.event_name.clone(), payload)
            .identifier(event.identifier.clone())
            .timestamp(event.timestamp)
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await
            .map(|_| ())
            .map_err(classify)
    }
}

/// Stripe's answer to a meter event it already has. Its message reads "An
/// event already exists with identifier …"; the check is on the message
/// because Stripe gives it no error code of its own.
fn is_duplicate(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("already exists") && message.contains("identifier")
}

fn classify(error: StripeError) -> SendError {
    match error {
        StripeError::Stripe(errors, status) => {
            let message = errors.message.clone().unwrap_or_default();
            if status == 400 && is_duplicate(&message) {
                SendError::Duplicate
            } else if status == 429 || status >= 500 || status == 409 {
                // 409: an idempotent request still in flight at Stripe.
                SendError::Retryable(format!("HTTP {status}: {message}"))
            } else {
                SendError::Rejected(format!("HTTP {status}: {message}"))
            }
        }
        StripeError::ClientError(e) => SendError::Retryable(e),
        StripeError::Timeout => SendError::Retryable("timed out".to_owned()),
        // An answer we could not read may still have been applied.
        StripeError::JSONDeserialize(e) => SendError::Retryable(format!("unreadable answer: {e}")),
        StripeError::ConfigError(e) => SendError::Rejected(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_duplicate_identifier_message_is_recognised() {
        assert!(is_duplicate(
            "An event already exists with identifier acct:tollgate_units:1700000000."
        ));
        assert!(!is_duplicate("No such customer: 'cus_123'"));
    }
}
