//! Circuit breaker for one backend.
//!
//! After `failure_threshold` consecutive failures the breaker opens and the
//! backend gets no traffic for `open_for`, so a crashed or wedged server is
//! not fed requests that will time out. Then it is half open: exactly one
//! probe request goes through; success closes the breaker, failure opens it
//! for another `open_for`. Only one probe, so a still-broken backend costs one
//! failed request per period rather than a burst.
//!
//! Time is passed in (`now`) instead of read here, so the logic is pure and
//! tests step through it without sleeping.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. 0 is treated as 1.
    pub failure_threshold: u32,
    /// How long an open breaker refuses traffic before a half-open probe.
    pub open_for: Duration,
}

/// What the breaker currently allows, for metrics and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// No traffic until the open period ends.
    Open,
    /// One probe may go (or is out); its outcome decides.
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed { consecutive_failures: u32 },
    Open { opened_at: Instant },
    HalfOpen { probe_in_flight: bool },
}

/// A thread-safe circuit breaker; one per backend.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    // A std Mutex over one small enum: every transition reads and writes the
    // whole state at once, which atomics would need a CAS loop to get right,
    // and it is never held across an await.
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::Closed {
                consecutive_failures: 0,
            }),
        }
    }

    /// Whether a request may go to this backend now.
    ///
    /// Closed: yes. Open: no until `open_for` has passed, then it turns
    /// half open and lets exactly one request through (returns `true` once);
    /// while that probe is out, further calls return `false`. A `true` from a
    /// half-open breaker obliges the caller to report the request's outcome
    /// (`on_success`, `on_failure` or `on_abandoned`), or no probe goes again.
    pub fn allow(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => true,
            Inner::Open { opened_at } => {
                if self.open_period_over(opened_at, now) {
                    *inner = Inner::HalfOpen {
                        probe_in_flight: true,
                    };
                    true
                } else {
                    false
                }
            }
            Inner::HalfOpen {
                probe_in_flight: false,
            } => {
                *inner = Inner::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
            Inner::HalfOpen {
                probe_in_flight: true,
            } => false,
        }
    }

    /// A request to this backend succeeded.
    ///
    /// Closed: the failure streak resets. Half open: the backend is back, so
    /// the breaker closes. Open: ignored; a request sent before the breaker
    /// opened says nothing about now, and the probe decides.
    pub fn on_success(&self) {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } | Inner::HalfOpen { .. } => {
                *inner = Inner::Closed {
                    consecutive_failures: 0,
                };
            }
            Inner::Open { .. } => {}
        }
    }

    /// A request to this backend failed.
    ///
    /// Closed: counts towards the threshold and opens the breaker on reaching
    /// it. Half open: the probe failed, so open again from `now`. Open:
    /// ignored; late failures from requests sent before it opened must not
    /// keep extending the open period.
    pub fn on_failure(&self, now: Instant) {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed {
                consecutive_failures,
            } => {
                let consecutive_failures = consecutive_failures.saturating_add(1);
                *inner = if consecutive_failures >= self.config.failure_threshold.max(1) {
                    Inner::Open { opened_at: now }
                } else {
                    Inner::Closed {
                        consecutive_failures,
                    }
                };
            }
            Inner::HalfOpen { .. } => *inner = Inner::Open { opened_at: now },
            Inner::Open { .. } => {}
        }
    }

    /// The backend could not be reached at all (connection refused): open
    /// at once, whatever the count. Unlike a 5xx or a slow answer this is
    /// not bad luck, and the request that found out is retried elsewhere.
    pub fn trip(&self, now: Instant) {
        let mut inner = self.lock();
        if !matches!(*inner, Inner::Open { .. }) {
            *inner = Inner::Open { opened_at: now };
        }
    }

    /// The probe's request ended without an outcome (the client left before
    /// the backend answered): let another probe through.
    pub fn on_abandoned(&self) {
        let mut inner = self.lock();
        if let Inner::HalfOpen {
            probe_in_flight: true,
        } = *inner
        {
            *inner = Inner::HalfOpen {
                probe_in_flight: false,
            };
        }
    }

    /// The state for metrics and the admin API.
    ///
    /// An open breaker whose `open_for` has passed reports `HalfOpen`: the
    /// next `allow` would let a probe through, and the transition only waits
    /// for a request to arrive, so reporting `Open` would overstate the outage.
    pub fn state(&self, now: Instant) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { opened_at } if self.open_period_over(opened_at, now) => {
                BreakerState::HalfOpen
            }
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn open_period_over(&self, opened_at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(opened_at) >= self.config.open_for
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every write is a single assignment of a whole `Inner`, so a panic
        // elsewhere while the lock was held cannot leave it half updated.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    const OPEN_FOR: Duration = Duration::from_secs(10);

    fn breaker(failure_threshold: u32) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            failure_threshold,
            open_for: OPEN_FOR,
        })
    }

    /// A breaker opened at the returned instant.
    fn opened(threshold: u32) -> (CircuitBreaker, Instant) {
        let b = breaker(threshold);
        let t0 = Instant::now();
        for _ in 0..threshold {
            b.on_failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Open);
        (b, t0)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let b = breaker(3);
        let t0 = Instant::now();
        b.on_failure(t0);
        b.on_failure(t0);
        assert!(b.allow(t0));
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.on_failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.allow(t0));
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let b = breaker(3);
        let t0 = Instant::now();
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert!(b.allow(t0));
    }

    #[test]
    fn stays_open_for_open_for() {
        let (b, t0) = opened(2);
        assert!(!b.allow(t0 + OPEN_FOR - Duration::from_millis(1)));
        assert_eq!(
            b.state(t0 + OPEN_FOR - Duration::from_millis(1)),
            BreakerState::Open
        );
    }

    #[test]
    fn open_breaker_past_its_period_reports_half_open() {
        let (b, t0) = opened(1);
        assert_eq!(b.state(t0 + OPEN_FOR), BreakerState::HalfOpen);
    }

    #[test]
    fn exactly_one_probe_after_open_for() {
        let (b, t0) = opened(2);
        let later = t0 + OPEN_FOR;
        assert!(b.allow(later));
        assert!(!b.allow(later));
        assert!(!b.allow(later + OPEN_FOR * 5));
        assert_eq!(b.state(later), BreakerState::HalfOpen);
    }

    #[test]
    fn probe_success_closes() {
        let (b, t0) = opened(2);
        let later = t0 + OPEN_FOR;
        assert!(b.allow(later));
        b.on_success();
        assert_eq!(b.state(later), BreakerState::Closed);
        assert!(b.allow(later));
        // The failure count starts over: one failure does not reopen it.
        b.on_failure(later);
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn probe_failure_reopens_for_another_open_for() {
        let (b, t0) = opened(2);
        let probe_at = t0 + OPEN_FOR;
        assert!(b.allow(probe_at));
        let failed_at = probe_at + Duration::from_secs(1);
        b.on_failure(failed_at);
        assert_eq!(b.state(failed_at), BreakerState::Open);
        assert!(!b.allow(failed_at + OPEN_FOR - Duration::from_millis(1)));
        assert!(b.allow(failed_at + OPEN_FOR));
    }

    #[test]
    fn abandoned_probe_lets_the_next_one_through() {
        let (b, t0) = opened(2);
        let later = t0 + OPEN_FOR;
        assert!(b.allow(later));
        assert!(!b.allow(later));
        b.on_abandoned();
        assert!(b.allow(later));
        assert!(!b.allow(later));
    }

    #[test]
    fn late_failures_while_open_do_not_extend_the_open_period() {
        let (b, t0) = opened(1);
        b.on_failure(t0 + OPEN_FOR - Duration::from_millis(1));
        assert!(b.allow(t0 + OPEN_FOR));
    }

    #[test]
    fn an_unreachable_backend_opens_at_once() {
        let now = Instant::now();
        let breaker = CircuitBreaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
        });
        breaker.trip(now);
        assert_eq!(breaker.state(now), BreakerState::Open);
        assert!(!breaker.allow(now));
    }

    #[test]
    fn zero_threshold_opens_on_the_first_failure() {
        let b = breaker(0);
        let t0 = Instant::now();
        assert!(b.allow(t0));
        b.on_failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
    }

    #[test]
    fn concurrent_allow_in_half_open_lets_exactly_one_probe_through() {
        const THREADS: usize = 8;
        let (b, t0) = opened(1);
        let later = t0 + OPEN_FOR;
        let barrier = Barrier::new(THREADS);
        let allowed = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        b.allow(later)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&allowed| allowed)
                .count()
        });
        assert_eq!(allowed, 1);
    }
}
