//! Reads a backend's answer as it passes through the gateway and keeps what
//! metering needs: the backend-reported `usage`, the generated text of each
//! choice (to count tokens when no usage arrives, or when the answer is cut
//! short), whether the answer completed and whether the backend reported an
//! error.
//!
//! [`ResponseCapture`] is fed every chunk from the proxy's synchronous
//! `response_body_filter`, so it does no I/O and never panics on any bytes.
//! Two kinds of answer are understood, both in OpenAI's shapes, which vLLM,
//! TensorRT-LLM and SGLang follow:
//! - a `text/event-stream` of chat or completions chunks ending in
//!   `data: [DONE]`: [`sse`] finds where each event ends, looking at each
//!   byte once; each complete event is read once, in place when it lies
//!   inside one chunk; only the start of an event cut by a chunk boundary is
//!   copied and held (at most [`MAX_EVENT_BYTES`]);
//! - a JSON body (chat completion, completion, embeddings, images), read as it
//!   passes by [`json`]'s incremental reader, which keeps only the fields
//!   metering needs: an answer of any size is read in constant memory, its
//!   top-level `usage` is found wherever it sits, and a body cut short still
//!   yields the text that was delivered.
//!
//! When the gateway itself asked the backend for `stream_options.include_usage`
//! and the client did not, the usage-only event that this adds must not reach
//! the client. The capture can then strip that one event; every other byte
//! reaches the client unchanged and in order.

mod json;

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;

use self::json::AnswerScanner;
use crate::sse::{EventSplitter, event_data};

/// Largest single SSE event the capture will hold and read. A chat chunk
/// carries one token's delta, a few hundred bytes, and a usage event about
/// 200; a megabyte is far beyond any real event yet bounds what one answer can
/// make the gateway hold.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Most generated text kept for token counting. About four million tokens of
/// English: beyond any model's output limit, so reaching it means a broken or
/// hostile backend, not a long answer.
pub const MAX_TEXT_BYTES: usize = 16 << 20;

/// Most choices whose text is kept apart. OpenAI allows `n` up to 128 and
/// vLLM a few thousand prompts per request; text of choices beyond this is
/// kept together in one last bucket, so it is still counted.
const MAX_CHOICES: usize = 4096;

/// Token counts the backend reported in its `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportedUsage {
    pub prompt_tokens: u64,
    /// 0 when the backend omitted it, as embeddings answers do.
    pub completion_tokens: u64,
    /// The backend's figure; prompt + completion when it omitted it.
    pub total_tokens: u64,
}

/// The generated text of an answer, by choice: content, reasoning, refusals,
/// tool-call names and arguments, completions text, each choice's pieces in
/// the order they arrived. Counted per choice, since tokens never span two.
#[derive(Debug, Default)]
pub struct Texts {
    by_choice: BTreeMap<u32, Vec<u8>>,
    bytes: usize,
    /// [`MAX_TEXT_BYTES`] was reached: later pieces were not kept, so each
    /// choice's text stays a prefix of what it generated.
    full: bool,
}

impl Texts {
    fn push(&mut self, choice: u32, bytes: &[u8]) {
        if self.full || bytes.is_empty() {
            return;
        }
        let room = MAX_TEXT_BYTES - self.bytes;
        let bytes = if bytes.len() > room {
            // A character cut here is replaced when the text is read.
            self.full = true;
            bytes.get(..room).unwrap_or_default()
        } else {
            bytes
        };
        let choice = if self.by_choice.len() >= MAX_CHOICES && !self.by_choice.contains_key(&choice)
        {
            u32::MAX
        } else {
            choice
        };
        self.by_choice
            .entry(choice)
            .or_default()
            .extend_from_slice(bytes);
        self.bytes += bytes.len();
    }

    /// Each choice's text, in choice order (invalid UTF-8 replaced).
    pub fn iter(&self) -> impl Iterator<Item = Cow<'_, str>> {
        self.by_choice.values().map(|t| String::from_utf8_lossy(t))
    }

    /// Bytes of text kept, over all choices.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

/// Per-request reader of a backend's answer; see the module docs.
///
/// Call [`feed`](Self::feed) with each body chunk in order, then
/// [`finish`](Self::finish) once at the end of the body (after feeding the
/// last chunk), then read the findings.
#[derive(Debug)]
pub struct ResponseCapture {
    streaming: bool,
    strip_usage_event: bool,
    /// The start of an event a chunk boundary cut, kept until the event ends.
    /// While stripping, these bytes have not been sent yet.
    held: Vec<u8>,
    splitter: EventSplitter,
    /// The last event ended in a CR that was the last byte of its chunk; an LF
    /// starting the next chunk completes that CRLF and belongs to that event
    /// (so is dropped with it if it was stripped).
    owed_lf: Option<OwedLf>,
    /// The current event outgrew [`MAX_EVENT_BYTES`]: its bytes pass through
    /// unread and unheld until it ends.
    skipping_event: bool,
    /// `data: [DONE]` arrived: later bytes pass through unread.
    stream_over: bool,
    finished: bool,
    /// Where the data lines of one event are joined when there are several.
    scratch: Vec<u8>,
    /// Reads the JSON body, or one event's data at a time.
    reader: AnswerScanner,
    findings: Findings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwedLf {
    Send,
    Drop,
}

/// What has been learnt from the answer so far.
#[derive(Debug, Default)]
struct Findings {
    usage: Option<ReportedUsage>,
    texts: Texts,
    completed: bool,
    backend_error: bool,
    /// An SSE event over [`MAX_EVENT_BYTES`] passed through unread.
    oversize_event: bool,
    /// Elements of a JSON answer's top-level `data` (images generated).
    data_items: u64,
}

impl ResponseCapture {
    /// `streaming`: the answer is `text/event-stream`; otherwise it is read as
    /// one JSON body. `strip_usage_event`: the gateway added
    /// `stream_options.include_usage` and the client did not ask for it, so
    /// the usage-only event is removed from what the client receives (ignored
    /// for JSON answers, which are never altered).
    pub fn new(streaming: bool, strip_usage_event: bool) -> Self {
        Self {
            streaming,
            strip_usage_event: streaming && strip_usage_event,
            held: Vec::new(),
            splitter: EventSplitter::default(),
            owed_lf: None,
            skipping_event: false,
            stream_over: false,
            finished: false,
            scratch: Vec::new(),
            reader: AnswerScanner::default(),
            findings: Findings::default(),
        }
    }

