//! The `tollgate-simulate` binary as a shell runs it.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

/// Far above the second a debug build takes, so only a hang reaches it.
const DEADLINE: Duration = Duration::from_secs(120);

/// Before: with stderr a pipe nobody reads any more (`... 2>&1 | head -2`),
/// the first log line that could not be written panicked the task that
/// logged it (tracing-subscriber reported the failure with `eprintln!`); the
/// fleet never reached its floor and the simulated clock ran on forever.
#[tokio::test]
async fn a_closed_stderr_does_not_stop_the_simulation() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let chart = std::env::temp_dir().join(format!("tollgate-sim-{}.svg", std::process::id()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate-simulate"))
        .arg("--config")
        .arg(format!("{root}/config/fleet-sim.toml"))
        .arg("--trace")
        .arg(format!("{root}/load-tests/traces/example.csv"))
        .arg("--no-baseline-run")
        .arg("--chart")
        .arg(&chart)
        // Every fleet transition is logged at info.
        .env("LOG_LEVEL", "info")
        .env_remove("TOLLGATE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let exited = tokio::time::timeout(DEADLINE, child.wait()).await;
    if exited.is_err() {
        let _ = child.kill().await;
        panic!("still running after {DEADLINE:?} with its stderr closed");
    }
    let status = exited.unwrap().unwrap();
    let _ = std::fs::remove_file(&chart);
    assert!(status.success(), "{status}");
}
