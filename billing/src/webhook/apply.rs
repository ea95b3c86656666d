//! Applying verified Stripe events to Postgres: which customer pays for an
//! account (`billing_customers`), the state of each subscription
//! (`billing_subscriptions`), and from those the account's tier
//! (`accounts.tier`).
//!
//! Stripe delivers every event at least once, in no set order, often several
//! at a time (a checkout alone sends `customer.subscription.created`,
//! `invoice.paid` and `checkout.session.completed` within a second, the
//! checkout one often last). [`apply`] copes with that by these rules:
//!
//! - **Once.** The event id goes into `billing_webhook_events` in the
//!   transaction that applies the event. A redelivery finds it and changes
//!   nothing; one running at the same moment waits on the primary key and
//!   then finds it.
//! - **The newest subscription state wins.** A `customer.subscription.*`
//!   event carries the whole subscription as of `event.created`, so it is
//!   applied only when it is at least as new as the state stored, ordered by
//!   `(created, type)` with created < updated < deleted inside one second
//!   (Stripe's timestamps are whole seconds, and a subscription is often
//!   created `incomplete` and updated to `active` by its first payment in
//!   the same one). At a full tie the later delivery wins. `canceled` and
//!   `incomplete_expired` are terminal: Stripe never revives such a
//!   subscription, so nothing changes one afterwards.
//! - **Payment is ordered on its own.** `past_due_since` is set by
//!   `invoice.payment_failed` or a `past_due`/`unpaid` status and cleared by
//!   `invoice.paid` or an `active`/`trialing` status, each only if newer than
//!   the last such signal; within one second "paid" wins, as an invoice once
//!   paid never fails again. It is the failure's `created`, not the delivery
//!   time, so a delivery held up by an outage does not lengthen the grace.
//! - **Periods only move forward**: the later `current_period_end` wins,
//!   whichever event brings it; each advance is reported once
//!   ([`PeriodChange`]) so the caller can start the new period's counters.
//! - **No account yet is retried.** A subscription (or its invoice) whose
//!   customer is not linked to an account and whose metadata names none is
//!   [`ApplyError::UnknownCustomer`], retryable: nothing is recorded, the
//!   gateway answers 500, and Stripe's redelivery finds the link that
//!   `checkout.session.completed` made. [`ApplyError::is_retryable`] says
//!   which errors to answer that way.
//!
//! After every subscription or invoice event the account's tier is computed
//! again from all its subscriptions, with the account row locked so that two
//! events for one account applied at once cannot both decide from the old
//! state. The tier is that of the newest subscription (by its own `created`)
//! that is `active`, `trialing` or `past_due`, and not unpaid for longer than
//! [`Plans::grace`]; otherwise [`Plans::free_tier`]. [`downgrade_past_due`]
//! applies the grace to accounts no event touches.
//!
//! Objects are read with small lenient structs rather than `async-stripe`'s
//! types: those follow one API version and require its fields, while the
//! webhook endpoint may be pinned to an older version (periods moved from the
//! subscription to its items, and an invoice's subscription under `parent`,
//! in 2025-03-31.basil); both shapes are read here.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Pool, Transaction};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use uuid::Uuid;

use super::Event;

/// How long an unpaid subscription keeps its tier unless set otherwise: the
/// default of `[billing] grace_days`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3 * 86_400);

const CHECKOUT_SESSION_COMPLETED: &str = "checkout.session.completed";
const SUBSCRIPTION_CREATED: &str = "customer.subscription.created";
const SUBSCRIPTION_UPDATED: &str = "customer.subscription.updated";
const SUBSCRIPTION_DELETED: &str = "customer.subscription.deleted";
const SUBSCRIPTION_TRIAL_WILL_END: &str = "customer.subscription.trial_will_end";
const INVOICE_PAID: &str = "invoice.paid";
const INVOICE_PAYMENT_FAILED: &str = "invoice.payment_failed";

/// Every event type [`apply`] acts on; others are recorded and ignored.
pub const HANDLED_EVENT_TYPES: [&str; 7] = [
    CHECKOUT_SESSION_COMPLETED,
    SUBSCRIPTION_CREATED,
    SUBSCRIPTION_UPDATED,
    SUBSCRIPTION_DELETED,
    SUBSCRIPTION_TRIAL_WILL_END,
    INVOICE_PAID,
    INVOICE_PAYMENT_FAILED,
];

/// Subscription statuses Tollgate acts on (Stripe's `status` values).
const ACTIVE: &str = "active";
const TRIALING: &str = "trialing";
const PAST_DUE: &str = "past_due";
const UNPAID: &str = "unpaid";
const CANCELED: &str = "canceled";
const INCOMPLETE_EXPIRED: &str = "incomplete_expired";

/// The metadata key naming the account, on subscriptions Tollgate creates
/// (Checkout's `subscription_data[metadata][account_id]`).
pub const ACCOUNT_METADATA_KEY: &str = "account_id";

/// Which tier each Stripe price grants, and what an account without a paying
/// subscription gets. Built from `[[tiers]] stripe_price_lookup_key`.
#[derive(Debug, Clone)]
pub struct Plans {
    free_tier: String,
    /// lookup key → tier
    tiers: HashMap<String, String>,
    grace: Duration,
}

impl Plans {
    /// Prices are named by lookup key, not id, so the same configuration
    /// works in test and live mode. The grace is [`DEFAULT_GRACE`] until
    /// [`Plans::with_grace`].
    pub fn new<K, T>(
        free_tier: impl Into<String>,
        lookup_keys: impl IntoIterator<Item = (K, T)>,
    ) -> Self
    where
        K: Into<String>,
        T: Into<String>,
    {
        Self {
            free_tier: free_tier.into(),
            tiers: lookup_keys
                .into_iter()
                .map(|(key, tier)| (key.into(), tier.into()))
                .collect(),
            grace: DEFAULT_GRACE,
        }
    }

