//! Reads a backend's answer as it passes through the gateway and keeps what
//! metering needs: the backend-reported `usage`, the generated text (to count
//! tokens when no usage arrives), whether the answer completed and whether the
//! backend reported an error.
//!
//! [`ResponseCapture`] is fed every chunk from the proxy's synchronous
//! `response_body_filter`, so it does no I/O and never panics on any bytes.
//! It is built to be cheap per chunk: `EventSplitter` carries its state across
//! chunks, so finding where SSE events end looks at each byte once; each
//! complete event is then parsed once, in place when it lies inside one chunk;
//! only the start of an event cut by a chunk boundary is copied and held (at
//! most [`MAX_EVENT_BYTES`]).
//!
//! Two kinds of answer are understood, both in OpenAI's shapes, which vLLM,
//! TensorRT-LLM and SGLang follow:
//! - a `text/event-stream` of chat or completions chunks ending in
//!   `data: [DONE]`;
//! - a JSON body (chat completion, completion, embeddings), buffered up to a
//!   cap and parsed once at the end, by serde structs that name only the
//!   fields needed so that, for example, embedding vectors are skipped.
//!
//! When the gateway itself asked the backend for `stream_options.include_usage`
//! and the client did not, the usage-only event that this adds must not reach
//! the client. The capture can then strip that one event; every other byte
//! reaches the client unchanged and in order.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Largest single SSE event the capture will hold and parse. A chat chunk
/// carries one token's delta, a few hundred bytes, and a usage event about
/// 200; a megabyte is far beyond any real event yet bounds what one answer can
/// make the gateway hold.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Most generated text kept for token counting. About four million tokens of
/// English: beyond any model's output limit, so reaching it means a broken or
/// hostile backend, not a long answer.
pub const MAX_TEXT_BYTES: usize = 16 << 20;

/// Token counts the backend reported in its `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportedUsage {
    pub prompt_tokens: u64,
    /// 0 when the backend omitted it, as embeddings answers do.
    pub completion_tokens: u64,
    /// The backend's figure; prompt + completion when it omitted it.
    pub total_tokens: u64,
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
    max_buffered: usize,
    /// Stream: the start of an event a chunk boundary cut, kept until the
    /// event ends. While stripping, these bytes have not been sent yet.
    /// JSON: the body so far.
    held: Vec<u8>,
    splitter: EventSplitter,
    /// The last event ended in a CR that was the last byte of its chunk; an LF
    /// starting the next chunk completes that CRLF and belongs to that event
    /// (so is dropped with it if it was stripped).
    owed_lf: Option<OwedLf>,
    /// The current event outgrew [`MAX_EVENT_BYTES`]: its bytes pass through
    /// unparsed and unheld until it ends.
    skipping_event: bool,
    /// `data: [DONE]` arrived: later bytes pass through unparsed.
    stream_over: bool,
    finished: bool,
    /// Where the data lines of one event are joined when there are several.
    scratch: Vec<u8>,
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
    text: String,
    completed: bool,
    backend_error: bool,
    overflowed: bool,
    /// `text` reached [`MAX_TEXT_BYTES`]; later pieces are not added, so the
    /// text stays a prefix of the answer's.
    text_full: bool,
}

impl ResponseCapture {
    /// `streaming`: the answer is `text/event-stream`; otherwise it is read as
    /// one JSON body. `strip_usage_event`: the gateway added
    /// `stream_options.include_usage` and the client did not ask for it, so
    /// the usage-only event is removed from what the client receives (ignored
    /// for JSON answers, which are never altered). `max_buffered`: most bytes
    /// of a JSON answer kept for parsing; a longer answer reports no usage and
    /// sets [`overflowed`](Self::overflowed).
    pub fn new(streaming: bool, strip_usage_event: bool, max_buffered: usize) -> Self {
        Self {
            streaming,
            strip_usage_event: streaming && strip_usage_event,
            max_buffered,
            held: Vec::new(),
            splitter: EventSplitter::default(),
            owed_lf: None,
            skipping_event: false,
            stream_over: false,
            finished: false,
            scratch: Vec::new(),
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
            self.buffer_json(chunk);
            return None;
        }
        if self.stream_over {
            return None;
        }
        self.feed_stream(chunk)
    }

