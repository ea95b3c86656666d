//! The money path: every answer that reaches a client is billed, whatever
//! its size or ending, and whatever happens to Tollgate after it was sent.
//! Each test is named after the defect it pins.

use super::metering::StoredEvent;
use super::*;

/// The generated text of a JSON chat answer, recounted with tiktoken-rs.
fn recount_json_chat(body: &Value) -> i64 {
    body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| cl100k(c["message"]["content"].as_str().unwrap_or("")) as i64)
        .sum()
}

/// Before: a JSON answer over `max_buffered_response_bytes` (16 MiB) passed
/// through unread, and its event billed 0 completion tokens.
#[tokio::test]
async fn a_json_answer_over_16_mib_is_billed_from_its_usage() {
    // Every gpu-sim word is one token of about five bytes: 4M tokens ≈ 20 MiB.
    const TOKENS: u32 = 4_000_000;
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--output-tokens",
        &TOKENS.to_string(),
        "--max-request-tokens",
        &(2 * TOKENS).to_string(),
    ]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let response = gateway
        .post_with_id(&key, "/v1/chat/completions", &chat("long", TOKENS), "huge")
        .await;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert!(body.len() > 16 << 20, "{} bytes", body.len());
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], TOKENS);
    let event = gateway.event_of("huge").await;
    assert_eq!(event.status, "ok");
    assert_eq!(event.usage_source, "backend");
    assert_eq!(event.completion_tokens, i64::from(TOKENS));
    assert_eq!(recount_json_chat(&body), i64::from(TOKENS));
}

/// Before: with `count_tokens = false`, a stream the client cut short
/// carried no usage and was billed as zero.
#[tokio::test]
async fn a_stream_cut_short_is_billed_for_what_was_delivered_even_without_counting() {
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "20"]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            metering: "count_tokens = false",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let mut response = gateway
        .post_with_id(
            &key,
            "/v1/chat/completions",
            &streamed(chat("go on", 200)),
            "cut",
        )
        .await;
    let mut received = String::new();
    while sse_text(&received).split_whitespace().count() < 5 {
        received.push_str(std::str::from_utf8(&response.chunk().await.unwrap().unwrap()).unwrap());
    }
    let seen = cl100k(&sse_text(&received)) as i64;
    drop(response);
    let event = gateway.event_of("cut").await;
    assert_eq!(event.status, "partial");
    assert_eq!(event.usage_source, "counted");
    assert!(
        event.completion_tokens >= seen && event.completion_tokens < 200,
        "billed {} for {seen} delivered",
        event.completion_tokens
    );
    assert_eq!(
        event.prompt_tokens,
        super::metering::chat_prompt_tokens(&[("user", "go on")])
    );
}

