//! `tollgate-simulate`: the fleet's economics, measured by replaying a
//! workload through the real admission queue and the real lifecycle
//! controller in simulated time.
//!
//! A crate of its own, beside the server rather than inside it: it needs
//! tokio's `test-util` (the paused clock), plotters, rand_distr and
//! hdrhistogram, none of which the gateway has any use for, and a server
//! binary should not link a simulator. It depends on the `tollgate` library
//! for the admission queue and the config, and on `tollgate-backends` for
//! the fleet controller, exactly as the gateway runs them.
//!
//! Nothing is faked above the provider: requests wait in
//! [`Admission::wait_for_slot`] (priority, aging, shedding as configured),
//! take a lease from the real [`BackendPool`], and the [`FleetController`]
//! reads the queues and wakes and stops instances by the `[fleet]` policy.
//! Only the GPU cloud is simulated ([`provider::SimProvider`]: cold start,
//! resume, resume failures) and so is the inference (a request holds its slot
//! for `ttft + completion_tokens / tokens_per_sec`).
//!
//! Time is tokio's paused clock on a current-thread runtime: whenever every
//! task waits, the clock jumps to the next timer, so a month of traffic runs
//! in seconds to minutes of real time and nothing sleeps for real.
//!
//! Layout: [`cli`] (the command line), [`trace`] (CSV traces, the diurnal
//! generator), [`provider`]
//! (the simulated cloud), [`ledger`] (GPU-hours and cost by state from the
//! controller's transitions), [`chart`] (the SVG); this file runs a
//! simulation and reports it, and `main.rs` only parses and dispatches.
//!
//! The baseline is an always-hot fleet sized for the peak: as many instances
//! as were ever hot at once in the run, billed at the running price for the
//! whole period. A second run serves the same workload with that many static
//! (always hot) backends to show its waits.

pub mod chart;
pub mod cli;
pub mod ledger;
pub mod provider;
pub mod trace;

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use hdrhistogram::Histogram;
use prometheus::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tollgate_backends::balance::RequestFacts;
use tollgate_backends::balance::breaker::BreakerConfig;
use tollgate_backends::fleet::controller::{Connections, FleetController, Managed, Readiness};
use tollgate_backends::fleet::policy::Scaler;
use tollgate_backends::health::{DEFAULT_HEALTH_PATH, Probe};
use tollgate_backends::routing::{Backend, BackendId, BackendPool, UpstreamSelector};

use tollgate::admission::Admission;
use tollgate::admission::queue::AdmissionQueue;
use tollgate::config::{Config, ProviderConfig};
use tollgate::error::ApiError;

use self::chart::Sample;
use self::cli::{SimulateArgs, Synthetic};
use self::ledger::{ByState, Ledger, Totals};
use self::provider::{ProviderCalls, SimProvider, SimTiming};
use self::trace::{Arrival, Diurnal, DiurnalParams, TokenModel, TraceReader};

/// The fleet and queue are sampled for the chart this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// Waits are kept in milliseconds, 3 significant digits, up to a day (longer
/// ones are recorded as a day: no tier waits that long).
const WAIT_SIGFIG: u8 = 3;
const WAIT_MAX_MS: u64 = 24 * 3600 * 1000;

/// What a request costs the GPU: its slot is held this long.
#[derive(Debug, Clone, Copy)]
pub struct ServiceModel {
    pub ttft: Duration,
    pub tokens_per_sec: f64,
}

impl ServiceModel {
    fn time(&self, arrival: &Arrival) -> Duration {
        self.ttft
            + Duration::from_secs_f64(f64::from(arrival.completion_tokens) / self.tokens_per_sec)
    }
}

/// Where the requests come from.
#[derive(Debug, Clone)]
pub enum Workload {
    Trace(PathBuf),
    Diurnal(DiurnalParams),
}

/// One simulation, validated.
#[derive(Debug, Clone)]
pub struct Options {
    pub workload: Workload,
    pub model: String,
    pub service: ServiceModel,
    pub timing: SimTiming,
    pub seed: u64,
    /// Also run the always-hot baseline to measure its waits.
    pub baseline_run: bool,
}

