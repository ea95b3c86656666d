//! The `tollgate` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tollgate_billing::reconcile::Day;

/// Tollgate: an OpenAI-compatible gateway and billing sidecar for self-hosted
/// GPU inference. Every subcommand reads the same config file (--config);
/// environment variables (DATABASE_URL, REDIS_URL, TOLLGATE_ADMIN_TOKEN,
/// WORKERS, SQL_MAX_OPEN_CONNS, SQL_MAX_IDLE_CONNS, SQL_MAX_LIFETIME,
/// SQL_MAX_IDLE_TIME) override it. LOG_LEVEL (tracing's filter syntax) and
/// LOG_FORMAT (text or json: one JSON object per line) set the logs on stderr.
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
    Migrate(MigrateArgs),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Usage reports and retention of the usage log.
    #[command(subcommand)]
    Usage(UsageCommand),
    /// The backends of the running gateway.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Stripe billing (needs STRIPE_SECRET_KEY).
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Internal: reads audio files' lengths from stdin, in a process of
    /// its own with a memory limit (see gateway/audio_probe.rs).
    #[command(hide = true)]
    ProbeAudio,
}

/// `tollgate migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Also let the read-only role tollgate_grafana, which the migrations
    /// create for Grafana's dashboards, log in with this password (only its
    /// SCRAM verifier is sent). Without it, migrate leaves the role's login
    /// alone (a new role cannot log in). Set it in the environment rather
    /// than on the command line, where `ps` shows it.
    #[arg(
        long,
        env = "GRAFANA_DB_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub grafana_password: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// One line per backend: its provider, lifecycle state, whether it is
    /// routable, its breaker, requests in flight, slots and cost so far, as the
    /// running gateway sees them (GET /admin/backends on server.admin_listen,
    /// with the admin token).
    Status,
    /// Take a hot backend out of rotation; it stays rented (and the fleet
    /// controller leaves it alone) until `wake`.
    Drain { name: String },
    /// Drain a backend, then stop it (warm) once its requests are done.
    Sleep { name: String },
    /// Put a drained backend back, resume a warm one, or rent a cold one.
    Wake { name: String },
}

#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Send every closed bucket's usage to Stripe now, as meter events, and
    /// exit (`serve` does the same every billing.export_interval). Safe to run
    /// beside running gateways: nothing is sent twice.
    Export,
    /// Create or update the tiers' Stripe products, prices and the Billing
    /// Meter, found by lookup key and event name: running it again changes
    /// nothing. Prints what it did.
    SyncCatalog,
    /// Compare, per customer and UTC day, the units in the usage log with the
    /// units exported to Stripe and with Stripe's own meter event summaries
    /// (when Stripe answers). Prints the differences, and the exports that
    /// expired unsent; exits non-zero when there is any.
    Reconcile {
        /// First day, YYYY-MM-DD (UTC).
        #[arg(long, value_name = "DAY")]
        from: Day,
        /// Last day, included.
        #[arg(long, value_name = "DAY")]
        to: Day,
    },
    /// Print a Stripe Checkout URL subscribing an account to a paid tier.
    /// The tier changes only when Stripe's webhooks confirm the payment.
    Checkout {
        #[arg(long, value_name = "NAME")]
        account: String,
        #[arg(long, value_name = "TIER")]
        tier: String,
        /// Where Checkout sends the customer after paying; [billing] success_url by default.
        #[arg(long, value_name = "URL")]
        success_url: Option<String>,
        /// Where Checkout sends the customer who gives up; [billing] cancel_url by default.
        #[arg(long, value_name = "URL")]
        cancel_url: Option<String>,
    },
    /// Print a Stripe Customer Portal URL for an account that has subscribed.
    Portal {
        #[arg(long, value_name = "NAME")]
        account: String,
        /// The portal's return link; [billing] portal_return_url by default.
        #[arg(long, value_name = "URL")]
        return_url: Option<String>,
    },
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
