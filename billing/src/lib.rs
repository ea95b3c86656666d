//! Stripe billing for Tollgate. Nothing here is on the request path.
//!
//! - [`export`]: usage sent to Stripe as meter events, exactly once in
//!   effect.
//! - [`stripe_api`]: the Stripe API client those calls go through.
//! - [`webhook`]: verifying and reading Stripe's webhook deliveries.

pub mod export;
pub mod stripe_api;
pub mod webhook;
