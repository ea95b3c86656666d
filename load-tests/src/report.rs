//! Counting outcomes during a run ([`RunRecorder`]) and the finished [`RunReport`],
//! printed for people and serialized for scripts.
//!
//! The JSON written by `loadgen --url … --json FILE` is a [`RunDocument`]; its shape is
//! part of the tool's contract and is documented there. Fields are only ever added.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::cli::LoadEcho;
use crate::key_mix::KeyMix;
use crate::request::{Failure, Success};

/// Identifies the JSON layout; bumped only if a field changes meaning or goes away.
pub const FORMAT: &str = "tollgate-loadgen/1";

/// Histograms hold microseconds up to one hour with 3 significant digits (0.1 %
/// resolution): far above any --timeout anyone will use, and a few hundred KiB each.
const HISTOGRAM_MAX_MICROS: u64 = 3_600_000_000;
const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;
const MICROS_PER_MS: f64 = 1000.0;

/// Queue waits arrive in whole milliseconds, so their histogram counts milliseconds:
/// with 3 significant digits every value below 2048 ms is stored exactly, where the
/// microsecond histograms would print a 12 ms wait as 12.007. Same one-hour ceiling.
const QUEUE_WAIT_MAX_MILLIS: u64 = 3_600_000;

/// The JSON document of a single-target run:
///
/// ```json
/// {
///   "format": "tollgate-loadgen/1",
///   "mode": "run",
///   "load": {
///     "rate_rps": 200.0, "duration_secs": 2.0, "concurrency": 512, "stream": true,
///     "prompt_bytes": 256, "max_tokens": 16, "model": "sim-model",
///     "timeout_secs": 30.0, "threads": 1,
///     "keys": [{"key": "sk-fre…0001", "weight": 3}]
///   },
///   "report": {
///     "url": "http://127.0.0.1:8000/v1/chat/completions",
///     "interrupted": false,
///     "requests": {"scheduled": 400, "sent": 400, "ok": 398, "dropped": 0, "errors": 2},
///     "errors": {
///       "by_status": {"500": 1},
///       "by_kind": {"connect": 0, "timeout": 0, "truncated_stream": 1, "bad_body": 0, "io": 0}
///     },
///     "offered_rps": 200.0,
///     "achieved_rps": 198.7,
///     "elapsed_secs": 2.003,
///     "latency_ms": {"count": 398, "p50": 0.61, "p90": 0.9, "p99": 1.4, "p99_9": 2.2, "max": 2.4, "mean": 0.65},
///     "ttfb_ms": {"count": 398, "p50": 0.4, "p90": 0.6, "p99": 1.0, "p99_9": 1.9, "max": 2.0, "mean": 0.43},
///     "queue_wait_ms": {"count": 399, "p50": 0.0, "p90": 3.0, "p99": 41.0, "p99_9": 57.0, "max": 57.0, "mean": 2.114},
///     "send_lag_ms": {"count": 400, "p50": 0.06, "p90": 0.07, "p99": 0.1, "p99_9": 0.2, "max": 0.3, "mean": 0.06},
///     "tokens": {"completion_tokens": 6368, "responses_with_usage": 398,
///                "content_chunks": 6368, "completion_tokens_per_sec": 3179.2},
///     "per_key": [
///       {"key": "sk-fre…0001", "weight": 3,
///        "requests": {"scheduled": 400, "sent": 400, "ok": 398, "dropped": 0, "errors": 2},
///        "errors": {"by_status": {"500": 1}, "by_kind": {"truncated_stream": 1, "…": 0}},
///        "achieved_rps": 198.7,
///        "latency_ms": {"count": 398, "p50": 0.61, "…": "…"},
///        "queue_wait_ms": {"count": 399, "p50": 0.0, "…": "…"}}
///     ]
///   }
/// }
/// ```
///
/// - Invariants: `scheduled = sent + dropped`, `sent = ok + errors`, and `errors` is
///   the sum of `by_status` and `by_kind`.
/// - `dropped`: scheduled while `concurrency` requests were in flight, so never sent.
/// - `by_status`: non-2xx responses, keyed by status code. `by_kind`: `connect` (no
///   connection), `timeout` (no complete response within `timeout_secs` of being
///   sent), `truncated_stream` (SSE ended or broke
///   before `data: [DONE]`), `bad_body` (2xx but not OpenAI JSON/SSE, or an error
///   event), `io` (connection failed after it was made).
/// - `latency_ms` and `ttfb_ms` cover `ok` responses only and are measured from each
///   request's *scheduled* send time; `null` when there is nothing to summarize
///   (`ttfb_ms` is always `null` without `stream`).
/// - `send_lag_ms`: for every sent request, how late after its due time this process
///   handed it to its request task. It is part of `latency_ms`; if it is large the
///   load generator, not the target, was the bottleneck (use more `threads`).
/// - `elapsed_secs` runs from the first scheduled send to the end of the schedule
///   (`duration_secs` later) or to the last response, whichever is later, so
///   `achieved_rps = ok / elapsed_secs` (goodput: successful requests per second)
///   drops when the target falls behind. The last responses' latency lengthens it
///   slightly: with responses that take more than a few percent of `duration_secs`,
///   use a longer run.
/// - `tokens.completion_tokens` sums `usage.completion_tokens` over the
///   `responses_with_usage` responses that reported it; `content_chunks` counts SSE
///   chunks with non-empty `delta.content`; `completion_tokens_per_sec` is
///   `completion_tokens / elapsed_secs`.
/// - `queue_wait_ms`: Tollgate's `x-tollgate-queue-wait-ms` response header, the whole
///   milliseconds a request waited in its admission queue for a GPU slot. It covers
///   every 2xx response that carried a readable value, including 2xx responses whose
///   body then failed (they waited too), so `count` is not tied to `ok`; `null` when
///   none did (any target but Tollgate; a run in which every request was refused).
///   Values are exact below 2048 ms and within 0.1 % above.
/// - `per_key` has one entry per `--key`/`--key-mix` key (empty without keys). Its
///   `requests` and `errors` have the top-level shape and count only that key's
///   requests (a key's share of 503 refusals is `errors.by_status["503"] /
///   requests.sent`); its `achieved_rps` is that key's `ok / elapsed_secs`, over the
///   run's `elapsed_secs`, so the keys' figures add up to the top-level one.
/// - `interrupted`: Ctrl-C stopped the schedule early; the counts cover what was sent.
#[derive(Debug, Clone, Serialize)]
pub struct RunDocument<'a> {
    pub format: &'static str,
    pub mode: &'static str,
    pub load: &'a LoadEcho,
    pub report: &'a RunReport,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub scheduled: u64,
    pub sent: u64,
    pub ok: u64,
    pub dropped: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorKinds {
    pub connect: u64,
    pub timeout: u64,
    pub truncated_stream: u64,
    pub bad_body: u64,
    pub io: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    pub by_status: BTreeMap<u16, u64>,
    pub by_kind: ErrorKinds,
}

