//! Configuration in two stages: the TOML file as written ([`RawConfig`], unknown
//! keys rejected), environment overrides on top, then [`Config::validate`] into
//! typed values with no "filled in later" options. Every error names the key
//! to change. `config/tollgate.example.toml` documents every key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tollgate_backends::fleet::controller::ControllerTiming;
use tollgate_backends::fleet::policy::FleetPolicy;
use tollgate_backends::fleet::providers::HourlyCost;
use tollgate_backends::fleet::providers::runpod::RunPodConfig;
use tollgate_backends::health::{DEFAULT_HEALTH_PATH, ProbeConfig};
pub use tollgate_backends::protocol::Protocol;
use tollgate_metering::tokens::Encoding;
use tollgate_metering::writer::WriterConfig;

/// A secret (connection string, token, credential): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A configuration problem, naming the key and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------------- raw (as written)

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    redis: RawRedis,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default)]
    metering: RawMetering,
    #[serde(default)]
    admission: RawAdmission,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    fleet: RawFleet,
    #[serde(default)]
    billing: RawBilling,
    #[serde(default)]
    tiers: Vec<RawTier>,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    metrics_listen: Option<String>,
    max_body_bytes: Option<usize>,
    workers: Option<usize>,
    drain_timeout: Option<String>,
    connect_timeout: Option<String>,
    read_timeout: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    max_open_conns: Option<usize>,
    max_idle_conns: Option<usize>,
    max_lifetime: Option<String>,
    max_idle_time: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    key_prefix: Option<String>,
    timeout: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    cache_ttl: Option<String>,
    negative_cache_ttl: Option<String>,
    cache_capacity: Option<usize>,
    stale_while_unavailable: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetering {
    count_tokens: Option<bool>,
    default_encoding: Option<String>,
    #[serde(default)]
    encodings: BTreeMap<String, String>,
    #[serde(default)]
    tokens_per_unit: BTreeMap<String, u64>,
    image_tokens: Option<usize>,
    request_stream_usage: Option<bool>,
    usage_mismatch_tolerance: Option<f64>,
    blocking_count_bytes: Option<usize>,
    spool_dir: Option<String>,
    channel_capacity: Option<usize>,
    batch_size: Option<usize>,
    flush_interval: Option<String>,
    write_timeout: Option<String>,
    journal_sync_interval: Option<String>,
    rollup_retention: Option<String>,
    minute_rollup_retention: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmission {
    default_max_tokens: Option<u64>,
    aging: Option<String>,
    reservation_ttl: Option<String>,
    reconcile_interval: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    policy: Option<String>,
    session_header: Option<String>,
    breaker_failures: Option<u32>,
    breaker_open: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<String>,
    timeout: Option<String>,
    healthy_after: Option<u32>,
    unhealthy_after: Option<u32>,
    grace: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    meter_event_name: Option<String>,
    bucket_secs: Option<u64>,
    grace_days: Option<f64>,
    export_interval: Option<String>,
    success_url: Option<String>,
    cancel_url: Option<String>,
    portal_return_url: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    min_hot: Option<u32>,
    max_hot: Option<u32>,
    idle_stop_secs: Option<u64>,
    warm_release_secs: Option<u64>,
    resume_queue_depth: Option<usize>,
    create_queue_depth: Option<usize>,
    scale_in_queue_depth: Option<usize>,
    scale_in_after_secs: Option<u64>,
    wake_standby_wait_secs: Option<BTreeMap<String, u64>>,
    rent_overflow_wait_secs: Option<BTreeMap<String, u64>>,
    failed_retry_secs: Option<u64>,
    start_timeout_secs: Option<u64>,
    interval: Option<String>,
    drain_timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    name: String,
    priority: Option<i64>,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    key_requests_per_minute: Option<u64>,
    key_tokens_per_minute: Option<u64>,
    max_concurrent: Option<u64>,
    max_queue_wait_secs: Option<f64>,
    max_expected_wait_secs: Option<f64>,
    included_units: Option<u64>,
    daily_cap: Option<u64>,
    hard_cap: Option<bool>,
    overage_price: Option<f64>,
    monthly_price: Option<f64>,
    on_redis_down: Option<String>,
    stripe_price_lookup_key: Option<String>,
    stripe_overage_lookup_key: Option<String>,
    tokens_per_unit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: String,
    url: Option<String>,
    #[serde(default = "default_protocol")]
    protocol: String,
    models: Vec<String>,
    max_concurrency: Option<u32>,
    pool: Option<String>,
    credential: Option<String>,
    health_path: Option<String>,
    provider: Option<String>,
    command: Option<Vec<String>>,
    hourly_cost: Option<f64>,
    stopped_hourly_cost: Option<f64>,
    runpod: Option<toml::Value>,
}

fn default_protocol() -> String {
    "openai".to_owned()
}

// ---------------------------------------------------------------- validated

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    /// Absent: a single instance, with in-process state only.
    pub redis_url: Option<Secret>,
    pub redis: RedisConfig,
    /// Absent: the admin API refuses every request.
    pub admin_token: Option<Secret>,
    pub keys: KeyCacheConfig,
    pub metering: MeteringConfig,
    pub admission: AdmissionConfig,
    pub routing: RoutingConfig,
    /// `[health]`: active probes of every plain-http backend.
    pub health: ProbeConfig,
    pub fleet: FleetConfig,
    pub billing: BillingConfig,
    /// In config order.
    pub tiers: Vec<TierConfig>,
    pub backends: Vec<BackendConfig>,
}

/// How Tollgate uses Redis when `redis_url` is set.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Prefix of every key Tollgate writes (several deployments can share one Redis).
    pub key_prefix: String,
    /// Bound on one limiter call; past it the tier's `on_redis_down` applies.
    pub timeout: Duration,
}

/// `[admission]`: what the tiers share.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    /// Token estimate for the completion when a request sets no `max_tokens`;
    /// also sent upstream as `max_tokens` for hard-capped tiers, so the
    /// reservation bounds what the backend may generate.
    pub default_max_tokens: u64,
    /// A queued request gains one tier rank per `aging` waited (`None`: strict priority).
    pub aging: Option<Duration>,
    /// How long a reservation holds when it is never settled (its instance died).
    pub reservation_ttl: Duration,
    /// How often period counters are raised to the usage log's totals.
    pub reconcile_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Pingora worker threads for the public listener.
    pub workers: usize,
    /// How long in-flight requests may run on after SIGTERM.
    pub drain_timeout: Duration,
    pub timeouts: UpstreamTimeouts,
}

/// Upstream timeouts; each expiry answers 504 (or ends a stream with an error event).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// The longest silence allowed from a backend: waiting for the first byte
    /// of its answer, and between two chunks of a stream. (Pingora has one
    /// per-read timer, so the two cannot differ.)
    pub read: Duration,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: Secret,
    pub max_open_conns: usize,
    pub max_idle_conns: usize,
    pub max_lifetime: Duration,
    pub max_idle_time: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct KeyCacheConfig {
    /// How long a verified key is trusted without asking Postgres: the bound
    /// on how late a revocation takes effect when Redis is not configured.
    pub ttl: Duration,
    /// How long an unknown key is remembered as unknown.
    pub negative_ttl: Duration,
    pub capacity: usize,
    /// While Postgres cannot be reached, a key it verified within this long
    /// keeps authenticating (0: none does; every lookup then gets 503).
    pub stale_while_unavailable: Duration,
}