    /// Reads the next chunk of the answer and says what the client gets for it.
    ///
    /// `None`: send `chunk` unchanged. This is always the answer unless
    /// stripping, and while stripping it is the answer whenever the chunk
    /// holds only whole events and none is stripped (the common case, as
    /// backends write one event per chunk).
    ///
    /// `Some(bytes)`: send `bytes` instead. While stripping, only whole events
    /// are sent; the start of an event cut by the end of the chunk is held back
    /// and sent with the chunk that completes it (or by `finish`). An empty
    /// `Bytes` means "send nothing now".
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        if !self.streaming {
            self.reader.feed(chunk, &mut self.findings.texts);
            return None;
        }
        if self.stream_over {
            return None;
        }
        self.feed_stream(chunk)
    }

    /// The body ended, or was cut short. Returns bytes still held back that
    /// the client must get after the last chunk's, if any: only while
    /// stripping, when the stream ended inside an event.
    ///
    /// An event the stream ended inside is not read: an SSE client discards
    /// it too. A JSON body cut short keeps the text read so far. Calling
    /// `finish` again does nothing.
    pub fn finish(&mut self) -> Option<Bytes> {
        if std::mem::replace(&mut self.finished, true) {
            return None;
        }
        if !self.streaming {
            let facts = self.reader.finish(&mut self.findings.texts);
            self.findings.usage = facts.usage;
            self.findings.backend_error = facts.error;
            self.findings.completed = facts.complete;
            self.findings.data_items = facts.data_items;
            return None;
        }
        let held = std::mem::take(&mut self.held);
        (self.strip_usage_event && !held.is_empty()).then(|| Bytes::from(held))
    }

    /// The backend-reported usage. In a stream the last non-null `usage` wins:
    /// backends that report usage on every chunk report running totals.
    pub fn usage(&self) -> Option<ReportedUsage> {
        self.findings.usage
    }

    /// How many elements a JSON answer's top-level `data` array held: the
    /// images an images answer delivered (read without keeping them).
    pub fn data_items(&self) -> u64 {
        self.findings.data_items
    }

    /// The generated text, by choice.
    pub fn completion_texts(&self) -> &Texts {
        &self.findings.texts
    }

    /// Stream: a `finish_reason` or `data: [DONE]` arrived. JSON: the body
    /// was read to its end (an error body too; see
    /// [`backend_error`](Self::backend_error)).
    pub fn completed(&self) -> bool {
        self.findings.completed
    }

    /// The backend sent an error object: an `{"error": ...}` event in a
    /// stream, or as the JSON body (also vLLM's older `{"object": "error"}`).
    pub fn backend_error(&self) -> bool {
        self.findings.backend_error
    }

    /// Part of the answer was passed through without being read: an SSE
    /// event over [`MAX_EVENT_BYTES`], or text beyond [`MAX_TEXT_BYTES`].
    /// Usage and text may then be missing or short.
    pub fn overflowed(&self) -> bool {
        self.findings.oversize_event || self.findings.texts.full
    }

    fn feed_stream(&mut self, chunk: &[u8]) -> Option<Bytes> {
        if chunk.is_empty() {
            // Nothing to read, and an owed LF is still owed.
            return None;
        }
        let strip = self.strip_usage_event;
        // While stripping: bytes for the client, built only once they stop
        // being exactly `chunk`. `chunk[keep_from..event_start]` is to be sent
        // but not yet copied into `out`.
        let mut out = Vec::new();
        let mut diverged = strip && !self.held.is_empty();
        let mut keep_from = 0;
        let mut event_start = 0;

        if let Some(owed) = self.owed_lf.take()
            && chunk.first() == Some(&b'\n')
        {
            self.splitter.after_cr = false;
            event_start = 1;
            if strip && owed == OwedLf::Drop {
                keep_from = 1;
                diverged = true;
            }
        }

        while let Some(len) = self
            .splitter
            .next_event_len(chunk.get(event_start..).unwrap_or_default())
        {
            let end = event_start + len;
            let part = chunk.get(event_start..end).unwrap_or_default();
            let held_len = self.held.len();
            let kind = if std::mem::take(&mut self.skipping_event) {
                EventKind::Other
            } else if held_len + part.len() > MAX_EVENT_BYTES {
                self.note_oversize_event();
                EventKind::Other
            } else if held_len == 0 {
                self.findings
                    .take_event(part, &mut self.scratch, &mut self.reader)
            } else {
                self.held.extend_from_slice(part);
                self.findings
                    .take_event(&self.held, &mut self.scratch, &mut self.reader)
            };
            let stripped = strip && kind == EventKind::UsageOnly;
            if strip {
                if stripped {
                    // Send what came before the event; drop the event, held part and all.
                    out.extend_from_slice(chunk.get(keep_from..event_start).unwrap_or_default());
                    keep_from = end;
                    diverged = true;
                } else {
                    // Held bytes only exist before the first event of a chunk, so
                    // `out` is empty and they go first.
                    out.extend_from_slice(self.held.get(..held_len).unwrap_or_default());
                }
            }
            self.held.clear();
            if self.splitter.after_cr {
                self.owed_lf = Some(if stripped { OwedLf::Drop } else { OwedLf::Send });
            }
            event_start = end;
            if kind == EventKind::Done {
                self.stream_over = true;
                break;
            }
        }

        let tail = chunk.get(event_start..).unwrap_or_default();
        if self.stream_over || self.skipping_event || tail.is_empty() {
            // Nothing to hold: after [DONE] and inside an oversize event bytes pass through.
        } else if self.held.len() + tail.len() > MAX_EVENT_BYTES {
            self.note_oversize_event();
            self.skipping_event = true;
            if strip {
                // No event ended in this chunk, so `out` is empty and the held
                // start of this event goes first, followed by the whole chunk.
                out.extend_from_slice(&self.held);
            }
            // Give the megabyte back rather than keep it for the rest of the answer.
            self.held = Vec::new();
        } else {
            self.held.extend_from_slice(tail);
            if strip {
                out.extend_from_slice(chunk.get(keep_from..event_start).unwrap_or_default());
                keep_from = chunk.len();
                diverged = true;
            }
        }

        if !diverged {
            return None;
        }
        out.extend_from_slice(chunk.get(keep_from..).unwrap_or_default());
        Some(Bytes::from(out))
    }

