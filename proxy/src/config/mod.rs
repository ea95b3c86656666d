//! Configuration in two stages: the TOML file as written ([`RawConfig`],
//! one serde struct per section, unknown keys rejected, enum-like values
//! and durations typed as they are read), environment overrides on top, then
//! [`Config::validate`] into typed values with no "filled in later" options.
//! Every error names the key to change. `config/tollgate.example.toml`
//! documents every key.
//!
//! Layout: this file holds loading, the env overrides' plumbing, the checks
//! that span sections and the shared value types (durations, the renamed-key
//! rule); each TOML section has its own file with its raw struct, its
//! validated struct and its checks ([`server`], [`database`], [`redis`],
//! [`admin`], [`keys`], [`metering`], [`admission`], [`tiers`], [`routing`],
//! [`health`], [`jobs`], [`billing`], [`fleet`], [`backends`], [`routes`]); [`defaults`] is the one
//! table of defaults, [`name`] the one rule for names.
//!
//! Conventions every section follows:
//! - a duration is a humantime string (`"300s"`, `"5m"`, `"500ms"`);
//! - a key renamed to that form (`drain_timeout_secs = 300` became
//!   `drain_timeout = "300s"`) is still read, with a warning naming the new
//!   key; setting both spellings is refused (they could disagree);
//! - every secret is a [`SecretString`](secrecy::SecretString): `Debug`
//!   prints `[REDACTED]`, and only an explicit `expose_secret()` reads it.

pub mod admin;
pub mod admission;
pub mod backends;
pub mod billing;
pub mod database;
pub mod defaults;
pub mod fleet;
pub mod health;
pub mod jobs;
pub mod keys;
pub mod metering;
pub mod name;
pub mod redis;
pub mod routes;
pub mod routing;
pub mod server;
pub mod tiers;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use tollgate_backends::health::ProbeConfig;

pub use self::admission::AdmissionConfig;
pub use self::backends::{BackendConfig, ProviderConfig, ProviderKind};
pub use self::billing::{BillingConfig, StripeConfig};
pub use self::database::DatabaseConfig;
pub use self::fleet::FleetConfig;
pub use self::jobs::JobsConfig;
pub use self::keys::KeyCacheConfig;
pub use self::metering::{ImageWeights, MeteringConfig};
pub use self::name::Name;
pub use self::redis::RedisConfig;
pub use self::routes::CustomRoute;
pub use self::routing::RoutingConfig;
pub use self::server::{ServerConfig, UpstreamTimeouts};
pub use self::tiers::{RedisDownPolicy, TierConfig};
pub use tollgate_backends::balance::RoutingPolicy;
pub use tollgate_backends::protocol::Protocol;

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

/// The file as written: one table per section, each in its own module.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    server: server::RawServer,
    #[serde(default)]
    database: database::RawDatabase,
    #[serde(default)]
    redis: redis::RawRedis,
    #[serde(default)]
    admin: admin::RawAdmin,
    #[serde(default)]
    keys: keys::RawKeys,
    #[serde(default)]
    metering: metering::RawMetering,
    #[serde(default)]
    admission: admission::RawAdmission,
    #[serde(default)]
    routing: routing::RawRouting,
    #[serde(default)]
    health: health::RawHealth,
    #[serde(default)]
    fleet: fleet::RawFleet,
    #[serde(default)]
    billing: billing::RawBilling,
    #[serde(default)]
    jobs: jobs::RawJobs,
    #[serde(default)]
    tiers: Vec<tiers::RawTier>,
    #[serde(default)]
    backends: Vec<backends::RawBackend>,
    #[serde(default)]
    routes: Vec<routes::RawRoute>,
}

impl RawConfig {
    /// Parses TOML text; a value of the wrong type or spelling is reported
    /// with its key (`tiers[1].on_redis_down`) and TOML's line and column.
    pub fn parse(text: &str) -> Result<Self, String> {
        let document = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize(document).map_err(|e| match e.path().to_string() {
            key if key == "." => e.into_inner().to_string(),
            key => format!("key `{key}`: {}", e.into_inner()),
        })
    }
}

