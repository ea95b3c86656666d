//! Tollgate, the gateway: an OpenAI-compatible reverse proxy on Pingora with
//! API keys, in front of self-hosted GPU inference backends.
//!
//! - [`config`]: the TOML config, env overrides, validation; a folder with one
//!   file per TOML section.
//! - [`gateway`]: the `ProxyHttp` request path (auth, body, routing, errors).
//! - [`keys`]: API keys: hashing, Postgres store, cache, revocation fan-out.
//! - [`admin`]: the admin API and the metrics endpoint.
//! - [`summary`]: `GET /api/metrics`, the admin listener's JSON summary.
//! - [`db`]: the Postgres pool and migrations (`sql/`).
//! - [`readiness`]: `/readyz`'s Postgres check, kept fresh in the background.
//! - [`store_errors`]: failed Postgres and Redis calls, counted by operation.
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
pub mod keys;
pub mod metering;
pub mod readiness;
pub mod server;
pub mod store_errors;
pub mod summary;
pub mod usage_api;
