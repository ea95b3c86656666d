//! Command-line flags, parsed by clap and validated into a [`LoadPlan`].
//!
//! Every flag is checked by a clap value parser, so a bad value is reported by clap
//! with the flag's name and exits with status 2 before any request is sent.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, CommandFactory, Parser, Subcommand};
use hyper::header::{HeaderName, HeaderValue};
use serde::Serialize;

use crate::endpoint::Endpoint;
use crate::key_mix::{ApiKey, KeyMix};
use crate::soak::SoakArgs;
use crate::soak::check::CheckArgs;

/// Why a flag value was rejected. Shown by clap after `invalid value '…' for '--flag'`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FlagError {
    #[error("expected a number, got {0:?}")]
    NotANumber(String),
    #[error("must be a finite number greater than 0")]
    NotPositive,
    #[error("{0} is more than the maximum, {1}")]
    TooLarge(f64, f64),
    #[error("{0}")]
    BadUrl(String),
    #[error("entry {0:?} is not KEY:WEIGHT (e.g. sk-free:3,sk-pro:1)")]
    KeyMixEntry(String),
    #[error("weight in {0:?} must be a whole number from 1 to 1000000")]
    KeyMixWeight(String),
    #[error("key {0} appears twice; per-key reports need each key once")]
    KeyMixDuplicate(String),
    #[error(
        "an API key must be non-empty visible ASCII without spaces (it goes into an HTTP header)"
    )]
    KeyCharacters,
    #[error(
        "entry {0:?} is not KIND=WEIGHT with a known kind (chat, chat_stream, completion, \
         completion_multi, embedding, disconnect) named once and a weight up to 1000000"
    )]
    MixEntry(String),
    #[error("every weight is 0: nothing would be sent")]
    MixEmpty,
    #[error("expected TIER=UNITS (e.g. free=5000), got {0:?}")]
    HardCap(String),
    #[error(
        "a run id is 1 to 100 characters of A-Z a-z 0-9 - _ . : (it starts every x-request-id)"
    )]
    RunId,
}

/// Open-loop HTTP load generator for OpenAI-style chat completion endpoints.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Open-loop HTTP load generator for OpenAI-style chat completion endpoints",
    long_about = "Open-loop HTTP load generator for OpenAI-style chat completion endpoints.\n\n\
        Requests are sent at a constant arrival rate whatever the target does, and each \
        latency is measured from the request's scheduled send time, so a slow target \
        cannot hide its queueing (no coordinated omission). A request that finds \
        --concurrency requests already in flight is not sent and is counted as dropped: \
        the target could not keep up.\n\n\
        Single target:  loadgen --url URL --rate RPS --duration SECS [options]\n\
        Comparison:     loadgen --compare URL_A URL_B --rate RPS --duration SECS [--rounds R] [options]\n\
        Soak:           loadgen soak --url URL --keys-file FILE --ledger FILE --rate RPS --duration SECS\n\
        Soak check:     loadgen soak-check --ledger FILE --database-url URL [--hard-cap TIER=UNITS]\n\n\
        Latency percentiles cover successful responses only. Against Tollgate the report \
        also summarizes the x-tollgate-queue-wait-ms header (time waited in its admission \
        queue for a GPU slot) of the 2xx responses that carry it. The JSON written by \
        --json is described in the crate documentation (load-tests/src/report.rs and \
        compare.rs).",
    // The subcommands have flags of their own; the load flags belong to the plain run.
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The flags of a plain run or comparison; `None` with a subcommand.
    #[command(flatten)]
    pub run: Option<RunArgs>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drive a mix of chat, streamed chat, completions (prompt arrays, n > 1),
    /// embeddings and clients that hang up mid-stream through Tollgate, across several
    /// keys, and write one ledger line per request (scripts/soak.sh)
    Soak(SoakArgs),
    /// Compare a soak's ledger with Tollgate's usage_events: one line per check,
    /// then `N passed, M failed`; exit status 1 on any failure
    SoakCheck(CheckArgs),
}

