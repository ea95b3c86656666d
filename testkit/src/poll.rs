//! Waiting for a condition that another process or task makes true, by
//! polling it: no sleep guessed long enough, and a failure that names what
//! never happened.

use std::time::Duration;

/// Upper bound for what tests wait on (a process being ready, a revocation
/// landing, a queue filling): far above what any takes, so only a failure
/// reaches it.
pub const POLL_DEADLINE: Duration = Duration::from_secs(30);
/// Between two checks: short against anything waited for, long enough not
/// to busy a 2-core machine.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` every [`POLL_INTERVAL`] until it returns true; panics with
/// "timed out: {what}" after [`POLL_DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + POLL_DEADLINE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
