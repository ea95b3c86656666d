//! Runs the real `loadgen` binary against the real `gpu-sim` binary over loopback,
//! and `loadgen soak-check` against a real Postgres ([`soak`]).
//!
//! gpu-sim listens on port 0 and its one stdout line gives the address, so there are
//! no fixed ports and no sleeps. Assertions are on the structure and counts of the
//! JSON reports only — never on how long anything took.
//!
//! gpu-sim is a binary of another package, so it must be built first:
//! `cargo build --workspace --bins`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

mod soak;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tollgate_testkit::GpuSim;

/// gpu-sim serving `sim-model` on one worker thread, answering at once (no
/// time to first token, unlimited tokens per second).
fn gpu_sim(extra_args: &[&str]) -> GpuSim {
    gpu_sim_paced(&["--ttft-ms", "0", "--tokens-per-sec", "0"], extra_args)
}

/// The same with its own timing flags (`--ttft-ms`, `--tokens-per-sec`).
fn gpu_sim_paced(timing: &[&str], extra_args: &[&str]) -> GpuSim {
    GpuSim::start(
        &[
            &["--model", "sim-model", "--threads", "1"],
            timing,
            extra_args,
        ]
        .concat(),
    )
}

fn run_loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running loadgen")
}

/// Runs loadgen with `--json` into a file named after the test and returns the JSON.
fn loadgen_json(test: &str, args: &[&str]) -> Value {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadgen-{test}-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut all_args = args.to_vec();
    // Bounds the whole run at duration + 10 s even if something hangs.
    all_args.extend([
        "--timeout",
        "10",
        "--json",
        path.to_str().expect("utf-8 temp path"),
    ]);
    let output = run_loadgen(&all_args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loadgen {args:?} failed with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let text = std::fs::read_to_string(&path).expect("loadgen wrote the --json file");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"))
}

fn count(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("expected a count, got {value}"))
}

fn sum_of(object: &Value) -> u64 {
    object
        .as_object()
        .expect("an object of counts")
        .values()
        .map(count)
        .sum()
}

/// The invariants every run report keeps, whatever the target did.
fn assert_consistent(report: &Value) {
    let requests = &report["requests"];
    let [scheduled, sent, ok, dropped, errors] =
        ["scheduled", "sent", "ok", "dropped", "errors"].map(|field| count(&requests[field]));
    assert_eq!(
        scheduled,
        sent + dropped,
        "scheduled = sent + dropped in {requests}"
    );
    assert_eq!(sent, ok + errors, "sent = ok + errors in {requests}");
    let by_status = sum_of(&report["errors"]["by_status"]);
    let by_kind = sum_of(&report["errors"]["by_kind"]);
    assert_eq!(
        errors,
        by_status + by_kind,
        "errors add up in {}",
        report["errors"]
    );
    for kind in ["connect", "timeout", "truncated_stream", "bad_body", "io"] {
        assert!(
            report["errors"]["by_kind"][kind].is_u64(),
            "by_kind.{kind} is always present"
        );
    }
    for summary in ["latency_ms", "ttfb_ms", "queue_wait_ms", "send_lag_ms"] {
        let summary = &report[summary];
        if summary.is_null() {
            continue;
        }
        let p = |name: &str| {
            summary[name]
                .as_f64()
                .unwrap_or_else(|| panic!("{name} in {summary}"))
        };
        assert!(p("p50") <= p("p90"), "{summary}");
        assert!(p("p90") <= p("p99"), "{summary}");
        assert!(p("p99") <= p("p99_9"), "{summary}");
        assert!(p("p99_9") <= p("max"), "{summary}");
    }
    if !report["latency_ms"].is_null() {
        assert_eq!(count(&report["latency_ms"]["count"]), ok);
    }
    assert!(report["achieved_rps"].as_f64().is_some_and(|r| r >= 0.0));
}

