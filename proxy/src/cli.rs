//! The `tollgate` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tollgate_billing::reconcile::Day;

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
    /// Fleet economics: replay a request trace (or a synthetic month) through
    /// the real admission queue and fleet controller in simulated time, with
    /// simulated GPU instances priced from the config's backends. Reports
    /// waits and shed share per tier, GPU-hours by state and the cost against
    /// an always-hot fleet sized for the peak, and draws one day as an SVG.
    /// Needs no database or backend: nothing real is started.
    Simulate(SimulateArgs),
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

/// `tollgate simulate`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("workload").required(true).args(["trace", "synthetic"]))]
pub struct SimulateArgs {
    /// A request trace: CSV with the header
    /// `at_secs,tier,prompt_tokens,completion_tokens`, one request a line in
    /// arrival order (at_secs: seconds since the start, fractions allowed;
    /// tier: a [[tiers]] name). Lines starting with # are skipped. Example:
    /// load-tests/traces/example.csv.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Generate the workload instead: `diurnal` is Poisson arrivals whose rate
    /// follows a raised cosine over the day (peak mid-afternoon UTC), plus
    /// random bursts.
    #[arg(long, value_enum, value_name = "PATTERN")]
    pub synthetic: Option<Synthetic>,
    /// Length of the synthetic workload.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub days: u32,
    /// Seeds the workload, the simulated cloud's resume failures and routing.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of the pool's configured slots busy at the daily peak (the peak
    /// rate is derived from it and the mean service time).
    #[arg(long, default_value_t = 0.8, value_name = "SHARE")]
    pub peak_load: f64,
    /// Peak rate over the night's rate.
    #[arg(long, default_value_t = 20.0, value_name = "RATIO")]
    pub peak_to_trough: f64,
    /// Hour of the day (UTC) the traffic peaks at.
    #[arg(long, default_value_t = 15.0, value_name = "HOUR")]
    pub peak_hour: f64,
    /// Mean number of bursts a day (10-20 minutes at 2-3x the rate of the moment).
    #[arg(long, default_value_t = 3.0, value_name = "N")]
    pub bursts_per_day: f64,
    /// Tier shares of the synthetic requests, as tier=weight pairs.
    #[arg(
        long,
        value_name = "TIER=WEIGHT,...",
        value_delimiter = ',',
        default_value = "free=60,premium=30,pro=10"
    )]
    pub mix: Vec<String>,
    /// Time to first token of every request.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = duration)]
    pub ttft: Duration,
    /// Tokens per second of one stream: a request holds its slot for
    /// ttft + completion_tokens / this.
    #[arg(long, value_name = "N", default_value_t = 30.0)]
    pub tokens_per_sec: f64,
    /// Renting a cold instance until it serves (COLD -> HOT).
    #[arg(long, value_name = "DURATION", default_value = "45m", value_parser = duration)]
    pub cold_start: Duration,
    /// Resuming a warm (stopped) instance until it serves.
    #[arg(long, value_name = "DURATION", default_value = "3m", value_parser = duration)]
    pub resume: Duration,
    /// Share of resumes that fail because the host's GPU was rented
    /// meanwhile; the controller then rents a new instance.
    #[arg(long, value_name = "SHARE", default_value_t = 0.1)]
    pub resume_failure_rate: f64,
    /// The model requested; the first configured one by default. Only its
    /// pool's backends take part.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Where to write the SVG chart of one simulated day.
    #[arg(long, value_name = "FILE", default_value = "simulate.svg")]
    pub chart: PathBuf,
    /// The day to chart, from 1; the busiest by default.
    #[arg(long, value_name = "N")]
    pub chart_day: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Skip the second run that measures the always-hot baseline's waits
    /// (its cost is computed either way).
    #[arg(long)]
    pub no_baseline_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Synthetic {
    Diurnal,
}

fn duration(value: &str) -> Result<Duration, String> {
    crate::config::parse_duration(value)
        .ok_or_else(|| format!("`{value}` is not a duration like \"45m\", \"3m\" or \"500ms\""))
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
