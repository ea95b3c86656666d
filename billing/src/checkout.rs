//! Checkout and Customer Portal sessions for an account: the links a
//! customer follows to subscribe to a tier or to manage (change, cancel,
//! pay) a subscription.
//!
//! Creating a session changes nothing locally. The account's tier moves only
//! when Stripe's webhooks say the subscription exists ([`crate::webhook`]),
//! so a forged or replayed success redirect grants nothing.

use std::collections::HashMap;

use deadpool_postgres::Pool;
use stripe::{Client, StripeError};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
};
use stripe_product::price::ListPrice;
use stripe_shared::CheckoutSessionMode;
use uuid::Uuid;

use crate::webhook::ACCOUNT_METADATA_KEY;

/// What a tier sells in Stripe, by lookup key (`[[tiers]]`).
#[derive(Debug, Clone)]
pub struct TierPrices {
    pub tier: String,
    /// The flat monthly price.
    pub price_lookup_key: String,
    /// The metered overage price, where the tier allows overage.
    pub overage_lookup_key: Option<String>,
}

/// A session's id and the URL to send the customer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLink {
    pub id: String,
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Subscribing twice would bill twice: plan changes go through the
    /// portal, which swaps the subscription's price instead.
    #[error(
        "this account already has subscription {subscription} ({status}); change or cancel it \
         in the billing portal (POST /v1/billing/portal)"
    )]
    AlreadySubscribed {
        subscription: String,
        status: String,
    },
    #[error("this account has no Stripe customer yet: subscribe first (POST /v1/billing/checkout)")]
    NoCustomer,
    #[error(
        "Stripe has no active price with lookup key `{0}`: run `tollgate billing sync-catalog`"
    )]
    PriceMissing(String),
    #[error("Stripe: {0}")]
    Stripe(String),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl From<StripeError> for SessionError {
    fn from(error: StripeError) -> Self {
        SessionError::Stripe(error.to_string())
    }
}

/// Where Checkout sends the customer afterwards.
#[derive(Debug, Clone)]
pub struct CheckoutUrls {
    pub success_url: String,
    pub cancel_url: String,
}

/// A Checkout Session subscribing `account_id` to `prices`' tier: the flat
/// price and, where the tier has one, the metered overage price. The
/// account's Stripe customer is reused when it has one; otherwise Checkout
/// creates one and `checkout.session.completed` links it.
pub async fn checkout_session(
    pool: &Pool,
    stripe: &Client,
    account_id: Uuid,
    prices: &TierPrices,
    urls: &CheckoutUrls,
) -> Result<SessionLink, SessionError> {
    let client = pool.get().await?;
    if let Some(row) = client
        .query_opt(
            "SELECT subscription_id, status FROM billing_subscriptions
             WHERE account_id = $1 AND status IN ('active', 'trialing', 'past_due', 'unpaid')
             ORDER BY subscription_created DESC NULLS LAST LIMIT 1",
            &[&account_id],
        )
        .await?
    {
        return Err(SessionError::AlreadySubscribed {
            subscription: row.get(0),
            status: row.get(1),
        });
    }
    let customer = customer_of(pool, account_id).await?;
    let mut line_items = vec![line_item(
        price_id(stripe, &prices.price_lookup_key).await?,
        Some(1),
    )];
    if let Some(overage) = &prices.overage_lookup_key {
        // Metered prices take no quantity: usage decides it.
        line_items.push(line_item(price_id(stripe, overage).await?, None));
    }
    // The subscription names its account too, so its events can be applied
    // even when they arrive before checkout.session.completed.
    let mut subscription = CreateCheckoutSessionSubscriptionData::new();
    subscription.metadata = Some(HashMap::from([(
        ACCOUNT_METADATA_KEY.to_owned(),
        account_id.to_string(),
    )]));
    let mut request = CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Subscription)
        .client_reference_id(account_id.to_string())
        .line_items(line_items)
        .subscription_data(subscription)
        .success_url(urls.success_url.clone())
        .cancel_url(urls.cancel_url.clone());
    if let Some(customer) = customer {
        request = request.customer(customer);
    }
    let session = request.send(stripe).await?;
    Ok(SessionLink {
        id: session.id.to_string(),
        url: session
            .url
            .ok_or_else(|| SessionError::Stripe("Checkout Session without a URL".to_owned()))?,
    })
}

/// A Customer Portal session for the account's Stripe customer.
pub async fn portal_session(
    pool: &Pool,
    stripe: &Client,
    account_id: Uuid,
    return_url: Option<&str>,
) -> Result<SessionLink, SessionError> {
    let customer = customer_of(pool, account_id)
        .await?
        .ok_or(SessionError::NoCustomer)?;
    let mut request = CreateBillingPortalSession::new().customer(customer);
    if let Some(url) = return_url {
        request = request.return_url(url);
    }
    let session = request.send(stripe).await?;
    Ok(SessionLink {
        id: session.id.to_string(),
        url: session.url,
    })
}

async fn customer_of(pool: &Pool, account_id: Uuid) -> Result<Option<String>, SessionError> {
    Ok(pool
        .get()
        .await?
        .query_opt(
            "SELECT stripe_customer_id FROM billing_customers WHERE account_id = $1",
            &[&account_id],
        )
        .await?
        .map(|row| row.get(0)))
}

/// The id of the active price with `lookup_key`.
async fn price_id(stripe: &Client, lookup_key: &str) -> Result<String, SessionError> {
    ListPrice::new()
        .lookup_keys(vec![lookup_key.to_owned()])
        .active(true)
        .send(stripe)
        .await?
        .data
        .into_iter()
        .next()
        .map(|price| price.id.to_string())
        .ok_or_else(|| SessionError::PriceMissing(lookup_key.to_owned()))
}

fn line_item(price: String, quantity: Option<u64>) -> CreateCheckoutSessionLineItems {
    let mut item = CreateCheckoutSessionLineItems::new();
    item.price = Some(price);
    item.quantity = quantity;
    item
}