    /// How long a subscription with an outstanding payment keeps its tier
    /// (`[billing] grace_days`). Used by both [`apply`] and
    /// [`downgrade_past_due`], so they cannot disagree.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn free_tier(&self) -> &str {
        &self.free_tier
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The tier a price grants, by its lookup key.
    pub fn tier_for(&self, lookup_key: &str) -> Option<&str> {
        self.tiers.get(lookup_key).map(String::as_str)
    }
}

/// What applying one event did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The event was applied before: nothing changed.
    pub duplicate: bool,
    /// A type Tollgate does not handle (counted by the caller); recorded as
    /// seen all the same.
    pub ignored: bool,
    /// Accounts whose tier changed: every instance's key cache must learn.
    pub tier_changes: Vec<TierChange>,
    /// Subscriptions whose billing period advanced: the account's period
    /// counters start again.
    pub period_changes: Vec<PeriodChange>,
}

/// An account moved from one tier to another (`accounts.tier` is updated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierChange {
    pub account_id: Uuid,
    pub from: String,
    pub to: String,
}

/// A subscription's stored billing period moved forward (or was first
/// known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodChange {
    pub account_id: Uuid,
    pub subscription_id: String,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// Why an event was not applied. Nothing of it was: the transaction is
/// rolled back and the event is not recorded as seen, so a redelivery is
/// applied afresh.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Usually `checkout.session.completed`, which links the customer, has
    /// not been applied yet: Stripe sends it after the subscription's
    /// events. Retryable, so Stripe delivers this one again later.
    #[error(
        "no account is linked to Stripe customer {customer} (subscription {subscription}) and \
         the subscription has no `metadata.account_id`: retry after checkout.session.completed \
         links them"
    )]
    UnknownCustomer {
        customer: String,
        subscription: String,
    },
    /// A Checkout Session's `client_reference_id` or a subscription's
    /// `metadata.account_id` names no account.
    #[error("account {account_id} named by the event does not exist")]
    UnknownAccount { account_id: Uuid },
    /// A Checkout Session for an account whose customer already pays for
    /// another account.
    #[error(
        "Stripe customer {customer} already pays for account {linked}, not for {account_id}: \
         link it by hand if it should move"
    )]
    CustomerOfAnotherAccount {
        customer: String,
        account_id: Uuid,
        linked: Uuid,
    },
    #[error("`{event_type}` event: {reason}")]
    Malformed { event_type: String, reason: String },
}

impl ApplyError {
    /// Whether a redelivery can succeed: answer 500 so Stripe retries;
    /// otherwise answer 200 (and log), since the same body fails the same
    /// way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApplyError::Database(_) | ApplyError::Pool(_) | ApplyError::UnknownCustomer { .. } => {
                true
            }
            ApplyError::UnknownAccount { .. }
            | ApplyError::CustomerOfAnotherAccount { .. }
            | ApplyError::Malformed { .. } => false,
        }
    }
}

/// Applies one verified event, exactly once, in one transaction.
pub async fn apply(
    pool: &Pool,
    event: &Event,
    plans: &Plans,
    now: SystemTime,
) -> Result<Applied, ApplyError> {
    // Read before touching the database: a malformed object changes nothing.
    let change = Change::read(event, plans)?;
    let created = stripe_time(event.created).ok_or_else(|| ApplyError::Malformed {
        event_type: event.event_type.clone(),
        reason: format!("`created` {} is before 1970", event.created),
    })?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO billing_webhook_events (id, type, created, livemode, received_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO NOTHING",
            &[
                &event.id,
                &event.event_type,
                &created,
                &event.livemode,
                &now,
            ],
        )
        .await?;
    if inserted == 0 {
        tracing::debug!(event = %event.id, "webhook event already applied");
        return Ok(Applied {
            duplicate: true,
            ..Applied::default()
        });
    }
    let mut applied = Applied::default();
    match change {
        Change::Ignored => {
            tracing::debug!(event = %event.id, event_type = %event.event_type, "webhook event type not handled");
            applied.ignored = true;
        }
        Change::TrialWillEnd { subscription } => {
            tracing::info!(event = %event.id, subscription, "subscription trial ends in three days");
        }
        Change::LinkCustomer {
            account_id,
            customer,
        } => {
            link_customer(&tx, account_id, &customer, now).await?;
        }
        Change::Subscription(update) => {
            let stamp = Stamp {
                created,
                rank: update.rank,
            };
            apply_subscription(&tx, update, stamp, plans, now, &mut applied).await?;
        }
        Change::Invoice(Some(update)) => {
            apply_invoice(&tx, update, created, plans, now, &mut applied).await?;
        }
        Change::Invoice(None) => {
            tracing::debug!(event = %event.id, "invoice of no subscription: nothing to apply");
        }
    }
    tx.commit().await?;
    Ok(applied)
}

/// Moves accounts whose subscription has been unpaid for longer than
/// [`Plans::grace`] to the tier they are now entitled to (usually the free
/// tier), all in one transaction. Run it periodically: [`apply`] applies the
/// grace only to accounts an event touches.
pub async fn downgrade_past_due(
    pool: &Pool,
    plans: &Plans,
    now: SystemTime,
) -> Result<Vec<TierChange>, ApplyError> {
    let Some(cutoff) = now.checked_sub(plans.grace) else {
        return Ok(Vec::new());
    };
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // Locked in id order, so two sweeps cannot deadlock each other; `apply`
    // holds one account at a time.
    let accounts = tx
        .query(
            "SELECT id, tier FROM accounts
             WHERE tier <> $2 AND id IN (
                 SELECT account_id FROM billing_subscriptions
                 WHERE past_due_since <= $1 AND status IN ('active', 'trialing', 'past_due'))
             ORDER BY id
             FOR UPDATE",
            &[&cutoff, &plans.free_tier],
        )
        .await?;
    let mut changes = Vec::new();
    for account in accounts {
        let account_id: Uuid = account.try_get(0)?;
        let tier: String = account.try_get(1)?;
        if let Some(change) = settle_tier(&tx, account_id, &tier, plans, now).await? {
            changes.push(change);
        }
    }
    tx.commit().await?;
    Ok(changes)
}

