//! Stripe billing for Tollgate. Nothing here is on the request path.
//!
//! - [`catalog`]: the tiers' products, prices and meter, created or updated
//!   in Stripe (`tollgate billing sync-catalog`).
//! - [`checkout`]: Checkout and Customer Portal sessions for an account.
//! - [`export`]: usage sent to Stripe as meter events, exactly once in
//!   effect.
//! - [`reconcile`]: the usage log against what was exported, per customer
//!   and day.
//! - [`stripe_api`]: the Stripe API client those calls go through.
//! - [`webhook`]: verifying and reading Stripe's webhook deliveries.

pub mod catalog;
pub mod checkout;
pub mod export;
pub mod reconcile;
pub mod stripe_api;
pub mod webhook;

/// The Stripe API client every call here takes ([`stripe_api::client`]).
pub use stripe::Client as StripeClient;
