//! `/readyz`'s Postgres check, made in the background so that probes (which
//! load balancers send every few seconds, and which anyone can send) never
//! wait on Postgres or add load to it. The answer is a check at most
//! [`MAX_AGE`] old: a check that has not succeeded within it, because
//! Postgres is down or hangs, reads as unreachable.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// How old a successful check may be and still count.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// Checks twice per [`MAX_AGE`], each allowed half of it, so one slow check
/// does not make a healthy database look down.
const INTERVAL: Duration = Duration::from_millis(500);

/// The last time Postgres answered `SELECT 1`.
#[derive(Default)]
pub struct PostgresReadiness {
    /// A std `Mutex`: held for a copy, never across an `.await`.
    last_answer: Mutex<Option<Instant>>,
}

impl PostgresReadiness {
    /// Whether Postgres answered within the last [`MAX_AGE`].
    pub fn reachable(&self) -> bool {
        let last = *self
            .last_answer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.is_some_and(|at| at.elapsed() <= MAX_AGE)
    }

    fn answered(&self) {
        *self
            .last_answer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }
}

/// The background service that checks.
pub struct ReadinessProbe {
    pub pool: Pool,
    pub readiness: std::sync::Arc<PostgresReadiness>,
}

impl ReadinessProbe {
    async fn check(&self) {
        let answered = tokio::time::timeout(INTERVAL, async {
            let client = self.pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        })
        .await
        .ok()
        .flatten()
        .is_some();
        if answered {
            self.readiness.answered();
        }
    }
}

#[async_trait]
impl BackgroundService for ReadinessProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => self.check().await,
                _ = shutdown.changed() => return,
            }
        }
    }
}
