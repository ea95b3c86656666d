//! `[jobs]`: durable async jobs (docs/jobs.md): where their results are
//! kept, how each gateway runs them, and the upkeep of both. Each tier sets
//! its jobs' wait budget and result retention (`job_max_wait`,
//! `result_retention` in `[[tiers]]`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, HumanDuration, defaults, invalid, positive};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJobs {
    results_dir: Option<PathBuf>,
    results_url: Option<String>,
    lease: Option<HumanDuration>,
    poll_interval: Option<HumanDuration>,
    max_running: Option<usize>,
    max_queued_per_account: Option<u64>,
    sweep_interval: Option<HumanDuration>,
    record_retention: Option<HumanDuration>,
    callback_retry_for: Option<HumanDuration>,
    callback_allow_private: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobsConfig {
    /// Where results are written: a directory (every gateway must reach the
    /// same one), unless `results_url` names a bucket.
    pub results_dir: PathBuf,
    /// `s3://bucket/prefix`: results in an S3-compatible bucket.
    pub results_url: Option<String>,
    /// How long a claimed job stays its runner's without a renewal.
    pub lease: Duration,
    /// How often a runner looks for jobs submitted elsewhere.
    pub poll_interval: Duration,
    /// Jobs this gateway runs at once.
    pub max_running: usize,
    /// Queued jobs per account; more are refused with 429.
    pub max_queued_per_account: u64,
    /// How often expired results are deleted.
    pub sweep_interval: Duration,
    /// How long ended jobs' records are kept.
    pub record_retention: Duration,
    /// How long a callback that fails is retried.
    pub callback_retry_for: Duration,
    /// Callbacks may go to private and loopback addresses (a test, a
    /// gateway whose clients are all inside its own network).
    pub callback_allow_private: bool,
}

pub(super) fn validate(j: RawJobs) -> Result<JobsConfig, ConfigError> {
    if j.results_dir.is_some() && j.results_url.is_some() {
        return Err(invalid(
            "jobs.results_url",
            "results go to a directory or a bucket: set results_dir or results_url, not both",
        ));
    }
    if let Some(url) = &j.results_url {
        let bucket = url
            .strip_prefix("s3://")
            .map(|rest| rest.split('/').next().unwrap_or(""));
        if bucket.is_none_or(str::is_empty) {
            return Err(invalid(
                "jobs.results_url",
                format!("`{url}` is not an S3 URL like s3://bucket/prefix"),
            ));
        }
    }
    let config = JobsConfig {
        results_dir: j
            .results_dir
            .unwrap_or_else(|| PathBuf::from(defaults::RESULTS_DIR)),
        results_url: j.results_url,
        lease: HumanDuration::or(j.lease, defaults::JOB_LEASE),
        poll_interval: HumanDuration::or(j.poll_interval, defaults::JOB_POLL_INTERVAL),
        max_running: positive(
            "jobs.max_running",
            j.max_running.unwrap_or(defaults::JOB_MAX_RUNNING),
        )?,
        max_queued_per_account: j
            .max_queued_per_account
            .unwrap_or(defaults::JOB_MAX_QUEUED_PER_ACCOUNT),
        sweep_interval: HumanDuration::or(j.sweep_interval, defaults::JOB_SWEEP_INTERVAL),
        record_retention: HumanDuration::or(j.record_retention, defaults::JOB_RECORD_RETENTION),
        callback_retry_for: HumanDuration::or(j.callback_retry_for, defaults::CALLBACK_RETRY_FOR),
        callback_allow_private: j.callback_allow_private.unwrap_or(false),
    };
    // A lease renewed every third of it survives one slow renewal.
    if config.lease < Duration::from_secs(3) {
        return Err(invalid(
            "jobs.lease",
            "must be at least 3s (it is renewed every third of it)",
        ));
    }
    for (key, value) in [
        ("jobs.poll_interval", config.poll_interval),
        ("jobs.sweep_interval", config.sweep_interval),
    ] {
        if value.is_zero() {
            return Err(invalid(key, "must be longer than zero"));
        }
    }
    Ok(config)
}
