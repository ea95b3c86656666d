//! The open-loop scheduler: one run of a [`LoadPlan`] against one target.
//!
//! Request `i` is due at `start + i / rate`, whatever happened to earlier requests
//! (an [`ArrivalClock`] thread says when). When it is due, it is either handed to its
//! own task (if fewer than `concurrency` requests are in flight) or counted as dropped.
//! Its latency is measured from the due time, so if this process falls behind, the lag
//! shows in the figures instead of quietly lowering the load (coordinated omission).
//!
//! Outcomes come back through a `JoinSet` to the scheduler task, which alone owns the
//! [`RunRecorder`]. Issuing stops after `duration` (or on Ctrl-C); the run then waits
//! for the requests in flight, each bounded by its own `timeout`, so a run always ends
//! by `duration + timeout`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use crate::arrival_clock::ArrivalClock;
use crate::cli::LoadPlan;
use crate::endpoint::Endpoint;
use crate::report::{RunRecorder, RunReport, RunTiming};
use crate::request::{Reply, RequestTemplate, exchange, http_client};

/// How far after `start` request `index` is due.
pub fn scheduled_offset(index: u64, rate: f64) -> Duration {
    Duration::try_from_secs_f64(index as f64 / rate).unwrap_or(Duration::MAX)
}

/// Requests due strictly before `duration`: `ceil(rate × duration)`, corrected for
/// float error with the same offsets the scheduler uses (0.3/s for 10 s is 3, not 4).
pub fn scheduled_count(rate: f64, duration: Duration) -> u64 {
    let mut count = (rate * duration.as_secs_f64()).ceil() as u64;
    while count > 0 && scheduled_offset(count - 1, rate) >= duration {
        count -= 1;
    }
    while scheduled_offset(count, rate) < duration {
        count += 1;
    }
    count
}

/// A request's task hands this back to the scheduler.
struct Finished {
    key: Option<usize>,
    reply: Reply,
    at: Instant,
}

/// Resolves once Ctrl-C was pressed; never, if the signal watcher is gone.
pub async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|&stopped| stopped).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs the plan once against `endpoint` with a fresh connection pool, so rounds of a
/// comparison do not inherit each other's connections.
pub async fn run_load(
    endpoint: &Endpoint,
    plan: &LoadPlan,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<RunReport> {
    let total = scheduled_count(plan.rate, plan.duration);
    let client = http_client(plan.concurrency);
    let template = Arc::new(RequestTemplate::new(endpoint, plan)?);
    let key_count = plan.keys.as_ref().map_or(0, |mix| mix.keys().len());
    let mut recorder = RunRecorder::new(key_count).context("creating latency histograms")?;
    let mut picker = plan.keys.as_ref().map(|mix| mix.picker());
    let in_flight = Arc::new(Semaphore::new(plan.concurrency));
    let mut tasks: JoinSet<Finished> = JoinSet::new();

    let start = Instant::now();
    let mut clock = ArrivalClock::start(start.into_std(), plan.rate, total)
        .context("starting arrival clock")?;
    let mut next: u64 = 0;
    let mut interrupted = false;
    while next < total {
        tokio::select! {
            // Order matters: the schedule comes before reaping finished requests, so a
            // burst of completions cannot delay a send.
            biased;
            () = stop_requested(stop) => {
                interrupted = true;
                break;
            }
            due_count = clock.due_count() => {
                let Some(due_count) = due_count else { break };
                while next < due_count {
                    let due = start + scheduled_offset(next, plan.rate);
                    next += 1;
                    let key = picker.as_mut().map(|p| p.next_index());
                    let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                        recorder.on_dropped(key);
                        continue;
                    };
                    recorder.on_sent(key, due.elapsed());
                    let client = client.clone();
                    let template = Arc::clone(&template);
                    tasks.spawn(async move {
                        let reply = exchange(&client, &template, key, due).await;
                        drop(permit);
                        Finished { key, reply, at: Instant::now() }
                    });
                }
            }
            Some(joined) = tasks.join_next() => record(&mut recorder, joined),
        }
    }
    let schedule_end = if interrupted {
        Instant::now()
    } else {
        start + plan.duration
    };
    drop(clock);
    // Every task ends within its own --timeout, so this wait is bounded too.
    while let Some(joined) = tasks.join_next().await {
        record(&mut recorder, joined);
    }
    let timing = RunTiming {
        start,
        schedule_end,
        interrupted,
    };
    Ok(recorder.finish(endpoint.to_string(), plan.rate, plan.keys.as_ref(), timing))
}

fn record(recorder: &mut RunRecorder, joined: Result<Finished, JoinError>) {
    match joined {
        Ok(Finished { key, reply, at }) => {
            if let Some(wait) = reply.queue_wait {
                recorder.on_queue_wait(key, wait);
            }
            recorder.on_finished(key, reply.outcome, at);
        }
        // A request task only panics on a bug in this program: surface it, don't count it.
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        // Tasks are never aborted while the set is alive, so cancellation cannot happen.
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_is_requests_due_before_the_end() {
        assert_eq!(scheduled_count(200.0, Duration::from_secs(1)), 200);
        assert_eq!(scheduled_count(200.0, Duration::from_millis(1500)), 300);
        assert_eq!(scheduled_count(0.3, Duration::from_secs(10)), 3);
        assert_eq!(scheduled_count(0.5, Duration::from_secs(1)), 1);
        assert_eq!(scheduled_count(3.0, Duration::from_millis(1001)), 4);
        assert_eq!(scheduled_count(1e-9, Duration::from_secs(1)), 1);
    }

    #[test]
    fn every_counted_request_is_due_before_the_end_and_the_next_is_not() {
        for (rate, millis) in [(7.0, 1000), (1000.0, 2500), (33.3, 3000), (0.1, 25_000)] {
            let duration = Duration::from_millis(millis);
            let n = scheduled_count(rate, duration);
            assert!(scheduled_offset(n - 1, rate) < duration, "{rate} {millis}");
            assert!(scheduled_offset(n, rate) >= duration, "{rate} {millis}");
        }
    }

    #[test]
    fn offsets_are_evenly_spaced_from_zero() {
        assert_eq!(scheduled_offset(0, 200.0), Duration::ZERO);
        assert_eq!(scheduled_offset(1, 200.0), Duration::from_millis(5));
        assert_eq!(scheduled_offset(200, 200.0), Duration::from_secs(1));
    }
}
