//! The `tollgate-simulate` command line: the workload, the simulated
//! cloud's timings, and where the report and chart go.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Fleet economics: replay a request trace (or a synthetic month) through
/// the real admission queue and fleet controller of `tollgate` in simulated
/// time, with simulated GPU instances priced from the config's backends.
/// Reports waits and shed share per tier, GPU-hours by state and the cost
/// against an always-hot fleet sized for the peak, and draws one day as an
/// SVG. Needs no database or backend: nothing real is started.
///
/// Reads the same config file as `tollgate` (--config); LOG_LEVEL (default
/// error) and LOG_FORMAT (text or json) set what it logs on stderr, and how.
#[derive(Debug, Parser)]
#[command(name = "tollgate-simulate", version, verbatim_doc_comment)]
#[command(group = clap::ArgGroup::new("workload").required(true).args(["trace", "synthetic"]))]
pub struct SimulateArgs {
    /// Config file (TOML), as `tollgate --config`; see config/fleet-sim.toml.
    #[arg(long, env = "TOLLGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    tollgate::config::parse_duration(value)
        .ok_or_else(|| format!("`{value}` is not a duration like \"45m\", \"3m\" or \"500ms\""))
}