/// `[metering]`: token counting and the usage writer.
#[derive(Debug, Clone)]
pub struct MeteringConfig {
    /// Count tokens locally (env `COUNT_TOKENS`); off: trust backends' usage only.
    pub count_tokens: bool,
    /// Encoding for models neither in `encodings` nor known to tiktoken.
    pub default_encoding: Encoding,
    /// Per-model encodings (self-hosted models whose names tiktoken does not know).
    pub encodings: HashMap<String, Encoding>,
    /// Per-model unit size in tokens, ahead of the tier's `tokens_per_unit`.
    pub tokens_per_unit: HashMap<String, u64>,
    /// Prompt tokens charged per image part.
    pub image_tokens: usize,
    /// Ask streaming backends for a final usage chunk (`stream_options.include_usage`).
    pub request_stream_usage: bool,
    /// Relative difference between the backend's and our prompt count beyond
    /// which a mismatch is logged and counted.
    pub usage_mismatch_tolerance: f64,
    /// Inputs longer than this are counted on the blocking pool.
    pub blocking_count_bytes: usize,
    pub spool_dir: PathBuf,
    pub writer: WriterConfig,
    /// How long day rollups are kept.
    pub rollup_retention: Duration,
    /// How long minute rollups are kept (minute precision at a period's edges).
    pub minute_rollup_retention: Duration,
}

/// `[routing]`: how a backend is chosen among those serving a model.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub policy: RoutingPolicy,
    /// The request header whose value keeps a session on one backend
    /// (`session_affinity` only).
    pub session_header: String,
    /// Consecutive failures (5xx, resets, timeouts) that open a backend's
    /// circuit breaker; a refused connection opens it at once.
    pub breaker_failures: u32,
    /// How long an open breaker passes the backend over before one probe.
    pub breaker_open: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingPolicy {
    LeastOutstanding,
    RoundRobin,
    SessionAffinity,
}

/// A tier: its place in the queue, its limits and its quota. `None` is unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    pub name: String,
    /// Higher is served first.
    pub priority: i64,
    /// Per account.
    pub requests_per_minute: Option<u64>,
    /// Per account: prompt tokens plus `max_tokens`, corrected after the answer.
    pub tokens_per_minute: Option<u64>,
    pub key_requests_per_minute: Option<u64>,
    pub key_tokens_per_minute: Option<u64>,
    /// Requests in progress (queued or forwarded) per account.
    pub max_concurrent: Option<u64>,
    /// The longest a request waits in the queue for a GPU slot.
    pub max_queue_wait: Duration,
    /// A request whose expected wait is longer is refused at once ("server busy").
    pub max_expected_wait: Duration,
    /// Units included per billing period (the subscription's, else the UTC month).
    pub included_units: Option<u64>,
    /// Units per UTC day, always a hard limit.
    pub daily_cap: Option<u64>,
    /// Refuse requests once `included_units` are spent; otherwise bill overage.
    pub hard_cap: bool,
    /// USD per unit past `included_units` (billing reads it).
    pub overage_price: Option<f64>,
    /// USD per month (0 for a free tier).
    pub monthly_price: f64,
    pub on_redis_down: RedisDownPolicy,
    /// Lookup key of the tier's flat monthly Stripe price.
    pub stripe_price_lookup_key: Option<String>,
    /// Lookup key of its metered overage price.
    pub stripe_overage_lookup_key: Option<String>,
    /// Tokens (prompt plus completion) in one unit; each request's units are
    /// rounded up. 1 unless set (here, or per model in `[metering]`).
    pub tokens_per_unit: u64,
}

impl TierConfig {
    /// Free tiers (no price at all) fail closed when Redis is down.
    pub fn is_paid(&self) -> bool {
        self.monthly_price > 0.0 || self.overage_price.is_some_and(|p| p > 0.0)
    }
}

/// What admission does for a tier while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisDownPolicy {
    /// Admit, enforcing the limits in this process alone (per instance).
    Local,
    /// Refuse with 503 until Redis answers again.
    Reject,
}

/// Where a backend's instance comes from.
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    /// An always-on server at `url`: no lifecycle.
    Static,
    /// A local process Tollgate starts and stops; argv with `{port}` for
    /// the port Tollgate picks at start-up.
    Process { command: Vec<String> },
    /// A RunPod pod, rented, stopped and resumed through RunPod's API.
    RunPod(Box<RunPodConfig>),
}

/// `[billing]` and the Stripe environment.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// The Billing Meter's `event_name` usage is sent under.
    pub meter_event_name: String,
    /// Usage is exported per account and bucket of this length.
    pub bucket: Duration,
    /// A subscription past due this long is downgraded to the free tier.
    pub grace: Duration,
    /// How often the exporter runs.
    pub export_interval: Duration,
    /// Where Checkout sends the customer after paying, and after giving
    /// up; a checkout request may name its own.
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    /// Where the Customer Portal's "return" link leads.
    pub portal_return_url: Option<String>,
    /// `None` without `STRIPE_SECRET_KEY`: billing is off.
    pub stripe: Option<StripeConfig>,
}

/// How Stripe is reached (environment only: secrets stay out of files).
#[derive(Debug, Clone)]
pub struct StripeConfig {
    /// `STRIPE_SECRET_KEY`.
    pub secret_key: Secret,
    /// `STRIPE_WEBHOOK_SECRET`: one secret, or several comma-separated while
    /// one is rotated out.
    pub webhook_secrets: Option<Secret>,
    /// `STRIPE_API_BASE`: scheme, host and port of another Stripe (a fake in
    /// tests); Stripe's own when unset.
    pub api_base: Option<String>,
}

/// `[fleet]`: the lifecycle controller's thresholds and timing.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub policy: FleetPolicy,
    pub timing: ControllerTiming,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub name: String,
    /// `host:port` to connect to.
    pub address: String,
    /// Host header / TLS server name.
    pub host: String,
    pub tls: bool,
    pub protocol: Protocol,
    /// `GET` path of an OpenAI-style backend's health check.
    pub health_path: String,
    pub provider: ProviderConfig,
    /// Hourly prices, running and stopped, for cost accounting.
    pub cost: HourlyCost,
    pub models: Vec<String>,
    pub max_concurrency: u32,
    /// The admission queue this backend's slots belong to: backends serving
    /// the same models share one.
    pub pool: String,
    /// Sent upstream as `Authorization: Bearer …` in place of the client's key.
    pub credential: Option<Secret>,
}

