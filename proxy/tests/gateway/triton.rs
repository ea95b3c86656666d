//! A `protocol = "triton"` backend end to end: clients speak OpenAI's API,
//! gpu-sim answers on Triton's generate endpoints, and Tollgate translates
//! both ways and computes the usage Triton does not report.

use super::metering::chat_prompt_tokens;
use super::*;

fn triton(sim: &Sim) -> BackendSpec {
    BackendSpec {
        protocol: Some("triton"),
        ..BackendSpec::new(&sim.url)
    }
}

/// The chat chunks of a stream (not `[DONE]`), parsed.
fn chunks(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test]
async fn a_conversation_streams_through_a_triton_backend_with_its_usage() {
    // Paced, so each answer arrives in many chunks.
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "2000"]);
    let gateway = Gateway::start(&[triton(&sim)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);

    let mut turns: Vec<(String, String)> = vec![("system".into(), "You are terse.".into())];
    for (i, question) in ["Hello there", "Tell me more", "And after that?"]
        .into_iter()
        .enumerate()
    {
        turns.push(("user".into(), question.into()));
        let messages: Vec<Value> = turns
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        let request = json!({
            "model": "sim-model", "messages": messages, "max_tokens": 12, "stream": true,
            "stream_options": {"include_usage": true},
        });
        let id = format!("triton-turn-{i}");
        let response = gateway
            .post_with_id(&key, "/v1/chat/completions", &request, &id)
            .await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = sse_data(&response.text().await.unwrap());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks = chunks(&events);
        assert!(chunks.len() > 4, "streamed in pieces: {events:?}");
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "sim-model")
        );
        let answer: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str());
        assert!(matches!(finish, Some("stop" | "length")), "{chunks:?}");
        let usage = &chunks.last().unwrap()["usage"];
        let pairs: Vec<(&str, &str)> = turns
            .iter()
            .map(|(r, c)| (r.as_str(), c.as_str()))
            .collect();
        assert_eq!(usage["prompt_tokens"], chat_prompt_tokens(&pairs));
        assert_eq!(usage["completion_tokens"], cl100k(&answer));
        assert_eq!(
            usage["total_tokens"].as_i64(),
            Some(chat_prompt_tokens(&pairs) + cl100k(&answer) as i64)
        );

        let event = gateway.event_of(&id).await;
        assert_eq!(event.status, "ok");
        assert_eq!(event.prompt_tokens, chat_prompt_tokens(&pairs));
        assert_eq!(event.completion_tokens, cl100k(&answer) as i64);
        turns.push(("assistant".into(), answer));
    }
}

