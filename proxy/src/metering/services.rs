//! The usage writer and the usage-log upkeep as Pingora background services.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tollgate_metering::partitions;
use tollgate_metering::writer::UsageWriter;

use crate::store_errors::{self, PostgresOperation};

/// Runs the [`UsageWriter`]. It ignores Pingora's shutdown signal on purpose:
/// requests still draining produce events, so the writer lives until the
/// drainer has flushed it and ends the process.
pub struct UsageWriterService(pub Mutex<Option<UsageWriter>>);

#[async_trait]
impl BackgroundService for UsageWriterService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // The lock is only taken here, once, to move the writer out.
        let writer = self.0.lock().ok().and_then(|mut slot| slot.take());
        if let Some(writer) = writer {
            writer.run(std::future::pending()).await;
        }
    }
}

/// How often partitions ahead and rollup retention are checked.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// Keeps the next months' partitions created and old rollups deleted.
pub struct UsageUpkeep {
    pub pool: Pool,
    pub minute_rollup_retention: Duration,
    pub rollup_retention: Duration,
}

impl UsageUpkeep {
    async fn run_once(&self) {
        match self.pool.get().await {
            Ok(client) => match partitions::ensure_ahead(&client).await {
                Ok(names) => tracing::debug!(?names, "usage partitions ensured"),
                Err(error) => {
                    store_errors::postgres(PostgresOperation::UsageUpkeep);
                    tracing::warn!("could not create usage partitions ahead: {error}");
                }
            },
            Err(error) => {
                store_errors::postgres(PostgresOperation::UsageUpkeep);
                tracing::warn!("usage upkeep: no Postgres connection: {error}");
            }
        }
        match partitions::purge_rollups(
            &self.pool,
            self.minute_rollup_retention,
            self.rollup_retention,
        )
        .await
        {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "old usage rollups deleted"),
            Err(error) => {
                store_errors::postgres(PostgresOperation::UsageUpkeep);
                tracing::warn!("could not delete old usage rollups: {error}");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for UsageUpkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => self.run_once().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}