/// What an event asks for, read from its `data.object`.
enum Change {
    Ignored,
    TrialWillEnd {
        subscription: String,
    },
    LinkCustomer {
        account_id: Uuid,
        customer: String,
    },
    Subscription(SubscriptionUpdate),
    /// `None`: an invoice that is not a subscription's.
    Invoice(Option<InvoiceUpdate>),
}

impl Change {
    fn read(event: &Event, plans: &Plans) -> Result<Change, ApplyError> {
        let event_type = event.event_type.as_str();
        let malformed = |reason: String| ApplyError::Malformed {
            event_type: event_type.to_owned(),
            reason,
        };
        match event_type {
            CHECKOUT_SESSION_COMPLETED => {
                let session: CheckoutSessionObject = read_object(event)?;
                let reference = session.client_reference_id.ok_or_else(|| {
                    malformed(format!(
                        "Checkout Session {} has no client_reference_id: not created by Tollgate",
                        session.id
                    ))
                })?;
                let account_id = Uuid::parse_str(&reference).map_err(|_| {
                    malformed(format!(
                        "Checkout Session {}: client_reference_id {reference:?} is not an account id",
                        session.id
                    ))
                })?;
                let customer = session.customer.ok_or_else(|| {
                    malformed(format!("Checkout Session {} has no customer", session.id))
                })?;
                Ok(Change::LinkCustomer {
                    account_id,
                    customer: customer.into_id(),
                })
            }
            SUBSCRIPTION_CREATED | SUBSCRIPTION_UPDATED | SUBSCRIPTION_DELETED => {
                let subscription: SubscriptionObject = read_object(event)?;
                let rank = match event_type {
                    SUBSCRIPTION_CREATED => 0,
                    SUBSCRIPTION_UPDATED => 1,
                    _ => 2,
                };
                Ok(Change::Subscription(SubscriptionUpdate::from_object(
                    subscription,
                    rank,
                    event_type == SUBSCRIPTION_DELETED,
                    plans,
                )))
            }
            SUBSCRIPTION_TRIAL_WILL_END => {
                let subscription: SubscriptionObject = read_object(event)?;
                Ok(Change::TrialWillEnd {
                    subscription: subscription.id,
                })
            }
            INVOICE_PAID | INVOICE_PAYMENT_FAILED => {
                let invoice: InvoiceObject = read_object(event)?;
                let signal = if event_type == INVOICE_PAID {
                    PaymentSignal::Paid
                } else {
                    PaymentSignal::Failed
                };
                InvoiceUpdate::from_object(invoice, signal)
                    .map(Change::Invoice)
                    .map_err(malformed)
            }
            _ => Ok(Change::Ignored),
        }
    }
}

fn read_object<T: DeserializeOwned>(event: &Event) -> Result<T, ApplyError> {
    T::deserialize(&event.data_object).map_err(|error| ApplyError::Malformed {
        event_type: event.event_type.clone(),
        reason: format!("data.object: {error}"),
    })
}

/// A subscription's state as one event carries it.
#[derive(Debug, Clone)]
struct SubscriptionUpdate {
    id: String,
    customer: String,
    metadata_account: Option<Uuid>,
    rank: i16,
    status: String,
    price_lookup_key: Option<String>,
    tier: Option<String>,
    subscription_created: Option<SystemTime>,
    period: Option<Period>,
    cancel_at_period_end: bool,
}

impl SubscriptionUpdate {
    fn from_object(object: SubscriptionObject, rank: i16, deleted: bool, plans: &Plans) -> Self {
        let items = object.items.map(|list| list.data).unwrap_or_default();
        // A subscription may also carry prices that grant no tier (a metered
        // overage price): the first item whose price does decides.
        let item = items
            .iter()
            .find(|item| {
                item.lookup_key()
                    .is_some_and(|key| plans.tier_for(key).is_some())
            })
            .or(items.first());
        let price_lookup_key = item.and_then(|item| item.lookup_key().map(str::to_owned));
        let tier = price_lookup_key
            .as_deref()
            .and_then(|key| plans.tier_for(key))
            .map(str::to_owned);
        // Since 2025-03-31.basil the period is per item; before, on the
        // subscription.
        let period = item
            .and_then(|item| Period::from_unix(item.current_period_start, item.current_period_end))
            .or_else(|| Period::from_unix(object.current_period_start, object.current_period_end));
        let metadata_account = object
            .metadata
            .as_ref()
            .and_then(|metadata| account_in_metadata(metadata, &object.id));
        Self {
            metadata_account,
            rank,
            // A deleted subscription's object says `canceled`; made certain
            // here, since terminal states are what keep it deleted.
            status: if deleted {
                CANCELED.to_owned()
            } else {
                object.status
            },
            price_lookup_key,
            tier,
            subscription_created: object.created.and_then(stripe_time),
            period,
            cancel_at_period_end: object.cancel_at_period_end.unwrap_or(false),
            customer: object.customer.into_id(),
            id: object.id,
        }
    }
}

/// What an invoice event says about its subscription.
#[derive(Debug, Clone)]
struct InvoiceUpdate {
    subscription: String,
    customer: String,
    metadata_account: Option<Uuid>,
    signal: PaymentSignal,
    /// For `invoice.paid`: the period the subscription's lines cover.
    period: Option<Period>,
}