/// The content of every chat chunk in `stream` so far, joined.
fn sse_text(stream: &str) -> String {
    sse_data(stream)
        .iter()
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Before: an event sat in memory until its batch was written, so a
/// SIGKILL lost the events of answers the clients already had. With
/// batches written every ten minutes, every event is still in memory when
/// Tollgate is killed: only the journal can bring them back.
#[tokio::test]
async fn answers_received_before_a_sigkill_are_billed_after_restart() {
    let sim = Sim::fast();
    let mut gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            metering: "flush_interval = \"10m\"\nbatch_size = 100000",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    const REQUESTS: usize = 60;
    let mut answered = Vec::new();
    for i in 0..REQUESTS {
        let id = format!("killed-{i}");
        let body = if i % 2 == 0 {
            chat("before the crash", 3)
        } else {
            streamed(chat("before the crash", 3))
        };
        let response = gateway
            .post_with_id(&key, "/v1/chat/completions", &body, &id)
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        answered.push(id);
    }
    assert!(
        gateway.usage_events().await.is_empty(),
        "nothing written yet"
    );
    kill(gateway.proc.as_ref().unwrap().pid(), Signal::SIGKILL).unwrap();
    gateway.wait_exit();

    gateway.serve().await;
    eventually("every answered request is billed", || async {
        gateway.usage_events().await.len() >= REQUESTS
    })
    .await;
    let events = gateway.usage_events().await;
    assert_eq!(events.len(), REQUESTS, "one event each, no more");
    for id in &answered {
        let event: &StoredEvent = events.iter().find(|e| &e.request_id == id).unwrap();
        assert_eq!(event.status, "ok", "{id}");
        assert_eq!(event.completion_tokens, 3, "{id}");
    }
}

/// Before: the client's `Accept-Encoding` went upstream, so a backend
/// behind a compressing proxy answered in gzip, which metering cannot read.
#[tokio::test]
async fn backends_are_asked_for_answers_metering_can_read() {
    let recorder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let recorder_url = format!("http://{}", recorder.local_addr().unwrap());
    let head = std::thread::spawn(move || record_one_request(&recorder));
    let gateway = Gateway::start(
        &[BackendSpec::new(&recorder_url)],
        Options {
            health: "interval = \"1h\"",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let response = gateway
        .client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip, br")
        .json(&chat("hi", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let head = head.join().unwrap().to_ascii_lowercase();
    assert!(head.contains("\r\naccept-encoding: identity\r\n"), "{head}");
    assert!(!head.contains("gzip"), "{head}");
}

/// Before: a Triton backend reports no usage, Tollgate computes it, and the
/// event said `backend`.
#[tokio::test]
async fn usage_tollgate_computed_for_a_triton_backend_is_recorded_as_counted() {
    let sim = Sim::fast();
    let mut triton = BackendSpec::new(&sim.url);
    triton.protocol = Some("triton");
    let gateway = Gateway::start(&[triton], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    for (id, body) in [
        ("whole", chat("hello triton", 4)),
        ("stream", {
            let mut body = streamed(chat("hello triton", 4));
            body["stream_options"] = json!({"include_usage": true});
            body
        }),
    ] {
        let response = gateway
            .post_with_id(&key, "/v1/chat/completions", &body, id)
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        let event = gateway.event_of(id).await;
        assert_eq!(event.usage_source, "counted", "{id}");
        assert_eq!(event.completion_tokens, 4, "{id}");
    }
}

/// A capped tier of `units` units (a token each).
fn capped(units: u64) -> Option<String> {
    Some(format!(
        "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = {units}\nhard_cap = true\n"
    ))
}

/// Before: a completions request with a prompt array reserved `n` answers
/// where the backend generated `n` per prompt, so three prompts × two
/// choices spent three times what was reserved, past the hard cap.
#[tokio::test]
async fn completions_with_a_prompt_array_reserve_and_cap_for_every_prompt_and_choice() {
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--output-tokens",
        "50",
    ]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: capped(200),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let body =
        json!({"model": "sim-model", "prompt": ["one", "two", "three"], "n": 2, "max_tokens": 50});
    let response = gateway
        .post_with_id(&key, "/v1/completions", &body, "array")
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6, "every prompt gets both choices");
    let event = gateway.event_of("array").await;
    // 3 prompt tokens and six answers, shortened to fit the 200 units.
    assert!(
        event.units <= 200,
        "billed {} units of a 200 cap",
        event.units
    );
    assert_eq!(event.prompt_tokens, 3);
    let recount: i64 = choices
        .iter()
        .map(|c| cl100k(c["text"].as_str().unwrap()) as i64)
        .sum();
    assert_eq!(event.completion_tokens, recount);
    assert_eq!(gateway.units_logged().await, event.units);
}

/// Before: `max_completion_tokens` was read as the limit of a legacy
/// completion, which backends ignore there: the reservation covered two
/// tokens and the backend generated its default, past the cap.
#[tokio::test]
async fn a_legacy_completion_is_capped_in_the_field_its_backend_honours() {
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "0"]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: capped(30),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let body = json!({"model": "sim-model", "prompt": "hi", "max_completion_tokens": 2});
    for _ in 0..4 {
        let (status, answer) = gateway.post_json(&key, "/v1/completions", &body).await;
        assert!(matches!(status, 200 | 429), "{answer}");
    }
    eventually("every request is logged", || async {
        gateway.usage_events().await.len() == 4
    })
    .await;
    let used = gateway.units_logged().await;
    assert!(used <= 30, "{used} units billed under a 30-unit hard cap");

    let both = json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
                      "max_completion_tokens": 1, "max_tokens": 500});
    let (status, answer) = gateway.post_json(&key, "/v1/chat/completions", &both).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["param"], "max_completion_tokens");
}

