//! The admission queue of one backend pool: who gets the next free slot, and
//! who is refused because waiting would take too long.
//!
//! A pool has `capacity` slots, the sum of its backends' `max_concurrency`. A
//! request needs a [`Slot`] to be forwarded and holds it until its answer is
//! done (the guard is dropped). While every slot is taken, requests wait here
//! rather than piling onto GPUs that would only queue them internally, where
//! nothing can prioritise, measure or shed them.
//!
//! # Who goes next
//!
//! - **Strict priority.** Each tier has a rank, its index in the tier list
//!   (lowest first). A freed slot goes to the waiter with the highest
//!   *effective rank*.
//! - **FIFO within a tier.** Each tier's waiters are kept in arrival order.
//! - **Aging**, when configured, so a low tier is not starved forever by a
//!   steady stream of higher ones: a waiter gains one rank per `aging` it has
//!   waited, so effective rank = `rank + floor(waited / aging)`.
//! - **Ties** in effective rank go to the higher tier, then to the earlier
//!   arrival. An aged waiter must therefore climb *past* a tier to overtake
//!   it, and aging adds at most two ranks: a request can overtake the tier
//!   directly above its own (after `2 × aging`), never one further up. A
//!   long-waiting Free request gets ahead of Premium, but neither Free nor a
//!   backlogged Premium takes Pro's slots (measured: with unbounded aging,
//!   Free aged past Pro at 3x overload and Pro was shed).
//!
//! Without aging (`None`) the order is strict priority and a busy high tier
//! can hold a low tier back indefinitely; `max_wait` then bounds how long it
//! waits.
//!
//! Only the head of each tier is compared: within a tier everyone has the same
//! rank and the head has waited longest, so no one behind it can beat it.
//! Choosing is therefore O(tiers), and removing any waiter O(log n).
//!
//! A request that finds a free slot and nobody waiting takes it at once.
//! Otherwise a slot is never taken out of turn: a released slot goes straight
//! to the chosen waiter (`in_use` does not dip), so the pool stays busy while
//! requests queue and a newcomer cannot overtake the queue.
//!
//! # Shedding
//!
//! The expected wait of a new arrival at rank `r` is
//! `(ahead + 1) × service_time / capacity`, where `ahead` counts the waiters of
//! rank `r` or higher (aging is ignored: it only helps a waiter that is
//! already queued) and `service_time` is an exponentially weighted moving
//! average of how long slots are held, with weight 0.2 for the newest sample
//! (about the last ten requests matter, so it follows a change in load or
//! model within seconds without jumping on one slow answer). If it exceeds the
//! caller's `max_expected_wait`, the request is refused at once
//! ([`Shed::Busy`]) instead of waiting only to time out. With no sample yet,
//! or at capacity 0 (the fleet is scaled to zero and waking up), there is no
//! estimate and nothing is shed on expectation: the request is held. A queued
//! request that gets no slot within `max_wait` is refused with
//! [`Shed::TimedOut`].
//!
//! # Cancellation
//!
//! The caller `select!`s `acquire` against the client connection; when the
//! client leaves, the future is dropped and its entry leaves the queue at once.
//! A slot handed to a waiter whose future is dropped before it saw the grant
//! is passed on to the next waiter, never leaked. The handoff is a bare
//! `oneshot` signal and the [`Slot`] guard is built on the receiving side, so
//! no `Slot` (whose drop locks the queue) is ever dropped under the lock.
//!
//! # Counters
//!
//! Every `acquire` ends in exactly one of `admitted_total`, `shed_busy_total`,
//! `shed_timeout_total` or `abandoned_total` of its tier, counted when the
//! caller learns the outcome. [`AdmissionQueue::snapshot`] also gives each
//! tier's depth, oldest wait and expected wait: the signals the wake/sleep
//! controller reads.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

/// Bounds of [`Shed::retry_after`]: below a second a client would retry into
/// the same queue; beyond ten minutes the estimate says more about a stale
/// service time than about when capacity will be back.
const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);

/// The service-time average keeps 4/5 of the old value and takes 1/5 of the
/// new sample (alpha = 0.2), in integer nanoseconds so nothing can be NaN.
const EWMA_KEEP: u128 = 4;
const EWMA_DIVISOR: u128 = 5;

/// The tier used when the pool is given no tier names, so every rank still
/// maps to a tier.
const DEFAULT_TIER: &str = "default";

