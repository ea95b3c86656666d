//! `loadgen soak-check`: the soak's ledger against Tollgate's `usage_events`.
//!
//! The rules, per request as the client saw it (the ledger's `end`, see
//! [`End`]) and per event (`usage_events`, matched on `request_id`, which Tollgate
//! takes from the client's `x-request-id`):
//!
//! 1. **served**: at least a third of the requests got a 2xx, so the other checks
//!    are not passed by a gateway that served nothing. (Not more: in the soak the
//!    capped accounts are refused for most of the run, and gpu-sim refuses prompt
//!    arrays, so a healthy run answers about 60 %.)
//! 2. **answered, one event**: a 2xx read to its end has exactly one event, with
//!    status `ok`.
//! 3. **answered, billed = received**: that event's `completion_tokens` equal an
//!    independent recount (tiktoken-rs, the model's encoding; not Tollgate's
//!    `bpe-openai`) of the text the client received, summed over choices.
//! 4. **client disconnects**: a stream the client hung up on has exactly one event,
//!    `partial` (or `ok`, when Tollgate had already passed the whole answer on before
//!    it noticed), billing at least the recount of what the client read: Tollgate may
//!    have forwarded more than the client got to read.
//! 5. **server cuts**: a 2xx cut short by the server side (Tollgate or a backend
//!    killed, an error event mid-stream, the client's timeout) has at most one event
//!    (the kill may take it); one that exists bills at least what the client read.
//! 6. **refused and unanswered**: a non-2xx answer, no answer at all, or a request
//!    never sent has at most one event, and only as `rejected`, `client_error` or
//!    `upstream_error` with 0 units (Tollgate records its own refusals as
//!    `rejected`; requests it refused before admission, such as a bad key, leave none).
//! 7. **no stray events**: every event's `request_id` is in the ledger.
//! 8. **no duplicates**: no `event_id` twice, no `request_id` with two events.
//! 9. **hard caps**: per account on a tier given with `--hard-cap TIER=UNITS`, the
//!    sum of `units` is at most UNITS (the tier's `included_units`).
//! 10. **RSS**: Tollgate's resident set at the end is at most `--rss-tolerance`
//!     above its size after warm-up (both measured by the script, of the same
//!     process); skipped when not given.
//!
//! Each rule prints one line (`PASS`, `FAIL` or `SKIP`) with its counts, and for a
//! failure up to [`EXAMPLES`] requests, each placed against the nearest fault of
//! `--faults` (the script's fault log); then `N passed, M failed`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tiktoken_rs::CoreBPE;

use super::ledger::{End, LedgerEntry, LedgerSummary, read_ledger};
use super::store::{AccountUsage, UsageEventRow, read_usage};
use crate::cli::FlagError;

/// Failing requests shown per check.
pub const EXAMPLES: usize = 5;

/// Share of requests that must have been answered for the soak to count.
const MIN_ANSWERED_SHARE: f64 = 1.0 / 3.0;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The ledger written by `loadgen soak --ledger`
    #[arg(long, value_name = "FILE")]
    pub ledger: PathBuf,

    /// Tollgate's Postgres database (the one holding usage_events)
    #[arg(long, value_name = "URL")]
    pub database_url: String,

    /// A hard-capped tier and its included_units; repeat for each such tier
    #[arg(long, value_name = "TIER=UNITS", value_parser = HardCap::parse)]
    pub hard_cap: Vec<HardCap>,

    /// Encoding the backend's tokens are recounted with (gpu-sim: cl100k_base for
    /// models tiktoken does not know)
    #[arg(long, value_enum, default_value_t = Encoding::Cl100kBase)]
    pub encoding: Encoding,

    /// The script's fault log, `UNIX_MS NAME` per line: failing requests are shown
    /// against the nearest fault
    #[arg(long, value_name = "FILE")]
    pub faults: Option<PathBuf>,

    /// Tollgate's RSS after warm-up, in KiB
    #[arg(long, value_name = "KIB", requires = "rss_end_kib")]
    pub rss_warm_kib: Option<u64>,

    /// Tollgate's RSS at the end, in KiB
    #[arg(long, value_name = "KIB", requires = "rss_warm_kib")]
    pub rss_end_kib: Option<u64>,

    /// Growth of the RSS allowed from warm-up to the end (0.2 = 20 %)
    #[arg(long, value_name = "FRACTION", default_value_t = 0.2)]
    pub rss_tolerance: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Encoding {
    #[value(name = "cl100k_base")]
    Cl100kBase,
    #[value(name = "o200k_base")]
    O200kBase,
}

/// `--hard-cap TIER=UNITS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardCap {
    pub tier: String,
    pub units: u64,
}

impl HardCap {
    pub fn parse(raw: &str) -> Result<Self, FlagError> {
        let bad = || FlagError::HardCap(raw.to_owned());
        let (tier, units) = raw.split_once('=').ok_or_else(bad)?;
        let units = units.trim().parse().map_err(|_| bad())?;
        let tier = tier.trim();
        if tier.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            tier: tier.to_owned(),
            units,
        })
    }
}

