//! The Prometheus alert rules in `deploy/prometheus/`: valid and passing
//! their unit tests under `promtool` (when it is on PATH; `scripts/lib.sh`
//! installs it), and, always, naming only metrics Tollgate registers (those
//! `tollgate_metering::metric_names::ALL` lists, which the gateway's tests hold
//! against a live scrape), so a renamed metric cannot leave an alert silently
//! watching nothing.

#![allow(
    clippy::expect_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use tollgate_metering::metric_names;

/// Series a histogram `name` exposes besides its own name.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the proxy crate sits in the workspace")
        .to_owned()
}

fn rules_dir() -> PathBuf {
    workspace().join("deploy/prometheus")
}

fn promtool_available() -> bool {
    Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(rules_dir())
        .output()
        .expect("promtool runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if !promtool_available() {
        eprintln!("promtool not on PATH: rules not checked (scripts/lib.sh installs it)");
        return;
    }
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "tests/alerts.test.yml"]);
}

/// Every `tollgate_*` name in the `expr:` of a rule, block scalars included.
fn expr_metric_names(rules: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    // Indentation of the `expr:` key whose block scalar is being read.
    let mut block: Option<usize> = None;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim_start();
        if let Some(key_indent) = block {
            if text.is_empty() || indent > key_indent {
                names.extend(metric_names(text));
                continue;
            }
            block = None;
        }
        if let Some(expr) = text
            .strip_prefix("expr:")
            .or_else(|| text.strip_prefix("- expr:"))
        {
            let expr = expr.trim();
            if expr.starts_with('>') || expr.starts_with('|') {
                block = Some(indent);
            } else {
                names.extend(metric_names(expr));
            }
        }
    }
    names
}

/// `tollgate_[a-z_]+` words in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("tollgate_") {
        let preceded_by_word = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn is_registered(name: &str, registered: &BTreeSet<String>) -> bool {
    registered.contains(name)
        || HISTOGRAM_SUFFIXES.iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| registered.contains(base))
        })
}

#[test]
fn alert_rules_name_only_registered_metrics() {
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).expect("alerts.yml");
    let used = expr_metric_names(&rules);
    let registered: BTreeSet<String> = metric_names::ALL
        .iter()
        .map(|name| (*name).to_owned())
        .collect();
    assert!(
        used.len() >= 10,
        "too few metrics found in the rules: {used:?}"
    );
    let unknown: Vec<&String> = used
        .iter()
        .filter(|name| !is_registered(name, &registered))
        .collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml uses metrics Tollgate does not register: {unknown:?}\nregistered: {registered:?}"
    );
}

#[test]
fn expr_scan_reads_block_scalars_and_skips_annotations() {
    let rules = "\
      - alert: A
        expr: sum(tollgate_a_total) > 1
        annotations:
          summary: see tollgate_not_an_expr
      - alert: B
        expr: >-
          rate(tollgate_b_seconds_bucket[5m])
          and tollgate_c
        for: 5m
";
    let names: Vec<String> = expr_metric_names(rules).into_iter().collect();
    assert_eq!(
        names,
        [
            "tollgate_a_total",
            "tollgate_b_seconds_bucket",
            "tollgate_c"
        ]
    );
    let registered = BTreeSet::from(["tollgate_b_seconds".to_owned()]);
    assert!(is_registered("tollgate_b_seconds_bucket", &registered));
    assert!(!is_registered("tollgate_b_seconds_total", &registered));
}
