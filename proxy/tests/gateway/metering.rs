//! Metering end to end: every admitted request leaves exactly one usage event
//! in Postgres, with the right numbers, through Postgres outages, SIGKILL,
//! SIGTERM and clients that hang up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener as TokioListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::AbortHandle;

use super::*;

/// A usage event as stored.
#[derive(Debug, Clone)]
pub(super) struct StoredEvent {
    pub(super) request_id: String,
    pub(super) model: String,
    pub(super) kind: String,
    pub(super) status: String,
    pub(super) prompt_tokens: i64,
    pub(super) completion_tokens: i64,
    pub(super) counted_prompt_tokens: Option<i64>,
    pub(super) counted_completion_tokens: Option<i64>,
    pub(super) usage_source: String,
    pub(super) unit_kind: String,
    pub(super) units: i64,
}

impl Gateway {
    pub(super) async fn db_client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.db.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// The units of every stored usage event.
    pub(super) async fn units_logged(&self) -> i64 {
        self.usage_events().await.iter().map(|e| e.units).sum()
    }

    /// Every stored usage event.
    pub(super) async fn usage_events(&self) -> Vec<StoredEvent> {
        let rows = self
            .db_client()
            .await
            .query(
                "SELECT request_id, model, kind, status, prompt_tokens, completion_tokens,
                        counted_prompt_tokens, counted_completion_tokens, usage_source, units,
                        unit_kind
                 FROM usage_events ORDER BY created_at",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| StoredEvent {
                request_id: r.get(0),
                model: r.get(1),
                kind: r.get(2),
                status: r.get(3),
                prompt_tokens: r.get(4),
                completion_tokens: r.get(5),
                counted_prompt_tokens: r.get(6),
                counted_completion_tokens: r.get(7),
                usage_source: r.get(8),
                units: r.get(9),
                unit_kind: r.get(10),
            })
            .collect()
    }

    /// The one event of `request_id`, once it is stored.
    pub(super) async fn event_of(&self, request_id: &str) -> StoredEvent {
        let of_request = || async {
            let mut events = self.usage_events().await;
            events.retain(|e| e.request_id == request_id);
            events
        };
        eventually("the usage event is stored", || async {
            !of_request().await.is_empty()
        })
        .await;
        let mut events = of_request().await;
        assert_eq!(events.len(), 1, "exactly one event for {request_id}");
        events.remove(0)
    }

    /// A metric of this gateway's (0 when absent).
    async fn metric(&self, name: &str) -> f64 {
        scrape(&self.metrics_url, name).await
    }

    pub(super) async fn post_with_id(
        &self,
        key: &str,
        path: &str,
        body: &Value,
        id: &str,
    ) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .header("x-request-id", id)
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

/// A sim's counter (summed over its labels).
pub(super) async fn sim_counter(sim: &Sim, name: &str) -> f64 {
    scrape(&format!("{}/metrics", sim.url), name).await
}

