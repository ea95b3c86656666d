//! The requests a simulation replays: read from a CSV trace, or generated as
//! a diurnal month. Both are iterators, consumed one arrival at a time, so a
//! month of traffic is never held in memory.
//!
//! Trace format (`--trace FILE`): CSV with the header
//! `at_secs,tier,prompt_tokens,completion_tokens`, one request a line, in
//! arrival order. `at_secs` is seconds since the start of the trace
//! (fractions allowed), `tier` a `[[tiers]]` name of the config. Blank lines
//! and lines starting with `#` are skipped.

use std::f64::consts::TAU;
use std::io::BufRead;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Poisson};

/// The header line a trace file starts with.
pub const TRACE_HEADER: &str = "at_secs,tier,prompt_tokens,completion_tokens";

const DAY_SECS: f64 = 86_400.0;

/// One request of the workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// Since the start of the simulation.
    pub at: Duration,
    /// Index into the simulation's tier names.
    pub tier: usize,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading the trace: {0}")]
    Io(#[from] std::io::Error),
    #[error("the trace must start with the header `{TRACE_HEADER}`, found `{0}`")]
    Header(String),
    #[error("trace line {line}: {problem}")]
    Line { line: usize, problem: String },
}

/// Reads a CSV trace lazily. `tiers` are the configured tier names; a line
/// naming another tier is an error.
pub struct TraceReader<R> {
    lines: std::io::Lines<R>,
    tiers: Vec<String>,
    line: usize,
    header_seen: bool,
    last_at: f64,
}

impl<R: BufRead> TraceReader<R> {
    pub fn new(input: R, tiers: Vec<String>) -> Self {
        Self {
            lines: input.lines(),
            tiers,
            line: 0,
            header_seen: false,
            last_at: 0.0,
        }
    }

    fn parse(&mut self, text: &str) -> Result<Arrival, TraceError> {
        let line = self.line;
        let problem = |problem: String| TraceError::Line { line, problem };
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        let [at, tier, prompt, completion] = fields[..] else {
            return Err(problem(format!(
                "expected 4 fields ({TRACE_HEADER}), found {}",
                fields.len()
            )));
        };
        let at: f64 = at
            .parse()
            .ok()
            .filter(|at: &f64| at.is_finite() && *at >= 0.0)
            .ok_or_else(|| problem(format!("at_secs `{at}` is not a number of seconds >= 0")))?;
        if at < self.last_at {
            return Err(problem(format!(
                "at_secs {at} is before the previous line's {}: sort the trace by arrival",
                self.last_at
            )));
        }
        self.last_at = at;
        let tier = self.tiers.iter().position(|t| t == tier).ok_or_else(|| {
            problem(format!(
                "tier `{tier}` is not configured (configured: {})",
                self.tiers.join(", ")
            ))
        })?;
        let tokens = |name: &str, value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| problem(format!("{name} `{value}` is not a whole number")))
        };
        Ok(Arrival {
            at: Duration::from_secs_f64(at),
            tier,
            prompt_tokens: tokens("prompt_tokens", prompt)?,
            completion_tokens: tokens("completion_tokens", completion)?,
        })
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<Arrival, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let text = match self.lines.next()? {
                Ok(text) => text,
                Err(e) => return Some(Err(e.into())),
            };
            self.line += 1;
            let text = text.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            if !self.header_seen {
                self.header_seen = true;
                if text.replace(' ', "") != TRACE_HEADER {
                    return Some(Err(TraceError::Header(text.to_owned())));
                }
                continue;
            }
            return Some(self.parse(text));
        }
    }
}

/// Token counts drawn per request: log-normal, the usual shape of LLM
/// prompt and answer lengths (many short, a long tail).
#[derive(Debug, Clone, Copy)]
pub struct TokenModel {
    pub prompt_median: f64,
    pub prompt_sigma: f64,
    pub completion_median: f64,
    pub completion_sigma: f64,
    /// Answers are cut here (a `max_tokens`).
    pub completion_max: u32,
}

impl Default for TokenModel {
    /// Chat traffic: prompts around 400 tokens (a system prompt and some
    /// history), answers around 180 with a tail to a few thousand.
    fn default() -> Self {
        Self {
            prompt_median: 400.0,
            prompt_sigma: 1.0,
            completion_median: 180.0,
            completion_sigma: 0.7,
            completion_max: 4096,
        }
    }
}

