//! OpenAI's Responses API (`/v1/responses`) through the gateway: passed
//! through as it came, streamed events included, metered and reserved in
//! tokens like chat, from its own usage names or, without them, from the
//! text it generated.

use super::*;

fn respond(input: Value, max_output_tokens: u32) -> Value {
    json!({"model": "sim-model", "input": input, "max_output_tokens": max_output_tokens})
}

/// The events of a stream, with their `event:` names and `data`.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            (name.to_owned(), serde_json::from_str(data).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn responses_are_billed_by_their_usage_streamed_or_not() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let input = json!([
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "How are you?"}]},
    ]);
    let mut body = respond(input, 6);
    body["instructions"] = json!("Answer briefly.");
    let response = gateway
        .post_with_id(&key, "/v1/responses", &body, "whole")
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "response");
    let usage = &answer["usage"];
    assert_eq!(usage["output_tokens"], 6);
    let event = gateway.event_of("whole").await;
    assert_eq!(
        (
            event.kind.as_str(),
            event.status.as_str(),
            event.usage_source.as_str()
        ),
        ("response", "ok", "backend")
    );
    assert_eq!(
        (event.prompt_tokens, event.completion_tokens),
        (
            usage["input_tokens"].as_i64().unwrap(),
            usage["output_tokens"].as_i64().unwrap()
        )
    );
    // Tollgate's own count of the input agrees with the backend's.
    assert_eq!(event.counted_prompt_tokens, Some(event.prompt_tokens));

    // Streamed: the events pass as the backend wrote them, no `[DONE]`
    // added; the usage comes from `response.completed`.
    let body = streamed(respond(json!("Tell me a story"), 9));
    let streamed = gateway
        .post_with_id(&key, "/v1/responses", &body, "stream")
        .await;
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let text = streamed.text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    let events = events(&text);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "response.output_text.delta")
            .count(),
        9
    );
    let usage = &events.last().unwrap().1["response"]["usage"];
    let event = gateway.event_of("stream").await;
    assert_eq!(
        (
            event.status.as_str(),
            event.prompt_tokens,
            event.completion_tokens
        ),
        ("ok", usage["input_tokens"].as_i64().unwrap(), 9)
    );

    // Refused before a backend sees it.
    for bad in [
        json!({"model": "sim-model", "input": []}),
        json!({"model": "sim-model"}),
    ] {
        let (status, error) = gateway.post_json(&key, "/v1/responses", &bad).await;
        assert_eq!(
            (status, error["error"]["param"].as_str()),
            (400, Some("input"))
        );
    }
}

/// A backend that reports no usage: the answer's text is counted, from the
/// output items of a whole answer and from the deltas of a stream (not
/// again from the final response, which repeats them).
#[tokio::test]
async fn responses_without_usage_are_billed_by_the_text_they_generated() {
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "0", "--no-usage"]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    for (id, body) in [
        ("whole", respond(json!("Count for me"), 7)),
        ("stream", streamed(respond(json!("Count for me"), 7))),
    ] {
        let response = gateway.post_with_id(&key, "/v1/responses", &body, id).await;
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
        let event = gateway.event_of(id).await;
        assert_eq!(
            (
                event.status.as_str(),
                event.usage_source.as_str(),
                event.completion_tokens
            ),
            ("ok", "counted", 7),
            "{id}"
        );
    }
}

/// A quota with room for fewer tokens than asked: the limit sent upstream
/// is cut to fit, in the Responses API's own field.
#[tokio::test]
async fn a_capped_quota_cuts_max_output_tokens() {
    let sim = super::admission::instant_sim("1000");
    let gateway = super::admission::on_shared_redis(
        &sim,
        "[[tiers]]\nname = \"free\"\npriority = 0\nincluded_units = 40\nhard_cap = true\n",
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let (status, answer) = gateway
        .post_json(&key, "/v1/responses", &respond(json!("Hi"), 500))
        .await;
    assert_eq!(status, 200, "{answer}");
    let usage = &answer["usage"];
    let (input, output) = (
        usage["input_tokens"].as_u64().unwrap(),
        usage["output_tokens"].as_u64().unwrap(),
    );
    // 40 units reserved; the answer cut to what is left after the input.
    assert_eq!(input + output, 40, "{usage}");
}