impl Options {
    /// From the command line, against the config (tiers, model, slots).
    pub fn from_args(config: &Config, args: &SimulateArgs) -> anyhow::Result<Self> {
        let model = match &args.model {
            Some(model) if config.models().contains(&model.as_str()) => model.clone(),
            Some(model) => anyhow::bail!(
                "--model {model}: no backend serves it (configured: {})",
                config.models().join(", ")
            ),
            None => config
                .models()
                .first()
                .map(|m| (*m).to_owned())
                .ok_or_else(|| anyhow::anyhow!("the config has no backends"))?,
        };
        if !(args.tokens_per_sec > 0.0 && args.tokens_per_sec.is_finite()) {
            anyhow::bail!("--tokens-per-sec must be more than 0");
        }
        if !(0.0..=1.0).contains(&args.resume_failure_rate) {
            anyhow::bail!("--resume-failure-rate must be between 0 and 1");
        }
        let service = ServiceModel {
            ttft: args.ttft,
            tokens_per_sec: args.tokens_per_sec,
        };
        let workload = match (&args.trace, args.synthetic) {
            (Some(path), _) => Workload::Trace(path.clone()),
            (None, Some(Synthetic::Diurnal)) => {
                let tiers = tier_names(config);
                let mut mix = Vec::new();
                for pair in &args.mix {
                    let (tier, weight) = pair.split_once('=').ok_or_else(|| {
                        anyhow::anyhow!("--mix {pair}: expected tier=weight, like free=60")
                    })?;
                    let index = tiers.iter().position(|t| t == tier.trim()).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--mix: tier `{tier}` is not configured (configured: {})",
                            tiers.join(", ")
                        )
                    })?;
                    let weight: f64 = weight
                        .trim()
                        .parse()
                        .ok()
                        .filter(|w: &f64| *w >= 0.0 && w.is_finite())
                        .ok_or_else(|| {
                            anyhow::anyhow!("--mix {pair}: the weight must be a number >= 0")
                        })?;
                    mix.push((index, weight));
                }
                if !(args.peak_load > 0.0 && args.peak_load.is_finite()) {
                    anyhow::bail!("--peak-load must be more than 0");
                }
                let tokens = TokenModel::default();
                let mean_service =
                    service.ttft.as_secs_f64() + tokens.mean_completion() / service.tokens_per_sec;
                let slots = f64::from(pool_slots(config, &model));
                Workload::Diurnal(DiurnalParams {
                    days: args.days,
                    // Little's law: busy slots = rate × service time.
                    peak_rate: args.peak_load * slots / mean_service,
                    peak_to_trough: args.peak_to_trough,
                    peak_hour: args.peak_hour,
                    bursts_per_day: args.bursts_per_day,
                    mix,
                    tokens,
                })
            }
            (None, None) => anyhow::bail!("give --trace FILE or --synthetic diurnal"),
        };
        Ok(Self {
            workload,
            model,
            service,
            timing: SimTiming {
                cold_start: args.cold_start,
                resume: args.resume,
                resume_failure_rate: args.resume_failure_rate,
            },
            seed: args.seed,
            baseline_run: !args.no_baseline_run,
        })
    }

    fn describe(&self) -> String {
        match &self.workload {
            Workload::Trace(path) => format!("trace {}", path.display()),
            Workload::Diurnal(p) => format!(
                "synthetic diurnal, {} days, seed {}: peak {:.2} req/s at {:.0}h UTC, \
                 {}x peak-to-trough, {} bursts/day",
                p.days, self.seed, p.peak_rate, p.peak_hour, p.peak_to_trough, p.bursts_per_day
            ),
        }
    }

    /// The workload from its beginning: read again (or regenerated from the
    /// seed) for each run.
    fn arrivals(
        &self,
        tiers: &[String],
    ) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<Arrival>> + Send>> {
        Ok(match &self.workload {
            Workload::Trace(path) => {
                let file = File::open(path)
                    .map_err(|e| anyhow::anyhow!("--trace {}: {e}", path.display()))?;
                Box::new(
                    TraceReader::new(BufReader::new(file), tiers.to_vec())
                        .map(|a| a.map_err(anyhow::Error::from)),
                )
            }
            Workload::Diurnal(params) => Box::new(
                Diurnal::new(params.clone(), self.seed)
                    .map_err(|e| anyhow::anyhow!("--synthetic diurnal: {e}"))?
                    .map(Ok),
            ),
        })
    }
}

