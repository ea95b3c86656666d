//! One chat completion exchange: the request that every scheduled send reuses, and the
//! classification of what came back into a [`Success`] or a [`Failure`].

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::cli::LoadPlan;
use crate::endpoint::Endpoint;
use crate::sse::{BodyFault, BodyTally, SseScanner, tally_completion_body};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Set by Tollgate on the answers it forwards: whole milliseconds the request waited
/// in its admission queue for a GPU slot. Refusals (429, 503 "server busy") and other
/// targets (gpu-sim) do not send it.
pub const QUEUE_WAIT_HEADER: &str = "x-tollgate-queue-wait-ms";

/// A keep-alive pool sized to the in-flight cap, so a steady load reuses connections
/// instead of paying a TCP handshake per request.
pub fn http_client(max_in_flight: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    // Small request bodies and SSE chunks must not wait for Nagle's algorithm.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_in_flight)
        .build(connector)
}

/// Everything about a request that does not change between sends: the body is built
/// once and shared, so the generator spends its CPU on sending, not on serializing.
#[derive(Debug)]
pub struct RequestTemplate {
    uri: Uri,
    body: Bytes,
    content_type: HeaderValue,
    headers: Vec<(hyper::header::HeaderName, HeaderValue)>,
    /// One `Authorization` value per key of the mix, in [`crate::key_mix::KeyMix::keys`] order.
    authorizations: Vec<HeaderValue>,
    stream: bool,
    /// A `--body` was sent: the answer is read, not checked as a completion.
    custom_body: bool,
    timeout: Duration,
}

impl RequestTemplate {
    pub fn new(endpoint: &Endpoint, plan: &LoadPlan) -> anyhow::Result<Self> {
        let authorizations = plan
            .keys
            .iter()
            .flat_map(|mix| mix.keys())
            .map(|k| k.key.authorization())
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            uri: endpoint.uri().clone(),
            body: match &plan.body {
                Some(body) => body.clone(),
                None => chat_body(plan).context("serializing the request body")?,
            },
            content_type: HeaderValue::from_str(&plan.content_type)
                .context("--content-type is not a header value")?,
            headers: plan.headers.clone(),
            authorizations,
            stream: plan.stream,
            custom_body: plan.body.is_some(),
            timeout: plan.timeout,
        })
    }

    fn request(&self, key: Option<usize>) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, self.content_type.clone());
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        if let Some(auth) = key.and_then(|i| self.authorizations.get(i)) {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        request
    }
}

/// The JSON body of every request. Streams ask for a final usage chunk, as the OpenAI
/// SDKs do when a caller wants usage, so completion tokens can be counted.
pub fn chat_body(plan: &LoadPlan) -> Result<Bytes, serde_json::Error> {
    let mut body = serde_json::json!({
        "model": plan.model,
        "messages": [{"role": "user", "content": prompt_text(plan.prompt_bytes)}],
        "max_tokens": plan.max_tokens,
        "stream": plan.stream,
    });
    if plan.stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    serde_json::to_vec(&body).map(Bytes::from)
}

/// Exactly `bytes` bytes of space-separated common English words. Real words keep the
/// gateway's tokenizer near one token per word, as with real prompts; the last word is
/// cut to hit the size exactly.
pub fn prompt_text(bytes: usize) -> String {
    const WORDS: [&str; 16] = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "tired",
        "engineers",
        "measure",
        "latency",
        "carefully",
    ];
    let mut text = String::with_capacity(bytes + 16);
    for word in WORDS.iter().cycle() {
        if text.len() >= bytes {
            break;
        }
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(word);
    }
    text.truncate(bytes);
    text
}

/// A response that counts as served.
#[derive(Debug, Clone, Copy)]
pub struct Success {
    /// From the scheduled send time to the end of the body.
    pub latency: Duration,
    /// From the scheduled send time to the first body byte; streams only.
    pub ttfb: Option<Duration>,
    pub tally: BodyTally,
}

/// Why a sent request did not count as served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The target answered with a non-2xx status.
    Status(u16),
    /// No connection could be made (refused, unreachable, out of file descriptors).
    Connect,
    /// No complete response within `--timeout`.
    Timeout,
    /// A streamed body ended, or broke off, before `data: [DONE]`.
    TruncatedStream,
    /// A 2xx body that is not the expected OpenAI JSON or SSE.
    BadBody,
    /// The connection failed after it was made (reset, closed mid-response).
    Io,
}

/// What one exchange produced.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub outcome: Result<Success, Failure>,
    /// [`QUEUE_WAIT_HEADER`] of a 2xx answer. Kept even when the body then fails: the
    /// wait happened before the body, and dropping it would hide the waits of exactly
    /// the requests a struggling target broke off.
    pub queue_wait: Option<Duration>,
}

