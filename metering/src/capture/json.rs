//! An incremental reader of one OpenAI-shaped JSON answer: a whole chat,
//! completion, embeddings or Responses API body, or the `data` of one stream
//! event.
//!
//! It is fed bytes in any pieces and keeps only the path to the fields
//! metering reads (`choices[].message|delta`, their texts and tool calls, the
//! top-level `usage`, `error` and `object`; for the Responses API `output[]`
//! items' texts, a stream event's `type` and `delta`, and the `usage` of the
//! `response` it carries); every other value is skipped by
//! counting brackets, so a 100 MiB answer is read in constant memory and its
//! `usage` is found wherever it sits. Text is kept as it arrives, so a body
//! cut short still yields what was delivered. Nothing here panics or
//! allocates without a bound on any input: the path is at most seven frames
//! deep, keys and the usage object are held up to small caps, and text up to
//! [`MAX_TEXT_BYTES`](super::MAX_TEXT_BYTES) (in [`Texts`]).

use memchr::memchr2;
use serde::Deserialize;

use super::{MAX_TEXT_BYTES, ReportedUsage, Texts};

/// Longest key compared against the names metering reads (the longest is
/// `reasoning_content`); longer keys are skipped unread.
const MAX_KEY_BYTES: usize = 24;

/// Largest `usage` object read. OpenAI's, with every detail field, is under
/// 1 KiB; a bigger one is not a usage report.
const MAX_USAGE_BYTES: usize = 16 * 1024;

/// What an object or array on the path is, or what a value about to be read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The answer itself: an object.
    Root,
    /// `choices`: an array of choice objects.
    Choices,
    Choice,
    /// A choice's `message` (whole answers) or `delta` (stream chunks).
    Message,
    ToolCalls,
    ToolCall,
    /// `function` of a tool call, or the deprecated `function_call`.
    Function,
    /// Generated text: a string value.
    Text,
    /// `reasoning_content`: text, and the message's reasoning is in it.
    ReasoningContent,
    /// `reasoning` (vLLM's newer name): counted only when the message has no
    /// `reasoning_content`, as some versions send both with the same text.
    Reasoning,
    /// A choice's `index`: which choice its text belongs to.
    ChoiceIndex,
    FinishReason,
    Usage,
    Error,
    /// The top-level `object`, which vLLM's older errors set to `"error"`.
    ObjectName,
    /// The top-level `type` of a Responses API stream event
    /// (`response.completed`, `response.output_text.delta`, `error`, …).
    EventType,
    /// The `response` a Responses API stream event carries: its `usage`
    /// is read (its `output` repeats the deltas, and is not).
    Response,
    /// A Responses API answer's `output`: items, their `content` parts.
    Output,
    OutputItem,
    OutputContent,
    OutputPart,
    /// The top-level `data` of an images (or embeddings) answer: an array
    /// whose elements are counted, not read.
    Data,
    Ignored,
}

impl Slot {
    /// The slot of the value under `key` in an object that is `self`.
    fn member(self, key: &[u8]) -> Slot {
        match (self, key) {
            (Slot::Root, b"choices") => Slot::Choices,
            (Slot::Root, b"usage") => Slot::Usage,
            (Slot::Root, b"error") => Slot::Error,
            (Slot::Root, b"object") => Slot::ObjectName,
            (Slot::Root, b"data") => Slot::Data,
            (Slot::Root, b"type") => Slot::EventType,
            (Slot::Root, b"response") => Slot::Response,
            (Slot::Root, b"delta") => Slot::Text,
            (Slot::Root, b"output") => Slot::Output,
            (Slot::Response, b"usage") => Slot::Usage,
            (Slot::OutputItem, b"content") => Slot::OutputContent,
            (Slot::OutputItem, b"arguments") => Slot::Text,
            (Slot::OutputPart, b"text" | b"refusal") => Slot::Text,
            (Slot::Choice, b"message" | b"delta") => Slot::Message,
            (Slot::Choice, b"text") => Slot::Text,
            (Slot::Choice, b"index") => Slot::ChoiceIndex,
            (Slot::Choice, b"finish_reason") => Slot::FinishReason,
            (Slot::Message, b"content" | b"refusal") => Slot::Text,
            (Slot::Message, b"reasoning_content") => Slot::ReasoningContent,
            (Slot::Message, b"reasoning") => Slot::Reasoning,
            (Slot::Message, b"tool_calls") => Slot::ToolCalls,
            (Slot::Message, b"function_call") => Slot::Function,
            (Slot::ToolCall, b"function") => Slot::Function,
            (Slot::Function, b"name" | b"arguments") => Slot::Text,
            _ => Slot::Ignored,
        }
    }

