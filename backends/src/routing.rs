//! Choosing a backend for a request.
//!
//! [`UpstreamSelector`] is the one interface the proxy routes through.
//! [`BackendPool`] implements it: the backends serving the request's model,
//! less those already tried, those its active probes found unhealthy
//! ([`BackendPool::probe_all`]) and those whose circuit breaker is open, handed
//! to the configured [`Policy`](crate::balance::Policy) (least outstanding
//! requests by default). A request holds a [`Lease`] on its backend while it
//! runs, which is the in-flight count policies balance on, and reports how
//! it ended, which is what the breaker learns from. Types here are plain
//! Rust; the proxy turns a [`Backend`] into its own peer type.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use secrecy::SecretString;

use crate::balance::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::balance::{Candidate, Policy, RequestFacts};
use crate::fleet::state::InstanceState;
use crate::health::{Health, Probe, ProbeClient, ProbeConfig, probe};
use crate::protocol::Protocol;
use crate::signals::{LoadSignals, scrape};

/// An inference server Tollgate forwards to.
#[derive(Clone)]
pub struct Backend {
    pub name: String,
    /// `host:port` to connect to. A rented instance gets its address when
    /// it starts ([`BackendPool::set_address`]).
    pub address: String,
    /// Host header and TLS server name.
    pub host: String,
    pub tls: bool,
    pub models: Vec<String>,
    pub max_concurrency: u32,
    /// Sent upstream as `Authorization: Bearer …` in place of the client's key.
    pub credential: Option<SecretString>,
    /// How its health is asked, per its protocol.
    pub probe: Probe,
    /// What it speaks: OpenAI passed through, or Triton translated.
    pub protocol: Protocol,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("models", &self.models)
            .field("credential", &self.credential)
            .finish()
    }
}

/// Index of a backend in the selector's list.
pub type BackendId = usize;

/// How a request to a backend ended, for its breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered (any status below 500).
    Answered,
    /// A 5xx, a reset connection, or a timeout: `breaker_failures` in a
    /// row open the breaker.
    Failed,
    /// The connection could not be made: the breaker opens at once.
    Unreachable,
    /// The client left before the backend answered: no verdict.
    Abandoned,
}

pub trait UpstreamSelector: Send + Sync {
    /// A hot backend among `serving` (the backends of the request's model),
    /// other than those in `tried`, with a lease counting the request as in
    /// flight there until dropped; `None` when none is left or every one
    /// left is known to be down.
    fn select(
        &self,
        serving: &[BackendId],
        tried: &[BackendId],
        facts: &RequestFacts<'_>,
    ) -> Option<(BackendId, Arc<Backend>, Lease)>;

    /// How a request to `backend` ended.
    fn report(&self, backend: BackendId, outcome: Outcome);

    /// The backend as it is now (its address changes when a rented
    /// instance is replaced).
    fn backend(&self, id: BackendId) -> Option<Arc<Backend>>;

    /// Every backend's state, in config order.
    fn statuses(&self) -> Vec<BackendStatus>;
}

/// One backend as operators see it (`GET /admin/backends`).
#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    pub models: Vec<String>,
    /// Lifecycle state (`hot` for a static backend unless drained).
    pub state: InstanceState,
    /// Routable: hot, healthy, and its breaker lets requests through (or one probe).
    pub routable: bool,
    /// The active probes' verdict.
    pub healthy: bool,
    pub breaker: &'static str,
    pub in_flight: u32,
    pub max_concurrency: u32,
    /// The backend's own view, from its Prometheus endpoint; `None` before
    /// the first scrape or when it exports none of the known metrics.
    pub signals: Option<LoadSignals>,
}

