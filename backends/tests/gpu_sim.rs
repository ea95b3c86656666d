//! gpu-sim over loopback: the real binary, started per test on a free port.
//!
//! Token counts are checked against `tiktoken-rs`, an implementation of the
//! tiktoken encodings independent of the `bpe-openai` the simulator counts with.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

mod support;
#[path = "gpu_sim/vllm.rs"]
mod vllm;

use std::process::{Command, ExitStatus};
use support::Sim;

use base64::Engine as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tollgate_testkit::eventually;

impl Sim {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.post(path, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn get_status(&self, path: &str) -> u16 {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn terminate(mut self) -> ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }
}

fn cl100k(text: &str) -> usize {
    tiktoken_rs::cl100k_base_singleton().count_ordinary(text)
}

/// OpenAI's chat prompt count (3 per message + role + content, + 3 reply priming).
fn chat_prompt_tokens(count: fn(&str) -> usize, messages: &[(&str, &str)]) -> usize {
    3 + messages
        .iter()
        .map(|(role, content)| 3 + count(role) + count(content))
        .sum::<usize>()
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn chat_request(content: &str, max_tokens: Option<u32>) -> Value {
    let mut body =
        json!({"model": "sim-model", "messages": [{"role": "user", "content": content}]});
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    body
}

#[tokio::test]
async fn chat_completion_reports_true_usage() {
    let sim = Sim::fast(&[]);
    let prompt = "Explain how a GPU schedules thousands of threads, briefly. 日本語も少し。";
    let (status, body) = sim
        .post_json("/v1/chat/completions", chat_request(prompt, None))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "sim-model");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["prompt_tokens"],
        chat_prompt_tokens(cl100k, &[("user", prompt)])
    );
    assert_eq!(usage["completion_tokens"], cl100k(text));
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
}

#[tokio::test]
async fn gpt_4o_models_are_counted_with_o200k() {
    let sim = Sim::fast(&["--model", "gpt-4o-2024-11-20"]);
    let prompt = "Ünïcödé and emoji 🚀 count differently in o200k";
    let mut request = chat_request(prompt, None);
    request["model"] = json!("gpt-4o-2024-11-20");
    let (status, body) = sim.post_json("/v1/chat/completions", request).await;
    assert_eq!(status, 200, "{body}");
    let o200k = |t: &str| tiktoken_rs::o200k_base_singleton().count_ordinary(t);
    assert_eq!(
        body["usage"]["prompt_tokens"],
        chat_prompt_tokens(o200k, &[("user", prompt)])
    );
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(body["usage"]["completion_tokens"], o200k(text));
}

#[tokio::test]
async fn max_tokens_is_honoured_exactly() {
    let sim = Sim::fast(&["--output-tokens", "100"]);
    for max_tokens in [1, 7, 99] {
        let (status, body) = sim
            .post_json("/v1/chat/completions", chat_request("hi", Some(max_tokens)))
            .await;
        assert_eq!(status, 200);
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(cl100k(text), max_tokens as usize);
        assert_eq!(body["usage"]["completion_tokens"], max_tokens);
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }
    // max_completion_tokens, the newer name, wins over max_tokens.
    let mut request = chat_request("hi", Some(50));
    request["max_completion_tokens"] = json!(3);
    let (_, body) = sim.post_json("/v1/chat/completions", request).await;
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn streamed_chat_matches_unstreamed_and_ends_with_usage() {
    let sim = Sim::fast(&[]);
    let prompt = "Stream me a deterministic answer";
    let (_, whole) = sim
        .post_json("/v1/chat/completions", chat_request(prompt, Some(20)))
        .await;

    let mut request = chat_request(prompt, Some(20));
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = sim.post("/v1/chat/completions", request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );

    let (usage_chunk, content_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], cl100k(&text));
    // With include_usage, every other chunk carries "usage": null, as OpenAI's do.
    assert!(content_chunks.iter().all(|c| c["usage"].is_null()));
    let finish = content_chunks.last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let sim = Sim::fast(&[]);
    let mut request = chat_request("hi", Some(4));
    request["stream"] = json!(true);
    let events = sse_data(
        &sim.post("/v1/chat/completions", request)
            .await
            .text()
            .await
            .unwrap(),
    );
    // role chunk + 4 tokens + finish chunk + [DONE]
    assert_eq!(events.len(), 7, "{events:?}");
    for event in &events[..6] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }
}