/// Sends one request and reads its whole body. `scheduled` is when the request was
/// due, not when it left: measuring from there keeps scheduler lag in the figures.
pub async fn exchange(
    client: &HttpClient,
    template: &RequestTemplate,
    key: Option<usize>,
    scheduled: Instant,
) -> Reply {
    // Written inside `attempt`, read after it: a timeout drops the attempt but must
    // not lose a wait that arrived with the headers.
    let mut queue_wait = None;
    let attempt = async {
        let response = client.request(template.request(key)).await.map_err(|e| {
            if e.is_connect() {
                Failure::Connect
            } else {
                Failure::Io
            }
        })?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            // Read the error body so the connection can go back to the pool.
            let _ = response.into_body().collect().await;
            return Err(Failure::Status(status));
        }
        queue_wait = queue_wait_of(response.headers());
        if template.stream {
            read_stream(response, scheduled).await
        } else {
            read_completion(response, scheduled, !template.custom_body).await
        }
    };
    let outcome = tokio::time::timeout(template.timeout, attempt)
        .await
        .unwrap_or(Err(Failure::Timeout));
    Reply {
        outcome,
        queue_wait,
    }
}

/// `None` when the header is absent or not a whole number of milliseconds: a value
/// this tool cannot read is left out rather than guessed.
fn queue_wait_of(headers: &HeaderMap) -> Option<Duration> {
    let millis = headers
        .get(QUEUE_WAIT_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_millis(millis))
}

/// Reads a whole answer; `completion`: it must be a chat completion.
async fn read_completion(
    response: Response<Incoming>,
    scheduled: Instant,
    completion: bool,
) -> Result<Success, Failure> {
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| Failure::Io)?
        .to_bytes();
    let latency = scheduled.elapsed();
    let tally = if completion {
        tally_completion_body(&body).map_err(|_| Failure::BadBody)?
    } else {
        BodyTally::default()
    };
    Ok(Success {
        latency,
        ttfb: None,
        tally,
    })
}

async fn read_stream(response: Response<Incoming>, scheduled: Instant) -> Result<Success, Failure> {
    let is_event_stream = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if !is_event_stream {
        return Err(Failure::BadBody);
    }
    let mut body = response.into_body();
    let mut scanner = SseScanner::new();
    let mut ttfb = None;
    while let Some(frame) = body.frame().await {
        // A connection that breaks mid-stream is a stream that ended without [DONE].
        let frame = frame.map_err(|_| Failure::TruncatedStream)?;
        let Ok(data) = frame.into_data() else {
            continue;
        }; // trailers
        if data.is_empty() {
            continue;
        }
        ttfb.get_or_insert_with(|| scheduled.elapsed());
        scanner.feed(&data).map_err(body_failure)?;
    }
    let tally = scanner.finish().map_err(body_failure)?;
    Ok(Success {
        latency: scheduled.elapsed(),
        ttfb,
        tally,
    })
}

