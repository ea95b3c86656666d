//! The soak's ledger: one JSON line per scheduled request, written by `loadgen soak`
//! and read by `loadgen soak-check`.
//!
//! A line records what the client saw, never what Tollgate says it did: the request
//! id it sent, the HTTP status, how the body ended, the bytes received and the text
//! of each choice as it arrived. The checker compares exactly that with the usage
//! log, so the ledger must not depend on anything Tollgate reports. Example:
//!
//! ```json
//! {"request_id":"soak-5f3a-000042","kind":"chat_stream","account":"soak-pro-a","tier":"pro",
//!  "sent_at_ms":1767780000123,"elapsed_ms":412,"status":200,"end":"complete","bytes":2301,
//!  "texts":["The river stones ..."],"reported_completion_tokens":32}
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::mix::RequestKind;

/// How a request's exchange ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// A 2xx answer read to its end: a whole JSON body, or a stream up to
    /// `data: [DONE]` with no error event.
    Complete,
    /// A 2xx stream the client itself hung up on, as planned, before its end.
    ClientDisconnect,
    /// A 2xx answer that broke off before its end: the connection dropped, an error
    /// event arrived mid-stream, or the body did not finish within the timeout.
    ServerCut,
    /// A non-2xx answer.
    Refused,
    /// No answer: the connection was refused or dropped before a status line, or no
    /// status arrived within the timeout (`status` is 0).
    NoAnswer,
    /// Never sent: `--concurrency` requests were already in flight.
    NotSent,
}

impl End {
    pub const ALL: [Self; 6] = [
        Self::Complete,
        Self::ClientDisconnect,
        Self::ServerCut,
        Self::Refused,
        Self::NoAnswer,
        Self::NotSent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::ClientDisconnect => "client_disconnect",
            Self::ServerCut => "server_cut",
            Self::Refused => "refused",
            Self::NoAnswer => "no_answer",
            Self::NotSent => "not_sent",
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// One request as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Sent as `x-request-id`, which Tollgate keeps as the usage event's request id.
    pub request_id: String,
    pub kind: RequestKind,
    /// The account and tier of the key it was sent with (from the keys file).
    pub account: String,
    pub tier: String,
    /// When it was due, in Unix milliseconds (to line it up with the fault log).
    pub sent_at_ms: u64,
    /// From when it was due to when the client was done with it.
    pub elapsed_ms: u64,
    /// The HTTP status; 0 when none arrived.
    pub status: u16,
    pub end: End,
    /// Body bytes received.
    pub bytes: u64,
    /// The generated text received, per choice index (empty for embeddings and
    /// refusals; what arrived before the cut for a cut stream).
    #[serde(default)]
    pub texts: Vec<String>,
    /// `usage.completion_tokens` when the answer carried it (for diagnosis only: the
    /// checker recounts `texts` itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_completion_tokens: Option<u64>,
    /// Why it did not complete: the error code of a refusal (`insufficient_quota`,
    /// `server_busy`), or what went wrong on the wire (`connect`, `timeout`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LedgerEntry {
    /// A 2xx status: Tollgate forwarded the request and answered.
    pub fn answered(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Appends ledger lines to a file, buffered; [`LedgerWriter::finish`] flushes.
pub struct LedgerWriter {
    out: BufWriter<File>,
}

impl LedgerWriter {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file =
            File::create(path).with_context(|| format!("creating ledger {}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(file),
        })
    }

    pub fn append(&mut self, entry: &LedgerEntry) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, entry).context("writing a ledger line")?;
        self.out.write_all(b"\n").context("writing a ledger line")
    }

    pub fn finish(mut self) -> anyhow::Result<()> {
        self.out.flush().context("flushing the ledger")
    }
}

/// Reads a whole ledger; a line that is not a ledger entry is an error naming it.
pub fn read_ledger(path: &Path) -> anyhow::Result<Vec<LedgerEntry>> {
    let file = File::open(path).with_context(|| format!("opening ledger {}", path.display()))?;
    let mut entries = Vec::new();
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading ledger {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", path.display(), number + 1))?;
        entries.push(entry);
    }
    Ok(entries)
}