/// Counts one request in flight on a backend until dropped.
#[derive(Debug)]
pub struct Lease(Arc<BackendState>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

#[derive(Debug)]
struct BackendState {
    backend: ArcSwap<Backend>,
    in_flight: AtomicU32,
    breaker: CircuitBreaker,
    health: Health,
    /// An [`InstanceState`]; only the fleet controller writes it.
    lifecycle: AtomicU8,
    /// Milliseconds after `epoch` at which a request last started or ended.
    last_active_ms: AtomicU64,
    /// On tokio's clock, so the simulation's paused time applies.
    epoch: tokio::time::Instant,
    signals: Mutex<Option<LoadSignals>>,
}

impl BackendState {
    fn routable(&self, now: Instant) -> bool {
        self.lifecycle() == InstanceState::Hot
            && self.health.is_healthy()
            && self.breaker.state(now) != BreakerState::Open
    }

    fn lifecycle(&self) -> InstanceState {
        InstanceState::from_u8(self.lifecycle.load(Ordering::Acquire))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

/// The configured backends, their in-flight counts and breakers, and the
/// policy that picks among them.
pub struct BackendPool {
    states: Vec<Arc<BackendState>>,
    policy: Box<dyn Policy>,
}

impl BackendPool {
    /// A breaker opens after this many consecutive failures: one refused
    /// connection is enough to pass a backend over (the request is retried
    /// elsewhere), but a single slow answer among many is not.
    pub const DEFAULT_BREAKER: BreakerConfig = BreakerConfig {
        failure_threshold: 3,
        open_for: Duration::from_secs(5),
    };

    /// Every backend starts hot; the fleet controller sets the lifecycle of
    /// those it manages before serving ([`Self::set_lifecycle`]).
    pub fn new(backends: Vec<Backend>, policy: Box<dyn Policy>, breaker: BreakerConfig) -> Self {
        let epoch = tokio::time::Instant::now();
        Self {
            states: backends
                .into_iter()
                .map(|backend| {
                    Arc::new(BackendState {
                        backend: ArcSwap::from_pointee(backend),
                        in_flight: AtomicU32::new(0),
                        breaker: CircuitBreaker::new(breaker),
                        health: Health::new(Instant::now()),
                        lifecycle: AtomicU8::new(InstanceState::Hot.to_u8()),
                        last_active_ms: AtomicU64::new(0),
                        epoch,
                        signals: Mutex::new(None),
                    })
                })
                .collect(),
            policy,
        }
    }

    /// The backends serving `model`, in config order (the gateway resolves
    /// this once per model, at start).
    pub fn serving(&self, model: &str) -> Vec<BackendId> {
        (0..self.states.len())
            .filter(|&id| {
                self.states[id]
                    .backend
                    .load()
                    .models
                    .iter()
                    .any(|m| m == model)
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn lifecycle(&self, id: BackendId) -> Option<InstanceState> {
        self.states.get(id).map(|s| s.lifecycle())
    }

    /// Sets a backend's lifecycle state. Becoming hot starts it healthy with
    /// a closed breaker: the controller has just seen its probe pass.
    pub fn set_lifecycle(&self, id: BackendId, state: InstanceState) {
        let Some(s) = self.states.get(id) else {
            return;
        };
        if state == InstanceState::Hot {
            s.health.mark_healthy();
            s.breaker.on_success();
            s.touch();
        }
        s.lifecycle.store(state.to_u8(), Ordering::Release);
    }

    /// Points a backend at a new address (a rented instance was started or
    /// replaced).
    pub fn set_address(&self, id: BackendId, address: &str) {
        if let Some(s) = self.states.get(id) {
            let mut backend = Backend::clone(&s.backend.load());
            backend.address = address.to_owned();
            s.backend.store(Arc::new(backend));
        }
    }

    /// Requests in flight on the backend now.
    pub fn in_flight(&self, id: BackendId) -> u32 {
        self.states
            .get(id)
            .map_or(0, |s| s.in_flight.load(Ordering::Acquire))
    }

    /// When a request last started or ended on the backend (its creation if
    /// none has).
    pub fn last_active(&self, id: BackendId) -> Option<tokio::time::Instant> {
        let s = self.states.get(id)?;
        let ms = s.last_active_ms.load(Ordering::Acquire);
        Some(s.epoch + Duration::from_millis(ms))
    }

    /// The active probes' verdict.
    pub fn healthy(&self, id: BackendId) -> bool {
        self.states.get(id).is_some_and(|s| s.health.is_healthy())
    }

    /// Whether the backend takes requests now (see [`BackendStatus::routable`]).
    pub fn routable(&self, id: BackendId) -> bool {
        self.states
            .get(id)
            .is_some_and(|s| s.routable(Instant::now()))
    }

    /// Probes every hot plain-http backend once, concurrently, per its
    /// protocol, records the results and scrapes its load signals. Returns
    /// the backends whose verdict flipped, with the new one. TLS backends
    /// are not probed (the prober speaks plain http); their breakers still
    /// watch them. Instances that are not hot are the fleet controller's
    /// to watch.
    pub async fn probe_all(
        &self,
        client: &ProbeClient,
        config: &ProbeConfig,
    ) -> Vec<(Arc<Backend>, bool)> {
        let checks = self
            .states
            .iter()
            .map(|state| (state.backend.load_full(), state))
            .filter(|(backend, state)| !backend.tls && state.lifecycle() == InstanceState::Hot)
            .map(|(backend, state)| async move {
                let (ok, signals) = tokio::join!(
                    probe(client, &backend.address, &backend.probe, config.timeout),
                    scrape(client, &backend.address, config.timeout)
                );
                *state.signals.lock().unwrap_or_else(PoisonError::into_inner) = signals;
                state
                    .health
                    .record(ok, Instant::now(), config)
                    .map(|healthy| (backend, healthy))
            });
        join_all(checks).await.into_iter().flatten().collect()
    }
}

impl UpstreamSelector for BackendPool {
    fn select(
        &self,
        serving: &[BackendId],
        tried: &[BackendId],
        facts: &RequestFacts<'_>,
    ) -> Option<(BackendId, Arc<Backend>, Lease)> {
        let now = Instant::now();
        let mut candidates: Vec<Candidate> = serving
            .iter()
            .filter(|id| !tried.contains(id))
            .filter(|id| self.states.get(**id).is_some_and(|s| s.routable(now)))
            .map(|&id| Candidate {
                id,
                in_flight: self.states[id].in_flight.load(Ordering::Acquire),
                capacity: self.states[id].backend.load().max_concurrency,
            })
            .collect();
        // A half-open breaker lets one probe through: the policy's pick may
        // lose that race to another request, and then the next is tried.
        while !candidates.is_empty() {
            // A policy answers an index into `candidates`; clamped so a buggy
            // one cannot panic the request path.
            let index = self
                .policy
                .pick(&candidates, facts)
                .min(candidates.len() - 1);
            let picked = candidates.swap_remove(index);
            let state = &self.states[picked.id];
            if state.breaker.allow(now) {
                state.in_flight.fetch_add(1, Ordering::AcqRel);
                state.touch();
                let lease = Lease(Arc::clone(state));
                return Some((picked.id, state.backend.load_full(), lease));
            }
        }
        None
    }

    fn report(&self, backend: BackendId, outcome: Outcome) {
        let Some(state) = self.states.get(backend) else {
            return;
        };
        match outcome {
            Outcome::Answered => state.breaker.on_success(),
            Outcome::Failed => state.breaker.on_failure(Instant::now()),
            Outcome::Unreachable => state.breaker.trip(Instant::now()),
            Outcome::Abandoned => state.breaker.on_abandoned(),
        }
    }

    fn backend(&self, id: BackendId) -> Option<Arc<Backend>> {
        self.states.get(id).map(|s| s.backend.load_full())
    }

    fn statuses(&self) -> Vec<BackendStatus> {
        let now = Instant::now();
        self.states
            .iter()
            .map(|state| {
                let backend = state.backend.load();
                let breaker = state.breaker.state(now);
                BackendStatus {
                    name: backend.name.clone(),
                    address: backend.address.clone(),
                    models: backend.models.clone(),
                    state: state.lifecycle(),
                    routable: state.routable(now),
                    healthy: state.health.is_healthy(),
                    breaker: match breaker {
                        BreakerState::Closed => "closed",
                        BreakerState::Open => "open",
                        BreakerState::HalfOpen => "half_open",
                    },
                    in_flight: state.in_flight.load(Ordering::Acquire),
                    max_concurrency: backend.max_concurrency,
                    signals: state
                        .signals
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::least_outstanding::LeastOutstanding;
    use crate::balance::round_robin::RoundRobin;

    fn backend(name: &str, models: &[&str], slots: u32) -> Backend {
        Backend {
            name: name.into(),
            address: format!("{name}:80"),
            host: name.into(),
            tls: false,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            max_concurrency: slots,
            credential: None,
            probe: Probe::openai(),
            protocol: Protocol::OpenAi,
        }
    }

    fn pool(backends: Vec<Backend>) -> BackendPool {
        BackendPool::new(
            backends,
            Box::new(RoundRobin::default()),
            BreakerConfig {
                failure_threshold: 1,
                open_for: Duration::from_secs(3600),
            },
        )
    }

    fn pick(pool: &BackendPool, model: &str, tried: &[BackendId]) -> Option<String> {
        pool.select(&pool.serving(model), tried, &RequestFacts::default())
            .map(|(_, b, _)| b.name.clone())
    }

    fn select_m(
        pool: &BackendPool,
        tried: &[BackendId],
    ) -> Option<(BackendId, Arc<Backend>, Lease)> {
        pool.select(&pool.serving("m"), tried, &RequestFacts::default())
    }

    #[test]
    fn only_backends_of_the_model_are_picked() {
        let pool = pool(vec![
            backend("a", &["m"], 1),
            backend("b", &["other"], 1),
            backend("c", &["m"], 1),
        ]);
        let picks: Vec<_> = (0..4).filter_map(|_| pick(&pool, "m", &[])).collect();
        assert!(picks.iter().all(|p| p == "a" || p == "c"), "{picks:?}");
        assert!(picks.contains(&"a".to_owned()) && picks.contains(&"c".to_owned()));
        assert_eq!(pick(&pool, "unknown", &[]), None);
        assert_eq!(pool.serving("other"), vec![1]);
        assert!(pool.serving("unknown").is_empty());
    }

    #[test]
    fn retry_goes_to_a_different_backend() {
        let pool = pool(vec![backend("a", &["m"], 1), backend("b", &["m"], 1)]);
        let (first, _, _) = select_m(&pool, &[]).unwrap();
        let (second, _, _) = select_m(&pool, &[first]).unwrap();
        assert_ne!(first, second);
        assert!(select_m(&pool, &[0, 1]).is_none());
    }

    #[test]
    fn a_lease_counts_the_request_in_flight_until_dropped() {
        let pool = pool(vec![backend("a", &["m"], 4)]);
        let (id, _, lease) = select_m(&pool, &[]).unwrap();
        assert_eq!(pool.statuses()[id].in_flight, 1);
        drop(lease);
        assert_eq!(pool.statuses()[id].in_flight, 0);
    }

    #[test]
    fn a_failed_backend_is_passed_over_while_its_breaker_is_open() {
        let pool = pool(vec![backend("a", &["m"], 1), backend("b", &["m"], 1)]);
        pool.report(0, Outcome::Failed);
        assert_eq!(pool.statuses()[0].breaker, "open");
        for _ in 0..4 {
            assert_eq!(pick(&pool, "m", &[]).as_deref(), Some("b"));
        }
        pool.report(1, Outcome::Failed);
        assert_eq!(pick(&pool, "m", &[]), None, "every backend known down");
        assert_eq!(pool.serving("m").len(), 2);
    }

    #[test]
    fn least_outstanding_sends_new_requests_to_the_idle_backend() {
        let pool = BackendPool::new(
            vec![backend("a", &["m"], 4), backend("b", &["m"], 4)],
            Box::new(LeastOutstanding::with_seed(7)),
            BackendPool::DEFAULT_BREAKER,
        );
        let (first, _, _held) = select_m(&pool, &[]).unwrap();
        for _ in 0..10 {
            let (next, _, _) = select_m(&pool, &[]).unwrap();
            assert_ne!(next, first);
        }
    }

    #[test]
    fn credential_is_not_printed() {
        let mut b = backend("a", &["m"], 1);
        b.credential = Some("sk-secret".into());
        assert!(!format!("{b:?}").contains("sk-secret"));
    }
}