/// `tollgate-simulate`: runs, writes the chart, prints the report.
pub fn run(config: &Config, args: &SimulateArgs) -> anyhow::Result<()> {
    let options = Options::from_args(config, args)?;
    let report = simulate(config, &options)?;
    let day = match args.chart_day {
        Some(0) => anyhow::bail!("--chart-day counts from 1"),
        Some(day) => u64::from(day - 1),
        None => report.busiest_day(),
    };
    let title = format!(
        "tollgate-simulate: day {} of {} (seed {})",
        day + 1,
        report.arrivals_per_day.len().max(1),
        options.seed
    );
    chart::draw(&args.chart, &report.samples, day, report.slots, &title)
        .map_err(|e| anyhow::anyhow!("--chart {}: {e}", args.chart.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
        println!("chart of day {}: {}", day + 1, args.chart.display());
    }
    Ok(())
}

/// Runs the fleet, then (if asked) the always-hot baseline, each on a fresh
/// paused runtime.
pub fn simulate(config: &Config, options: &Options) -> anyhow::Result<Report> {
    let config = pool_only(config, &options.model)?;
    let real = std::time::Instant::now();
    let fleet = paused_runtime()?.block_on(run_once(&config, options))?;
    let baseline_instances = fleet.totals.max_hot;
    let hours = fleet.totals.hours;
    let baseline_cost: f64 = config
        .backends
        .iter()
        .take(baseline_instances as usize)
        .map(|b| b.cost.running * hours)
        .sum();
    let baseline_run = if options.baseline_run && baseline_instances > 0 {
        let config = always_hot(&config, baseline_instances as usize);
        Some(paused_runtime()?.block_on(run_once(&config, options))?)
    } else {
        None
    };
    let real_seconds = real.elapsed().as_secs_f64();
    let instances = config.backends.len().max(1) as f64;
    let slots_per_instance = config
        .backends
        .iter()
        .map(|b| f64::from(b.max_concurrency))
        .sum::<f64>()
        / instances;
    let running_price = config.backends.iter().map(|b| b.cost.running).sum::<f64>() / instances;
    let ideal_cost = fleet.busy_slot_hours / slots_per_instance.max(1.0) * running_price;
    let saving = |cost: f64| (baseline_cost > 0.0).then(|| 100.0 * (1.0 - cost / baseline_cost));
    let simulated_hours = hours * if baseline_run.is_some() { 2.0 } else { 1.0 };
    let fleet_cost = fleet.totals.total_cost();
    Ok(Report {
        workload: options.describe(),
        hours,
        real_seconds,
        simulated_hours_per_second: simulated_hours / real_seconds.max(1e-9),
        slots: u32::try_from(config.backends.len()).unwrap_or(u32::MAX),
        saving_percent: saving(fleet_cost),
        baseline: Baseline {
            instances: baseline_instances,
            cost: baseline_cost,
            tiers: baseline_run.map(|run| run.tiers),
            ideal_cost,
            ideal_saving_percent: saving(ideal_cost),
        },
        samples: fleet.samples,
        arrivals_per_day: fleet.arrivals_per_day,
        fleet: FleetReport {
            requests: fleet.tiers.iter().map(|t| t.requests).sum(),
            tiers: fleet.tiers,
            gpu_hours: fleet.totals.gpu_hours,
            cost_by_state: fleet.totals.cost,
            cost: fleet_cost,
            max_hot: fleet.totals.max_hot,
            transitions: fleet.totals.transitions,
            rents: fleet.calls.creates,
            resumes: fleet.calls.resumes,
            resumes_refused: fleet.calls.resume_failures,
            stops: fleet.calls.stops,
            busy_slot_hours: fleet.busy_slot_hours,
            granted_without_backend: fleet.granted_without_backend,
        },
    })
}

fn paused_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
}