/// One line of the fault log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub at_ms: u64,
    pub name: String,
}

/// Reads `UNIX_MS NAME` lines; `#` comments and empty lines are skipped.
pub fn read_faults(path: &Path) -> anyhow::Result<Vec<Fault>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading fault log {}", path.display()))?;
    let mut faults = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (at, name) = line.split_once(char::is_whitespace).with_context(|| {
            format!(
                "{} line {}: expected UNIX_MS NAME",
                path.display(),
                number + 1
            )
        })?;
        let at_ms = at.parse().with_context(|| {
            format!(
                "{} line {}: {at:?} is not a time",
                path.display(),
                number + 1
            )
        })?;
        faults.push(Fault {
            at_ms,
            name: name.trim().to_owned(),
        });
    }
    faults.sort_by_key(|f| f.at_ms);
    Ok(faults)
}

/// Tollgate's resident set, measured by the script.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RssSample {
    pub warm_kib: u64,
    pub end_kib: u64,
    pub tolerance: f64,
}

/// Everything the checks look at.
pub struct SoakFacts<'a> {
    pub ledger: &'a [LedgerEntry],
    pub events: &'a [UsageEventRow],
    pub accounts: &'a [AccountUsage],
    pub hard_caps: &'a [HardCap],
    pub faults: &'a [Fault],
    pub rss: Option<RssSample>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Nothing to check (no hard-capped tier given, no RSS measured).
    Skip,
}

/// The outcome of one rule.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: &'static str,
    pub verdict: Verdict,
    /// Counts, one line.
    pub summary: String,
    /// More lines for a failure: breakdowns and examples.
    pub details: Vec<String>,
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        writeln!(f, "{verdict}  {}: {}", self.name, self.summary)?;
        for line in &self.details {
            writeln!(f, "        {line}")?;
        }
        Ok(())
    }
}

/// Counts tokens the way the backend does, independently of Tollgate.
pub trait Recount {
    fn tokens(&self, text: &str) -> u64;

    /// Tokens of every choice's text (choices are tokenized apart).
    fn texts(&self, texts: &[String]) -> u64 {
        texts.iter().map(|t| self.tokens(t)).sum()
    }
}

/// tiktoken-rs: the reference Python tiktoken's BPE, not the `bpe-openai` crate
/// Tollgate counts with, so a counting bug in one does not hide in both.
pub struct Tiktoken(CoreBPE);

impl Tiktoken {
    pub fn new(encoding: Encoding) -> anyhow::Result<Self> {
        let bpe = match encoding {
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base(),
            Encoding::O200kBase => tiktoken_rs::o200k_base(),
        }
        .context("loading the tiktoken encoding")?;
        Ok(Self(bpe))
    }
}

impl Recount for Tiktoken {
    fn tokens(&self, text: &str) -> u64 {
        self.0.encode_ordinary(text).len() as u64
    }
}

/// Statuses of events that bill nothing.
const UNBILLED_STATUSES: [&str; 3] = ["rejected", "client_error", "upstream_error"];

/// Runs every rule over `facts`.
pub fn check_soak(facts: &SoakFacts<'_>, recount: &dyn Recount) -> Vec<CheckResult> {
    let by_request = events_by_request(facts.events);
    let context = Timeline {
        start_ms: facts.ledger.iter().map(|e| e.sent_at_ms).min().unwrap_or(0),
        faults: facts.faults,
    };
    vec![
        served(facts.ledger),
        answered_have_one_ok_event(facts.ledger, &by_request, &context),
        answered_billed_as_received(facts.ledger, &by_request, recount, &context),
        client_disconnects(facts.ledger, &by_request, recount, &context),
        server_cuts(facts.ledger, &by_request, recount, &context),
        refused_unbilled(facts.ledger, &by_request, &context),
        no_stray_events(facts.ledger, facts.events),
        no_duplicates(facts.events, &by_request),
        hard_caps(facts.accounts, facts.hard_caps),
        rss(facts.rss),
    ]
}

fn events_by_request(events: &[UsageEventRow]) -> HashMap<&str, Vec<&UsageEventRow>> {
    let mut by_request: HashMap<&str, Vec<&UsageEventRow>> = HashMap::new();
    for event in events {
        by_request
            .entry(event.request_id.as_str())
            .or_default()
            .push(event);
    }
    by_request
}

fn events_of<'a>(
    by_request: &HashMap<&str, Vec<&'a UsageEventRow>>,
    entry: &LedgerEntry,
) -> Vec<&'a UsageEventRow> {
    by_request
        .get(entry.request_id.as_str())
        .cloned()
        .unwrap_or_default()
}

/// Places requests in time for the examples: seconds since the first request, and
/// the nearest fault.
struct Timeline<'a> {
    start_ms: u64,
    faults: &'a [Fault],
}

