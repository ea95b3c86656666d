//! Load signals scraped from a backend's own Prometheus endpoint.
//!
//! Tollgate's count of the requests it has in flight to each backend is the
//! signal it always has: it needs nothing from the backend. It cannot see what
//! only the backend sees: requests queued inside the engine because every
//! batch slot is taken, KV-cache memory running out (where vLLM starts
//! preempting sequences), or a GPU kept busy by traffic that did not come
//! through this gateway. Those are read from `GET /metrics` in Prometheus
//! text exposition format 0.0.4, under the names each server uses:
//!
//! | Field                            | vLLM                                                              | Triton                               |
//! |----------------------------------|-------------------------------------------------------------------|--------------------------------------|
//! | [`LoadSignals::waiting`]         | `vllm:num_requests_waiting`                                       |                                      |
//! | [`LoadSignals::running`]         | `vllm:num_requests_running`                                       |                                      |
//! | [`LoadSignals::kv_cache_usage`]  | `vllm:kv_cache_usage_perc` (older: `vllm:gpu_cache_usage_perc`)   |                                      |
//! | [`LoadSignals::pending`]         |                                                                   | `nv_inference_pending_request_count` |
//! | [`LoadSignals::gpu_utilization`] |                                                                   | `nv_gpu_utilization`                 |
//!
//! A metric usually has several series (vLLM labels by `model_name` and, for
//! data-parallel engines, `engine`; Triton by `model`/`version` and by
//! `gpu_uuid`): request counts are summed over them, fractions averaged.
//! Every field is an `Option`: a backend that does not export a name leaves
//! it absent, and absent is not zero. trtllm-serve's `/metrics` answers
//! iteration statistics as JSON, which yields an empty [`LoadSignals`].
//!
//! gpu-sim exports both families (see `sim::metrics`), so these names are
//! tested against a real process, not only against the samples below.
//!
//! [`LoadSignals::parse`] is pure and never fails: lines it cannot read are
//! skipped. [`scrape`] fetches and parses, through a reusable
//! [`ProbeClient`]. Nothing here logs or keeps state; the caller decides
//! how often to scrape and what a missing answer means.

use std::time::Duration;

use serde::Serialize;

use crate::health::ProbeClient;

/// Largest `/metrics` body read. vLLM's exposition is tens of KiB (mostly
/// histogram buckets) and Triton's grows with its model count; 4 MiB leaves
/// room for hundreds of models while bounding what a misbehaving endpoint
/// can make us buffer.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Longest line parsed. A series line is a name plus a few labels: a few
/// hundred bytes even with long model paths. Longer lines are skipped rather
/// than scanned.
const MAX_LINE_BYTES: usize = 16 << 10;

/// What a backend reports about its own load, per its `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadSignals {
    /// Requests queued inside the engine, not yet in a batch (vLLM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<f64>,
    /// Requests in the engine's running batch (vLLM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    /// Share of KV-cache blocks in use, 0..=1 despite the `_perc` name (vLLM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    /// Requests accepted but not yet executing, summed over models (Triton).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<f64>,
    /// Share of time the GPUs were busy, 0..=1, averaged over GPUs (Triton).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_utilization: Option<f64>,
}

impl LoadSignals {
    /// Reads the signals out of a Prometheus text exposition. Comments,
    /// unknown metrics and lines that do not parse are skipped; so are
    /// samples that are negative, `NaN` or infinite, which say nothing about
    /// load (a metric whose every sample is skipped stays absent).
    pub fn parse(text: &str) -> LoadSignals {
        let mut totals = Totals::default();
        for line in text.lines() {
            if line.len() > MAX_LINE_BYTES {
                continue;
            }
            let Some((signal, rest)) = signal_of(line) else {
                continue;
            };
            let Some(value) = sample_value(rest) else {
                continue;
            };
            if value.is_finite() && value >= 0.0 {
                totals.of(signal).add(value);
            }
        }
        LoadSignals {
            waiting: totals.waiting.sum(),
            running: totals.running.sum(),
            // Prefer the current name: vLLM versions in transition export
            // both, and averaging the two would be averaging one number.
            kv_cache_usage: totals
                .kv_cache_usage
                .mean()
                .or_else(|| totals.gpu_cache_usage.mean()),
            pending: totals.pending.sum(),
            gpu_utilization: totals.gpu_utilization.mean(),
        }
    }