/// Tier names, lowest priority first (the admission queue's order).
fn tier_names(config: &Config) -> Vec<String> {
    let mut tiers: Vec<_> = config.tiers.iter().collect();
    tiers.sort_by_key(|t| t.priority);
    tiers.into_iter().map(|t| t.name.clone()).collect()
}

fn pool_slots(config: &Config, model: &str) -> u32 {
    let pool = config
        .backends
        .iter()
        .find(|b| b.models.iter().any(|m| m == model))
        .map(|b| b.pool.as_str());
    config
        .backends
        .iter()
        .filter(|b| Some(b.pool.as_str()) == pool)
        .map(|b| b.max_concurrency)
        .sum()
}

/// The config with only the backends of `model`'s pool: the others would
/// be woken by their floor and billed without serving anything simulated.
fn pool_only(config: &Config, model: &str) -> anyhow::Result<Config> {
    let pool = config
        .backends
        .iter()
        .find(|b| b.models.iter().any(|m| m == model))
        .map(|b| b.pool.clone())
        .ok_or_else(|| anyhow::anyhow!("no backend serves {model}"))?;
    let mut config = config.clone();
    config.backends.retain(|b| b.pool == pool);
    Ok(config)
}

/// The baseline: the first `n` backends, static (always hot).
fn always_hot(config: &Config, n: usize) -> Config {
    let mut config = config.clone();
    config.backends.truncate(n);
    for b in &mut config.backends {
        b.provider = ProviderConfig::Static;
    }
    config
}

/// The simulated inference servers are ready the moment their provider
/// call returns: the cold start and resume times are spent there.
struct Ready;

#[async_trait]
impl Readiness for Ready {
    async fn ready(&self, _backend: &Backend) -> bool {
        true
    }
}

/// One tier's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    pub tier: String,
    pub requests: u64,
    pub admitted: u64,
    /// Refused at once (expected wait too long) or after waiting out the
    /// tier's `max_queue_wait_secs`.
    pub shed_busy: u64,
    pub shed_timeout: u64,
    pub shed_share: f64,
    /// Queue waits of admitted requests, seconds.
    pub wait_p50: f64,
    pub wait_p99: f64,
    pub wait_max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub requests: u64,
    pub tiers: Vec<TierReport>,
    pub gpu_hours: ByState,
    pub cost_by_state: ByState,
    pub cost: f64,
    pub max_hot: u32,
    pub transitions: u64,
    /// Provider calls, the warm-up's (bringing `min_hot` up before the
    /// workload starts) included.
    pub rents: u64,
    pub resumes: u64,
    pub resumes_refused: u64,
    pub stops: u64,
    /// Slot-hours held by requests: the work itself.
    pub busy_slot_hours: f64,
    /// A slot was granted but no hot backend was there to take the request
    /// (should never happen: slots are the hot backends' capacity).
    pub granted_without_backend: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// The most instances hot at once in the fleet's run.
    pub instances: u32,
    /// Those instances at the running price for the whole period.
    pub cost: f64,
    /// Waits with that many always hot (`None` when not run).
    pub tiers: Option<Vec<TierReport>>,
    /// A fleet that woke instantly and kept every slot busy: the busy
    /// slot-hours in whole instances at the running price. No policy can
    /// cost less while serving the same requests.
    pub ideal_cost: f64,
    pub ideal_saving_percent: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: String,
    /// Simulated period, arrivals and the last answer included.
    pub hours: f64,
    pub real_seconds: f64,
    /// Simulated hours (both runs) per second of real time.
    pub simulated_hours_per_second: f64,
    /// Instance slots of the pool.
    pub slots: u32,
    pub fleet: FleetReport,
    pub baseline: Baseline,
    /// Of the baseline's cost; `None` when the baseline costs nothing.
    pub saving_percent: Option<f64>,
    #[serde(skip)]
    pub samples: Vec<Sample>,
    #[serde(skip)]
    pub arrivals_per_day: Vec<u64>,
}