/// The sum of metric `name`'s series (any labels) at a Prometheus endpoint;
/// 0 when absent.
pub(super) async fn scrape(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// OpenAI's chat prompt recipe, counted with tiktoken-rs (independently of
/// Tollgate's counter): 3 per message + role + content, 3 to prime the reply.
pub(super) fn chat_prompt_tokens(messages: &[(&str, &str)]) -> i64 {
    3 + messages
        .iter()
        .map(|(role, content)| 3 + cl100k(role) + cl100k(content))
        .sum::<usize>() as i64
}

/// The generated text of a non-streamed chat/completions answer or a stream.
fn generated_text(body: &str, streamed: bool) -> String {
    if !streamed {
        let json: Value = serde_json::from_str(body).unwrap();
        let choice = &json["choices"][0];
        return choice["message"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap()
            .to_owned();
    }
    sse_data(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|chunk| {
            let choice = &chunk["choices"][0];
            choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn usage_events_match_independent_tiktoken_counts() {
    let with_usage = Sim::fast();
    let without = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--no-usage",
        "--model",
        "sim-nousage",
    ]);
    let mut silent = BackendSpec::new(&without.url);
    silent.models = r#"["sim-nousage"]"#;
    let gateway = Gateway::start(
        &[BackendSpec::new(&with_usage.url), silent],
        Options::default(),
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let prompt = "Count me exactly: 数える 🦀 and   some\twhitespace.";
    let mut n = 0;
    for model in ["sim-model", "sim-nousage"] {
        let reported = if model == "sim-model" {
            "backend"
        } else {
            "counted"
        };
        for stream in [false, true] {
            for client_asks_usage in [false, true] {
                if client_asks_usage && !stream {
                    continue;
                }
                // Chat.
                n += 1;
                let id = format!("chat-{n}");
                let mut body = json!({"model": model, "max_tokens": 9, "stream": stream,
                    "messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": prompt}]});
                if client_asks_usage {
                    body["stream_options"] = json!({"include_usage": true});
                }
                let answer = gateway
                    .post_with_id(&key, "/v1/chat/completions", &body, &id)
                    .await
                    .text()
                    .await
                    .unwrap();
                let text = generated_text(&answer, stream);
                let event = gateway.event_of(&id).await;
                let expected_prompt =
                    chat_prompt_tokens(&[("system", "Be brief."), ("user", prompt)]);
                assert_eq!(
                    (event.prompt_tokens, event.completion_tokens),
                    (expected_prompt, cl100k(&text) as i64),
                    "{model} stream={stream}: {answer}"
                );
                assert_eq!(event.completion_tokens, 9);
                assert_eq!(event.counted_prompt_tokens, Some(expected_prompt));
                assert_eq!(
                    (event.status.as_str(), event.usage_source.as_str()),
                    ("ok", reported)
                );
                assert_eq!(event.units, expected_prompt + 9);
                assert_eq!(event.kind, "chat");
                if stream && model == "sim-model" {
                    // The usage chunk reaches the client only when it asked for it.
                    let usage_chunks = sse_data(&answer)
                        .iter()
                        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                        .filter(|c| c["usage"].is_object())
                        .count();
                    assert_eq!(usage_chunks, usize::from(client_asks_usage), "{answer}");
                }

                // Completions.
                n += 1;
                let id = format!("completion-{n}");
                let body =
                    json!({"model": model, "max_tokens": 4, "stream": stream, "prompt": prompt});
                let answer = gateway
                    .post_with_id(&key, "/v1/completions", &body, &id)
                    .await
                    .text()
                    .await
                    .unwrap();
                let event = gateway.event_of(&id).await;
                assert_eq!(
                    (event.prompt_tokens, event.completion_tokens),
                    (
                        cl100k(prompt) as i64,
                        cl100k(&generated_text(&answer, stream)) as i64
                    )
                );
                assert_eq!(
                    (event.kind.as_str(), event.usage_source.as_str()),
                    ("completion", reported)
                );
            }
        }
        // Embeddings: a string and an array of strings.
        for (i, input) in [json!(prompt), json!([prompt, "second input"])]
            .into_iter()
            .enumerate()
        {
            let id = format!("embedding-{model}-{i}");
            let response = gateway
                .post_with_id(
                    &key,
                    "/v1/embeddings",
                    &json!({"model": model, "input": input}),
                    &id,
                )
                .await;
            assert_eq!(response.status(), 200);
            let expected = match &input {
                Value::String(s) => cl100k(s),
                _ => cl100k(prompt) + cl100k("second input"),
            } as i64;
            let event = gateway.event_of(&id).await;
            assert_eq!(
                (event.prompt_tokens, event.completion_tokens),
                (expected, 0)
            );
            assert_eq!(
                (event.kind.as_str(), event.usage_source.as_str()),
                ("embedding", reported)
            );
            assert_eq!(event.model, model);
        }
    }
}

#[tokio::test]
async fn ten_thousand_mixed_requests_leave_one_event_each_with_the_backends_totals() {
    let sim = Sim::fast();
    let gateway = Arc::new(Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await);
    let key = Arc::new(gateway.create_key("acme", &[]));
    const REQUESTS: usize = 10_000;
    const WORKERS: usize = 32;
    let embedding_input = "embed this sentence";
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (gateway, key) = (Arc::clone(&gateway), Arc::clone(&key));
        workers.push(tokio::spawn(async move {
            let mut embeddings = 0;
            for i in (worker..REQUESTS).step_by(WORKERS) {
                let (path, body) = match i % 5 {
                    0 => ("/v1/chat/completions", chat(&format!("request {i}"), (i % 7 + 1) as u32)),
                    1 => ("/v1/chat/completions", streamed(chat(&format!("stream {i}"), (i % 5 + 1) as u32))),
                    2 => ("/v1/completions", json!({"model": "sim-model", "prompt": format!("prompt {i}"), "max_tokens": 3})),
                    3 => ("/v1/completions", json!({"model": "sim-model", "prompt": format!("prompt {i}"), "max_tokens": 2, "stream": true})),
                    _ => {
                        embeddings += 1;
                        ("/v1/embeddings", json!({"model": "sim-model", "input": embedding_input}))
                    }
                };
                let response = gateway.post_with_id(&key, path, &body, &format!("mixed-{i}")).await;
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
            }
            embeddings
        }));
    }
    let mut embeddings = 0;
    for worker in workers {
        embeddings += worker.await.unwrap();
    }
    let client = gateway.db_client().await;
    let stored = || async {
        client
            .query_one("SELECT count(*) FROM usage_events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    eventually("all events are stored", || async {
        stored().await >= REQUESTS as i64
    })
    .await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT event_id), count(DISTINCT request_id),
                    sum(prompt_tokens) FILTER (WHERE kind <> 'embedding')::int8,
                    sum(completion_tokens)::int8,
                    sum(prompt_tokens) FILTER (WHERE kind = 'embedding')::int8,
                    count(*) FILTER (WHERE status = 'ok')
             FROM usage_events",
            &[],
        )
        .await
        .unwrap();
    let count = |i: usize| row.get::<_, i64>(i);
    assert_eq!(
        (count(0), count(1), count(2)),
        (REQUESTS as i64, REQUESTS as i64, REQUESTS as i64)
    );
    assert_eq!(count(6), REQUESTS as i64, "every request ended ok");
    assert_eq!(
        count(3) as f64,
        sim_counter(&sim, "vllm:prompt_tokens_total").await
    );
    assert_eq!(
        count(4) as f64,
        sim_counter(&sim, "vllm:generation_tokens_total").await
    );
    assert_eq!(count(5), embeddings * cl100k(embedding_input) as i64);
    // The rollups agree with the raw log.
    let rolled = client
        .query_one(
            "SELECT sum(requests)::int8, sum(total_tokens)::int8 FROM usage_rollup_minute",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rolled.get::<_, i64>(0), REQUESTS as i64);
    assert_eq!(rolled.get::<_, i64>(1), count(3) + count(4) + count(5));
}