    /// True when the backend exported none of the signals.
    pub fn is_empty(&self) -> bool {
        *self == LoadSignals::default()
    }

    /// The backend's internal queue: vLLM's waiting requests, or else
    /// Triton's pending ones. (A server is one or the other; gpu-sim exports
    /// both with the same value.)
    pub fn queued(&self) -> Option<f64> {
        self.waiting.or(self.pending)
    }
}

/// The metrics read.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Waiting,
    Running,
    KvCacheUsage,
    GpuCacheUsage,
    Pending,
    GpuUtilization,
}

impl Signal {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "vllm:num_requests_waiting" => Self::Waiting,
            "vllm:num_requests_running" => Self::Running,
            "vllm:kv_cache_usage_perc" => Self::KvCacheUsage,
            "vllm:gpu_cache_usage_perc" => Self::GpuCacheUsage,
            "nv_inference_pending_request_count" => Self::Pending,
            "nv_gpu_utilization" => Self::GpuUtilization,
            _ => return None,
        })
    }
}

/// Running totals, one per [`Signal`].
#[derive(Debug, Default)]
struct Totals {
    waiting: Total,
    running: Total,
    kv_cache_usage: Total,
    gpu_cache_usage: Total,
    pending: Total,
    gpu_utilization: Total,
}

impl Totals {
    fn of(&mut self, signal: Signal) -> &mut Total {
        match signal {
            Signal::Waiting => &mut self.waiting,
            Signal::Running => &mut self.running,
            Signal::KvCacheUsage => &mut self.kv_cache_usage,
            Signal::GpuCacheUsage => &mut self.gpu_cache_usage,
            Signal::Pending => &mut self.pending,
            Signal::GpuUtilization => &mut self.gpu_utilization,
        }
    }
}

/// Sum and count of one metric's samples.
#[derive(Debug, Clone, Copy, Default)]
struct Total {
    sum: f64,
    samples: u32,
}

impl Total {
    fn add(&mut self, value: f64) {
        self.sum += value;
        self.samples = self.samples.saturating_add(1);
    }

    fn sum(self) -> Option<f64> {
        (self.samples > 0).then_some(self.sum)
    }

    fn mean(self) -> Option<f64> {
        (self.samples > 0).then(|| self.sum / f64::from(self.samples))
    }
}

/// The signal a sample line belongs to, and the line after the metric name.
/// `None` for comments, blank lines and metrics not read here, so the many
/// histogram lines of an exposition cost one name comparison each.
fn signal_of(line: &str) -> Option<(Signal, &str)> {
    let line = line.trim_start_matches([' ', '\t']);
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    // A comment starts with '#', so its name is empty and matches nothing.
    let (name, rest) = line.split_at(name_end);
    Some((Signal::from_name(name)?, rest))
}

/// The value of a sample line after its metric name: optional labels, the
/// value, an optional timestamp, nothing else.
fn sample_value(after_name: &str) -> Option<f64> {
    let mut rest = after_name.trim_start_matches([' ', '\t']);
    if rest.starts_with('{') {
        rest = &rest[labels_len(rest)?..];
    } else if rest.len() == after_name.len() {
        // The name ran into a character that cannot follow it, or the line
        // ended there.
        return None;
    }
    let mut fields = rest.split([' ', '\t']).filter(|field| !field.is_empty());
    let value = parse_float(fields.next()?)?;
    // The timestamp: integer milliseconds in 0.0.4, float seconds in
    // OpenMetrics. Its value does not matter, only that the line is whole.
    if let Some(timestamp) = fields.next() {
        parse_float(timestamp)?;
    }
    fields.next().is_none().then_some(value)
}

