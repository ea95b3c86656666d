//! One soak request: send it, read what comes back, and keep what the ledger needs
//! (status, how the body ended, bytes, the text of each choice).
//!
//! Unlike the benchmark's exchange ([`crate::request`]), nothing here is timed
//! closely and every piece of the answer is kept, because the checker recounts the
//! text the client actually received. A client planned to disconnect reads that many
//! content events and then drops the connection, mid-stream, as a user closing a tab.

use std::borrow::Cow;
use std::ops::ControlFlow;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Uri};
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::time::{Instant, timeout_at};

use super::ledger::End;
use crate::request::HttpClient;
use crate::sse::{BodyFault, DONE, SseEvents};

/// Set on every request; Tollgate keeps it as the request id of the usage event.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A JSON body or refusal larger than this is not an OpenAI answer; reading stops.
const MAX_BODY_BYTES: usize = 16 << 20;
/// Choice indexes at or above this are not from a real answer (the soak asks for a
/// handful of choices); refusing them bounds the memory a broken server can cost.
const MAX_CHOICES: usize = 1024;

/// Everything one request needs, built by the scheduler.
#[derive(Debug)]
pub struct SoakRequest {
    pub uri: Uri,
    pub body: Bytes,
    pub authorization: HeaderValue,
    pub request_id: HeaderValue,
    pub streamed: bool,
    /// Hang up after this many content events (a planned disconnect).
    pub disconnect_after: Option<u32>,
}

impl SoakRequest {
    fn http(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(REQUEST_ID_HEADER, self.request_id.clone());
        request
    }
}

/// What the client saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub status: u16,
    pub end: End,
    pub bytes: u64,
    pub texts: Vec<String>,
    pub reported_completion_tokens: Option<u64>,
    pub error: Option<String>,
}

impl Received {
    fn no_answer(error: &str) -> Self {
        Self {
            status: 0,
            end: End::NoAnswer,
            bytes: 0,
            texts: Vec::new(),
            reported_completion_tokens: None,
            error: Some(error.to_owned()),
        }
    }
}

/// Sends `request` and reads its answer until it ends, the client hangs up as
/// planned, or `deadline` passes.
pub async fn soak_exchange(
    client: &HttpClient,
    request: &SoakRequest,
    deadline: Instant,
) -> Received {
    let response = match timeout_at(deadline, client.request(request.http())).await {
        Err(_) => return Received::no_answer("timeout"),
        Ok(Err(e)) if e.is_connect() => return Received::no_answer("connect"),
        Ok(Err(_)) => return Received::no_answer("io"),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    let mut received = Received {
        status: status.as_u16(),
        end: End::Complete,
        bytes: 0,
        texts: Vec::new(),
        reported_completion_tokens: None,
        error: None,
    };
    let mut body = response.into_body();
    if !status.is_success() {
        received.end = End::Refused;
        received.error = match read_whole(&mut body, deadline, &mut received.bytes).await {
            Ok(bytes) => error_code(&bytes),
            Err(wire) => Some(wire.to_owned()),
        };
        return received;
    }
    if request.streamed {
        read_stream(body, request.disconnect_after, deadline, &mut received).await;
    } else {
        match read_whole(&mut body, deadline, &mut received.bytes).await {
            Ok(bytes) => read_json(&bytes, &mut received),
            Err(wire) => {
                received.end = End::ServerCut;
                received.error = Some(wire.to_owned());
            }
        }
    }
    received
}

/// The whole body, or what went wrong on the wire.
async fn read_whole(
    body: &mut Incoming,
    deadline: Instant,
    bytes: &mut u64,
) -> Result<Vec<u8>, &'static str> {
    let mut whole = Vec::new();
    loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => return Err("timeout"),
            Ok(None) => return Ok(whole),
            Ok(Some(Err(_))) => return Err("io"),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        *bytes += data.len() as u64;
        if whole.len() + data.len() > MAX_BODY_BYTES {
            return Err("body_too_large");
        }
        whole.extend_from_slice(&data);
    }
}