impl RequestCounts {
    pub fn add(&mut self, other: &Self) {
        self.scheduled += other.scheduled;
        self.sent += other.sent;
        self.ok += other.ok;
        self.dropped += other.dropped;
        self.errors += other.errors;
    }
}

impl ErrorCounts {
    fn count(&mut self, failure: Failure) {
        let kinds = &mut self.by_kind;
        match failure {
            Failure::Status(status) => *self.by_status.entry(status).or_default() += 1,
            Failure::Connect => kinds.connect += 1,
            Failure::Timeout => kinds.timeout += 1,
            Failure::TruncatedStream => kinds.truncated_stream += 1,
            Failure::BadBody => kinds.bad_body += 1,
            Failure::Io => kinds.io += 1,
        }
    }

    pub fn add(&mut self, other: &Self) {
        for (status, n) in &other.by_status {
            *self.by_status.entry(*status).or_default() += n;
        }
        let (sum, k) = (&mut self.by_kind, &other.by_kind);
        sum.connect += k.connect;
        sum.timeout += k.timeout;
        sum.truncated_stream += k.truncated_stream;
        sum.bad_body += k.bad_body;
        sum.io += k.io;
    }
}

/// Percentiles in milliseconds, read from an HDR histogram of microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TokenCounts {
    pub completion_tokens: u64,
    pub responses_with_usage: u64,
    pub content_chunks: u64,
    pub completion_tokens_per_sec: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyReport {
    pub key: String,
    pub weight: u32,
    pub requests: RequestCounts,
    pub errors: ErrorCounts,
    pub achieved_rps: f64,
    pub latency_ms: Option<LatencySummary>,
    pub queue_wait_ms: Option<LatencySummary>,
}