/// A run in which gpu-sim answered everything.
fn assert_all_ok(report: &Value, expected_scheduled: u64) {
    assert_consistent(report);
    let requests = &report["requests"];
    assert_eq!(
        count(&requests["scheduled"]),
        expected_scheduled,
        "{requests}"
    );
    assert_eq!(
        count(&requests["errors"]),
        0,
        "errors: {}",
        report["errors"]
    );
    assert!(count(&requests["ok"]) > 0, "{requests}");
    assert!(!report["latency_ms"].is_null());
    // gpu-sim has no admission queue, so it never sends x-tollgate-queue-wait-ms.
    assert!(
        report["queue_wait_ms"].is_null(),
        "{}",
        report["queue_wait_ms"]
    );
    assert_eq!(report["interrupted"], false);
}

#[test]
fn non_streamed_run_counts_every_request_and_its_usage() {
    let sim = gpu_sim(&[]);
    let doc = loadgen_json(
        "plain",
        &["--url", sim.base(), "--rate", "200", "--duration", "1"],
    );
    assert_eq!(doc["format"], "tollgate-loadgen/1");
    assert_eq!(doc["mode"], "run");
    assert_eq!(doc["load"]["stream"], false);
    assert_eq!(doc["load"]["model"], "sim-model");
    let report = &doc["report"];
    assert_eq!(report["url"], format!("{}/v1/chat/completions", sim.base()));
    // 200/s for 1 s: requests due at 0, 5, …, 995 ms.
    assert_all_ok(report, 200);
    let ok = count(&report["requests"]["ok"]);
    assert!(report["ttfb_ms"].is_null(), "no TTFB without --stream");
    assert_eq!(count(&report["tokens"]["responses_with_usage"]), ok);
    let tokens = count(&report["tokens"]["completion_tokens"]);
    assert!(
        tokens > 0 && tokens <= ok * 16,
        "max_tokens 16 caps usage: {tokens} for {ok}"
    );
    assert_eq!(report["per_key"], Value::Array(Vec::new()));
}

/// `--body` sends any JSON request (here an image, then speech) to the URL's
/// path, and counts every 2xx answer read to its end as served.
#[test]
fn a_body_file_drives_images_and_speech() {
    let sim = gpu_sim(&[]);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(dir).unwrap();
    for (name, path, body) in [
        (
            "images",
            "/v1/images/generations",
            r#"{"model":"sim-model","prompt":"a lighthouse","size":"64x64","response_format":"b64_json"}"#,
        ),
        (
            "speech",
            "/v1/audio/speech",
            r#"{"model":"sim-model","input":"hello there","response_format":"wav"}"#,
        ),
    ] {
        let file = dir.join(format!("request-{name}-{}.json", std::process::id()));
        std::fs::write(&file, body).unwrap();
        let url = format!("{}{path}", sim.base());
        let doc = loadgen_json(
            &format!("body-{name}"),
            &[
                "--url",
                &url,
                "--body",
                file.to_str().unwrap(),
                "--rate",
                "100",
                "--duration",
                "1",
            ],
        );
        let report = &doc["report"];
        assert_consistent(report);
        assert_eq!(doc["load"]["body_bytes"], body.len());
        assert_eq!(report["url"], url);
        let requests = &report["requests"];
        assert_eq!(count(&requests["errors"]), 0, "{name}: {report}");
        assert_eq!(requests["ok"], requests["sent"], "{name}: {report}");
        assert!(count(&requests["ok"]) > 50, "{name}: {report}");
    }
}

#[test]
fn streamed_run_counts_content_chunks_ttfb_and_final_usage() {
    let sim = gpu_sim(&[]);
    let doc = loadgen_json(
        "stream",
        &[
            "--url",
            sim.base(),
            "--rate",
            "200",
            "--duration",
            "1",
            "--stream",
            "--max-tokens",
            "8",
        ],
    );
    let report = &doc["report"];
    assert_all_ok(report, 200);
    let ok = count(&report["requests"]["ok"]);
    assert_eq!(count(&report["ttfb_ms"]["count"]), ok);
    let chunks = count(&report["tokens"]["content_chunks"]);
    assert!(
        chunks >= ok && chunks <= ok * 8,
        "{chunks} content chunks for {ok} streams"
    );
    // stream_options.include_usage is sent, so every stream ends with usage.
    assert_eq!(count(&report["tokens"]["responses_with_usage"]), ok);
    assert!(count(&report["tokens"]["completion_tokens"]) > 0);
}