#[tokio::test]
async fn paced_stream_sends_first_token_before_the_rest_exist() {
    // One token per 100 s: the first token must arrive on its own, long before
    // the answer is complete, so the stream is not buffered to the end.
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "0.01"]);
    let mut request = chat_request("hi", Some(5));
    request["stream"] = json!(true);
    let mut response = sim.post("/v1/chat/completions", request).await;
    let first = response.chunk().await.unwrap().unwrap();
    let events = sse_data(std::str::from_utf8(&first).unwrap());
    assert_eq!(events.len(), 2, "role chunk and first token: {events:?}");
    let token: Value = serde_json::from_str(&events[1]).unwrap();
    assert!(token["choices"][0]["delta"]["content"].is_string());
}

#[tokio::test]
async fn completions_endpoint_streamed_and_not() {
    let sim = Sim::fast(&[]);
    let request = json!({"model": "sim-model", "prompt": "Once upon a time", "max_tokens": 6});
    let (status, body) = sim.post_json("/v1/completions", request.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], cl100k("Once upon a time"));
    assert_eq!(body["usage"]["completion_tokens"], 6);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = sse_data(
        &sim.post("/v1/completions", streamed)
            .await
            .text()
            .await
            .unwrap(),
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed_text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed_text, text);
    assert_eq!(chunks.last().unwrap()["usage"], body["usage"]);

    // Token-array prompts count one token per id.
    let request = json!({"model": "sim-model", "prompt": [1, 2, 3, 4], "max_tokens": 1});
    let (_, body) = sim.post_json("/v1/completions", request).await;
    assert_eq!(body["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn embeddings_in_float_and_base64() {
    let sim = Sim::fast(&[]);
    let request = json!({"model": "sim-model", "input": ["first text", "second"], "dimensions": 8});
    let (status, floats) = sim.post_json("/v1/embeddings", request.clone()).await;
    assert_eq!(status, 200, "{floats}");
    assert_eq!(floats["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        floats["usage"]["prompt_tokens"],
        cl100k("first text") + cl100k("second")
    );
    let vector: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(vector.len(), 8);
    let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);

    // The official SDKs ask for base64 by default: little-endian f32s.
    let mut request = request;
    request["encoding_format"] = json!("base64");
    let (_, encoded) = sim.post_json("/v1/embeddings", request).await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, vector);
}

#[tokio::test]
async fn models_are_listed_in_openai_shape() {
    let sim = Sim::fast(&["--model", "a", "--model", "b"]);
    let body: Value = reqwest::get(sim.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model")
    );
}

#[tokio::test]
async fn same_seed_same_answer_across_processes() {
    let request = chat_request("deterministic?", None);
    let (_, a) = Sim::fast(&["--seed", "7"])
        .post_json("/v1/chat/completions", request.clone())
        .await;
    let (_, b) = Sim::fast(&["--seed", "7"])
        .post_json("/v1/chat/completions", request.clone())
        .await;
    let (_, c) = Sim::fast(&["--seed", "8"])
        .post_json("/v1/chat/completions", request)
        .await;
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(text(&a), text(&b));
    assert_ne!(text(&a), text(&c));
}

#[tokio::test]
async fn no_usage_flag_omits_usage_everywhere() {
    let sim = Sim::fast(&["--no-usage"]);
    let (_, body) = sim
        .post_json("/v1/chat/completions", chat_request("hi", Some(3)))
        .await;
    assert!(body.get("usage").is_none(), "{body}");
    let mut request = chat_request("hi", Some(3));
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let text = sim
        .post("/v1/chat/completions", request)
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn startup_delay_makes_health_503_then_200() {
    let sim = Sim::fast(&["--startup-delay", "3"]);
    assert_eq!(sim.get_status("/health").await, 503);
    assert_eq!(sim.get_status("/v2/health/ready").await, 503);
    assert_eq!(sim.get_status("/v2/health/live").await, 200);
    let (status, body) = sim
        .post_json("/v1/chat/completions", chat_request("too early", None))
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "model_not_ready");

    eventually("/health turns 200", || async {
        sim.get_status("/health").await == 200
    })
    .await;
    assert_eq!(sim.get_status("/v2/health/ready").await, 200);
    assert_eq!(sim.get_status("/v2/models/sim-model/ready").await, 200);
}