impl InvoiceUpdate {
    fn from_object(object: InvoiceObject, signal: PaymentSignal) -> Result<Option<Self>, String> {
        // Since 2025-03-31.basil under `parent.subscription_details`; before,
        // `subscription` and `subscription_details` on the invoice.
        let details = object
            .parent
            .and_then(|parent| parent.subscription_details)
            .or(object.subscription_details);
        let subscription = details
            .as_ref()
            .and_then(|details| details.subscription.as_ref())
            .or(object.subscription.as_ref())
            .map(|subscription| subscription.id().to_owned());
        let Some(subscription) = subscription else {
            return Ok(None);
        };
        let customer = object
            .customer
            .ok_or_else(|| format!("invoice {} has no customer", object.id))?
            .into_id();
        let metadata_account = details
            .as_ref()
            .and_then(|details| details.metadata.as_ref())
            .and_then(|metadata| account_in_metadata(metadata, &subscription));
        // The new period is that of the subscription's lines, the latest
        // one if there are several (prorations cover the old period). The
        // invoice's own `period_start`/`period_end` are not used: for a
        // renewal they cover the period that just ended (when usage was
        // added), not the one paid for.
        let period = match signal {
            PaymentSignal::Failed => None,
            PaymentSignal::Paid => object
                .lines
                .map(|list| list.data)
                .unwrap_or_default()
                .iter()
                .filter(|line| line.subscription() == Some(subscription.as_str()))
                .filter_map(|line| {
                    let period = line.period.as_ref()?;
                    Period::from_unix(Some(period.start), Some(period.end))
                })
                .max_by(|a, b| a.end.cmp(&b.end).then(b.start.cmp(&a.start))),
        };
        Ok(Some(Self {
            subscription,
            customer,
            metadata_account,
            signal,
            period,
        }))
    }
}

fn account_in_metadata(
    metadata: &HashMap<String, serde_json::Value>,
    subscription: &str,
) -> Option<Uuid> {
    let value = metadata.get(ACCOUNT_METADATA_KEY)?.as_str()?;
    match Uuid::parse_str(value) {
        Ok(account_id) => Some(account_id),
        Err(_) => {
            tracing::warn!(
                subscription,
                value,
                "metadata.account_id is not an account id; looking the customer up instead"
            );
            None
        }
    }
}

/// Order of a stored subscription state: `created` of its event, then the
/// event type's rank (created 0 < updated 1 < deleted 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp {
    created: SystemTime,
    rank: i16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PaymentSignal {
    Paid,
    Failed,
}

impl PaymentSignal {
    fn of_status(status: &str) -> Option<PaymentSignal> {
        match status {
            ACTIVE | TRIALING => Some(PaymentSignal::Paid),
            PAST_DUE | UNPAID => Some(PaymentSignal::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Period {
    start: SystemTime,
    end: SystemTime,
}

impl Period {
    fn from_unix(start: Option<i64>, end: Option<i64>) -> Option<Period> {
        Some(Period {
            start: stripe_time(start?)?,
            end: stripe_time(end?)?,
        })
    }
}

/// Stripe's Unix seconds; `None` before 1970 (or past what `SystemTime`
/// holds).
fn stripe_time(secs: i64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

/// A row of `billing_subscriptions`.
#[derive(Debug, Clone, PartialEq)]
struct SubscriptionRow {
    subscription_id: String,
    account_id: Uuid,
    customer: String,
    /// `None` until a subscription event is applied.
    status: Option<String>,
    price_lookup_key: Option<String>,
    tier: Option<String>,
    subscription_created: Option<SystemTime>,
    period: Option<Period>,
    cancel_at_period_end: bool,
    stamp: Option<Stamp>,
    past_due_since: Option<SystemTime>,
    payment_state_created: Option<SystemTime>,
}

const ROW_COLUMNS: &str = "subscription_id, account_id, stripe_customer_id, status, \
     price_lookup_key, tier, subscription_created, current_period_start, current_period_end, \
     cancel_at_period_end, state_created, state_rank, past_due_since, payment_state_created";

impl SubscriptionRow {
    /// A subscription known only from an invoice so far.
    fn new(subscription_id: &str, account_id: Uuid, customer: &str) -> Self {
        Self {
            subscription_id: subscription_id.to_owned(),
            account_id,
            customer: customer.to_owned(),
            status: None,
            price_lookup_key: None,
            tier: None,
            subscription_created: None,
            period: None,
            cancel_at_period_end: false,
            stamp: None,
            past_due_since: None,
            payment_state_created: None,
        }
    }

    fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        let start: Option<SystemTime> = row.try_get(7)?;
        let end: Option<SystemTime> = row.try_get(8)?;
        let created: Option<SystemTime> = row.try_get(10)?;
        let rank: Option<i16> = row.try_get(11)?;
        Ok(Self {
            subscription_id: row.try_get(0)?,
            account_id: row.try_get(1)?,
            customer: row.try_get(2)?,
            status: row.try_get(3)?,
            price_lookup_key: row.try_get(4)?,
            tier: row.try_get(5)?,
            subscription_created: row.try_get(6)?,
            period: start.zip(end).map(|(start, end)| Period { start, end }),
            cancel_at_period_end: row.try_get(9)?,
            stamp: created
                .zip(rank)
                .map(|(created, rank)| Stamp { created, rank }),
            past_due_since: row.try_get(12)?,
            payment_state_created: row.try_get(13)?,
        })
    }

    fn is_terminal(&self) -> bool {
        matches!(self.status.as_deref(), Some(CANCELED | INCOMPLETE_EXPIRED))
    }

    /// Stores `update` if it is at least as new as the state stored and
    /// that state is not terminal. Returns whether it did.
    fn apply_state(&mut self, update: &SubscriptionUpdate, stamp: Stamp) -> bool {
        if self.is_terminal() || self.stamp.is_some_and(|stored| stamp < stored) {
            return false;
        }
        self.status = Some(update.status.clone());
        self.price_lookup_key = update.price_lookup_key.clone();
        self.tier = update.tier.clone();
        self.subscription_created = update.subscription_created.or(self.subscription_created);
        self.cancel_at_period_end = update.cancel_at_period_end;
        self.stamp = Some(stamp);
        if let Some(signal) = PaymentSignal::of_status(&update.status) {
            self.apply_payment(signal, stamp.created);
        }
        true
    }

    /// Sets or clears `past_due_since` if `at` is newer than the last
    /// payment signal; at the same second, paid wins.
    fn apply_payment(&mut self, signal: PaymentSignal, at: SystemTime) -> bool {
        let newer = match (signal, self.payment_state_created) {
            (_, None) => true,
            (PaymentSignal::Paid, Some(last)) => at >= last,
            (PaymentSignal::Failed, Some(last)) => at > last,
        };
        if !newer {
            return false;
        }
        self.past_due_since = match signal {
            PaymentSignal::Paid => None,
            // Repeated failures: the first one starts the grace.
            PaymentSignal::Failed => Some(self.past_due_since.unwrap_or(at)),
        };
        self.payment_state_created = Some(at);
        true
    }

    /// Stores `period` if it ends later than the one stored. Returns whether
    /// it did.
    fn advance_period(&mut self, period: Period) -> bool {
        if self.is_terminal() || self.period.is_some_and(|stored| period.end <= stored.end) {
            return false;
        }
        self.period = Some(period);
        true
    }

    /// Whether this subscription grants its tier now. A `past_due` status
    /// with no outstanding payment recorded means a newer payment cleared it
    /// and the status change has not arrived yet.
    fn grants_tier(&self, cutoff: Option<SystemTime>) -> bool {
        let status = matches!(self.status.as_deref(), Some(ACTIVE | TRIALING | PAST_DUE));
        let in_grace = match (self.past_due_since, cutoff) {
            (Some(since), Some(cutoff)) => since > cutoff,
            _ => true,
        };
        status && in_grace && self.tier.is_some()
    }
}

/// The subscription that grants an account its tier at `now`: the newest
/// that grants one at all.
fn granting_subscription<'a>(
    subscriptions: &'a [SubscriptionRow],
    plans: &Plans,
    now: SystemTime,
) -> Option<&'a SubscriptionRow> {
    let cutoff = now.checked_sub(plans.grace);
    subscriptions
        .iter()
        .filter(|subscription| subscription.grants_tier(cutoff))
        .max_by(|a, b| {
            (a.subscription_created, &a.subscription_id)
                .cmp(&(b.subscription_created, &b.subscription_id))
        })
}

/// The tier an account's subscriptions entitle it to at `now`.
fn effective_tier<'a>(
    subscriptions: &'a [SubscriptionRow],
    plans: &'a Plans,
    now: SystemTime,
) -> &'a str {
    granting_subscription(subscriptions, plans, now)
        .and_then(|subscription| subscription.tier.as_deref())
        .unwrap_or(&plans.free_tier)
}

