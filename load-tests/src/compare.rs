//! `--compare URL_A URL_B`: the same load against two targets, in one invocation.
//!
//! Rounds alternate A, B, A, B, … back to back, so slow drift on the machine (thermal
//! throttling, a neighbour's cron job) hits both targets alike, and the baseline is
//! always measured in the same run as the thing compared to it. Each target's figure
//! is the median over its rounds, which one disturbed round cannot move much; ratios
//! and differences are taken between those medians.
//!
//! The JSON written with `--json` is a [`ComparisonDocument`].

use std::fmt;

use anyhow::bail;
use serde::Serialize;
use tokio::sync::watch;

use crate::cli::{LoadEcho, LoadPlan};
use crate::endpoint::Endpoint;
use crate::report::{ErrorCounts, LatencySummary, RequestCounts, RunReport};
use crate::schedule::run_load;

/// The generator's own lateness is inside every latency figure. Past a tenth of the
/// target's p99 it visibly distorts the tail being compared; below 0.2 ms it is
/// scheduling noise not worth a warning.
const SEND_LAG_WARN_FRACTION: f64 = 0.1;
const SEND_LAG_IGNORE_MS: f64 = 0.2;

/// The JSON document of `--compare`:
///
/// ```json
/// {
///   "format": "tollgate-loadgen/1",
///   "mode": "compare",
///   "load": { "rate_rps": 200.0, "duration_secs": 2.0, "…": "as in a single run" },
///   "rounds": 3,
///   "a": {
///     "url": "http://127.0.0.1:9000/v1/chat/completions",
///     "rounds": [ { "…": "one single-run report per round, in run order" } ],
///     "median": {
///       "latency_ms": {"p50": 0.41, "p90": 0.52, "p99": 0.9, "p99_9": 1.4, "max": 2.1},
///       "ttfb_ms": {"p50": null, "p99": null},
///       "send_lag_ms": {"p50": 0.06, "p99": 0.1},
///       "achieved_rps": 199.6,
///       "completion_tokens_per_sec": 3193.6,
///       "totals": {"scheduled": 1200, "sent": 1200, "ok": 1200, "dropped": 0, "errors": 0}
///     }
///   },
///   "b": { "…": "same shape as a" },
///   "ratio_b_over_a": {"p50": 1.48, "p99": 1.3, "achieved_rps": 0.999},
///   "added_latency_ms": {"p50": 0.198, "p99": 0.27},
///   "warnings": ["B: 3 errors over 3 rounds (HTTP 500: 3); latency covers successful requests only"]
/// }
/// ```
///
/// - `median` values are medians over the rounds (the mean of the middle two for an
///   even count) of each round's figure; `totals` are sums over the rounds.
/// - A latency median is `null` when no round had a successful response; a ratio or
///   difference is `null` when either side is `null` (or A's value is 0).
/// - `ratio_b_over_a` and `added_latency_ms` compare B's median with A's median.
/// - `warnings` lists what makes the figures less trustworthy: errors, drops, an
///   overloaded load generator. An empty list means none of those happened.
#[derive(Debug, Serialize)]
pub struct ComparisonDocument<'a> {
    pub format: &'static str,
    pub mode: &'static str,
    pub load: &'a LoadEcho,
    pub rounds: u32,
    #[serde(flatten)]
    pub comparison: &'a Comparison,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: TargetRounds,
    pub b: TargetRounds,
    pub ratio_b_over_a: Ratios,
    pub added_latency_ms: AddedLatency,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetRounds {
    pub url: String,
    pub rounds: Vec<RunReport>,
    pub median: MedianReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MedianLatency {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p99_9: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MedianTail {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MedianReport {
    pub latency_ms: MedianLatency,
    pub ttfb_ms: MedianTail,
    pub send_lag_ms: MedianTail,
    pub achieved_rps: Option<f64>,
    pub completion_tokens_per_sec: Option<f64>,
    pub totals: RequestCounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratios {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub achieved_rps: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AddedLatency {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// Runs `rounds` rounds of A then B. An interrupted round ends the comparison with an
/// error: medians over a partial set of rounds would look like a finished result.
pub async fn run_comparison(
    a: &Endpoint,
    b: &Endpoint,
    plan: &LoadPlan,
    rounds: u32,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Comparison> {
    let mut a_rounds = Vec::new();
    let mut b_rounds = Vec::new();
    for round in 1..=rounds {
        for (label, endpoint, reports) in [("A", a, &mut a_rounds), ("B", b, &mut b_rounds)] {
            let report = run_load(endpoint, plan, stop).await?;
            eprintln!(
                "loadgen: round {round}/{rounds} {label}: {}",
                one_line(&report)
            );
            if report.interrupted {
                bail!("interrupted in round {round} ({label}); no comparison was produced");
            }
            reports.push(report);
        }
    }
    Ok(Comparison::from_rounds(
        a.to_string(),
        a_rounds,
        b.to_string(),
        b_rounds,
    ))
}

fn one_line(report: &RunReport) -> String {
    let r = &report.requests;
    let latency = report.latency_ms.map_or_else(
        || "no successful responses".to_owned(),
        |l| format!("p50 {:.3} ms  p99 {:.3} ms", l.p50, l.p99),
    );
    format!(
        "ok {}/{}  errors {}  dropped {}  {:.1} ok/s  {latency}",
        r.ok, r.scheduled, r.errors, r.dropped, report.achieved_rps
    )
}

/// Median of the values present; `None` if there are none.
pub fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().flatten().collect();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => values.get(mid).copied(),
        _ => Some((values.get(mid - 1)? + values.get(mid)?) / 2.0),
    }
}

/// Rounds for the report: medians of an even count are means and would otherwise show
/// float noise beyond the microsecond the histograms resolve.
fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn median_of(rounds: &[RunReport], pick: impl Fn(&RunReport) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().map(pick)).map(|m| round_to(m, 3))
}

impl MedianReport {
    pub fn of(rounds: &[RunReport]) -> Self {
        type Pick = fn(&RunReport) -> Option<LatencySummary>;
        let percentile = |summary: Pick, field: fn(&LatencySummary) -> f64| {
            median_of(rounds, |r| summary(r).as_ref().map(field))
        };
        let latency: Pick = |r| r.latency_ms;
        let ttfb: Pick = |r| r.ttfb_ms;
        let lag: Pick = |r| r.send_lag_ms;
        let mut totals = RequestCounts::default();
        for round in rounds {
            totals.add(&round.requests);
        }
        Self {
            latency_ms: MedianLatency {
                p50: percentile(latency, |s| s.p50),
                p90: percentile(latency, |s| s.p90),
                p99: percentile(latency, |s| s.p99),
                p99_9: percentile(latency, |s| s.p99_9),
                max: percentile(latency, |s| s.max),
            },
            ttfb_ms: MedianTail {
                p50: percentile(ttfb, |s| s.p50),
                p99: percentile(ttfb, |s| s.p99),
            },
            send_lag_ms: MedianTail {
                p50: percentile(lag, |s| s.p50),
                p99: percentile(lag, |s| s.p99),
            },
            achieved_rps: median_of(rounds, |r| Some(r.achieved_rps)),
            completion_tokens_per_sec: median_of(rounds, |r| {
                Some(r.tokens.completion_tokens_per_sec)
            }),
            totals,
        }
    }
}

fn ratio(b: Option<f64>, a: Option<f64>) -> Option<f64> {
    match (b, a) {
        (Some(b), Some(a)) if a > 0.0 => Some(round_to(b / a, 4)),
        _ => None,
    }
}

fn difference(b: Option<f64>, a: Option<f64>) -> Option<f64> {
    Some(round_to(b? - a?, 3))
}

impl Comparison {
    pub fn from_rounds(
        a_url: String,
        a_rounds: Vec<RunReport>,
        b_url: String,
        b_rounds: Vec<RunReport>,
    ) -> Self {
        let a = TargetRounds {
            median: MedianReport::of(&a_rounds),
            url: a_url,
            rounds: a_rounds,
        };
        let b = TargetRounds {
            median: MedianReport::of(&b_rounds),
            url: b_url,
            rounds: b_rounds,
        };
        let (am, bm) = (&a.median, &b.median);
        let ratio_b_over_a = Ratios {
            p50: ratio(bm.latency_ms.p50, am.latency_ms.p50),
            p99: ratio(bm.latency_ms.p99, am.latency_ms.p99),
            achieved_rps: ratio(bm.achieved_rps, am.achieved_rps),
        };
        let added_latency_ms = AddedLatency {
            p50: difference(bm.latency_ms.p50, am.latency_ms.p50),
            p99: difference(bm.latency_ms.p99, am.latency_ms.p99),
        };
        let warnings = [("A", &a), ("B", &b)]
            .iter()
            .flat_map(|(label, t)| warnings_for(label, t))
            .collect();
        Self {
            a,
            b,
            ratio_b_over_a,
            added_latency_ms,
            warnings,
        }
    }
}

fn warnings_for(label: &str, target: &TargetRounds) -> Vec<String> {
    let mut warnings = Vec::new();
    let totals = target.median.totals;
    let rounds = target.rounds.len();
    if totals.errors > 0 {
        let mut causes = ErrorCounts::default();
        for round in &target.rounds {
            causes.add(&round.errors);
        }
        warnings.push(format!(
            "{label}: {} errors over {rounds} rounds ({causes}); latency covers successful requests only",
            totals.errors
        ));
    }
    if totals.dropped > 0 {
        warnings.push(format!(
            "{label}: {} requests dropped over {rounds} rounds: the target did not keep up with the offered rate; \
             compare achieved rates rather than latency",
            totals.dropped
        ));
    }
    let lag = target.median.send_lag_ms.p99.unwrap_or(0.0);
    let p99 = target.median.latency_ms.p99;
    if lag > SEND_LAG_IGNORE_MS && p99.is_none_or(|p99| lag > SEND_LAG_WARN_FRACTION * p99) {
        warnings.push(format!(
            "{label}: loadgen itself sent late (send lag p99 {lag:.3} ms, latency p99 {} ms): \
             tail figures partly measure loadgen; lower --rate or leave it more CPU",
            cell(p99, 3)
        ));
    }
    if target.median.latency_ms.p50.is_none() {
        warnings.push(format!("{label}: no successful responses in any round"));
    }
    warnings
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn signed_cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:+.3}"))
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = (&self.a.median, &self.b.median);
        writeln!(f, "A          {}", self.a.url)?;
        writeln!(f, "B          {}", self.b.url)?;
        writeln!(
            f,
            "rounds     {} per target, alternating A, B; figures are medians over rounds",
            self.a.rounds.len()
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<22}{:>12}{:>12}{:>10}{:>12}",
            "", "A", "B", "B/A", "B-A"
        )?;
        let rows: [(&str, Option<f64>, Option<f64>); 7] = [
            ("latency p50 ms", a.latency_ms.p50, b.latency_ms.p50),
            ("latency p90 ms", a.latency_ms.p90, b.latency_ms.p90),
            ("latency p99 ms", a.latency_ms.p99, b.latency_ms.p99),
            ("latency p99.9 ms", a.latency_ms.p99_9, b.latency_ms.p99_9),
            ("latency max ms", a.latency_ms.max, b.latency_ms.max),
            ("ttfb p50 ms", a.ttfb_ms.p50, b.ttfb_ms.p50),
            ("ttfb p99 ms", a.ttfb_ms.p99, b.ttfb_ms.p99),
        ];
        for (name, av, bv) in rows {
            if av.is_none() && bv.is_none() {
                continue;
            }
            writeln!(
                f,
                "{name:<22}{:>12}{:>12}{:>10}{:>12}",
                cell(av, 3),
                cell(bv, 3),
                cell(ratio(bv, av), 3),
                signed_cell(difference(bv, av))
            )?;
        }
        writeln!(
            f,
            "{:<22}{:>12}{:>12}{:>10}",
            "achieved ok/s",
            cell(a.achieved_rps, 1),
            cell(b.achieved_rps, 1),
            cell(self.ratio_b_over_a.achieved_rps, 3)
        )?;
        writeln!(
            f,
            "{:<22}{:>12}{:>12}",
            "send lag p99 ms",
            cell(a.send_lag_ms.p99, 3),
            cell(b.send_lag_ms.p99, 3)
        )?;
        for (name, pick) in [
            (
                "ok (all rounds)",
                (|t: &RequestCounts| t.ok) as fn(&RequestCounts) -> u64,
            ),
            ("errors (all rounds)", |t| t.errors),
            ("dropped (all rounds)", |t| t.dropped),
        ] {
            writeln!(
                f,
                "{name:<22}{:>12}{:>12}",
                pick(&a.totals),
                pick(&b.totals)
            )?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning    {warning}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{FORMAT, TokenCounts};

    fn summary(p50: f64, p99: f64) -> LatencySummary {
        LatencySummary {
            count: 100,
            p50,
            p90: p50,
            p99,
            p99_9: p99,
            max: p99,
            mean: p50,
        }
    }

    fn round(p50: f64, p99: f64, achieved: f64) -> RunReport {
        RunReport {
            url: "u".into(),
            interrupted: false,
            requests: RequestCounts {
                scheduled: 100,
                sent: 100,
                ok: 100,
                dropped: 0,
                errors: 0,
            },
            errors: ErrorCounts::default(),
            offered_rps: 100.0,
            achieved_rps: achieved,
            elapsed_secs: 1.0,
            latency_ms: Some(summary(p50, p99)),
            ttfb_ms: None,
            queue_wait_ms: None,
            send_lag_ms: Some(summary(0.05, 0.1)),
            tokens: TokenCounts::default(),
            per_key: Vec::new(),
        }
    }

    #[test]
    fn median_of_odd_even_and_missing() {
        assert_eq!(median([Some(3.0), Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(
            median([Some(4.0), Some(1.0), Some(3.0), Some(2.0)]),
            Some(2.5)
        );
        assert_eq!(median([Some(5.0), None, Some(1.0), Some(3.0)]), Some(3.0));
        assert_eq!(median([None, None]), None);
        assert_eq!(median(std::iter::empty()), None);
    }

    #[test]
    fn one_disturbed_round_does_not_move_the_median() {
        let a = vec![
            round(1.0, 2.0, 100.0),
            round(1.1, 2.2, 99.0),
            round(50.0, 90.0, 60.0),
        ];
        let median = MedianReport::of(&a);
        assert_eq!(median.latency_ms.p50, Some(1.1));
        assert_eq!(median.latency_ms.p99, Some(2.2));
        assert_eq!(median.achieved_rps, Some(99.0));
        assert_eq!(median.totals.sent, 300);
    }

    #[test]
    fn ratios_and_added_latency_are_b_against_a_medians() {
        let a = vec![
            round(1.0, 4.0, 100.0),
            round(1.0, 4.0, 100.0),
            round(1.0, 4.0, 100.0),
        ];
        let b = vec![
            round(1.5, 5.0, 98.0),
            round(1.5, 5.0, 98.0),
            round(1.5, 5.0, 98.0),
        ];
        let cmp = Comparison::from_rounds("a".into(), a, "b".into(), b);
        assert_eq!(
            cmp.ratio_b_over_a,
            Ratios {
                p50: Some(1.5),
                p99: Some(1.25),
                achieved_rps: Some(0.98)
            }
        );
        assert_eq!(
            cmp.added_latency_ms,
            AddedLatency {
                p50: Some(0.5),
                p99: Some(1.0)
            }
        );
        assert!(cmp.warnings.is_empty(), "{:?}", cmp.warnings);
        let shown = cmp.to_string();
        assert!(shown.contains("latency p50 ms"), "{shown}");
        assert!(shown.contains("+0.500"), "{shown}");
    }

    #[test]
    fn missing_baseline_gives_null_ratios_not_infinity() {
        let mut a = round(0.0, 0.0, 0.0);
        a.latency_ms = None;
        a.requests.ok = 0;
        a.requests.errors = 100;
        a.errors.by_status.insert(500, 100);
        let cmp = Comparison::from_rounds(
            "a".into(),
            vec![a],
            "b".into(),
            vec![round(1.0, 2.0, 100.0)],
        );
        assert_eq!(
            cmp.ratio_b_over_a,
            Ratios {
                p50: None,
                p99: None,
                achieved_rps: None
            }
        );
        assert_eq!(
            cmp.added_latency_ms,
            AddedLatency {
                p50: None,
                p99: None
            }
        );
        let json = serde_json::to_value(&cmp).unwrap();
        assert!(json["ratio_b_over_a"]["p50"].is_null());
        assert!(
            cmp.warnings
                .iter()
                .any(|w| w.starts_with("A: 100 errors") && w.contains("HTTP 500: 100")),
            "{:?}",
            cmp.warnings
        );
        assert!(
            cmp.warnings
                .iter()
                .any(|w| w.contains("no successful responses")),
            "{:?}",
            cmp.warnings
        );
    }

    #[test]
    fn send_lag_small_next_to_the_tail_is_not_warned_about() {
        let mut a = round(5.0, 10.0, 100.0);
        a.send_lag_ms = Some(summary(0.1, 0.5));
        let cmp = Comparison::from_rounds("a".into(), vec![a.clone()], "b".into(), vec![a]);
        assert!(cmp.warnings.is_empty(), "{:?}", cmp.warnings);
    }

    #[test]
    fn drops_and_generator_lag_are_warned_about() {
        let mut b = round(1.0, 2.0, 80.0);
        b.requests.dropped = 20;
        b.requests.sent = 80;
        b.send_lag_ms = Some(summary(0.5, 3.0));
        let cmp = Comparison::from_rounds(
            "a".into(),
            vec![round(1.0, 2.0, 100.0)],
            "b".into(),
            vec![b],
        );
        assert!(
            cmp.warnings
                .iter()
                .any(|w| w.starts_with("B: 20 requests dropped")),
            "{:?}",
            cmp.warnings
        );
        assert!(
            cmp.warnings
                .iter()
                .any(|w| w.starts_with("B: loadgen itself sent late")),
            "{:?}",
            cmp.warnings
        );
    }

    #[test]
    fn document_flattens_the_comparison_next_to_format_and_load() {
        let cmp = Comparison::from_rounds(
            "a".into(),
            vec![round(1.0, 2.0, 100.0)],
            "b".into(),
            vec![round(1.0, 2.0, 100.0)],
        );
        let plan = LoadPlan {
            rate: 100.0,
            duration: std::time::Duration::from_secs(1),
            concurrency: 8,
            stream: false,
            body: None,
            content_type: "application/json".into(),
            headers: Vec::new(),
            prompt_bytes: 10,
            max_tokens: 4,
            model: "m".into(),
            keys: None,
            timeout: std::time::Duration::from_secs(1),
            threads: 1,
        };
        let load = plan.echo();
        let doc = ComparisonDocument {
            format: FORMAT,
            mode: "compare",
            load: &load,
            rounds: 1,
            comparison: &cmp,
        };
        let json = serde_json::to_value(&doc).unwrap();
        for field in [
            "format",
            "mode",
            "load",
            "rounds",
            "a",
            "b",
            "ratio_b_over_a",
            "added_latency_ms",
            "warnings",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        assert_eq!(json["a"]["rounds"].as_array().unwrap().len(), 1);
        assert_eq!(json["a"]["median"]["latency_ms"]["p50"], 1.0);
    }
}
