//! The simulator's Prometheus endpoint, under the names real servers use.
//!
//! Engine metrics carry vLLM's names (`vllm:*`, label `model_name`) and
//! Triton's (`nv_*`), so Tollgate's load-signal scrapers are tested against the
//! same series they will read in production; images and speech, which those
//! servers do not make, are counted under gpu-sim's own names (`gpu_sim_*`).

use std::collections::HashMap;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};

/// vLLM's buckets for `vllm:time_to_first_token_seconds`.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The simulated GPU's identity in `nv_gpu_utilization{gpu_uuid=…}`.
const GPU_UUID: &str = "GPU-00000000-0000-0000-0000-000000000000";

/// Per-model series, resolved once at start so the request path never looks up labels.
#[derive(Clone)]
pub struct ModelMetrics {
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub pending: IntGauge,
    pub ttft: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    /// Images drawn (`/v1/images/generations`); gpu-sim's own name.
    pub images: IntCounter,
    /// Seconds of speech written (`/v1/audio/speech`); gpu-sim's own name.
    pub speech_seconds: prometheus::Counter,
    /// Seconds of uploaded audio transcribed or translated; gpu-sim's own name.
    pub transcribed_seconds: prometheus::Counter,
}

pub struct SimMetrics {
    registry: Registry,
    models: HashMap<String, ModelMetrics>,
    kv_cache_usage: Gauge,
    gpu_utilization: Gauge,
}

impl SimMetrics {
    pub fn new(models: &[String]) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let mut per_model = HashMap::new();
        for model in models {
            let vllm = |name: &str, help: &str| {
                Opts::new(name, help).const_label("model_name", model.as_str())
            };
            let metrics = ModelMetrics {
                running: IntGauge::with_opts(vllm(
                    "vllm:num_requests_running",
                    "Number of requests in model execution batches.",
                ))?,
                waiting: IntGauge::with_opts(vllm(
                    "vllm:num_requests_waiting",
                    "Number of requests waiting to be processed.",
                ))?,
                pending: IntGauge::with_opts(
                    Opts::new(
                        "nv_inference_pending_request_count",
                        "Instantaneous number of pending requests awaiting execution per-model.",
                    )
                    .const_label("model", model.as_str())
                    .const_label("version", "1"),
                )?,
                ttft: Histogram::with_opts(
                    HistogramOpts::new(
                        "vllm:time_to_first_token_seconds",
                        "Histogram of time to first token in seconds.",
                    )
                    .const_label("model_name", model.as_str())
                    .buckets(TTFT_BUCKETS.to_vec()),
                )?,
                prompt_tokens: IntCounter::with_opts(vllm(
                    "vllm:prompt_tokens_total",
                    "Number of prefill tokens processed.",
                ))?,
                generation_tokens: IntCounter::with_opts(vllm(
                    "vllm:generation_tokens_total",
                    "Number of generation tokens processed.",
                ))?,
                images: IntCounter::with_opts(vllm(
                    "gpu_sim_images_generated_total",
                    "Images generated.",
                ))?,
                speech_seconds: prometheus::Counter::with_opts(vllm(
                    "gpu_sim_speech_seconds_total",
                    "Seconds of speech audio generated.",
                ))?,
                transcribed_seconds: prometheus::Counter::with_opts(vllm(
                    "gpu_sim_transcribed_seconds_total",
                    "Seconds of uploaded audio transcribed or translated.",
                ))?,
            };
            registry.register(Box::new(metrics.running.clone()))?;
            registry.register(Box::new(metrics.waiting.clone()))?;
            registry.register(Box::new(metrics.pending.clone()))?;
            registry.register(Box::new(metrics.ttft.clone()))?;
            registry.register(Box::new(metrics.prompt_tokens.clone()))?;
            registry.register(Box::new(metrics.generation_tokens.clone()))?;
            registry.register(Box::new(metrics.images.clone()))?;
            registry.register(Box::new(metrics.speech_seconds.clone()))?;
            registry.register(Box::new(metrics.transcribed_seconds.clone()))?;
            per_model.insert(model.clone(), metrics);
        }
        let kv_cache_usage = Gauge::with_opts(Opts::new(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
        ))?;
        let gpu_utilization = Gauge::with_opts(
            Opts::new("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)")
                .const_label("gpu_uuid", GPU_UUID),
        )?;
        registry.register(Box::new(kv_cache_usage.clone()))?;
        registry.register(Box::new(gpu_utilization.clone()))?;
        Ok(Self {
            registry,
            models: per_model,
            kv_cache_usage,
            gpu_utilization,
        })
    }

    pub fn model(&self, name: &str) -> Option<&ModelMetrics> {
        self.models.get(name)
    }

    /// Prometheus text exposition. `busy_fraction` is the share of batch slots
    /// in use, which the simulator reports as both KV-cache and GPU utilisation.
    pub fn render(&self, busy_fraction: f64) -> String {
        self.kv_cache_usage.set(busy_fraction);
        self.gpu_utilization.set(busy_fraction);
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}
