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

pub use summaries::StripeMeterSummaries;

/// Reading meter event summaries, for reconciliation.
mod summaries {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use async_trait::async_trait;
    use stripe::{Client, StripeError};
    use stripe_billing::billing_meter::ListBillingMeter;
    use stripe_billing::billing_meter_event_summary::{
        ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow,
    };
    use stripe_billing::{BillingMeterId, BillingMeterStatus};

    use crate::reconcile::{Day, MeterSummaries, SummariesError};

    /// Stripe's meter event summaries (`GET /v1/billing/meters/{id}/event_summaries`,
    /// daily windows), for reconciliation: the meter is found by its event name
    /// among the active meters, then each customer's days are listed page by
    /// page.
    pub struct StripeMeterSummaries {
        client: Client,
        page_size: i64,
        timeout: Duration,
    }

    impl StripeMeterSummaries {
        pub fn new(client: Client) -> Self {
            Self {
                client,
                // Stripe's largest page.
                page_size: 100,
                timeout: Duration::from_secs(20),
            }
        }

        /// Objects per page (1–100); smaller only to see paging at work.
        pub fn page_size(mut self, page_size: u8) -> Self {
            self.page_size = i64::from(page_size.clamp(1, 100));
            self
        }

        /// Bound on each call to Stripe.
        pub fn timeout(mut self, timeout: Duration) -> Self {
            self.timeout = timeout;
            self
        }

        async fn call<T>(
            &self,
            request: impl std::future::Future<Output = Result<T, StripeError>>,
        ) -> Result<T, SummariesError> {
            match tokio::time::timeout(self.timeout, request).await {
                Ok(answer) => answer.map_err(summaries_error),
                Err(_) => Err(SummariesError::Unreachable("timed out".to_owned())),
            }
        }

        async fn meter_id(&self, event_name: &str) -> Result<BillingMeterId, SummariesError> {
            let mut request = ListBillingMeter::new()
                .status(BillingMeterStatus::Active)
                .limit(self.page_size);
            loop {
                let page = self.call(request.send(&self.client)).await?;
                if let Some(meter) = page.data.iter().find(|m| m.event_name == event_name) {
                    return Ok(meter.id.clone());
                }
                match page.data.last() {
                    Some(last) if page.has_more => {
                        request = request.starting_after(last.id.as_str())
                    }
                    _ => return Err(SummariesError::NoMeter(event_name.to_owned())),
                }
            }
        }
    }

    #[async_trait]
    impl MeterSummaries for StripeMeterSummaries {
        async fn daily_units(
            &self,
            meter_event_name: &str,
            customers: &[String],
            from: Day,
            to: Day,
        ) -> Result<BTreeMap<(String, Day), i64>, SummariesError> {
            let meter = self.meter_id(meter_event_name).await?;
            let mut units = BTreeMap::new();
            for customer in customers {
                // Daily windows must start and end on UTC midnights.
                let mut request = ListIdBillingMeterEventSummary::new(
                    meter.clone(),
                    customer.as_str(),
                    to.next().start(),
                    from.start(),
                )
                .value_grouping_window(ListIdBillingMeterEventSummaryValueGroupingWindow::Day)
                .limit(self.page_size);
                loop {
                    let page = self.call(request.send(&self.client)).await?;
                    for summary in &page.data {
                        // A sum of whole units; Stripe answers with a float.
                        let value = summary.aggregated_value.round() as i64;
                        *units
                            .entry((customer.clone(), Day::containing(summary.start_time)))
                            .or_default() += value;
                    }
                    match page.data.last() {
                        Some(last) if page.has_more => {
                            request = request.starting_after(last.id.as_str());
                        }
                        _ => break,
                    }
                }
            }
            Ok(units)
        }
    }

    fn summaries_error(error: StripeError) -> SummariesError {
        match error {
            StripeError::Stripe(errors, status) => {
                let message = format!("HTTP {status}: {}", errors.message.unwrap_or_default());
                if status == 429 || status >= 500 {
                    SummariesError::Unreachable(message)
                } else {
                    SummariesError::Refused(message)
                }
            }
            StripeError::ClientError(e) => SummariesError::Unreachable(e),
            StripeError::Timeout => SummariesError::Unreachable("timed out".to_owned()),
            StripeError::JSONDeserialize(e) => {
                SummariesError::Refused(format!("unreadable answer: {e}"))
            }
            StripeError::ConfigError(e) => SummariesError::Refused(e),
        }
    }
}
