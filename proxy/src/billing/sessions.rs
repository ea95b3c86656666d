//! Checkout and Customer Portal sessions for an account, asked of Stripe.

use std::collections::HashMap;

use deadpool_postgres::Pool;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_billing::StripeClient;
use tollgate_billing::checkout::{
    CheckoutUrls, SessionError, TierPrices, checkout_session, portal_session,
};
use uuid::Uuid;

use super::stripe_client;
use crate::config::Config;
use crate::error::ApiError;

/// Checkout and Customer Portal sessions: `POST /v1/billing/checkout|portal`
/// for the caller's account, the admin API and `tollgate billing checkout`
/// for any. Each call asks Stripe; none changes a tier (webhooks do).
pub struct BillingSessions {
    pool: Pool,
    stripe: StripeClient,
    /// The tiers that can be bought, by name.
    tiers: HashMap<String, TierPrices>,
    success_url: Option<String>,
    cancel_url: Option<String>,
    portal_return_url: Option<String>,
}

/// `{"tier", "success_url"?, "cancel_url"?}`: the URLs default to `[billing]`'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    pub tier: String,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
}

/// `{"return_url"?}`, defaulting to `[billing] portal_return_url`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    pub return_url: Option<String>,
}

impl BillingSessions {
    /// `None` when billing is off (no `STRIPE_SECRET_KEY`).
    pub fn from_config(config: &Config, pool: Pool) -> anyhow::Result<Option<Self>> {
        let Some(stripe) = &config.billing.stripe else {
            return Ok(None);
        };
        let tiers = config
            .tiers
            .iter()
            .filter_map(|t| {
                Some((
                    t.name.clone(),
                    TierPrices {
                        tier: t.name.clone(),
                        price_lookup_key: t.stripe_price_lookup_key.clone()?,
                        overage_lookup_key: t.stripe_overage_lookup_key.clone(),
                    },
                ))
            })
            .collect();
        Ok(Some(Self {
            pool,
            stripe: stripe_client(stripe)?,
            tiers,
            success_url: config.billing.success_url.clone(),
            cancel_url: config.billing.cancel_url.clone(),
            portal_return_url: config.billing.portal_return_url.clone(),
        }))
    }

    /// The account named `name`, for the admin API and the CLI.
    pub async fn account_id(&self, name: &str) -> Result<Uuid, ApiError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|_| ApiError::DatabaseUnavailable)?;
        client
            .query_opt("SELECT id FROM accounts WHERE name = $1", &[&name])
            .await
            .map_err(|_| ApiError::DatabaseUnavailable)?
            .map(|row| row.get(0))
            .ok_or_else(|| ApiError::NotFound(format!("no account `{name}`")))
    }

    /// A Checkout Session from a JSON [`CheckoutRequest`].
    pub async fn checkout_json(&self, account_id: Uuid, body: &[u8]) -> Result<Value, ApiError> {
        self.checkout(account_id, parse_body(body)?).await
    }

    /// A Customer Portal session from a JSON [`PortalRequest`] (or an empty body).
    pub async fn portal_json(&self, account_id: Uuid, body: &[u8]) -> Result<Value, ApiError> {
        let request = if body.iter().all(u8::is_ascii_whitespace) {
            PortalRequest::default()
        } else {
            parse_body(body)?
        };
        self.portal(account_id, request).await
    }

    /// A Checkout Session subscribing the account to `body.tier`.
    pub async fn checkout(
        &self,
        account_id: Uuid,
        body: CheckoutRequest,
    ) -> Result<Value, ApiError> {
        let prices = self.tiers.get(&body.tier).ok_or_else(|| {
            let mut buyable: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
            buyable.sort_unstable();
            ApiError::bad_request(
                format!(
                    "Tier `{}` cannot be bought; tiers with a Stripe price: {}.",
                    body.tier,
                    buyable.join(", ")
                ),
                Some("tier"),
            )
        })?;
        let url = |given: Option<String>, default: &Option<String>, param: &'static str| {
            given.or_else(|| default.clone()).ok_or_else(|| {
                ApiError::bad_request(
                    format!(
                        "`{param}` is required: the server sets no default ([billing] {param})."
                    ),
                    Some(param),
                )
            })
        };
        let urls = CheckoutUrls {
            success_url: url(body.success_url, &self.success_url, "success_url")?,
            cancel_url: url(body.cancel_url, &self.cancel_url, "cancel_url")?,
        };
        let session = checkout_session(&self.pool, &self.stripe, account_id, prices, &urls)
            .await
            .map_err(session_error)?;
        Ok(json!({
            "object": "billing.checkout_session",
            "id": session.id,
            "url": session.url,
            "tier": prices.tier,
        }))
    }

    /// A Customer Portal session for the account's Stripe customer.
    pub async fn portal(&self, account_id: Uuid, body: PortalRequest) -> Result<Value, ApiError> {
        let return_url = body.return_url.or_else(|| self.portal_return_url.clone());
        let session = portal_session(&self.pool, &self.stripe, account_id, return_url.as_deref())
            .await
            .map_err(session_error)?;
        Ok(json!({
            "object": "billing.portal_session",
            "id": session.id,
            "url": session.url,
        }))
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}"), None))
}

fn session_error(error: SessionError) -> ApiError {
    match error {
        SessionError::AlreadySubscribed { .. } | SessionError::NoCustomer => {
            ApiError::Conflict(error.to_string())
        }
        SessionError::Refused { message, param } => {
            let param = ["success_url", "cancel_url", "return_url"]
                .into_iter()
                .find(|p| param.as_deref() == Some(*p));
            ApiError::bad_request(format!("Stripe refused it: {message}"), param)
        }
        // Stripe's own error text names keys and request logs: the
        // operator's log has it; the caller learns only that it failed.
        SessionError::PriceMissing(_) | SessionError::Stripe(_) => {
            tracing::warn!(error = %error, "billing session not created");
            ApiError::BillingUnavailable(
                "Stripe could not create the session; try again shortly.".to_owned(),
            )
        }
        SessionError::Database(_) | SessionError::Pool(_) => {
            tracing::warn!(error = %error, "billing session not created");
            ApiError::DatabaseUnavailable
        }
    }
}
