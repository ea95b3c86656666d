//! The simulated inference engine: readiness, batch slots, fault draws and the
//! timing of each generated token. Protocol front ends (OpenAI, Triton) parse
//! requests, then ask the engine to [`Engine::start`] a generation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tollgate_metering::tokens::Encoding;

use super::error::SimError;
use super::generate::{Completion, mix, stable_hash, unit_interval};
use super::metrics::{ModelMetrics, SimMetrics};
use super::options::SimOptions;

/// Salts that keep the per-request draws independent of each other.
const ERROR_DRAW: u64 = 0x4552_524f_5200_0001;
const ABORT_DRAW: u64 = 0x4142_4f52_5400_0002;
const ABORT_POINT_DRAW: u64 = 0x504f_494e_5400_0003;

pub struct Engine {
    pub options: SimOptions,
    ready_at: Instant,
    failed: AtomicBool,
    slots: Arc<Semaphore>,
    /// Requests seen so far; numbers each request's fault draws, so a run is
    /// reproducible for a given seed and request order.
    sequence: AtomicU64,
    pub metrics: SimMetrics,
}

/// What a front end asks the engine to generate.
pub struct GenerationRequest<'a> {
    pub model: &'a str,
    /// Prompt tokens of every prompt of the request.
    pub prompt_tokens: usize,
    /// Every sequence to generate, planned by the front end from
    /// [`Engine::answer_key`]: one per choice, plus any `best_of` candidates
    /// the answer leaves out. All are generated side by side, as one batch.
    pub sequences: Vec<Completion>,
}

impl Engine {
    pub fn new(options: SimOptions) -> prometheus::Result<Self> {
        let metrics = SimMetrics::new(&options.models)?;
        // Build the encoders now: the first request must not pay for it.
        for model in &options.models {
            options.encoding_for(model).count("warm up");
        }
        Ok(Self {
            ready_at: Instant::now() + options.startup_delay(),
            failed: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(options.max_concurrency as usize)),
            sequence: AtomicU64::new(0),
            metrics,
            options,
        })
    }

    /// Ready to serve: the cold start is over and no engine failure is injected.
    pub fn check_ready(&self) -> Result<(), SimError> {
        if self.failed.load(Ordering::Relaxed) {
            Err(SimError::EngineFailed)
        } else if Instant::now() < self.ready_at {
            Err(SimError::NotReady)
        } else {
            Ok(())
        }
    }

    pub fn set_failed(&self, failed: bool) {
        self.failed.store(failed, Ordering::Relaxed);
    }

    pub fn serves(&self, model: &str) -> bool {
        self.options.models.iter().any(|m| m == model)
    }

    pub fn encoding_for(&self, model: &str) -> Encoding {
        self.options.encoding_for(model)
    }

    /// Share of batch slots in use.
    pub fn busy_fraction(&self) -> f64 {
        let total = self.options.max_concurrency as usize;
        let free = self.slots.available_permits();
        total.saturating_sub(free) as f64 / total as f64
    }

    /// The key every sequence answering `prompt_key` (the canonical text of
    /// one prompt) on `model` is derived from: the same for any gpu-sim
    /// started with the same seed.
    pub fn answer_key(&self, model: &str, prompt_key: &[u8]) -> u64 {
        stable_hash(self.options.seed, &[model.as_bytes(), prompt_key])
    }

    /// Checks the model, draws this request's faults, waits for a batch slot
    /// and returns the planned generation, timed from now.
    pub async fn start(&self, request: GenerationRequest<'_>) -> Result<Generation, SimError> {
        let arrival = Instant::now();
        let (metrics, draw) = self.draw(request.model)?;
        let longest = request
            .sequences
            .iter()
            .map(Completion::len)
            .max()
            .unwrap_or(0);
        let abort_after = (longest >= 2
            && unit_interval(draw ^ ABORT_DRAW) < self.options.abort_mid_stream_rate)
            .then(|| 1 + (mix(draw ^ ABORT_POINT_DRAW) as usize) % (longest - 1));

        let slot = self.admit(metrics).await?;
        metrics.prompt_tokens.inc_by(request.prompt_tokens as u64);
        Ok(Generation {
            sequences: request.sequences,
            longest,
            arrival,
            first_token_at: Instant::now() + self.options.ttft(),
            inter_token: self.options.inter_token_delay(),
            abort_after,
            prompt_tokens: request.prompt_tokens,
            slot,
        })
    }

    /// For work that is not token generation (an image): checks the model,
    /// draws the request's injected error and waits for a batch slot.
    pub async fn hold_slot(&self, model: &str) -> Result<Slot, SimError> {
        let (metrics, _) = self.draw(model)?;
        self.admit(metrics).await
    }

    /// The model's metrics and this request's fault draw, or the injected
    /// error it drew.
    fn draw(&self, model: &str) -> Result<(&ModelMetrics, u64), SimError> {
        let metrics = self
            .metrics
            .model(model)
            .ok_or_else(|| SimError::UnknownModel(model.to_owned()))?;
        let draw = self.options.seed ^ self.sequence.fetch_add(1, Ordering::Relaxed);
        if unit_interval(draw ^ ERROR_DRAW) < self.options.error_rate {
            return Err(SimError::Injected);
        }
        Ok((metrics, draw))
    }

    /// Waits for a batch slot, counted as waiting meanwhile.
    async fn admit(&self, metrics: &ModelMetrics) -> Result<Slot, SimError> {
        let waiting = WaitingGuard::new(metrics);
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            // The semaphore is never closed while the engine lives.
            .map_err(|_| SimError::EngineFailed)?;
        drop(waiting);
        metrics.running.inc();
        Ok(Slot {
            _permit: permit,
            metrics: metrics.clone(),
        })
    }
}