async fn link_customer(
    tx: &Transaction<'_>,
    account_id: Uuid,
    customer: &str,
    now: SystemTime,
) -> Result<(), ApplyError> {
    lock_account(tx, account_id).await?;
    let holder = tx
        .query_opt(
            "SELECT account_id FROM billing_customers WHERE stripe_customer_id = $1",
            &[&customer],
        )
        .await?;
    if let Some(holder) = holder {
        let linked: Uuid = holder.try_get(0)?;
        if linked == account_id {
            return Ok(());
        }
        return Err(ApplyError::CustomerOfAnotherAccount {
            customer: customer.to_owned(),
            account_id,
            linked,
        });
    }
    let previous = tx
        .query_opt(
            "SELECT stripe_customer_id FROM billing_customers WHERE account_id = $1",
            &[&account_id],
        )
        .await?;
    tx.execute(
        "INSERT INTO billing_customers (account_id, stripe_customer_id, created_at)
         VALUES ($1, $2, $3)
         ON CONFLICT (account_id) DO UPDATE
         SET stripe_customer_id = excluded.stripe_customer_id, created_at = excluded.created_at",
        &[&account_id, &customer, &now],
    )
    .await?;
    match previous {
        Some(previous) => {
            let previous: String = previous.try_get(0)?;
            tracing::warn!(%account_id, previous, customer, "account now paid for by another Stripe customer");
        }
        None => tracing::info!(%account_id, customer, "Stripe customer linked to account"),
    }
    Ok(())
}

async fn apply_subscription(
    tx: &Transaction<'_>,
    update: SubscriptionUpdate,
    stamp: Stamp,
    plans: &Plans,
    now: SystemTime,
    applied: &mut Applied,
) -> Result<(), ApplyError> {
    let (mut row, current_tier) =
        open_subscription(tx, &update.id, update.metadata_account, &update.customer).await?;
    if row.apply_state(&update, stamp) {
        if row.tier.is_none() && PaymentSignal::of_status(&update.status).is_some() {
            tracing::error!(
                subscription = update.id,
                lookup_key = update.price_lookup_key.as_deref().unwrap_or("(none)"),
                "the subscription's price is no tier's stripe_price_lookup_key: it grants no tier"
            );
        }
    } else {
        tracing::debug!(
            subscription = update.id,
            "stale or post-cancellation subscription event: state kept"
        );
    }
    if let Some(period) = update.period
        && row.advance_period(period)
    {
        applied.period_changes.push(period_change(&row, period));
    }
    save(tx, &row, now).await?;
    if let Some(change) = settle_tier(tx, row.account_id, &current_tier, plans, now).await? {
        applied.tier_changes.push(change);
    }
    Ok(())
}