impl Report {
    /// The day (from 0) with the most arrivals.
    pub fn busiest_day(&self) -> u64 {
        let mut best = (0, 0);
        for (day, &count) in self.arrivals_per_day.iter().enumerate() {
            if count > best.1 {
                best = (day as u64, count);
            }
        }
        best.0
    }

    /// The human-readable report.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let f = &self.fleet;
        let _ = writeln!(out, "workload: {}", self.workload);
        let _ = writeln!(
            out,
            "simulated {:.1} h in {:.1} s ({:.0} simulated h/s{}); {} requests",
            self.hours,
            self.real_seconds,
            self.simulated_hours_per_second,
            if self.baseline.tiers.is_some() {
                ", fleet and baseline runs"
            } else {
                ""
            },
            f.requests
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}   {:>21}",
            "tier",
            "requests",
            "admitted",
            "shed",
            "wait p50",
            "wait p99",
            "wait max",
            "always hot: p50 / p99"
        );
        for t in &f.tiers {
            let baseline = self
                .baseline
                .tiers
                .as_ref()
                .and_then(|b| b.iter().find(|b| b.tier == t.tier))
                .map_or("-".to_owned(), |b| {
                    format!("{:.1} s / {:.1} s", b.wait_p50, b.wait_p99)
                });
            let _ = writeln!(
                out,
                "{:<12} {:>10} {:>10} {:>7.2}% {:>8.1} s {:>8.1} s {:>8.1} s   {:>21}",
                t.tier,
                t.requests,
                t.admitted,
                100.0 * t.shed_share,
                t.wait_p50,
                t.wait_p99,
                t.wait_max,
                baseline
            );
        }
        let h = &f.gpu_hours;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "GPU-hours: hot {:.1}, provisioning {:.1}, starting {:.1}, draining {:.1}, warm {:.1}",
            h.hot, h.provisioning, h.starting, h.draining, h.warm
        );
        let _ = writeln!(
            out,
            "fleet: at most {} hot at once; {} rents, {} resumes ({} refused for capacity), {} stops",
            f.max_hot, f.rents, f.resumes, f.resumes_refused, f.stops
        );
        let _ = writeln!(
            out,
            "cost: ${:.2} (running ${:.2}, warm ${:.2})",
            f.cost,
            f.cost - f.cost_by_state.warm,
            f.cost_by_state.warm
        );
        let _ = writeln!(
            out,
            "always-hot baseline: {} instances (the most hot at once) for {:.1} h: ${:.2}",
            self.baseline.instances, self.hours, self.baseline.cost
        );
        let percent = |p: Option<f64>| p.map_or("-".to_owned(), |p| format!("{p:.1}%"));
        let _ = writeln!(out, "saving: {}", percent(self.saving_percent));
        let _ = writeln!(
            out,
            "ideal fleet (instant wake, every hot slot busy: {:.1} busy slot-hours): ${:.2}, saving {}",
            f.busy_slot_hours,
            self.baseline.ideal_cost,
            percent(self.baseline.ideal_saving_percent)
        );
        if f.granted_without_backend > 0 {
            let _ = writeln!(
                out,
                "ERRORS: {} requests were granted a slot with no hot backend",
                f.granted_without_backend
            );
        }
        out
    }
}

/// What one run measured.
struct RunOutcome {
    tiers: Vec<TierReport>,
    totals: Totals,
    calls: CallCounts,
    samples: Vec<Sample>,
    arrivals_per_day: Vec<u64>,
    granted_without_backend: u64,
    busy_slot_hours: f64,
}

#[derive(Debug, Default)]
struct CallCounts {
    creates: u64,
    resumes: u64,
    resume_failures: u64,
    stops: u64,
}

/// Shared by the request tasks of one run.
struct Context {
    admission: Admission,
    pool: Arc<BackendPool>,
    tiers: Vec<String>,
    /// The model's admission queue and the backends serving it.
    queue: Arc<AdmissionQueue>,
    serving: Vec<BackendId>,
    service: ServiceModel,
    // std Mutex: a few counter updates, never held across an await.
    stats: Mutex<Stats>,
}