    fn note_oversize_event(&mut self) {
        if !self.findings.oversize_event {
            tracing::debug!(
                max_event_bytes = MAX_EVENT_BYTES,
                "SSE event too large to read for usage"
            );
        }
        self.findings.oversize_event = true;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    /// `data: [DONE]`.
    Done,
    /// A chunk with no choices and a usage object: what include_usage adds.
    UsageOnly,
    Other,
}

impl Findings {
    /// Reads one complete SSE event (its raw bytes, blank line included).
    fn take_event(
        &mut self,
        event: &[u8],
        scratch: &mut Vec<u8>,
        reader: &mut AnswerScanner,
    ) -> EventKind {
        let Some(data) = event_data(event, scratch) else {
            return EventKind::Other;
        };
        if data.trim_ascii() == b"[DONE]" {
            self.completed = true;
            return EventKind::Done;
        }
        reader.reset();
        reader.feed(data, &mut self.texts);
        let facts = reader.finish(&mut self.texts);
        // Not JSON, or not shaped like a chunk: whatever was read before the
        // fault counts, and nothing in it is a usage report.
        self.completed |= facts.finish_reason;
        self.backend_error |= facts.error;
        if facts.usage.is_some() {
            self.usage = facts.usage;
        }
        // A Responses stream's `response.completed` carries usage and no
        // choices too, but it ends the stream: never a usage-only chunk.
        if facts.usage.is_some() && !facts.choices && facts.complete && !facts.finish_reason {
            EventKind::UsageOnly
        } else {
            EventKind::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The usage-only event include_usage adds (a macro so `concat!` can use it).
    macro_rules! usage_event {
        () => {
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\n"
        };
    }

    const USAGE_EVENT: &str = usage_event!();

    /// A chat stream shaped like vLLM's and OpenAI's with include_usage: a role
    /// chunk, a keep-alive comment, content with an escaped quote and a
    /// multi-byte character, an event with `event:`/`id:` fields and no space
    /// after `data:`, a finish chunk, the usage-only chunk, then [DONE].
    const CHAT_STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        ": keep-alive\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\\\"lo\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wörld\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "event: message\nid: 7\ndata:{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        usage_event!(),
        "data: [DONE]\n\n",
    );

    const CHAT_TEXT: &str = "Hel\"lo wörld!";

    const CHAT_USAGE: ReportedUsage = ReportedUsage {
        prompt_tokens: 9,
        completion_tokens: 4,
        total_tokens: 13,
    };

    /// Everything a capture found, for comparing runs.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Outcome {
        client: Vec<u8>,
        usage: Option<ReportedUsage>,
        text: String,
        completed: bool,
        backend_error: bool,
        overflowed: bool,
    }

    /// Feeds `pieces` as the proxy would and records what the client gets.
    fn run<'a>(
        streaming: bool,
        strip: bool,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> Outcome {
        let mut capture = ResponseCapture::new(streaming, strip);
        let mut client = Vec::new();
        for piece in pieces {
            match capture.feed(piece) {
                Some(out) => client.extend_from_slice(&out),
                None => client.extend_from_slice(piece),
            }
        }
        if let Some(rest) = capture.finish() {
            client.extend_from_slice(&rest);
        }
        Outcome {
            client,
            usage: capture.usage(),
            text: joined_text(&capture),
            completed: capture.completed(),
            backend_error: capture.backend_error(),
            overflowed: capture.overflowed(),
        }
    }

    fn joined_text(capture: &ResponseCapture) -> String {
        capture
            .completion_texts()
            .iter()
            .collect::<Vec<_>>()
            .concat()
    }

    fn run_whole(streaming: bool, strip: bool, body: &str) -> Outcome {
        run(streaming, strip, [body.as_bytes()])
    }

    fn expected_chat(client: String) -> Outcome {
        Outcome {
            client: client.into_bytes(),
            usage: Some(CHAT_USAGE),
            text: CHAT_TEXT.to_owned(),
            completed: true,
            backend_error: false,
            overflowed: false,
        }
    }

    /// Checks `stream` fed whole, byte by byte and split in two at every byte
    /// boundary, with and without stripping, against the whole-stream results.
    fn assert_split_invariant(stream: &str, stripped: &str, expected: &Outcome) {
        for strip in [false, true] {
            let mut expected = expected.clone();
            expected.client = if strip { stripped } else { stream }.as_bytes().to_vec();
            let bytes = stream.as_bytes();
            assert_eq!(run(true, strip, [bytes]), expected, "whole, strip={strip}");
            assert_eq!(
                run(true, strip, bytes.chunks(1)),
                expected,
                "byte by byte, strip={strip}"
            );
            for at in 0..=bytes.len() {
                let (a, b) = bytes.split_at(at);
                assert_eq!(
                    run(true, strip, [a, b]),
                    expected,
                    "split at {at}, strip={strip}"
                );
            }
        }
    }

    const RESPONSES_USAGE: ReportedUsage = ReportedUsage {
        prompt_tokens: 11,
        completion_tokens: 3,
        total_tokens: 14,
    };

    /// A Responses API answer: usage under its own names, text in its
    /// output items' content parts (not in `instructions` or `text`).
    #[test]
    fn a_responses_answer_reports_usage_and_output_text() {
        let answer = r#"{"id":"resp_1","object":"response","status":"completed","instructions":"be brief","text":{"format":{"type":"text"}},"output":[{"type":"reasoning","content":[{"type":"reasoning_text","text":"hm "}]},{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Hi there","annotations":[]}]},{"type":"function_call","name":"f","arguments":"{}"}],"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":14}}"#;
        let outcome = run_whole(false, false, answer);
        assert_eq!(outcome.usage, Some(RESPONSES_USAGE));
        assert_eq!(outcome.text, "hm Hi there{}");
        assert!(outcome.completed && !outcome.backend_error);
    }

    /// A Responses stream: text from its deltas (not again from the final
    /// response), usage from `response.completed`, which also completes it
    /// (there is no `[DONE]`); split anywhere.
    #[test]
    fn a_responses_stream_reports_usage_at_its_completed_event() {
        let stream = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"status\":\"in_progress\",\"output\":[]}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi \"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"there\"}\n\n",
            "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"text\":\"Hi there\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there\"}]}],\"usage\":{\"input_tokens\":11,\"output_tokens\":3,\"total_tokens\":14}}}\n\n",
        );
        let expected = Outcome {
            client: stream.as_bytes().to_vec(),
            usage: Some(RESPONSES_USAGE),
            text: "Hi there".to_owned(),
            completed: true,
            backend_error: false,
            overflowed: false,
        };
        assert_split_invariant(stream, stream, &expected);
        // Cut before its last event: not complete, text so far kept.
        let cut = &stream[..stream.find("event: response.completed").unwrap()];
        let outcome = run_whole(true, false, cut);
        assert!(!outcome.completed && outcome.usage.is_none());
        assert_eq!(outcome.text, "Hi there");
        // A failed response is the backend's error.
        let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"error\":{\"code\":\"server_error\"}}}\n\n";
        assert!(run_whole(true, false, failed).backend_error);
    }