/// Length of the `{…}` label set that `text` starts with, through its closing
/// brace. Label values are quoted and may contain `}`, `,`, spaces and the
/// escapes `\\`, `\"` and `\n`.
fn labels_len(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, byte) in text.bytes().enumerate() {
        match (quoted, escaped, byte) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => quoted = false,
            (true, false, _) => {}
            (false, _, b'"') => quoted = true,
            (false, _, b'}') => return Some(i + 1),
            (false, _, _) => {}
        }
    }
    None
}

/// A sample value as Prometheus writes it: decimal or scientific notation,
/// `NaN`, `+Inf`, `-Inf`.
fn parse_float(text: &str) -> Option<f64> {
    // Rust's parser also takes `inf`, `infinity` and `nan` in any case,
    // which is a superset of the exposition format's spellings.
    text.parse().ok()
}

/// Servers that can also speak OpenMetrics (prometheus_client, behind vLLM)
/// pick the format from `Accept`: ask for the 0.0.4 text.
const METRICS_ACCEPT: &str = "text/plain; version=0.0.4";

/// Scrapes `http://{address}/metrics` (`address` is `host:port`) once,
/// bounded by `timeout`. `None` when the request fails, times out, answers
/// other than 200 or sends more than [`MAX_BODY_BYTES`]; an answer without
/// any known metric is `Some` of an empty [`LoadSignals`].
pub async fn scrape(client: &ProbeClient, address: &str, timeout: Duration) -> Option<LoadSignals> {
    let scraped = client.get_text(address, "/metrics", METRICS_ACCEPT, MAX_BODY_BYTES);
    let text = tokio::time::timeout(timeout, scraped).await.ok()??;
    Some(LoadSignals::parse(&text))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// vLLM V1 (0.9-era) through prometheus_client: `engine` and
    /// `model_name` labels, floats with `.0`, `_created` series in scientific
    /// notation, histograms whose buckets must not be mistaken for gauges.
    const VLLM: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12954.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 9.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.8125
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.6875
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 41.27
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 310.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 310.0
# HELP vllm:time_to_first_token_seconds_created Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds_created gauge
vllm:time_to_first_token_seconds_created{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7301128447512e+09
"#;

    /// vLLM V0: no `engine` label, the KV cache under its older name, and
    /// swapped/CPU-cache gauges that are not read.
    const VLLM_V0: &str = r#"# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 4.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 7.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 0.9951
# HELP vllm:cpu_cache_usage_perc CPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{model_name="mistralai/Mistral-7B-Instruct-v0.3"} 0.0
"#;

    /// Triton 2.x: integer counts per model/version, six-decimal floats per
    /// GPU, and server-wide CPU gauges without labels.
    const TRITON: &str = r#"# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 1204
nv_inference_request_success{model="tensorrt_llm",version="1"} 1204
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="ensemble",version="1"} 5
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 2
nv_inference_pending_request_count{model="preprocessing",version="1"} 0
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-0d8f7b4e-5a12-3c3e-9f1a-6b2e1c7d9a01"} 0.970000
nv_gpu_utilization{gpu_uuid="GPU-7c1e2a9b-44d0-8e65-12ab-3f9e0c5d7b12"} 0.550000
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-0d8f7b4e-5a12-3c3e-9f1a-6b2e1c7d9a01"} 7.6544901120e+10
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.081
"#;

    fn close(actual: Option<f64>, expected: f64) -> bool {
        actual.is_some_and(|a| (a - expected).abs() < 1e-9)
    }

    #[test]
    fn vllm_counts_are_summed_over_engines_and_usage_averaged() {
        let signals = LoadSignals::parse(VLLM);
        assert_eq!(signals.running, Some(21.0));
        assert_eq!(signals.waiting, Some(3.0));
        assert!(close(signals.kv_cache_usage, 0.75), "{signals:?}");
        assert_eq!(signals.pending, None);
        assert_eq!(signals.gpu_utilization, None);
        assert_eq!(signals.queued(), Some(3.0));
    }

    #[test]
    fn older_vllm_reports_kv_cache_as_gpu_cache_usage() {
        let signals = LoadSignals::parse(VLLM_V0);
        assert_eq!(
            signals,
            LoadSignals {
                waiting: Some(7.0),
                running: Some(4.0),
                kv_cache_usage: Some(0.9951),
                pending: None,
                gpu_utilization: None,
            }
        );
    }

    #[test]
    fn the_current_kv_cache_name_wins_over_the_old_one() {
        let text = "vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.1\n\
                    vllm:kv_cache_usage_perc{model_name=\"m\"} 0.9\n";
        assert_eq!(LoadSignals::parse(text).kv_cache_usage, Some(0.9));
    }

    #[test]
    fn triton_pending_is_summed_over_models_and_utilization_averaged() {
        let signals = LoadSignals::parse(TRITON);
        assert_eq!(signals.pending, Some(7.0));
        assert!(close(signals.gpu_utilization, 0.76), "{signals:?}");
        assert_eq!(signals.waiting, None);
        assert_eq!(signals.running, None);
        assert_eq!(signals.kv_cache_usage, None);
        assert_eq!(signals.queued(), Some(7.0));
    }

    #[test]
    fn escaped_quotes_and_braces_in_label_values_do_not_end_the_labels() {
        let text = concat!(
            r#"vllm:num_requests_waiting{model_name="a \"quoted\" {name}, with\\ back\nslash"} 2"#,
            "\n",
            r#"vllm:num_requests_waiting{model_name="}"} 3"#,
            "\n",
            // Trailing comma and spaces, both allowed by the format.
            r#"vllm:num_requests_waiting { model_name="x", } 4"#,
            "\n",
        );
        assert_eq!(LoadSignals::parse(text).waiting, Some(9.0));
    }

    #[test]
    fn timestamps_and_scientific_notation_are_read() {
        let text = "vllm:num_requests_running{model_name=\"m\"} 1.2e1 1395066363000\n\
                    vllm:num_requests_running 3E0\t1395066363000\n\
                    nv_gpu_utilization{gpu_uuid=\"g\"} 5e-1 1700000000.123\n";
        let signals = LoadSignals::parse(text);
        assert_eq!(signals.running, Some(15.0));
        assert_eq!(signals.gpu_utilization, Some(0.5));
    }

    #[test]
    fn nan_and_infinite_samples_are_skipped() {
        let text = "vllm:kv_cache_usage_perc{engine=\"0\"} NaN\n\
                    vllm:kv_cache_usage_perc{engine=\"1\"} 0.4\n\
                    vllm:num_requests_waiting +Inf\n\
                    vllm:num_requests_waiting -Inf\n\
                    nv_gpu_utilization{gpu_uuid=\"g\"} nan\n";
        let signals = LoadSignals::parse(text);
        assert_eq!(signals.kv_cache_usage, Some(0.4));
        // Every sample skipped: absent, not zero.
        assert_eq!(signals.waiting, None);
        assert_eq!(signals.gpu_utilization, None);
    }

    #[test]
    fn similar_names_are_not_read() {
        let text = "vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 5\n\
                    vllm:num_requests_running_total 5\n\
                    xvllm:num_requests_running 5\n\
                    # vllm:num_requests_running 5\n\
                    #vllm:num_requests_running 5\n\
                    nv_gpu_utilization_percent 5\n";
        assert!(LoadSignals::parse(text).is_empty());
    }

    #[test]
    fn garbage_is_skipped_without_panicking() {
        let long = format!(
            "vllm:num_requests_waiting{{x=\"{}\"}} 1",
            "a".repeat(20_000)
        );
        let cases = [
            "",
            "\n\n\n",
            "vllm:num_requests_waiting",
            "vllm:num_requests_waiting ",
            "vllm:num_requests_waiting{",
            "vllm:num_requests_waiting{model_name=\"unterminated} 1",
            "vllm:num_requests_waiting{model_name=\"m\"}",
            "vllm:num_requests_waiting{model_name=\"m\"}1x",
            "vllm:num_requests_waiting 1 2 3",
            "vllm:num_requests_waiting 1 not-a-timestamp",
            "vllm:num_requests_waiting= 1",
            "vllm:num_requests_waiting -1",
            "vllm:num_requests_waiting 0x10",
            "vllm:num_requests_waiting \u{1F600}",
            "\u{0}\u{FFFD}\u{7F} {}} \"",
            "<html><body>502 Bad Gateway</body></html>",
            "{\"gpuMemUsage\": 1, \"inflightBatchingStats\": {}}",
            long.as_str(),
        ];
        for case in cases {
            assert!(LoadSignals::parse(case).is_empty(), "{case:?}");
        }
        // One good line among garbage is still read.
        let mixed = format!("{}\nvllm:num_requests_waiting 2\n", cases.join("\n"));
        assert_eq!(LoadSignals::parse(&mixed).waiting, Some(2.0));
    }

    #[test]
    fn windows_line_endings_and_indentation_are_tolerated() {
        let text = "# TYPE vllm:num_requests_running gauge\r\n  vllm:num_requests_running 2\r\n";
        assert_eq!(LoadSignals::parse(text).running, Some(2.0));
    }

    #[test]
    fn queued_prefers_waiting_over_pending() {
        let both = LoadSignals {
            waiting: Some(1.0),
            pending: Some(2.0),
            ..LoadSignals::default()
        };
        assert_eq!(both.queued(), Some(1.0));
        assert_eq!(LoadSignals::default().queued(), None);
    }

    #[test]
    fn serializes_only_present_fields() {
        let signals = LoadSignals {
            waiting: Some(2.0),
            kv_cache_usage: Some(0.5),
            ..LoadSignals::default()
        };
        assert_eq!(
            serde_json::to_value(signals).unwrap(),
            serde_json::json!({"waiting": 2.0, "kv_cache_usage": 0.5})
        );
        assert_eq!(
            serde_json::to_value(LoadSignals::default()).unwrap(),
            serde_json::json!({})
        );
    }

    /// Serves `response` (raw HTTP/1.1) to one connection, after reading its
    /// request head; returns the listening address.
    async fn serve_once(response: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
            }
            // The client may give up mid-body (the size cap): ignore errors.
            let _ = stream.write_all(&response).await;
            let _ = stream.shutdown().await;
        });
        address
    }

    fn http_response(status: &str, body: &[u8]) -> Vec<u8> {
        let mut response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(body);
        response
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn scrapes_a_200_answer() {
        let address = serve_once(http_response("200 OK", TRITON.as_bytes())).await;
        let signals = scrape(&ProbeClient::new(), &address, TIMEOUT).await;
        assert_eq!(signals, Some(LoadSignals::parse(TRITON)));
    }

    #[tokio::test]
    async fn an_answer_without_known_metrics_is_empty_not_none() {
        let address = serve_once(http_response("200 OK", b"up 1\n")).await;
        let signals = scrape(&ProbeClient::new(), &address, TIMEOUT).await;
        assert!(signals.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_non_200_answer_is_none() {
        let address = serve_once(http_response(
            "503 Service Unavailable",
            b"vllm:num_requests_waiting 1\n",
        ))
        .await;
        assert_eq!(scrape(&ProbeClient::new(), &address, TIMEOUT).await, None);
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_none() {
        let line = b"vllm:num_requests_waiting 1\n";
        let body = line.repeat(MAX_BODY_BYTES / line.len() + 1);
        let address = serve_once(http_response("200 OK", &body)).await;
        assert_eq!(scrape(&ProbeClient::new(), &address, TIMEOUT).await, None);
    }

    #[tokio::test]
    async fn a_silent_backend_is_none_at_the_timeout() {
        // Connections complete in the kernel backlog but nothing answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let timeout = Duration::from_millis(100);
        assert_eq!(scrape(&ProbeClient::new(), &address, timeout).await, None);
        drop(listener);
    }

    #[tokio::test]
    async fn an_address_that_is_not_host_port_is_none() {
        assert_eq!(
            scrape(&ProbeClient::new(), "not an address", TIMEOUT).await,
            None
        );
    }
}
