//! Incremental reading of OpenAI-style response bodies: the SSE stream of a streamed
//! chat completion, fed in whatever pieces the network delivers, and the JSON body of a
//! non-streamed one.
//!
//! [`SseEvents`] splits a stream into events; [`SseScanner`] extracts only what the
//! report needs from a chat stream: how many chunks carried content, the
//! `usage.completion_tokens` when the server sent it, and whether the stream reached
//! `data: [DONE]`. The soak reads streams with the same splitter
//! (`soak::exchange`), keeping their text.

use std::borrow::Cow;
use std::ops::ControlFlow;

use serde::Deserialize;
use serde::de::IgnoredAny;

/// A line longer than this is not a chat completion chunk; stop buffering instead of
/// growing without bound on a broken or hostile server.
const MAX_LINE_BYTES: usize = 1 << 20;

/// Why a response body does not count as a successful completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Not the expected OpenAI JSON: unparseable, no choices, or an `error` object.
    Malformed,
    /// The SSE stream ended before `data: [DONE]`.
    Truncated,
}

/// What a successful body contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyTally {
    /// SSE chunks whose `choices[0].delta.content` was a non-empty string (0 when not streamed).
    pub content_chunks: u64,
    /// `usage.completion_tokens`, when the server reported usage.
    pub completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<StreamChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<IgnoredAny>,
    #[serde(default)]
    usage: Option<Usage>,
}

/// Checks a complete non-streamed chat completion body.
pub fn tally_completion_body(body: &[u8]) -> Result<BodyTally, BodyFault> {
    let completion: Completion = serde_json::from_slice(body).map_err(|_| BodyFault::Malformed)?;
    if completion.choices.is_empty() {
        return Err(BodyFault::Malformed);
    }
    Ok(BodyTally {
        content_chunks: 0,
        completion_tokens: completion.usage.and_then(|u| u.completion_tokens),
    })
}

/// Splits an SSE byte stream into events as bytes arrive, per the WHATWG
/// event-stream rules: lines end in LF, CRLF or CR (a CRLF may be split across two
/// pieces), an empty line dispatches the event, `data` lines are joined with LF,
/// comments and other fields are ignored. What an event means is up to the caller:
/// [`SseScanner`] tallies a chat stream, the soak's reader keeps its text.
#[derive(Debug, Default)]
pub struct SseEvents {
    line: Vec<u8>,
    /// The previous piece ended in CR, so a leading LF in the next one is the same line end.
    after_cr: bool,
    data: Vec<u8>,
    has_data: bool,
    /// The caller asked for no more events (it saw `[DONE]`).
    stopped: bool,
}

