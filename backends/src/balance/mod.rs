//! Pure building blocks for choosing a backend: load-balancing policies and
//! the per-backend circuit breaker.
//!
//! Nothing here does I/O, reads a clock or awaits. The caller filters the
//! backend list down to [`Candidate`]s (healthy, breaker allows, serves the
//! model, not yet tried for this request), computes [`RequestFacts`] once, and
//! asks a [`Policy`] for one of them. Keeping policies this small means each
//! is one file with its own tests, and swapping policy is a config change.
//!
//! - [`round_robin`]: [`round_robin::RoundRobin`], take turns.
//! - [`least_outstanding`]: [`least_outstanding::LeastOutstanding`], power of
//!   two choices over in-flight requests weighted by capacity.
//! - [`session_affinity`]: [`session_affinity::SessionAffinity`], the same
//!   session goes to the same backend (warm KV cache), else a fallback policy.
//! - [`breaker`]: [`breaker::CircuitBreaker`], stop sending to a backend after
//!   consecutive failures and probe it before trusting it again.
//!
//! [`RoutingPolicy`] is the configured choice (`[routing] policy`) and
//! [`RoutingPolicy::build`] the one place a policy is made from it, for the
//! gateway and the simulator alike.

pub mod breaker;
pub mod least_outstanding;
pub mod round_robin;
pub mod session_affinity;

use serde::Deserialize;

use self::least_outstanding::LeastOutstanding;
use self::round_robin::RoundRobin;
use self::session_affinity::SessionAffinity;

/// Which [`Policy`] routes a model's requests, spelt in config as the
/// policy's [`Policy::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPolicy {
    #[default]
    LeastOutstanding,
    RoundRobin,
    SessionAffinity,
}

impl RoutingPolicy {
    /// The policy, its random draws seeded with `seed` when given (so a
    /// simulation repeats) and from the OS otherwise. Session affinity falls
    /// back to least outstanding for requests without a session.
    pub fn build(self, seed: Option<u64>) -> Box<dyn Policy> {
        let least_outstanding = || match seed {
            Some(seed) => LeastOutstanding::with_seed(seed),
            None => LeastOutstanding::new(),
        };
        match self {
            Self::LeastOutstanding => Box::new(least_outstanding()),
            Self::RoundRobin => Box::new(RoundRobin::new()),
            Self::SessionAffinity => Box::new(SessionAffinity::new(Box::new(least_outstanding()))),
        }
    }
}

/// What a policy sees of one eligible backend (healthy, breaker allows,
/// serves the model, not yet tried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Stable identity of the backend (its index in the configured pool), so
    /// policies that remember a backend are not confused when the candidate
    /// list shrinks.
    pub id: usize,
    /// Requests currently sent to this backend and not yet finished.
    pub in_flight: u32,
    /// Requests the backend serves at once (its configured concurrency).
    pub capacity: u32,
}

/// Facts about the request a policy may use.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts<'a> {
    /// Client-supplied session key; requests sharing one prefer one backend.
    pub session: Option<&'a str>,
}

/// A load-balancing policy: picks one backend among eligible candidates.
pub trait Policy: Send + Sync {
    /// For metric labels and config: "round_robin", "least_outstanding",
    /// "session_affinity".
    fn name(&self) -> &'static str;

    /// One of `candidates` (never empty when called), by its index in the slice.
    fn pick(&self, candidates: &[Candidate], request: &RequestFacts<'_>) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config spells a policy by the name its metrics carry.
    #[test]
    fn a_policy_is_configured_by_its_metric_name() {
        #[derive(Deserialize)]
        struct Routing {
            policy: RoutingPolicy,
        }
        for name in ["least_outstanding", "round_robin", "session_affinity"] {
            let routing: Routing = toml::from_str(&format!("policy = \"{name}\"")).unwrap();
            assert_eq!(routing.policy.build(Some(1)).name(), name);
            assert_eq!(routing.policy.build(None).name(), name);
        }
        assert!(toml::from_str::<Routing>("policy = \"random\"").is_err());
    }
}