    /// The slot of each element of an array that is `self`.
    fn element(self) -> Slot {
        match self {
            Slot::Choices => Slot::Choice,
            Slot::ToolCalls => Slot::ToolCall,
            Slot::Output => Slot::OutputItem,
            Slot::OutputContent => Slot::OutputPart,
            _ => Slot::Ignored,
        }
    }

    fn is_object(self) -> bool {
        matches!(
            self,
            Slot::Root
                | Slot::Choice
                | Slot::Message
                | Slot::ToolCall
                | Slot::Function
                | Slot::Response
                | Slot::OutputItem
                | Slot::OutputPart
        )
    }

    fn is_array(self) -> bool {
        matches!(
            self,
            Slot::Choices | Slot::ToolCalls | Slot::Data | Slot::Output | Slot::OutputContent
        )
    }

    fn is_string(self) -> bool {
        matches!(
            self,
            Slot::Text
                | Slot::ReasoningContent
                | Slot::Reasoning
                | Slot::ObjectName
                | Slot::EventType
        )
    }

    /// Most bytes of a skipped value of this slot kept to be read at its end.
    fn raw_limit(self) -> usize {
        match self {
            Slot::Usage => MAX_USAGE_BYTES,
            // A u32 with room for whitespace.
            Slot::ChoiceIndex => 16,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value is due (at the start, after `:`, after `[` or `,` in an array).
    Value(Slot),
    /// A key or the end of an object is due.
    Key,
    /// Inside a key.
    KeyString,
    /// After a key, `:` is due.
    Colon,
    /// Inside a string value that is read.
    String(Slot),
    /// Inside a value that is skipped (see [`Skip`]).
    Skipping(Slot),
    /// A `,` or the end of the enclosing object or array is due.
    AfterValue,
    /// The answer's closing brace was read.
    Done,
    /// Not an answer: the rest is not read.
    Broken,
}

/// Where a skipped value ends: bracket depth and string state.
#[derive(Debug, Default, Clone, Copy)]
struct Skip {
    depth: u64,
    in_string: bool,
    escaped: bool,
    /// A number or literal: it ends at the first delimiter.
    scalar: bool,
}

/// One open object or array on the path.
#[derive(Debug, Clone, Copy)]
struct Frame {
    slot: Slot,
    /// Values begun in this array so far: a choice's position is its default index.
    elements: u32,
}

/// How a `\` escape in a read string is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// `\u` and the hex digits read so far.
    Unicode {
        value: u32,
        digits: u8,
    },
}

/// What one answer (or one stream event) held, beyond its text.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Facts {
    /// `choices` had at least one element.
    pub choices: bool,
    /// The last non-null `usage` read.
    pub usage: Option<ReportedUsage>,
    /// A choice had a non-null `finish_reason`, or a Responses stream's last
    /// event (`response.completed`, `response.incomplete`) arrived.
    pub finish_reason: bool,
    /// A non-null `error`, `"object": "error"`, or a Responses stream's
    /// `response.failed` or `error` event.
    pub error: bool,
    /// The answer's closing brace was read and nothing before it was malformed.
    pub complete: bool,
    /// Elements of the top-level `data` array (images generated).
    pub data_items: u64,
}