async fn apply_invoice(
    tx: &Transaction<'_>,
    update: InvoiceUpdate,
    created: SystemTime,
    plans: &Plans,
    now: SystemTime,
    applied: &mut Applied,
) -> Result<(), ApplyError> {
    let (mut row, current_tier) = open_subscription(
        tx,
        &update.subscription,
        update.metadata_account,
        &update.customer,
    )
    .await?;
    row.apply_payment(update.signal, created);
    if let Some(period) = update.period
        && row.advance_period(period)
    {
        applied.period_changes.push(period_change(&row, period));
    }
    save(tx, &row, now).await?;
    if let Some(change) = settle_tier(tx, row.account_id, &current_tier, plans, now).await? {
        applied.tier_changes.push(change);
    }
    Ok(())
}

fn period_change(row: &SubscriptionRow, period: Period) -> PeriodChange {
    PeriodChange {
        account_id: row.account_id,
        subscription_id: row.subscription_id.clone(),
        start: period.start,
        end: period.end,
    }
}

/// The subscription's row, locked, with its account locked first (every
/// writer takes the account, then the row) and that account's tier; a new
/// row if the subscription is not stored yet.
///
/// A subscription stays with the account it was first applied to. A new
/// one's account is named by its `metadata.account_id`, else by its
/// customer's link; with neither it is [`ApplyError::UnknownCustomer`].
async fn open_subscription(
    tx: &Transaction<'_>,
    subscription: &str,
    metadata_account: Option<Uuid>,
    customer: &str,
) -> Result<(SubscriptionRow, String), ApplyError> {
    let stored = tx
        .query_opt(
            "SELECT account_id FROM billing_subscriptions WHERE subscription_id = $1",
            &[&subscription],
        )
        .await?;
    let linked = match (stored, metadata_account) {
        (Some(row), _) => Some(row.try_get(0)?),
        (None, Some(account_id)) => Some(account_id),
        (None, None) => tx
            .query_opt(
                "SELECT account_id FROM billing_customers WHERE stripe_customer_id = $1",
                &[&customer],
            )
            .await?
            .map(|row| row.try_get(0))
            .transpose()?,
    };
    let account_id = linked.ok_or_else(|| ApplyError::UnknownCustomer {
        customer: customer.to_owned(),
        subscription: subscription.to_owned(),
    })?;
    let mut tier = lock_account(tx, account_id).await?;
    let row = match select_row(tx, subscription).await? {
        Some(row) => row,
        None => SubscriptionRow::new(subscription, account_id, customer),
    };
    if row.account_id != account_id {
        // Stored for another account since it was looked up (its metadata
        // and its customer's link disagree): that account is the one to
        // settle.
        tier = lock_account(tx, row.account_id).await?;
    }
    Ok((row, tier))
}

async fn select_row(
    tx: &Transaction<'_>,
    subscription: &str,
) -> Result<Option<SubscriptionRow>, ApplyError> {
    let row = tx
        .query_opt(
            &format!(
                "SELECT {ROW_COLUMNS} FROM billing_subscriptions WHERE subscription_id = $1 FOR UPDATE"
            ),
            &[&subscription],
        )
        .await?;
    Ok(row.as_ref().map(SubscriptionRow::from_row).transpose()?)
}

/// Locks the account's row for the rest of the transaction and returns its
/// tier. Every change to an account's subscriptions happens under this lock,
/// so the tier computed after it sees every committed change.
async fn lock_account(tx: &Transaction<'_>, account_id: Uuid) -> Result<String, ApplyError> {
    let row = tx
        .query_opt(
            "SELECT tier FROM accounts WHERE id = $1 FOR UPDATE",
            &[&account_id],
        )
        .await?
        .ok_or(ApplyError::UnknownAccount { account_id })?;
    Ok(row.try_get(0)?)
}

async fn save(
    tx: &Transaction<'_>,
    row: &SubscriptionRow,
    now: SystemTime,
) -> Result<(), ApplyError> {
    let start = row.period.map(|period| period.start);
    let end = row.period.map(|period| period.end);
    let created = row.stamp.map(|stamp| stamp.created);
    let rank = row.stamp.map(|stamp| stamp.rank);
    tx.execute(
        &format!(
            "INSERT INTO billing_subscriptions ({ROW_COLUMNS}, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (subscription_id) DO UPDATE SET
                 status = excluded.status,
                 price_lookup_key = excluded.price_lookup_key,
                 tier = excluded.tier,
                 subscription_created = excluded.subscription_created,
                 current_period_start = excluded.current_period_start,
                 current_period_end = excluded.current_period_end,
                 cancel_at_period_end = excluded.cancel_at_period_end,
                 state_created = excluded.state_created,
                 state_rank = excluded.state_rank,
                 past_due_since = excluded.past_due_since,
                 payment_state_created = excluded.payment_state_created,
                 updated_at = excluded.updated_at"
        ),
        &[
            &row.subscription_id,
            &row.account_id,
            &row.customer,
            &row.status,
            &row.price_lookup_key,
            &row.tier,
            &row.subscription_created,
            &start,
            &end,
            &row.cancel_at_period_end,
            &created,
            &rank,
            &row.past_due_since,
            &row.payment_state_created,
            &now,
        ],
    )
    .await?;
    Ok(())
}

