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
