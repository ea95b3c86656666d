//! The triton protocol adapter against the real gpu-sim binary: requests
//! translated by `protocol::triton`, sent to gpu-sim's Triton routes, and the
//! answers translated back, read chunk by chunk as the gateway would.
//!
//! Completion tokens are checked against `tiktoken-rs`, independent of the
//! `bpe-openai` counter the adapter uses.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

mod support;

use support::Sim;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tollgate_backends::protocol::triton::{
    AnswerMeta, Endpoint, FinishReason, StreamOutcome, StreamTranscoder, TritonRequest,
    translate_error, translate_request, translate_response,
};
use tollgate_metering::tokens::Encoding;

impl Sim {
    async fn send(&self, request: &TritonRequest) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(&request.path))
            .header("content-type", "application/json")
            .body(request.body.clone())
            .send()
            .await
            .unwrap()
    }
}

fn cl100k(text: &str) -> u64 {
    tiktoken_rs::cl100k_base_singleton().count_ordinary(text) as u64
}

fn meta(id: &str, prompt_tokens: u64) -> AnswerMeta {
    AnswerMeta {
        id: id.to_owned(),
        created: 1_700_000_000,
        model: "sim-model".to_owned(),
        prompt_tokens,
        encoding: Encoding::Cl100k,
    }
}

/// Streams `request`'s answer through a transcoder, chunk by chunk as it
/// arrives, and returns the OpenAI bytes and the transcoder.
async fn transcode(
    sim: &Sim,
    request: &TritonRequest,
    meta: &AnswerMeta,
) -> (String, StreamTranscoder) {
    let response = sim.send(request).await;
    assert_eq!(response.status(), 200);
    let mut transcoder = StreamTranscoder::new(request.exchange, meta);
    let mut out = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        out.extend(transcoder.feed(&chunk.unwrap()));
    }
    out.extend(transcoder.finish());
    (String::from_utf8(out).unwrap(), transcoder)
}

/// The `data:` payloads of an SSE body, each event checked to be exactly one
/// `data:` line followed by a blank line.
fn sse_data(body: &str) -> Vec<&str> {
    assert!(body.ends_with("\n\n"), "{body:?}");
    body.split_terminator("\n\n")
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("{event:?}"));
            assert!(!data.contains('\n'), "{event:?}");
            data
        })
        .collect()
}

#[tokio::test]
async fn multi_turn_chat_streams_to_done_with_usage() {
    // Paced, so the answer arrives over many chunks, as from a real engine;
    // nothing below depends on where the chunks fall.
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "2000"]);
    let body = json!({
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is machine learning?"},
            {"role": "assistant", "content": "Learning patterns from data."},
            {"role": "user", "content": [{"type": "text", "text": "Give an example."}]},
        ],
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0.2,
    });
    let request = translate_request(Endpoint::ChatCompletions, &body).unwrap();
    assert_eq!(request.path, "/v2/models/sim-model/generate_stream");
    let (out, transcoder) = transcode(&sim, &request, &meta("chatcmpl-it", 42)).await;

    let events = sse_data(&out);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 4, "role, content, finish, usage: {out}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["id"], "chatcmpl-it");
        assert_eq!(chunk["model"], "sim-model");
        assert!(chunk["created"].is_u64());
        assert!(chunk["choices"].is_array());
        assert!(chunk.as_object().unwrap().contains_key("usage"));
    }
    let (usage_chunk, chunks) = chunks.split_last().unwrap();
    let (finish_chunk, chunks) = chunks.split_last().unwrap();
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let mut content = String::new();
    for chunk in &chunks[1..] {
        let choice = &chunk["choices"][0];
        assert_eq!(choice["finish_reason"], Value::Null);
        assert_eq!(choice["delta"].as_object().unwrap().len(), 1, "{chunk}");
        content.push_str(choice["delta"]["content"].as_str().unwrap());
        assert_eq!(chunk["usage"], Value::Null);
    }
    assert!(!content.is_empty());
    assert_eq!(finish_chunk["choices"][0]["delta"], json!({}));
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], "stop");

    let completion_tokens = cl100k(&content);
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 42, "completion_tokens": completion_tokens,
               "total_tokens": 42 + completion_tokens})
    );
    assert_eq!(transcoder.generated_text(), content);
    assert_eq!(transcoder.completion_tokens(), completion_tokens);
    assert_eq!(transcoder.usage().total_tokens(), 42 + completion_tokens);
    assert_eq!(
        transcoder.outcome(),
        Some(&StreamOutcome::Completed(FinishReason::Stop))
    );
    assert_eq!(transcoder.skipped_events(), 0);
}

