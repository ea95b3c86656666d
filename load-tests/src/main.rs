//! `loadgen`: an open-loop HTTP load generator for OpenAI-style chat completion
//! endpoints, used to produce every latency and overhead figure in `BENCHMARKS.md`.
//!
//! Requests arrive at a fixed rate whatever the target does, and each latency is
//! measured from when the request was due, so a target that falls behind cannot make
//! its own figures look better (no coordinated omission). `--compare` runs the same
//! load against a baseline and a candidate in alternating rounds and reports medians,
//! ratios and added latency, so overhead is always measured against a baseline taken
//! in the same run.
//!
//! Layout: [`cli`] (flags → [`cli::LoadPlan`]), [`endpoint`] and [`key_mix`] (what the
//! flags name), [`arrival_clock`] and [`schedule`] (when requests go out and who
//! collects the outcomes), [`request`] and [`sse`] (one exchange and how its body is
//! judged), [`report`] and [`compare`] (the figures, printed and as JSON), and
//! [`soak`] (`loadgen soak` and `loadgen soak-check`: the money path under faults,
//! driven by `scripts/soak.sh`).
//!
//! ```text
//! cargo run --release -p tollgate-loadgen -- --url http://127.0.0.1:8000 --rate 200 --duration 10 --stream
//! cargo run --release -p tollgate-loadgen -- --compare http://127.0.0.1:9000 http://127.0.0.1:8080 \
//!     --rate 500 --duration 10 --rounds 5 --json overhead.json
//! SOAK_SECS=60 scripts/soak.sh
//! ```

mod arrival_clock;
mod cli;
mod compare;
mod endpoint;
mod key_mix;
mod report;
mod request;
mod schedule;
mod soak;
mod sse;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;
use tokio::sync::watch;

use crate::cli::{Cli, Command, LoadPlan, RunArgs};
use crate::compare::{ComparisonDocument, run_comparison};
use crate::endpoint::Endpoint;
use crate::report::{FORMAT, RunDocument};
use crate::schedule::{run_load, scheduled_count};

/// Conventional exit status of a program stopped by SIGINT; tells scripts the figures
/// cover an incomplete run.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse_and_check();
    match run(&cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("loadgen: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match (&cli.command, &cli.run) {
        (Some(Command::Soak(args)), _) => {
            let runtime = runtime(args.threads as usize)?;
            runtime.block_on(async { soak::run_soak(args, &mut stop_on_ctrl_c()).await })
        }
        (Some(Command::SoakCheck(args)), _) => {
            let runtime = runtime(1)?;
            runtime.block_on(soak::check::run_check(args))
        }
        (None, Some(run)) => run_or_compare(run),
        // clap requires the run flags when there is no subcommand.
        (None, None) => anyhow::bail!("give --url URL, --compare URL_A URL_B or a subcommand"),
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread means the current-thread scheduler: the run stays on this thread,
    // with no work-stealing machinery and no extra idle worker competing for a core.
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")
}

fn run_or_compare(run: &RunArgs) -> anyhow::Result<ExitCode> {
    let plan = run.load_plan();
    runtime(plan.threads)?.block_on(async {
        let mut stop = stop_on_ctrl_c();
        match (&run.compare, &run.url) {
            (Some(targets), _) => {
                let [a, b] = targets.as_slice() else {
                    anyhow::bail!("--compare takes exactly two URLs");
                };
                compare_targets(a, b, &plan, run.rounds(), run.json.as_deref(), &mut stop).await
            }
            (None, Some(url)) => single_target(url, &plan, run.json.as_deref(), &mut stop).await,
            (None, None) => anyhow::bail!("give --url URL or --compare URL_A URL_B"),
        }
    })
}

async fn single_target(
    endpoint: &Endpoint,
    plan: &LoadPlan,
    json: Option<&Path>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    announce(plan, &format!("against {endpoint}"));
    let report = run_load(endpoint, plan, stop).await?;
    print!("{report}");
    if let Some(path) = json {
        let load = plan.echo();
        write_json(
            path,
            &RunDocument {
                format: FORMAT,
                mode: "run",
                load: &load,
                report: &report,
            },
        )?;
    }
    Ok(if report.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    })
}

async fn compare_targets(
    a: &Endpoint,
    b: &Endpoint,
    plan: &LoadPlan,
    rounds: u32,
    json: Option<&Path>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    announce(
        plan,
        &format!("per round, {rounds} rounds each against A = {a} and B = {b}"),
    );
    let comparison = run_comparison(a, b, plan, rounds, stop).await?;
    print!("{comparison}");
    if let Some(path) = json {
        let load = plan.echo();
        write_json(
            path,
            &ComparisonDocument {
                format: FORMAT,
                mode: "compare",
                load: &load,
                rounds,
                comparison: &comparison,
            },
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn announce(plan: &LoadPlan, what: &str) {
    eprintln!(
        "loadgen: {} req/s for {:?} ({} requests{}, at most {} in flight) {what}",
        plan.rate,
        plan.duration,
        scheduled_count(plan.rate, plan.duration),
        if plan.stream { ", streamed" } else { "" },
        plan.concurrency,
    );
}

fn write_json(path: &Path, document: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(document).context("serializing the report")?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("loadgen: wrote {}", path.display());
    Ok(())
}

/// The first Ctrl-C stops issuing requests and lets the run report what it has; a
/// second one quits at once. The watcher task lives as long as the runtime: it is the
/// shutdown mechanism, so there is nothing for it to honour.
fn stop_on_ctrl_c() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return; // no signal handling available: runs just finish on their own
        }
        eprintln!("loadgen: stopping, waiting for requests in flight (Ctrl-C again to quit now)");
        let _ = tx.send(true);
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }
    });
    rx
}