    /// The body ended. For a JSON answer, parses it now. Returns bytes still
    /// held back that the client must get after the last chunk's, if any:
    /// only while stripping, when the stream ended inside an event.
    ///
    /// An event the stream ended inside is not parsed: an SSE client discards
    /// it too. Calling `finish` again does nothing.
    pub fn finish(&mut self) -> Option<Bytes> {
        if std::mem::replace(&mut self.finished, true) {
            return None;
        }
        let held = std::mem::take(&mut self.held);
        if !self.streaming {
            if !self.findings.overflowed {
                self.findings.take_json_body(&held);
            }
            return None;
        }
        (self.strip_usage_event && !held.is_empty()).then(|| Bytes::from(held))
    }

    /// The backend-reported usage. In a stream the last non-null `usage` wins:
    /// backends that report usage on every chunk report running totals.
    pub fn usage(&self) -> Option<ReportedUsage> {
        self.findings.usage
    }

    /// The generated text of all choices, in the order it arrived: content,
    /// reasoning, refusals, tool-call names and arguments, completions text.
    /// With several choices streamed at once their pieces interleave.
    pub fn completion_text(&self) -> &str {
        &self.findings.text
    }

    /// Stream: a `finish_reason` or `data: [DONE]` arrived. JSON: the body
    /// parsed (an error body too; see [`backend_error`](Self::backend_error)).
    pub fn completed(&self) -> bool {
        self.findings.completed
    }

    /// The backend sent an error object: an `{"error": ...}` event in a
    /// stream, or as the JSON body (also vLLM's older `{"object": "error"}`).
    pub fn backend_error(&self) -> bool {
        self.findings.backend_error
    }

    /// Part of the answer was passed through without being read: a JSON body
    /// over `max_buffered`, an SSE event over [`MAX_EVENT_BYTES`], or text
    /// beyond [`MAX_TEXT_BYTES`]. Usage and text may then be missing or short.
    pub fn overflowed(&self) -> bool {
        self.findings.overflowed
    }

    fn buffer_json(&mut self, chunk: &[u8]) {
        if self.findings.overflowed {
            return;
        }
        if self.held.len().saturating_add(chunk.len()) > self.max_buffered {
            tracing::debug!(
                max_buffered = self.max_buffered,
                "JSON answer too large to read for usage"
            );
            self.findings.overflowed = true;
            self.held = Vec::new();
            return;
        }
        self.held.extend_from_slice(chunk);
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
                self.findings.take_event(part, &mut self.scratch)
            } else {
                self.held.extend_from_slice(part);
                self.findings.take_event(&self.held, &mut self.scratch)
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
        if !self.findings.overflowed {
            tracing::debug!(
                max_event_bytes = MAX_EVENT_BYTES,
                "SSE event too large to read for usage"
            );
        }
        self.findings.overflowed = true;
    }
}

/// Finds where SSE events end: at a blank line, with lines ending in LF, CRLF
/// or a lone CR as the event-stream format allows. Its state carries across
/// chunks, so every byte is looked at once.
#[derive(Debug, Default)]
struct EventSplitter {
    /// The current line has bytes, so the next line end is not a blank line.
    in_line: bool,
    /// The last byte seen was a CR ending a line; an LF next completes a CRLF.
    after_cr: bool,
}

impl EventSplitter {
    /// Length of the prefix of `bytes` that completes the current event,
    /// including the blank line's line end, or `None` when `bytes` does not
    /// complete it. After a CR that ends `bytes`, `after_cr` is left set.
    fn next_event_len(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut at = 0;
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes.first() == Some(&b'\n') {
                at = 1;
            }
        }
        loop {
            let rest = bytes.get(at..)?;
            let Some(offset) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.in_line |= !rest.is_empty();
                return None;
            };
            let blank = !self.in_line && offset == 0;
            self.in_line = false;
            let line_end = at + offset;
            at = line_end + 1;
            if bytes.get(line_end) == Some(&b'\r') {
                match bytes.get(at) {
                    Some(b'\n') => at += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if blank {
                return Some(at);
            }
        }
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
    fn take_event(&mut self, event: &[u8], scratch: &mut Vec<u8>) -> EventKind {
        let Some(data) = event_data(event, scratch) else {
            return EventKind::Other;
        };
        if data.trim_ascii() == b"[DONE]" {
            self.completed = true;
            return EventKind::Done;
        }
        // Not JSON, or not shaped like a chunk: nothing to meter in it.
        let Ok(chunk) = serde_json::from_slice::<Answer<'_>>(data) else {
            return EventKind::Other;
        };
        let has_choices = chunk.choices.as_ref().is_some_and(|c| !c.is_empty());
        let has_usage = chunk.usage.is_some();
        for choice in chunk.choices.iter().flatten() {
            if choice.finish_reason.is_some() {
                self.completed = true;
            }
        }
        self.take_answer(chunk);
        if has_usage && !has_choices {
            EventKind::UsageOnly
        } else {
            EventKind::Other
        }
    }