impl SseEvents {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes the next piece of the body, calling `on_event` with the data of each
    /// event it completes. Once `on_event` answers [`ControlFlow::Break`], the rest of
    /// this piece and every later one is ignored.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_event: impl FnMut(&[u8]) -> Result<ControlFlow<()>, BodyFault>,
    ) -> Result<(), BodyFault> {
        while !bytes.is_empty() && !self.stopped {
            if self.after_cr {
                self.after_cr = false;
                if let Some(rest) = bytes.strip_prefix(b"\n") {
                    bytes = rest;
                    continue;
                }
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.line.extend_from_slice(bytes);
                    if self.line.len() > MAX_LINE_BYTES {
                        return Err(BodyFault::Malformed);
                    }
                    return Ok(());
                }
                Some(end) => {
                    let (content, rest) = bytes.split_at(end);
                    self.after_cr = rest.first() == Some(&b'\r');
                    bytes = rest.get(1..).unwrap_or_default();
                    self.line.extend_from_slice(content);
                    let line = std::mem::take(&mut self.line);
                    let handled = self.handle_line(&line, &mut on_event);
                    // Give the buffer back so a long stream reuses one allocation.
                    self.line = line;
                    self.line.clear();
                    handled?;
                }
            }
        }
        Ok(())
    }

    fn handle_line(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(&[u8]) -> Result<ControlFlow<()>, BodyFault>,
    ) -> Result<(), BodyFault> {
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return Ok(()), // comment, e.g. a keep-alive ping
            Some(colon) => {
                let (field, rest) = line.split_at(colon);
                let value = &rest[1..];
                (field, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
        Ok(())
    }

    fn dispatch(
        &mut self,
        on_event: &mut impl FnMut(&[u8]) -> Result<ControlFlow<()>, BodyFault>,
    ) -> Result<(), BodyFault> {
        if !std::mem::take(&mut self.has_data) {
            return Ok(());
        }
        let data = std::mem::take(&mut self.data);
        let result = on_event(&data);
        self.data = data;
        self.data.clear();
        if result? == ControlFlow::Break(()) {
            self.stopped = true;
        }
        Ok(())
    }
}

/// The data of the event that ends an OpenAI stream.
pub const DONE: &[u8] = b"[DONE]";

/// Tallies a streamed chat completion: content chunks, reported usage, and whether
/// it reached `data: [DONE]`.
#[derive(Debug, Default)]
pub struct SseScanner {
    events: SseEvents,
    done: bool,
    tally: BodyTally,
}

impl SseScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes the next piece of the body. Anything after `[DONE]` is ignored.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), BodyFault> {
        let Self {
            events,
            done,
            tally,
        } = self;
        events.feed(bytes, |data| {
            if data == DONE {
                *done = true;
                return Ok(ControlFlow::Break(()));
            }
            tally_event(tally, data)?;
            Ok(ControlFlow::Continue(()))
        })
    }

    /// Ends the stream. An event not closed by an empty line is discarded, as the SSE
    /// rules say, so a body cut after `data: [DONE]\n` is still truncated.
    pub fn finish(self) -> Result<BodyTally, BodyFault> {
        if self.done {
            Ok(self.tally)
        } else {
            Err(BodyFault::Truncated)
        }
    }
}