/// A TCP forwarder to Postgres (or Redis) that the test can cut, as an
/// outage looks from Tollgate: connections reset, new ones refused.
pub(super) struct PostgresLink {
    pub(super) port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl PostgresLink {
    pub(super) async fn start() -> Self {
        Self::to(&admin_url()).await
    }

    /// A link to the host and port of `url` (`postgres://…` or `redis://…`).
    pub(super) async fn to(url: &str) -> Self {
        let target = url
            .split("://")
            .nth(1)
            .map(|rest| rest.rsplit('@').next().unwrap_or(rest))
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("127.0.0.1:5432")
            .to_owned();
        let listener = TokioListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (up, connections) = (Arc::clone(&up), Arc::clone(&connections));
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if !up.load(Ordering::SeqCst) {
                        let _ = inbound.shutdown().await;
                        continue;
                    }
                    let target = target.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().await.push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        Self {
            port,
            up,
            connections,
            accept,
        }
    }

    /// A gateway that reaches Postgres through this link, with keys cached
    /// long enough to outlast the outage (auth reads Postgres on a miss).
    fn options(&self) -> Options {
        Options {
            postgres_port: Some(self.port),
            keys: LONG_KEY_CACHE,
            ..Options::default()
        }
    }

    pub(super) async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().await.drain(..) {
            connection.abort();
        }
    }