/// The flags of a plain run (`--url`) or a comparison (`--compare`).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Target base URL, e.g. http://127.0.0.1:8000; /v1/chat/completions is appended
    /// unless the URL already has a path, which is then used as-is
    #[arg(
        long,
        value_name = "URL",
        value_parser = Endpoint::parse,
        required_unless_present = "compare",
        conflicts_with = "compare"
    )]
    pub url: Option<Endpoint>,

    /// Run the same load against two targets in alternating rounds (A, B, A, B, …) and
    /// report per-target medians, ratios B/A and added latency B−A
    #[arg(long, num_args = 2, value_names = ["URL_A", "URL_B"], value_parser = Endpoint::parse)]
    pub compare: Option<Vec<Endpoint>>,

    /// Arrival rate in requests per second (fractions allowed)
    #[arg(long, value_name = "RPS", value_parser = rate)]
    pub rate: f64,

    /// How long to keep issuing requests, in seconds (fractions allowed); in-flight
    /// requests are then awaited for at most --timeout
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub duration: Duration,

    /// Maximum requests in flight; a request scheduled while the cap is full is dropped
    /// and counted. The default stays under the common 1024 open-file limit so an
    /// overloaded target shows up as drops, not as connect errors
    #[arg(long, value_name = "N", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub concurrency: u32,

    /// Request streamed responses (SSE, with stream_options.include_usage) and also
    /// report time to first body byte (TTFB) and content chunks; a stream that ends
    /// without `data: [DONE]` counts as a truncated_stream error
    #[arg(long)]
    pub stream: bool,

    /// Send this file's bytes as every request's JSON body instead of a chat
    /// completion (an images or speech request, with the URL's path): any 2xx
    /// answer read to its end counts as served, whatever its content
    #[arg(long, value_name = "FILE", value_parser = read_body, conflicts_with = "stream")]
    pub body: Option<Bytes>,
    /// The `Content-Type` of a `--body` (a prebuilt multipart upload's
    /// `multipart/form-data; boundary=…`)
    #[arg(
        long,
        value_name = "TYPE",
        default_value = "application/json",
        requires = "body"
    )]
    pub content_type: String,
    /// A header sent with every request, `NAME: VALUE` (repeatable), e.g.
    /// `--header "Prefer: respond-async"` to submit async jobs
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Size of the user prompt in bytes (ASCII words)
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub prompt_bytes: u32,

    /// max_tokens sent with every request
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// Model name sent with every request
    #[arg(long, value_name = "M", default_value = "sim-model")]
    pub model: String,

    /// API key sent as `Authorization: Bearer K` (no header when absent)
    #[arg(long, value_name = "K", value_parser = ApiKey::parse, conflicts_with = "key_mix")]
    pub key: Option<ApiKey>,

    /// Several keys with integer weights, e.g. sk-free:6,sk-pro:3,sk-ent:1; requests
    /// cycle through them by smooth weighted round-robin (deterministic) and the report
    /// has a section per key. Keys are shortened in reports
    #[arg(long, value_name = "KEY:WEIGHT,...", value_parser = KeyMix::parse)]
    pub key_mix: Option<KeyMix>,

    /// Per-request timeout in seconds, from send to the end of the body; also bounds
    /// the wait for in-flight requests after --duration
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = seconds)]
    pub timeout: Duration,

    /// Tokio worker threads. Default 1: the load generator usually shares a 2-core
    /// machine with its target, and every core it takes is one the target loses.
    /// (One more thread, asleep between arrivals, times the sends)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,

    /// Rounds per target for --compare, default 3; medians are taken across rounds
    // Checked in `Cli::check`: clap waives `requires = "compare"` whenever --url is
    // given, because --url conflicts with --compare.
    #[arg(
        long,
        value_name = "R",
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub rounds: Option<u32>,

    /// Also write the report as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// What to run, once targets are known: the same plan drives every run and round.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub rate: f64,
    pub duration: Duration,
    pub concurrency: usize,
    pub stream: bool,
    /// `--body`: sent in place of a chat completion.
    pub body: Option<Bytes>,
    /// `--content-type` of every request.
    pub content_type: String,
    /// `--header`s, sent with every request.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub prompt_bytes: usize,
    pub max_tokens: u32,
    pub model: String,
    /// `None` sends no Authorization header.
    pub keys: Option<KeyMix>,
    pub timeout: Duration,
    pub threads: usize,
}

/// The load parameters as recorded in JSON reports (keys shortened).
#[derive(Debug, Clone, Serialize)]
pub struct LoadEcho {
    pub rate_rps: f64,
    pub duration_secs: f64,
    pub concurrency: usize,
    pub stream: bool,
    /// Size of a `--body` sent in place of a chat completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_bytes: Option<usize>,
    pub prompt_bytes: usize,
    pub max_tokens: u32,
    pub model: String,
    pub timeout_secs: f64,
    pub threads: usize,
    pub keys: Vec<KeyEcho>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyEcho {
    pub key: String,
    pub weight: u32,
}

fn read_body(path: &str) -> Result<Bytes, String> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// Enough rounds for a median to ignore one disturbed round.
const DEFAULT_ROUNDS: u32 = 3;

impl Cli {
    /// Parses the process arguments; on a bad combination prints clap's error and
    /// exits with status 2, like any other flag error.
    pub fn parse_and_check() -> Self {
        let cli = Self::parse();
        if let Err(err) = cli.check() {
            err.exit();
        }
        cli
    }

