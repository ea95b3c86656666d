//! Postgres: the connection pool and the schema migrations in `sql/`.
//!
//! Small servers fall over from too many connections, so the pool is small
//! by default and its limits are the familiar `SQL_MAX_*` settings: at most
//! `max_open_conns` connections; idle ones beyond `max_idle_conns`, idle for
//! longer than `max_idle_time`, or older than `max_lifetime` are closed by
//! the [`PoolJanitor`].
//!
//! Every connection Tollgate opens, pooled or not, goes through
//! [`tls::PostgresTarget`], so `sslmode` and `sslrootcert` in `database.url`
//! mean the same everywhere (see [`tls`] for what each mode checks).

pub mod tls;

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use secrecy::ExposeSecret;
use tokio::task::JoinHandle;

use crate::config::DatabaseConfig;
use tls::PostgresTarget;

refinery::embed_migrations!("../sql");

/// How long a caller waits for a pooled connection or a new one: bounded, so
/// a Postgres outage surfaces as an error instead of a hung request.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// How often the janitor trims idle connections.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);

/// The role Grafana's Postgres datasource logs in as. `sql/V7__grafana_reader.sql`
/// creates it without login and lets it read what the dashboards query and
/// nothing else; [`allow_grafana_login`] gives it a password.
pub const GRAFANA_ROLE: &str = "tollgate_grafana";

pub fn pool(config: &DatabaseConfig) -> anyhow::Result<Pool> {
    let target = PostgresTarget::parse(config.url.expose_secret())?;
    let manager = Manager::from_config(
        target.config,
        target.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(config.max_open_conns)
        .timeouts(Timeouts {
            wait: Some(POOL_WAIT),
            create: Some(POOL_WAIT),
            recycle: Some(POOL_WAIT),
        })
        .runtime(Runtime::Tokio1)
        .build()?)
}

/// Applies the pending migrations from `sql/`; running it again changes nothing.
/// Returns the names of the migrations applied now.
pub async fn migrate(config: &DatabaseConfig) -> anyhow::Result<Vec<String>> {
    let (mut client, driver) = connect(config).await?;
    let report = migrations::runner().run_async(&mut client).await?;
    drop(client);
    let _ = driver.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}

/// The tiers accounts are on, from a connection of its own (before the
/// server's runtimes exist); `None` when Postgres does not answer in time.
pub async fn account_tiers(config: &DatabaseConfig) -> anyhow::Result<Option<Vec<String>>> {
    // A URL that cannot work is the operator's to fix now, not "unreachable".
    let target = PostgresTarget::parse(config.url.expose_secret())?;
    let (client, driver) = match tokio::time::timeout(POOL_WAIT, open(target)).await {
        Ok(Ok(connected)) => connected,
        Ok(Err(e)) => {
            // tokio-postgres's errors keep their cause (a refused certificate,
            // a wrong password) in the chain, not in their own message.
            tracing::warn!(error = %format!("{e:#}"), "cannot connect to Postgres");
            return Ok(None);
        }
        Err(_) => return Ok(None),
    };
    let rows = client
        .query("SELECT DISTINCT tier FROM accounts ORDER BY tier", &[])
        .await?;
    drop(client);
    let _ = driver.await;
    Ok(Some(rows.iter().map(|row| row.get(0)).collect()))
}

/// Lets [`GRAFANA_ROLE`] log in with `password`. Only the SCRAM-SHA-256
/// verifier is sent, computed here as libpq's `PQencryptPasswordConn` does, so
/// the password never reaches the server's statement log. Running it again
/// with the same password changes nothing that matters (a new salt).
pub async fn allow_grafana_login(config: &DatabaseConfig, password: &str) -> anyhow::Result<()> {
    let (client, driver) = connect(config).await?;
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    // ALTER ROLE takes no bind parameters; a verifier is base64, `$` and `:`
    // only, so it cannot end the quoted literal.
    client
        .batch_execute(&format!(
            "ALTER ROLE {GRAFANA_ROLE} WITH LOGIN PASSWORD '{verifier}'"
        ))
        .await?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// One connection outside the pool, as `database.url` asks (TLS included),
/// and the task driving it: it ends when the client is dropped.
pub async fn connect(
    config: &DatabaseConfig,
) -> anyhow::Result<(tokio_postgres::Client, JoinHandle<()>)> {
    open(PostgresTarget::parse(config.url.expose_secret())?).await
}

async fn open(target: PostgresTarget) -> anyhow::Result<(tokio_postgres::Client, JoinHandle<()>)> {
    let (client, connection) = target.config.connect(target.tls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "Postgres connection ended");
        }
    });
    Ok((client, driver))
}

/// Background service enforcing the idle and lifetime limits of the pool.
pub struct PoolJanitor {
    pub pool: Pool,
    pub max_idle_conns: usize,
    pub max_idle_time: Duration,
    pub max_lifetime: Duration,
}

impl PoolJanitor {
    fn trim(&self) {
        let mut idle_kept = 0;
        self.pool.retain(|_, metrics| {
            let keep = metrics.age() < self.max_lifetime
                && metrics.last_used() < self.max_idle_time
                && idle_kept < self.max_idle_conns;
            idle_kept += usize::from(keep);
            keep
        });
    }
}

#[async_trait]
impl BackgroundService for PoolJanitor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(JANITOR_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => self.trim(),
                _ = shutdown.changed() => return,
            }
        }
    }
}
