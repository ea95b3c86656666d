//! The jobs' upkeep, every `jobs.sweep_interval` on every gateway (each
//! step takes rows with `SKIP LOCKED`, so gateways share the work): expired
//! results and batch files are deleted from the result store (what each
//! tier's `result_retention` promised to free, freed), old records of ended
//! jobs are deleted, batches whose last job ended unseen are finalized, and
//! the jobs' figures are refreshed for the metrics.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
};
use tollgate_metering::metric_names;

use super::Jobs;
use super::batches;
use super::store::{self, JobState};
use crate::keys::store::StoreError;

/// Rows one statement of the sweep touches, so none holds locks for long.
const SWEEP_BATCH: i64 = 1_000;

/// The jobs' metrics.
#[derive(Clone)]
pub struct JobMetrics {
    by_state: IntGaugeVec,
    /// Submission to GPU slot, by tier; observed by the gateway that runs it.
    pub wait: HistogramVec,
    oldest_queued: Gauge,
    result_bytes: IntGauge,
    freed_bytes: IntCounter,
}

impl JobMetrics {
    pub fn new(registry: &Registry, tiers: &[String]) -> prometheus::Result<Self> {
        let by_state = IntGaugeVec::new(
            Opts::new(
                metric_names::JOBS,
                "Jobs by state, every gateway's, as of this gateway's last sweep.",
            ),
            &["state"],
        )?;
        let wait = HistogramVec::new(
            HistogramOpts::new(
                metric_names::JOB_WAIT_SECONDS,
                "Jobs from submission to their GPU slot, by tier.",
            )
            .buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
            ]),
            &["tier"],
        )?;
        let oldest_queued = Gauge::new(
            metric_names::JOB_OLDEST_QUEUED_SECONDS,
            "Age of the oldest job not claimed yet, as of the last sweep.",
        )?;
        let result_bytes = IntGauge::new(
            metric_names::JOB_RESULT_BYTES,
            "Bytes of job results kept in the result store, as of the last sweep.",
        )?;
        let freed_bytes = IntCounter::new(
            metric_names::JOB_RESULTS_FREED_BYTES_TOTAL,
            "Bytes of expired job results this gateway deleted.",
        )?;
        registry.register(Box::new(by_state.clone()))?;
        registry.register(Box::new(wait.clone()))?;
        registry.register(Box::new(oldest_queued.clone()))?;
        registry.register(Box::new(result_bytes.clone()))?;
        registry.register(Box::new(freed_bytes.clone()))?;
        for state in JobState::ALL {
            by_state.with_label_values(&[state.as_str()]);
        }
        for tier in tiers {
            wait.with_label_values(&[tier.as_str()]);
        }
        Ok(Self {
            by_state,
            wait,
            oldest_queued,
            result_bytes,
            freed_bytes,
        })
    }
}

pub struct JobUpkeep {
    pub jobs: Arc<Jobs>,
}

#[async_trait]
impl BackgroundService for JobUpkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticks = tokio::time::interval(self.jobs.config.sweep_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(error) = self.sweep().await {
                tracing::warn!("job upkeep: {error}");
            }
        }
    }
}

impl JobUpkeep {
    /// One sweep; returns the bytes of results it freed.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let pool = &self.jobs.pool;
        let mut freed = 0;
        for (tier, jobs) in &self.jobs.tiers {
            loop {
                let expired = store::expire(pool, tier, jobs.retention, SWEEP_BATCH).await?;
                for result in &expired {
                    match self.jobs.results.delete(&result.result_key).await {
                        Ok(()) => freed += result.bytes.max(0) as u64,
                        Err(error) => {
                            tracing::warn!(job = %result.id, "expired result not deleted: {error}")
                        }
                    }
                }
                if (expired.len() as i64) < SWEEP_BATCH {
                    break;
                }
            }
        }
        loop {
            let expired = batches::expire_files(pool, SWEEP_BATCH).await?;
            for file in &expired {
                match self.jobs.results.delete(&file.storage_key).await {
                    Ok(()) => freed += file.bytes.max(0) as u64,
                    Err(error) => {
                        tracing::warn!(file = %file.id, "expired file not deleted: {error}")
                    }
                }
            }
            if (expired.len() as i64) < SWEEP_BATCH {
                break;
            }
        }
        // Batches whose finalizer never came (its gateway died first).
        for batch in batches::due_batches(pool, SWEEP_BATCH).await? {
            self.jobs.finalize_batch(batch).await;
        }
        self.jobs.metrics.freed_bytes.inc_by(freed);
        if freed > 0 {
            tracing::info!(bytes = freed, "expired job results deleted");
        }
        while store::retire(pool, self.jobs.config.record_retention, SWEEP_BATCH).await?
            == SWEEP_BATCH as u64
        {}
        let figures = store::figures(pool).await?;
        for (state, count) in figures.by_state {
            self.jobs
                .metrics
                .by_state
                .with_label_values(&[state.as_str()])
                .set(count);
        }
        self.jobs.metrics.result_bytes.set(figures.result_bytes);
        self.jobs
            .metrics
            .oldest_queued
            .set(figures.oldest_queued.as_secs_f64());
        Ok(freed)
    }
}