struct Stats {
    /// By tier index.
    requests: Vec<u64>,
    waits_ms: Vec<Histogram<u64>>,
    arrivals_per_day: Vec<u64>,
    granted_without_backend: u64,
    busy_secs: f64,
    /// Refusals other than "server busy" (an unknown tier or model).
    other_errors: Vec<String>,
}

impl Context {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One request: wait for a slot, take a hot backend, hold both for the
/// service time.
async fn request(ctx: Arc<Context>, arrival: Arrival, _running: mpsc::Sender<()>) {
    let tier = &ctx.tiers[arrival.tier];
    match ctx.admission.wait_for_slot(tier, &ctx.queue).await {
        Ok(slot) => {
            let lease = ctx
                .pool
                .select(&ctx.serving, &[], &RequestFacts::default())
                .map(|(_, _, lease)| lease);
            if lease.is_none() {
                ctx.stats().granted_without_backend += 1;
                return;
            }
            let waited = slot.waited();
            let service = ctx.service.time(&arrival);
            tokio::time::sleep(service).await;
            drop(lease);
            drop(slot);
            let ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
            let mut stats = ctx.stats();
            stats.waits_ms[arrival.tier].saturating_record(ms);
            stats.busy_secs += service.as_secs_f64();
        }
        // Counted by the queue (shed_busy / shed_timeout).
        Err(ApiError::ServerBusy { .. }) => {}
        Err(other) => ctx.stats().other_errors.push(other.to_string()),
    }
}

async fn run_once(config: &Config, options: &Options) -> anyhow::Result<RunOutcome> {
    let tiers = tier_names(config);
    let registry = Registry::new();
    let admission = Admission::new(config, None, &registry)?;
    let queues = admission.queues();

    let rng = SimProvider::shared_rng(options.seed ^ 0x5EED_C10D);
    let calls = Arc::new(ProviderCalls::default());
    let mut backends = Vec::new();
    let mut managed = Vec::new();
    let mut always_hot = Vec::new();
    for (id, b) in config.backends.iter().enumerate() {
        match b.provider {
            ProviderConfig::Static => always_hot.push((b.name.clone(), b.cost.running)),
            ProviderConfig::Process { .. } | ProviderConfig::RunPod(_) => managed.push(Managed {
                id,
                provider: Arc::new(SimProvider::new(
                    &b.name,
                    options.timing,
                    b.cost,
                    Arc::clone(&rng),
                    Arc::clone(&calls),
                )),
            }),
        }
        backends.push(Backend {
            name: b.name.clone(),
            address: format!("{}.sim:8000", b.name),
            host: b.host.clone(),
            tls: false,
            models: b.models.clone(),
            max_concurrency: b.max_concurrency,
            credential: None,
            // Never asked: readiness is simulated.
            probe: Probe::OpenAi {
                path: DEFAULT_HEALTH_PATH.to_owned(),
            },
            protocol: b.protocol,
        });
    }
    let pool = Arc::new(BackendPool::new(
        backends,
        config.routing.policy.build(Some(options.seed)),
        BreakerConfig {
            failure_threshold: config.routing.breaker_failures,
            open_for: config.routing.breaker_open,
        },
    ));
    let ledger = Arc::new(Ledger::new(&always_hot));
    let controller = FleetController::new(
        Arc::clone(&pool),
        config.backends.iter().map(|b| b.pool.clone()).collect(),
        managed,
        Scaler::new(config.fleet.policy.clone()),
        config.fleet.timing,
        Connections {
            demand: queues.clone(),
            events: ledger.clone(),
            readiness: Arc::new(Ready),
        },
    );

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.changed().await;
    };
    let controller_task = tokio::spawn(Arc::clone(&controller).run(until_stopped(stopped.clone())));
    // The workload meets a fleet in service, at its floor, not one rented
    // from nothing at the first request: the controller first brings
    // `min_hot` instances up, and the ledger starts when they are.
    let floor = config
        .fleet
        .policy
        .min_hot
        .min(u32::try_from(config.backends.len()).unwrap_or(u32::MAX));
    while ledger.census().hot < floor {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    ledger.restart(Instant::now());
    let sampler = {
        let ledger = Arc::clone(&ledger);
        let queues = queues.clone();
        let start = Instant::now();
        let stopped = until_stopped(stopped.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = &mut stopped => return samples,
                }
                let census = ledger.census();
                let queued: usize = queues
                    .signals()
                    .iter()
                    .flat_map(|p| p.tiers.iter().map(|t| t.depth))
                    .sum();
                samples.push(Sample {
                    at_secs: start.elapsed().as_secs(),
                    hot: census.hot,
                    waking: census.waking,
                    warm: census.warm,
                    queued: u32::try_from(queued).unwrap_or(u32::MAX),
                });
            }
        })
    };

    // `pool_only` left the model's pool alone in the config.
    let queue = queues
        .for_pool(&config.backends[0].pool)
        .ok_or_else(|| anyhow::anyhow!("the model's pool has no admission queue"))?
        .clone();
    let ctx = Arc::new(Context {
        admission,
        serving: pool.serving(&options.model),
        pool,
        tiers: tiers.clone(),
        queue,
        service: options.service,
        stats: Mutex::new(Stats {
            requests: vec![0; tiers.len()],
            waits_ms: (0..tiers.len())
                .map(|_| Histogram::new_with_bounds(1, WAIT_MAX_MS, WAIT_SIGFIG))
                .collect::<Result<_, _>>()?,
            arrivals_per_day: Vec::new(),
            granted_without_backend: 0,
            busy_secs: 0.0,
            other_errors: Vec::new(),
        }),
    });
    // Every request task holds a sender; `recv` answers `None` once the
    // last one is done.
    let (running, mut all_done) = mpsc::channel::<()>(1);
    let start = Instant::now();
    for arrival in options.arrivals(&tiers)? {
        let arrival = arrival?;
        tokio::time::sleep_until(start + arrival.at).await;
        {
            let mut stats = ctx.stats();
            stats.requests[arrival.tier] += 1;
            let day = (arrival.at.as_secs() / 86_400) as usize;
            if stats.arrivals_per_day.len() <= day {
                stats.arrivals_per_day.resize(day + 1, 0);
            }
            stats.arrivals_per_day[day] += 1;
        }
        tokio::spawn(request(Arc::clone(&ctx), arrival, running.clone()));
    }
    drop(running);
    let _ = all_done.recv().await;
    let totals = ledger.totals(Instant::now());
    let _ = stop.send(true);
    controller_task.await?;
    let samples = sampler.await?;

    let stats = std::mem::replace(
        &mut *ctx.stats(),
        Stats {
            requests: Vec::new(),
            waits_ms: Vec::new(),
            arrivals_per_day: Vec::new(),
            granted_without_backend: 0,
            busy_secs: 0.0,
            other_errors: Vec::new(),
        },
    );
    if let Some(error) = stats.other_errors.first() {
        anyhow::bail!(
            "{} requests were refused for another reason than a busy server, first: {error}",
            stats.other_errors.len()
        );
    }
    let snapshot = queues.signals();
    let seconds = |ms: u64| ms as f64 / 1000.0;
    let tier_reports = tiers
        .iter()
        .enumerate()
        .map(|(i, tier)| {
            let counted = snapshot
                .iter()
                .flat_map(|p| p.tiers.iter())
                .filter(|t| &t.tier == tier);
            let (admitted, shed_busy, shed_timeout) = counted.fold((0, 0, 0), |acc, t| {
                (
                    acc.0 + t.admitted_total,
                    acc.1 + t.shed_busy_total,
                    acc.2 + t.shed_timeout_total,
                )
            });
            let requests = stats.requests[i];
            let waits = &stats.waits_ms[i];
            TierReport {
                tier: tier.clone(),
                requests,
                admitted,
                shed_busy,
                shed_timeout,
                shed_share: if requests == 0 {
                    0.0
                } else {
                    (shed_busy + shed_timeout) as f64 / requests as f64
                },
                wait_p50: seconds(waits.value_at_quantile(0.5)),
                wait_p99: seconds(waits.value_at_quantile(0.99)),
                wait_max: seconds(waits.max()),
            }
        })
        .collect();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    Ok(RunOutcome {
        tiers: tier_reports,
        totals,
        calls: CallCounts {
            creates: load(&calls.creates),
            resumes: load(&calls.resumes),
            resume_failures: load(&calls.resume_failures),
            stops: load(&calls.stops),
        },
        samples,
        arrivals_per_day: stats.arrivals_per_day,
        granted_without_backend: stats.granted_without_backend,
        busy_slot_hours: stats.busy_secs / 3600.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tollgate::config::Env;

    struct NoEnv;

    impl Env for NoEnv {
        fn var(&self, _name: &str) -> Option<String> {
            None
        }
    }

    fn sim_config() -> Config {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/fleet-sim.toml");
        Config::load(Some(std::path::Path::new(path)), &NoEnv).unwrap()
    }

    fn args(extra: &[&str]) -> SimulateArgs {
        SimulateArgs::parse_from(["tollgate-simulate"].iter().chain(extra))
    }

    fn assert_accounted(tiers: &[TierReport]) {
        for t in tiers {
            assert_eq!(
                t.admitted + t.shed_busy + t.shed_timeout,
                t.requests,
                "every {} request is admitted or shed exactly once",
                t.tier
            );
        }
    }

    #[test]
    fn a_small_day_accounts_for_every_request_and_costs_less_than_always_hot() {
        let mut config = sim_config();
        // The controller's ticks are most of a debug build's time here.
        config.fleet.timing.interval = Duration::from_secs(5);
        let options = Options::from_args(
            &config,
            &args(&[
                "--synthetic",
                "diurnal",
                "--days",
                "1",
                "--peak-load",
                "0.03",
            ]),
        )
        .unwrap();
        let report = simulate(&config, &options).unwrap();
        let f = &report.fleet;
        assert!(f.requests > 1000, "{}", f.requests);
        assert_accounted(&f.tiers);
        assert_eq!(
            f.granted_without_backend, 0,
            "no slot without a hot backend"
        );
        let baseline = report.baseline.tiers.as_ref().unwrap();
        assert_accounted(baseline);
        assert_eq!(
            baseline.iter().map(|t| t.requests).sum::<u64>(),
            f.requests,
            "the baseline replays the same workload"
        );
        assert!(report.baseline.instances >= 1);
        assert!(f.cost > 0.0 && f.cost <= report.baseline.cost, "{report:?}");
        assert!(report.saving_percent.unwrap() >= 0.0);
        assert!((report.hours - 24.0).abs() < 0.1, "{}", report.hours);
        let running = f.gpu_hours.running();
        assert!(running >= report.hours, "the floor's instance runs all day");
        assert_eq!(report.arrivals_per_day.len(), 1);
        assert!(report.samples.len() >= 24 * 60);
        assert!(report.table().contains("saving:"));
    }

    #[test]
    fn the_example_trace_replays() {
        let config = sim_config();
        let trace = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../load-tests/traces/example.csv"
        );
        let options =
            Options::from_args(&config, &args(&["--trace", trace, "--no-baseline-run"])).unwrap();
        let report = simulate(&config, &options).unwrap();
        assert_eq!(report.fleet.requests, 12);
        assert_accounted(&report.fleet.tiers);
        let admitted: u64 = report.fleet.tiers.iter().map(|t| t.admitted).sum();
        assert_eq!(admitted, 12, "one instance at the floor serves them all");
        assert!(report.baseline.tiers.is_none());
    }

    #[test]
    fn the_command_line_is_checked_against_the_config() {
        let config = sim_config();
        let error = |extra: &[&str]| {
            Options::from_args(&config, &args(extra))
                .unwrap_err()
                .to_string()
        };
        assert!(
            error(&["--synthetic", "diurnal", "--mix", "gold=1"])
                .contains("`gold` is not configured")
        );
        assert!(
            error(&["--synthetic", "diurnal", "--model", "nope"]).contains("no backend serves it")
        );
        assert!(
            error(&["--synthetic", "diurnal", "--resume-failure-rate", "2"])
                .contains("between 0 and 1")
        );
        assert!(
            SimulateArgs::try_parse_from(["tollgate-simulate"]).is_err(),
            "a workload is required"
        );
    }
}