    /// An images answer's images are counted wherever the cut falls, without
    /// keeping them; a `data` nested deeper is not the answer's.
    #[test]
    fn images_in_an_answer_are_counted_split_anywhere() {
        let answer = r#"{"created":1,"data":[{"b64_json":"iVBO\"[{]}"},{"url":"http://x/1.png","meta":{"data":[1,2]}},{"b64_json":""}],"usage":null}"#;
        let bytes = answer.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            let mut capture = ResponseCapture::new(false, false);
            capture.feed(a);
            capture.feed(b);
            capture.finish();
            assert_eq!(capture.data_items(), 3, "split at {at}");
            assert!(capture.completed());
        }
    }

    #[test]
    fn chat_stream_reports_usage_and_text() {
        let outcome = run_whole(true, false, CHAT_STREAM);
        assert_eq!(outcome, expected_chat(CHAT_STREAM.to_owned()));
    }

    #[test]
    fn chat_stream_split_anywhere_gives_same_results_and_client_bytes() {
        let stripped = CHAT_STREAM.replace(USAGE_EVENT, "");
        let expected = expected_chat(CHAT_STREAM.to_owned());
        assert_split_invariant(CHAT_STREAM, &stripped, &expected);
    }

    #[test]
    fn split_into_three_at_many_boundaries() {
        let bytes = CHAT_STREAM.as_bytes();
        let stripped = CHAT_STREAM.replace(USAGE_EVENT, "");
        for first in (0..bytes.len()).step_by(7) {
            for second in (first..bytes.len()).step_by(13) {
                let pieces = [&bytes[..first], &bytes[first..second], &bytes[second..]];
                assert_eq!(
                    run(true, true, pieces),
                    expected_chat(stripped.clone()),
                    "split at {first}, {second}"
                );
            }
        }
    }

    #[test]
    fn stripping_removes_exactly_the_usage_event_and_keeps_done() {
        let outcome = run_whole(true, true, CHAT_STREAM);
        let client = String::from_utf8(outcome.client.clone()).unwrap();
        assert_eq!(client, CHAT_STREAM.replace(USAGE_EVENT, ""));
        assert!(client.ends_with("data: [DONE]\n\n"));
        assert!(!client.contains("prompt_tokens"));
        // The usage is still metered.
        assert_eq!(outcome.usage, Some(CHAT_USAGE));
    }