impl TokenModel {
    /// Mean completion length: `median × e^(σ²/2)`, the log-normal mean (the
    /// cut at `completion_max` is far out in the tail and ignored).
    pub fn mean_completion(&self) -> f64 {
        self.completion_median * (self.completion_sigma.powi(2) / 2.0).exp()
    }
}

/// The synthetic workload's shape.
#[derive(Debug, Clone)]
pub struct DiurnalParams {
    pub days: u32,
    /// Requests per second at the top of the daily curve (bursts come on top).
    pub peak_rate: f64,
    /// Rate at the top of the curve over the rate at its bottom.
    pub peak_to_trough: f64,
    /// Hour of the day (UTC, 0-24) at which the curve peaks.
    pub peak_hour: f64,
    /// Mean number of bursts per day (Poisson).
    pub bursts_per_day: f64,
    /// Tier index and weight; weights need not add up to one.
    pub mix: Vec<(usize, f64)>,
    pub tokens: TokenModel,
}

/// A stretch of time at a multiple of the daily curve's rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub start: f64,
    pub end: f64,
    pub factor: f64,
}

/// Bursts last 10–20 minutes at 2–3× the rate of the moment: a launch, a
/// viral post, a batch job someone started.
const BURST_MINUTES: (f64, f64) = (10.0, 20.0);
const BURST_FACTOR: (f64, f64) = (2.0, 3.0);

/// Thinning works in blocks of this many seconds, each with its own bound on
/// the rate, so the quiet night does not draw 20× more candidates than it
/// keeps.
const BLOCK_SECS: f64 = 60.0;

/// Poisson arrivals whose rate follows a raised cosine over the day, from
/// `peak_rate / peak_to_trough` at night to `peak_rate` at `peak_hour`, times
/// the factor of any burst under way. Drawn by thinning (Lewis & Shedler):
/// candidates at a bound rate, each kept with probability rate/bound.
pub struct Diurnal {
    params: DiurnalParams,
    bursts: Vec<Burst>,
    arrivals: StdRng,
    tiers: rand::distr::weighted::WeightedIndex<f64>,
    prompt: LogNormal<f64>,
    completion: LogNormal<f64>,
    /// Current time, seconds.
    t: f64,
    block_end: f64,
    bound: f64,
}

impl Diurnal {
    pub fn new(params: DiurnalParams, seed: u64) -> Result<Self, String> {
        if !(params.peak_rate > 0.0 && params.peak_rate.is_finite()) {
            return Err("the peak rate must be more than 0".into());
        }
        if !(params.peak_to_trough >= 1.0 && params.peak_to_trough.is_finite()) {
            return Err("the peak-to-trough ratio must be 1 or more".into());
        }
        if !(params.bursts_per_day >= 0.0 && params.bursts_per_day.is_finite()) {
            return Err("bursts per day must be 0 or more".into());
        }
        let tiers = rand::distr::weighted::WeightedIndex::new(params.mix.iter().map(|(_, w)| *w))
            .map_err(|e| format!("tier mix: {e}"))?;
        let lognormal = |median: f64, sigma: f64| {
            LogNormal::new(median.max(1.0).ln(), sigma).map_err(|e| format!("token model: {e}"))
        };
        let prompt = lognormal(params.tokens.prompt_median, params.tokens.prompt_sigma)?;
        let completion = lognormal(
            params.tokens.completion_median,
            params.tokens.completion_sigma,
        )?;
        // Bursts come from a stream of their own, so changing the tier mix or
        // the rate leaves them where they were.
        let bursts = bursts(&params, StdRng::seed_from_u64(seed ^ 0xB0B5_7000));
        let mut diurnal = Self {
            params,
            bursts,
            arrivals: StdRng::seed_from_u64(seed),
            tiers,
            prompt,
            completion,
            t: 0.0,
            block_end: 0.0,
            bound: 0.0,
        };
        diurnal.enter_block(0.0);
        Ok(diurnal)
    }

    pub fn bursts(&self) -> &[Burst] {
        &self.bursts
    }

    fn end(&self) -> f64 {
        f64::from(self.params.days) * DAY_SECS
    }

    /// The rate of the daily curve alone at `t` seconds.
    pub fn base_rate(&self, t: f64) -> f64 {
        let p = &self.params;
        let trough = p.peak_rate / p.peak_to_trough;
        let phase = TAU * (t / 3600.0 - p.peak_hour) / 24.0;
        trough + (p.peak_rate - trough) * (1.0 + phase.cos()) / 2.0
    }