/// The incremental reader; see the module docs.
#[derive(Debug)]
pub(super) struct AnswerScanner {
    state: State,
    path: Vec<Frame>,
    skip: Skip,
    key: Vec<u8>,
    /// The key was longer than [`MAX_KEY_BYTES`] or escaped: it matches nothing.
    key_unreadable: bool,
    /// The key's last byte was a `\`.
    key_escaped: bool,
    escape: Escape,
    /// A `\u` high surrogate waiting for its low half.
    high_surrogate: Option<u32>,
    /// The bytes of a skipped value read at its end (`usage`, a choice's
    /// `index`); `None` once over the slot's limit.
    raw: Option<Vec<u8>>,
    /// The top-level `object` or `type` string being read; `None` once too
    /// long to be a name metering looks for.
    name: Option<Vec<u8>>,
    /// The current choice's index.
    choice: u32,
    /// The current message's `reasoning` text, held until the message ends.
    reasoning: Vec<u8>,
    /// The current message had a non-empty `reasoning_content`.
    had_reasoning_content: bool,
    facts: Facts,
}

impl Default for AnswerScanner {
    fn default() -> Self {
        Self {
            state: State::Value(Slot::Root),
            path: Vec::with_capacity(8),
            skip: Skip::default(),
            key: Vec::with_capacity(MAX_KEY_BYTES),
            key_unreadable: false,
            key_escaped: false,
            escape: Escape::None,
            high_surrogate: None,
            raw: None,
            name: None,
            choice: 0,
            reasoning: Vec::new(),
            had_reasoning_content: false,
            facts: Facts::default(),
        }
    }
}

impl AnswerScanner {
    /// Ready for a new answer, keeping its allocations.
    pub fn reset(&mut self) {
        self.state = State::Value(Slot::Root);
        self.path.clear();
        self.key.clear();
        self.escape = Escape::None;
        self.high_surrogate = None;
        self.raw = None;
        self.name = None;
        self.choice = 0;
        self.reasoning.clear();
        self.had_reasoning_content = false;
        self.facts = Facts::default();
    }

    /// Reads the next piece of the answer; its text goes to `texts`.
    pub fn feed(&mut self, bytes: &[u8], texts: &mut Texts) {
        let mut at = 0;
        while let Some(&byte) = bytes.get(at) {
            match self.state {
                State::Done | State::Broken => return,
                State::String(slot) => {
                    at = self.read_string(bytes, at, slot, texts);
                    continue;
                }
                State::Skipping(slot) => {
                    at = self.skip_value(bytes, at, slot);
                    continue;
                }
                State::KeyString => {
                    at = self.read_key(bytes, at);
                    continue;
                }
                _ if byte.is_ascii_whitespace() => {}
                State::Value(_) if byte == b']' => self.close(byte, texts),
                State::Value(slot) => self.start_value(slot, byte),
                State::Key => match byte {
                    b'"' => {
                        self.key.clear();
                        self.key_unreadable = false;
                        self.key_escaped = false;
                        self.state = State::KeyString;
                    }
                    b'}' => self.close(byte, texts),
                    _ => self.state = State::Broken,
                },
                State::Colon if byte == b':' => {
                    let parent = self.path.last().map_or(Slot::Ignored, |f| f.slot);
                    self.state = State::Value(if self.key_unreadable {
                        Slot::Ignored
                    } else {
                        parent.member(&self.key)
                    });
                }
                State::AfterValue if byte == b',' => {
                    self.state = match self.path.last() {
                        Some(frame) if frame.slot.is_array() => State::Value(frame.slot.element()),
                        _ => State::Key,
                    };
                }
                State::AfterValue if matches!(byte, b'}' | b']') => self.close(byte, texts),
                State::Colon | State::AfterValue => self.state = State::Broken,
            }
            at += 1;
        }
    }