impl Timeline<'_> {
    fn done_ms(entry: &LedgerEntry) -> u64 {
        entry.sent_at_ms + entry.elapsed_ms
    }

    /// The fault nearest to when the request was done, and how far before (−) or
    /// after (+) it the request was done, in seconds.
    fn nearest_fault(&self, entry: &LedgerEntry) -> Option<(&str, f64)> {
        let done = Self::done_ms(entry) as i128;
        self.faults
            .iter()
            .min_by_key(|f| (f.at_ms as i128 - done).abs())
            .map(|f| (f.name.as_str(), (done - f.at_ms as i128) as f64 / 1000.0))
    }

    fn example(&self, entry: &LedgerEntry, problem: &str) -> String {
        let done = (Self::done_ms(entry).saturating_sub(self.start_ms)) as f64 / 1000.0;
        let mut line = format!(
            "{} {} {} status {} {} done at +{done:.2}s: {problem}",
            entry.request_id, entry.kind, entry.account, entry.status, entry.end
        );
        if let Some((fault, offset)) = self.nearest_fault(entry) {
            let side = if offset < 0.0 { "before" } else { "after" };
            line.push_str(&format!(" ({:.2} s {side} {fault})", offset.abs()));
        }
        line
    }

    /// How many of `entries` were done nearest to each fault.
    fn by_fault<'e>(&self, entries: impl Iterator<Item = &'e LedgerEntry>) -> String {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for entry in entries {
            let fault = self
                .nearest_fault(entry)
                .map_or("no fault", |(name, _)| name);
            *counts.entry(fault).or_default() += 1;
        }
        counts
            .iter()
            .map(|(fault, n)| format!("{fault} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Collects the requests a rule found wrong, by problem, for the report; a note
/// (the figures) goes with each request into its example line.
#[derive(Default)]
struct Problems<'a> {
    by_problem: BTreeMap<String, Vec<(&'a LedgerEntry, String)>>,
}

impl<'a> Problems<'a> {
    fn add(&mut self, problem: impl Into<String>, entry: &'a LedgerEntry) {
        self.add_noted(problem, entry, String::new());
    }

    fn add_noted(&mut self, problem: impl Into<String>, entry: &'a LedgerEntry, note: String) {
        self.by_problem
            .entry(problem.into())
            .or_default()
            .push((entry, note));
    }

    fn count(&self) -> usize {
        self.by_problem.values().map(Vec::len).sum()
    }

    fn summary(&self) -> String {
        self.by_problem
            .iter()
            .map(|(problem, entries)| format!("{} {problem}", entries.len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A breakdown by nearest fault per problem, then the first examples.
    fn details(&self, context: &Timeline<'_>) -> Vec<String> {
        let mut details = Vec::new();
        if !context.faults.is_empty() {
            for (problem, entries) in &self.by_problem {
                details.push(format!(
                    "{problem}, by nearest fault: {}",
                    context.by_fault(entries.iter().map(|(entry, _)| *entry))
                ));
            }
        }
        let mut examples: Vec<(String, &LedgerEntry)> = self
            .by_problem
            .iter()
            .flat_map(|(problem, entries)| {
                entries.iter().map(move |(entry, note)| {
                    let text = if note.is_empty() {
                        problem.clone()
                    } else {
                        format!("{problem} ({note})")
                    };
                    (text, *entry)
                })
            })
            .collect();
        examples.sort_by_key(|(_, e)| e.sent_at_ms);
        details.extend(
            examples
                .into_iter()
                .take(EXAMPLES)
                .map(|(problem, entry)| context.example(entry, &problem)),
        );
        details
    }

    fn result(&self, name: &'static str, counts: String, context: &Timeline<'_>) -> CheckResult {
        if self.count() == 0 {
            CheckResult {
                name,
                verdict: Verdict::Pass,
                summary: counts,
                details: Vec::new(),
            }
        } else {
            CheckResult {
                name,
                verdict: Verdict::Fail,
                summary: format!("{counts}; {}", self.summary()),
                details: self.details(context),
            }
        }
    }
}

fn served(ledger: &[LedgerEntry]) -> CheckResult {
    let answered = ledger.iter().filter(|e| e.answered()).count();
    let share = if ledger.is_empty() {
        0.0
    } else {
        answered as f64 / ledger.len() as f64
    };
    CheckResult {
        name: "the gateway served the load",
        verdict: if share >= MIN_ANSWERED_SHARE {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        summary: format!(
            "{answered} of {} requests answered with a 2xx ({:.1}%, at least {:.0}% needed)",
            ledger.len(),
            share * 100.0,
            MIN_ANSWERED_SHARE * 100.0
        ),
        details: Vec::new(),
    }
}

/// Problem name for a request with `n` events where one was expected.
fn count_problem(n: usize) -> Option<&'static str> {
    match n {
        0 => Some("without an event"),
        1 => None,
        _ => Some("with several events"),
    }
}

fn answered_have_one_ok_event(
    ledger: &[LedgerEntry],
    by_request: &HashMap<&str, Vec<&UsageEventRow>>,
    context: &Timeline<'_>,
) -> CheckResult {
    let mut problems = Problems::default();
    let mut total = 0;
    for entry in ledger
        .iter()
        .filter(|e| e.answered() && e.end == End::Complete)
    {
        total += 1;
        let events = events_of(by_request, entry);
        if let Some(problem) = count_problem(events.len()) {
            problems.add(problem, entry);
        } else if let Some(event) = events.first()
            && event.status != "ok"
        {
            problems.add(format!("with a {} event", event.status), entry);
        }
    }
    let good = total - problems.count();
    problems.result(
        "answered requests have exactly one ok event",
        format!("{good} of {total} complete 2xx answers"),
        context,
    )
}

fn answered_billed_as_received(
    ledger: &[LedgerEntry],
    by_request: &HashMap<&str, Vec<&UsageEventRow>>,
    recount: &dyn Recount,
    context: &Timeline<'_>,
) -> CheckResult {
    let mut problems = Problems::default();
    let (mut compared, mut not_compared, mut tokens) = (0, 0, 0);
    for entry in ledger
        .iter()
        .filter(|e| e.answered() && e.end == End::Complete)
    {
        let events = events_of(by_request, entry);
        let [event] = events.as_slice() else {
            not_compared += 1; // the previous rule reports it
            continue;
        };
        compared += 1;
        let received = recount.texts(&entry.texts);
        tokens += received;
        let billed = event.completion_tokens;
        let note = format!("billed {billed}, received {received}");
        if billed > received {
            problems.add_noted("billed more than received", entry, note);
        } else if billed < received {
            problems.add_noted("billed less than received", entry, note);
        }
    }
    problems.result(
        "billed completion tokens equal the recount of what was received",
        format!(
            "{} of {compared} answers ({tokens} tokens recounted; {not_compared} without exactly one event not compared)",
            compared - problems.count()
        ),
        context,
    )
}

fn client_disconnects(
    ledger: &[LedgerEntry],
    by_request: &HashMap<&str, Vec<&UsageEventRow>>,
    recount: &dyn Recount,
    context: &Timeline<'_>,
) -> CheckResult {
    let mut problems = Problems::default();
    let (mut total, mut partial, mut ok) = (0, 0, 0);
    for entry in ledger
        .iter()
        .filter(|e| e.answered() && e.end == End::ClientDisconnect)
    {
        total += 1;
        let events = events_of(by_request, entry);
        if let Some(problem) = count_problem(events.len()) {
            problems.add(problem, entry);
            continue;
        }
        let Some(event) = events.first() else {
            continue;
        };
        match event.status.as_str() {
            "partial" => partial += 1,
            "ok" => ok += 1,
            other => {
                problems.add(format!("with a {other} event"), entry);
                continue;
            }
        }
        let read = recount.texts(&entry.texts);
        if event.completion_tokens < read {
            let note = format!("billed {}, read {read}", event.completion_tokens);
            problems.add_noted("billed less than the client read", entry, note);
        }
    }
    problems.result(
        "client disconnects have one event billing at least what was read",
        format!(
            "{} of {total} disconnects ({partial} partial, {ok} ok: Tollgate had passed the whole answer on)",
            total - problems.count()
        ),
        context,
    )
}

fn server_cuts(
    ledger: &[LedgerEntry],
    by_request: &HashMap<&str, Vec<&UsageEventRow>>,
    recount: &dyn Recount,
    context: &Timeline<'_>,
) -> CheckResult {
    let mut problems = Problems::default();
    let (mut total, mut with_event) = (0, 0);
    for entry in ledger
        .iter()
        .filter(|e| e.answered() && e.end == End::ServerCut)
    {
        total += 1;
        let events = events_of(by_request, entry);
        match events.as_slice() {
            [] => {}
            [event] => {
                with_event += 1;
                let read = recount.texts(&entry.texts);
                if event.completion_tokens < read {
                    problems.add_noted(
                        format!(
                            "with a {} event billing less than the client read",
                            event.status
                        ),
                        entry,
                        format!("billed {}, read {read}", event.completion_tokens),
                    );
                }
            }
            _ => problems.add("with several events", entry),
        }
    }
    problems.result(
        "answers cut by the server have at most one event",
        format!(
            "{} of {total} cut answers ({with_event} with an event, {} without)",
            total - problems.count(),
            total - with_event
        ),
        context,
    )
}

fn refused_unbilled(
    ledger: &[LedgerEntry],
    by_request: &HashMap<&str, Vec<&UsageEventRow>>,
    context: &Timeline<'_>,
) -> CheckResult {
    let mut problems = Problems::default();
    let mut total = 0;
    let mut recorded: BTreeMap<&str, u64> = BTreeMap::new();
    for entry in ledger.iter().filter(|e| !e.answered()) {
        total += 1;
        let events = events_of(by_request, entry);
        if events.len() > 1 {
            problems.add("with several events", entry);
            continue;
        }
        let Some(event) = events.first() else {
            continue;
        };
        *recorded.entry(event.status.as_str()).or_default() += 1;
        if !UNBILLED_STATUSES.contains(&event.status.as_str()) {
            problems.add(format!("with a {} event", event.status), entry);
        } else if event.units != 0 {
            problems.add(
                format!("with a {} event billing units", event.status),
                entry,
            );
        }
    }
    let recorded = if recorded.is_empty() {
        "none recorded".to_owned()
    } else {
        recorded
            .iter()
            .map(|(status, n)| format!("{n} {status}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    problems.result(
        "refused and unanswered requests have no billed event",
        format!(
            "{} of {total} non-2xx or unanswered ({recorded})",
            total - problems.count()
        ),
        context,
    )
}

fn no_stray_events(ledger: &[LedgerEntry], events: &[UsageEventRow]) -> CheckResult {
    let known: HashSet<&str> = ledger.iter().map(|e| e.request_id.as_str()).collect();
    let stray: Vec<&UsageEventRow> = events
        .iter()
        .filter(|e| !known.contains(e.request_id.as_str()))
        .collect();
    CheckResult {
        name: "every event belongs to a request in the ledger",
        verdict: if stray.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        summary: format!(
            "{} events, {} without a ledger request",
            events.len(),
            stray.len()
        ),
        details: stray
            .iter()
            .take(EXAMPLES)
            .map(|e| {
                format!(
                    "event {} request {:?} status {} units {}",
                    e.event_id, e.request_id, e.status, e.units
                )
            })
            .collect(),
    }
}

fn no_duplicates(
    events: &[UsageEventRow],
    by_request: &HashMap<&str, Vec<&UsageEventRow>>,
) -> CheckResult {
    let mut seen = HashSet::new();
    let duplicate_ids: Vec<&str> = events
        .iter()
        .filter(|e| !seen.insert(e.event_id.as_str()))
        .map(|e| e.event_id.as_str())
        .collect();
    let mut repeated: Vec<(&str, usize)> = by_request
        .iter()
        .filter(|(_, events)| events.len() > 1)
        .map(|(id, events)| (*id, events.len()))
        .collect();
    repeated.sort_unstable();
    let mut details: Vec<String> = duplicate_ids
        .iter()
        .take(EXAMPLES)
        .map(|id| format!("event_id {id} stored twice"))
        .collect();
    details.extend(
        repeated
            .iter()
            .take(EXAMPLES)
            .map(|(id, n)| format!("request {id} has {n} events")),
    );
    CheckResult {
        name: "no duplicate events",
        verdict: if duplicate_ids.is_empty() && repeated.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        summary: format!(
            "{} duplicate event ids, {} request ids with several events",
            duplicate_ids.len(),
            repeated.len()
        ),
        details,
    }
}

fn hard_caps(accounts: &[AccountUsage], caps: &[HardCap]) -> CheckResult {
    let name = "no account's usage exceeds its tier's hard cap";
    if caps.is_empty() {
        return CheckResult {
            name,
            verdict: Verdict::Skip,
            summary: "no hard-capped tier given (--hard-cap TIER=UNITS)".to_owned(),
            details: Vec::new(),
        };
    }
    let mut capped = Vec::new();
    for account in accounts {
        if let Some(cap) = caps.iter().find(|c| c.tier == account.tier) {
            capped.push((account, cap.units));
        }
    }
    let over: Vec<String> = capped
        .iter()
        .filter(|(account, cap)| account.units > *cap)
        .map(|(account, cap)| {
            format!(
                "{} ({}) used {} units of {cap} (+{})",
                account.account,
                account.tier,
                account.units,
                account.units - cap
            )
        })
        .collect();
    let fullest = capped
        .iter()
        .map(|(account, cap)| account.units as f64 / (*cap).max(1) as f64)
        .fold(0.0, f64::max);
    CheckResult {
        name,
        verdict: if over.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        summary: format!(
            "{} of {} capped accounts within their cap (fullest at {:.1}%)",
            capped.len() - over.len(),
            capped.len(),
            fullest * 100.0
        ),
        details: over,
    }
}

fn rss(sample: Option<RssSample>) -> CheckResult {
    let name = "Tollgate's RSS at the end is within the tolerance of after warm-up";
    let Some(sample) = sample else {
        return CheckResult {
            name,
            verdict: Verdict::Skip,
            summary: "not measured (--rss-warm-kib, --rss-end-kib)".to_owned(),
            details: Vec::new(),
        };
    };
    let growth = sample.end_kib as f64 / sample.warm_kib.max(1) as f64 - 1.0;
    CheckResult {
        name,
        verdict: if growth <= sample.tolerance {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        summary: format!(
            "{:.1} MiB after warm-up, {:.1} MiB at the end ({:+.1}%, at most +{:.0}%)",
            sample.warm_kib as f64 / 1024.0,
            sample.end_kib as f64 / 1024.0,
            growth * 100.0,
            sample.tolerance * 100.0
        ),
        details: Vec::new(),
    }
}

/// `N passed, M failed` (skipped rules are neither).
pub fn tally(results: &[CheckResult]) -> (usize, usize) {
    let passed = results
        .iter()
        .filter(|r| r.verdict == Verdict::Pass)
        .count();
    let failed = results
        .iter()
        .filter(|r| r.verdict == Verdict::Fail)
        .count();
    (passed, failed)
}

pub async fn run_check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let ledger = read_ledger(&args.ledger)?;
    let faults = match &args.faults {
        Some(path) => read_faults(path)?,
        None => Vec::new(),
    };
    let usage = read_usage(&args.database_url).await?;
    let recount = Tiktoken::new(args.encoding)?;
    let rss = match (args.rss_warm_kib, args.rss_end_kib) {
        (Some(warm_kib), Some(end_kib)) => Some(RssSample {
            warm_kib,
            end_kib,
            tolerance: args.rss_tolerance,
        }),
        _ => None,
    };
    let facts = SoakFacts {
        ledger: &ledger,
        events: &usage.events,
        accounts: &usage.accounts,
        hard_caps: &args.hard_cap,
        faults: &faults,
        rss,
    };
    print!("ledger: {}", LedgerSummary::of(&ledger));
    println!("usage_events: {} rows", usage.events.len());
    let results = check_soak(&facts, &recount);
    for result in &results {
        print!("{result}");
    }
    let (passed, failed) = tally(&results);
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::mix::RequestKind;

    /// One token per whitespace-separated word, as gpu-sim's text is built.
    struct Words;

    impl Recount for Words {
        fn tokens(&self, text: &str) -> u64 {
            text.split_whitespace().count() as u64
        }
    }

    fn request(id: &str, status: u16, end: End, text: &str) -> LedgerEntry {
        LedgerEntry {
            request_id: id.to_owned(),
            kind: RequestKind::ChatStream,
            account: "acme".to_owned(),
            tier: "pro".to_owned(),
            sent_at_ms: 1_000,
            elapsed_ms: 100,
            status,
            end,
            bytes: 10,
            texts: if text.is_empty() {
                Vec::new()
            } else {
                vec![text.to_owned()]
            },
            reported_completion_tokens: None,
            error: None,
        }
    }

    fn event(id: &str, request: &str, status: &str, completion: u64, units: u64) -> UsageEventRow {
        UsageEventRow {
            event_id: id.to_owned(),
            request_id: request.to_owned(),
            status: status.to_owned(),
            completion_tokens: completion,
            units,
        }
    }

    fn run(ledger: &[LedgerEntry], events: &[UsageEventRow]) -> Vec<CheckResult> {
        check_soak(
            &SoakFacts {
                ledger,
                events,
                accounts: &[],
                hard_caps: &[],
                faults: &[],
                rss: None,
            },
            &Words,
        )
    }

    fn verdict_of(results: &[CheckResult], name_starts: &str) -> Verdict {
        results
            .iter()
            .find(|r| r.name.starts_with(name_starts))
            .unwrap_or_else(|| panic!("no check {name_starts:?}"))
            .verdict
    }

    fn failed(results: &[CheckResult]) -> Vec<&'static str> {
        results
            .iter()
            .filter(|r| r.verdict == Verdict::Fail)
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn a_clean_soak_passes_every_rule() {
        let ledger = [
            request("a", 200, End::Complete, "one two three"),
            request("b", 200, End::ClientDisconnect, "one"),
            request("c", 200, End::ServerCut, "one two"),
            request("d", 429, End::Refused, ""),
            request("e", 0, End::NoAnswer, ""),
            request("f", 200, End::Complete, ""),
        ];
        let events = [
            event("1", "a", "ok", 3, 10),
            // Tollgate forwarded two more tokens than the client read before hanging up.
            event("2", "b", "partial", 3, 8),
            event("3", "c", "partial", 2, 7),
            event("4", "d", "rejected", 0, 0),
            event("5", "f", "ok", 0, 4),
        ];
        let results = run(&ledger, &events);
        assert_eq!(failed(&results), Vec::<&str>::new(), "{results:#?}");
        assert_eq!(tally(&results), (8, 0));
    }

    #[test]
    fn lost_event_of_an_answered_request_fails() {
        // The SIGKILL case: the client got its whole answer, the event died in memory.
        let ledger = [
            request("a", 200, End::Complete, "one two"),
            request("b", 200, End::Complete, "one"),
        ];
        let results = run(&ledger, &[event("1", "a", "ok", 2, 5)]);
        assert_eq!(
            failed(&results),
            ["answered requests have exactly one ok event"]
        );
        let lost = &results[1];
        assert!(lost.summary.contains("1 of 2"), "{}", lost.summary);
        assert!(
            lost.summary.contains("1 without an event"),
            "{}",
            lost.summary
        );
        assert!(
            lost.details.iter().any(|d| d.starts_with("b ")),
            "{:?}",
            lost.details
        );
    }

    #[test]
    fn answered_request_with_a_partial_event_fails() {
        let ledger = [request("a", 200, End::Complete, "one two")];
        let results = run(&ledger, &[event("1", "a", "partial", 2, 5)]);
        assert_eq!(
            failed(&results),
            ["answered requests have exactly one ok event"]
        );
        assert!(
            results[1].summary.contains("1 with a partial event"),
            "{}",
            results[1].summary
        );
    }

    #[test]
    fn billing_other_than_received_fails_either_way() {
        let ledger = [
            request("a", 200, End::Complete, "one two three"),
            request("b", 200, End::Complete, "one two three"),
            request("c", 200, End::Complete, "one two three"),
        ];
        let results = run(
            &ledger,
            &[
                event("1", "a", "ok", 3, 5),
                event("2", "b", "ok", 4, 5),
                event("3", "c", "ok", 2, 5),
            ],
        );
        assert_eq!(
            failed(&results),
            ["billed completion tokens equal the recount of what was received"]
        );
        let billed = &results[2];
        assert!(
            billed
                .summary
                .contains("1 billed less than received, 1 billed more than received"),
            "{}",
            billed.summary
        );
        assert!(
            billed
                .details
                .iter()
                .any(|d| d.contains("billed more than received (billed 4, received 3)")),
            "{:?}",
            billed.details
        );
    }

    #[test]
    fn texts_of_several_choices_are_recounted_apart_and_summed() {
        let mut multi = request("a", 200, End::Complete, "");
        multi.texts = vec![
            "one two".into(),
            "three".into(),
            String::new(),
            "four five".into(),
        ];
        let results = run(&[multi], &[event("1", "a", "ok", 5, 9)]);
        assert_eq!(failed(&results), Vec::<&str>::new(), "{results:#?}");
    }

    #[test]
    fn disconnect_needs_one_event_billing_at_least_what_was_read() {
        let ledger = [
            request("a", 200, End::ClientDisconnect, "one two three"),
            request("b", 200, End::ClientDisconnect, "one two three"),
            request("c", 200, End::ClientDisconnect, "one"),
            request("d", 200, End::ClientDisconnect, "one"),
        ];
        let results = run(
            &ledger,
            &[
                event("1", "a", "ok", 3, 5),      // whole answer passed on: fine
                event("2", "b", "partial", 2, 5), // billed less than read
                event("3", "c", "upstream_error", 0, 0),
                // d: no event at all
            ],
        );
        assert_eq!(
            failed(&results),
            ["client disconnects have one event billing at least what was read"]
        );
        let summary = &results[3].summary;
        assert!(summary.contains("1 of 4"), "{summary}");
        assert!(
            summary.contains("1 billed less than the client read"),
            "{summary}"
        );
        assert!(
            summary.contains("1 with a upstream_error event"),
            "{summary}"
        );
        assert!(summary.contains("1 without an event"), "{summary}");
    }

    #[test]
    fn server_cut_may_lose_its_event_but_not_gain_two_or_underbill() {
        let ledger = [
            request("a", 200, End::ServerCut, "one two"),
            request("b", 200, End::ServerCut, "one two"),
            request("c", 200, End::ServerCut, "one two"),
        ];
        let ok = run(&ledger[..1], &[]);
        assert_eq!(verdict_of(&ok, "answers cut"), Verdict::Pass);
        let results = run(
            &ledger,
            &[
                event("1", "b", "upstream_error", 0, 0),
                event("2", "c", "partial", 2, 4),
                event("3", "c", "partial", 2, 4),
            ],
        );
        assert_eq!(verdict_of(&results, "answers cut"), Verdict::Fail);
        let summary = &results[4].summary;
        assert!(
            summary.contains("1 with a upstream_error event billing less"),
            "{summary}"
        );
        assert!(summary.contains("1 with several events"), "{summary}");
        assert_eq!(verdict_of(&results, "no duplicate events"), Verdict::Fail);
    }

    #[test]
    fn refusals_may_only_leave_unbilled_events() {
        let ledger = [
            request("a", 429, End::Refused, ""),
            request("b", 400, End::Refused, ""),
            request("c", 0, End::NoAnswer, ""),
            request("d", 503, End::Refused, ""),
            request("e", 0, End::NotSent, ""),
        ];
        let good = run(
            &ledger,
            &[
                event("1", "a", "rejected", 0, 0),
                event("2", "b", "client_error", 0, 0),
                event("3", "d", "upstream_error", 0, 0),
            ],
        );
        assert_eq!(verdict_of(&good, "refused"), Verdict::Pass);
        let bad = run(
            &ledger,
            &[
                event("1", "a", "rejected", 0, 3),
                event("2", "c", "ok", 5, 12),
            ],
        );
        assert_eq!(verdict_of(&bad, "refused"), Verdict::Fail);
        let summary = &bad[5].summary;
        assert!(summary.contains("1 with a ok event"), "{summary}");
        assert!(
            summary.contains("1 with a rejected event billing units"),
            "{summary}"
        );
    }

    #[test]
    fn stray_and_duplicate_events_fail() {
        let ledger = [request("a", 200, End::Complete, "one")];
        let results = run(
            &ledger,
            &[
                event("1", "a", "ok", 1, 2),
                event("1", "a", "ok", 1, 2),
                event("9", "unknown", "ok", 1, 2),
            ],
        );
        assert_eq!(verdict_of(&results, "every event belongs"), Verdict::Fail);
        assert_eq!(verdict_of(&results, "no duplicate events"), Verdict::Fail);
        assert!(
            results[7]
                .summary
                .starts_with("1 duplicate event ids, 1 request ids"),
            "{}",
            results[7].summary
        );
    }

    #[test]
    fn unserved_load_fails_instead_of_passing_vacuously() {
        let mut ledger = vec![
            request("a", 0, End::NoAnswer, ""),
            request("b", 429, End::Refused, ""),
            request("c", 200, End::Complete, "one"),
        ];
        let events = [event("1", "c", "ok", 1, 2)];
        assert_eq!(failed(&run(&ledger, &events)), Vec::<&str>::new());
        ledger.push(request("d", 0, End::NoAnswer, ""));
        let results = run(&ledger, &events);
        assert_eq!(failed(&results), ["the gateway served the load"]);
        assert!(
            results[0].summary.starts_with("1 of 4 requests"),
            "{}",
            results[0].summary
        );
    }

    #[test]
    fn hard_caps_apply_per_account_of_a_capped_tier() {
        let accounts = [
            AccountUsage {
                account: "f1".into(),
                tier: "free".into(),
                units: 50,
            },
            AccountUsage {
                account: "f2".into(),
                tier: "free".into(),
                units: 51,
            },
            AccountUsage {
                account: "p1".into(),
                tier: "pro".into(),
                units: 10_000,
            },
        ];
        let caps = [HardCap::parse("free=50").unwrap()];
        let result = hard_caps(&accounts, &caps);
        assert_eq!(result.verdict, Verdict::Fail);
        assert_eq!(result.details, ["f2 (free) used 51 units of 50 (+1)"]);
        assert!(
            result.summary.starts_with("1 of 2 capped accounts"),
            "{}",
            result.summary
        );
        assert_eq!(hard_caps(&accounts[..1], &caps).verdict, Verdict::Pass);
        assert_eq!(hard_caps(&accounts, &[]).verdict, Verdict::Skip);
        assert!(HardCap::parse("free").is_err());
        assert!(HardCap::parse("=5").is_err());
        assert!(HardCap::parse("free=x").is_err());
    }

    #[test]
    fn rss_growth_beyond_the_tolerance_fails() {
        let sample = |end_kib| RssSample {
            warm_kib: 100_000,
            end_kib,
            tolerance: 0.2,
        };
        assert_eq!(rss(Some(sample(120_000))).verdict, Verdict::Pass);
        assert_eq!(rss(Some(sample(90_000))).verdict, Verdict::Pass);
        assert_eq!(rss(Some(sample(120_001))).verdict, Verdict::Fail);
        assert_eq!(rss(None).verdict, Verdict::Skip);
    }

    #[test]
    fn examples_name_the_nearest_fault() {
        let ledger = [request("a", 200, End::Complete, "one")];
        let faults = [
            Fault {
                at_ms: 500,
                name: "pg_restart".into(),
            },
            Fault {
                at_ms: 1_300,
                name: "tollgate_sigkill".into(),
            },
        ];
        let results = check_soak(
            &SoakFacts {
                ledger: &ledger,
                events: &[],
                accounts: &[],
                hard_caps: &[],
                faults: &faults,
                rss: None,
            },
            &Words,
        );
        let details = results[1].details.join("\n");
        assert!(
            details.contains("without an event, by nearest fault: tollgate_sigkill 1"),
            "{details}"
        );
        assert!(
            details.contains("(0.20 s before tollgate_sigkill)"),
            "{details}"
        );
    }

    #[test]
    fn fault_log_lines_are_read_and_sorted() {
        let path = std::env::temp_dir().join(format!("faults-{}.log", std::process::id()));
        std::fs::write(&path, "# at name\n2000 tollgate_sigterm\n1000 pg_restart\n").unwrap();
        let faults = read_faults(&path).unwrap();
        assert_eq!(
            faults[0],
            Fault {
                at_ms: 1000,
                name: "pg_restart".into()
            }
        );
        assert_eq!(faults.len(), 2);
        std::fs::write(&path, "soon pg_restart\n").unwrap();
        assert!(read_faults(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn tiktoken_counts_gpu_sim_style_text_one_token_a_word() {
        let tiktoken = Tiktoken::new(Encoding::Cl100kBase).unwrap();
        assert_eq!(tiktoken.tokens(""), 0);
        assert_eq!(tiktoken.tokens("The quick brown fox"), 4);
        assert_eq!(
            tiktoken.texts(&["Hello world".into(), " the end".into()]),
            4
        );
    }
}