async fn read_stream(
    mut body: Incoming,
    disconnect_after: Option<u32>,
    deadline: Instant,
    received: &mut Received,
) {
    let mut events = SseEvents::new();
    let mut stream = StreamState::default();
    let cut = loop {
        let frame = match timeout_at(deadline, body.frame()).await {
            Err(_) => break Some("timeout"),
            Ok(None) => break None,
            Ok(Some(Err(_))) => break Some("io"),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received.bytes += data.len() as u64;
        if events.feed(&data, |event| stream.on_event(event)).is_err() {
            break Some("malformed");
        }
        if stream.done || stream.error_event {
            break None;
        }
        if disconnect_after.is_some_and(|after| stream.content_events >= after) {
            // Dropping the body closes the connection: Tollgate sees the client go.
            drop(body);
            received.end = End::ClientDisconnect;
            received.texts = stream.texts.0;
            received.reported_completion_tokens = stream.reported;
            return;
        }
    };
    received.end = if stream.done && cut.is_none() {
        End::Complete
    } else {
        End::ServerCut
    };
    received.error = match (cut, stream.error_event, stream.done) {
        (Some(wire), _, _) => Some(wire.to_owned()),
        (None, true, _) => Some("error_event".to_owned()),
        (None, false, false) => Some("truncated".to_owned()),
        (None, false, true) => None,
    };
    received.texts = stream.texts.0;
    received.reported_completion_tokens = stream.reported;
}

fn read_json(bytes: &[u8], received: &mut Received) {
    let answer = match serde_json::from_slice::<Answer<'_>>(bytes) {
        Ok(answer)
            if answer.error.is_none() && (!answer.choices.is_empty() || answer.data.is_some()) =>
        {
            answer
        }
        _ => {
            received.end = End::ServerCut;
            received.error = Some("bad_body".to_owned());
            return;
        }
    };
    let mut texts = ChoiceTexts::default();
    for choice in answer.choices {
        let index = choice.index;
        if let Some(text) = choice.text()
            && texts.push(index, &text).is_err()
        {
            received.end = End::ServerCut;
            received.error = Some("bad_body".to_owned());
            return;
        }
    }
    received.texts = texts.0;
    received.reported_completion_tokens = answer.usage.and_then(|u| u.completion_tokens);
}

/// The `error.code` of an OpenAI error body (`insufficient_quota`, `server_busy`),
/// else its `error.type`.
fn error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    error
        .get("code")
        .and_then(serde_json::Value::as_str)
        .or_else(|| error.get("type").and_then(serde_json::Value::as_str))
        .map(str::to_owned)
}

/// Chat and completions answers, whole or as stream chunks, and embeddings answers
/// (`data`): only what the ledger keeps.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    data: Option<IgnoredAny>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: usize,
    /// Chat, whole answer.
    #[serde(default, borrow)]
    message: Option<Content<'a>>,
    /// Chat, stream chunk.
    #[serde(default, borrow)]
    delta: Option<Content<'a>>,
    /// Completions, whole or chunk.
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

impl<'a> Choice<'a> {
    fn text(self) -> Option<Cow<'a, str>> {
        self.message
            .or(self.delta)
            .and_then(|c| c.content)
            .or(self.text)
            .filter(|t| !t.is_empty())
    }
}

#[derive(Deserialize)]
struct Content<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// The text received so far, per choice index.
#[derive(Debug, Default)]
struct ChoiceTexts(Vec<String>);

impl ChoiceTexts {
    fn push(&mut self, index: usize, text: &str) -> Result<(), BodyFault> {
        if index >= MAX_CHOICES {
            return Err(BodyFault::Malformed);
        }
        if self.0.len() <= index {
            self.0.resize(index + 1, String::new());
        }
        if let Some(slot) = self.0.get_mut(index) {
            slot.push_str(text);
        }
        Ok(())
    }
}

/// A stream read so far.
#[derive(Debug, Default)]
struct StreamState {
    texts: ChoiceTexts,
    /// Events that carried generated text.
    content_events: u32,
    done: bool,
    /// An `error` event arrived (Tollgate ends a stream it cannot finish with one).
    error_event: bool,
    reported: Option<u64>,
}