    /// The answer ended: what it held. A message cut short keeps its text.
    pub fn finish(&mut self, texts: &mut Texts) -> Facts {
        if self.path.iter().any(|f| f.slot == Slot::Message) {
            self.end_message(texts);
        }
        self.facts
    }

    /// The first byte of a value (consumed by the caller).
    fn start_value(&mut self, slot: Slot, byte: u8) {
        if let Some(array) = self.path.last_mut().filter(|f| f.slot.is_array()) {
            array.elements = array.elements.saturating_add(1);
            if array.slot == Slot::Data {
                self.facts.data_items = self.facts.data_items.saturating_add(1);
            }
        }
        if (slot.is_object() && byte == b'{') || (slot.is_array() && byte == b'[') {
            self.open(slot);
            return;
        }
        if slot.is_string() && byte == b'"' {
            self.escape = Escape::None;
            self.high_surrogate = None;
            if matches!(slot, Slot::ObjectName | Slot::EventType) {
                self.name = Some(Vec::new());
            }
            self.state = State::String(slot);
            return;
        }
        // `null` where metering reads something means there is nothing there.
        let null = byte == b'n';
        match slot {
            Slot::Root => {
                self.state = State::Broken;
                return;
            }
            Slot::FinishReason => self.facts.finish_reason |= !null,
            Slot::Error => self.facts.error |= !null,
            _ => {}
        }
        self.raw = (slot.raw_limit() > 0 && !null).then(|| vec![byte]);
        self.skip = match byte {
            b'{' | b'[' => Skip {
                depth: 1,
                ..Skip::default()
            },
            b'"' => Skip {
                in_string: true,
                ..Skip::default()
            },
            b'}' | b',' | b':' => {
                self.state = State::Broken;
                return;
            }
            _ => Skip {
                scalar: true,
                ..Skip::default()
            },
        };
        self.state = State::Skipping(slot);
    }

    fn open(&mut self, slot: Slot) {
        match slot {
            Slot::Choice => {
                self.facts.choices = true;
                let position = self.path.last().map_or(1, |f| f.elements);
                self.choice = position.saturating_sub(1);
            }
            Slot::Message => {
                self.reasoning.clear();
                self.had_reasoning_content = false;
            }
            _ => {}
        }
        self.path.push(Frame { slot, elements: 0 });
        self.state = if slot.is_array() {
            State::Value(slot.element())
        } else {
            State::Key
        };
    }

    /// `}` or `]`: the innermost open object or array ends.
    fn close(&mut self, bracket: u8, texts: &mut Texts) {
        let Some(frame) = self.path.pop() else {
            self.state = State::Broken;
            return;
        };
        if frame.slot.is_array() != (bracket == b']') {
            self.state = State::Broken;
            return;
        }
        if frame.slot == Slot::Message {
            self.end_message(texts);
        }
        if self.path.is_empty() {
            self.facts.complete = true;
            self.state = State::Done;
        } else {
            self.state = State::AfterValue;
        }
    }

    fn end_message(&mut self, texts: &mut Texts) {
        if !self.had_reasoning_content && !self.reasoning.is_empty() {
            texts.push(self.choice, &self.reasoning);
        }
        self.reasoning.clear();
        self.had_reasoning_content = false;
    }