    #[test]
    fn stripping_passes_event_aligned_chunks_without_copying() {
        let mut capture = ResponseCapture::new(true, true);
        for event in CHAT_STREAM.split_inclusive("\n\n") {
            let out = capture.feed(event.as_bytes());
            if event == USAGE_EVENT {
                assert_eq!(out, Some(Bytes::new()), "usage event is withheld");
            } else {
                assert_eq!(out, None, "{event:?} passes unchanged");
            }
        }
        assert_eq!(capture.finish(), None);
    }

    #[test]
    fn stripping_holds_a_cut_event_until_it_completes() {
        let mut capture = ResponseCapture::new(true, true);
        let first = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"cho";
        let out = capture.feed(first.as_bytes()).unwrap();
        assert_eq!(
            &out[..],
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
        );
        let out = capture.feed(b"ices\":[]").unwrap();
        assert!(out.is_empty(), "still inside the event: send nothing now");
        let out = capture.feed(b",\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n");
        assert_eq!(out.as_deref(), Some(&b"data: [DONE]\n\n"[..]));
        assert_eq!(capture.usage().map(|u| u.total_tokens), Some(1));
        assert_eq!(capture.finish(), None);
    }

    #[test]
    fn stripping_keeps_a_usage_event_that_also_has_choices() {
        // vLLM's continuous usage stats: usage on content chunks is not the
        // include_usage event and must reach the client.
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1,\"total_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(run_whole(true, true, stream).client, stream.as_bytes());
    }

    #[test]
    fn crlf_stream_split_anywhere() {
        let stream = CHAT_STREAM.replace('\n', "\r\n");
        let stripped = stream.replace(&USAGE_EVENT.replace('\n', "\r\n"), "");
        let expected = expected_chat(stream.clone());
        assert_split_invariant(&stream, &stripped, &expected);
    }