    /// The rate at `t`, bursts included.
    pub fn rate(&self, t: f64) -> f64 {
        self.base_rate(t) * self.burst_factor(t, t)
    }

    /// The largest burst factor over `[from, to]`.
    fn burst_factor(&self, from: f64, to: f64) -> f64 {
        self.bursts
            .iter()
            .filter(|b| b.start <= to && b.end > from)
            .map(|b| b.factor)
            .fold(1.0, f64::max)
    }

    /// Starts the block at `t` with a bound on the rate over it: the curve at
    /// either end plus the most it can rise in between (its steepest slope,
    /// `(peak - trough) × π / day`, times the block's length), times the
    /// largest burst factor in the block.
    fn enter_block(&mut self, t: f64) {
        let p = &self.params;
        let end = (t + BLOCK_SECS).min(self.end());
        let trough = p.peak_rate / p.peak_to_trough;
        let rise = (p.peak_rate - trough) * std::f64::consts::PI / DAY_SECS * BLOCK_SECS;
        let base = self.base_rate(t).max(self.base_rate(end)) + rise;
        self.t = t;
        self.block_end = end;
        self.bound = base * self.burst_factor(t, end);
    }
}

fn bursts(params: &DiurnalParams, mut rng: StdRng) -> Vec<Burst> {
    let per_day = Poisson::new(params.bursts_per_day).ok();
    let mut bursts = Vec::new();
    for day in 0..params.days {
        let count = per_day.map_or(0.0, |d| d.sample(&mut rng));
        for _ in 0..count as u32 {
            let start = (f64::from(day) + rng.random::<f64>()) * DAY_SECS;
            let minutes = rng.random_range(BURST_MINUTES.0..=BURST_MINUTES.1);
            let factor = rng.random_range(BURST_FACTOR.0..=BURST_FACTOR.1);
            bursts.push(Burst {
                start,
                end: start + minutes * 60.0,
                factor,
            });
        }
    }
    bursts.sort_by(|a, b| a.start.total_cmp(&b.start));
    bursts
}