/// Counts a request as waiting until dropped (admitted or abandoned by its client).
struct WaitingGuard<'a>(&'a ModelMetrics);

impl<'a> WaitingGuard<'a> {
    fn new(metrics: &'a ModelMetrics) -> Self {
        metrics.waiting.inc();
        metrics.pending.inc();
        Self(metrics)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.dec();
        self.0.pending.dec();
    }
}

/// A held batch slot; released when the generation (or its stream) is dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    pub metrics: ModelMetrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.running.dec();
    }
}

/// Waits until `deadline`. A deadline already reached returns at once: tokio's
/// timer fires on 1 ms ticks, so registering one for "now" would add up to a
/// millisecond to every unpaced answer.
pub async fn wait_until(deadline: Instant) {
    if Instant::now() < deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// One admitted generation and its schedule. Its sequences are generated
/// side by side: token `i` of every sequence is due at the same instant.
pub struct Generation {
    pub sequences: Vec<Completion>,
    /// Tokens in the longest sequence: when the whole generation is done.
    longest: usize,
    arrival: Instant,
    first_token_at: Instant,
    inter_token: Duration,
    /// For streams: cut the answer off after this many tokens (of the
    /// longest sequence).
    pub abort_after: Option<usize>,
    pub prompt_tokens: usize,
    slot: Slot,
}

impl Generation {
    /// When token `index` is due.
    pub fn due(&self, index: usize) -> Instant {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        self.first_token_at + self.inter_token.saturating_mul(index)
    }

    /// Tokens in the longest sequence.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// When every sequence is done.
    pub fn finished_at(&self) -> Instant {
        self.due(self.longest.saturating_sub(1))
    }

    /// Tokens generated over all sequences: the answer's `completion_tokens`,
    /// hidden `best_of` candidates included.
    pub fn completion_tokens(&self) -> usize {
        self.sequences.iter().map(Completion::len).sum()
    }

    /// Waits until every sequence is done, recording the metrics a finished
    /// generation records.
    pub async fn finish(&self) {
        wait_until(self.due(0)).await;
        self.observe_first_token();
        wait_until(self.finished_at()).await;
        self.observe_generated(self.completion_tokens());
    }

    /// Records time to first token; call when the first token goes out.
    pub fn observe_first_token(&self) {
        let ttft = Instant::now().saturating_duration_since(self.arrival);
        self.slot.metrics.ttft.observe(ttft.as_secs_f64());
    }

    pub fn observe_generated(&self, tokens: usize) {
        self.slot.metrics.generation_tokens.inc_by(tokens as u64);
    }
}