/// Counts of a ledger by kind and end, and of refusals by status and code: what a
/// soak prints when it finishes and the checker prints before its checks.
#[derive(Debug, Default)]
pub struct LedgerSummary {
    total: u64,
    by_end: BTreeMap<End, u64>,
    by_kind: BTreeMap<RequestKind, BTreeMap<End, u64>>,
    refusals: BTreeMap<(u16, String), u64>,
}

impl LedgerSummary {
    pub fn add(&mut self, entry: &LedgerEntry) {
        self.total += 1;
        *self.by_end.entry(entry.end).or_default() += 1;
        *self
            .by_kind
            .entry(entry.kind)
            .or_default()
            .entry(entry.end)
            .or_default() += 1;
        if entry.end == End::Refused {
            let code = entry.error.clone().unwrap_or_default();
            *self.refusals.entry((entry.status, code)).or_default() += 1;
        }
    }

    pub fn of(entries: &[LedgerEntry]) -> Self {
        let mut summary = Self::default();
        entries.iter().for_each(|e| summary.add(e));
        summary
    }
}

fn counts_by_end(counts: &BTreeMap<End, u64>) -> String {
    End::ALL
        .iter()
        .filter_map(|end| counts.get(end).map(|n| format!("{end} {n}")))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for LedgerSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} requests: {}",
            self.total,
            counts_by_end(&self.by_end)
        )?;
        for (kind, counts) in &self.by_kind {
            writeln!(f, "  {kind:<17}{}", counts_by_end(counts))?;
        }
        if !self.refusals.is_empty() {
            let refusals: Vec<String> = self
                .refusals
                .iter()
                .map(|((status, code), n)| {
                    if code.is_empty() {
                        format!("{status} {n}")
                    } else {
                        format!("{status} {code} {n}")
                    }
                })
                .collect();
            writeln!(f, "  refused: {}", refusals.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(end: End, status: u16) -> LedgerEntry {
        LedgerEntry {
            request_id: "r-1".into(),
            kind: RequestKind::ChatStream,
            account: "acme".into(),
            tier: "pro".into(),
            sent_at_ms: 1,
            elapsed_ms: 2,
            status,
            end,
            bytes: 3,
            texts: vec!["hello there".into()],
            reported_completion_tokens: Some(2),
            error: None,
        }
    }

    #[test]
    fn lines_round_trip_through_a_file() {
        let path = std::env::temp_dir().join(format!("ledger-{}.jsonl", std::process::id()));
        let mut writer = LedgerWriter::create(&path).unwrap();
        let first = entry(End::Complete, 200);
        let mut second = entry(End::Refused, 429);
        second.error = Some("insufficient_quota".into());
        second.texts.clear();
        second.reported_completion_tokens = None;
        writer.append(&first).unwrap();
        writer.append(&second).unwrap();
        writer.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains(r#""end":"complete""#), "{text}");
        assert!(text.contains(r#""kind":"chat_stream""#), "{text}");
        assert_eq!(read_ledger(&path).unwrap(), vec![first, second]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_bad_line_is_named() {
        let path = std::env::temp_dir().join(format!("ledger-bad-{}.jsonl", std::process::id()));
        std::fs::write(&path, "{\"request_id\":\"x\"}\n").unwrap();
        let err = read_ledger(&path).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn summary_counts_ends_kinds_and_refusals() {
        let mut refused = entry(End::Refused, 429);
        refused.error = Some("insufficient_quota".into());
        let summary = LedgerSummary::of(&[
            entry(End::Complete, 200),
            entry(End::Complete, 200),
            refused,
            entry(End::NoAnswer, 0),
        ]);
        let text = summary.to_string();
        assert!(
            text.starts_with("4 requests: complete 2, refused 1, no_answer 1\n"),
            "{text}"
        );
        assert!(text.contains("refused: 429 insufficient_quota 1"), "{text}");
    }
}
