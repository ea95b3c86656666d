//! `gpu-sim` command-line options: what it serves, its timing model and its faults.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tollgate_metering::tokens::Encoding;

/// A simulated GPU inference server: speaks the OpenAI API (as trtllm-serve and
/// vLLM do) and Triton's KServe v2 API, with a timing model, batch slots, a
/// cold start and injected faults, but no GPU.
///
/// Output is deterministic: the text is derived from --seed and the request, is
/// built from one-token words so `max_tokens` is honoured exactly, and the
/// reported `usage` is the true tiktoken count for the model's encoding.
///
/// Besides the APIs it serves `GET /health`, `GET /metrics` (vLLM and Triton
/// metric names), and `POST /sim/fail` / `POST /sim/recover` to inject and clear
/// an engine failure. It prints one line, `gpu-sim listening on http://ADDR`,
/// when it accepts connections, and exits cleanly on SIGTERM or Ctrl-C.
///
/// Logs go to stderr: LOG_LEVEL (default warn) filters, LOG_FORMAT (text or
/// json: one JSON object per line) formats.
#[derive(Debug, Clone, Parser)]
#[command(name = "gpu-sim", version, verbatim_doc_comment)]
pub struct SimOptions {
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: SocketAddr,

    /// Model name to serve; repeat for several.
    #[arg(long = "model", default_value = "sim-model", value_name = "NAME")]
    pub models: Vec<String>,

    /// Time to first token in milliseconds, after a batch slot is free.
    #[arg(long, default_value_t = 40, value_name = "MS")]
    pub ttft_ms: u64,

    /// Tokens generated per second per sequence; 0 means unlimited
    /// (with --ttft-ms 0 every answer is sent at once).
    #[arg(long, default_value_t = 80.0, value_name = "N", value_parser = non_negative)]
    pub tokens_per_sec: f64,

    /// Batch slots: sequences generated at once. Requests beyond this wait
    /// inside the simulator and show in `vllm:num_requests_waiting`.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: u32,

    /// Seconds before the server is ready (the cold start): until then health
    /// checks answer 503 and inference requests are refused with 503.
    #[arg(long, default_value_t = 0.0, value_name = "SECS", value_parser = non_negative)]
    pub startup_delay: f64,

    /// Fraction of inference requests that fail with HTTP 500 (0.0–1.0).
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = probability)]
    pub error_rate: f64,

    /// Fraction of streamed answers cut off after some tokens (0.0–1.0): the
    /// OpenAI stream is reset without `[DONE]`; the Triton stream ends with an
    /// error event.
    #[arg(long, default_value_t = 0.0, value_name = "P", value_parser = probability)]
    pub abort_mid_stream_rate: f64,

    /// Time to generate one image (`/v1/images/generations`), held in a
    /// batch slot; a request for `n` images takes `n` times as long.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub ms_per_image: u64,

    /// Seconds of speech (`/v1/audio/speech`) per character of input: the
    /// answer's length follows the input's.
    #[arg(long, default_value_t = 0.06, value_name = "SECS", value_parser = non_negative)]
    pub speech_secs_per_char: f64,

    /// Pace speech answers at this many times real time (0: unpaced, as
    /// fast as they are written); the batch slot is held while they stream.
    #[arg(long, default_value_t = 0.0, value_name = "X", value_parser = non_negative)]
    pub speech_realtime_factor: f64,

    /// Time to transcribe one second of uploaded audio
    /// (`/v1/audio/transcriptions`, `/translations`), held in a batch slot.
    #[arg(long, default_value_t = 0.0, value_name = "MS", value_parser = non_negative)]
    pub ms_per_audio_second: f64,

    /// How long one `POST /sim/work` job (a custom route's avatar render)
    /// holds a batch slot.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub work_ms: u64,

    /// Omit `usage` from answers, as backends that do not report it do.
    #[arg(long)]
    pub no_usage: bool,

    /// Require `Authorization: Bearer KEY` on /v1 requests, as vLLM's and
    /// trtllm-serve's --api-key do; others get 401.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Seed for the generated text and the fault draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Answer length in tokens before `max_tokens` applies; by default each
    /// chat answer gets a length of 16–128 tokens derived from the seed and
    /// prompt. /v1/completions without `max_tokens` stops at 16, as vLLM does.
    #[arg(long, value_name = "N")]
    pub output_tokens: Option<u32>,

    /// Most tokens one request may ask for: prompts × choices (`n`, or
    /// `best_of` when larger) × the token limit (`max_tokens`, or the default
    /// length when unset). Larger requests get 400, as a model's context
    /// length refuses them on vLLM; the bound keeps a hostile request from
    /// making the simulator allocate without limit.
    #[arg(long, default_value_t = 65_536, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_tokens: u64,

    /// Encoding used to count `usage` (cl100k_base or o200k_base); by default
    /// the model's own (gpt-4o → o200k), cl100k_base for models tiktoken does not know.
    #[arg(long, value_name = "NAME")]
    pub encoding: Option<Encoding>,

    /// Worker threads of the async runtime; 0 means one per core.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,

    /// Exit when the parent process does (it was started by Tollgate's
    /// `process` provider, which may be killed without a chance to stop it).
    #[arg(long)]
    pub exit_with_parent: bool,
}

fn probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not between 0.0 and 1.0"))
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if x >= 0.0 && x.is_finite() {
        Ok(x)
    } else {
        Err(format!("{x} must be a finite number >= 0"))
    }
}

impl SimOptions {
    /// Delay between successive tokens of one sequence; zero when unlimited.
    pub fn inter_token_delay(&self) -> Duration {
        if self.tokens_per_sec > 0.0 {
            Duration::from_secs_f64(1.0 / self.tokens_per_sec)
        } else {
            Duration::ZERO
        }
    }

    pub fn ttft(&self) -> Duration {
        Duration::from_millis(self.ttft_ms)
    }

    pub fn startup_delay(&self) -> Duration {
        Duration::from_secs_f64(self.startup_delay)
    }

    /// The encoding `usage` is counted with for `model`.
    pub fn encoding_for(&self, model: &str) -> Encoding {
        self.encoding
            .or_else(|| Encoding::for_model(model))
            .unwrap_or(Encoding::Cl100k)
    }
}