#[test]
fn every_http_500_is_counted_by_status() {
    let sim = gpu_sim(&["--error-rate", "1"]);
    let doc = loadgen_json(
        "errors",
        &["--url", sim.base(), "--rate", "100", "--duration", "1"],
    );
    let report = &doc["report"];
    assert_consistent(report);
    let sent = count(&report["requests"]["sent"]);
    assert!(sent > 0);
    assert_eq!(count(&report["requests"]["ok"]), 0);
    assert_eq!(
        count(&report["errors"]["by_status"]["500"]),
        sent,
        "{}",
        report["errors"]
    );
    assert_eq!(sum_of(&report["errors"]["by_kind"]), 0);
    assert!(
        report["latency_ms"].is_null(),
        "no latency without successes"
    );
}

#[test]
fn streams_cut_before_done_are_truncated_streams() {
    let sim = gpu_sim(&["--abort-mid-stream-rate", "1"]);
    let doc = loadgen_json(
        "truncated",
        &[
            "--url",
            sim.base(),
            "--rate",
            "50",
            "--duration",
            "1",
            "--stream",
        ],
    );
    let report = &doc["report"];
    assert_consistent(report);
    let sent = count(&report["requests"]["sent"]);
    assert!(sent > 0);
    assert_eq!(
        count(&report["errors"]["by_kind"]["truncated_stream"]),
        sent,
        "{}",
        report["errors"]
    );
}

#[test]
fn key_mix_splits_requests_exactly_by_weight() {
    let sim = gpu_sim(&[]);
    let doc = loadgen_json(
        "keys",
        &[
            "--url",
            sim.base(),
            "--rate",
            "100",
            "--duration",
            "1",
            "--key-mix",
            "sk-test-free-000000000001:3,sk-pro:1",
        ],
    );
    let report = &doc["report"];
    assert_all_ok(report, 100);
    let per_key = report["per_key"].as_array().expect("per_key array");
    assert_eq!(per_key.len(), 2);
    assert_eq!(per_key[0]["key"], "sk-tes…0001", "long keys are shortened");
    assert_eq!(per_key[1]["key"], "sk-pro");
    assert_eq!(count(&per_key[0]["requests"]["scheduled"]), 75);
    assert_eq!(count(&per_key[1]["requests"]["scheduled"]), 25);
    for key in per_key {
        let requests = &key["requests"];
        assert_eq!(
            count(&requests["sent"]),
            count(&requests["ok"]) + count(&requests["errors"])
        );
        assert_eq!(sum_of(&key["errors"]["by_status"]), 0, "{key}");
        assert!(
            key["achieved_rps"].as_f64().is_some_and(|r| r > 0.0),
            "{key}"
        );
        assert!(key["queue_wait_ms"].is_null(), "{key}");
    }
    let goodput: f64 = per_key
        .iter()
        .filter_map(|k| k["achieved_rps"].as_f64())
        .sum();
    let overall = report["achieved_rps"].as_f64().expect("achieved_rps");
    assert!(
        (goodput - overall).abs() < 1e-6 * overall.max(1.0),
        "per-key achieved_rps {goodput} should add up to {overall}"
    );
    let ok_total: u64 = per_key.iter().map(|k| count(&k["requests"]["ok"])).sum();
    assert_eq!(ok_total, count(&report["requests"]["ok"]));
    let text = serde_json::to_string(&doc).unwrap();
    assert!(
        !text.contains("sk-test-free-000000000001"),
        "full key leaked into the report"
    );
}

