//! `loadgen soak`: the load half of the money-path soak (`scripts/soak.sh`).
//!
//! Requests arrive open-loop at `--rate` for `--duration`, as in a plain run, but
//! each is drawn from a mix of kinds ([`mix`]) and a set of keys across tiers, and
//! each one ends up as one line of the ledger ([`ledger`]): what the client sent
//! and saw, whatever happened to Tollgate meanwhile. A refused connection (Tollgate
//! killed or draining) is a line with status 0, and the load goes on. `loadgen
//! soak-check` ([`check`]) then holds the ledger against the usage log read from
//! Postgres ([`store`]).
//!
//! Every request carries `x-request-id: <run id>-<sequence>`; Tollgate keeps a
//! client's request id (1–128 characters of `A-Z a-z 0-9 - _ . :`) as its own, and
//! so as the usage event's `request_id`, which is how the checker matches them.

pub mod check;
pub mod exchange;
pub mod ledger;
pub mod mix;
pub mod store;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use hyper::header::HeaderValue;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::exchange::{SoakRequest, soak_exchange};
use self::ledger::{End, LedgerEntry, LedgerSummary, LedgerWriter};
use self::mix::{BodyShape, DEFAULT_MIX, Draw, Mix, RequestKind, SoakKeys, draw};
use crate::arrival_clock::ArrivalClock;
use crate::cli::{FlagError, rate, seconds};
use crate::endpoint::BaseUrl;
use crate::request::http_client;
use crate::schedule::{scheduled_count, scheduled_offset, stop_requested};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Tollgate's base URL, e.g. http://127.0.0.1:8080 (each kind has its own path)
    #[arg(long, value_name = "URL", value_parser = BaseUrl::parse)]
    pub url: BaseUrl,

    /// The keys to send, one per line: KEY ACCOUNT TIER WEIGHT (whitespace-separated;
    /// lines starting with # are skipped). Each request draws a key by weight
    #[arg(long, value_name = "FILE")]
    pub keys_file: PathBuf,

    /// Where to write the ledger: one JSON line per scheduled request
    #[arg(long, value_name = "FILE")]
    pub ledger: PathBuf,

    /// Arrival rate in requests per second (fractions allowed)
    #[arg(long, value_name = "RPS", value_parser = rate)]
    pub rate: f64,

    /// How long to keep issuing requests, in seconds
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub duration: Duration,

    /// Request kinds and their weights: chat, chat_stream, completion (one prompt),
    /// completion_multi (a prompt array with n > 1, streamed), embedding, disconnect
    /// (a streamed chat the client hangs up on after a few events)
    #[arg(long, value_name = "KIND=WEIGHT,...", default_value = DEFAULT_MIX, value_parser = Mix::parse)]
    pub mix: Mix,

    /// max_tokens of chat and completions requests
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_tokens: u32,

    /// Size of each prompt in bytes, before its request number
    #[arg(long, value_name = "N", default_value_t = 160,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub prompt_bytes: u32,

    /// Model name sent with every request
    #[arg(long, value_name = "M", default_value = "sim-model")]
    pub model: String,

    /// Prompts in a completion_multi request
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub prompts: u32,

    /// n of a completion_multi request
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub n: u32,

    /// Per-request timeout in seconds, from when it was due to the end of its body;
    /// also bounds the wait for requests in flight after --duration
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = seconds)]
    pub timeout: Duration,

    /// Maximum requests in flight; a request due while the cap is full is not sent
    /// (ledger end "not_sent")
    #[arg(long, value_name = "N", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub concurrency: u32,

    /// Seed of the kind, key and disconnect draws
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// Prefix of every request id (default: soak-<hex milliseconds now>), so runs
    /// against one database never share ids
    #[arg(long, value_name = "ID", value_parser = run_id)]
    pub run_id: Option<String>,

    /// Tokio worker threads (1: the soak shares the machine with what it tests)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
}

/// Request ids must be ones Tollgate keeps: at most 128 characters of
/// `A-Z a-z 0-9 - _ . :`, with room left for the sequence number.
fn run_id(raw: &str) -> Result<String, FlagError> {
    let ok = (1..=100).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(FlagError::RunId)
    }
}

/// Everything the scheduler builds each request from.
struct SoakPlan {
    keys: SoakKeys,
    authorizations: Vec<HeaderValue>,
    uris: Vec<(RequestKind, hyper::Uri)>,
    shape: BodyShape,
    mix: Mix,
    run_id: String,
    seed: u64,
    /// Disconnecting clients read 1 to this many content events.
    max_disconnect_events: u64,
}

impl SoakPlan {
    fn new(args: &SoakArgs) -> anyhow::Result<Self> {
        let keys = SoakKeys::read(&args.keys_file)?;
        let authorizations = keys
            .keys()
            .iter()
            .map(|k| k.key.authorization())
            .collect::<anyhow::Result<_>>()?;
        let uris = RequestKind::ALL
            .into_iter()
            .map(|kind| Ok((kind, args.url.at(kind.path())?)))
            .collect::<anyhow::Result<_>>()?;
        let run_id = args.run_id.clone().unwrap_or_else(|| {
            let millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            format!("soak-{millis:x}")
        });
        Ok(Self {
            keys,
            authorizations,
            uris,
            shape: BodyShape {
                model: args.model.clone(),
                max_tokens: args.max_tokens,
                prompt_bytes: args.prompt_bytes as usize,
                prompts: args.prompts,
                n: args.n,
            },
            mix: args.mix.clone(),
            run_id,
            seed: args.seed,
            // Up to three quarters of max_tokens: most disconnects land mid-stream,
            // some after a short answer has already ended (then they are complete).
            max_disconnect_events: u64::from(args.max_tokens * 3 / 4).max(1),
        })
    }