/// Defaults sized for a free-tier box (1 vCPU, 512 MB).
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const ADMIN_LISTEN: &str = "127.0.0.1:8081";
    pub const METRICS_LISTEN: &str = "127.0.0.1:9091";
    pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
    pub const WORKERS: usize = 1;
    pub const DRAIN_TIMEOUT: &str = "30s";
    pub const CONNECT_TIMEOUT: &str = "2s";
    /// Long enough for a loaded model's prefill of a large prompt.
    pub const READ_TIMEOUT: &str = "120s";
    pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tollgate";
    pub const MAX_OPEN_CONNS: usize = 20;
    pub const MAX_IDLE_CONNS: usize = 10;
    pub const MAX_LIFETIME: &str = "60s";
    pub const MAX_IDLE_TIME: &str = "30s";
    /// Revocation must take effect within 5 s on every instance.
    pub const KEY_CACHE_TTL: &str = "5s";
    pub const NEGATIVE_CACHE_TTL: &str = "2s";
    /// Long enough to ride out a Postgres restart or failover; short enough
    /// that a key deleted in an outage with Redis down too stops soon after.
    pub const STALE_WHILE_UNAVAILABLE: &str = "10m";
    pub const KEY_CACHE_CAPACITY: usize = 100_000;
    pub const BACKEND_MAX_CONCURRENCY: u32 = 64;
    /// The Billing Meter's event name.
    pub const METER_EVENT_NAME: &str = "tollgate_units";
    /// Usage is exported per hour.
    pub const BILLING_BUCKET_SECS: u64 = 3600;
    /// A past-due subscription keeps its tier this many days.
    pub const BILLING_GRACE_DAYS: f64 = 3.0;
    /// How often the exporter looks for closed buckets.
    pub const BILLING_EXPORT_INTERVAL: &str = "60s";
    /// How often the fleet controller reads the queues.
    pub const FLEET_INTERVAL: &str = "1s";
    /// A sleeping instance's requests get this long to finish before it stops.
    pub const FLEET_DRAIN_TIMEOUT_SECS: u64 = 300;
    pub const REDIS_KEY_PREFIX: &str = "tollgate";
    pub const ROUTING_POLICY: &str = "least_outstanding";
    pub const SESSION_HEADER: &str = "x-session-id";
    /// One refused connection is retried elsewhere; three in a row mean the
    /// backend is down, not unlucky.
    pub const BREAKER_FAILURES: u32 = 3;
    /// Short enough to notice a restarted backend soon, long enough to spare
    /// clients the retries against a dead one.
    pub const BREAKER_OPEN: &str = "5s";
    /// Loopback Redis answers in well under a millisecond; a call this slow
    /// means Redis is in trouble, and the request must not hang on it.
    pub const REDIS_TIMEOUT: &str = "100ms";
    pub const DEFAULT_MAX_TOKENS: u64 = 1024;
    /// One rank per minute (at most two): Free overtakes fresh Premium after
    /// two minutes, inside its five-minute wait, so it is never starved for
    /// good, while short waits keep strict priority.
    pub const AGING: &str = "60s";
    /// Longer than any request: the longest queue wait plus streams of many minutes.
    pub const RESERVATION_TTL: &str = "30m";
    pub const RECONCILE_INTERVAL: &str = "60s";
    /// The longest wait in the design brief's tier rules (Free, five minutes).
    pub const MAX_QUEUE_WAIT_SECS: f64 = 300.0;
    pub const DEFAULT_ENCODING: &str = "cl100k_base";
    pub const IMAGE_TOKENS: usize = tollgate_metering::tokens::DEFAULT_IMAGE_TOKENS;
    pub const USAGE_MISMATCH_TOLERANCE: f64 = 0.02;
    pub const BLOCKING_COUNT_BYTES: usize = tollgate_metering::tokens::BLOCKING_THRESHOLD_BYTES;
    pub const SPOOL_DIR: &str = "spool";
    /// About a few seconds of traffic at the rates one instance serves.
    pub const USAGE_CHANNEL_CAPACITY: usize = 65_536;
    pub const USAGE_BATCH_SIZE: usize = 10_000;
    pub const USAGE_FLUSH_INTERVAL: &str = "200ms";
    pub const USAGE_WRITE_TIMEOUT: &str = "5s";
    /// As often as a batch is written: a power loss can take at most the
    /// events of the last interval (a process crash takes none).
    pub const JOURNAL_SYNC_INTERVAL: &str = "200ms";
    pub const ROLLUP_RETENTION: &str = "400d";
    /// Two billing months and change.
    pub const MINUTE_ROLLUP_RETENTION: &str = "70d";
}

/// Where environment overrides come from (the process env, or a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Config {
    /// Reads `path` (or defaults when `None`), applies env overrides, validates.
    pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigError> {
        let raw = match path {
            None => RawConfig::default(),
            Some(path) => {
                let display = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: display.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: display,
                    message: e.to_string(),
                })?
            }
        };
        Self::validate(raw, env)
    }

    pub fn validate(raw: RawConfig, env: &dyn Env) -> Result<Self, ConfigError> {
        let s = raw.server;
        let d = raw.database;
        let server = ServerConfig {
            listen: address("server.listen", s.listen.as_deref(), defaults::LISTEN)?,
            admin_listen: address(
                "server.admin_listen",
                s.admin_listen.as_deref(),
                defaults::ADMIN_LISTEN,
            )?,
            metrics_listen: address(
                "server.metrics_listen",
                s.metrics_listen.as_deref(),
                defaults::METRICS_LISTEN,
            )?,
            max_body_bytes: positive(
                "server.max_body_bytes",
                s.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES),
            )?,
            workers: positive(
                "server.workers (env WORKERS)",
                override_number(env, "WORKERS", s.workers)?.unwrap_or(defaults::WORKERS),
            )?,
            drain_timeout: duration(
                "server.drain_timeout",
                s.drain_timeout.as_deref(),
                defaults::DRAIN_TIMEOUT,
            )?,
            timeouts: UpstreamTimeouts {
                connect: duration(
                    "server.connect_timeout",
                    s.connect_timeout.as_deref(),
                    defaults::CONNECT_TIMEOUT,
                )?,
                read: duration(
                    "server.read_timeout",
                    s.read_timeout.as_deref(),
                    defaults::READ_TIMEOUT,
                )?,
            },
        };
        let database = DatabaseConfig {
            url: Secret::new(
                env.var("DATABASE_URL")
                    .or(d.url)
                    .unwrap_or_else(|| defaults::DATABASE_URL.to_owned()),
            ),
            max_open_conns: positive(
                "database.max_open_conns (env SQL_MAX_OPEN_CONNS)",
                override_number(env, "SQL_MAX_OPEN_CONNS", d.max_open_conns)?
                    .unwrap_or(defaults::MAX_OPEN_CONNS),
            )?,
            max_idle_conns: override_number(env, "SQL_MAX_IDLE_CONNS", d.max_idle_conns)?
                .unwrap_or(defaults::MAX_IDLE_CONNS),
            max_lifetime: duration(
                "database.max_lifetime (env SQL_MAX_LIFETIME)",
                env.var("SQL_MAX_LIFETIME").or(d.max_lifetime).as_deref(),
                defaults::MAX_LIFETIME,
            )?,
            max_idle_time: duration(
                "database.max_idle_time (env SQL_MAX_IDLE_TIME)",
                env.var("SQL_MAX_IDLE_TIME").or(d.max_idle_time).as_deref(),
                defaults::MAX_IDLE_TIME,
            )?,
        };
        if !database.url.expose().starts_with("postgres://")
            && !database.url.expose().starts_with("postgresql://")
        {
            return Err(invalid(
                "database.url (env DATABASE_URL)",
                "must be a postgres:// URL",
            ));
        }
        if database.max_idle_conns > database.max_open_conns {
            return Err(invalid(
                "database.max_idle_conns (env SQL_MAX_IDLE_CONNS)",
                "must not exceed max_open_conns",
            ));
        }
        let redis_url = env.var("REDIS_URL").or(raw.redis.url).map(Secret::new);
        if let Some(url) = &redis_url
            && !(url.expose().starts_with("redis://") || url.expose().starts_with("rediss://"))
        {
            return Err(invalid(
                "redis.url (env REDIS_URL)",
                "must be a redis:// or rediss:// URL",
            ));
        }
        let redis = RedisConfig {
            key_prefix: raw
                .redis
                .key_prefix
                .unwrap_or_else(|| defaults::REDIS_KEY_PREFIX.to_owned()),
            timeout: duration(
                "redis.timeout",
                raw.redis.timeout.as_deref(),
                defaults::REDIS_TIMEOUT,
            )?,
        };
        if redis.key_prefix.is_empty()
            || !redis
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
        {
            return Err(invalid(
                "redis.key_prefix",
                "must be printable ASCII without spaces or braces",
            ));
        }
        if redis.timeout.is_zero() {
            return Err(invalid("redis.timeout", "must be longer than zero"));
        }
        let admin_token = env
            .var("TOLLGATE_ADMIN_TOKEN")
            .or(raw.admin.token)
            .map(Secret::new);
        if let Some(token) = &admin_token
            && token.expose().len() < 16
        {
            return Err(invalid(
                "admin.token (env TOLLGATE_ADMIN_TOKEN)",
                "must be at least 16 characters",
            ));
        }
        let keys = KeyCacheConfig {
            ttl: duration(
                "keys.cache_ttl",
                raw.keys.cache_ttl.as_deref(),
                defaults::KEY_CACHE_TTL,
            )?,
            negative_ttl: duration(
                "keys.negative_cache_ttl",
                raw.keys.negative_cache_ttl.as_deref(),
                defaults::NEGATIVE_CACHE_TTL,
            )?,
            capacity: positive(
                "keys.cache_capacity",
                raw.keys
                    .cache_capacity
                    .unwrap_or(defaults::KEY_CACHE_CAPACITY),
            )?,
            stale_while_unavailable: duration(
                "keys.stale_while_unavailable",
                raw.keys.stale_while_unavailable.as_deref(),
                defaults::STALE_WHILE_UNAVAILABLE,
            )?,
        };
        let tiers = validate_tiers(raw.tiers)?;
        Self {
            server,
            database,
            redis_url,
            redis,
            admin_token,
            keys,
            metering: validate_metering(raw.metering, env)?,
            admission: validate_admission(raw.admission)?,
            routing: validate_routing(raw.routing)?,
            health: validate_health(raw.health)?,
            fleet: validate_fleet(raw.fleet, &tiers)?,
            billing: validate_billing(raw.billing, env)?,
            tiers,
            backends: validate_backends(raw.backends)?,
        }
        .check_reservation_ttl()?
        .check_triton_counting()?
        .check_unit_models()
    }

    /// A unit size for a model nothing serves is a typo that would bill a
    /// token per unit.
    fn check_unit_models(self) -> Result<Self, ConfigError> {
        let served = self.models();
        let mut sized: Vec<&String> = self.metering.tokens_per_unit.keys().collect();
        sized.sort();
        if let Some(model) = sized.into_iter().find(|m| !served.contains(&m.as_str())) {
            return Err(invalid(
                format!("metering.tokens_per_unit.\"{model}\""),
                "no backend serves this model",
            ));
        }
        Ok(self)
    }

    /// Triton reports no usage: the gateway's own prompt count is the bill.
    fn check_triton_counting(self) -> Result<Self, ConfigError> {
        if !self.metering.count_tokens
            && let Some(i) = self
                .backends
                .iter()
                .position(|b| b.protocol == Protocol::Triton)
        {
            return Err(invalid(
                format!("backends[{i}].protocol"),
                "a triton backend reports no token usage: it needs metering.count_tokens = true",
            ));
        }
        Ok(self)
    }

    /// A reservation must outlive its request, queue wait included: one that
    /// lapses mid-request lets its account pass `max_concurrent` and its caps.
    fn check_reservation_ttl(self) -> Result<Self, ConfigError> {
        let longest_wait = self
            .tiers
            .iter()
            .map(|t| t.max_queue_wait)
            .max()
            .unwrap_or_default();
        let needed = longest_wait + self.server.timeouts.read;
        if self.admission.reservation_ttl <= needed {
            return Err(invalid(
                "admission.reservation_ttl",
                format!(
                    "must be longer than the longest max_queue_wait_secs plus server.read_timeout \
                     ({}s here)",
                    needed.as_secs()
                ),
            ));
        }
        Ok(self)
    }

    /// Every model some backend serves, in config order, without repeats.
    pub fn models(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.backends
            .iter()
            .flat_map(|b| b.models.iter().map(String::as_str))
            .filter(|m| seen.insert(*m))
            .collect()
    }
}

