//! Session affinity: requests carrying the same session key go to the same
//! backend, so a conversation keeps hitting the KV cache that holds its prefix.
//!
//! The mapping is rendezvous (highest random weight) hashing: each candidate
//! scores `hash(session, candidate.id)` and the highest score wins. Chosen over
//! a hash ring because there is no ring to build or keep in sync, and when a
//! backend leaves the candidate list (unhealthy, breaker open, already tried)
//! only the sessions that were on it move; everyone else keeps their backend.
//! It is O(candidates) per pick, which is nothing at gateway pool sizes.
//!
//! The hash is FNV-1a 64 followed by the splitmix64 finalizer, written out
//! here because `std`'s `DefaultHasher` may change between Rust releases,
//! which would silently reshuffle every session on an upgrade and make two
//! gateway replicas built by different compilers disagree.

use super::{Candidate, Policy, RequestFacts};

/// Rendezvous hashing on [`RequestFacts::session`]; requests without a
/// session go to `fallback`.
pub struct SessionAffinity {
    pub fallback: Box<dyn Policy>,
}

impl SessionAffinity {
    pub fn new(fallback: Box<dyn Policy>) -> Self {
        Self { fallback }
    }
}

impl std::fmt::Debug for SessionAffinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionAffinity")
            .field("fallback", &self.fallback.name())
            .finish()
    }
}

impl Policy for SessionAffinity {
    fn name(&self) -> &'static str {
        "session_affinity"
    }

    fn pick(&self, candidates: &[Candidate], request: &RequestFacts<'_>) -> usize {
        let Some(session) = request.session else {
            return self.fallback.pick(candidates, request);
        };
        // Highest score wins; equal scores (astronomically rare) go to the lower
        // id so the choice never depends on the order of the slice.
        let mut best: Option<(usize, u64, usize)> = None;
        for (index, candidate) in candidates.iter().enumerate() {
            let score = rendezvous_score(session, candidate.id);
            let better = match best {
                None => true,
                Some((_, best_score, best_id)) => {
                    score > best_score || (score == best_score && candidate.id < best_id)
                }
            };
            if better {
                best = Some((index, score, candidate.id));
            }
        }
        best.map_or(0, |(index, _, _)| index)
    }
}

/// The weight of backend `id` for `session`; stable across builds and platforms.
fn rendezvous_score(session: &str, id: usize) -> u64 {
    // The id is hashed as a fixed-width u64 so 32- and 64-bit builds agree, and
    // because it always has 8 bytes it cannot run into the session's bytes.
    let hash = fnv1a64(FNV_OFFSET_BASIS, session.as_bytes());
    let hash = fnv1a64(hash, &(id as u64).to_le_bytes());
    // The id's bytes come last and pass through few FNV multiplies, so nearby
    // ids would score alike; the finalizer spreads every input bit over the
    // whole word so each backend is equally likely to hold the maximum.
    splitmix64_mix(hash)
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The splitmix64 output function (Steele, Lea, Flood 2014).
fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::round_robin::RoundRobin;

    /// Always the last candidate, so delegation is visible.
    struct LastCandidate;

    impl Policy for LastCandidate {
        fn name(&self) -> &'static str {
            "last_candidate"
        }
        fn pick(&self, candidates: &[Candidate], _request: &RequestFacts<'_>) -> usize {
            candidates.len().saturating_sub(1)
        }
    }

    fn candidates(ids: &[usize]) -> Vec<Candidate> {
        ids.iter()
            .map(|&id| Candidate {
                id,
                in_flight: 0,
                capacity: 8,
            })
            .collect()
    }

    /// The backend id (not slice index) a session lands on.
    fn backend_for(policy: &SessionAffinity, candidates: &[Candidate], session: &str) -> usize {
        let facts = RequestFacts {
            session: Some(session),
        };
        candidates[policy.pick(candidates, &facts)].id
    }

    fn affinity() -> SessionAffinity {
        SessionAffinity::new(Box::new(RoundRobin::new()))
    }

    #[test]
    fn same_session_maps_to_the_same_backend_across_calls_and_slice_orders() {
        let policy = affinity();
        let forward = candidates(&[0, 1, 2, 3]);
        let backward = candidates(&[3, 2, 1, 0]);
        for n in 0..100 {
            let session = format!("session-{n}");
            let first = backend_for(&policy, &forward, &session);
            assert_eq!(backend_for(&policy, &forward, &session), first);
            assert_eq!(backend_for(&policy, &backward, &session), first);
        }
    }

    #[test]
    fn removing_a_backend_only_remaps_the_sessions_that_were_on_it() {
        let policy = affinity();
        let all = candidates(&[0, 1, 2, 3]);
        let without_2 = candidates(&[0, 1, 3]);
        let mut moved = 0;
        for n in 0..1_000 {
            let session = format!("session-{n}");
            let before = backend_for(&policy, &all, &session);
            let after = backend_for(&policy, &without_2, &session);
            if before == 2 {
                moved += 1;
            } else {
                assert_eq!(before, after, "{session} moved off a backend that stayed");
            }
        }
        assert!(moved > 0, "no session was on the removed backend");
    }

    #[test]
    fn sessions_spread_roughly_evenly_over_backends() {
        let policy = affinity();
        let all = candidates(&[0, 1, 2, 3]);
        let mut counts = [0u32; 4];
        for n in 0..1_000 {
            counts[backend_for(&policy, &all, &format!("session-{n}"))] += 1;
        }
        for count in counts {
            assert!((150..=350).contains(&count), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn requests_without_a_session_go_to_the_fallback() {
        let policy = SessionAffinity::new(Box::new(LastCandidate));
        let c = candidates(&[0, 1, 2]);
        assert_eq!(policy.pick(&c, &RequestFacts::default()), 2);
    }

    #[test]
    fn hash_matches_published_vectors_so_mapping_survives_rust_upgrades() {
        // FNV-1a 64 reference values (Fowler/Noll/Vo test suite).
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // First output of splitmix64 seeded with 0: mix(0 + golden gamma).
        assert_eq!(splitmix64_mix(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn name_is_the_config_and_metric_label() {
        assert_eq!(affinity().name(), "session_affinity");
    }
}