fn tally_event(tally: &mut BodyTally, data: &[u8]) -> Result<(), BodyFault> {
    let chunk: StreamChunk<'_> = serde_json::from_slice(data).map_err(|_| BodyFault::Malformed)?;
    if chunk.error.is_some() {
        return Err(BodyFault::Malformed);
    }
    let has_content = chunk
        .choices
        .first()
        .and_then(|c| c.delta.as_ref())
        .and_then(|d| d.content.as_deref())
        .is_some_and(|text| !text.is_empty());
    if has_content {
        tally.content_chunks += 1;
    }
    if let Some(tokens) = chunk.usage.and_then(|u| u.completion_tokens) {
        tally.completion_tokens = Some(tokens);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream shaped like gpu-sim's and OpenAI's: role chunk with empty content,
    /// three content chunks (one with an escaped quote and one with a multi-byte
    /// character), a finish chunk, a usage chunk with empty choices, then [DONE].
    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        ": keep-alive\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\\\"lo\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wörld\"}}]}\n\n",
        "event: message\ndata:{\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"}}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n",
        "data: [DONE]\n\n",
    );

    const EXPECTED: BodyTally = BodyTally {
        content_chunks: 3,
        completion_tokens: Some(3),
    };

    fn scan_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Result<BodyTally, BodyFault> {
        let mut scanner = SseScanner::new();
        for piece in pieces {
            scanner.feed(piece)?;
        }
        scanner.finish()
    }

    #[test]
    fn whole_stream_in_one_piece() {
        assert_eq!(scan_pieces([STREAM.as_bytes()]), Ok(EXPECTED));
    }

    #[test]
    fn one_byte_at_a_time() {
        assert_eq!(scan_pieces(STREAM.as_bytes().chunks(1)), Ok(EXPECTED));
    }

    #[test]
    fn split_into_two_at_every_byte_boundary() {
        let bytes = STREAM.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(scan_pieces([a, b]), Ok(EXPECTED), "split at {at}");
        }
    }

    #[test]
    fn split_into_three_at_many_boundaries() {
        let bytes = STREAM.as_bytes();
        for first in (0..bytes.len()).step_by(7) {
            for second in (first..bytes.len()).step_by(11) {
                let pieces = [&bytes[..first], &bytes[first..second], &bytes[second..]];
                assert_eq!(
                    scan_pieces(pieces),
                    Ok(EXPECTED),
                    "split at {first}, {second}"
                );
            }
        }
    }

    #[test]
    fn crlf_and_cr_line_ends_split_anywhere() {
        for ending in ["\r\n", "\r"] {
            let stream = STREAM.replace('\n', ending);
            let bytes = stream.as_bytes();
            for at in 0..=bytes.len() {
                let (a, b) = bytes.split_at(at);
                assert_eq!(
                    scan_pieces([a, b]),
                    Ok(EXPECTED),
                    "{ending:?} split at {at}"
                );
            }
        }
    }

    #[test]
    fn data_split_over_several_lines_is_joined() {
        let stream =
            "data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(
            scan_pieces([stream.as_bytes()]),
            Ok(BodyTally {
                content_chunks: 1,
                completion_tokens: None
            })
        );
    }

    #[test]
    fn stream_without_done_is_truncated() {
        let cut = STREAM.trim_end_matches("data: [DONE]\n\n");
        assert_eq!(scan_pieces([cut.as_bytes()]), Err(BodyFault::Truncated));
    }

    #[test]
    fn done_without_closing_blank_line_is_truncated() {
        let cut = STREAM.trim_end_matches('\n');
        assert_eq!(scan_pieces([cut.as_bytes()]), Err(BodyFault::Truncated));
    }

    #[test]
    fn empty_body_is_truncated() {
        assert_eq!(scan_pieces([&b""[..]]), Err(BodyFault::Truncated));
    }

    #[test]
    fn bytes_after_done_are_ignored() {
        let stream = format!("{STREAM}data: not json\n\n");
        assert_eq!(scan_pieces([stream.as_bytes()]), Ok(EXPECTED));
    }

    #[test]
    fn unparseable_chunk_is_malformed() {
        let stream = "data: {\"choices\":[\n\ndata: [DONE]\n\n";
        assert_eq!(scan_pieces([stream.as_bytes()]), Err(BodyFault::Malformed));
    }

    #[test]
    fn error_event_mid_stream_is_malformed() {
        let stream = "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\ndata: [DONE]\n\n";
        assert_eq!(scan_pieces([stream.as_bytes()]), Err(BodyFault::Malformed));
    }

    #[test]
    fn endless_line_is_refused() {
        let mut scanner = SseScanner::new();
        let piece = vec![b'a'; 64 * 1024];
        let result = (0..=MAX_LINE_BYTES / piece.len()).try_for_each(|_| scanner.feed(&piece));
        assert_eq!(result, Err(BodyFault::Malformed));
    }

    #[test]
    fn completion_body_with_usage() {
        let body = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        assert_eq!(
            tally_completion_body(body),
            Ok(BodyTally {
                content_chunks: 0,
                completion_tokens: Some(7)
            })
        );
    }

    #[test]
    fn completion_body_without_usage_still_succeeds() {
        let body = br#"{"choices":[{"message":{"content":"hi"}}]}"#;
        assert_eq!(
            tally_completion_body(body),
            Ok(BodyTally {
                content_chunks: 0,
                completion_tokens: None
            })
        );
    }

    #[test]
    fn completion_body_that_is_not_a_completion_is_malformed() {
        for body in [
            &b"not json"[..],
            br#"{"error":{"message":"x"}}"#,
            br#"{"choices":[]}"#,
        ] {
            assert_eq!(tally_completion_body(body), Err(BodyFault::Malformed));
        }
    }
}
