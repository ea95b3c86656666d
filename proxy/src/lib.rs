//! Tollgate, the gateway: an OpenAI-compatible reverse proxy on Pingora with
//! API keys, in front of self-hosted GPU inference backends.
//!
//! - [`config`]: the TOML config, env overrides, validation; a folder with one
//!   file per TOML section.
//! - [`gateway`]: the `ProxyHttp` request path phase by phase (see
//!   docs/architecture.md); [`gateway::models`] resolves each model's route
//!   from config once; [`gateway::routes`] answers the routes that need no
//!   backend; [`gateway::upload`] reads multipart uploads as they stream.
//! - [`admission`]: rate limits, quotas and reservations, the priority queue.
//! - [`metering`]: metering on the request path, and the usage writer and
//!   upkeep as background services.
//! - [`billing`]: the Stripe exporter, webhooks and past-due sweep,
//!   Checkout/Portal sessions, `tollgate billing` commands.
//! - [`keys`]: API keys: hashing, Postgres store, cache, revocation fan-out.
//! - [`jobs`]: durable async jobs in Postgres (claims under a lease).
//! - [`fleet`]: providers from the config, the controller as a service, its
//!   transitions logged to Postgres.
//! - [`admin`]: the admin API and the metrics endpoint.
//! - [`summary`]: `GET /api/metrics`, the admin listener's JSON summary.
//! - [`usage_api`]: usage reports for `/v1/usage`, the admin API and the CLI.
//! - [`db`]: the Postgres pool (TLS when asked) and migrations (`sql/`).
//! - [`readiness`]: `/readyz`'s Postgres check, kept fresh in the background.
//! - [`store_errors`]: failed Postgres and Redis calls, counted by operation.
//! - [`error`]: the one OpenAI-shaped error type.
//! - [`server`]: assembling and running the Pingora server, draining on SIGTERM.
//! - [`cli`]: the command line; `main.rs` dispatches it.
//!
//! The fleet simulator, `tollgate-simulate` (`simulate/`), is a crate of its
//! own: it runs [`admission`] and [`config`] from here with the fleet
//! controller on tokio's paused clock, and its plotting and statistics are
//! no dependencies of the server.

pub mod admin;
pub mod admission;
pub mod billing;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod fleet;
pub mod gateway;
pub mod jobs;
pub mod keys;
pub mod metering;
pub mod readiness;
pub mod server;
pub mod store_errors;
pub mod summary;
pub mod usage_api;