/// The result of one run against one target. See [`RunDocument`] for field meanings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    pub url: String,
    pub interrupted: bool,
    pub requests: RequestCounts,
    pub errors: ErrorCounts,
    pub offered_rps: f64,
    pub achieved_rps: f64,
    pub elapsed_secs: f64,
    pub latency_ms: Option<LatencySummary>,
    pub ttfb_ms: Option<LatencySummary>,
    pub queue_wait_ms: Option<LatencySummary>,
    pub send_lag_ms: Option<LatencySummary>,
    pub tokens: TokenCounts,
    pub per_key: Vec<KeyReport>,
}

/// How the run ended, as the scheduler saw it.
#[derive(Debug, Clone, Copy)]
pub struct RunTiming {
    pub start: Instant,
    /// `start + duration`, or when Ctrl-C stopped the schedule.
    pub schedule_end: Instant,
    pub interrupted: bool,
}

/// Collects outcomes on the scheduler task, which owns it, so no lock is needed.
#[derive(Debug)]
pub struct RunRecorder {
    counts: RequestCounts,
    errors: ErrorCounts,
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    /// Milliseconds, unlike the others; see [`QUEUE_WAIT_MAX_MILLIS`].
    queue_wait: Histogram<u64>,
    send_lag: Histogram<u64>,
    tokens: TokenCounts,
    per_key: Vec<KeyRecorder>,
    last_finish: Option<Instant>,
}

#[derive(Debug)]
struct KeyRecorder {
    counts: RequestCounts,
    errors: ErrorCounts,
    latency: Histogram<u64>,
    queue_wait: Histogram<u64>,
}

fn new_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_MICROS, HISTOGRAM_SIGNIFICANT_DIGITS)
}

fn new_queue_wait_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, QUEUE_WAIT_MAX_MILLIS, HISTOGRAM_SIGNIFICANT_DIGITS)
}

fn record(histogram: &mut Histogram<u64>, value: Duration) {
    // Saturating: a value beyond the top is clamped, never lost or panicking; the
    // lowest trackable value is 1 µs, so sub-microsecond values count as 1.
    let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX).max(1);
    histogram.saturating_record(micros);
}

/// Unlike [`record`], 0 stays 0: a request that found a free slot waited 0 ms, and
/// the histogram holds 0 exactly (its lowest bound only sets the resolution).
fn record_millis(histogram: &mut Histogram<u64>, value: Duration) {
    let millis = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
    histogram.saturating_record(millis);
}

/// `units_per_ms`: what the histogram counts, [`MICROS_PER_MS`] or 1.0 (milliseconds).
fn summarize(histogram: &Histogram<u64>, units_per_ms: f64) -> Option<LatencySummary> {
    if histogram.is_empty() {
        return None;
    }
    let ms = |value: u64| value as f64 / units_per_ms;
    Some(LatencySummary {
        count: histogram.len(),
        p50: ms(histogram.value_at_quantile(0.50)),
        p90: ms(histogram.value_at_quantile(0.90)),
        p99: ms(histogram.value_at_quantile(0.99)),
        p99_9: ms(histogram.value_at_quantile(0.999)),
        max: ms(histogram.max()),
        // Whole microseconds, like the microsecond percentiles.
        mean: (histogram.mean() * MICROS_PER_MS / units_per_ms).round() / MICROS_PER_MS,
    })
}

impl RunRecorder {
    /// `key_count` is the number of keys in the mix (0 without keys).
    pub fn new(key_count: usize) -> Result<Self, hdrhistogram::CreationError> {
        let per_key = (0..key_count)
            .map(|_| {
                Ok(KeyRecorder {
                    counts: RequestCounts::default(),
                    errors: ErrorCounts::default(),
                    latency: new_histogram()?,
                    queue_wait: new_queue_wait_histogram()?,
                })
            })
            .collect::<Result<_, hdrhistogram::CreationError>>()?;
        Ok(Self {
            counts: RequestCounts::default(),
            errors: ErrorCounts::default(),
            latency: new_histogram()?,
            ttfb: new_histogram()?,
            queue_wait: new_queue_wait_histogram()?,
            send_lag: new_histogram()?,
            tokens: TokenCounts::default(),
            per_key,
            last_finish: None,
        })
    }