    /// Combinations clap's declarations cannot express.
    pub fn check(&self) -> Result<(), clap::Error> {
        if let Some(run) = &self.run
            && run.rounds.is_some()
            && run.compare.is_none()
        {
            return Err(Self::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--rounds only applies to --compare URL_A URL_B",
            ));
        }
        Ok(())
    }
}

impl RunArgs {
    pub fn rounds(&self) -> u32 {
        self.rounds.unwrap_or(DEFAULT_ROUNDS)
    }

    pub fn load_plan(&self) -> LoadPlan {
        let keys = match (&self.key, &self.key_mix) {
            (_, Some(mix)) => Some(mix.clone()),
            (Some(key), None) => Some(KeyMix::single(key.clone())),
            (None, None) => None,
        };
        LoadPlan {
            rate: self.rate,
            duration: self.duration,
            concurrency: self.concurrency as usize,
            stream: self.stream,
            body: self.body.clone(),
            content_type: self.content_type.clone(),
            headers: self.headers.clone(),
            prompt_bytes: self.prompt_bytes as usize,
            max_tokens: self.max_tokens,
            model: self.model.clone(),
            keys,
            timeout: self.timeout,
            threads: self.threads as usize,
        }
    }
}

/// `NAME: VALUE` as a header.
fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not `NAME: VALUE`"))?;
    let name = HeaderName::try_from(name.trim()).map_err(|e| format!("`{name}`: {e}"))?;
    let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("`{value}`: {e}"))?;
    Ok((name, value))
}

impl LoadPlan {
    pub fn echo(&self) -> LoadEcho {
        LoadEcho {
            rate_rps: self.rate,
            duration_secs: self.duration.as_secs_f64(),
            concurrency: self.concurrency,
            stream: self.stream,
            body_bytes: self.body.as_ref().map(Bytes::len),
            prompt_bytes: self.prompt_bytes,
            max_tokens: self.max_tokens,
            model: self.model.clone(),
            timeout_secs: self.timeout.as_secs_f64(),
            threads: self.threads,
            keys: self
                .keys
                .iter()
                .flat_map(KeyMix::keys)
                .map(|k| KeyEcho {
                    key: k.key.redacted(),
                    weight: k.weight,
                })
                .collect(),
        }
    }
}

/// Rejects NaN, infinities, zero and negatives: all of them would make the schedule
/// (request i at i / rate) meaningless.
fn positive_f64(raw: &str) -> Result<f64, FlagError> {
    let value: f64 = raw
        .trim()
        .parse()
        .map_err(|_| FlagError::NotANumber(raw.to_owned()))?;
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(FlagError::NotPositive)
    }
}

/// A million requests a second is far beyond what one load generator process can
/// send; the cap keeps request counts and offsets well inside integer and time ranges.
const MAX_RATE: f64 = 1e6;
/// About 11 days: longer than any benchmark, short enough that `start + duration`
/// can never overflow a clock.
const MAX_SECONDS: f64 = 1e6;

pub fn rate(raw: &str) -> Result<f64, FlagError> {
    let rate = positive_f64(raw)?;
    if rate > MAX_RATE {
        Err(FlagError::TooLarge(rate, MAX_RATE))
    } else {
        Ok(rate)
    }
}