    /// Request `seq`: what to send, and the ledger line to fill in.
    fn request(&self, seq: u64, sent_at_ms: u64) -> anyhow::Result<(SoakRequest, LedgerEntry)> {
        let kind = self.mix.pick(draw(self.seed, Draw::Kind, seq));
        let key_index = self.keys.pick(draw(self.seed, Draw::Key, seq));
        let (Some(key), Some(authorization)) = (
            self.keys.keys().get(key_index),
            self.authorizations.get(key_index),
        ) else {
            anyhow::bail!("key {key_index} out of range"); // pick stays in range
        };
        let Some((_, uri)) = self.uris.iter().find(|(k, _)| *k == kind) else {
            anyhow::bail!("no URL for {kind}"); // every kind has one
        };
        let request_id = format!("{}-{seq:06}", self.run_id);
        let disconnect_after = (kind == RequestKind::Disconnect).then(|| {
            let events = 1 + draw(self.seed, Draw::Disconnect, seq) % self.max_disconnect_events;
            u32::try_from(events).unwrap_or(u32::MAX)
        });
        let request = SoakRequest {
            uri: uri.clone(),
            body: self
                .shape
                .body(kind, seq)
                .context("serializing a request body")?,
            authorization: authorization.clone(),
            request_id: HeaderValue::from_str(&request_id).context("request id header")?,
            streamed: kind.streamed(),
            disconnect_after,
        };
        let entry = LedgerEntry {
            request_id,
            kind,
            account: key.account.clone(),
            tier: key.tier.clone(),
            sent_at_ms,
            elapsed_ms: 0,
            status: 0,
            end: End::NotSent,
            bytes: 0,
            texts: Vec::new(),
            reported_completion_tokens: None,
            error: None,
        };
        Ok((request, entry))
    }
}

pub async fn run_soak(
    args: &SoakArgs,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    let plan = Arc::new(SoakPlan::new(args)?);
    let mut ledger = LedgerWriter::create(&args.ledger)?;
    let mut summary = LedgerSummary::default();
    let total = scheduled_count(args.rate, args.duration);
    eprintln!(
        "loadgen soak: {} req/s for {:?} ({total} requests) against {}; mix {}; {} keys; request ids {}-NNNNNN",
        args.rate,
        args.duration,
        args.url,
        plan.mix,
        plan.keys.keys().len(),
        plan.run_id,
    );
    let client = http_client(args.concurrency as usize);
    let in_flight = Arc::new(Semaphore::new(args.concurrency as usize));
    let mut tasks: JoinSet<LedgerEntry> = JoinSet::new();
    let start = Instant::now();
    let start_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut clock = ArrivalClock::start(start.into_std(), args.rate, total)
        .context("starting arrival clock")?;
    let mut next: u64 = 0;
    let mut interrupted = false;
    let mut record = |entry: LedgerEntry| -> anyhow::Result<()> {
        summary.add(&entry);
        ledger.append(&entry)
    };
    while next < total {
        tokio::select! {
            // The schedule before reaping, as in a plain run.
            biased;
            () = stop_requested(stop) => {
                interrupted = true;
                break;
            }
            due_count = clock.due_count() => {
                let Some(due_count) = due_count else { break };
                while next < due_count {
                    let offset = scheduled_offset(next, args.rate);
                    let due = start + offset;
                    let sent_at_ms = start_unix_ms + offset.as_millis() as u64;
                    let (request, mut entry) = plan.request(next, sent_at_ms)?;
                    next += 1;
                    let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                        record(entry)?;
                        continue;
                    };
                    let client = client.clone();
                    let deadline = due + args.timeout;
                    tasks.spawn(async move {
                        let received = soak_exchange(&client, &request, deadline).await;
                        drop(permit);
                        entry.elapsed_ms = due.elapsed().as_millis() as u64;
                        entry.status = received.status;
                        entry.end = received.end;
                        entry.bytes = received.bytes;
                        entry.texts = received.texts;
                        entry.reported_completion_tokens = received.reported_completion_tokens;
                        entry.error = received.error;
                        entry
                    });
                }
            }
            Some(joined) = tasks.join_next() => record(finished(joined)?)?,
        }
    }
    drop(clock);
    // Every task ends by its deadline, so this wait is bounded too.
    while let Some(joined) = tasks.join_next().await {
        record(finished(joined)?)?;
    }
    ledger.finish()?;
    print!("loadgen soak: {summary}");
    eprintln!("loadgen soak: wrote {}", args.ledger.display());
    Ok(if interrupted {
        ExitCode::from(crate::EXIT_INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    })
}

fn finished(joined: Result<LedgerEntry, tokio::task::JoinError>) -> anyhow::Result<LedgerEntry> {
    match joined {
        Ok(entry) => Ok(entry),
        // A request task only panics on a bug in this program: surface it.
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => Err(err).context("a request task was cancelled"),
    }
}