    fn take_json_body(&mut self, body: &[u8]) {
        // An answer that is not JSON, or not shaped like one, leaves `completed` false.
        if let Ok(answer) = serde_json::from_slice::<Answer<'_>>(body) {
            self.completed = true;
            self.take_answer(answer);
        }
    }

    fn take_answer(&mut self, answer: Answer<'_>) {
        if answer.error.is_some() || answer.object.as_str() == Some("error") {
            self.backend_error = true;
        }
        if let Some(usage) = answer.usage {
            self.usage = Some(usage.into());
        }
        for choice in answer.choices.into_iter().flatten() {
            self.push_text(&choice.text);
            for message in [choice.delta, choice.message].into_iter().flatten() {
                self.push_message(message);
            }
        }
    }

    fn push_message(&mut self, message: Message<'_>) {
        // vLLM renamed `reasoning_content` to `reasoning` and some versions send
        // both with the same text: count it once.
        let reasoning = if message.reasoning_content.is_empty() {
            &message.reasoning
        } else {
            &message.reasoning_content
        };
        self.push_text(reasoning);
        self.push_text(&message.content);
        self.push_text(&message.refusal);
        let calls = message.tool_calls.into_iter().flatten();
        for function in calls
            .filter_map(|c| c.function)
            .chain(message.function_call)
        {
            self.push_text(&function.name);
            self.push_text(&function.arguments);
        }
    }

    fn push_text(&mut self, text: &Text<'_>) {
        let Some(text) = text.as_str() else { return };
        if self.text_full {
            return;
        }
        if self.text.len() + text.len() > MAX_TEXT_BYTES {
            self.text_full = true;
            self.overflowed = true;
            return;
        }
        self.text.push_str(text);
    }
}

/// The `data` of an SSE event: its `data` field values joined with LF, as the
/// event-stream format says, borrowed from `event` when there is one line.
/// `None` when the event has no `data` field (a comment, a keep-alive).
fn event_data<'a>(event: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    let mut first: Option<&'a [u8]> = None;
    let mut joined = false;
    let lines = event.split(|&b| b == b'\n' || b == b'\r');
    for line in lines.filter(|l| !l.is_empty() && l.first() != Some(&b':')) {
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = line.get(colon + 1..).unwrap_or_default();
                let value = value.strip_prefix(b" ").unwrap_or(value);
                (line.get(..colon).unwrap_or_default(), value)
            }
            None => (line, &b""[..]),
        };
        if field != b"data" {
            continue;
        }
        match first {
            None => first = Some(value),
            Some(first_value) => {
                if !joined {
                    scratch.clear();
                    scratch.extend_from_slice(first_value);
                    joined = true;
                }
                scratch.push(b'\n');
                scratch.extend_from_slice(value);
            }
        }
    }
    if joined { Some(scratch) } else { first }
}

/// A stream chunk or a whole JSON answer; only the fields metering reads.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default, borrow)]
    object: Text<'a>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    /// Chat stream chunks.
    #[serde(default, borrow)]
    delta: Option<Message<'a>>,
    /// Whole chat answers.
    #[serde(default, borrow)]
    message: Option<Message<'a>>,
    /// Completions, streamed or whole.
    #[serde(default, borrow)]
    text: Text<'a>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    content: Text<'a>,
    #[serde(default, borrow)]
    reasoning_content: Text<'a>,
    #[serde(default, borrow)]
    reasoning: Text<'a>,
    #[serde(default, borrow)]
    refusal: Text<'a>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
    /// The deprecated single function call.
    #[serde(default, borrow)]
    function_call: Option<FunctionCall<'a>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<FunctionCall<'a>>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(default, borrow)]
    name: Text<'a>,
    #[serde(default, borrow)]
    arguments: Text<'a>,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl From<WireUsage> for ReportedUsage {
    fn from(usage: WireUsage) -> Self {
        let prompt_tokens = usage.prompt_tokens.unwrap_or(0);
        let completion_tokens = usage.completion_tokens.unwrap_or(0);
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: usage
                .total_tokens
                .unwrap_or(prompt_tokens.saturating_add(completion_tokens)),
        }
    }
}

