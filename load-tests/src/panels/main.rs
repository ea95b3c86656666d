//! `panels`: draws the Gateway and GPU fleet dashboards' main panels as SVG
//! files from a recording of Tollgate's `/metrics` scrapes, for where Grafana
//! cannot run (the README's pictures come from `scripts/render-panels.sh`).
//!
//! Layout: [`scrape`] reads the recording (a directory of `<unix-ms>.prom`
//! files), [`series`] does the PromQL arithmetic the panels need (sums,
//! reset-aware rates, `histogram_quantile`), [`draw`] draws one panel.
//!
//! ```text
//! cargo run -p tollgate-loadgen --bin panels -- --recording target/panels/scrapes --out docs/img/panels
//! ```

mod draw;
mod scrape;
mod series;

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;

use crate::draw::{Line, Panel, draw};
use crate::scrape::{Scrape, read_recording};
use crate::series::{Grouped, gauge_sum, quantile, rate_sum};

/// Draws Tollgate's dashboard panels as SVG from recorded /metrics scrapes.
#[derive(Debug, Parser)]
#[command(name = "panels", version)]
struct Cli {
    /// Directory of scrapes, one `<unix-ms>.prom` file each (a GET /metrics body)
    #[arg(long, value_name = "DIR")]
    recording: PathBuf,

    /// Directory the SVG files are written to (created if missing)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Range of rate() and histogram_quantile(), in seconds
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    window: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !(cli.window.is_finite() && cli.window > 0.0) {
        bail!("--window must be a positive number of seconds");
    }
    let scrapes = read_recording(&cli.recording)?;
    if scrapes.len() < 2 {
        bail!(
            "{} holds {} scrapes; a rate needs at least two",
            cli.recording.display(),
            scrapes.len()
        );
    }
    fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let x_max = scrapes.last().map_or(0.0, |s| s.at) - scrapes[0].at;
    for (file, title, y_desc, lines) in panels(&scrapes, cli.window) {
        let path = cli.out.join(file);
        let panel = Panel {
            title,
            y_desc,
            x_max,
        };
        draw(&path, &panel, &lines).with_context(|| format!("drawing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

type PanelLines = (&'static str, &'static str, &'static str, Vec<Line>);

/// The panels, with the titles and queries of grafana/dashboards/gateway.json
/// and gpu-fleet.json (no template variables: every tier, model and pool).
fn panels(scrapes: &[Scrape], window: f64) -> Vec<PanelLines> {
    let rate = |name: &str, by: &[&str]| rate_sum(scrapes, name, by, window);
    let gauge = |name: &str, by: &[&str]| gauge_sum(scrapes, name, by);
    let quantiles = |name: &str, qs: &[(f64, &str)], by: &[&str], scale: f64| -> Vec<Line> {
        qs.iter()
            .flat_map(|(q, label)| lines(&quantile(scrapes, name, *q, by, window), label, scale))
            .collect()
    };
    let duration = "tollgate_request_duration_seconds";
    let mut slots = lines(&gauge("tollgate_pool_slots", &["pool"]), "capacity {}", 1.0);
    slots.extend(lines(
        &gauge("tollgate_pool_slots_in_use", &["pool"]),
        "in use {}",
        1.0,
    ));
    vec![
        (
            "requests.svg",
            "Gateway: Requests by tier",
            "requests/s",
            lines(&rate("tollgate_requests_total", &["tier"]), "{}", 1.0),
        ),
        (
            "latency.svg",
            "Gateway: Request duration (every answer, refusals included)",
            "seconds",
            quantiles(
                duration,
                &[(0.5, "p50"), (0.95, "p95"), (0.99, "p99")],
                &[],
                1.0,
            ),
        ),
        (
            "latency-by-tier.svg",
            "Gateway: Request duration p95 by tier",
            "seconds",
            quantiles(duration, &[(0.95, "{}")], &["tier"], 1.0),
        ),
        (
            "overhead.svg",
            "Gateway: Tollgate overhead (duration less queue wait and upstream)",
            "milliseconds",
            quantiles(
                "tollgate_overhead_seconds",
                &[(0.5, "p50"), (0.99, "p99")],
                &[],
                1000.0,
            ),
        ),
        (
            "queue.svg",
            "Gateway: Queue depth by tier",
            "requests waiting",
            lines(&gauge("tollgate_queue_depth", &["tier"]), "{}", 1.0),
        ),
        (
            "refused.svg",
            "Gateway: Admission refusals by reason",
            "requests/s",
            // Every tier and reason is registered at 0: draw only those that happened.
            lines(
                &rate("tollgate_admission_rejected_total", &["tier", "reason"]),
                "{}",
                1.0,
            )
            .into_iter()
            .filter(|line| line.points.iter().any(|(_, v)| v.is_some_and(|v| v > 0.0)))
            .collect(),
        ),
        (
            "tokens.svg",
            "Gateway: Tokens per second",
            "tokens/s",
            lines(&rate("tollgate_tokens_total", &["direction"]), "{}", 1.0),
        ),
        ("slots.svg", "GPU fleet: Pool slots", "slots", slots),
    ]
}

/// One line per group; `{}` in `label` is replaced by the group's label values.
fn lines(grouped: &Grouped, label: &str, scale: f64) -> Vec<Line> {
    grouped
        .iter()
        .map(|(group, points)| Line {
            label: label.replace("{}", &group.join(" ")),
            points: points
                .iter()
                .map(|(t, v)| (*t, v.map(|v| v * scale)))
                .collect(),
        })
        .collect()
}
