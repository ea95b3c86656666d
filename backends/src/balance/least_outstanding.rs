//! Least outstanding requests, by power of two choices weighted by capacity.
//!
//! Why two random choices rather than the global minimum: every router
//! instance acts on in-flight counts that are slightly stale, so "always the
//! least loaded" sends a burst to the same backend until its count catches up
//! (herding). Comparing two random candidates spreads that burst, costs O(1)
//! instead of a scan, and is near optimal: Mitzenmacher ("The Power of Two
//! Choices in Randomized Load Balancing", 2001) shows the maximum load drops
//! exponentially versus one random choice, and more choices gain little more.
//!
//! Why weighted by capacity: backends differ in size. A backend with 64 slots
//! and 8 requests in flight is far less busy than one with 4 slots and 2 in
//! flight, though its raw count is higher; load is `in_flight / capacity`.

use std::cmp::Ordering;
use std::sync::{Mutex, PoisonError};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Candidate, Policy, RequestFacts};

/// Power of two choices over `in_flight / capacity`.
///
/// Ties on load go to the candidate with more free slots, then the lower id,
/// so a pick is a pure function of the two draws.
#[derive(Debug)]
pub struct LeastOutstanding {
    // A std Mutex: held for two draws, never across an await. SmallRng because
    // the draws only spread load; they need speed, not unpredictability.
    rng: Mutex<SmallRng>,
}

impl LeastOutstanding {
    /// Seeded from the thread-local OS-seeded generator.
    pub fn new() -> Self {
        Self {
            rng: Mutex::new(SmallRng::from_rng(&mut rand::rng())),
        }
    }

    /// Deterministic draws, for tests and reproducible simulations.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        }
    }

    /// Two distinct indices below `len` (which must be at least 2).
    fn draw_two(&self, len: usize) -> (usize, usize) {
        // A panic while holding the lock cannot leave the RNG half-updated in a
        // way that matters, so a poisoned lock is used as is.
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        let first = rng.random_range(0..len);
        // Draw from the other `len - 1` slots and skip over `first`.
        let mut second = rng.random_range(0..len - 1);
        if second >= first {
            second += 1;
        }
        (first, second)
    }
}

impl Default for LeastOutstanding {
    fn default() -> Self {
        Self::new()
    }
}

/// A capacity of 0 (misconfigured or unknown) counts as one slot rather than
/// dividing by zero or making the backend look infinitely loaded or free.
fn effective_capacity(c: &Candidate) -> u64 {
    u64::from(c.capacity.max(1))
}

/// `Less` when `a` is the better choice.
fn compare(a: &Candidate, b: &Candidate) -> Ordering {
    // a.in_flight / a.cap vs b.in_flight / b.cap, cross-multiplied to stay in
    // integers; u32 * u32 always fits in u64.
    let load_a = u64::from(a.in_flight) * effective_capacity(b);
    let load_b = u64::from(b.in_flight) * effective_capacity(a);
    let free = |c: &Candidate| effective_capacity(c).saturating_sub(u64::from(c.in_flight));
    load_a
        .cmp(&load_b)
        .then_with(|| free(b).cmp(&free(a)))
        .then_with(|| a.id.cmp(&b.id))
}

impl Policy for LeastOutstanding {
    fn name(&self) -> &'static str {
        "least_outstanding"
    }

    fn pick(&self, candidates: &[Candidate], _request: &RequestFacts<'_>) -> usize {
        if candidates.len() < 2 {
            return 0;
        }
        let (i, j) = self.draw_two(candidates.len());
        match (candidates.get(i), candidates.get(j)) {
            (Some(a), Some(b)) if compare(b, a) == Ordering::Less => j,
            _ => i,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: usize, in_flight: u32, capacity: u32) -> Candidate {
        Candidate {
            id,
            in_flight,
            capacity,
        }
    }

    fn pick(policy: &LeastOutstanding, candidates: &[Candidate]) -> usize {
        policy.pick(candidates, &RequestFacts::default())
    }

    #[test]
    fn single_candidate_is_returned() {
        let policy = LeastOutstanding::with_seed(1);
        assert_eq!(pick(&policy, &[candidate(7, 100, 1)]), 0);
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let policy = LeastOutstanding::with_seed(2);
        let c = [candidate(0, 3, 8), candidate(1, 1, 8)];
        for _ in 0..100 {
            assert_eq!(pick(&policy, &c), 1);
        }
    }

    #[test]
    fn load_is_weighted_by_capacity_not_raw_in_flight() {
        // 8/64 = 0.125 is lighter than 2/4 = 0.5 though 8 > 2.
        let policy = LeastOutstanding::with_seed(3);
        let c = [candidate(0, 2, 4), candidate(1, 8, 64)];
        for _ in 0..100 {
            assert_eq!(pick(&policy, &c), 1);
        }
    }

    #[test]
    fn equal_load_goes_to_the_backend_with_more_free_slots() {
        // 2/4 and 16/32 are both half full; 16 free beats 2 free.
        let policy = LeastOutstanding::with_seed(4);
        let c = [candidate(0, 2, 4), candidate(1, 16, 32)];
        for _ in 0..100 {
            assert_eq!(pick(&policy, &c), 1);
        }
    }

    #[test]
    fn full_tie_goes_to_the_lower_id_whatever_the_slice_order() {
        let policy = LeastOutstanding::with_seed(5);
        let c = [candidate(9, 1, 4), candidate(3, 1, 4)];
        for _ in 0..100 {
            assert_eq!(pick(&policy, &c), 1);
        }
    }

    #[test]
    fn zero_capacity_counts_as_one_slot_instead_of_dividing_by_zero() {
        // 1 in flight on "0" slots is full (1/1); 1 of 4 is lighter.
        let policy = LeastOutstanding::with_seed(6);
        let c = [candidate(0, 1, 0), candidate(1, 1, 4)];
        for _ in 0..100 {
            assert_eq!(pick(&policy, &c), 1);
        }
    }

    #[test]
    fn heaviest_of_three_is_never_chosen_because_draws_are_distinct() {
        // With two distinct draws the heaviest always meets a lighter rival.
        // Drawing with replacement would send it 1 pick in 9 (both draws on it).
        let policy = LeastOutstanding::with_seed(7);
        let c = [candidate(0, 1, 8), candidate(1, 7, 8), candidate(2, 2, 8)];
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            counts[pick(&policy, &c)] += 1;
        }
        assert_eq!(counts[1], 0, "heaviest picked: {counts:?}");
        // The other two both get traffic: candidate 2 wins its draws against 1.
        assert!(counts[0] > 0 && counts[2] > 0, "{counts:?}");
    }

    #[test]
    fn same_seed_gives_the_same_picks() {
        let c: Vec<Candidate> = (0..5)
            .map(|id| candidate(id, (id as u32 * 3) % 5, 8))
            .collect();
        let a = LeastOutstanding::with_seed(42);
        let b = LeastOutstanding::with_seed(42);
        let picks_a: Vec<usize> = (0..200).map(|_| pick(&a, &c)).collect();
        let picks_b: Vec<usize> = (0..200).map(|_| pick(&b, &c)).collect();
        assert_eq!(picks_a, picks_b);
    }

    #[test]
    fn name_is_the_config_and_metric_label() {
        assert_eq!(LeastOutstanding::with_seed(0).name(), "least_outstanding");
    }
}