fn validate_metering(m: RawMetering, env: &dyn Env) -> Result<MeteringConfig, ConfigError> {
    let count_tokens = match env.var("COUNT_TOKENS") {
        None => m.count_tokens.unwrap_or(true),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                return Err(invalid(
                    "env COUNT_TOKENS",
                    format!("`{v}` is not true or false"),
                ));
            }
        },
    };
    let encoding = |key: &str, name: &str| {
        name.parse::<Encoding>()
            .map_err(|e| invalid(key, e.to_string()))
    };
    let default_encoding = encoding(
        "metering.default_encoding",
        m.default_encoding
            .as_deref()
            .unwrap_or(defaults::DEFAULT_ENCODING),
    )?;
    let mut encodings = HashMap::new();
    for (model, name) in &m.encodings {
        encodings.insert(
            model.clone(),
            encoding(&format!("metering.encodings.\"{model}\""), name)?,
        );
    }
    let mut tokens_per_unit = HashMap::new();
    for (model, &tokens) in &m.tokens_per_unit {
        if tokens == 0 {
            return Err(invalid(
                format!("metering.tokens_per_unit.\"{model}\""),
                "must be at least 1 (tokens in one billed unit)",
            ));
        }
        tokens_per_unit.insert(model.clone(), tokens);
    }
    let tolerance = m
        .usage_mismatch_tolerance
        .unwrap_or(defaults::USAGE_MISMATCH_TOLERANCE);
    if !(0.0..=1.0).contains(&tolerance) {
        return Err(invalid(
            "metering.usage_mismatch_tolerance",
            "must be a fraction between 0 and 1 (0.02 = 2%)",
        ));
    }
    let metering = MeteringConfig {
        count_tokens,
        default_encoding,
        encodings,
        tokens_per_unit,
        image_tokens: m.image_tokens.unwrap_or(defaults::IMAGE_TOKENS),
        request_stream_usage: m.request_stream_usage.unwrap_or(true),
        usage_mismatch_tolerance: tolerance,
        blocking_count_bytes: m
            .blocking_count_bytes
            .unwrap_or(defaults::BLOCKING_COUNT_BYTES),
        spool_dir: PathBuf::from(m.spool_dir.as_deref().unwrap_or(defaults::SPOOL_DIR)),
        writer: WriterConfig {
            channel_capacity: positive(
                "metering.channel_capacity",
                m.channel_capacity
                    .unwrap_or(defaults::USAGE_CHANNEL_CAPACITY),
            )?,
            batch_size: positive(
                "metering.batch_size",
                m.batch_size.unwrap_or(defaults::USAGE_BATCH_SIZE),
            )?,
            flush_interval: duration(
                "metering.flush_interval",
                m.flush_interval.as_deref(),
                defaults::USAGE_FLUSH_INTERVAL,
            )?,
            write_timeout: duration(
                "metering.write_timeout",
                m.write_timeout.as_deref(),
                defaults::USAGE_WRITE_TIMEOUT,
            )?,
            journal_sync_interval: duration(
                "metering.journal_sync_interval",
                m.journal_sync_interval.as_deref(),
                defaults::JOURNAL_SYNC_INTERVAL,
            )?,
        },
        rollup_retention: duration(
            "metering.rollup_retention",
            m.rollup_retention.as_deref(),
            defaults::ROLLUP_RETENTION,
        )?,
        minute_rollup_retention: duration(
            "metering.minute_rollup_retention",
            m.minute_rollup_retention.as_deref(),
            defaults::MINUTE_ROLLUP_RETENTION,
        )?,
    };
    if metering.writer.flush_interval.is_zero() || metering.writer.write_timeout.is_zero() {
        return Err(invalid(
            "metering.flush_interval / metering.write_timeout",
            "must be longer than zero",
        ));
    }
    if metering.minute_rollup_retention > metering.rollup_retention {
        return Err(invalid(
            "metering.minute_rollup_retention",
            "must not exceed metering.rollup_retention (day rollups back the minute ones)",
        ));
    }
    Ok(metering)
}

fn validate_admission(a: RawAdmission) -> Result<AdmissionConfig, ConfigError> {
    let aging = duration("admission.aging", a.aging.as_deref(), defaults::AGING)?;
    let config = AdmissionConfig {
        default_max_tokens: a.default_max_tokens.unwrap_or(defaults::DEFAULT_MAX_TOKENS),
        aging: (!aging.is_zero()).then_some(aging),
        reservation_ttl: duration(
            "admission.reservation_ttl",
            a.reservation_ttl.as_deref(),
            defaults::RESERVATION_TTL,
        )?,
        reconcile_interval: duration(
            "admission.reconcile_interval",
            a.reconcile_interval.as_deref(),
            defaults::RECONCILE_INTERVAL,
        )?,
    };
    if config.default_max_tokens == 0 {
        return Err(invalid(
            "admission.default_max_tokens",
            "must be at least 1",
        ));
    }
    if config.reservation_ttl < Duration::from_secs(60) || config.reconcile_interval.is_zero() {
        return Err(invalid(
            "admission.reservation_ttl / admission.reconcile_interval",
            "reservation_ttl must be at least 60s (longer than any request), reconcile_interval above zero",
        ));
    }
    Ok(config)
}