    fn each_count(&mut self, key: Option<usize>, bump: impl Fn(&mut RequestCounts)) {
        bump(&mut self.counts);
        if let Some(k) = key.and_then(|i| self.per_key.get_mut(i)) {
            bump(&mut k.counts);
        }
    }

    /// `lag` is how long after its due time the request was handed to its task.
    pub fn on_sent(&mut self, key: Option<usize>, lag: Duration) {
        record(&mut self.send_lag, lag);
        self.each_count(key, |c| {
            c.scheduled += 1;
            c.sent += 1;
        });
    }

    pub fn on_dropped(&mut self, key: Option<usize>) {
        self.each_count(key, |c| {
            c.scheduled += 1;
            c.dropped += 1;
        });
    }

    /// The admission-queue wait a 2xx answer reported; called in addition to
    /// [`Self::on_finished`] for the same request, whatever its outcome.
    pub fn on_queue_wait(&mut self, key: Option<usize>, wait: Duration) {
        record_millis(&mut self.queue_wait, wait);
        if let Some(k) = key.and_then(|i| self.per_key.get_mut(i)) {
            record_millis(&mut k.queue_wait, wait);
        }
    }

    pub fn on_finished(
        &mut self,
        key: Option<usize>,
        outcome: Result<Success, Failure>,
        finished: Instant,
    ) {
        self.last_finish = Some(self.last_finish.map_or(finished, |t| t.max(finished)));
        match outcome {
            Ok(success) => {
                self.each_count(key, |c| c.ok += 1);
                record(&mut self.latency, success.latency);
                if let Some(k) = key.and_then(|i| self.per_key.get_mut(i)) {
                    record(&mut k.latency, success.latency);
                }
                if let Some(ttfb) = success.ttfb {
                    record(&mut self.ttfb, ttfb);
                }
                self.tokens.content_chunks += success.tally.content_chunks;
                if let Some(tokens) = success.tally.completion_tokens {
                    self.tokens.completion_tokens += tokens;
                    self.tokens.responses_with_usage += 1;
                }
            }
            Err(failure) => {
                self.each_count(key, |c| c.errors += 1);
                self.errors.count(failure);
                if let Some(k) = key.and_then(|i| self.per_key.get_mut(i)) {
                    k.errors.count(failure);
                }
            }
        }
    }

    pub fn finish(
        self,
        url: String,
        rate: f64,
        keys: Option<&KeyMix>,
        timing: RunTiming,
    ) -> RunReport {
        let end = self
            .last_finish
            .map_or(timing.schedule_end, |t| t.max(timing.schedule_end));
        let elapsed_secs = end.duration_since(timing.start).as_secs_f64();
        let per_second = |n: u64| {
            if elapsed_secs > 0.0 {
                n as f64 / elapsed_secs
            } else {
                0.0
            }
        };
        let tokens = TokenCounts {
            completion_tokens_per_sec: per_second(self.tokens.completion_tokens),
            ..self.tokens
        };
        let per_key = keys
            .map(KeyMix::keys)
            .unwrap_or_default()
            .iter()
            .zip(&self.per_key)
            .map(|(weighted, recorded)| KeyReport {
                key: weighted.key.redacted(),
                weight: weighted.weight,
                requests: recorded.counts,
                errors: recorded.errors.clone(),
                achieved_rps: per_second(recorded.counts.ok),
                latency_ms: summarize(&recorded.latency, MICROS_PER_MS),
                queue_wait_ms: summarize(&recorded.queue_wait, 1.0),
            })
            .collect();
        RunReport {
            url,
            interrupted: timing.interrupted,
            requests: self.counts,
            errors: self.errors,
            offered_rps: rate,
            achieved_rps: per_second(self.counts.ok),
            elapsed_secs,
            latency_ms: summarize(&self.latency, MICROS_PER_MS),
            ttfb_ms: summarize(&self.ttfb, MICROS_PER_MS),
            queue_wait_ms: summarize(&self.queue_wait, 1.0),
            send_lag_ms: summarize(&self.send_lag, MICROS_PER_MS),
            tokens,
            per_key,
        }
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
            self.p50, self.p90, self.p99, self.p99_9, self.max, self.count
        )
    }
}

