//! Paced server-sent-event streams.
//!
//! The pacing (first token after the TTFT, then one token per inter-token
//! delay) is the same for every protocol; a [`StreamFormat`] says only how
//! each event is written. Sequences of one generation (`n` choices, several
//! prompts) advance together, so their events interleave: token `i` of every
//! sequence, in sequence order, then token `i + 1`. Tokens that are due at the
//! same instant go out in one write, so an unpaced simulator (`--ttft-ms 0
//! --tokens-per-sec 0`) answers a stream in a single chunk.

use std::io;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use tokio::time::Instant;

use super::engine::{Generation, wait_until};

/// How one protocol writes the events of a stream.
pub trait StreamFormat: Send + 'static {
    /// Written once, just before the first token.
    fn opening(&mut self, _generation: &Generation, _out: &mut String) {}
    /// Token `token` of sequence `sequence`.
    fn token(&mut self, generation: &Generation, sequence: usize, token: usize, out: &mut String);
    /// Written right after the last token of `sequence` (at once for an
    /// empty one): its finish reason.
    fn finished(&mut self, _generation: &Generation, _sequence: usize, _out: &mut String) {}
    /// Written after every sequence has finished: usage, terminator.
    fn closing(&mut self, generation: &Generation, out: &mut String);
    /// Written when the stream is cut off. `false` means the protocol has no
    /// such event and the connection is reset instead, without a terminator.
    fn aborted(&self, out: &mut String) -> bool;
}

enum Phase {
    Generating {
        next: usize,
    },
    /// Cut off: reset the connection on the next poll.
    Reset,
    Done,
}

struct StreamState<F> {
    generation: Generation,
    format: F,
    phase: Phase,
}

/// A `text/event-stream` response that generates `generation` in `format`.
/// The batch slot is held until the stream ends or the client goes away.
pub fn sse_response<F: StreamFormat>(generation: Generation, format: F) -> Response {
    let state = StreamState {
        generation,
        format,
        phase: Phase::Generating { next: 0 },
    };
    let events = stream::unfold(state, |mut state| async move {
        let next = match state.phase {
            Phase::Done => return None,
            Phase::Reset => {
                state.phase = Phase::Done;
                // Let the server flush what was already generated, as a
                // crashing engine's last tokens reach the client before the reset.
                tokio::task::yield_now().await;
                let reset = io::Error::new(io::ErrorKind::ConnectionReset, "simulated abort");
                return Some((Err(reset), state));
            }
            Phase::Generating { next } => next,
        };
        let out = state.write_due_events(next).await;
        Some((Ok::<_, io::Error>(Bytes::from(out)), state))
    });
    let mut response = Body::from_stream(events).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

impl<F: StreamFormat> StreamState<F> {
    /// Waits for token `next`, then writes every event due by now.
    async fn write_due_events(&mut self, mut next: usize) -> String {
        let generation = &self.generation;
        let format = &mut self.format;
        let longest = generation.longest();
        wait_until(generation.due(next)).await;
        let now = Instant::now();
        let mut out = String::new();
        let mut generated = 0;
        if next == 0 {
            generation.observe_first_token();
            format.opening(generation, &mut out);
            for (sequence, completion) in generation.sequences.iter().enumerate() {
                if completion.is_empty() {
                    format.finished(generation, sequence, &mut out);
                }
            }
        }
        while next < longest && generation.due(next) <= now {
            if generation.abort_after == Some(next) {
                generation.observe_generated(generated);
                self.phase = if format.aborted(&mut out) {
                    Phase::Done
                } else {
                    Phase::Reset
                };
                return out;
            }
            for (sequence, completion) in generation.sequences.iter().enumerate() {
                if next < completion.len() {
                    format.token(generation, sequence, next, &mut out);
                    generated += 1;
                    if next + 1 == completion.len() {
                        format.finished(generation, sequence, &mut out);
                    }
                }
            }
            next += 1;
        }
        generation.observe_generated(generated);
        if next == longest {
            format.closing(generation, &mut out);
            self.phase = Phase::Done;
        } else {
            self.phase = Phase::Generating { next };
        }
        out
    }
}