impl Iterator for Diurnal {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        loop {
            if self.t >= self.end() {
                return None;
            }
            // The bound is never zero: the trough rate is positive.
            let gap = Exp::new(self.bound).map_or(BLOCK_SECS, |e| e.sample(&mut self.arrivals));
            let candidate = self.t + gap;
            if candidate >= self.block_end {
                // Exponential gaps are memoryless: start the next block afresh.
                self.enter_block(self.block_end);
                continue;
            }
            self.t = candidate;
            if self.arrivals.random::<f64>() * self.bound > self.rate(candidate) {
                continue;
            }
            let tier = self.params.mix[self.tiers.sample(&mut self.arrivals)].0;
            let prompt = self.prompt.sample(&mut self.arrivals).round();
            let completion = self.completion.sample(&mut self.arrivals).round();
            return Some(Arrival {
                at: Duration::from_secs_f64(candidate),
                tier,
                prompt_tokens: prompt.clamp(1.0, f64::from(u32::MAX)) as u32,
                completion_tokens: completion
                    .clamp(1.0, f64::from(self.params.tokens.completion_max))
                    as u32,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers() -> Vec<String> {
        ["free", "premium", "pro", "enterprise"]
            .map(String::from)
            .to_vec()
    }

    fn params(days: u32, peak_rate: f64, bursts_per_day: f64) -> DiurnalParams {
        DiurnalParams {
            days,
            peak_rate,
            peak_to_trough: 20.0,
            peak_hour: 15.0,
            bursts_per_day,
            mix: vec![(0, 60.0), (1, 30.0), (2, 10.0)],
            tokens: TokenModel::default(),
        }
    }

    #[test]
    fn the_example_trace_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../load-tests/traces/example.csv"
        );
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let arrivals: Vec<Arrival> = TraceReader::new(file, tiers())
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(arrivals.len() >= 10, "{}", arrivals.len());
        assert_eq!(
            arrivals[0],
            Arrival {
                at: Duration::ZERO,
                tier: 0,
                prompt_tokens: 420,
                completion_tokens: 180
            }
        );
        assert!(arrivals.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(arrivals.iter().any(|a| a.tier == 2), "a pro request");
    }

    fn read(text: &str) -> Result<Vec<Arrival>, TraceError> {
        TraceReader::new(text.as_bytes(), tiers()).collect()
    }

    #[test]
    fn trace_errors_name_the_line_and_what_to_change() {
        let error = |text: &str| read(text).unwrap_err().to_string();
        assert!(error("at,tier\n").contains("must start with the header"));
        let header = format!("{TRACE_HEADER}\n");
        let e = error(&format!("{header}0,free,1,1\n1.5,gold,1,1\n"));
        assert!(
            e.contains("line 3") && e.contains("`gold` is not configured"),
            "{e}"
        );
        let e = error(&format!("{header}5,free,1,1\n4,free,1,1\n"));
        assert!(e.contains("sort the trace"), "{e}");
        let e = error(&format!("{header}-1,free,1,1\n"));
        assert!(e.contains("at_secs"), "{e}");
        let e = error(&format!("{header}1,free,1\n"));
        assert!(e.contains("expected 4 fields"), "{e}");
        let e = error(&format!("{header}1,free,1,2.5\n"));
        assert!(e.contains("completion_tokens"), "{e}");
        let ok = read(&format!("# comment\n\n{header}\n0.25, pro, 10, 20\n")).unwrap();
        assert_eq!(ok[0].at, Duration::from_millis(250));
        assert_eq!(ok[0].tier, 2);
    }

    #[test]
    fn the_generator_is_deterministic_for_a_seed() {
        let take = |seed| -> Vec<Arrival> {
            Diurnal::new(params(2, 2.0, 3.0), seed)
                .unwrap()
                .take(2000)
                .collect()
        };
        assert_eq!(take(7), take(7));
        assert_ne!(take(7), take(8));
        let arrivals = take(7);
        assert!(arrivals.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(
            arrivals
                .iter()
                .all(|a| a.tier <= 2 && a.completion_tokens >= 1)
        );
    }

    #[test]
    fn the_daily_curve_peaks_at_twenty_times_its_trough() {
        let days = 30;
        let generator = Diurnal::new(params(days, 0.2, 0.0), 1).unwrap();
        let peak = 15.0 * 3600.0;
        let trough = 3.0 * 3600.0;
        assert!((generator.base_rate(peak) / generator.base_rate(trough) - 20.0).abs() < 1e-9);
        // Arrivals in the hour around the peak and the hour around the
        // trough, against the curve's integral over those hours.
        let hour_of = |a: &Arrival| (a.at.as_secs_f64() % DAY_SECS) / 3600.0;
        let (mut at_peak, mut at_trough) = (0.0, 0.0);
        for a in generator {
            let h = hour_of(&a);
            if (14.5..15.5).contains(&h) {
                at_peak += 1.0;
            } else if (2.5..3.5).contains(&h) {
                at_trough += 1.0;
            }
        }
        // The curve averaged over ±30 min: (1 + sin(π/24)/(π/24)) / 2 of the
        // swing above (peak) or below (trough) the mean level.
        let x = std::f64::consts::PI / 24.0;
        let near = (1.0 + x.sin() / x) / 2.0;
        let expected = (0.05 + 0.95 * near) / (0.05 + 0.95 * (1.0 - near));
        let ratio = at_peak / at_trough;
        assert!(
            (ratio / expected - 1.0).abs() < 0.1,
            "peak/trough hour counts {at_peak}/{at_trough} = {ratio}, expected {expected}"
        );
        let expected_peak_count = 0.2 * (0.05 + 0.95 * near) * 3600.0 * f64::from(days);
        assert!((at_peak / expected_peak_count - 1.0).abs() < 0.05);
    }

    #[test]
    fn bursts_multiply_the_rate_while_they_last() {
        let generator = Diurnal::new(params(10, 1.0, 3.0), 3).unwrap();
        let bursts = generator.bursts().to_vec();
        assert!(!bursts.is_empty() && bursts.len() < 100, "{}", bursts.len());
        for b in &bursts {
            let minutes = (b.end - b.start) / 60.0;
            assert!((10.0..=20.0).contains(&minutes) && (2.0..=3.0).contains(&b.factor));
            let mid = (b.start + b.end) / 2.0;
            assert!(generator.rate(mid) >= generator.base_rate(mid) * b.factor - 1e-9);
        }
    }
}