fn validate_routing(r: RawRouting) -> Result<RoutingConfig, ConfigError> {
    let policy = match r.policy.as_deref().unwrap_or(defaults::ROUTING_POLICY) {
        "least_outstanding" => RoutingPolicy::LeastOutstanding,
        "round_robin" => RoutingPolicy::RoundRobin,
        "session_affinity" => RoutingPolicy::SessionAffinity,
        other => {
            return Err(invalid(
                "routing.policy",
                format!(
                    "`{other}` is not one of \"least_outstanding\", \"round_robin\", \"session_affinity\""
                ),
            ));
        }
    };
    let session_header = r
        .session_header
        .unwrap_or_else(|| defaults::SESSION_HEADER.to_owned())
        .to_ascii_lowercase();
    if http::HeaderName::from_bytes(session_header.as_bytes()).is_err() {
        return Err(invalid(
            "routing.session_header",
            "is not a valid header name",
        ));
    }
    let breaker_failures = r.breaker_failures.unwrap_or(defaults::BREAKER_FAILURES);
    if breaker_failures == 0 {
        return Err(invalid("routing.breaker_failures", "must be at least 1"));
    }
    Ok(RoutingConfig {
        policy,
        session_header,
        breaker_failures,
        breaker_open: duration(
            "routing.breaker_open",
            r.breaker_open.as_deref(),
            defaults::BREAKER_OPEN,
        )?,
    })
}

fn validate_billing(b: RawBilling, env: &dyn Env) -> Result<BillingConfig, ConfigError> {
    let meter_event_name = b
        .meter_event_name
        .unwrap_or_else(|| defaults::METER_EVENT_NAME.to_owned());
    if !is_identifier(&meter_event_name) {
        return Err(invalid(
            "billing.meter_event_name",
            "must be 1-64 characters of a-z, 0-9, '-' or '_'",
        ));
    }
    let bucket_secs = b.bucket_secs.unwrap_or(defaults::BILLING_BUCKET_SECS);
    if !(60..=86_400).contains(&bucket_secs) || 86_400 % bucket_secs != 0 {
        return Err(invalid(
            "billing.bucket_secs",
            "must divide a day into whole buckets of at least 60 seconds (3600 by default)",
        ));
    }
    let api_base = env.var("STRIPE_API_BASE");
    if let Some(base) = &api_base {
        let uri: Option<http::Uri> = base.parse().ok();
        let plain = uri.as_ref().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some()
                && matches!(u.path(), "" | "/")
        });
        if !plain {
            return Err(invalid(
                "STRIPE_API_BASE",
                "must be a scheme, host and port only, like http://127.0.0.1:12111",
            ));
        }
    }
    Ok(BillingConfig {
        meter_event_name,
        bucket: Duration::from_secs(bucket_secs),
        grace: grace_days(b.grace_days)?,
        export_interval: duration(
            "billing.export_interval",
            b.export_interval.as_deref(),
            defaults::BILLING_EXPORT_INTERVAL,
        )?,
        success_url: b.success_url,
        cancel_url: b.cancel_url,
        portal_return_url: b.portal_return_url,
        stripe: env.var("STRIPE_SECRET_KEY").map(|key| StripeConfig {
            secret_key: Secret::new(key),
            webhook_secrets: env.var("STRIPE_WEBHOOK_SECRET").map(Secret::new),
            api_base: api_base.map(|b| b.trim_end_matches('/').to_owned()),
        }),
    })
}

/// `billing.grace_days`: whole or fractional days (0.5 is twelve hours).
fn grace_days(days: Option<f64>) -> Result<Duration, ConfigError> {
    let days = days.unwrap_or(defaults::BILLING_GRACE_DAYS);
    if !(0.0..=90.0).contains(&days) {
        return Err(invalid(
            "billing.grace_days",
            "must be between 0 and 90 days (fractions allowed)",
        ));
    }
    Ok(Duration::from_secs_f64(days * 86_400.0))
}

fn validate_fleet(f: RawFleet, tiers: &[TierConfig]) -> Result<FleetConfig, ConfigError> {
    let default = FleetPolicy::default();
    let secs = |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_secs);
    let configured = |tier: &str| tiers.iter().any(|t| t.name == tier);
    // A table given must name configured tiers; the defaults apply to the
    // tiers of those names that exist.
    let waits = |field: &str,
                 value: Option<BTreeMap<String, u64>>,
                 default: &HashMap<String, Duration>|
     -> Result<HashMap<String, Duration>, ConfigError> {
        match value {
            None => Ok(default
                .iter()
                .filter(|(tier, _)| configured(tier))
                .map(|(tier, wait)| (tier.clone(), *wait))
                .collect()),
            Some(table) => table
                .into_iter()
                .map(|(tier, s)| {
                    if configured(&tier) {
                        Ok((tier, Duration::from_secs(s)))
                    } else {
                        Err(invalid(
                            field,
                            format!("names tier `{tier}`, which is not configured"),
                        ))
                    }
                })
                .collect(),
        }
    };
    let policy = FleetPolicy {
        min_hot: f.min_hot.unwrap_or(default.min_hot),
        max_hot: f.max_hot.unwrap_or(default.max_hot),
        idle_stop: secs(f.idle_stop_secs, default.idle_stop),
        warm_release: secs(f.warm_release_secs, default.warm_release),
        resume_queue_depth: f.resume_queue_depth.unwrap_or(default.resume_queue_depth),
        create_queue_depth: f.create_queue_depth.unwrap_or(default.create_queue_depth),
        scale_in_queue_depth: f
            .scale_in_queue_depth
            .unwrap_or(default.scale_in_queue_depth),
        scale_in_after: secs(f.scale_in_after_secs, default.scale_in_after),
        wake_standby_wait: waits(
            "fleet.wake_standby_wait_secs",
            f.wake_standby_wait_secs,
            &default.wake_standby_wait,
        )?,
        rent_overflow_wait: waits(
            "fleet.rent_overflow_wait_secs",
            f.rent_overflow_wait_secs,
            &default.rent_overflow_wait,
        )?,
        failed_retry: secs(f.failed_retry_secs, default.failed_retry),
        start_timeout: secs(f.start_timeout_secs, default.start_timeout),
    };
    if policy.max_hot == 0 || policy.min_hot > policy.max_hot {
        return Err(invalid(
            "fleet.max_hot",
            "must be at least 1 and at least min_hot",
        ));
    }
    if policy.create_queue_depth < policy.resume_queue_depth
        || policy.scale_in_queue_depth > policy.resume_queue_depth
    {
        return Err(invalid(
            "fleet.scale_in_queue_depth",
            "needs scale_in_queue_depth <= resume_queue_depth <= create_queue_depth, or the fleet would flap",
        ));
    }
    let timing = ControllerTiming {
        interval: duration(
            "fleet.interval",
            f.interval.as_deref(),
            defaults::FLEET_INTERVAL,
        )?,
        // A woken instance is probed this often: the cold-start wait is its
        // start-up time plus at most this.
        poll: Duration::from_millis(250),
        drain_timeout: secs(
            f.drain_timeout_secs,
            Duration::from_secs(defaults::FLEET_DRAIN_TIMEOUT_SECS),
        ),
    };
    if timing.interval.is_zero() {
        return Err(invalid("fleet.interval", "must be more than zero"));
    }
    Ok(FleetConfig { policy, timing })
}