/// The priority admission queue of one backend pool. See the module docs for
/// the policy.
#[derive(Debug)]
pub struct AdmissionQueue {
    pool: String,
    /// Tier names; the index is the rank. Never empty.
    tiers: Vec<String>,
    /// `None` (or zero, normalised to `None`): strict priority.
    aging: Option<Duration>,
    /// One per tier. Atomics outside the lock, because the outcome is counted
    /// by the waiter after it has let go of the lock.
    counters: Vec<TierCounters>,
    /// std `Mutex`, not tokio's: every critical section is a few map and
    /// counter updates and never spans an `.await`, so a blocking lock is
    /// cheaper than an async one and cannot be held by a suspended task.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct TierCounters {
    admitted: AtomicU64,
    shed_busy: AtomicU64,
    shed_timeout: AtomicU64,
    abandoned: AtomicU64,
}

#[derive(Debug)]
struct State {
    capacity: u32,
    /// Slots held, including ones granted to a waiter that has not yet woken
    /// up. May exceed `capacity` after it shrank, until holders drain.
    in_use: u32,
    service_time: Option<Duration>,
    /// Arrival order across all tiers: the FIFO key and the tie-breaker.
    next_seq: u64,
    /// Waiters per tier (index = rank), keyed by arrival sequence, so the
    /// first entry is the head and a cancelled waiter is removed in O(log n).
    waiting: Vec<BTreeMap<u64, Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    arrived: Instant,
    /// Sending on it hands a slot to this waiter; `in_use` already counts it.
    grant: oneshot::Sender<()>,
}

impl AdmissionQueue {
    /// `tiers`: tier names from lowest to highest priority; a tier's index is
    /// its rank. An empty list is treated as one tier named `default`.
    /// `aging`: a waiting request gains one rank per `aging` waited (`None`:
    /// strict priority, no aging; `Some(ZERO)` is treated as `None`).
    pub fn new(
        pool: impl Into<String>,
        capacity: u32,
        tiers: Vec<String>,
        aging: Option<Duration>,
    ) -> Arc<Self> {
        let tiers = if tiers.is_empty() {
            vec![DEFAULT_TIER.to_owned()]
        } else {
            tiers
        };
        Arc::new(Self {
            pool: pool.into(),
            aging: aging.filter(|step| !step.is_zero()),
            counters: tiers.iter().map(|_| TierCounters::default()).collect(),
            state: Mutex::new(State {
                capacity,
                in_use: 0,
                service_time: None,
                next_seq: 0,
                waiting: tiers.iter().map(|_| BTreeMap::new()).collect(),
            }),
            tiers,
        })
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Sets the number of slots (the backend fleet changed). Growing hands the
    /// new slots to waiters at once; shrinking below `in_use` takes nothing
    /// away: slots in use drain, and no slot is handed over until `in_use` is
    /// below the new capacity.
    pub fn set_capacity(&self, capacity: u32) {
        let mut state = self.lock();
        state.capacity = capacity;
        state.admit_waiters(Instant::now(), self.aging);
    }

    /// Waits for a slot of this pool at `rank` (an index into the tier list;
    /// a rank past the end counts as the highest tier).
    ///
    /// Takes a free slot at once if nobody is waiting. Otherwise refuses at
    /// once with [`Shed::Busy`] if the expected wait exceeds
    /// `max_expected_wait` (never without a service-time sample or at capacity
    /// 0), or queues and gives up with [`Shed::TimedOut`] after `max_wait`.
    ///
    /// Cancel-safe: dropping the future while it waits removes the request
    /// from the queue at once, and a slot granted to it meanwhile is passed on.
    pub async fn acquire(
        self: &Arc<Self>,
        rank: usize,
        max_wait: Duration,
        max_expected_wait: Duration,
    ) -> Result<Slot, Shed> {
        let rank = rank.min(self.tiers.len().saturating_sub(1));
        let arrived = Instant::now();
        let (seq, grant, cold_start) = {
            let mut state = self.lock();
            if state.in_use < state.capacity && state.depth() == 0 {
                state.in_use += 1;
                drop(state);
                self.counters[rank].admitted.fetch_add(1, Ordering::Relaxed);
                return Ok(Slot::new(self, Duration::ZERO, false));
            }
            if let Some(expected_wait) = state.expected_wait(rank)
                && expected_wait > max_expected_wait
            {
                drop(state);
                self.counters[rank]
                    .shed_busy
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Shed::Busy { expected_wait });
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let (sender, receiver) = oneshot::channel();
            state.waiting[rank].insert(
                seq,
                Waiter {
                    arrived,
                    grant: sender,
                },
            );
            (seq, receiver, state.capacity == 0)
        };
        // Created before the first `.await`, so from here on dropping the
        // future always runs `Waiting::drop` and nothing is left queued.
        let mut waiting = Waiting {
            queue: self,
            rank,
            seq,
            arrived,
            grant,
            cold_start,
            settled: false,
        };
        if let Ok(Ok(())) = timeout(max_wait, &mut waiting.grant).await {
            waiting.settled = true;
            self.counters[rank].admitted.fetch_add(1, Ordering::Relaxed);
            return Ok(Slot::new(self, arrived.elapsed(), cold_start));
        }
        waiting.give_up()
    }

    /// The pool's state now: what the wake/sleep controller and the metrics
    /// read.
    pub fn snapshot(&self) -> PoolSnapshot {
        let now = Instant::now();
        let state = self.lock();
        let tiers = self
            .tiers
            .iter()
            .zip(&state.waiting)
            .zip(&self.counters)
            .enumerate()
            .map(|(rank, ((tier, waiters), counters))| TierSnapshot {
                tier: tier.clone(),
                depth: waiters.len(),
                oldest_wait: waiters
                    .first_key_value()
                    .map_or(Duration::ZERO, |(_, head)| {
                        now.saturating_duration_since(head.arrived)
                    }),
                expected_wait: state.expected_wait(rank),
                admitted_total: counters.admitted.load(Ordering::Relaxed),
                shed_busy_total: counters.shed_busy.load(Ordering::Relaxed),
                shed_timeout_total: counters.shed_timeout.load(Ordering::Relaxed),
                abandoned_total: counters.abandoned.load(Ordering::Relaxed),
            })
            .collect();
        PoolSnapshot {
            pool: self.pool.clone(),
            capacity: state.capacity,
            in_use: state.in_use,
            service_time: state.service_time,
            tiers,
        }
    }

    /// Locks the state. A poisoned lock is taken over: nothing panics while
    /// holding it, and a queue that refused every request afterwards would be
    /// worse than one that carries on.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn depth(&self) -> usize {
        self.waiting.iter().map(BTreeMap::len).sum()
    }