    pub(super) fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for PostgresLink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

const LONG_KEY_CACHE: &str = "cache_ttl = \"600s\"";
/// How long Postgres stays unreachable under load.
const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn postgres_outage_under_load_loses_and_duplicates_nothing() {
    let sim = Sim::fast();
    let link = PostgresLink::start().await;
    let gateway = Arc::new(Gateway::start(&[BackendSpec::new(&sim.url)], link.options()).await);
    let key = Arc::new(gateway.create_key("acme", &[]));

    let sent = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (gateway, key, sent, running) = (
            Arc::clone(&gateway),
            Arc::clone(&key),
            Arc::clone(&sent),
            Arc::clone(&running),
        );
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while running.load(Ordering::SeqCst) {
                i += 1;
                let body = if i % 2 == 0 {
                    chat("during", 3)
                } else {
                    streamed(chat("during", 3))
                };
                let response = gateway
                    .post_with_id(
                        &key,
                        "/v1/chat/completions",
                        &body,
                        &format!("load-{worker}-{i}"),
                    )
                    .await;
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually("some events are written before the outage", || async {
        gateway.metric("tollgate_usage_events_written_total").await > 0.0
    })
    .await;
    link.cut().await;
    let cut_at = tokio::time::Instant::now();
    eventually(
        "events go to the spool while Postgres is unreachable",
        || async { gateway.metric("tollgate_usage_spool_events").await > 0.0 },
    )
    .await;
    // The outage lasts its whole length under load (the scenario, not a wait
    // for something to happen).
    tokio::time::sleep_until(cut_at + OUTAGE).await;
    link.restore();
    running.store(false, Ordering::SeqCst);
    for worker in load {
        worker.await.unwrap();
    }
    let sent = sent.load(Ordering::SeqCst) as i64;
    let client = gateway.db_client().await;
    eventually("the spool drains into Postgres", || async {
        gateway.metric("tollgate_usage_spool_events").await == 0.0
            && client
                .query_one("SELECT count(*) FROM usage_events", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                >= sent
    })
    .await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT request_id), (SELECT sum(requests)::int8 FROM usage_rollup_minute)
             FROM usage_events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (sent, sent, sent)
    );
    assert!(gateway.metric("tollgate_usage_events_replayed_total").await > 0.0);
    assert_eq!(
        gateway.metric("tollgate_usage_events_lost_total").await,
        0.0
    );
}

#[tokio::test]
async fn sigkill_with_events_in_the_spool_replays_them_once_on_restart() {
    let sim = Sim::fast();
    let link = PostgresLink::start().await;
    let mut gateway = Gateway::start(&[BackendSpec::new(&sim.url)], link.options()).await;
    let key = gateway.create_key("acme", &[]);
    // One request while Postgres is reachable caches the key.
    gateway
        .post_with_id(&key, "/v1/chat/completions", &chat("first", 2), "first")
        .await
        .bytes()
        .await
        .unwrap();
    gateway.event_of("first").await;

    link.cut().await;
    const SPOOLED: usize = 50;
    for i in 0..SPOOLED {
        let response = gateway
            .post_with_id(
                &key,
                "/v1/chat/completions",
                &chat("spooled", 2),
                &format!("spooled-{i}"),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    eventually("every event is in the spool", || async {
        gateway.metric("tollgate_usage_spool_events").await == SPOOLED as f64
    })
    .await;
    kill(gateway.proc.as_ref().unwrap().pid(), Signal::SIGKILL).unwrap();
    gateway.wait_exit();

    link.restore();
    gateway.serve().await;
    eventually("the spool is replayed", || async {
        gateway.usage_events().await.len() == SPOOLED + 1
    })
    .await;
    // Counted once: the rollups (which a double write would inflate) agree.
    let client = gateway.db_client().await;
    for table in [
        "usage_rollup_minute",
        "usage_rollup_day",
        "usage_rollup_total_day",
    ] {
        let requests: i64 = client
            .query_one(&format!("SELECT sum(requests)::int8 FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(requests, SPOOLED as i64 + 1, "{table}");
    }
    assert_eq!(gateway.metric("tollgate_usage_spool_events").await, 0.0);
}

#[tokio::test]
async fn client_hanging_up_mid_stream_is_billed_as_partial() {
    // 20 tokens/s: the client reads a few and leaves long before the 200th
    // (Tollgate notices a hang-up at its next write, which under load can
    // be a second or more later).
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "20"]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let mut response = gateway
        .post_with_id(
            &key,
            "/v1/chat/completions",
            &streamed(chat("go on", 200)),
            "hangup",
        )
        .await;
    let mut received = String::new();
    while generated_text(&received, true).split_whitespace().count() < 5 {
        received.push_str(std::str::from_utf8(&response.chunk().await.unwrap().unwrap()).unwrap());
    }
    let seen_by_client = cl100k(&generated_text(&received, true)) as i64;
    drop(response);
    let event = gateway.event_of("hangup").await;
    let generated = sim_counter(&sim, "vllm:generation_tokens_total").await as i64;
    assert_eq!(event.status, "partial");
    assert_eq!(event.usage_source, "counted");
    assert!(
        seen_by_client <= event.completion_tokens && event.completion_tokens <= generated,
        "client saw {seen_by_client}, billed {}, backend generated {generated}",
        event.completion_tokens
    );
    assert!(event.completion_tokens < 200);
    assert_eq!(
        Some(event.completion_tokens),
        event.counted_completion_tokens
    );
    assert_eq!(
        event.prompt_tokens,
        chat_prompt_tokens(&[("user", "go on")])
    );
}

#[tokio::test]
async fn next_months_partition_is_created_by_tollgate_itself() {
    let sim = Sim::fast();
    let mut gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    gateway.proc.take();
    let client = gateway.db_client().await;
    let next: String = client
        .query_one(
            "SELECT 'usage_events_' || to_char(date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month', 'YYYY_MM')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!(
            "DROP TABLE {next}; DELETE FROM usage_partitions WHERE name = '{next}'"
        ))
        .await
        .unwrap();
    gateway.serve().await;
    eventually("next month's partition exists again", || async {
        client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&next])
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
}

#[tokio::test]
async fn usage_reports_and_purge_over_http_and_cli() {
    let sim = Sim::fast();
    let gateway = &Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let other = gateway.create_key("globex", &[]);
    for (key, id) in [(&key, "a1"), (&key, "a2"), (&other, "g1")] {
        gateway
            .post_with_id(key, "/v1/chat/completions", &chat("hi", 4), id)
            .await
            .bytes()
            .await
            .unwrap();
        gateway.event_of(id).await;
    }
    let per_request = chat_prompt_tokens(&[("user", "hi")]) + 4;
    // An explicit period around now: the default (this UTC month) would split
    // the requests if the test ran across a month's turn.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let period = format!("from={}&to={}", now - 3600, now + 3600);

    // The caller's own account only.
    let usage: Value = gateway
        .get(&key, &format!("/v1/usage?group_by=model&{period}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["data"][0]["group"], "sim-model");
    assert_eq!(usage["data"][0]["requests"], 2);
    assert_eq!(usage["data"][0]["total_tokens"], 2 * per_request);
    let refused = gateway.get(&key, "/v1/usage?account=globex").await;
    assert_eq!(refused.status(), 400);

    let admin = |path: String| async move {
        gateway
            .admin(reqwest::Method::GET, &path, None, Some(ADMIN_TOKEN))
            .await
    };
    let (status, all) = admin(format!("/admin/usage?{period}")).await;
    assert_eq!(status, 200);
    assert_eq!(all["data"][0]["requests"], 3);
    let (_, globex) = admin(format!("/admin/usage?account=globex&group_by=day&{period}")).await;
    assert_eq!(globex["data"][0]["requests"], 1);
    let (status, _) = admin("/admin/usage?account=nobody".into()).await;
    assert_eq!(status, 404);
    let (status, bad) = admin("/admin/usage?group_by=hour".into()).await;
    assert_eq!(
        (status, bad["error"]["param"].as_str()),
        (400, Some("group_by"))
    );
    let (_, listed) = admin(format!("/admin/usage/events?account=acme&{period}")).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);
    let (_, stats) = admin("/admin/stats".into()).await;
    assert!(
        stats["requests_per_minute"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    let client = gateway.db_client().await;
    let same_month: bool = client
        .query_one(
            "SELECT date_trunc('month', min(created_at), 'UTC') = date_trunc('month', now(), 'UTC')
             FROM usage_events",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if same_month {
        assert_eq!(stats["units_this_month"], 3 * per_request);
    }

    let from = (now - 3600).to_string();
    let report = gateway
        .cli(&[
            "usage",
            "report",
            "--account",
            "acme",
            "--group-by",
            "key",
            "--from",
            &from,
        ])
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["data"][0]["requests"], 2);

    // Retention: a cutoff less than a day ago is refused and changes nothing;
    // an old month is dropped whole and the newer events stay.
    let delete = |query: String| async move {
        gateway
            .admin(
                reqwest::Method::DELETE,
                &format!("/admin/usage?{query}"),
                None,
                Some(ADMIN_TOKEN),
            )
            .await
    };
    let (status, body) = delete(format!("before={}", now + 86_400)).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("before"))
    );
    assert_eq!(gateway.usage_events().await.len(), 3);
    client
        .batch_execute(
            "SELECT usage_ensure_partition('2025-09-15T00:00:00Z');
             INSERT INTO usage_events (event_id, created_at, request_id, account_id, key_id, tier,
                 model, kind, status, prompt_tokens, completion_tokens, total_tokens, usage_source,
                 units, latency_ms)
             SELECT gen_random_uuid(), '2025-09-15T00:00:00Z', 'old', account_id, key_id, tier,
                 model, kind, status, 1, 1, 2, 'backend', 2, 1
             FROM usage_events LIMIT 1",
        )
        .await
        .unwrap();
    let (status, purged) = delete("before=2025-10-01".into()).await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["partitions"], json!(["usage_events_2025_09"]));
    let left = gateway.usage_events().await;
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|e| e.request_id != "old"));
    let (_, all) = admin(format!("/admin/usage?{period}")).await;
    assert_eq!(
        all["data"][0]["requests"], 3,
        "rollups keep their own retention"
    );
}