fn validate_health(h: RawHealth) -> Result<ProbeConfig, ConfigError> {
    let default = ProbeConfig::DEFAULT;
    let or_default = |key: &str, value: Option<&str>, default: Duration| match value {
        None => Ok(default),
        Some(text) => duration(key, Some(text), ""),
    };
    let config = ProbeConfig {
        interval: or_default("health.interval", h.interval.as_deref(), default.interval)?,
        timeout: or_default("health.timeout", h.timeout.as_deref(), default.timeout)?,
        healthy_after: h.healthy_after.unwrap_or(default.healthy_after),
        unhealthy_after: h.unhealthy_after.unwrap_or(default.unhealthy_after),
        grace: or_default("health.grace", h.grace.as_deref(), default.grace)?,
    };
    if config.interval.is_zero() || config.timeout.is_zero() {
        return Err(invalid(
            "health.interval / health.timeout",
            "must be longer than zero",
        ));
    }
    if config.healthy_after == 0 || config.unhealthy_after == 0 {
        return Err(invalid(
            "health.healthy_after / health.unhealthy_after",
            "must be at least 1",
        ));
    }
    Ok(config)
}

fn validate_tiers(raw: Vec<RawTier>) -> Result<Vec<TierConfig>, ConfigError> {
    let mut seen = HashSet::new();
    let mut tiers = Vec::new();
    for (i, tier) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("tiers[{i}].{field}");
        if !is_identifier(&tier.name) {
            return Err(invalid(
                key("name"),
                "must be 1-64 characters of a-z, 0-9, '-' or '_'",
            ));
        }
        if !seen.insert(tier.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("tier `{}` is defined twice", tier.name),
            ));
        }
        let seconds = |field: &str, value: Option<f64>, default: f64| {
            let value = value.unwrap_or(default);
            Duration::try_from_secs_f64(value)
                .map_err(|_| invalid(key(field), "must be a number of seconds, 0 or more"))
        };
        let max_queue_wait = seconds(
            "max_queue_wait_secs",
            tier.max_queue_wait_secs,
            defaults::MAX_QUEUE_WAIT_SECS,
        )?;
        let max_expected_wait = seconds(
            "max_expected_wait_secs",
            tier.max_expected_wait_secs,
            max_queue_wait.as_secs_f64(),
        )?;
        let limits = [
            ("requests_per_minute", tier.requests_per_minute),
            ("tokens_per_minute", tier.tokens_per_minute),
            ("key_requests_per_minute", tier.key_requests_per_minute),
            ("key_tokens_per_minute", tier.key_tokens_per_minute),
            ("max_concurrent", tier.max_concurrent),
        ];
        if let Some((field, _)) = limits.iter().find(|(_, v)| *v == Some(0)) {
            return Err(invalid(
                key(field),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        let prices = [
            ("overage_price", tier.overage_price),
            ("monthly_price", tier.monthly_price),
        ];
        if let Some((field, _)) = prices
            .iter()
            .find(|(_, p)| p.is_some_and(|p| !p.is_finite() || p < 0.0))
        {
            return Err(invalid(key(field), "must be a price in USD, 0 or more"));
        }
        let hard_cap = tier.hard_cap.unwrap_or(tier.overage_price.is_none());
        if hard_cap && tier.overage_price.is_some() {
            return Err(invalid(
                key("overage_price"),
                "a hard-capped tier has no overage: remove overage_price or set hard_cap = false",
            ));
        }
        let mut config = TierConfig {
            name: tier.name,
            // Unset: the tier's place in the list (later tiers first).
            priority: tier.priority.unwrap_or(i as i64),
            requests_per_minute: tier.requests_per_minute,
            tokens_per_minute: tier.tokens_per_minute,
            key_requests_per_minute: tier.key_requests_per_minute,
            key_tokens_per_minute: tier.key_tokens_per_minute,
            max_concurrent: tier.max_concurrent,
            max_queue_wait,
            max_expected_wait,
            included_units: tier.included_units,
            daily_cap: tier.daily_cap,
            hard_cap,
            overage_price: tier.overage_price,
            monthly_price: tier.monthly_price.unwrap_or(0.0),
            on_redis_down: RedisDownPolicy::Local,
            stripe_price_lookup_key: tier.stripe_price_lookup_key,
            stripe_overage_lookup_key: tier.stripe_overage_lookup_key,
            tokens_per_unit: match tier.tokens_per_unit {
                None => 1,
                Some(0) => {
                    return Err(invalid(
                        key("tokens_per_unit"),
                        "must be at least 1 (tokens in one billed unit)",
                    ));
                }
                Some(tokens) => tokens,
            },
        };
        if config.stripe_overage_lookup_key.is_some()
            && (config.hard_cap || config.overage_price.is_none())
        {
            return Err(invalid(
                key("stripe_overage_lookup_key"),
                "a tier with a metered overage price needs hard_cap = false and an overage_price",
            ));
        }
        config.on_redis_down = match tier.on_redis_down.as_deref() {
            None if config.is_paid() => RedisDownPolicy::Local,
            None => RedisDownPolicy::Reject,
            Some("local") => RedisDownPolicy::Local,
            Some("reject") => RedisDownPolicy::Reject,
            Some(other) => {
                return Err(invalid(
                    key("on_redis_down"),
                    format!("`{other}` is not \"local\" or \"reject\""),
                ));
            }
        };
        if let Some(same) = tiers
            .iter()
            .find(|t: &&TierConfig| t.priority == config.priority)
        {
            return Err(invalid(
                key("priority"),
                format!(
                    "tier `{}` has the same priority; give each tier its own place in the queue",
                    same.name
                ),
            ));
        }
        tiers.push(config);
    }
    if tiers.is_empty() {
        return Err(invalid(
            "tiers",
            "define at least one [[tiers]] entry (keys are created on a tier)",
        ));
    }
    Ok(tiers)
}

fn validate_backends(raw: Vec<RawBackend>) -> Result<Vec<BackendConfig>, ConfigError> {
    let mut names = HashSet::new();
    let mut backends = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("backends[{i}].{field}");
        if !is_identifier(&b.name) {
            return Err(invalid(
                key("name"),
                "must be 1-64 characters of a-z, 0-9, '-' or '_'",
            ));
        }
        if !names.insert(b.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("backend `{}` is defined twice", b.name),
            ));
        }
        let protocol: Protocol = b.protocol.parse().map_err(|_| {
            invalid(
                key("protocol"),
                format!(
                    "unsupported protocol `{}` (supported: \"openai\", \"triton\")",
                    b.protocol
                ),
            )
        })?;
        let provider = match (
            b.provider.as_deref().unwrap_or("static"),
            b.command,
            b.runpod,
        ) {
            ("static", None, None) => ProviderConfig::Static,
            ("process", Some(command), None) if !command.is_empty() => {
                ProviderConfig::Process { command }
            }
            ("process", _, _) => {
                return Err(invalid(
                    key("command"),
                    "a process backend needs `command`, an argv list (use {port} for the port), and no [runpod]",
                ));
            }
            ("runpod", None, Some(runpod)) => {
                ProviderConfig::RunPod(Box::new(runpod.try_into().map_err(
                    |e: toml::de::Error| invalid(key("runpod"), e.message().to_owned()),
                )?))
            }
            ("runpod", _, _) => {
                return Err(invalid(
                    key("runpod"),
                    "a runpod backend needs a [backends.runpod] table, and no `command`",
                ));
            }
            ("static", _, _) => {
                return Err(invalid(
                    key("provider"),
                    "`command` and [runpod] need provider = \"process\" or \"runpod\"",
                ));
            }
            (other, _, _) => {
                return Err(invalid(
                    key("provider"),
                    format!("unknown provider `{other}` (known: static, process, runpod)"),
                ));
            }
        };
        let (tls, host, address) = match (&provider, b.url.as_deref()) {
            (ProviderConfig::Static, Some(url)) => {
                parse_backend_url(url).map_err(|problem| invalid(key("url"), problem))?
            }
            (ProviderConfig::Static, None) => {
                return Err(invalid(key("url"), "a static backend needs its `url`"));
            }
            // The address is learnt when the instance starts.
            (_, None) => (false, "127.0.0.1".to_owned(), String::new()),
            (_, Some(_)) => {
                return Err(invalid(
                    key("url"),
                    "only static backends have a `url`; a process or pod gets its address when it starts",
                ));
            }
        };
        if protocol == Protocol::Triton && b.health_path.is_some() {
            return Err(invalid(
                key("health_path"),
                "a triton backend is probed at /v2/health/ready and /v2/models/{model}/ready",
            ));
        }
        if matches!(provider, ProviderConfig::Static)
            && (b.hourly_cost.is_some() || b.stopped_hourly_cost.is_some())
        {
            return Err(invalid(
                key("hourly_cost"),
                "prices are accounted for process and runpod backends only",
            ));
        }
        let health_path = b
            .health_path
            .unwrap_or_else(|| DEFAULT_HEALTH_PATH.to_owned());
        if !health_path.starts_with('/') || health_path.contains(char::is_whitespace) {
            return Err(invalid(
                key("health_path"),
                "must be a path starting with '/'",
            ));
        }
        let cost = HourlyCost {
            running: b.hourly_cost.unwrap_or(0.0),
            stopped: b.stopped_hourly_cost.unwrap_or(0.0),
        };
        if !(cost.running.is_finite()
            && cost.running >= 0.0
            && cost.stopped.is_finite()
            && cost.stopped >= 0.0)
        {
            return Err(invalid(key("hourly_cost"), "prices must be zero or more"));
        }
        if let Some(credential) = &b.credential
            && (credential.is_empty() || !credential.bytes().all(|c| c.is_ascii_graphic()))
        {
            return Err(invalid(
                key("credential"),
                "must be printable ASCII with no spaces (it is sent in a header)",
            ));
        }
        if b.models.is_empty() || b.models.iter().any(|m| m.trim().is_empty()) {
            return Err(invalid(
                key("models"),
                "list at least one model name, none empty",
            ));
        }
        let max_concurrency = b
            .max_concurrency
            .unwrap_or(defaults::BACKEND_MAX_CONCURRENCY);
        if max_concurrency == 0 {
            return Err(invalid(key("max_concurrency"), "must be at least 1"));
        }
        let pool = match b.pool {
            Some(pool) if is_identifier(&pool) => pool,
            Some(_) => {
                return Err(invalid(
                    key("pool"),
                    "must be 1-64 characters of a-z, 0-9, '-' or '_'",
                ));
            }
            None => {
                let mut models = b.models.clone();
                models.sort();
                models.join("+")
            }
        };
        backends.push(BackendConfig {
            name: b.name,
            address,
            host,
            tls,
            protocol,
            health_path,
            provider,
            cost,
            models: b.models,
            max_concurrency,
            pool,
            credential: b.credential.map(Secret::new),
        });
    }
    if backends.is_empty() {
        return Err(invalid(
            "backends",
            "define at least one [[backends]] entry",
        ));
    }
    // One queue per model: a model served from two pools could take a slot
    // in one and be routed to a backend of the other.
    let mut pool_of: HashMap<&str, &str> = HashMap::new();
    for (i, b) in backends.iter().enumerate() {
        for model in &b.models {
            match pool_of.insert(model, &b.pool) {
                Some(other) if other != b.pool => {
                    return Err(invalid(
                        format!("backends[{i}].pool"),
                        format!(
                            "model `{model}` is served from pools `{other}` and `{}`; \
                             backends sharing a model must share a pool (set the same `pool`)",
                            b.pool
                        ),
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(backends)
}

/// `http://host:port` → (tls, host, "host:port").
fn parse_backend_url(url: &str) -> Result<(bool, String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("`{url}` has no host"))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    if !matches!(uri.path(), "" | "/") {
        return Err(format!(
            "`{url}` must not have a path: Tollgate forwards /v1/... as the client sent it"
        ));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((tls, host, address))
}

fn is_identifier(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn address(key: &str, value: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let value = value.unwrap_or(default);
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address like 127.0.0.1:8080"),
        )
    })
}

fn duration(key: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    parse_duration(value).ok_or_else(|| {
        invalid(
            key,
            format!("`{value}` is not a duration like \"30s\", \"500ms\" or \"2m\""),
        )
    })
}

/// A duration as "30s" / "2m" / "500ms", or bare seconds ("60") as the
/// SQL_* variables are commonly written.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    humantime::parse_duration(value).ok()
}

fn positive(key: &str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        Err(invalid(key, "must be at least 1"))
    } else {
        Ok(value)
    }
}

fn override_number(
    env: &dyn Env,
    name: &str,
    file: Option<usize>,
) -> Result<Option<usize>, ConfigError> {
    match env.var(name) {
        None => Ok(file),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("env {name}"), format!("`{v}` is not a number"))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct MapEnv(HashMap<&'static str, &'static str>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    fn no_env() -> MapEnv {
        MapEnv(HashMap::new())
    }

    const MINIMAL: &str = r#"
        [[tiers]]
        name = "free"
        [[backends]]
        name = "sim"
        url = "http://127.0.0.1:8101"
        models = ["sim-model"]
    "#;

    fn parse(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "test".into(),
            message: e.to_string(),
        })?;
        Config::validate(raw, env)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(MINIMAL, &no_env()).unwrap();
        assert_eq!(config.server.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(config.server.workers, 1);
        assert_eq!(config.database.max_open_conns, 20);
        assert_eq!(config.database.max_idle_conns, 10);
        assert_eq!(config.database.max_lifetime, Duration::from_secs(60));
        assert_eq!(config.database.max_idle_time, Duration::from_secs(30));
        assert!(config.redis_url.is_none());
        assert_eq!(config.backends[0].address, "127.0.0.1:8101");
        assert_eq!(config.backends[0].max_concurrency, 64);
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let text = format!(
            "{MINIMAL}\n[database]\nurl = \"postgres://file\"\nmax_open_conns = 5\n[server]\nworkers = 2\n"
        );
        let env = MapEnv(HashMap::from([
            ("DATABASE_URL", "postgres://env/db"),
            ("SQL_MAX_OPEN_CONNS", "7"),
            ("SQL_MAX_IDLE_CONNS", "3"),
            ("SQL_MAX_LIFETIME", "90"),
            ("SQL_MAX_IDLE_TIME", "15s"),
            ("WORKERS", "4"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("TOLLGATE_ADMIN_TOKEN", "0123456789abcdef"),
        ]));
        let config = parse(&text, &env).unwrap();
        assert_eq!(config.database.url.expose(), "postgres://env/db");
        assert_eq!(config.database.max_open_conns, 7);
        assert_eq!(config.database.max_idle_conns, 3);
        assert_eq!(config.database.max_lifetime, Duration::from_secs(90));
        assert_eq!(config.database.max_idle_time, Duration::from_secs(15));
        assert_eq!(config.server.workers, 4);
        assert!(config.redis_url.is_some());
        assert!(config.admin_token.is_some());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse(
            &format!("{MINIMAL}\n[server]\nlisten_addr = \"x\"\n"),
            &no_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases = [
            ("[server]\nlisten = \"nope\"\n", "server.listen"),
            ("[server]\nmax_body_bytes = 0\n", "server.max_body_bytes"),
            (
                "[server]\ndrain_timeout = \"soon\"\n",
                "server.drain_timeout",
            ),
            ("[database]\nurl = \"mysql://x\"\n", "database.url"),
        ];
        for (extra, key) in cases {
            let err = parse(&format!("{MINIMAL}\n{extra}"), &no_env())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra:?} → {err}");
        }
        let bad_backend = r#"
            [[tiers]]
            name = "free"
            [[backends]]
            name = "sim"
            url = "ftp://x"
            models = ["m"]
        "#;
        let err = parse(bad_backend, &no_env()).unwrap_err().to_string();
        assert!(err.contains("backends[0].url"), "{err}");
        let err = parse(
            &MINIMAL
                .replace("openai", "x")
                .replace("models = [\"sim-model\"]", "models = []"),
            &no_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("backends[0].models"), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let text = format!("{MINIMAL}\n[[tiers]]\nname = \"free\"\n");
        let err = parse(&text, &no_env()).unwrap_err().to_string();
        assert!(err.contains("tiers[1].name"), "{err}");
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/tollgate.example.toml");
        let config = Config::load(Some(&path), &no_env()).unwrap();
        assert_eq!(config.tiers.len(), 3);
        assert_eq!(config.backends.len(), 2);
        assert_eq!(config.models(), ["sim-model", "gpt-4o-mini"]);
    }

    /// The example price books, with the minimal config's backend.
    fn plan(name: &str) -> Config {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../config/plans/{name}.toml"));
        let tiers = std::fs::read_to_string(path).unwrap();
        let backends = MINIMAL.replace("[[tiers]]\n        name = \"free\"", "");
        parse(&format!("{backends}\n{tiers}"), &no_env()).unwrap()
    }

    #[test]
    fn example_price_books_are_valid() {
        let creator = plan("creator");
        let names: Vec<_> = creator.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["free", "starter", "creator", "studio", "enterprise"]
        );
        let free = &creator.tiers[0];
        assert!(free.hard_cap && !free.is_paid());
        assert_eq!(free.on_redis_down, RedisDownPolicy::Reject);
        assert_eq!(free.max_expected_wait, Duration::from_secs(60));
        let starter = &creator.tiers[1];
        assert!(!starter.hard_cap && starter.is_paid());
        assert_eq!(starter.on_redis_down, RedisDownPolicy::Local);
        assert_eq!(starter.max_expected_wait, starter.max_queue_wait);
        assert_eq!(starter.tokens_per_unit, 1000);

        let hybrid = plan("hybrid");
        let names: Vec<_> = hybrid.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["free", "premium", "pro", "enterprise"]);
        assert_eq!(hybrid.tiers[0].daily_cap, Some(20));
        assert_eq!(hybrid.tiers[2].max_queue_wait, Duration::from_secs(30));
    }

    #[test]
    fn unit_sizes_name_served_models_and_are_at_least_one() {
        let metering = |table: &str| {
            parse(
                &format!("[metering]\ntokens_per_unit = {table}\n{MINIMAL}"),
                &no_env(),
            )
            .map(|c| c.metering.tokens_per_unit)
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            metering("{ \"sim-model\" = 500 }").unwrap()["sim-model"],
            500
        );
        let typo = metering("{ \"sim-modle\" = 500 }").unwrap_err();
        assert!(
            typo.contains("metering.tokens_per_unit.\"sim-modle\""),
            "{typo}"
        );
        let zero = metering("{ \"sim-model\" = 0 }").unwrap_err();
        assert!(zero.contains("at least 1"), "{zero}");
    }

    #[test]
    fn grace_days_take_fractions_within_bounds() {
        let grace = |value: &str| {
            parse(
                &format!("{MINIMAL}\n[billing]\ngrace_days = {value}\n"),
                &no_env(),
            )
            .map(|c| c.billing.grace)
            .map_err(|e| e.to_string())
        };
        assert_eq!(grace("3"), Ok(Duration::from_secs(3 * 86_400)));
        assert_eq!(grace("0.5"), Ok(Duration::from_secs(43_200)));
        for bad in ["-1", "91", "nan"] {
            assert!(
                grace(bad).unwrap_err().contains("billing.grace_days"),
                "{bad}"
            );
        }
    }

    #[test]
    fn tier_mistakes_name_the_key() {
        let cases = [
            ("requests_per_minute = 0", "tiers[1].requests_per_minute"),
            (
                "overage_price = 0.01\nhard_cap = true",
                "tiers[1].overage_price",
            ),
            ("on_redis_down = \"maybe\"", "tiers[1].on_redis_down"),
            ("max_queue_wait_secs = -1", "tiers[1].max_queue_wait_secs"),
            ("priority = 0", "tiers[1].priority"),
            ("tokens_per_unit = 0", "tiers[1].tokens_per_unit"),
            (
                "hard_cap = false\nstripe_overage_lookup_key = \"pro_overage\"",
                "tiers[1].stripe_overage_lookup_key",
            ),
        ];
        for (line, key) in cases {
            let text = format!("{MINIMAL}\n[[tiers]]\nname = \"pro\"\n{line}\n");
            let err = parse(&text, &no_env()).unwrap_err().to_string();
            assert!(err.contains(key), "{line:?} → {err}");
        }
    }

    #[test]
    fn a_model_belongs_to_one_pool() {
        let text = format!(
            "{MINIMAL}\n[[backends]]\nname = \"other\"\nurl = \"http://127.0.0.1:8102\"\n\
             models = [\"sim-model\", \"big\"]\n"
        );
        let err = parse(&text, &no_env()).unwrap_err().to_string();
        assert!(err.contains("backends[1].pool"), "{err}");
        let shared = format!("{text}pool = \"sim-model\"\n");
        let config = parse(&shared, &no_env()).unwrap();
        assert_eq!(config.backends[1].pool, config.backends[0].pool);
    }

    #[test]
    fn managed_backend_and_fleet_mistakes_name_the_key() {
        let backend = "[[backends]]\nname = \"gpu\"\nmodels = [\"sim-model\"]\n";
        let cases = [
            (
                format!("{backend}provider = \"process\"\n"),
                "backends[1].command",
            ),
            (
                format!(
                    "{backend}provider = \"process\"\ncommand = [\"sim\"]\nurl = \"http://h:1\"\n"
                ),
                "backends[1].url",
            ),
            (
                format!("{backend}provider = \"gcp\"\n"),
                "backends[1].provider",
            ),
            (
                format!("{backend}url = \"http://h:1\"\nhealth_path = \"health\"\n"),
                "backends[1].health_path",
            ),
            (
                format!("{backend}provider = \"runpod\"\n"),
                "backends[1].runpod",
            ),
            (
                format!(
                    "{backend}provider = \"process\"\ncommand = [\"sim\"]\nhourly_cost = -1.0\n"
                ),
                "backends[1].hourly_cost",
            ),
            (
                format!("{backend}url = \"http://h:1\"\nhourly_cost = 1.0\n"),
                "backends[1].hourly_cost",
            ),
            (
                format!(
                    "{backend}url = \"http://h:1\"\nprotocol = \"triton\"\nhealth_path = \"/h\"\n"
                ),
                "backends[1].health_path",
            ),
            (
                "[fleet]\nmin_hot = 3\nmax_hot = 2\n".to_owned(),
                "fleet.max_hot",
            ),
            (
                "[fleet]\nresume_queue_depth = 40\n".to_owned(),
                "fleet.scale_in_queue_depth",
            ),
            (
                "[fleet]\nrent_overflow_wait_secs = { gold = 30 }\n".to_owned(),
                "fleet.rent_overflow_wait_secs",
            ),
        ];
        for (extra, key) in cases {
            let text = format!("{MINIMAL}\n{extra}");
            let err = parse(&text, &no_env()).unwrap_err().to_string();
            assert!(err.contains(key), "{extra:?} → {err}");
        }
        let process = format!(
            "{MINIMAL}\n{backend}provider = \"process\"\ncommand = [\"gpu-sim\", \"--listen\", \"127.0.0.1:{{port}}\"]\n\
             [fleet]\nmin_hot = 0\n"
        );
        let config = parse(&process, &no_env()).unwrap();
        assert!(
            matches!(&config.backends[1].provider, ProviderConfig::Process { command } if command.len() == 3)
        );
        assert_eq!(config.fleet.policy.min_hot, 0);
        // Default tier triggers apply only to tiers that exist.
        assert!(
            config
                .fleet
                .policy
                .rent_overflow_wait
                .keys()
                .all(|t| config.tiers.iter().any(|c| &c.name == t))
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("postgres://user:hunter2@db/x");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