/// Computes the account's tier from its subscriptions and stores it if it
/// changed. The account must be locked ([`lock_account`]).
async fn settle_tier(
    tx: &Transaction<'_>,
    account_id: Uuid,
    current: &str,
    plans: &Plans,
    now: SystemTime,
) -> Result<Option<TierChange>, ApplyError> {
    let rows = tx
        .query(
            &format!("SELECT {ROW_COLUMNS} FROM billing_subscriptions WHERE account_id = $1"),
            &[&account_id],
        )
        .await?;
    let subscriptions = rows
        .iter()
        .map(SubscriptionRow::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let tier = effective_tier(&subscriptions, plans, now);
    // Which subscription grants it is kept beside the tier: its billing
    // period is the account's quota period (the gateway's key lookup).
    let granting = granting_subscription(&subscriptions, plans, now)
        .map(|subscription| subscription.subscription_id.as_str());
    tx.execute(
        "UPDATE accounts SET billing_subscription_id = $2
         WHERE id = $1 AND billing_subscription_id IS DISTINCT FROM $2",
        &[&account_id, &granting],
    )
    .await?;
    if tier == current {
        return Ok(None);
    }
    tx.execute(
        "UPDATE accounts SET tier = $2 WHERE id = $1",
        &[&account_id, &tier],
    )
    .await?;
    tracing::info!(%account_id, from = current, to = tier, "account tier changed by billing");
    Ok(Some(TierChange {
        account_id,
        from: current.to_owned(),
        to: tier.to_owned(),
    }))
}

// The parts of Stripe objects read here. No `deny_unknown_fields`: Stripe
// adds fields without a new API version.

/// An expandable field: an id, or the object when expanded.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Expandable {
    Id(String),
    Object { id: String },
}

impl Expandable {
    fn id(&self) -> &str {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }

    fn into_id(self) -> String {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }
}

