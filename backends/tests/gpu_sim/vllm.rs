//! gpu-sim behaves as vLLM's OpenAI server does where the gateway's
//! reservations depend on it: prompt lists × `n` choices, `best_of`, which
//! token limit is honoured, bounds on hostile numbers, log probabilities and
//! forced tool calls, streamed and not.
//!
//! Usage is recounted here from the returned text with the gateway's own
//! counter (`tollgate_metering::tokens`), independently of how the simulator
//! sized its answers.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tollgate_metering::tokens::{Encoding, PromptCounter};

use super::{Sim, sse_data};

fn tokens(text: &str) -> usize {
    Encoding::Cl100k.count(text)
}

impl Sim {
    /// A streamed answer's chunks, after checking it ends with `[DONE]`.
    async fn stream_chunks(&self, path: &str, body: Value) -> Vec<Value> {
        let response = self.post(path, body).await;
        assert_eq!(response.status(), 200);
        let events = sse_data(&response.text().await.unwrap());
        let (done, chunks) = events.split_last().expect("events");
        assert_eq!(done, "[DONE]");
        chunks
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    /// A request the simulator must refuse: 400 and the field it names.
    async fn refused(&self, path: &str, body: Value) -> Option<String> {
        let (status, answer) = self.post_json(path, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        answer["error"]["param"].as_str().map(str::to_owned)
    }
}

fn choices(body: &Value) -> &Vec<Value> {
    body["choices"].as_array().expect("choices")
}

/// Each choice's `index`, checked to be 0, 1, 2… in order.
fn assert_indexed(body: &Value) {
    for (i, choice) in choices(body).iter().enumerate() {
        assert_eq!(choice["index"], i, "{body}");
    }
}

fn usage(body: &Value) -> (u64, u64) {
    let usage = &body["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    (prompt, completion)
}

/// Per choice index: the text its stream chunks carry (`text` for
/// completions, `delta.content` for chat) and how many finish reasons it got.
#[derive(Default, Debug)]
struct StreamedChoice {
    text: String,
    finish_reasons: Vec<String>,
    /// Chunks after the finish chunk: must stay 0.
    after_finish: usize,
}

fn streamed_choices(chunks: &[Value]) -> BTreeMap<u64, StreamedChoice> {
    let mut by_index: BTreeMap<u64, StreamedChoice> = BTreeMap::new();
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let entry = by_index
                .entry(choice["index"].as_u64().unwrap())
                .or_default();
            if !entry.finish_reasons.is_empty() {
                entry.after_finish += 1;
            }
            for text in [&choice["text"], &choice["delta"]["content"]] {
                entry.text.push_str(text.as_str().unwrap_or(""));
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                entry.finish_reasons.push(reason.to_owned());
            }
        }
    }
    by_index
}

/// The usage chunk (the last one, with no choices) and the chunks before it.
fn split_usage(chunks: &[Value]) -> (&Value, &[Value]) {
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    (usage, rest)
}

fn completion(prompt: Value, extra: Value) -> Value {
    let mut body = json!({"model": "sim-model", "prompt": prompt});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": "sim-model", "messages": [{"role": "user", "content": content}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn completions_take_prompts_in_all_four_shapes_with_n_choices_each() {
    let sim = Sim::fast(&[]);
    let texts = ["Once upon a time", "The GPU said", "In the beginning"];
    let shapes = [
        (json!(texts[0]), 1, tokens(texts[0])),
        (json!(texts), 3, texts.iter().map(|t| tokens(t)).sum()),
        (json!([11, 22, 33, 44]), 1, 4),
        (json!([[1, 2], [3, 4, 5], [6]]), 3, 6),
    ];
    for (prompt, prompts, prompt_tokens) in shapes {
        let request = completion(prompt.clone(), json!({"n": 2, "max_tokens": 7}));
        let (status, body) = sim.post_json("/v1/completions", request).await;
        assert_eq!(status, 200, "{prompt}: {body}");
        assert_eq!(choices(&body).len(), prompts * 2, "{prompt}");
        assert_indexed(&body);
        let generated: usize = choices(&body)
            .iter()
            .map(|c| tokens(c["text"].as_str().unwrap()))
            .sum();
        assert_eq!(
            usage(&body),
            (prompt_tokens as u64, generated as u64),
            "{prompt}"
        );
        assert!(
            choices(&body)
                .iter()
                .all(|c| c["finish_reason"] == "length")
        );
    }
}

#[tokio::test]
async fn three_prompts_times_two_choices_are_indexed_prompt_major() {
    let sim = Sim::fast(&[]);
    let prompts = ["first prompt", "second prompt", "third prompt"];
    let (_, together) = sim
        .post_json(
            "/v1/completions",
            completion(json!(prompts), json!({"n": 2, "max_tokens": 40})),
        )
        .await;
    assert_eq!(choices(&together).len(), 6);
    assert_indexed(&together);
    // Choice `p * n + i` is the i-th answer to prompt p, as vLLM indexes them:
    // the same text as asking for that prompt alone.
    for (p, prompt) in prompts.iter().enumerate() {
        let (_, alone) = sim
            .post_json(
                "/v1/completions",
                completion(json!(prompt), json!({"n": 2, "max_tokens": 40})),
            )
            .await;
        for i in 0..2 {
            assert_eq!(
                choices(&together)[p * 2 + i]["text"],
                choices(&alone)[i]["text"],
                "prompt {p}, choice {i}"
            );
        }
        assert_ne!(
            choices(&alone)[0]["text"],
            choices(&alone)[1]["text"],
            "the n choices of a prompt differ"
        );
    }
}

#[tokio::test]
async fn streamed_completions_interleave_choices_and_finish_each() {
    let sim = Sim::fast(&[]);
    let prompts = json!(["alpha", "beta", "gamma"]);
    let (_, whole) = sim
        .post_json(
            "/v1/completions",
            completion(prompts.clone(), json!({"n": 2, "max_tokens": 60})),
        )
        .await;
    let chunks = sim
        .stream_chunks(
            "/v1/completions",
            completion(
                prompts,
                json!({"n": 2, "max_tokens": 60, "stream": true,
                       "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
    let (usage_chunk, chunks) = split_usage(&chunks);
    // The first token of every choice comes before the second of any.
    let first_indices: Vec<u64> = chunks[..6]
        .iter()
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(first_indices, [0, 1, 2, 3, 4, 5]);
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1)
    );
    let streamed = streamed_choices(chunks);
    assert_eq!(streamed.len(), 6);
    for (index, choice) in &streamed {
        let whole_choice = &choices(&whole)[*index as usize];
        assert_eq!(choice.text, whole_choice["text"].as_str().unwrap());
        assert_eq!(
            choice.finish_reasons,
            [whole_choice["finish_reason"].as_str().unwrap()]
        );
        assert_eq!(choice.after_finish, 0, "choice {index} after its finish");
    }
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let recounted: usize = streamed.values().map(|c| tokens(&c.text)).sum();
    assert_eq!(usage(usage_chunk).1, recounted as u64);
}

#[tokio::test]
async fn malformed_prompts_are_refused_naming_prompt() {
    let sim = Sim::fast(&[]);
    for prompt in [
        json!([]),
        json!(""),
        json!([""]),
        json!([[]]),
        json!(["text", [1, 2]]),
        json!([-1]),
        json!(null),
    ] {
        let param = sim
            .refused("/v1/completions", completion(prompt, json!({})))
            .await;
        assert_eq!(param.as_deref(), Some("prompt"));
    }
}

#[tokio::test]
async fn chat_answers_n_choices_streamed_and_not() {
    let sim = Sim::fast(&[]);
    let (_, one) = sim
        .post_json("/v1/chat/completions", chat("several answers", json!({})))
        .await;
    let (status, whole) = sim
        .post_json(
            "/v1/chat/completions",
            chat("several answers", json!({"n": 3})),
        )
        .await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(choices(&whole).len(), 3);
    assert_indexed(&whole);
    let texts: Vec<&str> = choices(&whole)
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts[0], choices(&one)[0]["message"]["content"]);
    assert!(texts[0] != texts[1] && texts[1] != texts[2] && texts[0] != texts[2]);
    let (prompt_tokens, completion_tokens) = usage(&whole);
    assert_eq!(prompt_tokens, usage(&one).0, "the prompt counts once");
    assert_eq!(
        completion_tokens,
        texts.iter().map(|t| tokens(t)).sum::<usize>() as u64
    );

    let chunks = sim
        .stream_chunks(
            "/v1/chat/completions",
            chat(
                "several answers",
                json!({"n": 3, "stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
    let (usage_chunk, chunks) = split_usage(&chunks);
    // A role chunk per choice opens the stream, as vLLM's does.
    for (i, chunk) in chunks[..3].iter().enumerate() {
        assert_eq!(chunk["choices"][0]["index"], i);
        assert_eq!(chunk["choices"][0]["delta"]["role"], "assistant");
    }
    let streamed = streamed_choices(chunks);
    assert_eq!(streamed.len(), 3);
    for (index, choice) in &streamed {
        assert_eq!(choice.text, texts[*index as usize]);
        assert_eq!(choice.finish_reasons, ["stop"]);
        assert_eq!(choice.after_finish, 0);
    }
    assert_eq!(usage_chunk["usage"], whole["usage"]);
}

#[tokio::test]
async fn best_of_generates_every_candidate_and_returns_the_best_n() {
    let sim = Sim::fast(&[]);
    let prompt = json!(["a prompt with candidates", "and another one"]);
    let request = json!({"n": 2, "best_of": 4, "max_tokens": 200});
    let (status, best) = sim
        .post_json("/v1/completions", completion(prompt.clone(), request))
        .await;
    assert_eq!(status, 200, "{best}");
    assert_eq!(choices(&best).len(), 4, "2 prompts × n");
    assert_indexed(&best);
    // The candidates are the first four sequences of each prompt, which an
    // n = 4 request returns; best_of bills all of them, as OpenAI does.
    let (_, all) = sim
        .post_json(
            "/v1/completions",
            completion(prompt, json!({"n": 4, "max_tokens": 200})),
        )
        .await;
    assert_eq!(usage(&best), usage(&all));
    let returned: usize = choices(&best)
        .iter()
        .map(|c| tokens(c["text"].as_str().unwrap()))
        .sum();
    assert!((returned as u64) < usage(&best).1);
    for p in 0..2 {
        let candidates: Vec<&Value> = choices(&all)[p * 4..p * 4 + 4]
            .iter()
            .map(|c| &c["text"])
            .collect();
        for i in 0..2 {
            let text = &choices(&best)[p * 2 + i]["text"];
            assert!(candidates.contains(&text), "prompt {p}: {text}");
        }
        assert_ne!(
            choices(&best)[p * 2]["text"],
            choices(&best)[p * 2 + 1]["text"]
        );
    }
}

#[tokio::test]
async fn best_of_below_n_or_streamed_is_refused() {
    let sim = Sim::fast(&[]);
    let param = sim
        .refused(
            "/v1/completions",
            completion(json!("x"), json!({"n": 3, "best_of": 2})),
        )
        .await;
    assert_eq!(param.as_deref(), Some("best_of"));
    let param = sim
        .refused(
            "/v1/completions",
            completion(json!("x"), json!({"best_of": 3, "stream": true})),
        )
        .await;
    assert_eq!(param.as_deref(), Some("best_of"));
    // best_of = n hides nothing, so it streams like n.
    let chunks = sim
        .stream_chunks(
            "/v1/completions",
            completion(json!("x"), json!({"n": 2, "best_of": 2, "stream": true})),
        )
        .await;
    assert_eq!(streamed_choices(&chunks).len(), 2);
}

#[tokio::test]
async fn chat_honours_max_completion_tokens_over_max_tokens() {
    let sim = Sim::fast(&["--output-tokens", "100"]);
    let request = json!({"n": 3, "max_completion_tokens": 3, "max_tokens": 50});
    let (_, whole) = sim
        .post_json("/v1/chat/completions", chat("limits", request.clone()))
        .await;
    for choice in choices(&whole) {
        assert_eq!(tokens(choice["message"]["content"].as_str().unwrap()), 3);
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(usage(&whole).1, 9);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let chunks = sim
        .stream_chunks("/v1/chat/completions", chat("limits", streamed))
        .await;
    let streamed = streamed_choices(&chunks);
    assert_eq!(streamed.len(), 3);
    for choice in streamed.values() {
        assert_eq!(tokens(&choice.text), 3);
        assert_eq!(choice.finish_reasons, ["length"]);
    }
}

#[tokio::test]
async fn completions_honour_max_tokens_and_ignore_max_completion_tokens() {
    let sim = Sim::fast(&["--output-tokens", "100"]);
    let prompts = json!(["one", "two"]);
    let request = json!({"n": 2, "max_tokens": 3, "max_completion_tokens": 50});
    let (_, whole) = sim
        .post_json(
            "/v1/completions",
            completion(prompts.clone(), request.clone()),
        )
        .await;
    assert_eq!(choices(&whole).len(), 4);
    for choice in choices(&whole) {
        assert_eq!(tokens(choice["text"].as_str().unwrap()), 3);
        assert_eq!(choice["finish_reason"], "length");
    }
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let chunks = sim
        .stream_chunks("/v1/completions", completion(prompts.clone(), streamed))
        .await;
    for choice in streamed_choices(&chunks).values() {
        assert_eq!(tokens(&choice.text), 3);
    }

    // max_completion_tokens is not a completions field: alone it is ignored
    // and vLLM's default of 16 applies.
    let (_, ignored) = sim
        .post_json(
            "/v1/completions",
            completion(prompts, json!({"max_completion_tokens": 3})),
        )
        .await;
    for choice in choices(&ignored) {
        assert_eq!(tokens(choice["text"].as_str().unwrap()), 16);
        assert_eq!(choice["finish_reason"], "length");
    }
}

#[tokio::test]
async fn hostile_numbers_get_400_naming_the_field() {
    let sim = Sim::fast(&[]);
    let two_63 = 1u64 << 63;
    let chat_cases = [
        (json!({"n": two_63}), "n"),
        (json!({"n": u64::MAX, "max_tokens": u64::MAX}), "max_tokens"),
        (json!({"max_tokens": u64::MAX}), "max_tokens"),
        (
            json!({"max_completion_tokens": u64::MAX}),
            "max_completion_tokens",
        ),
        (
            json!({"max_tokens": 1, "max_completion_tokens": two_63}),
            "max_completion_tokens",
        ),
        (json!({"n": -1}), "n"),
        (json!({"n": 0}), "n"),
        (json!({"n": 1e300}), "n"),
        (json!({"n": 2.5}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": -5}), "max_tokens"),
        (
            json!({"logprobs": true, "top_logprobs": two_63}),
            "top_logprobs",
        ),
    ];
    for (extra, field) in chat_cases {
        let param = sim.refused("/v1/chat/completions", chat("x", extra)).await;
        assert_eq!(param.as_deref(), Some(field));
    }
    // 2^64 does not fit a u64; JSON allows it.
    let response = reqwest::Client::new()
        .post(sim.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"sim-model","messages":[{"role":"user","content":"x"}],"n":18446744073709551616}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let many = |n: usize| Value::Array(vec![json!("p"); n]);
    let completion_cases = [
        (json!("x"), json!({"n": two_63}), "n"),
        (json!("x"), json!({"best_of": u64::MAX}), "best_of"),
        (json!("x"), json!({"max_tokens": u64::MAX}), "max_tokens"),
        (json!("x"), json!({"logprobs": u64::MAX}), "logprobs"),
        (many(1025), json!({}), "prompt"),
        (many(1000), json!({"n": 100}), "prompt"),
        (
            many(1000),
            json!({"n": two_63, "max_tokens": two_63}),
            "max_tokens",
        ),
    ];
    for (prompt, extra, field) in completion_cases {
        let param = sim
            .refused("/v1/completions", completion(prompt, extra))
            .await;
        assert_eq!(param.as_deref(), Some(field));
    }

    // Nothing panicked: the process still answers.
    let (status, _) = sim
        .post_json(
            "/v1/chat/completions",
            chat("still there?", json!({"n": 2})),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn max_request_tokens_bounds_prompts_times_choices_times_tokens() {
    let sim = Sim::fast(&["--max-request-tokens", "24"]);
    let fits = completion(json!(["a", "b"]), json!({"n": 3, "max_tokens": 4}));
    let (status, _) = sim.post_json("/v1/completions", fits).await;
    assert_eq!(status, 200);
    let param = sim
        .refused(
            "/v1/completions",
            completion(json!(["a", "b"]), json!({"n": 3, "max_tokens": 5})),
        )
        .await;
    assert_eq!(param.as_deref(), Some("prompt"));
    // Without max_tokens the default length (16) is what a sequence may use.
    let param = sim
        .refused("/v1/completions", completion(json!("a"), json!({"n": 2})))
        .await;
    assert_eq!(param.as_deref(), Some("n"));
    let param = sim
        .refused("/v1/chat/completions", chat("x", json!({"max_tokens": 25})))
        .await;
    assert_eq!(param.as_deref(), Some("max_tokens"));
}

#[tokio::test]
async fn chat_logprobs_streamed_and_not() {
    let sim = Sim::fast(&[]);
    let request = json!({"n": 2, "max_tokens": 6, "logprobs": true, "top_logprobs": 3});
    let (status, whole) = sim
        .post_json("/v1/chat/completions", chat("log probs", request.clone()))
        .await;
    assert_eq!(status, 200, "{whole}");
    for choice in choices(&whole) {
        let content = choice["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 6);
        let joined: String = content
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(joined, choice["message"]["content"].as_str().unwrap());
        for entry in content {
            let token = entry["token"].as_str().unwrap();
            assert_eq!(entry["bytes"], json!(token.as_bytes()));
            let logprob = entry["logprob"].as_f64().unwrap();
            assert!(logprob < 0.0);
            let top = entry["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            assert_eq!(top[0]["token"], token);
            assert_eq!(top[0]["logprob"].as_f64(), Some(logprob));
            let probabilities: Vec<f64> =
                top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
            assert!(probabilities.windows(2).all(|w| w[0] >= w[1]));
        }
    }
    // Deterministic, and usage is unchanged by logprobs.
    let (_, again) = sim
        .post_json("/v1/chat/completions", chat("log probs", request.clone()))
        .await;
    assert_eq!(again["choices"], whole["choices"].clone());
    let (_, plain) = sim
        .post_json(
            "/v1/chat/completions",
            chat("log probs", json!({"n": 2, "max_tokens": 6})),
        )
        .await;
    assert_eq!(plain["usage"], whole["usage"]);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let chunks = sim
        .stream_chunks("/v1/chat/completions", chat("log probs", streamed))
        .await;
    let mut content: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        if let Some(text) = choice["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            let entries = choice["logprobs"]["content"].as_array().unwrap();
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0]["token"], text);
            content
                .entry(choice["index"].as_u64().unwrap())
                .or_default()
                .push(entries[0].clone());
        } else {
            assert!(choice["logprobs"].is_null(), "{chunk}");
        }
    }
    for (index, entries) in content {
        assert_eq!(
            json!(entries),
            choices(&whole)[index as usize]["logprobs"]["content"]
        );
    }
}

#[tokio::test]
async fn completion_logprobs_streamed_and_not() {
    let sim = Sim::fast(&[]);
    let request = json!({"n": 2, "max_tokens": 5, "logprobs": 2});
    let (status, whole) = sim
        .post_json(
            "/v1/completions",
            completion(json!("offsets"), request.clone()),
        )
        .await;
    assert_eq!(status, 200, "{whole}");
    for choice in choices(&whole) {
        let logprobs = &choice["logprobs"];
        let tokens: Vec<&str> = logprobs["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens.concat(), choice["text"].as_str().unwrap());
        let mut offset = 0;
        for (i, token) in tokens.iter().enumerate() {
            assert_eq!(logprobs["text_offset"][i], offset);
            offset += token.chars().count();
            let top = logprobs["top_logprobs"][i].as_object().unwrap();
            assert_eq!(top.len(), 2);
            assert_eq!(top[*token], logprobs["token_logprobs"][i]);
        }
    }
    // logprobs = 0 still reports the generated token, as vLLM does.
    let (_, zero) = sim
        .post_json(
            "/v1/completions",
            completion(json!("offsets"), json!({"max_tokens": 5, "logprobs": 0})),
        )
        .await;
    let top = choices(&zero)[0]["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap();
    assert!(top.iter().all(|t| t.as_object().unwrap().len() == 1));

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let chunks = sim
        .stream_chunks("/v1/completions", completion(json!("offsets"), streamed))
        .await;
    let mut offsets: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        if choice["finish_reason"].is_null() {
            offsets
                .entry(choice["index"].as_u64().unwrap())
                .or_default()
                .push(choice["logprobs"]["text_offset"][0].clone());
        }
    }
    for (index, streamed) in offsets {
        assert_eq!(
            json!(streamed),
            choices(&whole)[index as usize]["logprobs"]["text_offset"]
        );
    }
}

#[tokio::test]
async fn logprob_counts_out_of_range_are_refused() {
    let sim = Sim::fast(&[]);
    let cases = [
        (
            "/v1/chat/completions",
            chat("x", json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            chat("x", json!({"top_logprobs": 2})),
            "top_logprobs",
        ),
        (
            "/v1/completions",
            completion(json!("x"), json!({"logprobs": 6})),
            "logprobs",
        ),
    ];
    for (path, body, field) in cases {
        assert_eq!(sim.refused(path, body).await.as_deref(), Some(field));
    }
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
            }}
        }},
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    ])
}

#[tokio::test]
async fn forced_tool_choice_answers_with_tool_calls() {
    let sim = Sim::fast(&[]);
    let named = json!({"type": "function", "function": {"name": "lookup"}});
    for (tool_choice, name, finish) in [
        (json!("required"), "get_weather", "tool_calls"),
        (named, "lookup", "stop"),
    ] {
        let request = chat(
            "What is the weather in Paris?",
            json!({"n": 2, "tools": tools(), "tool_choice": tool_choice}),
        );
        let (status, body) = sim.post_json("/v1/chat/completions", request.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert_indexed(&body);
        let mut arguments_tokens = 0;
        for choice in choices(&body) {
            assert_eq!(choice["finish_reason"], finish, "{choice}");
            let message = &choice["message"];
            assert_eq!(message["content"], "");
            let calls = message["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0]["type"], "function");
            assert!(
                calls[0]["id"]
                    .as_str()
                    .unwrap()
                    .starts_with("chatcmpl-tool-")
            );
            assert_eq!(calls[0]["function"]["name"], name);
            let arguments = calls[0]["function"]["arguments"].as_str().unwrap();
            let parsed: Value = serde_json::from_str(arguments).unwrap();
            assert!(parsed.is_object(), "{arguments}");
            arguments_tokens += tokens(arguments);
        }
        // The prompt counts the tools as the gateway counts them; the
        // completion counts the generated arguments.
        let prompt_tokens = PromptCounter::new(Encoding::Cl100k).count_chat(&request);
        assert!(
            prompt_tokens
                > PromptCounter::new(Encoding::Cl100k)
                    .count_chat(&chat("What is the weather in Paris?", json!({})))
        );
        assert_eq!(
            usage(&body),
            (prompt_tokens as u64, arguments_tokens as u64)
        );
    }
}

#[tokio::test]
async fn streamed_tool_calls_name_the_call_then_stream_arguments() {
    let sim = Sim::fast(&[]);
    let request = json!({"tools": tools(), "tool_choice": "required", "n": 2});
    let (_, whole) = sim
        .post_json(
            "/v1/chat/completions",
            chat("stream a call", request.clone()),
        )
        .await;
    let mut streamed = request;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = sim
        .stream_chunks("/v1/chat/completions", chat("stream a call", streamed))
        .await;
    let (usage_chunk, chunks) = split_usage(&chunks);
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let mut arguments: BTreeMap<u64, (usize, String)> = BTreeMap::new();
    let mut finishes = 0;
    for chunk in chunks {
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap();
        if let Some(reason) = choice["finish_reason"].as_str() {
            assert_eq!(reason, "tool_calls");
            finishes += 1;
            continue;
        }
        let Some(calls) = choice["delta"]["tool_calls"].as_array() else {
            assert_eq!(choice["delta"]["role"], "assistant");
            continue;
        };
        let call = &calls[0];
        assert_eq!(call["index"], 0);
        let (seen, text) = arguments.entry(index).or_default();
        if *seen == 0 {
            assert!(call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"]["name"], "get_weather");
        } else {
            assert!(
                call.get("id").is_none() && call["function"].get("name").is_none(),
                "{call}"
            );
        }
        *seen += 1;
        text.push_str(call["function"]["arguments"].as_str().unwrap());
    }
    assert_eq!(finishes, 2);
    for (index, (pieces, text)) in arguments {
        let expected =
            &choices(&whole)[index as usize]["message"]["tool_calls"][0]["function"]["arguments"];
        assert_eq!(text, expected.as_str().unwrap());
        assert_eq!(pieces, tokens(&text), "one chunk per token");
    }
}

#[tokio::test]
async fn a_limit_cuts_tool_arguments_with_length() {
    let sim = Sim::fast(&[]);
    let request = chat(
        "cut me short",
        json!({"tools": tools(), "tool_choice": "required", "max_completion_tokens": 2}),
    );
    let (_, body) = sim.post_json("/v1/chat/completions", request).await;
    let choice = &choices(&body)[0];
    assert_eq!(choice["finish_reason"], "length");
    let arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    assert_eq!(tokens(arguments), 2);
    assert_eq!(usage(&body).1, 2);
}

#[tokio::test]
async fn tool_choice_auto_or_none_answers_in_text() {
    let sim = Sim::fast(&[]);
    for tool_choice in [json!("auto"), json!("none"), Value::Null] {
        let mut extra = json!({"tools": tools(), "max_tokens": 5});
        if !tool_choice.is_null() {
            extra["tool_choice"] = tool_choice.clone();
        }
        let (_, body) = sim
            .post_json("/v1/chat/completions", chat("just talk", extra))
            .await;
        let message = &choices(&body)[0]["message"];
        assert!(
            message.get("tool_calls").is_none(),
            "{tool_choice}: {message}"
        );
        assert_eq!(tokens(message["content"].as_str().unwrap()), 5);
        assert_eq!(choices(&body)[0]["finish_reason"], "length");
    }
}

#[tokio::test]
async fn invalid_tools_are_refused_as_vllm_refuses_them() {
    let sim = Sim::fast(&[]);
    let unknown = json!({"type": "function", "function": {"name": "nope"}});
    let cases = [
        (json!({"tools": [], "tool_choice": "required"}), "tools"),
        (json!({"tools": [{"type": "function"}]}), "tools"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": tools(), "tool_choice": unknown}),
            "tool_choice",
        ),
        (
            json!({"tools": tools(), "tool_choice": "sometimes"}),
            "tool_choice",
        ),
    ];
    for (extra, field) in cases {
        let param = sim.refused("/v1/chat/completions", chat("x", extra)).await;
        assert_eq!(param.as_deref(), Some(field));
    }
}