    #[test]
    fn empty_chunks_change_nothing() {
        let stream = CHAT_STREAM.replace('\n', "\r\n");
        let stripped = stream.replace(&USAGE_EVENT.replace('\n', "\r\n"), "");
        let bytes = stream.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(
                run(true, true, [a, b"", b]),
                expected_chat(stripped.clone()),
                "empty chunk at {at}"
            );
        }
    }

    #[test]
    fn lone_cr_stream_split_anywhere() {
        let stream = CHAT_STREAM.replace('\n', "\r");
        let stripped = stream.replace(&USAGE_EVENT.replace('\n', "\r"), "");
        let expected = expected_chat(stream.clone());
        assert_split_invariant(&stream, &stripped, &expected);
    }

    #[test]
    fn crlf_usage_event_cut_between_cr_and_lf_is_stripped_whole() {
        let stream = CHAT_STREAM.replace('\n', "\r\n");
        let usage = USAGE_EVENT.replace('\n', "\r\n");
        let cut = stream.find(&usage).unwrap() + usage.len() - 1;
        let (a, b) = stream.as_bytes().split_at(cut);
        assert_eq!(a.last(), Some(&b'\r'));
        let outcome = run(true, true, [a, b]);
        assert_eq!(outcome.client, stream.replace(&usage, "").into_bytes());
    }

    #[test]
    fn completions_stream() {
        let stream = concat!(
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"Once\",\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\" upon\",\"logprobs\":null,\"finish_reason\":\"length\"}],\"usage\":null}\n\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n",
            "data: [DONE]\n\n",
        );
        let outcome = run_whole(true, false, stream);
        assert_eq!(outcome.text, "Once upon");
        assert_eq!(
            outcome.usage,
            Some(ReportedUsage {
                prompt_tokens: 3,
                completion_tokens: 2,
                total_tokens: 5
            })
        );
        assert!(outcome.completed);
    }

    #[test]
    fn stream_without_usage_assembles_text_and_completes() {
        let stream = CHAT_STREAM.replace(USAGE_EVENT, "");
        let outcome = run_whole(true, false, &stream);
        assert_eq!(outcome.usage, None);
        assert_eq!(outcome.text, CHAT_TEXT);
        assert!(outcome.completed);
    }

    #[test]
    fn done_alone_completes_a_stream() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
        assert!(run_whole(true, false, stream).completed);
    }

    #[test]
    fn stream_cut_mid_event_is_not_completed_and_keeps_text_so_far() {
        let cut_at = CHAT_STREAM.find(" wörld").unwrap();
        let cut = &CHAT_STREAM[..cut_at];
        for strip in [false, true] {
            let outcome = run_whole(true, strip, cut);
            assert!(!outcome.completed);
            assert_eq!(outcome.text, "Hel\"lo");
            assert_eq!(outcome.usage, None);
            // While stripping, the held start of the cut event still reaches the client.
            assert_eq!(outcome.client, cut.as_bytes(), "strip={strip}");
        }
    }

    #[test]
    fn event_without_closing_blank_line_is_not_read() {
        // As an SSE client would, the capture discards an event the body ended inside.
        let outcome = run_whole(
            true,
            false,
            "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n",
        );
        assert_eq!(outcome.text, "");
        assert!(!outcome.completed);
    }

    #[test]
    fn error_event_mid_stream() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\n",
            "data: {\"error\":{\"object\":\"error\",\"message\":\"overloaded\",\"type\":\"InternalServerError\",\"code\":500}}\n\n",
            "data: [DONE]\n\n",
        );
        let outcome = run_whole(true, false, stream);
        assert!(outcome.backend_error);
        assert_eq!(outcome.text, "par");
        assert_eq!(outcome.usage, None);
    }

    #[test]
    fn null_error_is_not_a_backend_error() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"error\":null}\n\n";
        assert!(!run_whole(true, false, stream).backend_error);
    }

    #[test]
    fn last_non_null_usage_wins() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"c\"},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
            "data: [DONE]\n\n",
        );
        let outcome = run_whole(true, false, stream);
        assert_eq!(
            outcome.usage,
            Some(ReportedUsage {
                prompt_tokens: 5,
                completion_tokens: 2,
                total_tokens: 7
            })
        );
        assert_eq!(outcome.text, "abc");
    }

    #[test]
    fn reasoning_tool_calls_and_refusal_are_text() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"think\",\"reasoning\":\"think\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning\":\" more\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"t\",\"type\":\"function\",\"function\":{\"name\":\"get\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"refusal\":\"no\",\"content\":[{\"type\":\"text\"}]}}]}\n\n",
            "data: [DONE]\n\n",
        );
        // Reasoning sent under both names counts once; content that is not a
        // string is skipped without losing the rest of the chunk.
        assert_eq!(
            run_whole(true, false, stream).text,
            "think moreget{\"a\":1}no"
        );
    }

    #[test]
    fn multi_line_data_is_joined() {
        let stream =
            "data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
        let outcome = run_whole(true, false, stream);
        assert_eq!(outcome.text, "x");
        assert!(outcome.completed);
    }

    #[test]
    fn bytes_after_done_pass_through_unread() {
        let stream =
            format!("{CHAT_STREAM}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1}}}}\n\n");
        for strip in [false, true] {
            let outcome = run_whole(true, strip, &stream);
            assert_eq!(outcome.usage, Some(CHAT_USAGE));
            let expected = if strip {
                stream.replacen(USAGE_EVENT, "", 1)
            } else {
                stream.clone()
            };
            assert_eq!(outcome.client, expected.into_bytes());
        }
    }

    #[test]
    fn oversize_event_is_skipped_and_passed_through_bounded() {
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(MAX_EVENT_BYTES + 10)
        );
        let stream = format!("{big}{USAGE_EVENT}data: [DONE]\n\n");
        let expected_client = format!("{big}data: [DONE]\n\n");
        for piece_len in [4096, 1 << 19, stream.len()] {
            let mut capture = ResponseCapture::new(true, true);
            let mut client = Vec::new();
            for piece in stream.as_bytes().chunks(piece_len) {
                match capture.feed(piece) {
                    Some(out) => client.extend_from_slice(&out),
                    None => client.extend_from_slice(piece),
                }
                assert!(capture.held.len() <= MAX_EVENT_BYTES);
            }
            assert!(capture.finish().is_none());
            assert_eq!(client, expected_client.as_bytes(), "pieces of {piece_len}");
            assert!(capture.overflowed());
            assert!(
                capture.completion_texts().is_empty(),
                "the oversize event is not read"
            );
            // Events after it are read again.
            assert_eq!(capture.usage(), Some(CHAT_USAGE));
            assert!(capture.completed());
        }
    }

    #[test]
    fn invalid_json_is_read_up_to_its_fault_and_invalid_utf8_is_replaced() {
        let mut stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n".to_vec();
        stream
            .extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n");
        stream.extend_from_slice(b"data: {\"choices\":[\n\n");
        stream.extend_from_slice(b"data: not json at all\n\n");
        stream.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}] oops\n\n");
        stream.extend_from_slice(USAGE_EVENT.as_bytes());
        stream.extend_from_slice(b"data: [DONE]\n\n");
        let outcome = run(true, false, [&stream[..]]);
        // The bytes were delivered: they count, invalid UTF-8 as U+FFFD.
        assert_eq!(outcome.text, "a\u{fffd}\u{fffd}b");
        assert_eq!(outcome.usage, Some(CHAT_USAGE));
        assert!(outcome.completed);
    }

    /// Deterministic pseudo-random bytes (a linear congruential generator),
    /// biased towards the bytes the parser cares about.
    fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
        const ALPHABET: &[u8] = b"\n\r:data {}[]\",choices usage DONE\xff\xc3\x00";
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let r = (seed >> 33) as usize;
                if r.is_multiple_of(4) {
                    (r >> 8) as u8
                } else {
                    ALPHABET[(r >> 8) % ALPHABET.len()]
                }
            })
            .collect()
    }

    #[test]
    fn garbage_never_panics_and_reaches_the_client_unchanged() {
        for seed in 0..50 {
            let bytes = garbage(2000, seed);
            for piece_len in [1, 3, 64, 2000] {
                for strip in [false, true] {
                    let outcome = run(true, strip, bytes.chunks(piece_len));
                    assert_eq!(outcome.client, bytes, "seed {seed}, pieces {piece_len}");
                }
                run(false, false, bytes.chunks(piece_len));
            }
        }
    }

    #[test]
    fn json_chat_answer() {
        let body = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there","reasoning_content":"hmm ","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12,"prompt_tokens_details":null}}"#;
        let outcome = run_whole(false, true, body);
        assert_eq!(
            outcome.client,
            body.as_bytes(),
            "JSON answers are never altered"
        );
        assert_eq!(
            outcome.usage,
            Some(ReportedUsage {
                prompt_tokens: 5,
                completion_tokens: 7,
                total_tokens: 12
            })
        );
        // In the order the fields arrive.
        assert_eq!(outcome.text, "Hi therehmm f{}");
        assert!(outcome.completed);
        assert!(!outcome.backend_error);
    }

    #[test]
    fn json_completions_answer() {
        let body = r#"{"id":"cmpl","object":"text_completion","choices":[{"index":0,"text":"one","logprobs":null,"finish_reason":"length"},{"index":1,"text":" two","finish_reason":"length"}],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}"#;
        let outcome = run(false, false, body.as_bytes().chunks(5));
        assert_eq!(outcome.text, "one two");
        assert_eq!(outcome.usage.map(|u| u.total_tokens), Some(4));
        assert!(outcome.completed);
    }

    #[test]
    fn json_embeddings_answer_with_large_vectors() {
        let vector = vec!["-0.0123456789"; 200_000].join(",");
        let body = format!(
            r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[{vector}]}}],"model":"e5","usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#
        );
        let mut capture = ResponseCapture::new(false, false);
        for piece in body.as_bytes().chunks(16 * 1024) {
            assert_eq!(capture.feed(piece), None);
        }
        assert_eq!(capture.finish(), None);
        assert_eq!(
            capture.usage(),
            Some(ReportedUsage {
                prompt_tokens: 8,
                completion_tokens: 0,
                total_tokens: 8
            })
        );
        assert!(capture.completion_texts().is_empty());
        assert!(capture.completed());
        assert!(capture.held.capacity() == 0, "nothing of the body is held");
    }

    /// A JSON answer of any size is read as it passes: its usage is found
    /// after 100 MiB of content, and nothing of the body is held.
    #[test]
    fn an_oversized_json_answer_is_billed_from_its_usage() {
        let content = "word ".repeat(20 << 20);
        let body = format!(
            r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"length"}}],"usage":{{"prompt_tokens":5,"completion_tokens":20971520,"total_tokens":20971525}}}}"#
        );
        assert!(body.len() > 100 << 20);
        let mut capture = ResponseCapture::new(false, false);
        for piece in body.as_bytes().chunks(64 * 1024) {
            assert_eq!(capture.feed(piece), None, "JSON answers are never altered");
        }
        assert_eq!(capture.finish(), None);
        assert_eq!(
            capture.usage(),
            Some(ReportedUsage {
                prompt_tokens: 5,
                completion_tokens: 20_971_520,
                total_tokens: 20_971_525
            })
        );
        assert!(capture.completed());
        assert!(capture.held.capacity() == 0);
        // Text beyond the cap is not kept (the usage is what is billed).
        assert_eq!(capture.completion_texts().len(), MAX_TEXT_BYTES);
        assert!(capture.overflowed());
    }

    /// Without a usage report, the text of a huge answer is there to count.
    #[test]
    fn an_oversized_json_answer_without_usage_keeps_its_text_to_count() {
        let content = "x".repeat(3 << 20);
        let body = format!(r#"{{"choices":[{{"index":0,"text":"{content}"}}]}}"#);
        let outcome = run(false, false, body.as_bytes().chunks(4096));
        assert_eq!(outcome.usage, None);
        assert_eq!(outcome.text, content);
        assert!(outcome.completed);
    }

    /// A JSON answer cut short after bytes reached the client keeps the text
    /// delivered, so it is billed for it rather than as zero.
    #[test]
    fn a_json_answer_cut_short_keeps_the_text_delivered() {
        let body = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hel\"lo wörld and more"}}],"usage":{"prompt_tokens":1}}"#;
        let cut = body.find(" and").unwrap();
        let outcome = run_whole(false, false, &body[..cut]);
        assert!(!outcome.completed);
        assert_eq!(outcome.usage, None);
        assert_eq!(outcome.text, "Hel\"lo wörld");
    }

    /// Escapes, surrogate pairs, brackets inside strings and skipped nested
    /// values, with the body split at every byte: the same findings.
    #[test]
    fn json_answer_split_anywhere_reads_the_same() {
        let body = r#"{"id":"c","choices":[{"index":0,"message":{"content":"a\"b\\c\u00e9\ud83d\ude00 é","reasoning":"r"},"finish_reason":"stop"},{"index":1,"message":{"content":"second","tool_calls":[{"id":"t","function":{"name":"f","arguments":"{\"x\":[1,{\"y\":\"}\"}]}"}}]}}],"extra":{"deep":[[[{"content":"not text"}]]],"s":"]}\""},"usage":{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let whole = run_whole(false, false, body);
        let mut capture = ResponseCapture::new(false, false);
        capture.feed(body.as_bytes());
        capture.finish();
        let texts: Vec<_> = capture.completion_texts().iter().collect();
        assert_eq!(texts, ["a\"b\\cé😀 ér", "secondf{\"x\":[1,{\"y\":\"}\"}]}"]);
        assert_eq!(
            whole.usage,
            Some(ReportedUsage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7
            })
        );
        assert!(whole.completed);
        assert!(!whole.backend_error);
        let bytes = body.as_bytes();
        assert_eq!(run(false, false, bytes.chunks(1)), whole, "byte by byte");
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(run(false, false, [a, b]), whole, "split at {at}");
        }
    }

    #[test]
    fn interleaved_choices_keep_their_own_text() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":1,\"text\":\" two\",\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"one\",\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"text\":\" three\",\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[{\"text\":\" four\",\"index\":0}]}\n\n",
            "data: [DONE]\n\n",
        );
        let mut capture = ResponseCapture::new(true, false);
        capture.feed(stream.as_bytes());
        capture.finish();
        let texts: Vec<_> = capture.completion_texts().iter().collect();
        // An `index` after the text is too late: the text went to the
        // choice's position (0), which is where it belongs here too.
        assert_eq!(texts, ["one four", " two three"]);
    }

    #[test]
    fn reasoning_under_both_names_counts_once_and_alone_counts() {
        let both = r#"{"choices":[{"message":{"reasoning":"think","reasoning_content":"think","content":"ok"}}]}"#;
        assert_eq!(run_whole(false, false, both).text, "thinkok");
        let newer = r#"{"choices":[{"message":{"reasoning":"think","content":"ok"}}]}"#;
        assert_eq!(run_whole(false, false, newer).text, "okthink");
    }

    #[test]
    fn deeply_nested_skipped_values_cost_no_memory() {
        let depth = 1 << 20;
        let body = format!(
            r#"{{"junk":{}{},"choices":[{{"text":"x"}}],"usage":{{"prompt_tokens":1}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let outcome = run(false, false, body.as_bytes().chunks(999));
        assert_eq!(outcome.text, "x");
        assert_eq!(outcome.usage.map(|u| u.prompt_tokens), Some(1));
        assert!(outcome.completed);
    }

    #[test]
    fn json_error_bodies_are_backend_errors() {
        for body in [
            r#"{"error":{"message":"model not found","type":"invalid_request_error","code":404}}"#,
            r#"{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}"#,
        ] {
            let outcome = run_whole(false, false, body);
            assert!(outcome.backend_error, "{body}");
            assert_eq!(outcome.usage, None);
        }
    }

    #[test]
    fn json_that_is_not_an_answer_is_not_completed() {
        for body in ["", "not json", "[1,2]", "{\"choices\":", "\u{0}\u{1}"] {
            let outcome = run_whole(false, false, body);
            assert!(!outcome.completed, "{body:?}");
            assert_eq!(outcome.usage, None);
        }
    }

    #[test]
    fn text_stops_at_its_cap() {
        let mut texts = Texts::default();
        let big = "x".repeat(MAX_TEXT_BYTES - 1);
        texts.push(0, big.as_bytes());
        texts.push(1, b"yy");
        texts.push(0, b"z");
        assert_eq!(texts.len(), MAX_TEXT_BYTES);
        assert!(texts.iter().collect::<String>().ends_with("xy"));
        assert!(texts.full);
    }

    #[test]
    fn usage_without_total_is_summed() {
        let body = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(
            run_whole(false, false, body).usage.map(|u| u.total_tokens),
            Some(7)
        );
    }

    #[test]
    fn feed_after_finish_passes_through() {
        let mut capture = ResponseCapture::new(true, true);
        assert_eq!(capture.feed(b"data: {\"cho").map(|b| b.len()), Some(0));
        assert_eq!(capture.finish().as_deref(), Some(&b"data: {\"cho"[..]));
        assert_eq!(capture.finish(), None);
        assert_eq!(capture.feed(USAGE_EVENT.as_bytes()), None);
        assert_eq!(capture.usage(), None);
    }

    /// Arbitrary answers: no panic, no changed byte, the same findings however
    /// the bytes are cut into chunks.
    mod properties {
        use proptest::prelude::*;

        /// Pieces an answer is made of: JSON and SSE syntax, the fields metering
        /// reads, escapes and surrogates, and any byte at all.
        fn fragment() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::sample::select(vec![
                    "{",
                    "}",
                    "[",
                    "]",
                    ":",
                    ",",
                    "\"",
                    "\\",
                    " ",
                    "null",
                    "7",
                    "-1.5e3",
                    "true",
                    "\"choices\"",
                    "\"usage\"",
                    "\"message\"",
                    "\"delta\"",
                    "\"content\"",
                    "\"text\"",
                    "\"index\"",
                    "\"reasoning\"",
                    "\"reasoning_content\"",
                    "\"tool_calls\"",
                    "\"function\"",
                    "\"arguments\"",
                    "\"finish_reason\"",
                    "\"error\"",
                    "\"object\"",
                    "\"prompt_tokens\"",
                    "\"completion_tokens\"",
                    "{\"prompt_tokens\":3,\"completion_tokens\":4}",
                    "\\u00e9",
                    "\\ud83d\\ude00",
                    "\\ud800",
                    "\\n",
                    "data: ",
                    "data:",
                    "\n",
                    "\r\n",
                    "\r",
                    "\n\n",
                    "[DONE]",
                    ": comment\n",
                    "event: x\n",
                    "é",
                ])
                .prop_map(|s: &str| s.as_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 1..4),
            ]
        }

        fn answer() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(fragment(), 0..120).prop_map(|parts| parts.concat())
        }

        /// `bytes` cut at the given points (each taken modulo the length).
        fn cut(bytes: &[u8], points: &[prop::sample::Index]) -> Vec<Vec<u8>> {
            let mut at: Vec<usize> = points.iter().map(|p| p.index(bytes.len() + 1)).collect();
            at.push(0);
            at.push(bytes.len());
            at.sort_unstable();
            at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            #[test]
            fn any_answer_passes_unchanged_and_reads_the_same_however_cut(
                bytes in answer(),
                points in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
                streaming in any::<bool>(),
            ) {
                let whole = super::run(streaming, false, [&bytes[..]]);
                prop_assert_eq!(&whole.client, &bytes);
                let pieces = cut(&bytes, &points);
                let split = super::run(streaming, false, pieces.iter().map(Vec::as_slice));
                prop_assert_eq!(split, whole);
            }

            #[test]
            fn stripping_only_ever_removes_bytes_and_only_usage_events(
                bytes in answer(),
                points in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            ) {
                let pieces = cut(&bytes, &points);
                let out = super::run(true, true, pieces.iter().map(Vec::as_slice));
                // What the client gets is the answer with some spans left out.
                let mut rest = &bytes[..];
                for &byte in &out.client {
                    let at = rest.iter().position(|&b| b == byte);
                    prop_assert!(at.is_some(), "a byte that was not in the answer");
                    rest = &rest[at.unwrap() + 1..];
                }
                if !bytes.windows(5).any(|w| w == b"usage") {
                    prop_assert_eq!(&out.client, &bytes);
                }
            }
        }
    }
}
