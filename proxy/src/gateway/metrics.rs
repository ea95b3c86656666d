//! The data plane's per-request Prometheus metrics, observed once per
//! inference request in `logging`.
//!
//! Every label value comes from a bounded set: the configured tiers and
//! models (anything else is `other`, nothing at all is `none`), the three
//! inference endpoints, and a status class. Keys, accounts and request ids
//! are never labels. The vectors are registered once at start; a request
//! costs only the label lookups.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tollgate_metering::event::Tokens;
use tollgate_metering::metric_names;

use super::request::Endpoint;

/// Label value for a tier or model outside the configured ones.
const OTHER: &str = "other";
/// Label value when there is none: no key (tier), no answer sent (status).
const NONE: &str = "none";

/// Tollgate's own share of a request is sub-millisecond when all is well
/// (key cache hit, no prompt count on the blocking pool); 50 ms is far into
/// trouble (a key lookup in Postgres, a long prompt counted).
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
];
/// From an embedding answered in milliseconds to a long generation; a
/// request past a minute is an outlier and its exact length matters less
/// (it lands in `+Inf`).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// A request's model as a label: an index into the configured models, so
/// the context carries no string of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelLabel(Option<usize>);

/// What `logging` knows of a finished inference request.
pub struct Observation<'a> {
    pub endpoint: Endpoint,
    /// The key's tier; `None` when no key was accepted.
    pub tier: Option<&'a str>,
    pub model: ModelLabel,
    /// The final status sent; `None` when the client left before an answer.
    pub status: Option<u16>,
    /// The whole request, as the client saw it.
    pub total: Duration,
    /// From the request sent upstream to the last byte of its answer.
    pub upstream: Duration,
    /// Waiting for a GPU slot.
    pub queue_wait: Duration,
    /// To the first byte of a streamed answer.
    pub ttft: Option<Duration>,
    /// The usage event's tokens, for a metered request.
    pub tokens: Option<Tokens>,
}

pub struct RequestMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    overhead: HistogramVec,
    ttft: HistogramVec,
    tokens: IntCounterVec,
    models: Vec<String>,
    tiers: Vec<String>,
}

/// Handles on the request metrics `GET /api/metrics` summarises (see
/// [`crate::summary`]), so it reads them without looking names up.
#[derive(Clone)]
pub struct RequestFigures {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub overhead: HistogramVec,
}

impl RequestMetrics {
    pub fn figures(&self) -> RequestFigures {
        RequestFigures {
            requests: self.requests.clone(),
            duration: self.duration.clone(),
            overhead: self.overhead.clone(),
        }
    }