// ---------------------------------------------------------------- validated

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    /// Absent: a single instance, with in-process state only.
    pub redis_url: Option<SecretString>,
    pub redis: RedisConfig,
    /// Absent: the admin API refuses every request.
    pub admin_token: Option<SecretString>,
    pub keys: KeyCacheConfig,
    pub metering: MeteringConfig,
    pub admission: AdmissionConfig,
    pub routing: RoutingConfig,
    /// `[health]`: active probes of every plain-http backend.
    pub health: ProbeConfig,
    pub fleet: FleetConfig,
    pub billing: BillingConfig,
    pub jobs: JobsConfig,
    /// In config order.
    pub tiers: Vec<TierConfig>,
    pub backends: Vec<BackendConfig>,
    /// Custom GPU routes, in config order.
    pub routes: Vec<CustomRoute>,
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
                RawConfig::parse(&text).map_err(|message| ConfigError::Parse {
                    path: display,
                    message,
                })?
            }
        };
        Self::validate(raw, env)
    }

    pub fn validate(raw: RawConfig, env: &dyn Env) -> Result<Self, ConfigError> {
        let tiers = tiers::validate(raw.tiers)?;
        Self {
            server: server::validate(raw.server, env)?,
            database: database::validate(raw.database, env)?,
            redis_url: redis::url(raw.redis.url.clone(), env)?,
            redis: redis::validate(raw.redis)?,
            admin_token: admin::token(raw.admin, env)?,
            keys: keys::validate(raw.keys)?,
            metering: metering::validate(raw.metering, env)?,
            admission: admission::validate(raw.admission)?,
            routing: routing::validate(raw.routing)?,
            health: health::validate(raw.health)?,
            fleet: fleet::validate(raw.fleet, &tiers)?,
            billing: billing::validate(raw.billing, env)?,
            jobs: jobs::validate(raw.jobs)?,
            tiers,
            routes: Vec::new(),
            backends: backends::validate(raw.backends)?,
        }
        .with_routes(raw.routes)?
        .check_reservation_ttl()?
        .check_triton_counting()?
        .check_unit_models()?
        .check_unit_meters()
    }

    /// A tier selling a unit kind's overage in Stripe needs the kind's
    /// meter, or its usage would never reach the price.
    fn check_unit_meters(self) -> Result<Self, ConfigError> {
        for (i, tier) in self.tiers.iter().enumerate() {
            for (kind, quota) in &tier.unit_quotas {
                if quota.stripe_overage_lookup_key.is_some()
                    && !self.billing.unit_meters.contains_key(kind)
                {
                    return Err(invalid(
                        format!("tiers[{i}].units.{kind}.stripe_overage_lookup_key"),
                        format!(
                            "add a meter for {kind}: [billing] unit_meters = {{ {kind} = \"tollgate_{kind}\" }}"
                        ),
                    ));
                }
            }
        }
        Ok(self)
    }

    /// `[[routes]]`, checked against the models the backends serve.
    fn with_routes(mut self, raw: Vec<routes::RawRoute>) -> Result<Self, ConfigError> {
        self.routes = routes::validate(raw, &self.models(), self.server.max_body_bytes)?;
        Ok(self)
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
                    "must be longer than the longest max_queue_wait plus server.read_timeout \
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

// ---------------------------------------------------------------- shared value types

/// A duration as written in the file: a humantime string ("30s", "5m",
/// "500ms"), or bare seconds ("60") as the SQL_* variables are commonly
/// written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HumanDuration(pub Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse_duration(&text)
            .map(Self)
            .ok_or_else(|| not_a_duration(&text))
    }
}

impl HumanDuration {
    /// The value written, else `default`.
    fn or(value: Option<Self>, default: Duration) -> Duration {
        value.map_or(default, |d| d.0)
    }
}

