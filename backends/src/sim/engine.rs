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
    /// Canonical text of the prompt: the generated answer is derived from it.
    pub prompt_key: &'a [u8],
    pub prompt_tokens: usize,
    pub max_tokens: Option<u32>,
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

    /// Checks the model, draws this request's faults, waits for a batch slot
    /// and returns the planned generation, timed from now.
    pub async fn start(&self, request: GenerationRequest<'_>) -> Result<Generation, SimError> {
        let arrival = Instant::now();
        let metrics = self
            .metrics
            .model(request.model)
            .ok_or_else(|| SimError::UnknownModel(request.model.to_owned()))?;
        let draw = self.options.seed ^ self.sequence.fetch_add(1, Ordering::Relaxed);
        if unit_interval(draw ^ ERROR_DRAW) < self.options.error_rate {
            return Err(SimError::Injected);
        }
        let key = stable_hash(
            self.options.seed,
            &[request.model.as_bytes(), request.prompt_key],
        );
        let completion = Completion::plan(key, self.options.output_tokens, request.max_tokens);
        let abort_after = (completion.len() >= 2
            && unit_interval(draw ^ ABORT_DRAW) < self.options.abort_mid_stream_rate)
            .then(|| 1 + (mix(draw ^ ABORT_POINT_DRAW) as usize) % (completion.len() - 1));

        let slot = self.admit(metrics).await?;
        metrics.prompt_tokens.inc_by(request.prompt_tokens as u64);
        Ok(Generation {
            completion,
            arrival,
            first_token_at: Instant::now() + self.options.ttft(),
            inter_token: self.options.inter_token_delay(),
            abort_after,
            prompt_tokens: request.prompt_tokens,
            slot,
        })
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

/// One admitted generation and its schedule.
pub struct Generation {
    pub completion: Completion,
    arrival: Instant,
    first_token_at: Instant,
    inter_token: Duration,
    /// For streams: cut the answer off after this many tokens.
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

    /// When the whole answer is done.
    pub fn finished_at(&self) -> Instant {
        self.due(self.completion.len().saturating_sub(1))
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