    /// The expected wait of a new arrival at `rank`; `None` when there is no
    /// basis for one (no service-time sample, or capacity 0). Zero when it
    /// would be admitted at once.
    fn expected_wait(&self, rank: usize) -> Option<Duration> {
        if self.in_use < self.capacity && self.depth() == 0 {
            return Some(Duration::ZERO);
        }
        let service_time = self.service_time?;
        if self.capacity == 0 {
            return None;
        }
        let ahead: usize = self
            .waiting
            .get(rank..)
            .map_or(0, |tiers| tiers.iter().map(BTreeMap::len).sum());
        let ahead = u128::try_from(ahead).unwrap_or(u128::MAX);
        let nanos = service_time
            .as_nanos()
            .saturating_mul(ahead.saturating_add(1))
            / u128::from(self.capacity);
        Some(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    fn record_hold(&mut self, held: Duration) {
        self.service_time = Some(match self.service_time {
            None => held,
            Some(average) => {
                let nanos = (average.as_nanos() * EWMA_KEEP + held.as_nanos()) / EWMA_DIVISOR;
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
        });
    }

    /// Gives back one slot and, in the same critical section, hands free
    /// slots to waiters, so a handover never shows `in_use` dipping.
    fn release(&mut self, now: Instant, aging: Option<Duration>) {
        self.in_use = self.in_use.saturating_sub(1);
        self.admit_waiters(now, aging);
    }

    /// Grants free slots to waiters in policy order until none is free or no
    /// one waits.
    fn admit_waiters(&mut self, now: Instant, aging: Option<Duration>) {
        while self.in_use < self.capacity {
            let Some(waiter) = self.pop_next(now, aging) else {
                return;
            };
            // A waiter's receiver outlives its queue entry (its drop removes
            // the entry first), so this fails only if that ever changes; the
            // slot then stays free for the next one.
            if waiter.grant.send(()).is_ok() {
                self.in_use += 1;
            }
        }
    }

    /// Removes and returns the waiter with the highest effective rank; on a
    /// tie the higher tier, then the earliest arrival. Only tier heads are
    /// compared: within a tier the head has waited longest.
    fn pop_next(&mut self, now: Instant, aging: Option<Duration>) -> Option<Waiter> {
        let mut best: Option<(usize, u64, usize)> = None; // (effective rank, seq, rank)
        for (rank, waiters) in self.waiting.iter().enumerate() {
            let Some((&seq, head)) = waiters.first_key_value() else {
                continue;
            };
            let effective =
                effective_rank(rank, now.saturating_duration_since(head.arrived), aging);
            // Ranks are visited lowest first, so `>=` on a tie prefers the higher tier.
            let better = best.is_none_or(|(best_effective, _, _)| effective >= best_effective);
            if better {
                best = Some((effective, seq, rank));
            }
        }
        let (_, seq, rank) = best?;
        self.waiting.get_mut(rank)?.remove(&seq)
    }
}

/// The most ranks aging adds: with ties going to the higher tier, a waiter
/// can overtake the tier directly above its own, never one further up.
const MAX_AGING_RANKS: usize = 2;

/// `rank + min(floor(waited / aging), 2)`, or `rank` without aging.
fn effective_rank(rank: usize, waited: Duration, aging: Option<Duration>) -> usize {
    match aging {
        Some(step) if !step.is_zero() => {
            let steps = waited.as_nanos() / step.as_nanos();
            let steps = usize::try_from(steps).unwrap_or(usize::MAX);
            rank.saturating_add(steps.min(MAX_AGING_RANKS))
        }
        _ => rank,
    }
}

/// A queued `acquire`: removes its entry, or passes on a grant it never
/// observed, if the future is dropped while waiting.
struct Waiting<'a> {
    queue: &'a Arc<AdmissionQueue>,
    rank: usize,
    seq: u64,
    arrived: Instant,
    grant: oneshot::Receiver<()>,
    /// The pool had no slots at all when it arrived.
    cold_start: bool,
    /// The outcome has been decided and counted; nothing left to undo.
    settled: bool,
}

impl Waiting<'_> {
    /// The wait ended without an observed grant (`max_wait` passed). Under the
    /// lock, either the entry is still queued (remove it: timed out) or a
    /// grant raced the deadline and sits in the channel (take the slot).
    fn give_up(mut self) -> Result<Slot, Shed> {
        let queue = self.queue;
        let waited = self.arrived.elapsed();
        let mut state = queue.lock();
        self.settled = true;
        let was_queued = state.waiting[self.rank].remove(&self.seq).is_some();
        if !was_queued && self.grant.try_recv().is_ok() {
            drop(state);
            queue.counters[self.rank]
                .admitted
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Slot::new(queue, waited, self.cold_start));
        }
        let expected_wait = state.expected_wait(self.rank);
        drop(state);
        queue.counters[self.rank]
            .shed_timeout
            .fetch_add(1, Ordering::Relaxed);
        Err(Shed::TimedOut {
            waited,
            expected_wait,
        })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let queue = self.queue;
        let mut state = queue.lock();
        let was_queued = state.waiting[self.rank].remove(&self.seq).is_some();
        // Grants are sent under the lock, so with the entry gone a grant is
        // either in the channel now or was never sent.
        if !was_queued && self.grant.try_recv().is_ok() {
            // The slot was ours but the client left before we saw it: pass it
            // on. No `Slot` exists yet, so nothing here re-locks the queue.
            state.release(Instant::now(), queue.aging);
        }
        drop(state);
        queue.counters[self.rank]
            .abandoned
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// One slot of the pool, held while the request is forwarded and answered.
/// Dropping it releases the slot to the next waiter and records the hold time
/// in the service-time average.
pub struct Slot {
    queue: Arc<AdmissionQueue>,
    acquired: Instant,
    waited: Duration,
    cold_start: bool,
}

impl Slot {
    fn new(queue: &Arc<AdmissionQueue>, waited: Duration, cold_start: bool) -> Self {
        Self {
            queue: Arc::clone(queue),
            acquired: Instant::now(),
            waited,
            cold_start,
        }
    }

    /// How long the request queued for this slot (zero if admitted at once).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The pool had no capacity when the request arrived: it was held while
    /// an instance woke (`x-tollgate-cold-start`).
    pub fn cold_start(&self) -> bool {
        self.cold_start
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("pool", &self.queue.pool)
            .field("waited", &self.waited)
            .finish_non_exhaustive()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let held = self.acquired.elapsed();
        let mut state = self.queue.lock();
        state.record_hold(held);
        state.release(Instant::now(), self.queue.aging);
    }
}

/// Why a request was refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Expected wait beyond `max_expected_wait`: refused at once.
    Busy { expected_wait: Duration },
    /// Waited `max_wait` without getting a slot. `expected_wait` is what a new
    /// arrival of the same rank would expect at that moment (`None` without a
    /// service-time sample or at capacity 0), for [`Shed::retry_after`].
    TimedOut {
        waited: Duration,
        expected_wait: Option<Duration>,
    },
}

impl Shed {
    /// When the client should try again (`Retry-After`): for `Busy` the
    /// expected wait, for `TimedOut` the expected wait of its rank when it
    /// gave up, each clamped to 1 s..=600 s; 1 s when there is no estimate.
    pub fn retry_after(&self) -> Duration {
        let expected = match *self {
            Self::Busy { expected_wait } => Some(expected_wait),
            Self::TimedOut { expected_wait, .. } => expected_wait,
        };
        expected.map_or(RETRY_AFTER_MIN, |wait| {
            wait.clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX)
        })
    }
}