fn not_a_duration(text: &str) -> String {
    format!("`{text}` is not a duration like \"30s\", \"500ms\" or \"2m\"")
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

/// A key and the spelling it replaced (`fleet.drain_timeout` for
/// `fleet.drain_timeout_secs`): the value under the new key, else the one
/// under the old, with a warning naming the new key; both set is refused.
/// Also returns the key the value came from, for the errors that follow.
fn renamed<T>(
    key: String,
    value: Option<T>,
    old_key: String,
    old_value: Option<T>,
) -> Result<(Option<T>, String), ConfigError> {
    match (value, old_value) {
        (Some(_), Some(_)) => Err(invalid(
            old_key,
            format!("is the deprecated spelling of `{key}`: set only `{key}`"),
        )),
        (None, Some(old)) => {
            tracing::warn!(
                "config key `{old_key}` is deprecated: write `{key}` as a duration such as \"300s\" or \"5m\""
            );
            Ok((Some(old), old_key))
        }
        (value, None) => Ok((value, key)),
    }
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

/// The duration in env `name` when set, else the file's, else `default`.
fn override_duration(
    env: &dyn Env,
    name: &str,
    key: &str,
    file: Option<HumanDuration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match env.var(name) {
        None => Ok(HumanDuration::or(file, default)),
        Some(v) => parse_duration(&v).ok_or_else(|| invalid(key, not_a_duration(&v))),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the sections' tests share: an env from a map and a parser that
    //! reports errors as `load` does.
    use std::collections::HashMap;

    use super::{Config, ConfigError, Env, RawConfig};

    pub struct MapEnv(pub HashMap<&'static str, &'static str>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    pub fn no_env() -> MapEnv {
        MapEnv(HashMap::new())
    }

    /// One tier and one backend: the least a config must have.
    pub const MINIMAL: &str = r#"
        [[tiers]]
        name = "free"
        [[backends]]
        name = "sim"
        url = "http://127.0.0.1:8101"
        models = ["sim-model"]
    "#;

    pub fn parse(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw = RawConfig::parse(text).map_err(|message| ConfigError::Parse {
            path: "test".into(),
            message,
        })?;
        Config::validate(raw, env)
    }

    /// The error `text` (after [`MINIMAL`]) gets, as text.
    pub fn error(extra: &str) -> String {
        match parse(&format!("{MINIMAL}\n{extra}"), &no_env()) {
            Ok(_) => format!("no error for {extra:?}"),
            Err(e) => e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::testing::{MINIMAL, MapEnv, error, no_env, parse};
    use super::*;
    use tollgate_metering::units::UnitKind;

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
        use secrecy::ExposeSecret;
        assert_eq!(config.database.url.expose_secret(), "postgres://env/db");
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
        let err = error("[server]\nlisten_addr = \"x\"\n");
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
            let err = error(extra);
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

    /// Enum-like values are read by serde: a misspelling names its key and
    /// the accepted spellings.
    #[test]
    fn misspelt_choices_name_the_key_and_the_choices() {
        let cases = [
            (
                "[routing]\npolicy = \"random\"\n",
                "routing.policy",
                "least_outstanding",
            ),
            (
                "[metering]\ndefault_encoding = \"p50k_base\"\n",
                "metering.default_encoding",
                "o200k_base",
            ),
            (
                "[[backends]]\nname = \"t\"\nurl = \"http://h:1\"\nmodels = [\"m\"]\nprotocol = \"grpc\"\n",
                "backends[1].protocol",
                "triton",
            ),
        ];
        for (extra, key, choice) in cases {
            let err = error(extra);
            assert!(
                err.contains(key) && err.contains(choice),
                "{extra:?} → {err}"
            );
        }
    }

    #[test]
    fn a_unit_kind_sold_in_stripe_needs_its_meter() {
        let tiers = "[[tiers]]\nname = \"starter\"\n[tiers.units.images]\nhard_cap = false\n\
                     overage_price = 0.025\nstripe_overage_lookup_key = \"starter_images\"\n";
        let config = MINIMAL.replace("[[tiers]]\n        name = \"free\"", "");
        let err = parse(&format!("{config}\n{tiers}"), &no_env())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tiers[0].units.images.stripe_overage_lookup_key")
                && err.contains("unit_meters"),
            "{err}"
        );
        let with_meter = format!(
            "{config}\n[billing]\nunit_meters = {{ images = \"tollgate_images\" }}\n{tiers}"
        );
        parse(&with_meter, &no_env()).unwrap();
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

        let images = plan("images");
        let quotas: Vec<_> = images
            .tiers
            .iter()
            .map(|t| {
                let q = t.quota(UnitKind::Images).unwrap();
                (t.name.as_str(), q.included, q.daily_cap, q.overage_price)
            })
            .collect();
        assert_eq!(
            quotas,
            [
                ("free", Some(50), Some(20), None),
                ("starter", Some(500), None, Some(0.025)),
                ("creator", Some(2000), None, Some(0.018)),
                ("studio", Some(10000), None, Some(0.012)),
            ]
        );
        assert!(images.tiers[0].quota(UnitKind::Images).unwrap().hard_cap);
        assert!(!images.tiers[0].is_paid() && images.tiers[1].is_paid());

        let speech = plan("speech");
        let names: Vec<_> = speech.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["free", "creator", "studio"]);
        let free = &speech.tiers[0];
        assert_eq!(
            free.quota(UnitKind::Characters)
                .map(|q| (q.included, q.daily_cap)),
            Some((Some(20000), Some(2000)))
        );
        assert_eq!(
            free.quota(UnitKind::GpuSeconds).and_then(|q| q.included),
            Some(300)
        );
        assert_eq!(
            speech.tiers[1]
                .quota(UnitKind::Characters)
                .and_then(|q| q.overage_price),
            Some(0.00002)
        );
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

    /// A `*_secs` key still works, under its new name; written beside its
    /// new spelling it is refused, since the two could disagree.
    #[test]
    fn deprecated_seconds_keys_are_read_and_conflicts_refused() {
        let fleet = |extra: &str| {
            parse(&format!("{MINIMAL}\n[fleet]\n{extra}\n"), &no_env())
                .map(|c| c.fleet.timing.drain_timeout)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            fleet("drain_timeout_secs = 120"),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(
            fleet("drain_timeout = \"2m\""),
            Ok(Duration::from_secs(120))
        );
        let both = fleet("drain_timeout = \"2m\"\ndrain_timeout_secs = 60").unwrap_err();
        assert!(
            both.contains("fleet.drain_timeout_secs")
                && both.contains("set only `fleet.drain_timeout`"),
            "{both}"
        );

        let tier = |line: &str| {
            parse(
                &format!("{MINIMAL}\n[[tiers]]\nname = \"pro\"\n{line}\n"),
                &no_env(),
            )
            .map(|c| c.tiers[1].max_queue_wait)
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            tier("max_queue_wait_secs = 1.5"),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(
            tier("max_queue_wait = \"1s 500ms\""),
            Ok(Duration::from_millis(1500))
        );
        let both = tier("max_queue_wait = \"1s\"\nmax_queue_wait_secs = 1").unwrap_err();
        assert!(both.contains("tiers[1].max_queue_wait_secs"), "{both}");
    }

    /// Nothing secret reaches a log line through `{:?}` of the whole config.
    #[test]
    fn config_debug_prints_no_secret() {
        let text = format!(
            "{MINIMAL}credential = \"sk-backend-hunter2\"\n\
             [database]\nurl = \"postgres://tollgate:hunter2@db/tollgate\"\n\
             [redis]\nurl = \"redis://:hunter2@127.0.0.1:6379\"\n\
             [admin]\ntoken = \"hunter2-hunter2-hunter2\"\n"
        );
        let env = MapEnv(HashMap::from([
            ("STRIPE_SECRET_KEY", "sk_test_hunter2"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_hunter2"),
        ]));
        let config = parse(&text, &env).unwrap();
        assert!(config.billing.stripe.is_some() && config.backends[0].credential.is_some());
        let printed = format!("{config:?} {config:#?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("REDACTED"), "{printed}");
    }
}
