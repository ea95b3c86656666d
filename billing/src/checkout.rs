//! Checkout and Customer Portal sessions for an account: the links a
//! customer follows to subscribe to a tier or to manage (change, cancel,
//! pay) a subscription.
//!
//! Creating a session changes no tier. The account's tier moves only when
//! Stripe's webhooks say the subscription exists ([`crate::webhook`]), so a
//! forged or replayed success redirect grants nothing.
//!
//! One subscription per account: a second one would bill the flat price
//! twice. So the account's Stripe customer is made (once, idempotently)
//! before its first Checkout Session, Stripe itself is asked whether that
//! customer already has a live subscription (the webhooks that would tell
//! us may still be on their way), and the customer's other open sessions are
//! expired, so only the newest link can be paid. Sessions for one account
//! are created one at a time (a Postgres advisory lock), so two tabs cannot
//! both pass those checks.

use std::collections::HashMap;

use deadpool_postgres::Pool;
use stripe::{Client, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::subscription::{ListSubscription, ListSubscriptionStatus};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
    ExpireCheckoutSession, ListCheckoutSession,
};
use stripe_core::customer::CreateCustomer;
use stripe_product::price::ListPrice;
use stripe_shared::{CheckoutSessionMode, CheckoutSessionStatus, SubscriptionStatus};
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

/// Where Checkout sends the customer afterwards.
#[derive(Debug, Clone)]
pub struct CheckoutUrls {
    pub success_url: String,
    pub cancel_url: String,
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
    /// Stripe refused a parameter the caller gave (a redirect URL): its
    /// message is meant for the caller.
    #[error("{message}")]
    Refused {
        message: String,
        param: Option<String>,
    },
    /// Stripe failed or refused for a reason of ours (keys, an outage); the
    /// details are for the operator's log, not the caller.
    #[error("Stripe: {0}")]
    Stripe(String),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// Parameters a caller may set, whose refusal by Stripe is the caller's to fix.
const CALLER_PARAMS: [&str; 3] = ["success_url", "cancel_url", "return_url"];

impl From<StripeError> for SessionError {
    fn from(error: StripeError) -> Self {
        if let StripeError::Stripe(details, 400) = &error
            && let Some(param) = details
                .param
                .as_deref()
                .filter(|p| CALLER_PARAMS.contains(p))
        {
            return SessionError::Refused {
                message: details.message.clone().unwrap_or_default(),
                param: Some(param.to_owned()),
            };
        }
        SessionError::Stripe(error.to_string())
    }
}

/// A Checkout Session subscribing `account_id` to `prices`' tier: the flat
/// price and, where the tier has one, the metered overage price.
pub async fn checkout_session(
    pool: &Pool,
    stripe: &Client,
    account_id: Uuid,
    prices: &TierPrices,
    urls: &CheckoutUrls,
) -> Result<SessionLink, SessionError> {
    // Held until the session exists: the account's sessions, one at a time.
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('tollgate-checkout:' || $1::uuid::text, 0))",
        &[&account_id],
    )
    .await?;
    let customer = ensure_customer(pool, stripe, account_id).await?;
    refuse_if_subscribed(stripe, &customer).await?;
    expire_open_sessions(stripe, &customer).await?;
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
    subscription.metadata = Some(account_metadata(account_id));
    let session = CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Subscription)
        .customer(customer)
        .client_reference_id(account_id.to_string())
        .line_items(line_items)
        .subscription_data(subscription)
        .success_url(urls.success_url.clone())
        .cancel_url(urls.cancel_url.clone())
        .send(stripe)
        .await?;
    tx.commit().await?;
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
    let customer = linked_customer(&**pool.get().await?, account_id)
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

fn account_metadata(account_id: Uuid) -> HashMap<String, String> {
    HashMap::from([(ACCOUNT_METADATA_KEY.to_owned(), account_id.to_string())])
}

async fn linked_customer(
    client: &tokio_postgres::Client,
    account_id: Uuid,
) -> Result<Option<String>, SessionError> {
    Ok(client
        .query_opt(
            "SELECT stripe_customer_id FROM billing_customers WHERE account_id = $1",
            &[&account_id],
        )
        .await?
        .map(|row| row.get(0)))
}

/// The account's Stripe customer, made and linked on its first checkout
/// (linked at once, on a connection of its own, whatever happens to the
/// session). The Idempotency-Key is the account's, so a retry after a lost
/// answer gets the same customer rather than a second one.
async fn ensure_customer(
    pool: &Pool,
    stripe: &Client,
    account_id: Uuid,
) -> Result<String, SessionError> {
    let client = pool.get().await?;
    if let Some(customer) = linked_customer(&client, account_id).await? {
        return Ok(customer);
    }
    let key = IdempotencyKey::new(format!("tollgate-customer-{account_id}"))
        .map_err(|e| SessionError::Stripe(format!("idempotency key: {e}")))?;
    let customer = CreateCustomer::new()
        .metadata(account_metadata(account_id))
        .customize()
        .request_strategy(RequestStrategy::Idempotent(key))
        .send(stripe)
        .await?;
    client
        .execute(
            "INSERT INTO billing_customers (account_id, stripe_customer_id) VALUES ($1, $2)",
            &[&account_id, &customer.id.as_str()],
        )
        .await?;
    Ok(customer.id.to_string())
}

/// [`SessionError::AlreadySubscribed`] when the customer has a subscription
/// that still bills or may yet (anything but canceled and
/// expired-before-paying), as Stripe knows it now.
async fn refuse_if_subscribed(stripe: &Client, customer: &str) -> Result<(), SessionError> {
    let subscriptions = ListSubscription::new()
        .customer(customer)
        .status(ListSubscriptionStatus::All)
        .send(stripe)
        .await?;
    match subscriptions.data.into_iter().find(|s| {
        !matches!(
            s.status,
            SubscriptionStatus::Canceled | SubscriptionStatus::IncompleteExpired
        )
    }) {
        Some(live) => Err(SessionError::AlreadySubscribed {
            subscription: live.id.to_string(),
            status: live.status.as_str().to_owned(),
        }),
        None => Ok(()),
    }
}

/// Expires the customer's open Checkout Sessions: only the newest link can
/// be paid.
async fn expire_open_sessions(stripe: &Client, customer: &str) -> Result<(), SessionError> {
    let open = ListCheckoutSession::new()
        .customer(customer)
        .status(CheckoutSessionStatus::Open)
        .send(stripe)
        .await?;
    for session in open.data {
        ExpireCheckoutSession::new(session.id).send(stripe).await?;
    }
    Ok(())
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