#[derive(Debug, Deserialize)]
struct List<T> {
    data: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct CheckoutSessionObject {
    id: String,
    client_reference_id: Option<String>,
    customer: Option<Expandable>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionObject {
    id: String,
    customer: Expandable,
    status: String,
    created: Option<i64>,
    cancel_at_period_end: Option<bool>,
    /// Before 2025-03-31.basil.
    current_period_start: Option<i64>,
    current_period_end: Option<i64>,
    metadata: Option<HashMap<String, serde_json::Value>>,
    items: Option<List<SubscriptionItemObject>>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionItemObject {
    price: Option<PriceObject>,
    /// Since 2025-03-31.basil.
    current_period_start: Option<i64>,
    current_period_end: Option<i64>,
}

impl SubscriptionItemObject {
    fn lookup_key(&self) -> Option<&str> {
        self.price.as_ref()?.lookup_key.as_deref()
    }
}

#[derive(Debug, Deserialize)]
struct PriceObject {
    lookup_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InvoiceObject {
    id: String,
    customer: Option<Expandable>,
    /// Before 2025-03-31.basil.
    subscription: Option<Expandable>,
    subscription_details: Option<SubscriptionDetails>,
    /// Since 2025-03-31.basil.
    parent: Option<InvoiceParent>,
    lines: Option<List<InvoiceLineObject>>,
}

#[derive(Debug, Deserialize)]
struct InvoiceParent {
    subscription_details: Option<SubscriptionDetails>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionDetails {
    /// Only under `parent` (since 2025-03-31.basil).
    subscription: Option<Expandable>,
    /// The subscription's metadata when the invoice was made.
    metadata: Option<HashMap<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
struct InvoiceLineObject {
    period: Option<LinePeriod>,
    /// Before 2025-03-31.basil.
    subscription: Option<Expandable>,
    /// Since 2025-03-31.basil.
    parent: Option<InvoiceLineParent>,
}

impl InvoiceLineObject {
    fn subscription(&self) -> Option<&str> {
        self.parent
            .as_ref()
            .and_then(|parent| parent.subscription_item_details.as_ref())
            .and_then(|details| details.subscription.as_deref())
            .or(self.subscription.as_ref().map(Expandable::id))
    }
}

#[derive(Debug, Deserialize)]
struct InvoiceLineParent {
    subscription_item_details: Option<SubscriptionItemDetails>,
}

#[derive(Debug, Deserialize)]
struct SubscriptionItemDetails {
    subscription: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LinePeriod {
    start: i64,
    end: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_746_144_010;

    fn at(offset: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T.checked_add_signed(offset).unwrap())
    }

    fn plans() -> Plans {
        Plans::new(
            "free",
            [("pro_monthly", "pro"), ("studio_monthly", "studio")],
        )
        .with_grace(Duration::from_secs(100))
    }

    fn update(status: &str, tier: Option<&str>) -> SubscriptionUpdate {
        SubscriptionUpdate {
            id: "sub_1".to_owned(),
            customer: "cus_1".to_owned(),
            metadata_account: None,
            rank: 1,
            status: status.to_owned(),
            price_lookup_key: tier.map(|tier| format!("{tier}_monthly")),
            tier: tier.map(str::to_owned),
            subscription_created: Some(at(0)),
            period: None,
            cancel_at_period_end: false,
        }
    }

    fn row() -> SubscriptionRow {
        SubscriptionRow::new("sub_1", Uuid::nil(), "cus_1")
    }

    fn stamp(offset: i64, rank: i16) -> Stamp {
        Stamp {
            created: at(offset),
            rank,
        }
    }

    #[test]
    fn an_older_state_does_not_replace_a_newer_one() {
        let mut row = row();
        assert!(row.apply_state(&update(ACTIVE, Some("studio")), stamp(10, 1)));
        assert!(!row.apply_state(&update("incomplete", Some("pro")), stamp(5, 0)));
        assert_eq!(row.status.as_deref(), Some(ACTIVE));
        assert_eq!(row.tier.as_deref(), Some("studio"));
    }

    /// Created `incomplete` and updated `active` by the first payment in the
    /// same second, delivered the other way round.
    #[test]
    fn within_one_second_updated_beats_created() {
        let mut row = row();
        assert!(row.apply_state(&update(ACTIVE, Some("pro")), stamp(0, 1)));
        assert!(!row.apply_state(&update("incomplete", Some("pro")), stamp(0, 0)));
        assert_eq!(row.status.as_deref(), Some(ACTIVE));
    }

    #[test]
    fn a_canceled_subscription_stays_canceled() {
        let mut row = row();
        assert!(row.apply_state(&update(CANCELED, Some("pro")), stamp(10, 2)));
        // Not even a newer event revives it: Stripe never does.
        assert!(!row.apply_state(&update(ACTIVE, Some("pro")), stamp(20, 1)));
        assert!(!row.advance_period(Period {
            start: at(20),
            end: at(30)
        }));
        assert_eq!(row.status.as_deref(), Some(CANCELED));
        assert!(!row.grants_tier(None));
    }

    #[test]
    fn at_the_same_second_paid_beats_failed_in_either_order() {
        let mut failed_first = row();
        failed_first.apply_payment(PaymentSignal::Failed, at(0));
        failed_first.apply_payment(PaymentSignal::Paid, at(0));
        let mut paid_first = row();
        paid_first.apply_payment(PaymentSignal::Paid, at(0));
        assert!(!paid_first.apply_payment(PaymentSignal::Failed, at(0)));
        assert_eq!(failed_first.past_due_since, None);
        assert_eq!(paid_first.past_due_since, None);
    }

    #[test]
    fn the_first_of_repeated_failures_starts_the_grace() {
        let mut row = row();
        row.apply_payment(PaymentSignal::Failed, at(0));
        row.apply_payment(PaymentSignal::Failed, at(50));
        assert_eq!(row.past_due_since, Some(at(0)));
        // A failure older than the last payment is stale.
        row.apply_payment(PaymentSignal::Paid, at(60));
        assert!(!row.apply_payment(PaymentSignal::Failed, at(55)));
        assert_eq!(row.past_due_since, None);
    }

    #[test]
    fn a_stale_active_status_does_not_clear_a_newer_failure() {
        let mut row = row();
        row.apply_state(&update(ACTIVE, Some("pro")), stamp(0, 0));
        row.apply_payment(PaymentSignal::Failed, at(10));
        // An `updated` from before the failure, delivered after it.
        row.apply_state(&update(ACTIVE, Some("pro")), stamp(5, 1));
        assert_eq!(row.past_due_since, Some(at(10)));
    }

    #[test]
    fn periods_only_move_forward() {
        let mut row = row();
        let first = Period {
            start: at(0),
            end: at(100),
        };
        let second = Period {
            start: at(100),
            end: at(200),
        };
        assert!(row.advance_period(second));
        assert!(!row.advance_period(first));
        assert!(!row.advance_period(second));
        assert_eq!(row.period, Some(second));
    }

    #[test]
    fn the_tier_is_the_newest_paying_subscriptions_within_grace() {
        let plans = plans();
        let mut old = row();
        old.apply_state(&update(ACTIVE, Some("pro")), stamp(0, 0));
        let mut new = SubscriptionRow::new("sub_2", Uuid::nil(), "cus_1");
        let mut studio = update(PAST_DUE, Some("studio"));
        studio.subscription_created = Some(at(10));
        new.apply_state(&studio, stamp(10, 1));
        let rows = [old.clone(), new];
        // Within grace (100 s from the failure at +10) the newer one decides.
        assert_eq!(effective_tier(&rows, &plans, at(109)), "studio");
        // After it, the older, paid-up one.
        assert_eq!(effective_tier(&rows, &plans, at(110)), "pro");
        assert_eq!(effective_tier(&[], &plans, at(0)), "free");
        let mut unknown_price = old;
        unknown_price.tier = None;
        assert_eq!(effective_tier(&[unknown_price], &plans, at(0)), "free");
    }

    #[test]
    fn statuses_that_grant_no_tier() {
        for status in [
            "incomplete",
            INCOMPLETE_EXPIRED,
            UNPAID,
            CANCELED,
            "paused",
            "new",
        ] {
            let mut row = row();
            row.apply_state(&update(status, Some("pro")), stamp(0, 1));
            assert!(!row.grants_tier(None), "{status}");
        }
    }

    #[test]
    fn reads_the_period_from_the_item_or_the_subscription() {
        let plans = plans();
        let basil: SubscriptionObject = serde_json::from_value(serde_json::json!({
            "id": "sub_1", "customer": "cus_1", "status": "active",
            "items": {"data": [
                {"price": {"lookup_key": "pro_overage"}, "current_period_start": 1, "current_period_end": 2},
                {"price": {"lookup_key": "pro_monthly"}, "current_period_start": 10, "current_period_end": 20}
            ]}
        }))
        .unwrap();
        let update = SubscriptionUpdate::from_object(basil, 1, false, &plans);
        assert_eq!(update.tier.as_deref(), Some("pro"));
        assert_eq!(update.period, Period::from_unix(Some(10), Some(20)));
        let acacia: SubscriptionObject = serde_json::from_value(serde_json::json!({
            "id": "sub_1", "customer": {"id": "cus_1", "object": "customer"}, "status": "active",
            "current_period_start": 30, "current_period_end": 40,
            "metadata": {"account_id": "0193f0b4-7c1e-7a2b-9d3e-4f5a6b7c8d9e"},
            "items": {"data": [{"price": {"lookup_key": null}}]}
        }))
        .unwrap();
        let update = SubscriptionUpdate::from_object(acacia, 1, false, &plans);
        assert_eq!(update.customer, "cus_1");
        assert_eq!(update.tier, None);
        assert_eq!(update.period, Period::from_unix(Some(30), Some(40)));
        assert!(update.metadata_account.is_some());
    }

    #[test]
    fn only_database_and_unlinked_customer_errors_are_retryable() {
        assert!(
            ApplyError::UnknownCustomer {
                customer: "cus_1".into(),
                subscription: "sub_1".into()
            }
            .is_retryable()
        );
        assert!(
            !ApplyError::UnknownAccount {
                account_id: Uuid::nil()
            }
            .is_retryable()
        );
        assert!(
            !ApplyError::Malformed {
                event_type: "x".into(),
                reason: "y".into()
            }
            .is_retryable()
        );
    }
}
