//! The `tollgate` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Tollgate: an OpenAI-compatible gateway and billing sidecar for self-hosted
/// GPU inference. Every subcommand reads the same config file (--config);
/// environment variables (DATABASE_URL, REDIS_URL, TOLLGATE_ADMIN_TOKEN,
/// WORKERS, SQL_MAX_OPEN_CONNS, SQL_MAX_IDLE_CONNS, SQL_MAX_LIFETIME,
/// SQL_MAX_IDLE_TIME, LOG_LEVEL) override it.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, verbatim_doc_comment)]
pub struct Cli {
    /// Config file (TOML); see config/tollgate.example.toml.
    #[arg(long, global = true, env = "TOLLGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: public API, admin API and metrics listeners.
    /// SIGTERM drains requests in flight (up to server.drain_timeout); SIGINT exits at once.
    Serve,
    /// Apply the database migrations in sql/ (idempotent).
    Migrate,
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Usage reports and retention of the usage log.
    #[command(subcommand)]
    Usage(UsageCommand),
    /// The backends of the running gateway.
    #[command(subcommand)]
    Fleet(FleetCommand),
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// One line per backend: routable or not, its breaker, requests in flight
    /// and slots, as the running gateway sees them (GET /admin/backends on
    /// server.admin_listen, with the admin token).
    Status,
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Print usage totals as JSON (the same as GET /admin/usage), from the
    /// day and minute rollups. Times are unix seconds, a date (2026-11-01) or
    /// RFC 3339, UTC.
    Report {
        /// Only this account; every account by default.
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
        /// Start of the period; the first of the current UTC month by default.
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// End of the period (exclusive); now by default.
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Break totals down by model, day or key.
        #[arg(long, value_name = "GROUP", default_value = "total")]
        group_by: String,
    },
    /// Delete usage events created before a time, at least a day ago: whole
    /// month partitions are dropped, the month holding the cutoff is deleted
    /// from in batches. Rollups are kept (metering.rollup_retention).
    Purge {
        #[arg(long, value_name = "TIME")]
        before: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key (and its account if new); the key is printed once, alone
    /// on the last line of stdout, and never stored.
    Create(CreateKey),
    /// List keys (never their secrets).
    List {
        /// Only this account's keys.
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
    },
    /// Revoke a key by its full secret, its id, or the prefix `keys list` shows.
    /// Every instance refuses it within seconds (at once with Redis).
    Revoke {
        #[arg(value_name = "KEY")]
        key: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateKey {
    /// Account name; created on --tier if it does not exist.
    #[arg(long, value_name = "NAME")]
    pub account: String,
    /// Tier of the account: one of the [[tiers]] names in the config.
    #[arg(long, value_name = "TIER")]
    pub tier: String,
    /// A label for the key.
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// Lifetime, e.g. 30d or 12h; no expiry by default.
    #[arg(long, value_name = "DURATION")]
    pub expires: Option<String>,
    /// Models the key may use, comma-separated; all by default.
    #[arg(long, value_name = "a,b", value_delimiter = ',')]
    pub models: Option<Vec<String>>,
}