fn body_failure(fault: BodyFault) -> Failure {
    match fault {
        BodyFault::Malformed => Failure::BadBody,
        BodyFault::Truncated => Failure::TruncatedStream,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::key_mix::KeyMix;

    fn plan(stream: bool) -> LoadPlan {
        LoadPlan {
            rate: 1.0,
            duration: Duration::from_secs(1),
            concurrency: 4,
            stream,
            body: None,
            content_type: "application/json".into(),
            headers: Vec::new(),
            prompt_bytes: 40,
            max_tokens: 16,
            model: "sim-model".into(),
            keys: Some(KeyMix::parse("sk-a:1").unwrap()),
            timeout: Duration::from_secs(5),
            threads: 1,
        }
    }

    #[test]
    fn prompt_has_exact_size_and_is_ascii_words() {
        for size in [1, 2, 3, 40, 256, 4096] {
            let prompt = prompt_text(size);
            assert_eq!(prompt.len(), size);
            assert!(
                prompt.bytes().all(|b| b.is_ascii_lowercase() || b == b' '),
                "{prompt:?}"
            );
        }
        assert!(prompt_text(30).starts_with("the quick brown fox"));
    }

    #[test]
    fn body_has_openai_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&chat_body(&plan(false)).unwrap()).unwrap();
        assert_eq!(body["model"], "sim-model");
        assert_eq!(body["max_tokens"], 16);
        assert_eq!(body["stream"], false);
        assert_eq!(body["messages"][0]["role"], "user");
        assert_eq!(body["messages"][0]["content"].as_str().unwrap().len(), 40);
        assert!(body.get("stream_options").is_none());

        let body: serde_json::Value =
            serde_json::from_slice(&chat_body(&plan(true)).unwrap()).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    /// Serves one connection with a canned raw HTTP/1.1 response and returns the
    /// request it received, so broken responses gpu-sim never sends can be tested.
    async fn one_shot_server(
        response: &'static str,
    ) -> (Endpoint, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request_complete(&request) {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed before sending the whole request");
                request.extend_from_slice(&buf[..n]);
            }
            socket.write_all(response.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
            String::from_utf8_lossy(&request).into_owned()
        });
        (Endpoint::parse(&format!("http://{addr}")).unwrap(), server)
    }

    /// Headers received and as many body bytes as their Content-Length says.
    fn request_complete(raw: &[u8]) -> bool {
        let text = String::from_utf8_lossy(raw);
        let Some(header_end) = text.find("\r\n\r\n") else {
            return false;
        };
        let length = text[..header_end]
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        raw.len() >= header_end + 4 + length
    }

    async fn reply_to(response: &'static str, stream: bool) -> (Reply, String) {
        let (endpoint, server) = one_shot_server(response).await;
        let template = RequestTemplate::new(&endpoint, &plan(stream)).unwrap();
        let reply = exchange(&http_client(1), &template, Some(0), Instant::now()).await;
        (reply, server.await.unwrap())
    }

    async fn exchange_with(
        response: &'static str,
        stream: bool,
    ) -> (Result<Success, Failure>, String) {
        let (reply, request) = reply_to(response, stream).await;
        (reply.outcome, request)
    }

    #[tokio::test]
    async fn request_carries_path_auth_and_json() {
        let (result, request) = exchange_with(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n\
             {\"choices\":[{\"message\":{\"content\":\"hi\"}}],\"usage\":{\"completion_tokens\":2}}",
            false,
        )
        .await;
        assert!(
            request.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("authorization: bearer sk-a\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{request}"
        );
        assert_eq!(result.unwrap().tally.completion_tokens, Some(2));
    }

    #[tokio::test]
    async fn stream_cut_before_done_is_truncated_stream() {
        let (result, _) = exchange_with(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
             data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            true,
        )
        .await;
        assert_eq!(result.unwrap_err(), Failure::TruncatedStream);
    }

    #[tokio::test]
    async fn complete_stream_counts_chunks_and_ttfb() {
        let (result, _) = exchange_with(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\nconnection: close\r\n\r\n\
             data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
             data: {\"choices\":[],\"usage\":{\"completion_tokens\":1}}\n\ndata: [DONE]\n\n",
            true,
        )
        .await;
        let success = result.unwrap();
        assert_eq!(
            success.tally,
            BodyTally {
                content_chunks: 1,
                completion_tokens: Some(1)
            }
        );
        assert!(success.ttfb.is_some_and(|t| t <= success.latency));
    }

    #[tokio::test]
    async fn stream_answered_with_json_is_bad_body() {
        let (result, _) = exchange_with(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{}",
            true,
        )
        .await;
        assert_eq!(result.unwrap_err(), Failure::BadBody);
    }

    #[tokio::test]
    async fn non_2xx_is_counted_by_status() {
        let (result, _) = exchange_with(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            false,
        )
        .await;
        assert_eq!(result.unwrap_err(), Failure::Status(429));
    }

    #[tokio::test]
    async fn garbage_completion_body_is_bad_body() {
        let (result, _) = exchange_with(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\nnot json",
            false,
        )
        .await;
        assert_eq!(result.unwrap_err(), Failure::BadBody);
    }

    #[tokio::test]
    async fn queue_wait_header_of_a_2xx_is_read_as_milliseconds() {
        let (reply, _) = reply_to(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-tollgate-queue-wait-ms: 1250\r\n\
             connection: close\r\n\r\n{\"choices\":[{\"message\":{\"content\":\"hi\"}}]}",
            false,
        )
        .await;
        assert!(reply.outcome.is_ok());
        assert_eq!(reply.queue_wait, Some(Duration::from_millis(1250)));
    }

    #[tokio::test]
    async fn queue_wait_of_a_2xx_is_kept_when_its_stream_breaks() {
        let (reply, _) = reply_to(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-tollgate-queue-wait-ms: 0\r\n\
             connection: close\r\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            true,
        )
        .await;
        assert_eq!(reply.outcome.unwrap_err(), Failure::TruncatedStream);
        assert_eq!(reply.queue_wait, Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn queue_wait_is_not_read_from_refusals() {
        // Tollgate sends no wait on its own refusals, but it does on upstream errors
        // it forwards; the figure covers 2xx answers only, so a non-2xx is never read.
        let (reply, _) = reply_to(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             x-tollgate-queue-wait-ms: 40\r\ncontent-length: 2\r\n\r\n{}",
            false,
        )
        .await;
        assert_eq!(reply.outcome.unwrap_err(), Failure::Status(503));
        assert_eq!(reply.queue_wait, None);
    }

    #[test]
    fn unreadable_queue_wait_is_left_out() {
        for value in ["-3", "1.5", "soon", ""] {
            let mut headers = HeaderMap::new();
            headers.insert(QUEUE_WAIT_HEADER, HeaderValue::from_str(value).unwrap());
            assert_eq!(queue_wait_of(&headers), None, "{value:?}");
        }
        assert_eq!(queue_wait_of(&HeaderMap::new()), None);
    }
}
