//! Round-robin: candidates take turns.
//!
//! The cheapest policy and the baseline the others are measured against. It
//! ignores load, so it suits backends of equal size with similar requests.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Policy, RequestFacts};

/// Picks `counter % candidates.len()` and advances the counter.
///
/// The candidate list can differ between calls (backends become unhealthy,
/// retries exclude the one already tried), so rotation is over whatever is
/// eligible now; it is exact only while the list stays the same.
#[derive(Debug, Default)]
pub struct RoundRobin {
    // Relaxed is enough: the counter only spreads picks, it orders no other memory.
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn pick(&self, candidates: &[Candidate], _request: &RequestFacts<'_>) -> usize {
        // `max(1)` keeps a contract violation (empty slice) from dividing by zero;
        // the caller then gets index 0, which it must not use on an empty slice anyway.
        self.next.fetch_add(1, Ordering::Relaxed) % candidates.len().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|id| Candidate {
                id,
                in_flight: 0,
                capacity: 4,
            })
            .collect()
    }

    #[test]
    fn takes_turns_in_order() {
        let rr = RoundRobin::new();
        let c = candidates(3);
        let picks: Vec<usize> = (0..6)
            .map(|_| rr.pick(&c, &RequestFacts::default()))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn shrinking_candidate_list_never_yields_an_out_of_range_index() {
        let rr = RoundRobin::new();
        let c = candidates(5);
        for round in 0..50 {
            let len = 1 + round % 5;
            assert!(rr.pick(&c[..len], &RequestFacts::default()) < len);
        }
    }

    #[test]
    fn name_is_the_config_and_metric_label() {
        assert_eq!(RoundRobin::new().name(), "round_robin");
    }
}