/// A JSON value read as text when it is a string and ignored otherwise, so an
/// unexpected shape (say, `content` as an array of parts) costs that text, not
/// the whole chunk and its usage. Borrows from the input unless it has escapes.
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

impl Text<'_> {
    fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }

    fn is_empty(&self) -> bool {
        self.as_str().is_none_or(str::is_empty)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Borrowed(v))))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(v.to_owned()))))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(v))))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Text(None))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
        let mut capture = ResponseCapture::new(streaming, strip, 1 << 20);
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
            text: capture.completion_text().to_owned(),
            completed: capture.completed(),
            backend_error: capture.backend_error(),
            overflowed: capture.overflowed(),
        }
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
        let mut capture = ResponseCapture::new(true, true, 0);
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
        let mut capture = ResponseCapture::new(true, true, 0);
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
            let mut capture = ResponseCapture::new(true, true, 0);
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
            assert_eq!(
                capture.completion_text(),
                "",
                "the oversize event is not read"
            );
            // Events after it are read again.
            assert_eq!(capture.usage(), Some(CHAT_USAGE));
            assert!(capture.completed());
        }
    }

    #[test]
    fn invalid_json_and_invalid_utf8_events_are_skipped() {
        let mut stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n".to_vec();
        stream
            .extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n");
        stream.extend_from_slice(b"data: {\"choices\":[\n\n");
        stream.extend_from_slice(b"data: not json at all\n\n");
        stream.extend_from_slice(USAGE_EVENT.as_bytes());
        stream.extend_from_slice(b"data: [DONE]\n\n");
        let outcome = run(true, false, [&stream[..]]);
        assert_eq!(outcome.text, "a");
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
        assert_eq!(outcome.text, "hmm Hi theref{}");
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
        let mut capture = ResponseCapture::new(false, false, 8 << 20);
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
        assert_eq!(capture.completion_text(), "");
        assert!(capture.completed());
        assert!(capture.held.capacity() == 0, "the body is freed once read");
    }

    #[test]
    fn json_over_max_buffered_reports_no_usage() {
        let body = r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let mut capture = ResponseCapture::new(false, false, body.len() - 1);
        for piece in body.as_bytes().chunks(10) {
            assert_eq!(capture.feed(piece), None);
        }
        assert_eq!(capture.finish(), None);
        assert!(capture.overflowed());
        assert_eq!(capture.usage(), None);
        assert!(!capture.completed());
        assert!(capture.held.capacity() == 0);

        // Exactly at the cap is still read.
        let outcome = {
            let mut capture = ResponseCapture::new(false, false, body.len());
            capture.feed(body.as_bytes());
            capture.finish();
            capture.usage()
        };
        assert_eq!(outcome.map(|u| u.total_tokens), Some(2));
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
        let mut findings = Findings::default();
        let big = "x".repeat(MAX_TEXT_BYTES - 1);
        findings.push_text(&Text(Some(Cow::Borrowed(&big))));
        findings.push_text(&Text(Some(Cow::Borrowed("yy"))));
        findings.push_text(&Text(Some(Cow::Borrowed("z"))));
        assert_eq!(findings.text.len(), MAX_TEXT_BYTES - 1);
        assert!(findings.overflowed);
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
        let mut capture = ResponseCapture::new(true, true, 0);
        assert_eq!(capture.feed(b"data: {\"cho").map(|b| b.len()), Some(0));
        assert_eq!(capture.finish().as_deref(), Some(&b"data: {\"cho"[..]));
        assert_eq!(capture.finish(), None);
        assert_eq!(capture.feed(USAGE_EVENT.as_bytes()), None);
        assert_eq!(capture.usage(), None);
    }
}