#[tokio::test]
async fn max_concurrency_queues_the_excess_and_shows_it_in_metrics() {
    // A long TTFT keeps the first two requests in their slots while we look.
    let sim = Sim::start(&["--max-concurrency", "2", "--ttft-ms", "600000"]);
    let requests: Vec<_> = (0..5)
        .map(|i| {
            let client = reqwest::Client::new();
            let url = sim.url("/v1/chat/completions");
            let body = chat_request(&format!("request {i}"), Some(1));
            tokio::spawn(async move { client.post(url).json(&body).send().await })
        })
        .collect();
    eventually("2 running and 3 waiting", || async {
        let metrics = sim.metrics().await;
        metrics.contains("vllm:num_requests_running{model_name=\"sim-model\"} 2")
            && metrics.contains("vllm:num_requests_waiting{model_name=\"sim-model\"} 3")
    })
    .await;
    let metrics = sim.metrics().await;
    assert!(
        metrics.contains("nv_inference_pending_request_count{model=\"sim-model\",version=\"1\"} 3")
    );
    assert!(metrics.contains("vllm:kv_cache_usage_perc 1"), "{metrics}");
    assert!(metrics.contains("nv_gpu_utilization{gpu_uuid="));
    for request in requests {
        request.abort();
    }
}

#[tokio::test]
async fn metrics_count_tokens_and_time_to_first_token() {
    let sim = Sim::fast(&[]);
    sim.post_json("/v1/chat/completions", chat_request("hi", Some(5)))
        .await;
    let metrics = sim.metrics().await;
    assert!(metrics.contains("vllm:generation_tokens_total{model_name=\"sim-model\"} 5"));
    assert!(metrics.contains("vllm:time_to_first_token_seconds_count{model_name=\"sim-model\"} 1"));
    assert!(metrics.contains(
        "vllm:time_to_first_token_seconds_bucket{model_name=\"sim-model\",le=\"+Inf\"} 1"
    ));
}

