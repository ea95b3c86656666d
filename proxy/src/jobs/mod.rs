//! Durable async jobs: a request accepted at once (202) and run when a GPU
//! slot is free, by whichever gateway claims it (docs/jobs.md).
//!
//! - [`store`]: jobs in Postgres: submit (idempotent per account and key),
//!   read, list, cancel; and the runners' side: claim with a lease, renew
//!   it, finish, each write fenced by the claim's attempt;
//!   [`store::expire`] ends the results whose time is up.
//! - [`results`]: the answers, in a blob store (`object_store`), written as
//!   they stream and read back as streams.
//! - [`runner`]: each gateway's runner, which claims jobs and sends each to
//!   the gateway's own listener, so a job is admitted, queued by tier,
//!   routed and metered exactly as a live request; [`pass`] is how such a
//!   run proves itself there.
//! - [`upkeep`]: deletes expired results and old records, finalizes
//!   batches left unfinished, and reports the jobs' figures.
//! - [`callbacks`]: a signed POST when a job ends, retried with backoff.
//! - [`batches`]: OpenAI's Files and Batch APIs: a batch is a job per line
//!   of its input file, finalized into output and error files.
//!
//! The HTTP side (`/v1/jobs`, `Prefer: respond-async`, `/v1/files`,
//! `/v1/batches`) is in [`crate::gateway::jobs`] and
//! [`crate::gateway::batches`].

pub mod batches;
pub mod callbacks;
pub mod pass;
pub mod results;
pub mod runner;
pub mod store;
pub mod upkeep;

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use uuid::Uuid;

use self::pass::{JobRun, RunPass};
use self::results::ResultStore;
use self::upkeep::JobMetrics;
use crate::admission::queue::PoolSnapshot;
use crate::config::{JobsConfig, TierConfig};
use crate::keys::store::StoreError;

/// A tier's `job_max_wait` and `result_retention`.
#[derive(Debug, Clone, Copy)]
pub struct TierJobs {
    pub max_wait: Duration,
    pub retention: Duration,
}

/// What the API and the runner of one gateway share.
pub struct Jobs {
    pub pool: Pool,
    pub results: ResultStore,
    pub config: JobsConfig,
    pub metrics: JobMetrics,
    /// What each tier says of its jobs.
    pub tiers: HashMap<String, TierJobs>,
    /// Proves this process's runs to its gateway.
    pub pass: RunPass,
    /// This process's name on the leases it holds: a restarted gateway is
    /// another owner, and takes its predecessor's jobs back only once their
    /// leases lapse.
    pub owner: String,
    /// Wakes this gateway's runner when a job is submitted here.
    pub submitted: Notify,
    /// The runs in progress here, so a cancel here stops one at once.
    running: Mutex<HashMap<Uuid, AbortHandle>>,
}

impl Jobs {
    pub fn new(
        pool: Pool,
        results: ResultStore,
        config: JobsConfig,
        metrics: JobMetrics,
        tiers: &[TierConfig],
    ) -> Self {
        let tiers = tiers
            .iter()
            .map(|t| {
                let jobs = TierJobs {
                    max_wait: t.job_max_wait,
                    retention: t.result_retention,
                };
                (t.name.clone(), jobs)
            })
            .collect();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".to_owned());
        Self {
            pool,
            results,
            config,
            metrics,
            tiers,
            pass: RunPass::default(),
            owner: format!("{host}:{}:{}", std::process::id(), Uuid::now_v7().simple()),
            submitted: Notify::new(),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Records that `run`'s request has its GPU slot and is about to be
    /// sent; `false` when the run's claim was lost (the job was cancelled,
    /// or another gateway took it over): then it must not be sent.
    pub async fn mark_sent(&self, run: &JobRun, tier: &str) -> Result<bool, StoreError> {
        let sent = store::mark_sent(&self.pool, run.id, run.attempt).await?;
        if sent && let Ok(waited) = run.submitted_at().elapsed() {
            self.metrics
                .wait
                .with_label_values(&[tier])
                .observe(waited.as_secs_f64());
        }
        Ok(sent)
    }

    /// How long `tier` keeps results.
    pub fn retention(&self, tier: &str) -> Duration {
        self.tiers.get(tier).map_or(Duration::ZERO, |t| t.retention)
    }

    /// How long a job of `tier` may wait to start, from its submission.
    pub fn max_wait(&self, tier: &str) -> Duration {
        self.tiers.get(tier).map_or(Duration::ZERO, |t| t.max_wait)
    }

    /// Finalizes batch `id` if it is done (see [`batches::finalize`]).
    pub async fn finalize_batch(&self, id: Uuid) {
        match batches::finalize(&self.pool, &self.results, id, |tier| self.retention(tier)).await {
            Ok(true) => tracing::info!(batch = %id, "batch finalized"),
            Ok(false) => {}
            // Left for the upkeep's next sweep.
            Err(error) => tracing::warn!(batch = %id, "batch not finalized: {error}"),
        }
    }

    /// Records what `run` waits for in `queue` before it waits: a GPU to
    /// wake when the pool has none, and when it should start (the tier's
    /// expected wait), when it will wait at all. Best effort: the run goes
    /// on if Postgres does not answer.
    pub async fn note_wait(&self, run: &JobRun, tier: &str, queue: &PoolSnapshot) {
        let now = SystemTime::now();
        let waking = (queue.capacity == 0).then_some(now);
        let expected = queue
            .tiers
            .iter()
            .find(|t| t.tier == tier)
            .and_then(|t| t.expected_wait)
            // A slot free now: nothing worth a write.
            .filter(|wait| !wait.is_zero())
            .map(|wait| now + wait);
        if (waking, expected) == (None, None) {
            return;
        }
        if let Err(error) =
            store::note_wait(&self.pool, run.id, run.attempt, waking, expected).await
        {
            tracing::warn!(job = %run.id, "job wait not recorded: {error}");
        }
    }

    /// Stops the job's run if it is in progress here.
    pub fn abort_local(&self, id: Uuid) {
        if let Some(run) = self.running().remove(&id) {
            run.abort();
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, AbortHandle>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
