//! Choosing a backend for a request.
//!
//! [`UpstreamSelector`] is the one interface the proxy routes through, so the
//! health-checked pool can replace today's [`RoundRobin`] without touching the
//! proxy. Types here are plain Rust; the proxy turns a [`Backend`] into its
//! own peer type.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// An inference server Tollgate forwards to.
#[derive(Clone)]
pub struct Backend {
    pub name: String,
    /// `host:port` to connect to.
    pub address: String,
    /// Host header and TLS server name.
    pub host: String,
    pub tls: bool,
    pub models: Vec<String>,
    pub max_concurrency: u32,
    /// Sent upstream as `Authorization: Bearer …` in place of the client's key.
    pub credential: Option<String>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("models", &self.models)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// Index of a backend in the selector's list.
pub type BackendId = usize;

pub trait UpstreamSelector: Send + Sync {
    /// A backend serving `model`, other than those in `tried`; `None` when
    /// none is left or every one left is known to be down.
    fn select(&self, model: &str, tried: &[BackendId]) -> Option<(BackendId, &Backend)>;

    /// The connection to `backend` failed before any byte was sent.
    fn connect_failed(&self, backend: BackendId);

    /// Whether any configured backend serves `model`.
    fn serves(&self, model: &str) -> bool {
        self.candidates(model) > 0
    }

    /// How many backends serve `model`.
    fn candidates(&self, model: &str) -> usize;

    fn backends(&self) -> &[Backend];
}

/// Round-robin over the backends serving a model, passing over those whose
/// connection failed within the last `penalty`: while every candidate is known
/// down, requests are refused at once (503) instead of piling onto dead
/// connections, and the first request after the penalty tries again.
pub struct RoundRobin {
    backends: Vec<Backend>,
    /// Per model: the backends serving it, and the rotation's next position
    /// (per model, so alternating models do not pin each to one backend).
    by_model: HashMap<String, (Vec<BackendId>, AtomicUsize)>,
    /// Per backend: milliseconds since `epoch` until which it is passed over.
    failed_until: Vec<AtomicU64>,
    epoch: Instant,
    penalty: Duration,
}

impl RoundRobin {
    /// How long a backend is passed over after a failed connection: long
    /// enough to spare clients a dead backend, short enough to notice its return.
    pub const DEFAULT_PENALTY: Duration = Duration::from_secs(5);

    pub fn new(backends: Vec<Backend>, penalty: Duration) -> Self {
        let mut by_model: HashMap<String, (Vec<BackendId>, AtomicUsize)> = HashMap::new();
        for (id, backend) in backends.iter().enumerate() {
            for model in &backend.models {
                by_model.entry(model.clone()).or_default().0.push(id);
            }
        }
        Self {
            failed_until: backends.iter().map(|_| AtomicU64::new(0)).collect(),
            backends,
            by_model,
            epoch: Instant::now(),
            penalty,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn recently_failed(&self, id: BackendId, now_ms: u64) -> bool {
        self.failed_until[id].load(Ordering::Relaxed) > now_ms
    }
}

impl UpstreamSelector for RoundRobin {
    fn select(&self, model: &str, tried: &[BackendId]) -> Option<(BackendId, &Backend)> {
        let (candidates, next) = self.by_model.get(model)?;
        let start = next.fetch_add(1, Ordering::Relaxed);
        let now_ms = self.now_ms();
        (0..candidates.len())
            .map(|i| candidates[(start + i) % candidates.len()])
            .find(|id| !tried.contains(id) && !self.recently_failed(*id, now_ms))
            .map(|id| (id, &self.backends[id]))
    }

    fn connect_failed(&self, backend: BackendId) {
        let until = self.now_ms() + u64::try_from(self.penalty.as_millis()).unwrap_or(u64::MAX);
        if let Some(slot) = self.failed_until.get(backend) {
            slot.store(until, Ordering::Relaxed);
        }
    }

    fn candidates(&self, model: &str) -> usize {
        self.by_model.get(model).map_or(0, |(ids, _)| ids.len())
    }

    fn backends(&self) -> &[Backend] {
        &self.backends
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn backend(name: &str, models: &[&str]) -> Backend {
        Backend {
            name: name.into(),
            address: format!("{name}:80"),
            host: name.into(),
            tls: false,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            max_concurrency: 1,
            credential: None,
        }
    }

    fn pick(rr: &RoundRobin, model: &str, tried: &[BackendId]) -> Option<String> {
        rr.select(model, tried).map(|(_, b)| b.name.clone())
    }

    #[test]
    fn rotates_among_backends_of_the_model_only() {
        let rr = RoundRobin::new(
            vec![
                backend("a", &["m"]),
                backend("b", &["other"]),
                backend("c", &["m"]),
            ],
            RoundRobin::DEFAULT_PENALTY,
        );
        let picks: Vec<_> = (0..4).filter_map(|_| pick(&rr, "m", &[])).collect();
        assert_eq!(picks, ["a", "c", "a", "c"]);
        assert_eq!(pick(&rr, "unknown", &[]), None);
        assert!(rr.serves("other") && !rr.serves("unknown"));
    }

    #[test]
    fn retry_goes_to_a_different_backend() {
        let rr = RoundRobin::new(
            vec![backend("a", &["m"]), backend("b", &["m"])],
            RoundRobin::DEFAULT_PENALTY,
        );
        let (first, _) = rr.select("m", &[]).unwrap();
        let (second, _) = rr.select("m", &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(rr.select("m", &[0, 1]).map(|(id, _)| id), None);
    }

    #[test]
    fn recently_failed_backend_is_passed_over_until_the_penalty_ends() {
        let rr = RoundRobin::new(
            vec![backend("a", &["m"]), backend("b", &["m"])],
            RoundRobin::DEFAULT_PENALTY,
        );
        rr.connect_failed(0);
        for _ in 0..4 {
            assert_eq!(pick(&rr, "m", &[]).as_deref(), Some("b"));
        }
        let expired = RoundRobin::new(
            vec![backend("a", &["m"]), backend("b", &["m"])],
            Duration::ZERO,
        );
        expired.connect_failed(0);
        let picks: Vec<_> = (0..2).filter_map(|_| pick(&expired, "m", &[])).collect();
        assert_eq!(picks, ["a", "b"]);
    }

    #[test]
    fn alternating_models_rotate_independently() {
        // Regression: one shared counter pinned model m to "a" and n to "b".
        let rr = RoundRobin::new(
            vec![backend("a", &["m", "n"]), backend("b", &["m", "n"])],
            RoundRobin::DEFAULT_PENALTY,
        );
        let picks: Vec<_> = (0..4)
            .flat_map(|_| [pick(&rr, "m", &[]), pick(&rr, "n", &[])])
            .flatten()
            .collect();
        assert_eq!(picks, ["a", "a", "b", "b", "a", "a", "b", "b"]);
    }

    #[test]
    fn nothing_is_picked_while_every_backend_is_known_down() {
        let rr = RoundRobin::new(vec![backend("a", &["m"])], RoundRobin::DEFAULT_PENALTY);
        rr.connect_failed(0);
        assert_eq!(pick(&rr, "m", &[]), None);
        assert_eq!(rr.candidates("m"), 1);
    }

    #[test]
    fn credential_is_not_printed() {
        let mut b = backend("a", &["m"]);
        b.credential = Some("sk-secret".into());
        assert!(!format!("{b:?}").contains("sk-secret"));
    }
}