#[tokio::test]
async fn triton_answers_and_refusals_are_openai_shaped() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[triton(&sim)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);

    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("Hi", 5))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(body["usage"]["completion_tokens"], cl100k(content));
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let request = json!({"model": "sim-model", "prompt": "Once upon a time", "max_tokens": 3});
    let (status, body) = gateway.post_json(&key, "/v1/completions", &request).await;
    assert_eq!(
        (status, body["object"].as_str()),
        (200, Some("text_completion")),
        "{body}"
    );
    assert_eq!(body["usage"]["completion_tokens"], 3);

    // A stream without include_usage gets no usage chunk; the event still has it.
    let response = gateway
        .post_with_id(
            &key,
            "/v1/chat/completions",
            &streamed(chat("Hi", 4)),
            "no-usage",
        )
        .await;
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        chunks(&events)
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null))
    );
    assert_eq!(gateway.event_of("no-usage").await.completion_tokens, 4);

    // What Triton's generate cannot carry is refused before anything is sent.
    let mut tools = chat("Hi", 5);
    tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &tools)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "tools");
    let request = json!({"model": "sim-model", "input": "a"});
    let (status, body) = gateway.post_json(&key, "/v1/embeddings", &request).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn an_error_mid_stream_under_http_200_ends_the_stream_with_an_openai_error() {
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "2000",
        "--abort-mid-stream-rate",
        "1",
    ]);
    let gateway = Gateway::start(&[triton(&sim)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let response = gateway
        .post_with_id(
            &key,
            "/v1/chat/completions",
            &streamed(chat("Hi", 40)),
            "aborted",
        )
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_data(&response.text().await.unwrap());
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let event = gateway.event_of("aborted").await;
    assert_ne!(
        event.status, "ok",
        "an aborted answer is not billed as complete"
    );
}

#[tokio::test]
async fn a_request_triton_cannot_carry_goes_to_an_openai_backend_of_the_model() {
    let (triton_sim, openai_sim) = (Sim::fast(), Sim::fast());
    let gateway = Gateway::start(
        &[triton(&triton_sim), BackendSpec::new(&openai_sim.url)],
        Options::default(),
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let mut tools = chat("Hi", 5);
    tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    for _ in 0..6 {
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &tools)
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// A real Triton Inference Server (PyTriton's `tritonserver`, on CPU) with
/// one decoupled model shaped like TensorRT-LLM's ensemble
/// (proxy/tests/triton/serve.py); its process group is killed when dropped.
struct RealTriton {
    process: Child,
    url: String,
}

impl RealTriton {
    const MODEL: &'static str = "trt-model";

    async fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let python = test_python("TOLLGATE_TEST_TRITON_PYTHON", "triton-venv");
        let (http, grpc, metrics) = (free_port(), free_port(), free_port());
        let process = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/triton/serve.py"))
            .args(["--model", Self::MODEL])
            .args(["--http-port", &http.to_string()])
            .args(["--grpc-port", &grpc.to_string()])
            .args(["--metrics-port", &metrics.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // PyTriton runs tritonserver as a child: both go with the group.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} not runnable ({e}): run scripts/test.sh",
                    python.display()
                )
            });
        let triton = Self {
            process,
            url: format!("http://127.0.0.1:{http}"),
        };
        // The server answers before the model is loaded: wait for the model.
        let ready = format!("{}/v2/models/{}/ready", triton.url, Self::MODEL);
        eventually("tritonserver loads the model", || async {
            reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        triton
    }
}

impl Drop for RealTriton {
    fn drop(&mut self) {
        let group = Pid::from_raw(self.process.id() as i32);
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        let _ = self.process.wait();
    }
}

/// The text of a whole answer or of a stream's chunks, chat or completion.
fn answer_text(body: &str, streamed: bool) -> String {
    let pieces: Vec<Value> = if streamed {
        chunks(&sse_data(body))
    } else {
        vec![serde_json::from_str(body).unwrap()]
    };
    pieces
        .iter()
        .filter_map(|piece| {
            let choice = piece["choices"].get(0)?;
            choice["message"]["content"]
                .as_str()
                .or(choice["delta"]["content"].as_str())
                .or(choice["text"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn a_real_triton_server_serves_chat_and_completions_with_sampling_and_usage() {
    let triton = RealTriton::start().await;
    let backend = BackendSpec {
        protocol: Some("triton"),
        models: r#"["trt-model"]"#,
        ..BackendSpec::new(&triton.url)
    };
    let gateway = Gateway::start(&[backend], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let sampling = json!({
        "temperature": 0.5, "top_p": 0.25, "presence_penalty": 0.125,
        "frequency_penalty": -0.5, "seed": 42, "stop": ["zz", "yy"],
    });
    let requests = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hello"}]}),
        ),
        ("/v1/completions", json!({"prompt": "Once upon a time"})),
    ];
    for (path, input) in requests {
        let mut answers = Vec::new();
        for stream in [false, true] {
            let mut body = sampling.clone();
            body["model"] = json!("trt-model");
            body["max_tokens"] = json!(5);
            body["stream"] = json!(stream);
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            for (name, value) in input.as_object().unwrap() {
                body[name] = value.clone();
            }
            let id = format!(
                "{}-{stream}",
                path.trim_start_matches("/v1/").replace('/', ".")
            );
            let response = gateway.post_with_id(&key, path, &body, &id).await;
            assert_eq!(response.status(), 200, "{id}");
            let text = answer_text(&response.text().await.unwrap(), stream);
            // Every sampling field reached the model under the ensemble's names.
            assert!(
                text.starts_with(
                    "[temperature=0.5/top_p=0.25/presence_penalty=0.125/frequency_penalty=-0.5/seed=42/stop=zz+yy]"
                ),
                "{id}: {text}"
            );
            assert_eq!(text.split(' ').count(), 5, "{id}: five pieces in {text}");
            let event = gateway.event_of(&id).await;
            assert_eq!(
                (
                    event.status.as_str(),
                    event.completion_tokens,
                    event.usage_source.as_str()
                ),
                ("ok", cl100k(&text) as i64, "counted"),
                "{id}"
            );
            assert!(event.prompt_tokens > 0, "{id}");
            answers.push(text);
        }
        assert_eq!(answers[0], answers[1], "{path}: streamed as answered whole");
    }
}