impl StreamState {
    fn on_event(&mut self, data: &[u8]) -> Result<ControlFlow<()>, BodyFault> {
        if data == DONE {
            self.done = true;
            return Ok(ControlFlow::Break(()));
        }
        let chunk: Answer<'_> = serde_json::from_slice(data).map_err(|_| BodyFault::Malformed)?;
        if chunk.error.is_some() {
            self.error_event = true;
            return Ok(ControlFlow::Break(()));
        }
        let mut content = false;
        for choice in chunk.choices {
            let index = choice.index;
            if let Some(text) = choice.text() {
                self.texts.push(index, &text)?;
                content = true;
            }
        }
        if content {
            self.content_events += 1;
        }
        if let Some(tokens) = chunk.usage.and_then(|u| u.completion_tokens) {
            self.reported = Some(tokens);
        }
        Ok(ControlFlow::Continue(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(text: &str) -> StreamState {
        let mut events = SseEvents::new();
        let mut state = StreamState::default();
        events.feed(text.as_bytes(), |e| state.on_event(e)).unwrap();
        state
    }

    #[test]
    fn stream_keeps_each_choices_text_by_index() {
        let state = stream_of(concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"text\":\" b1\"}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"a1\"}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"text\":\" b\\\"2\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"after done\"}]}\n\n",
        ));
        assert_eq!(state.texts.0, vec!["a1".to_owned(), " b1 b\"2".to_owned()]);
        assert_eq!(state.content_events, 3);
        assert_eq!(state.reported, Some(3));
        assert!(state.done && !state.error_event);
    }

    #[test]
    fn error_event_stops_the_stream() {
        let state = stream_of(concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"error\":{\"message\":\"backend failed\",\"type\":\"server_error\"}}\n\n",
        ));
        assert_eq!(state.texts.0, vec!["Hi".to_owned()]);
        assert!(state.error_event && !state.done);
    }

    #[test]
    fn absurd_choice_index_is_malformed() {
        let mut events = SseEvents::new();
        let mut state = StreamState::default();
        let chunk = "data: {\"choices\":[{\"index\":5000,\"text\":\"x\"}]}\n\n";
        assert_eq!(
            events.feed(chunk.as_bytes(), |e| state.on_event(e)),
            Err(BodyFault::Malformed)
        );
    }

    fn json(body: &str) -> Received {
        let mut received = Received::no_answer("unset");
        received.end = End::Complete;
        received.error = None;
        read_json(body.as_bytes(), &mut received);
        received
    }

    #[test]
    fn whole_answers_of_each_endpoint() {
        let chat = json(
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"}}],"usage":{"completion_tokens":2}}"#,
        );
        assert_eq!(
            (chat.end, chat.texts.clone()),
            (End::Complete, vec!["Hello there".to_owned()])
        );
        assert_eq!(chat.reported_completion_tokens, Some(2));
        let completion = json(r#"{"choices":[{"index":1,"text":"b"},{"index":0,"text":"a"}]}"#);
        assert_eq!(completion.texts, vec!["a".to_owned(), "b".to_owned()]);
        let embedding =
            json(r#"{"object":"list","data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":3}}"#);
        assert_eq!(embedding.end, End::Complete);
        assert!(embedding.texts.is_empty());
    }

    #[test]
    fn cut_or_wrong_json_is_a_server_cut() {
        for body in [
            r#"{"choices":[{"index":0,"mess"#,
            r#"{"error":{"message":"x"}}"#,
            "{}",
        ] {
            let received = json(body);
            assert_eq!(received.end, End::ServerCut, "{body}");
            assert_eq!(received.error.as_deref(), Some("bad_body"));
        }
    }

    #[test]
    fn refusal_code_or_type() {
        assert_eq!(
            error_code(br#"{"error":{"message":"m","type":"insufficient_quota","code":"insufficient_quota"}}"#),
            Some("insufficient_quota".to_owned())
        );
        assert_eq!(
            error_code(br#"{"error":{"message":"m","type":"invalid_request_error","code":null}}"#),
            Some("invalid_request_error".to_owned())
        );
        assert_eq!(error_code(b"not json"), None);
    }
}