/// Images and speech: real files, counted in `/metrics` under gpu-sim's
/// own names, and refused like OpenAI refuses them.
#[tokio::test]
async fn images_and_speech_are_real_files_and_are_counted() {
    let sim = Sim::fast(&["--speech-secs-per-char", "0.5"]);
    let (status, images) = sim
        .post_json(
            "/v1/images/generations",
            json!({"model": "sim-model", "prompt": "a fox", "n": 2, "size": "32x16",
                   "response_format": "b64_json"}),
        )
        .await;
    assert_eq!(status, 200);
    let png = base64::engine::general_purpose::STANDARD
        .decode(images["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    // PNG signature, then the IHDR chunk's width and height.
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(
        (&png[16..20], &png[20..24]),
        (&32u32.to_be_bytes()[..], &16u32.to_be_bytes()[..])
    );
    let speech = sim
        .post(
            "/v1/audio/speech",
            json!({"model": "sim-model", "input": "four"}),
        )
        .await;
    assert_eq!(speech.headers()["content-type"], "audio/wav");
    let wav = speech.bytes().await.unwrap();
    // 4 characters x 0.5 s x 16 kHz x 2 bytes, after the 44-byte header.
    assert_eq!(wav.len(), 44 + 4 * 8000 * 2);
    let metrics = sim.metrics().await;
    assert!(
        metrics.contains("gpu_sim_images_generated_total{model_name=\"sim-model\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gpu_sim_speech_seconds_total{model_name=\"sim-model\"} 2"),
        "{metrics}"
    );
    let (status, _) = sim
        .post_json(
            "/v1/images/generations",
            json!({"model": "sim-model", "prompt": "a fox", "n": 11}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn error_injection_returns_openai_error_json() {
    let sim = Sim::fast(&["--error-rate", "1"]);
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = json!({"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "prompt": "x"});
        let (status, body) = sim.post_json(path, body).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["type"], "server_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--error-rate")
        );
        assert!(body["error"].as_object().unwrap().contains_key("param"));
        assert!(body["error"].as_object().unwrap().contains_key("code"));
    }
}

#[tokio::test]
async fn error_rate_is_a_fraction_of_requests() {
    let sim = Sim::fast(&["--error-rate", "0.5", "--seed", "3"]);
    let mut failures = 0;
    for i in 0..200 {
        let (status, _) = sim
            .post_json(
                "/v1/chat/completions",
                chat_request(&format!("{i}"), Some(1)),
            )
            .await;
        assert!(status == 200 || status == 500);
        failures += usize::from(status == 500);
    }
    // Deterministic draws; a fair rate lands well inside this band.
    assert!((60..=140).contains(&failures), "{failures} of 200 failed");
}

#[tokio::test]
async fn abort_mid_stream_drops_openai_stream_before_done() {
    let sim = Sim::fast(&["--abort-mid-stream-rate", "1", "--output-tokens", "50"]);
    let mut request = chat_request("hi", None);
    request["stream"] = json!(true);
    let response = sim.post("/v1/chat/completions", request).await;
    assert_eq!(response.status(), 200);
    let result = response.text().await;
    // The connection is reset mid-body: either the read fails or, at best, no [DONE].
    if let Ok(text) = result {
        assert!(!text.contains("[DONE]"), "{text}");
    }
}

#[tokio::test]
async fn abort_mid_stream_ends_triton_stream_with_error_event() {
    let sim = Sim::fast(&["--abort-mid-stream-rate", "1", "--output-tokens", "50"]);
    let response = sim
        .post(
            "/v2/models/sim-model/generate_stream",
            json!({"text_input": "hi"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_data(&response.text().await.unwrap());
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"].as_str().unwrap().contains("abort"), "{last}");
    assert!(events.len() >= 2, "at least one token before the abort");
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let sim = Sim::fast(&[]);
    let client = reqwest::Client::new();

    let response = client
        .post(sim.url("/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let (status, body) = sim
        .post_json("/v1/chat/completions", json!({"model": "sim-model"}))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages")
    );

    let (status, body) = sim
        .post_json(
            "/v1/chat/completions",
            json!({"model": "sim-model", "messages": []}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("messages"))
    );

    let (status, body) = sim
        .post_json("/v1/chat/completions", chat_request("hi", Some(0)))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("max_tokens"))
    );

    let mut request = chat_request("hi", None);
    request["model"] = json!("no-such-model");
    let (status, body) = sim.post_json("/v1/chat/completions", request).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");

    let response = client
        .get(sim.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");

    let response = client
        .get(sim.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn triton_generate_and_generate_stream_shapes() {
    let sim = Sim::fast(&["--model", "ensemble"]);
    let (status, body) = sim
        .post_json(
            "/v2/models/ensemble/generate",
            json!({"text_input": "What is ML?", "parameters": {"max_tokens": 5}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_name"], "ensemble");
    assert_eq!(body["model_version"], "1");
    let text = body["text_output"].as_str().unwrap();
    assert_eq!(cl100k(text), 5);
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");

    // TensorRT-LLM's ensemble takes max_tokens as a top-level input.
    let response = sim
        .post(
            "/v2/models/ensemble/generate_stream",
            json!({"text_input": "What is ML?", "max_tokens": 5}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.len(), 5);
    let pieces: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        pieces
            .iter()
            .all(|p| p["model_name"] == "ensemble" && p["model_version"] == "1")
    );
    let streamed: String = pieces
        .iter()
        .map(|p| p["text_output"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);

    assert_eq!(sim.get_status("/v2/models/ensemble/ready").await, 200);
    assert_eq!(sim.get_status("/v2/models/unknown/ready").await, 400);
    let (status, body) = sim
        .post_json("/v2/models/unknown/generate", json!({"text_input": "x"}))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("unknown"));
    let (status, body) = sim
        .post_json("/v2/models/ensemble/generate", json!({"prompt": "x"}))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("text_input"));
}

#[tokio::test]
async fn injected_engine_failure_fails_health_until_recovered() {
    let sim = Sim::fast(&[]);
    let client = reqwest::Client::new();
    assert_eq!(sim.get_status("/health").await, 200);
    client.post(sim.url("/sim/fail")).send().await.unwrap();
    assert_eq!(sim.get_status("/health").await, 503);
    assert_eq!(sim.get_status("/v2/health/ready").await, 503);
    let (status, body) = sim
        .post_json("/v1/chat/completions", chat_request("hi", None))
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "engine_failed");
    client.post(sim.url("/sim/recover")).send().await.unwrap();
    assert_eq!(sim.get_status("/health").await, 200);
}

#[tokio::test]
async fn api_key_flag_requires_the_key_on_openai_routes() {
    let sim = Sim::fast(&["--api-key", "sk-backend"]);
    let client = reqwest::Client::new();
    let url = sim.url("/v1/chat/completions");
    let request = chat_request("hi", Some(1));
    let refused = client.post(&url).json(&request).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let wrong = client
        .post(&url)
        .bearer_auth("tg_client")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let accepted = client
        .post(&url)
        .bearer_auth("sk-backend")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    // Health and metrics stay open, as on vLLM.
    assert_eq!(sim.get_status("/health").await, 200);
}

#[tokio::test]
async fn exits_cleanly_on_sigterm() {
    let sim = Sim::fast(&[]);
    assert_eq!(sim.get_status("/health").await, 200);
    assert!(sim.terminate().success());
}

#[test]
fn help_documents_every_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_gpu-sim"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--listen",
        "--model",
        "--ttft-ms",
        "--tokens-per-sec",
        "--max-concurrency",
        "--startup-delay",
        "--error-rate",
        "--abort-mid-stream-rate",
        "--no-usage",
        "--api-key",
        "--seed",
        "--output-tokens",
        "--max-request-tokens",
        "--encoding",
        "--threads",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}