    /// Registers the metrics; `models` and `tiers` are the configured names,
    /// the only label values they take besides `other` and `none`.
    pub fn new(
        registry: &Registry,
        models: Vec<String>,
        tiers: Vec<String>,
    ) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                metric_names::REQUESTS_TOTAL,
                "Inference requests, by tier, model, endpoint and status class.",
            ),
            &["tier", "model", "endpoint", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                metric_names::REQUEST_DURATION_SECONDS,
                "Inference requests from arrival to the last byte sent, as the client saw them.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["tier", "model", "endpoint"],
        )?;
        let overhead = HistogramVec::new(
            HistogramOpts::new(
                metric_names::OVERHEAD_SECONDS,
                "Time Tollgate added to a request: its duration less the queue wait and \
                 the time from the upstream request sent to the answer's last byte.",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                metric_names::TIME_TO_FIRST_TOKEN_SECONDS,
                "Streamed answers: from the request's arrival to the first byte of its stream.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["tier", "model"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                metric_names::TOKENS_TOTAL,
                "Tokens of metered requests as their usage events record them, by direction \
                 (prompt, completion).",
            ),
            &["tier", "model", "direction"],
        )?;
        // The configured tiers and models from zero, so a panel shows 0 and
        // `increase` sees the first request (bounded: the config's names).
        for tier in &tiers {
            for model in &models {
                for endpoint in Endpoint::ALL {
                    for status in ["2xx", "4xx", "5xx"] {
                        requests.with_label_values(&[
                            tier,
                            model,
                            Endpoint::metric_label(endpoint),
                            status,
                        ]);
                    }
                }
                for direction in ["prompt", "completion"] {
                    tokens.with_label_values(&[tier, model, direction]);
                }
            }
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(overhead.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        Ok(Self {
            requests,
            duration,
            overhead,
            ttft,
            tokens,
            models,
            tiers,
        })
    }

    /// `model` as a label: itself when configured, else `other`.
    pub fn model_label(&self, model: &str) -> ModelLabel {
        ModelLabel(self.models.iter().position(|m| m == model))
    }

    pub fn observe(&self, done: &Observation<'_>) {
        let endpoint = Endpoint::metric_label(done.endpoint);
        let tier = match done.tier {
            None => NONE,
            Some(tier) => self
                .tiers
                .iter()
                .find(|t| *t == tier)
                .map_or(OTHER, String::as_str),
        };
        let model = done.model.0.and_then(|i| self.models.get(i));
        let model = model.map_or(OTHER, String::as_str);
        self.requests
            .with_label_values(&[tier, model, endpoint, status_class(done.status)])
            .inc();
        self.duration
            .with_label_values(&[tier, model, endpoint])
            .observe(done.total.as_secs_f64());
        let overhead = done
            .total
            .saturating_sub(done.upstream)
            .saturating_sub(done.queue_wait);
        self.overhead
            .with_label_values(&[endpoint])
            .observe(overhead.as_secs_f64());
        if let Some(ttft) = done.ttft {
            self.ttft
                .with_label_values(&[tier, model])
                .observe(ttft.as_secs_f64());
        }
        if let Some(tokens) = done.tokens {
            self.tokens
                .with_label_values(&[tier, model, "prompt"])
                .inc_by(tokens.prompt);
            self.tokens
                .with_label_values(&[tier, model, "completion"])
                .inc_by(tokens.completion);
        }
    }
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => NONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> (Registry, RequestMetrics) {
        let registry = Registry::new();
        let metrics = RequestMetrics::new(
            &registry,
            vec!["m1".to_owned(), "m2".to_owned()],
            vec!["free".to_owned(), "pro".to_owned()],
        )
        .unwrap();
        (registry, metrics)
    }

    fn observation(tier: Option<&str>, model: ModelLabel) -> Observation<'_> {
        Observation {
            endpoint: Endpoint::ChatCompletions,
            tier,
            model,
            status: Some(200),
            total: Duration::from_millis(100),
            upstream: Duration::from_millis(70),
            queue_wait: Duration::from_millis(20),
            ttft: None,
            tokens: None,
        }
    }

    #[test]
    fn labels_outside_the_configured_names_collapse_to_other() {
        let (registry, metrics) = metrics();
        for model in ["m2", "unknown-a", "unknown-b"] {
            metrics.observe(&observation(Some("pro"), metrics.model_label(model)));
        }
        metrics.observe(&observation(
            Some("retired-tier"),
            metrics.model_label("m1"),
        ));
        metrics.observe(&observation(None, ModelLabel::default()));
        let requests = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == metric_names::REQUESTS_TOTAL)
            .unwrap();
        let mut series: Vec<(String, String, u64)> = requests
            .get_metric()
            .iter()
            .map(|m| {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .unwrap()
                        .value()
                        .to_owned()
                };
                (
                    label("tier"),
                    label("model"),
                    m.get_counter().get_value() as u64,
                )
            })
            .collect();
        // The configured names are exported from zero: 2 tiers x 2 models x
        // every endpoint x 3 status classes.
        let zeros = series.iter().filter(|(_, _, n)| *n == 0).count();
        assert_eq!(
            zeros,
            2 * 2 * Endpoint::ALL.len() * 3 - 1,
            "one of them counted m2 on pro"
        );
        series.retain(|(_, _, n)| *n > 0);
        series.sort();
        assert_eq!(
            series,
            [
                ("none".to_owned(), "other".to_owned(), 1),
                ("other".to_owned(), "m1".to_owned(), 1),
                ("pro".to_owned(), "m2".to_owned(), 1),
                ("pro".to_owned(), "other".to_owned(), 2),
            ]
        );
    }

    #[test]
    fn overhead_is_what_is_left_after_the_upstream_and_the_queue() {
        let (registry, metrics) = metrics();
        metrics.observe(&observation(Some("pro"), metrics.model_label("m1")));
        let overhead = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == metric_names::OVERHEAD_SECONDS)
            .unwrap();
        let sum = overhead.get_metric()[0].get_histogram().get_sample_sum();
        assert!((sum - 0.010).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(200)), "2xx");
        assert_eq!(status_class(Some(404)), "4xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(None), "none");
    }
}
