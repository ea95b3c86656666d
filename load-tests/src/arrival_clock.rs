//! A sub-millisecond clock for request arrivals.
//!
//! Tokio timers have millisecond granularity (its docs say not to use `sleep` for
//! high-resolution timing): a request due at 0.2 ms past a tick leaves up to a
//! millisecond late. Since latency is measured from the due time, that lag would be
//! added to every sample: against a backend that answers in 0.3 ms it would swamp the
//! figure being measured and pull every B/A ratio towards 1. So a dedicated thread
//! sleeps with the OS's high-resolution timer (tens of microseconds of slack on
//! Linux) and publishes how many requests are due; the scheduler task issues them.
//! The thread sleeps between arrivals and costs one wake-up per arrival.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::watch;

use crate::schedule::scheduled_offset;

/// Publishes, as requests fall due, how many of them are due so far.
/// Dropping it stops and joins the thread.
pub struct ArrivalClock {
    due: watch::Receiver<u64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ArrivalClock {
    /// Request `i` (for `i < total`) falls due at `start + i / rate`.
    pub fn start(start: Instant, rate: f64, total: u64) -> std::io::Result<Self> {
        let (publish, due) = watch::channel(0u64);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("loadgen-arrivals".into())
            .spawn(move || {
                let mut published = 0;
                while published < total && !thread_stop.load(Ordering::Relaxed) {
                    let Some(next_due) = start.checked_add(scheduled_offset(published, rate))
                    else {
                        break; // unreachable with the CLI's bounds on rate and duration
                    };
                    let now = Instant::now();
                    if next_due > now {
                        // Wakes early on unpark (stop) or spuriously: the loop re-checks.
                        std::thread::park_timeout(next_due - now);
                        continue;
                    }
                    while published < total && scheduled_offset(published, rate) <= now - start {
                        published += 1;
                    }
                    if publish.send(published).is_err() {
                        break; // the scheduler is gone
                    }
                }
            })?;
        Ok(Self {
            due,
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until more requests are due and returns how many are due in total, or
    /// `None` once the last count has been seen and the clock has finished.
    pub async fn due_count(&mut self) -> Option<u64> {
        self.due.changed().await.ok()?;
        Some(*self.due.borrow_and_update())
    }
}

impl Drop for ArrivalClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            // The thread checks `stop` right after waking, so this join is immediate.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn counts_up_to_total_then_finishes() {
        let mut clock = ArrivalClock::start(Instant::now(), 10_000.0, 50).unwrap();
        let mut last = 0;
        while let Some(count) = clock.due_count().await {
            assert!(count > last && count <= 50, "{last} -> {count}");
            last = count;
        }
        assert_eq!(last, 50);
    }

    #[tokio::test]
    async fn everything_already_due_is_published_at_once() {
        let long_ago = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        let mut clock = ArrivalClock::start(long_ago, 100.0, 20).unwrap();
        assert_eq!(clock.due_count().await, Some(20));
        assert_eq!(clock.due_count().await, None);
    }

    #[test]
    fn dropping_a_clock_with_far_arrivals_returns_promptly() {
        // One request now, the next in 1000 s: drop must not wait for it.
        let clock = ArrivalClock::start(Instant::now(), 0.001, 2).unwrap();
        drop(clock);
    }
}