/// Without a usage report, each choice's text is counted apart (tokens never
/// span two choices), streamed or not. (gpu-sim's words are space-led, so
/// counting them joined gave the same figure: this pins the per-choice count,
/// it did not fail before.)
#[tokio::test]
async fn several_choices_without_usage_are_counted_choice_by_choice() {
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "0", "--no-usage"]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let mut body = chat("tell me more", 40);
    body["n"] = json!(3);
    for (id, body) in [("whole", body.clone()), ("stream", streamed(body))] {
        let response = gateway
            .post_with_id(&key, "/v1/chat/completions", &body, id)
            .await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let mut by_choice = std::collections::BTreeMap::<u64, String>::new();
        if id == "stream" {
            for data in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
                let chunk: Value = serde_json::from_str(data).unwrap();
                for choice in chunk["choices"].as_array().into_iter().flatten() {
                    let piece = choice["delta"]["content"].as_str().unwrap_or("");
                    by_choice
                        .entry(choice["index"].as_u64().unwrap())
                        .or_default()
                        .push_str(piece);
                }
            }
        } else {
            let answer: Value = serde_json::from_str(&text).unwrap();
            for choice in answer["choices"].as_array().unwrap() {
                by_choice.insert(
                    choice["index"].as_u64().unwrap(),
                    choice["message"]["content"].as_str().unwrap().to_owned(),
                );
            }
        }
        assert_eq!(by_choice.len(), 3);
        let recount: i64 = by_choice.values().map(|t| cl100k(t) as i64).sum();
        let event = gateway.event_of(id).await;
        assert_eq!(event.usage_source, "counted", "{id}");
        assert_eq!(event.completion_tokens, recount, "{id}");
    }
}

/// Embeddings of an array, tool calls and logprobs are reserved and billed
/// as any request: the backend's figures, the prompt counted with the tools,
/// and no logprob tokens taken for generated text.
#[tokio::test]
async fn embeddings_arrays_tool_calls_and_logprobs_are_billed_like_any_request() {
    let sim = Sim::fast();
    let bare = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "0", "--no-usage"]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let without_usage = Gateway::start(&[BackendSpec::new(&bare.url)], Options::default()).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "The weather in a city", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let requests = [
        (
            "embeddings",
            "/v1/embeddings",
            json!({"model": "sim-model", "input": ["first text", "second, longer text", "third"]}),
        ),
        (
            "tools",
            "/v1/chat/completions",
            json!({"model": "sim-model", "messages": [{"role": "user", "content": "weather in Oslo?"}],
                "tools": tools, "tool_choice": "required", "max_tokens": 30}),
        ),
        (
            "logprobs",
            "/v1/chat/completions",
            json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
                "logprobs": true, "top_logprobs": 3, "max_tokens": 12}),
        ),
    ];
    for (id, path, body) in &requests {
        let key = gateway.create_key("acme", &[]);
        let response = gateway.post_with_id(&key, path, body, id).await;
        assert_eq!(response.status(), 200, "{id}");
        let answer: Value = response.json().await.unwrap();
        let event = gateway.event_of(id).await;
        assert_eq!(event.usage_source, "backend", "{id}");
        assert_eq!(
            event.prompt_tokens,
            answer["usage"]["prompt_tokens"].as_i64().unwrap(),
            "{id}"
        );
        // Tollgate's own prompt count, tools included, agrees with the backend's.
        assert_eq!(
            event.counted_prompt_tokens,
            Some(event.prompt_tokens),
            "{id}"
        );
        assert_eq!(
            event.completion_tokens,
            answer["usage"]["completion_tokens"].as_i64().unwrap_or(0),
            "{id}"
        );
    }
    // Without usage, only generated text is counted: the tool call's
    // arguments, the message's content, never the logprobs' tokens.
    for (id, path, body) in &requests[1..] {
        let key = without_usage.create_key("acme", &[]);
        let response = without_usage.post_with_id(&key, path, body, id).await;
        let answer: Value = response.json().await.unwrap();
        let message = &answer["choices"][0]["message"];
        let generated = format!(
            "{}{}",
            message["content"].as_str().unwrap_or(""),
            message["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap_or("")
        );
        let event = without_usage.event_of(id).await;
        assert_eq!(event.usage_source, "counted", "{id}");
        let name = message["tool_calls"][0]["function"]["name"]
            .as_str()
            .unwrap_or("");
        let recount = cl100k(&format!("{name}{generated}")) as i64;
        assert_eq!(event.completion_tokens, recount, "{id}: {answer}");
    }
}