/// `"-"` for a summary that does not exist, so a column never silently shows 0.
pub fn summary_or_dash(summary: Option<&LatencySummary>) -> String {
    summary.map_or_else(|| "-".to_owned(), ToString::to_string)
}

impl fmt::Display for ErrorCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.by_kind;
        let kinds = [
            ("connect", k.connect),
            ("timeout", k.timeout),
            ("truncated_stream", k.truncated_stream),
            ("bad_body", k.bad_body),
            ("io", k.io),
        ];
        let parts: Vec<String> = self
            .by_status
            .iter()
            .map(|(status, n)| format!("HTTP {status}: {n}"))
            .chain(
                kinds
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(name, n)| format!("{name}: {n}")),
            )
            .collect();
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.requests;
        writeln!(
            f,
            "target     {}{}",
            self.url,
            if self.interrupted {
                "  (interrupted)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "requests   scheduled {}  sent {}  ok {}  errors {}  dropped {}",
            r.scheduled, r.sent, r.ok, r.errors, r.dropped
        )?;
        if r.errors > 0 {
            writeln!(f, "errors     {}", self.errors)?;
        }
        if r.dropped > 0 {
            writeln!(
                f,
                "dropped    {} requests found the in-flight cap full: the target did not keep up",
                r.dropped
            )?;
        }
        writeln!(
            f,
            "rate       offered {:.1}/s  achieved {:.1} ok/s over {:.3} s",
            self.offered_rps, self.achieved_rps, self.elapsed_secs
        )?;
        writeln!(
            f,
            "latency    {}",
            summary_or_dash(self.latency_ms.as_ref())
        )?;
        if let Some(ttfb) = &self.ttfb_ms {
            writeln!(f, "ttfb       {ttfb}")?;
        }
        if let Some(wait) = &self.queue_wait_ms {
            writeln!(f, "queue wait {wait}")?;
        }
        writeln!(
            f,
            "send lag   {}",
            summary_or_dash(self.send_lag_ms.as_ref())
        )?;
        let t = &self.tokens;
        write!(
            f,
            "tokens     completion {} ({:.1}/s, usage on {} of {} ok)",
            t.completion_tokens, t.completion_tokens_per_sec, t.responses_with_usage, r.ok
        )?;
        if t.content_chunks > 0 {
            write!(f, "  content chunks {}", t.content_chunks)?;
        }
        writeln!(f)?;
        for key in &self.per_key {
            let k = &key.requests;
            writeln!(
                f,
                "key        {} (weight {}): sent {} ok {} errors {} dropped {}  \
                 achieved {:.1} ok/s  latency {}",
                key.key,
                key.weight,
                k.sent,
                k.ok,
                k.errors,
                k.dropped,
                key.achieved_rps,
                summary_or_dash(key.latency_ms.as_ref())
            )?;
            // Indented under their key, with the same labels as the run's lines.
            if k.errors > 0 {
                writeln!(f, "           errors     {}", key.errors)?;
            }
            if let Some(wait) = &key.queue_wait_ms {
                writeln!(f, "           queue wait {wait}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::BodyTally;

    fn ok(latency_ms: u64, ttfb_ms: Option<u64>, tokens: Option<u64>) -> Result<Success, Failure> {
        Ok(Success {
            latency: Duration::from_millis(latency_ms),
            ttfb: ttfb_ms.map(Duration::from_millis),
            tally: BodyTally {
                content_chunks: tokens.unwrap_or(0),
                completion_tokens: tokens,
            },
        })
    }

    fn timing(start: Instant, issue_secs: u64) -> RunTiming {
        RunTiming {
            start,
            schedule_end: start + Duration::from_secs(issue_secs),
            interrupted: false,
        }
    }

    #[test]
    fn percentiles_of_1_to_1000_ms() {
        let mut recorder = RunRecorder::new(0).unwrap();
        let start = Instant::now();
        for ms in 1..=1000 {
            recorder.on_sent(None, Duration::ZERO);
            recorder.on_finished(None, ok(ms, None, None), start);
        }
        let report = recorder.finish("u".into(), 1000.0, None, timing(start, 1));
        let latency = report.latency_ms.unwrap();
        // 3 significant digits: each value is within 0.1 % of the exact rank value.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(latency.p50, 500.0), "{latency:?}");
        assert!(close(latency.p90, 900.0), "{latency:?}");
        assert!(close(latency.p99, 990.0), "{latency:?}");
        assert!(close(latency.p99_9, 999.0), "{latency:?}");
        assert!(close(latency.max, 1000.0), "{latency:?}");
        assert!(close(latency.mean, 500.5), "{latency:?}");
        assert_eq!(latency.count, 1000);
        assert!(latency.p50 <= latency.p90 && latency.p90 <= latency.p99);
        assert!(latency.p99 <= latency.p99_9 && latency.p99_9 <= latency.max);
    }

    #[test]
    fn counts_keep_their_invariants_and_errors_are_split_by_cause() {
        let mut recorder = RunRecorder::new(0).unwrap();
        let start = Instant::now();
        let outcomes = [
            ok(5, None, Some(16)),
            ok(7, None, None),
            Err(Failure::Status(500)),
            Err(Failure::Status(500)),
            Err(Failure::Status(429)),
            Err(Failure::Connect),
            Err(Failure::Timeout),
            Err(Failure::TruncatedStream),
            Err(Failure::BadBody),
            Err(Failure::Io),
        ];
        for outcome in outcomes {
            recorder.on_sent(None, Duration::ZERO);
            recorder.on_finished(None, outcome, start);
        }
        recorder.on_dropped(None);
        let report = recorder.finish("u".into(), 11.0, None, timing(start, 2));
        let r = report.requests;
        assert_eq!(
            r,
            RequestCounts {
                scheduled: 11,
                sent: 10,
                ok: 2,
                dropped: 1,
                errors: 8
            }
        );
        assert_eq!(
            report.errors.by_status,
            BTreeMap::from([(429, 1), (500, 2)])
        );
        assert_eq!(
            report.errors.by_kind,
            ErrorKinds {
                connect: 1,
                timeout: 1,
                truncated_stream: 1,
                bad_body: 1,
                io: 1
            }
        );
        assert_eq!(report.tokens.completion_tokens, 16);
        assert_eq!(report.tokens.responses_with_usage, 1);
        assert!((report.achieved_rps - 1.0).abs() < 1e-9, "2 ok over 2 s");
        assert!((report.tokens.completion_tokens_per_sec - 8.0).abs() < 1e-9);
        assert!(report.ttfb_ms.is_none());
    }

    #[test]
    fn elapsed_extends_to_the_last_response() {
        let mut recorder = RunRecorder::new(0).unwrap();
        let start = Instant::now();
        recorder.on_sent(None, Duration::ZERO);
        recorder.on_finished(None, ok(1, None, None), start + Duration::from_secs(4));
        let report = recorder.finish("u".into(), 1.0, None, timing(start, 2));
        assert!((report.elapsed_secs - 4.0).abs() < 1e-9);
        assert!((report.achieved_rps - 0.25).abs() < 1e-9);
    }

    #[test]
    fn all_errors_leave_latency_null_not_zero() {
        let mut recorder = RunRecorder::new(0).unwrap();
        let start = Instant::now();
        recorder.on_sent(None, Duration::ZERO);
        recorder.on_finished(None, Err(Failure::Status(500)), start);
        let report = recorder.finish("u".into(), 1.0, None, timing(start, 1));
        assert!(report.latency_ms.is_none());
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["latency_ms"].is_null());
        assert_eq!(json["errors"]["by_status"]["500"], 1);
        assert!(report.to_string().contains("HTTP 500: 1"), "{report}");
    }

    #[test]
    fn per_key_counts_follow_the_key_index() {
        let mix = KeyMix::parse("sk-free:2,sk-pro:1").unwrap();
        let mut recorder = RunRecorder::new(2).unwrap();
        let start = Instant::now();
        for (key, outcome) in [
            (0, ok(10, None, None)),
            (0, Err(Failure::Status(429))),
            (1, ok(3, None, None)),
        ] {
            recorder.on_sent(Some(key), Duration::ZERO);
            recorder.on_finished(Some(key), outcome, start);
        }
        recorder.on_dropped(Some(1));
        let report = recorder.finish("u".into(), 4.0, Some(&mix), timing(start, 1));
        assert_eq!(report.per_key.len(), 2);
        let free = &report.per_key[0];
        assert_eq!((free.key.as_str(), free.weight), ("sk-free", 2));
        assert_eq!(
            free.requests,
            RequestCounts {
                scheduled: 2,
                sent: 2,
                ok: 1,
                dropped: 0,
                errors: 1
            }
        );
        assert_eq!(free.latency_ms.unwrap().count, 1);
        assert_eq!(free.errors.by_status, BTreeMap::from([(429, 1)]));
        assert!((free.achieved_rps - 1.0).abs() < 1e-9, "1 ok over 1 s");
        let pro = &report.per_key[1];
        assert_eq!(
            pro.requests,
            RequestCounts {
                scheduled: 2,
                sent: 1,
                ok: 1,
                dropped: 1,
                errors: 0
            }
        );
        assert_eq!(pro.errors, ErrorCounts::default());
        assert_eq!(report.requests.scheduled, 4);
    }

    #[test]
    fn json_has_every_documented_field_even_when_empty() {
        let recorder = RunRecorder::new(0).unwrap();
        let start = Instant::now();
        let report = recorder.finish("u".into(), 1.0, None, timing(start, 1));
        let json = serde_json::to_value(&report).unwrap();
        for field in [
            "url",
            "interrupted",
            "requests",
            "errors",
            "offered_rps",
            "achieved_rps",
            "elapsed_secs",
            "latency_ms",
            "ttfb_ms",
            "queue_wait_ms",
            "send_lag_ms",
            "tokens",
            "per_key",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        for kind in ["connect", "timeout", "truncated_stream", "bad_body", "io"] {
            assert_eq!(json["errors"]["by_kind"][kind], 0, "{kind}");
        }
    }

    #[test]
    fn sub_microsecond_and_huge_values_are_recorded_not_lost() {
        let mut histogram = new_histogram().unwrap();
        record(&mut histogram, Duration::from_nanos(10));
        record(&mut histogram, Duration::from_secs(100_000));
        assert_eq!(histogram.len(), 2);
        let mut queue_wait = new_queue_wait_histogram().unwrap();
        record_millis(&mut queue_wait, Duration::ZERO);
        record_millis(&mut queue_wait, Duration::from_secs(100_000));
        assert_eq!(queue_wait.len(), 2);
    }

    #[test]
    fn every_per_key_field_is_in_the_json() {
        let mix = KeyMix::parse("sk-a:1").unwrap();
        let recorder = RunRecorder::new(1).unwrap();
        let start = Instant::now();
        let report = recorder.finish("u".into(), 1.0, Some(&mix), timing(start, 1));
        let json = serde_json::to_value(&report).unwrap();
        let key = &json["per_key"][0];
        for field in [
            "key",
            "weight",
            "requests",
            "errors",
            "achieved_rps",
            "latency_ms",
            "queue_wait_ms",
        ] {
            assert!(key.get(field).is_some(), "missing per_key.{field}");
        }
        assert!(key["queue_wait_ms"].is_null());
        for kind in ["connect", "timeout", "truncated_stream", "bad_body", "io"] {
            assert_eq!(key["errors"]["by_kind"][kind], 0, "{kind}");
        }
    }

    /// Tollgate reports whole milliseconds; a microsecond histogram would print a 12 ms
    /// wait as 12.007 and a free slot's 0 ms as 0.001.
    #[test]
    fn queue_waits_are_exact_milliseconds_overall_and_per_key() {
        let mix = KeyMix::parse("sk-free:1,sk-pro:1").unwrap();
        let mut recorder = RunRecorder::new(2).unwrap();
        let start = Instant::now();
        for wait_ms in [0, 12, 1250] {
            recorder.on_sent(Some(0), Duration::ZERO);
            recorder.on_queue_wait(Some(0), Duration::from_millis(wait_ms));
            recorder.on_finished(Some(0), ok(wait_ms + 5, None, None), start);
        }
        // A key whose answers carry no header (e.g. not routed through Tollgate).
        recorder.on_sent(Some(1), Duration::ZERO);
        recorder.on_finished(Some(1), ok(3, None, None), start);
        let report = recorder.finish("u".into(), 4.0, Some(&mix), timing(start, 1));

        let overall = report.queue_wait_ms.unwrap();
        assert_eq!(overall.count, 3);
        assert_eq!(
            (overall.p50, overall.p99, overall.max),
            (12.0, 1250.0, 1250.0)
        );
        assert!((overall.mean - 420.667).abs() < 1e-9, "{overall:?}");
        assert_eq!(report.per_key[0].queue_wait_ms, Some(overall));
        assert_eq!(report.per_key[1].queue_wait_ms, None);

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["queue_wait_ms"]["p50"], 12.0);
        assert!(json["per_key"][1]["queue_wait_ms"].is_null());

        let text = report.to_string();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("queue wait")).collect();
        assert_eq!(lines.len(), 2, "one for the run, one for sk-free:\n{text}");
        assert!(lines[0].starts_with("queue wait p50 12.000"), "{text}");
        assert!(
            lines[1].starts_with("           queue wait p50 12.000"),
            "{text}"
        );
    }

    #[test]
    fn a_wait_reported_by_a_failed_2xx_is_still_a_wait() {
        let mut recorder = RunRecorder::new(0).unwrap();
        let start = Instant::now();
        recorder.on_sent(None, Duration::ZERO);
        recorder.on_queue_wait(None, Duration::from_millis(30));
        recorder.on_finished(None, Err(Failure::TruncatedStream), start);
        let report = recorder.finish("u".into(), 1.0, None, timing(start, 1));
        assert!(report.latency_ms.is_none());
        assert_eq!(report.queue_wait_ms.unwrap().count, 1);
    }

    #[test]
    fn no_queue_wait_header_means_null_and_no_text_line() {
        let mut recorder = RunRecorder::new(0).unwrap();
        let start = Instant::now();
        recorder.on_sent(None, Duration::ZERO);
        recorder.on_finished(None, ok(2, None, None), start);
        let report = recorder.finish("u".into(), 1.0, None, timing(start, 1));
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["queue_wait_ms"].is_null());
        assert!(!report.to_string().contains("queue wait"), "{report}");
    }

    /// The per-key figures an admission test needs: how many of a key's requests were
    /// refused with 503, and how many it got served per second.
    #[test]
    fn per_key_text_shows_goodput_and_errors_by_status() {
        let mix = KeyMix::parse("sk-free:3,sk-pro:1").unwrap();
        let mut recorder = RunRecorder::new(2).unwrap();
        let start = Instant::now();
        for (key, outcome) in [
            (0, ok(10, None, None)),
            (0, Err(Failure::Status(503))),
            (0, Err(Failure::Status(503))),
            (0, Err(Failure::Timeout)),
            (1, ok(3, None, None)),
            (1, ok(4, None, None)),
        ] {
            recorder.on_sent(Some(key), Duration::ZERO);
            recorder.on_finished(Some(key), outcome, start);
        }
        let report = recorder.finish("u".into(), 6.0, Some(&mix), timing(start, 2));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["per_key"][0]["errors"]["by_status"]["503"], 2);
        assert_eq!(json["per_key"][0]["errors"]["by_kind"]["timeout"], 1);
        assert_eq!(json["per_key"][0]["achieved_rps"], 0.5);
        assert_eq!(json["per_key"][1]["achieved_rps"], 1.0);
        assert_eq!(json["achieved_rps"], 1.5, "the keys' goodput adds up");

        let text = report.to_string();
        let free = text
            .lines()
            .position(|l| l.starts_with("key        sk-free"));
        let lines: Vec<&str> = text.lines().collect();
        let free = free.unwrap_or_else(|| panic!("no sk-free line:\n{text}"));
        assert!(
            lines[free].contains("sent 4 ok 1 errors 3 dropped 0  achieved 0.5 ok/s"),
            "{text}"
        );
        assert_eq!(
            lines[free + 1],
            "           errors     HTTP 503: 2, timeout: 1"
        );
        assert!(lines[free + 2].starts_with("key        sk-pro"), "{text}");
        assert!(lines[free + 2].contains("achieved 1.0 ok/s"), "{text}");
    }
}