    /// Skips through a value; returns where reading goes on.
    fn skip_value(&mut self, bytes: &[u8], from: usize, slot: Slot) -> usize {
        let rest = bytes.get(from..).unwrap_or_default();
        let skip = &mut self.skip;
        let mut end = None;
        for (offset, &byte) in rest.iter().enumerate() {
            if skip.scalar {
                if matches!(byte, b',' | b'}' | b']') || byte.is_ascii_whitespace() {
                    // The delimiter belongs to the enclosing value.
                    end = Some(offset);
                    break;
                }
            } else if skip.in_string {
                if skip.escaped {
                    skip.escaped = false;
                } else if byte == b'\\' {
                    skip.escaped = true;
                } else if byte == b'"' {
                    skip.in_string = false;
                    if skip.depth == 0 {
                        end = Some(offset + 1);
                        break;
                    }
                }
            } else {
                match byte {
                    b'"' => skip.in_string = true,
                    b'{' | b'[' => skip.depth = skip.depth.saturating_add(1),
                    b'}' | b']' => {
                        skip.depth = skip.depth.saturating_sub(1);
                        if skip.depth == 0 {
                            end = Some(offset + 1);
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
        let used = end.unwrap_or(rest.len());
        if let Some(raw) = self.raw.as_mut() {
            let part = rest.get(..used).unwrap_or_default();
            if raw.len() + part.len() > slot.raw_limit() {
                self.raw = None;
            } else {
                raw.extend_from_slice(part);
            }
        }
        if end.is_none() {
            return bytes.len();
        }
        if let Some(raw) = self.raw.take() {
            self.take_raw(slot, &raw);
        }
        self.state = State::AfterValue;
        from + used
    }

    /// A skipped value that is read whole at its end.
    fn take_raw(&mut self, slot: Slot, raw: &[u8]) {
        match slot {
            Slot::Usage => {
                if let Ok(usage) = serde_json::from_slice::<WireUsage>(raw) {
                    self.facts.usage = Some(usage.into());
                }
            }
            Slot::ChoiceIndex => {
                if let Ok(index) = serde_json::from_slice::<u32>(raw) {
                    self.choice = index;
                }
            }
            _ => {}
        }
    }

    fn read_key(&mut self, bytes: &[u8], from: usize) -> usize {
        let mut at = from;
        loop {
            let rest = bytes.get(at..).unwrap_or_default();
            if rest.is_empty() {
                return at;
            }
            if std::mem::take(&mut self.key_escaped) {
                // An escaped key is none of ours: its bytes no longer matter.
                at += 1;
                continue;
            }
            let Some(offset) = memchr2(b'"', b'\\', rest) else {
                self.push_key(rest);
                return bytes.len();
            };
            self.push_key(rest.get(..offset).unwrap_or_default());
            at += offset + 1;
            if rest.get(offset) == Some(&b'"') {
                self.state = State::Colon;
                return at;
            }
            self.key_unreadable = true;
            self.key_escaped = true;
        }
    }

    fn push_key(&mut self, bytes: &[u8]) {
        if self.key.len() + bytes.len() > MAX_KEY_BYTES {
            self.key_unreadable = true;
        } else {
            self.key.extend_from_slice(bytes);
        }
    }

    /// Reads string content into its destination; returns where reading goes on.
    fn read_string(&mut self, bytes: &[u8], from: usize, slot: Slot, texts: &mut Texts) -> usize {
        let mut at = from;
        while let Some(rest) = bytes.get(at..).filter(|r| !r.is_empty()) {
            if self.escape != Escape::None {
                if let Some(&byte) = rest.first() {
                    self.escape_byte(byte, slot, texts);
                }
                at += 1;
                continue;
            }
            let Some(offset) = memchr2(b'"', b'\\', rest) else {
                self.push_text(slot, rest, texts);
                return bytes.len();
            };
            self.push_text(slot, rest.get(..offset).unwrap_or_default(), texts);
            at += offset + 1;
            if rest.get(offset) == Some(&b'"') {
                self.end_string(slot, texts);
                return at;
            }
            self.escape = Escape::Backslash;
        }
        at
    }

    fn escape_byte(&mut self, byte: u8, slot: Slot, texts: &mut Texts) {
        match self.escape {
            Escape::None => {}
            Escape::Backslash => {
                let plain = match byte {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    b'u' => {
                        self.escape = Escape::Unicode {
                            value: 0,
                            digits: 0,
                        };
                        return;
                    }
                    _ => char::REPLACEMENT_CHARACTER,
                };
                self.escape = Escape::None;
                self.push_char(slot, plain, texts);
            }
            Escape::Unicode { value, digits } => {
                let Some(digit) = char::from(byte).to_digit(16) else {
                    self.escape = Escape::None;
                    self.push_char(slot, char::REPLACEMENT_CHARACTER, texts);
                    return;
                };
                let value = value * 16 + digit;
                if digits < 3 {
                    self.escape = Escape::Unicode {
                        value,
                        digits: digits + 1,
                    };
                } else {
                    self.escape = Escape::None;
                    self.push_code_unit(slot, value, texts);
                }
            }
        }
    }

    /// One `\uXXXX` code unit: surrogate pairs are joined, lone halves replaced.
    fn push_code_unit(&mut self, slot: Slot, unit: u32, texts: &mut Texts) {
        let c = match (self.high_surrogate.take(), unit) {
            (pending, 0xD800..=0xDBFF) => {
                if pending.is_some() {
                    self.push_raw(slot, char::REPLACEMENT_CHARACTER, texts);
                }
                self.high_surrogate = Some(unit);
                return;
            }
            (Some(high), 0xDC00..=0xDFFF) => {
                char::from_u32(0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00))
            }
            (Some(_), _) => {
                self.push_raw(slot, char::REPLACEMENT_CHARACTER, texts);
                char::from_u32(unit)
            }
            (None, _) => char::from_u32(unit),
        };
        self.push_raw(slot, c.unwrap_or(char::REPLACEMENT_CHARACTER), texts);
    }

    fn push_char(&mut self, slot: Slot, c: char, texts: &mut Texts) {
        self.flush_surrogate(slot, texts);
        self.push_raw(slot, c, texts);
    }

    fn push_raw(&mut self, slot: Slot, c: char, texts: &mut Texts) {
        let mut buf = [0; 4];
        self.push_bytes(slot, c.encode_utf8(&mut buf).as_bytes(), texts);
    }

    /// A high surrogate not followed by its low half is replaced.
    fn flush_surrogate(&mut self, slot: Slot, texts: &mut Texts) {
        if self.high_surrogate.take().is_some() {
            self.push_raw(slot, char::REPLACEMENT_CHARACTER, texts);
        }
    }

    fn push_text(&mut self, slot: Slot, bytes: &[u8], texts: &mut Texts) {
        if !bytes.is_empty() {
            self.flush_surrogate(slot, texts);
            self.push_bytes(slot, bytes, texts);
        }
    }

    fn push_bytes(&mut self, slot: Slot, bytes: &[u8], texts: &mut Texts) {
        match slot {
            Slot::Text => texts.push(self.choice, bytes),
            Slot::ReasoningContent => {
                self.had_reasoning_content = true;
                texts.push(self.choice, bytes);
            }
            Slot::Reasoning if self.reasoning.len() + bytes.len() <= MAX_TEXT_BYTES => {
                self.reasoning.extend_from_slice(bytes);
            }
            Slot::ObjectName | Slot::EventType => {
                if let Some(name) = self.name.as_mut() {
                    if name.len() + bytes.len() > MAX_KEY_BYTES {
                        self.name = None;
                    } else {
                        name.extend_from_slice(bytes);
                    }
                }
            }
            _ => {}
        }
    }

    fn end_string(&mut self, slot: Slot, texts: &mut Texts) {
        self.flush_surrogate(slot, texts);
        match (slot, self.name.as_deref()) {
            (Slot::ObjectName, Some(b"error")) => self.facts.error = true,
            // A Responses stream ends with one of these, and has no `[DONE]`.
            (Slot::EventType, Some(b"response.completed" | b"response.incomplete")) => {
                self.facts.finish_reason = true;
            }
            (Slot::EventType, Some(b"response.failed" | b"error")) => self.facts.error = true,
            _ => {}
        }
        self.state = State::AfterValue;
    }
}

/// `usage` as backends send it; missing figures are 0 (embeddings have no
/// completion tokens) and a missing total is the sum.
/// The Responses API names them `input_tokens` and `output_tokens`.
#[derive(Deserialize)]
struct WireUsage {
    #[serde(alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "output_tokens")]
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