/// A pool's admission state at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub pool: String,
    pub capacity: u32,
    /// May exceed `capacity` right after it shrank.
    pub in_use: u32,
    /// Average slot hold time; `None` before the first slot was released.
    pub service_time: Option<Duration>,
    /// One per tier, lowest priority first.
    pub tiers: Vec<TierSnapshot>,
}

/// One tier's queue at one moment, with its lifetime counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSnapshot {
    pub tier: String,
    /// Requests of this tier waiting now.
    pub depth: usize,
    /// How long the tier's oldest waiter has waited; zero when none waits.
    pub oldest_wait: Duration,
    /// What a new arrival of this tier would expect to wait: zero if a slot
    /// is free and no one waits, `None` without a service-time sample or at
    /// capacity 0.
    pub expected_wait: Option<Duration>,
    pub admitted_total: u64,
    pub shed_busy_total: u64,
    pub shed_timeout_total: u64,
    /// Left the queue because the client went away.
    pub abandoned_total: u64,
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// Long enough that no test waiter times out or is shed unless it means to.
    const HOUR: Duration = Duration::from_secs(3600);

    fn queue(capacity: u32, aging: Option<Duration>) -> Arc<AdmissionQueue> {
        let tiers = ["free", "standard", "priority"].map(String::from).to_vec();
        AdmissionQueue::new("llama", capacity, tiers, aging)
    }

    /// Polls once without waiting, so a test controls exactly when each
    /// future looks at the queue (no spawned tasks, no sleeps). Unconstrained
    /// because one test task polls thousands of futures, which would spend
    /// tokio's cooperative budget and make a granted receiver report pending.
    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        let mut future = tokio::task::unconstrained(future);
        Pin::new(&mut future).poll(&mut Context::from_waker(Waker::noop()))
    }

    /// An `acquire` that has been polled once and is queued.
    fn waiter(
        queue: &Arc<AdmissionQueue>,
        rank: usize,
    ) -> Pin<Box<impl Future<Output = Result<Slot, Shed>> + '_>> {
        let mut future = Box::pin(queue.acquire(rank, HOUR, HOUR));
        assert!(poll_once(&mut future).is_pending(), "expected to queue");
        future
    }

    /// The slot if the waiter has been granted one, `None` if still waiting.
    fn granted<F: Future<Output = Result<Slot, Shed>> + Unpin>(future: &mut F) -> Option<Slot> {
        match poll_once(future) {
            Poll::Ready(result) => Some(result.unwrap()),
            Poll::Pending => None,
        }
    }

    fn tier(queue: &AdmissionQueue, rank: usize) -> TierSnapshot {
        queue.snapshot().tiers.swap_remove(rank)
    }

    /// Gives the queue a service-time sample of `held`.
    async fn sample(queue: &Arc<AdmissionQueue>, held: Duration) {
        let slot = queue.acquire(0, HOUR, HOUR).await.unwrap();
        tokio::time::advance(held).await;
        drop(slot);
    }

    #[tokio::test(start_paused = true)]
    async fn free_slot_with_nobody_waiting_is_taken_at_once() {
        let q = queue(2, None);
        let a = q.acquire(0, HOUR, Duration::ZERO).await.unwrap();
        let b = q.acquire(2, HOUR, Duration::ZERO).await.unwrap();
        assert_eq!(a.waited(), Duration::ZERO);
        assert_eq!(b.waited(), Duration::ZERO);
        assert_eq!(q.snapshot().in_use, 2);
        drop((a, b));
        let snapshot = q.snapshot();
        assert_eq!(snapshot.in_use, 0);
        assert_eq!(snapshot.tiers[0].admitted_total, 1);
        assert_eq!(snapshot.tiers[2].admitted_total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn high_rank_arriving_after_ten_low_rank_is_served_first() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut low: Vec<_> = (0..10).map(|_| waiter(&q, 0)).collect();
        let mut high = waiter(&q, 2);
        tokio::time::advance(Duration::from_secs(5)).await;

        drop(held);
        let slot = granted(&mut high).unwrap();
        assert_eq!(slot.waited(), Duration::from_secs(5));
        assert!(granted(&mut low[0]).is_none());
        assert_eq!(q.snapshot().in_use, 1);

        drop(slot);
        for i in 0..low.len() {
            let slot = granted(&mut low[i]).unwrap();
            if let Some(next) = low.get_mut(i + 1) {
                assert!(granted(next).is_none(), "waiter {} overtook {i}", i + 1);
            }
            drop(slot);
        }
        assert_eq!(q.snapshot().in_use, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_within_a_tier() {
        let q = queue(1, Some(Duration::from_secs(10)));
        let held = q.acquire(1, HOUR, HOUR).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..5 {
            waiters.push(waiter(&q, 1));
            tokio::time::advance(Duration::from_secs(7)).await;
        }
        drop(held);
        for i in 0..waiters.len() {
            let slot = granted(&mut waiters[i]).unwrap();
            for later in &mut waiters[i + 1..] {
                assert!(granted(later).is_none());
            }
            drop(slot);
        }
        assert_eq!(q.snapshot().in_use, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_aged_waiter_level_with_a_higher_tier_yields_to_it() {
        // aging 10 s: after 25 s a rank-0 waiter is at effective rank 2, level
        // with a fresh rank-2 arrival; the tie goes to the higher tier.
        let q = queue(1, Some(Duration::from_secs(10)));
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut low = waiter(&q, 0);
        tokio::time::advance(Duration::from_secs(25)).await;
        let mut high = waiter(&q, 2);

        drop(held);
        let slot = granted(&mut high).unwrap();
        assert!(granted(&mut low).is_none());
        drop(slot);
        assert!(granted(&mut low).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_aged_waiter_overtakes_the_tier_directly_above() {
        // After 20 s a rank-0 waiter is at effective rank 2: past a fresh rank-1.
        let q = queue(1, Some(Duration::from_secs(10)));
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut low = waiter(&q, 0);
        tokio::time::advance(Duration::from_secs(20)).await;
        let mut mid = waiter(&q, 1);

        drop(held);
        let slot = granted(&mut low).unwrap();
        assert!(granted(&mut mid).is_none());
        drop(slot);
        assert!(granted(&mut mid).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn aging_never_overtakes_a_tier_two_above() {
        // Pins the regression where Free, aged past Pro, took Pro's slots at
        // 3x overload: however long it waits, rank 0 yields to rank 2.
        let q = queue(1, Some(Duration::from_secs(10)));
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut low = waiter(&q, 0);
        tokio::time::advance(Duration::from_secs(10 * 60)).await;
        let mut high = waiter(&q, 2);

        drop(held);
        let slot = granted(&mut high).unwrap();
        assert!(granted(&mut low).is_none());
        drop(slot);
        assert!(granted(&mut low).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn same_tier_waiters_keep_arrival_order_under_aging() {
        let q = queue(1, Some(Duration::from_secs(10)));
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut first = waiter(&q, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut second = waiter(&q, 1);

        drop(held);
        let slot = granted(&mut first).unwrap();
        assert!(granted(&mut second).is_none());
        drop(slot);
        assert!(granted(&mut second).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn without_aging_a_long_wait_does_not_raise_rank() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut low = waiter(&q, 0);
        tokio::time::advance(Duration::from_secs(50 * 60)).await;
        let mut high = waiter(&q, 1);
        drop(held);
        let slot = granted(&mut high).unwrap();
        assert!(granted(&mut low).is_none());
        drop(slot);
        assert!(granted(&mut low).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn service_time_is_an_ewma_with_alpha_one_fifth() {
        let q = queue(1, None);
        assert_eq!(q.snapshot().service_time, None);
        sample(&q, Duration::from_secs(10)).await;
        assert_eq!(q.snapshot().service_time, Some(Duration::from_secs(10)));
        sample(&q, Duration::from_secs(20)).await;
        // 0.8 × 10 s + 0.2 × 20 s
        assert_eq!(q.snapshot().service_time, Some(Duration::from_secs(12)));
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_busy_once_expected_wait_exceeds_the_limit() {
        let q = queue(1, None);
        sample(&q, Duration::from_secs(10)).await;
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let limit = Duration::from_secs(15);

        // Nobody ahead: (0 + 1) × 10 s / 1 = 10 s, within the limit.
        let mut first = Box::pin(q.acquire(0, HOUR, limit));
        assert!(poll_once(&mut first).is_pending());
        // One ahead: 20 s, refused at once.
        let shed = q.acquire(0, HOUR, limit).await.unwrap_err();
        assert_eq!(
            shed,
            Shed::Busy {
                expected_wait: Duration::from_secs(20)
            }
        );
        assert_eq!(shed.retry_after(), Duration::from_secs(20));
        // A higher rank does not count lower-rank waiters as ahead of it.
        let mut high = Box::pin(q.acquire(1, HOUR, limit));
        assert!(poll_once(&mut high).is_pending());

        let snapshot = q.snapshot();
        assert_eq!(snapshot.tiers[0].shed_busy_total, 1);
        assert_eq!(snapshot.tiers[0].depth, 1);
        assert_eq!(
            snapshot.tiers[0].expected_wait,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            snapshot.tiers[1].expected_wait,
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            snapshot.tiers[2].expected_wait,
            Some(Duration::from_secs(10))
        );
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn expected_wait_divides_by_capacity() {
        let q = queue(4, None);
        sample(&q, Duration::from_secs(8)).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(q.acquire(0, HOUR, HOUR).await.unwrap());
        }
        // Nobody ahead, four slots: 8 s / 4.
        assert_eq!(tier(&q, 0).expected_wait, Some(Duration::from_secs(2)));
        let _queued = waiter(&q, 0);
        assert_eq!(tier(&q, 0).expected_wait, Some(Duration::from_secs(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_busy_shedding_without_a_service_time_sample() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut queued = Box::pin(q.acquire(0, HOUR, Duration::ZERO));
        assert!(poll_once(&mut queued).is_pending());
        assert_eq!(tier(&q, 0).expected_wait, None);
        drop(held);
        assert!(granted(&mut queued).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_zero_holds_requests_instead_of_shedding() {
        // Scaled to zero and waking: the request must wait for capacity, not
        // be refused on an estimate that divides by nothing.
        let q = queue(1, None);
        sample(&q, Duration::from_secs(10)).await;
        q.set_capacity(0);
        let mut queued = Box::pin(q.acquire(0, HOUR, Duration::ZERO));
        assert!(poll_once(&mut queued).is_pending());
        let snapshot = q.snapshot();
        assert_eq!(snapshot.tiers[0].depth, 1);
        assert_eq!(snapshot.tiers[0].expected_wait, None);
        assert_eq!(snapshot.tiers[0].shed_busy_total, 0);

        q.set_capacity(1);
        assert!(granted(&mut queued).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_after_max_wait_and_leaves_the_queue() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let max_wait = Duration::from_secs(5);

        let shed = q.acquire(0, max_wait, HOUR).await.unwrap_err();
        let Shed::TimedOut {
            waited,
            expected_wait,
        } = shed
        else {
            unreachable!("expected a timeout, got {shed:?}");
        };
        assert!(waited >= max_wait);
        // No service-time sample: no estimate, retry in a second.
        assert_eq!(expected_wait, None);
        assert_eq!(shed.retry_after(), Duration::from_secs(1));

        let snapshot = q.snapshot();
        assert_eq!(snapshot.tiers[0].depth, 0);
        assert_eq!(snapshot.tiers[0].shed_timeout_total, 1);
        drop(held);
        assert_eq!(q.snapshot().in_use, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn timed_out_retry_after_is_the_expected_wait_of_its_rank() {
        let q = queue(1, None);
        sample(&q, Duration::from_secs(30)).await;
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let _ahead = waiter(&q, 2);
        let shed = q
            .acquire(1, Duration::from_secs(5), HOUR)
            .await
            .unwrap_err();
        // When it gave up, one rank-2 waiter was ahead of a rank-1 arrival.
        assert_eq!(shed.retry_after(), Duration::from_secs(60));
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_queued_acquire_leaves_the_queue_at_once() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let first = waiter(&q, 0);
        let mut second = waiter(&q, 0);
        assert_eq!(tier(&q, 0).depth, 2);

        drop(first);
        let snapshot = tier(&q, 0);
        assert_eq!(snapshot.depth, 1);
        assert_eq!(snapshot.abandoned_total, 1);

        drop(held);
        let slot = granted(&mut second).unwrap();
        drop(slot);
        assert_eq!(q.snapshot().in_use, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slot_granted_to_a_dropped_waiter_is_passed_on_not_leaked() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let first = waiter(&q, 0);
        let mut second = waiter(&q, 0);

        // The slot is handed to `first`, which is dropped before it polls
        // again and sees the grant.
        drop(held);
        assert_eq!(q.snapshot().in_use, 1);
        drop(first);
        assert_eq!(q.snapshot().in_use, 1);
        let slot = granted(&mut second).unwrap();
        drop(slot);

        // Same race with no one left to pass the slot to.
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let lone = waiter(&q, 0);
        drop(held);
        drop(lone);

        let snapshot = q.snapshot();
        assert_eq!(snapshot.in_use, 0);
        assert_eq!(snapshot.tiers[0].depth, 0);
        assert_eq!(snapshot.tiers[0].abandoned_total, 2);
        // held, second, held again.
        assert_eq!(snapshot.tiers[0].admitted_total, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn growing_capacity_admits_waiters_at_once() {
        let q = queue(0, None);
        let mut waiters: Vec<_> = (0..3).map(|_| waiter(&q, 0)).collect();
        q.set_capacity(2);
        let snapshot = q.snapshot();
        assert_eq!(snapshot.in_use, 2);
        assert_eq!(snapshot.tiers[0].depth, 1);
        let a = granted(&mut waiters[0]).unwrap();
        let b = granted(&mut waiters[1]).unwrap();
        assert!(granted(&mut waiters[2]).is_none());
        drop((a, b));
        assert!(granted(&mut waiters[2]).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn shrinking_capacity_drains_before_handing_over() {
        let q = queue(2, None);
        let a = q.acquire(0, HOUR, HOUR).await.unwrap();
        let b = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut queued = waiter(&q, 0);
        q.set_capacity(1);
        assert_eq!(q.snapshot().in_use, 2);

        drop(a);
        assert_eq!(q.snapshot().in_use, 1);
        assert!(granted(&mut queued).is_none());
        drop(b);
        assert!(granted(&mut queued).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn oldest_wait_is_the_head_of_each_tier() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let _old = waiter(&q, 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        let _young = waiter(&q, 1);
        let snapshot = q.snapshot();
        assert_eq!(snapshot.tiers[1].depth, 2);
        assert_eq!(snapshot.tiers[1].oldest_wait, Duration::from_secs(3));
        assert_eq!(snapshot.tiers[0].oldest_wait, Duration::ZERO);
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_waiters_drain_in_priority_then_arrival_order() {
        const WAITERS: usize = 10_000;
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        // Alternate ranks 0 and 1: all rank-1 waiters first, each tier FIFO.
        let mut waiters: Vec<_> = (0..WAITERS).map(|i| waiter(&q, i % 2)).collect();
        assert_eq!(
            q.snapshot().tiers.iter().map(|t| t.depth).sum::<usize>(),
            WAITERS
        );

        let order: Vec<usize> = (1..WAITERS)
            .step_by(2)
            .chain((0..WAITERS).step_by(2))
            .collect();
        drop(held);
        for (position, &index) in order.iter().enumerate() {
            let slot = granted(&mut waiters[index]).unwrap();
            if let Some(&next) = order.get(position + 1) {
                assert!(granted(&mut waiters[next]).is_none());
            }
            drop(slot);
        }
        let snapshot = q.snapshot();
        assert_eq!(snapshot.in_use, 0);
        assert_eq!(snapshot.tiers[0].admitted_total, 1 + WAITERS as u64 / 2);
        assert_eq!(snapshot.tiers[1].admitted_total, WAITERS as u64 / 2);
    }

    /// Races grants against deadlines and cancellations on real threads. The
    /// interleavings vary from run to run; what is asserted does not: every
    /// request ends in exactly one outcome and no slot is leaked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_grants_timeouts_and_cancellations_leak_nothing() {
        const REQUESTS: u64 = 2_000;
        let q = queue(3, Some(Duration::from_millis(1)));
        let tasks: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let q = Arc::clone(&q);
                tokio::spawn(async move {
                    let rank = usize::try_from(i % 3).unwrap();
                    let max_wait = Duration::from_micros(200 + i % 7 * 100);
                    let acquire = q.acquire(rank, max_wait, HOUR);
                    // Every fifth caller's client "disconnects" mid-wait.
                    let client_gone = Duration::from_micros(if i % 5 == 0 { 150 } else { 10_000 });
                    if let Ok(Ok(_slot)) = tokio::time::timeout(client_gone, acquire).await {
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let snapshot = q.snapshot();
        assert_eq!(snapshot.in_use, 0);
        let outcomes: u64 = snapshot
            .tiers
            .iter()
            .map(|t| {
                assert_eq!(t.depth, 0);
                t.admitted_total + t.shed_busy_total + t.shed_timeout_total + t.abandoned_total
            })
            .sum();
        assert_eq!(outcomes, REQUESTS);
    }

    #[test]
    fn retry_after_is_clamped_to_one_second_to_ten_minutes() {
        let busy = |secs: f64| Shed::Busy {
            expected_wait: Duration::from_secs_f64(secs),
        };
        assert_eq!(busy(0.2).retry_after(), Duration::from_secs(1));
        assert_eq!(busy(7200.0).retry_after(), Duration::from_secs(600));
        let timed_out = Shed::TimedOut {
            waited: Duration::from_secs(30),
            expected_wait: None,
        };
        assert_eq!(timed_out.retry_after(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_rank_counts_as_the_highest_tier() {
        let q = queue(1, None);
        let held = q.acquire(0, HOUR, HOUR).await.unwrap();
        let mut top = waiter(&q, 2);
        let mut beyond = waiter(&q, 99);
        assert_eq!(tier(&q, 2).depth, 2);
        drop(held);
        // Same tier, so FIFO: the out-of-range rank does not jump the queue.
        let slot = granted(&mut top).unwrap();
        assert!(granted(&mut beyond).is_none());
        drop(slot);
        assert!(granted(&mut beyond).is_some());
    }

    #[test]
    fn empty_tier_list_gets_one_default_tier() {
        let q = AdmissionQueue::new("llama", 1, Vec::new(), None);
        let tiers = q.snapshot().tiers;
        assert_eq!(tiers.len(), 1);
        assert_eq!(tiers[0].tier, "default");
    }

    #[test]
    fn acquire_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let q = queue(1, None);
        let future = q.acquire(0, HOUR, HOUR);
        assert_send(&future);
        let _: fn(Slot) = |slot| assert_send(&slot);
    }
}