#[test]
fn compare_reports_both_targets_per_round_with_medians_and_ratios() {
    let a = gpu_sim(&[]);
    let b = gpu_sim(&[]);
    let doc = loadgen_json(
        "compare",
        &[
            "--compare",
            a.base(),
            b.base(),
            "--rate",
            "100",
            "--duration",
            "1",
            "--rounds",
            "2",
        ],
    );
    assert_eq!(doc["mode"], "compare");
    assert_eq!(count(&doc["rounds"]), 2);
    for (side, sim) in [("a", &a), ("b", &b)] {
        let target = &doc[side];
        assert_eq!(target["url"], format!("{}/v1/chat/completions", sim.base()));
        let rounds = target["rounds"].as_array().expect("rounds array");
        assert_eq!(rounds.len(), 2, "{side}");
        for round in rounds {
            assert_all_ok(round, 100);
        }
        let median = &target["median"];
        assert!(median["latency_ms"]["p50"].as_f64().is_some(), "{median}");
        assert!(median["latency_ms"]["p50"].as_f64() <= median["latency_ms"]["p99"].as_f64());
        assert!(median["achieved_rps"].as_f64().is_some_and(|r| r > 0.0));
        assert_eq!(count(&median["totals"]["scheduled"]), 200);
    }
    for ratio in ["p50", "p99", "achieved_rps"] {
        let value = doc["ratio_b_over_a"][ratio].as_f64();
        assert!(
            value.is_some_and(|v| v > 0.0),
            "ratio {ratio}: {}",
            doc["ratio_b_over_a"]
        );
    }
    for added in ["p50", "p99"] {
        assert!(
            doc["added_latency_ms"][added].is_f64(),
            "{}",
            doc["added_latency_ms"]
        );
    }
    assert!(doc["warnings"].is_array());
}

#[test]
fn help_documents_every_flag() {
    let output = run_loadgen(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--url",
        "--compare",
        "--rate",
        "--duration",
        "--concurrency",
        "--stream",
        "--prompt-bytes",
        "--max-tokens",
        "--model",
        "--key",
        "--key-mix",
        "--timeout",
        "--threads",
        "--rounds",
        "--json",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn bad_flags_are_clap_errors_naming_the_flag() {
    let cases = [
        ("--url http://127.0.0.1:1 --rate 0 --duration 1", "--rate"),
        (
            "--url http://127.0.0.1:1 --rate 1 --duration -1",
            "--duration",
        ),
        ("--url https://example.com --rate 1 --duration 1", "--url"),
        (
            "--url http://127.0.0.1:1 --rate 1 --duration 1 --key-mix a",
            "--key-mix",
        ),
        (
            "--url http://127.0.0.1:1 --rate 1 --duration 1 --rounds 2",
            "--rounds",
        ),
        (
            "--url http://127.0.0.1:1 --rate 1 --duration 1 --bogus",
            "--bogus",
        ),
        (
            "--compare http://127.0.0.1:1 --rate 1 --duration 1",
            "--compare",
        ),
        ("--rate 1 --duration 1", "--url"),
    ];
    for (args, flag) in cases {
        let output = run_loadgen(&args.split_whitespace().collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args}: error should name {flag}: {stderr}"
        );
    }
}

#[test]
fn unreachable_target_counts_connect_errors_and_still_exits() {
    // Port 1 on loopback: nothing listens there on any machine this runs on, and
    // nothing is bound or released by the test, so there is no port race.
    let doc = loadgen_json(
        "connect",
        &[
            "--url",
            "http://127.0.0.1:1",
            "--rate",
            "20",
            "--duration",
            "0.5",
        ],
    );
    let report = &doc["report"];
    assert_consistent(report);
    let sent = count(&report["requests"]["sent"]);
    assert_eq!(
        count(&report["errors"]["by_kind"]["connect"]),
        sent,
        "{}",
        report["errors"]
    );
}