#[tokio::test]
async fn completions_stream_stops_at_max_tokens_without_usage() {
    let sim = Sim::fast(&[]);
    let body = json!({
        "model": "sim-model",
        "prompt": ["Once upon a time"],
        "max_tokens": 7,
        "stream": true,
    });
    let request = translate_request(Endpoint::Completions, &body).unwrap();
    let (out, transcoder) = transcode(&sim, &request, &meta("cmpl-it", 4)).await;

    let events = sse_data(&out);
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "text_completion" && c.get("usage").is_none())
    );
    // gpu-sim honours max_tokens exactly and every word is one token.
    assert_eq!(cl100k(&text), 7);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(transcoder.completion_tokens(), 7);
}

#[tokio::test]
async fn non_streamed_generate_round_trip() {
    let sim = Sim::fast(&[]);
    let body = json!({
        "model": "sim-model",
        "messages": [{"role": "user", "content": "What is ML?"}],
        "max_completion_tokens": 5,
    });
    let request = translate_request(Endpoint::ChatCompletions, &body).unwrap();
    assert_eq!(request.path, "/v2/models/sim-model/generate");
    assert!(!request.exchange.stream);
    let response = sim.send(&request).await;
    assert_eq!(response.status(), 200);
    let triton_body = response.bytes().await.unwrap();
    let triton: Value = serde_json::from_slice(&triton_body).unwrap();
    let text = triton["text_output"].as_str().unwrap();

    let answer =
        translate_response(request.exchange, &meta("chatcmpl-whole", 9), &triton_body).unwrap();
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["id"], "chatcmpl-whole");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": text})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14})
    );
    assert_eq!(cl100k(text), 5);
    assert_eq!(answer.finish_reason, FinishReason::Length);
}

#[tokio::test]
async fn unknown_model_error_becomes_openai_error() {
    let sim = Sim::fast(&[]);
    let body = json!({"model": "no-such-model", "prompt": "x"});
    let request = translate_request(Endpoint::Completions, &body).unwrap();
    let response = sim.send(&request).await;
    let status = response.status().as_u16();
    assert_eq!(status, 400, "Triton answers 400 for unknown models");
    let error = translate_error(status, &response.bytes().await.unwrap());
    let body: Value = serde_json::from_slice(&error.openai_body()).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "backend_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "{body}"
    );
}

#[tokio::test]
async fn abort_mid_stream_becomes_openai_error_event_without_done() {
    let sim = Sim::fast(&["--abort-mid-stream-rate", "1", "--output-tokens", "50"]);
    let body = json!({
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let request = translate_request(Endpoint::ChatCompletions, &body).unwrap();
    let (out, transcoder) = transcode(&sim, &request, &meta("chatcmpl-abort", 8)).await;

    let events = sse_data(&out);
    assert!(!events.contains(&"[DONE]"), "{out}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let error = &last["error"];
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "backend_error");
    assert_eq!(error["param"], Value::Null);
    assert!(
        error["message"].as_str().unwrap().contains("abort"),
        "{last}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks.len() >= 2,
        "the role chunk and at least one token: {out}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["usage"].is_null() && c["choices"][0]["finish_reason"].is_null()),
        "no finish or usage chunk after a failure: {out}"
    );

    assert!(transcoder.failed());
    let generated = transcoder.generated_text();
    assert!(!generated.is_empty());
    let completion_tokens = transcoder.completion_tokens();
    assert_eq!(completion_tokens, cl100k(generated));
    assert!((1..50).contains(&completion_tokens), "{completion_tokens}");
}