pub fn seconds(raw: &str) -> Result<Duration, FlagError> {
    let secs = positive_f64(raw)?;
    if secs > MAX_SECONDS {
        return Err(FlagError::TooLarge(secs, MAX_SECONDS));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse_cli(args: &[&str]) -> Result<Cli, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("loadgen").chain(args.iter().copied()))?;
        cli.check().map(|()| cli)
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = parse_cli(args)?;
        assert!(cli.command.is_none(), "{args:?} parsed as a subcommand");
        Ok(cli.run.expect("a run without a subcommand has run flags"))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn soak_subcommands_take_their_own_flags() {
        let soak = [
            "soak",
            "--url",
            "http://127.0.0.1:1",
            "--keys-file",
            "keys.txt",
            "--ledger",
            "ledger.jsonl",
            "--rate",
            "5",
            "--duration",
            "2",
        ];
        let cli = parse_cli(&soak).unwrap();
        assert!(cli.run.is_none());
        let Some(Command::Soak(args)) = cli.command else {
            panic!("not parsed as soak");
        };
        assert_eq!(args.mix.to_string(), crate::soak::mix::DEFAULT_MIX);
        assert_eq!((args.max_tokens, args.prompts, args.n), (32, 2, 2));
        // A plain run's flag before the subcommand belongs to neither.
        let mixed: Vec<&str> = ["--stream"].iter().chain(&soak).copied().collect();
        assert!(parse_cli(&mixed).is_err());
        let bad_id: Vec<&str> = soak.iter().copied().chain(["--run-id", "a b"]).collect();
        assert_eq!(
            parse_cli(&bad_id).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );

        let check = [
            "soak-check",
            "--ledger",
            "l.jsonl",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/tollgate",
            "--hard-cap",
            "free=50",
            "--hard-cap",
            "starter=500",
        ];
        let Some(Command::SoakCheck(args)) = parse_cli(&check).unwrap().command else {
            panic!("not parsed as soak-check");
        };
        assert_eq!(args.hard_cap.len(), 2);
        assert_eq!(args.hard_cap[1].units, 500);
        // The two RSS figures only make sense together.
        let half: Vec<&str> = check
            .iter()
            .copied()
            .chain(["--rss-warm-kib", "9"])
            .collect();
        assert!(parse_cli(&half).is_err());
    }

    #[test]
    fn minimal_single_target_uses_documented_defaults() {
        let cli = parse(&[
            "--url",
            "http://127.0.0.1:8000",
            "--rate",
            "200",
            "--duration",
            "2",
        ])
        .unwrap();
        let plan = cli.load_plan();
        assert_eq!(plan.concurrency, 512);
        assert_eq!(plan.model, "sim-model");
        assert_eq!(plan.max_tokens, 16);
        assert_eq!(plan.threads, 1);
        assert_eq!(plan.timeout, Duration::from_secs(30));
        assert!(!plan.stream);
        assert!(plan.keys.is_none());
        assert_eq!(cli.rounds(), 3);
    }

    #[test]
    fn compare_takes_exactly_two_urls_and_excludes_url() {
        let cli = parse(&[
            "--compare",
            "http://a:1",
            "http://b:2",
            "--rate",
            "5",
            "--duration",
            "1",
        ])
        .unwrap();
        assert_eq!(cli.compare.as_ref().map(Vec::len), Some(2));

        let one = parse(&["--compare", "http://a:1", "--rate", "5", "--duration", "1"]);
        assert!(one.is_err());

        let both = parse(&[
            "--url",
            "http://a:1",
            "--compare",
            "http://a:1",
            "http://b:2",
            "--rate",
            "5",
            "--duration",
            "1",
        ]);
        assert_eq!(both.unwrap_err().kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn missing_target_is_a_clap_error() {
        let err = parse(&["--rate", "5", "--duration", "1"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn zero_negative_and_nan_rates_are_rejected() {
        for bad in ["0", "-1", "NaN", "inf", "fast", "1e7"] {
            let rate = format!("--rate={bad}");
            let err = parse(&["--url", "http://a:1", &rate, "--duration", "1"]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "rate {bad}");
        }
    }

    #[test]
    fn fractional_and_absurd_durations() {
        let cli = parse(&["--url", "http://a:1", "--rate", "1", "--duration", "1.5"]).unwrap();
        assert_eq!(cli.duration, Duration::from_millis(1500));
        let err =
            parse(&["--url", "http://a:1", "--rate", "1", "--duration", "1e300"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn rounds_only_with_compare() {
        let err = parse(&[
            "--url",
            "http://a:1",
            "--rate",
            "1",
            "--duration",
            "1",
            "--rounds",
            "2",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
        assert!(err.to_string().contains("--rounds"), "{err}");
        let cli = parse(&[
            "--compare",
            "http://a:1",
            "http://b:2",
            "--rate",
            "1",
            "--duration",
            "1",
            "--rounds",
            "5",
        ])
        .unwrap();
        assert_eq!(cli.rounds(), 5);
    }

    #[test]
    fn key_and_key_mix_conflict() {
        let err = parse(&[
            "--url",
            "http://a:1",
            "--rate",
            "1",
            "--duration",
            "1",
            "--key",
            "k",
            "--key-mix",
            "a:1",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn single_key_becomes_a_mix_of_one_and_echo_hides_it() {
        let cli = parse(&[
            "--url",
            "http://a:1",
            "--rate",
            "1",
            "--duration",
            "1",
            "--key",
            "sk-live-0123456789abcdef",
        ])
        .unwrap();
        let echo = cli.load_plan().echo();
        assert_eq!(echo.keys.len(), 1);
        assert_eq!(echo.keys[0].weight, 1);
        assert!(
            !echo.keys[0].key.contains("0123456789ab"),
            "{}",
            echo.keys[0].key
        );
    }
}
