//! Tollgate end to end: real Postgres (a fresh database per test), real
//! gpu-sim and tollgate processes, HTTP over loopback; and the limit stores'
//! conformance suite against a real Redis ([`limit_stores`]).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio_postgres::NoTls;
use tollgate_testkit::db::{admin_url, unique};
use tollgate_testkit::poll::POLL_DEADLINE;
use tollgate_testkit::{GpuSim, TestDb, eventually};

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Ports [`free_port`] hands out: below Linux's ephemeral range (32768 up), so
/// no port-0 listener (gpu-sim, fakes) or outgoing connection takes one
/// between the pick and the bind, and below Kubernetes' NodePorts (30000 up).
const TEST_PORTS: std::ops::Range<u16> = 20_000..30_000;

/// A port for a listener of a process under test, nobody's but this test's.
/// Pingora binds its own listeners and cannot be handed ours, so the port is
/// held instead by a lock file until this test process exits: nextest runs
/// tests as parallel processes, and two of them must never pick one port.
fn free_port() -> u16 {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    use std::hash::{BuildHasher, RandomState};
    use std::os::unix::fs::MetadataExt;
    static HELD: std::sync::Mutex<Vec<Flock<std::fs::File>>> = std::sync::Mutex::new(Vec::new());
    // Per user: another user's directory would not be writable.
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let dir = std::env::temp_dir().join(format!("tollgate-test-ports-{uid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    for _ in 0..1000 {
        let port = TEST_PORTS.start + (RandomState::new().hash_one(unique("port")) % span) as u16;
        let file = std::fs::File::create(dir.join(port.to_string())).unwrap();
        // Locks are per open file: a second pick of the port in this process fails too.
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => continue,
            Err((_, e)) => panic!("cannot lock a port file in {}: {e}", dir.display()),
        };
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => {
                HELD.lock().unwrap().push(lock);
                return port;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("cannot bind 127.0.0.1:{port}: {e}"),
        }
    }
    panic!("no free port in {TEST_PORTS:?} after 1000 tries");
}

/// A child process killed when dropped.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// gpu-sim serving `sim-model`, killed when dropped.
struct Sim {
    _sim: GpuSim,
    /// `http://host:port`.
    url: String,
}

impl Sim {
    fn start(args: &[&str]) -> Self {
        let sim = GpuSim::start(&[&["--model", "sim-model"], args].concat());
        Self {
            url: sim.base().to_owned(),
            _sim: sim,
        }
    }

    /// Answers at once.
    fn fast() -> Self {
        Self::start(&["--ttft-ms", "0", "--tokens-per-sec", "0"])
    }
}

/// One backend entry of the generated config.
struct BackendSpec {
    url: String,
    models: &'static str,
    credential: Option<&'static str>,
    max_concurrency: Option<u32>,
    /// `protocol`, when not the default ("openai").
    protocol: Option<&'static str>,
}

impl BackendSpec {
    fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            models: r#"["sim-model"]"#,
            credential: None,
            max_concurrency: None,
            protocol: None,
        }
    }
}

/// The tiers of the generated config unless a test brings its own.
const DEFAULT_TIERS: &str =
    "[[tiers]]\nname = \"free\"\npriority = 0\n[[tiers]]\nname = \"pro\"\npriority = 10\n";

#[derive(Default)]
struct Options {
    /// Redis for the revocation fan-out.
    redis: Option<String>,
    /// Extra `[redis]` lines, e.g. `timeout = "2s"`.
    redis_extra: &'static str,
    /// Extra `[server]` lines, e.g. `read_timeout = "1s"`.
    server: &'static str,
    /// Extra `[keys]` lines.
    keys: &'static str,
    /// Extra `[metering]` lines.
    metering: &'static str,
    /// `serve` reaches Postgres through this local port (a link the test
    /// can cut) instead of directly; migrations and the CLI stay direct.
    postgres_port: Option<u16>,
    /// `[[tiers]]` entries in place of [`DEFAULT_TIERS`].
    tiers: Option<String>,
    /// Extra `[admission]` lines.
    admission: &'static str,
    /// Extra `[routing]` lines.
    routing: &'static str,
    /// Extra `[health]` lines.
    health: &'static str,
    /// Extra `[jobs]` lines.
    jobs: &'static str,
    /// Appended to the config: `[fleet]`, managed `[[backends]]`.
    tail: String,
    /// Extra environment of `serve` (e.g. STRIPE_*).
    env: Vec<(&'static str, String)>,
    /// `serve`'s stderr goes to a pipe, read by [`Gateway::stop_and_read_logs`],
    /// instead of the test's own stderr.
    capture_stderr: bool,
}

/// A migrated database and a running `tollgate serve`.
struct Gateway {
    proc: Option<Proc>,
    url: String,
    admin_url: String,
    metrics_url: String,
    config: PathBuf,
    spool_dir: PathBuf,
    /// `jobs.results_dir`.
    results_dir: PathBuf,
    /// `redis.key_prefix`: this test's keys in a shared Redis.
    redis_prefix: String,
    options: Options,
    db: TestDb,
    client: reqwest::Client,
    /// Reads `serve`'s stderr pipe to its end (with `capture_stderr`).
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Gateway {
    async fn start(backends: &[BackendSpec], options: Options) -> Self {
        let db = TestDb::empty().await;
        let (port, admin_port, metrics_port) = (free_port(), free_port(), free_port());
        let spool_dir = std::env::temp_dir().join(unique("tollgate_spool"));
        let results_dir = std::env::temp_dir().join(unique("tollgate_results"));
        let redis_prefix = unique("tgtest");
        let mut config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"\ndrain_timeout = \"20s\"\n{}\n\
             [keys]\n{}\n[metering]\nspool_dir = \"{}\"\n{}\n{}\n\
             [admission]\n{}\n[routing]\n{}\n[health]\n{}\n[redis]\nkey_prefix = \"{}\"\n{}\n\
             [jobs]\n{}\n{}\n{}",
            options.server,
            options.keys,
            spool_dir.display(),
            // Quick writes, unless the test sets its own.
            if options.metering.contains("flush_interval") {
                ""
            } else {
                "flush_interval = \"50ms\""
            },
            options.metering,
            options.admission,
            options.routing,
            options.health,
            redis_prefix,
            options.redis_extra,
            // A directory of the test's own, unless it keeps results in a bucket.
            if options.jobs.contains("results_url") {
                String::new()
            } else {
                format!("results_dir = \"{}\"", results_dir.display())
            },
            options.jobs,
            options.tiers.as_deref().unwrap_or(DEFAULT_TIERS),
        );
        for (i, backend) in backends.iter().enumerate() {
            config.push_str(&format!(
                "[[backends]]\nname = \"b{i}\"\nurl = \"{}\"\nmodels = {}\n",
                backend.url, backend.models
            ));
            if let Some(credential) = backend.credential {
                config.push_str(&format!("credential = \"{credential}\"\n"));
            }
            if let Some(slots) = backend.max_concurrency {
                config.push_str(&format!("max_concurrency = {slots}\n"));
            }
            if let Some(protocol) = backend.protocol {
                config.push_str(&format!("protocol = \"{protocol}\"\n"));
            }
        }
        config.push_str(&options.tail);
        let path = std::env::temp_dir().join(format!("{}.toml", unique("tollgate")));
        std::fs::write(&path, config).unwrap();
        let mut gateway = Self {
            proc: None,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            config: path,
            spool_dir,
            results_dir,
            redis_prefix,
            options,
            db,
            client: reqwest::Client::new(),
            stderr: None,
        };
        let migrated = gateway.cli(&["migrate"]).output().unwrap();
        assert!(
            migrated.status.success(),
            "{}",
            String::from_utf8_lossy(&migrated.stderr)
        );
        gateway.serve().await;
        gateway
    }

    /// Starts `tollgate serve` (again) and waits until it answers.
    async fn serve(&mut self) {
        let mut serve = self.cli(&["serve"]);
        if let Some(url) = &self.options.redis {
            serve.env("REDIS_URL", url);
        }
        for (name, value) in &self.options.env {
            serve.env(name, value);
        }
        if let Some(port) = self.options.postgres_port {
            let url = format!("postgres://postgres@127.0.0.1:{port}/{}", self.db.name);
            serve.env("DATABASE_URL", url);
        }
        if self.options.capture_stderr {
            serve.stderr(Stdio::piped());
        }
        let mut child = serve.spawn().unwrap();
        // Read as it is written, so a full pipe never blocks the gateway.
        self.stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut logs = Vec::new();
                std::io::Read::read_to_end(&mut pipe, &mut logs).unwrap();
                logs
            })
        });
        self.proc = Some(Proc(child));
        self.wait_ready().await;
    }

    /// `tollgate --config … ARGS` against this gateway's database.
    fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("REDIS_URL")
            .env_remove("GRAFANA_DB_PASSWORD")
            .env("LOG_LEVEL", "warn");
        command
    }

    async fn wait_ready(&self) {
        let client = &self.client;
        let url = format!("{}/healthz", self.url);
        eventually("tollgate answers /healthz", || async {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Creates a key on tier `pro` with the CLI; returns the secret.
    fn create_key(&self, account: &str, extra: &[&str]) -> String {
        self.create_key_on(account, "pro", extra)
    }

    /// Creates a key with the CLI; returns the secret (the last stdout line).
    fn create_key_on(&self, account: &str, tier: &str, extra: &[&str]) -> String {
        let mut args = vec!["keys", "create", "--account", account, "--tier", tier];
        args.extend_from_slice(extra);
        let output = self.cli(&args).output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        stdout.lines().last().unwrap().to_owned()
    }

    async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    async fn post(&self, key: &str, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn post_json(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        let response = self.post(key, path, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// An admin API call: status and JSON body.
    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.admin_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Backend `name` as `GET /admin/backends` lists it.
    async fn backend(&self, name: &str) -> Value {
        let (status, listing) = self
            .admin(
                reqwest::Method::GET,
                "/admin/backends",
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{listing}");
        listing["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no backend {name} in {listing}"))
    }

    /// Whether a chat request with `key` gets 401 with `reason` in its message.
    async fn refused(&self, key: &str, reason: &str) -> bool {
        let (status, body) = self
            .post_json(key, "/v1/chat/completions", &chat("hi", 1))
            .await;
        status == 401
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(reason))
    }

    async fn readiness(&self) -> Value {
        let url = format!("{}/readyz", self.url);
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn sigterm(&self) {
        kill(self.proc.as_ref().unwrap().pid(), Signal::SIGTERM).unwrap();
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut proc = self.proc.take().unwrap();
        proc.0.wait().unwrap()
    }

    /// Stops `serve` with SIGTERM and answers everything it wrote to stderr
    /// (started with `capture_stderr`).
    fn stop_and_read_logs(&mut self) -> Vec<u8> {
        self.sigterm();
        assert!(self.wait_exit().success());
        self.stderr.take().unwrap().join().unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.proc.take();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_dir_all(&self.spool_dir);
        let _ = std::fs::remove_dir_all(&self.results_dir);
        // The shared server itself, not the URL the gateway was given (a
        // test's link, which cannot forward while this drop blocks its runtime).
        if self.options.redis.is_some() {
            delete_redis_keys(&redis_url(), &self.redis_prefix);
        }
    }
}

/// Deletes every key under `prefix` (the test's own, in a shared Redis).
fn delete_redis_keys(url: &str, prefix: &str) {
    const DELETE: &str = "local keys = redis.call('KEYS', ARGV[1]) \
        for _, key in ipairs(keys) do redis.call('DEL', key) end return #keys";
    let _ = Command::new("redis-cli")
        .args(["-u", url, "EVAL", DELETE, "0", &format!("{prefix}:*")])
        .stdout(Stdio::null())
        .status();
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "sim-model", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

fn streamed(mut request: Value) -> Value {
    request["stream"] = json!(true);
    request
}

fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Replaces the per-response id and timestamp, which differ on every answer.
fn normalise_ids(body: &str) -> String {
    let mut out = String::new();
    for event in body.split("\n\n") {
        match event
            .strip_prefix("data: ")
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
        {
            Some(mut chunk) => {
                chunk["id"] = json!("ID");
                chunk["created"] = json!(0);
                out.push_str(&format!("data: {chunk}\n\n"));
            }
            None if !event.is_empty() => out.push_str(&format!("{event}\n\n")),
            None => {}
        }
    }
    out
}

/// The Python `variable` names, else the one scripts/test.sh installs in
/// `target/{venv}`.
fn test_python(variable: &str, venv: &str) -> PathBuf {
    std::env::var(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target")
                .join(venv)
                .join("bin/python")
        })
}

fn cl100k(text: &str) -> usize {
    tiktoken_rs::cl100k_base_singleton().count_ordinary(text)
}

#[path = "gateway/admission.rs"]
mod admission;
#[path = "gateway/api_metrics.rs"]
mod api_metrics;
#[path = "gateway/audio.rs"]
mod audio;
#[path = "gateway/billing.rs"]
mod billing;
#[path = "gateway/comfyui.rs"]
mod comfyui;
#[path = "gateway/custom_routes.rs"]
mod custom_routes;
#[path = "gateway/dashboards.rs"]
mod dashboards;
#[path = "gateway/fleet.rs"]
mod fleet;
#[path = "gateway/hostile.rs"]
mod hostile;
#[path = "gateway/images.rs"]
mod images;
#[path = "gateway/jobs.rs"]
mod jobs;
#[path = "gateway/limit_stores.rs"]
mod limit_stores;
#[path = "gateway/metering.rs"]
mod metering;
#[path = "gateway/money_path.rs"]
mod money_path;
#[path = "gateway/observability.rs"]
mod observability;
#[path = "gateway/outages.rs"]
mod outages;
#[path = "gateway/responses.rs"]
mod responses;
#[path = "gateway/routing.rs"]
mod routing;
#[path = "gateway/transcription.rs"]
mod transcription;
#[path = "gateway/triton.rs"]
mod triton;

// ------------------------------------------------------------------ the tests

#[tokio::test]
async fn chat_completion_non_streamed_and_streamed() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);

    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("Hello", 5))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 5);

    let response = gateway
        .post(&key, "/v1/chat/completions", &streamed(chat("Hello", 4)))
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
    assert_eq!(
        events.len(),
        7,
        "role + 4 tokens + finish + [DONE]: {events:?}"
    );
}

#[tokio::test]
async fn completions_embeddings_and_model_list() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);

    let request = json!({"model": "sim-model", "prompt": "Once upon a time", "max_tokens": 3});
    let (status, body) = gateway.post_json(&key, "/v1/completions", &request).await;
    assert_eq!(
        (status, body["usage"]["completion_tokens"].as_u64()),
        (200, Some(3)),
        "{body}"
    );

    let request = json!({"model": "sim-model", "input": ["a", "b"], "dimensions": 4});
    let (status, body) = gateway.post_json(&key, "/v1/embeddings", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);

    let models: Value = gateway.get(&key, "/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "sim-model");
}

#[tokio::test]
async fn streamed_events_are_identical_direct_and_proxied() {
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "2000"]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let mut request = streamed(chat("Identical, please", 12));
    request["stream_options"] = json!({"include_usage": true});

    let direct = gateway
        .client
        .post(format!("{}/v1/chat/completions", sim.url))
        .json(&request)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let proxied = gateway
        .post(&key, "/v1/chat/completions", &request)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(normalise_ids(&proxied), normalise_ids(&direct));
    assert!(proxied.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn one_mebibyte_prompt_arrives_intact() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    // Far above Pingora's 64 KiB retry buffer; varied so truncation or
    // reordering would change the count.
    let prompt: String = (0..250_000).map(|i| format!("w{} ", i % 977)).collect();
    assert!(prompt.len() > 1024 * 1024);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat(&prompt, 1))
        .await;
    assert_eq!(status, 200, "{body}");
    let expected = 3 + 3 + cl100k("user") + cl100k(&prompt);
    assert_eq!(body["usage"]["prompt_tokens"], expected);
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let response = gateway
        .client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .header("x-request-id", "client-chosen-id.42")
        .json(&chat("hi", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-chosen-id.42");

    let generated = gateway
        .post(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    let id = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);

    // Errors carry one too, and an invalid one is replaced.
    let refused = gateway
        .client
        .get(format!("{}/v1/models", gateway.url))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let id = refused.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}

#[tokio::test]
async fn client_key_never_reaches_the_backend_and_credential_does() {
    // The backend demands its own key, as vLLM's --api-key does.
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--api-key",
        "sk-backend",
    ]);
    let mut with_credential = BackendSpec::new(&sim.url);
    with_credential.credential = Some("sk-backend");
    let gateway = Gateway::start(&[with_credential], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200, "{body}");

    // Without a credential, nothing is sent: a backend that records the
    // request head sees no Authorization at all.
    let recorder = TcpListener::bind("127.0.0.1:0").unwrap();
    let recorder_url = format!("http://{}", recorder.local_addr().unwrap());
    let head = std::thread::spawn(move || record_one_request(&recorder));
    // It takes one connection: no health probe may have it.
    let no_probes = Options {
        health: "interval = \"1h\"",
        ..Options::default()
    };
    let plain = Gateway::start(&[BackendSpec::new(&recorder_url)], no_probes).await;
    let key = plain.create_key("acme", &[]);
    let (status, _) = plain
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200);
    let head = head.join().unwrap().to_ascii_lowercase();
    assert!(head.starts_with("post /v1/chat/completions "), "{head}");
    assert!(!head.contains("authorization"), "{head}");
    assert!(!head.contains(&key.to_ascii_lowercase()), "{head}");
}

/// Accepts one HTTP/1.1 request, answers a fixed completion, and returns the
/// request head as received: an upstream that shows what Tollgate sends.
fn record_one_request(listener: &TcpListener) -> String {
    use std::io::{Read, Write};
    let (mut stream, _) = listener.accept().unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 65536];
    let head_end = loop {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "connection closed before the request head");
        received.extend_from_slice(&buffer[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while received.len() < head_end + length {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "connection closed before the request body");
        received.extend_from_slice(&buffer[..n]);
    }
    let body =
        r#"{"id":"x","object":"chat.completion","created":0,"model":"sim-model","choices":[]}"#;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    head
}

#[tokio::test]
async fn authentication_errors() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let url = format!("{}/v1/chat/completions", gateway.url);

    let missing = gateway
        .client
        .post(&url)
        .json(&chat("hi", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(error_code(&body), "invalid_api_key");
    assert_eq!(body["error"]["type"], "authentication_error");

    for bad in [
        "tg_not_a_real_key",
        "sk-openai-style",
        &format!("tg_{}", "A".repeat(40)),
    ] {
        let (status, body) = gateway
            .post_json(bad, "/v1/chat/completions", &chat("hi", 1))
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (401, "invalid_api_key"),
            "{bad}"
        );
    }

    let expired = gateway.create_key("acme", &["--expires", "1s"]);
    eventually("the key expires", || gateway.refused(&expired, "expired")).await;
}

#[tokio::test]
async fn request_errors_name_what_is_wrong() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &["--models", "sim-model"]);
    let url = format!("{}/v1/chat/completions", gateway.url);

    let response = gateway
        .client
        .post(&url)
        .bearer_auth(&key)
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

    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (json!({"model": "sim-model"}), "messages"),
        (json!({"model": "sim-model", "messages": "x"}), "messages"),
        (
            json!({"model": "sim-model", "messages": [{}], "stream": "yes"}),
            "stream",
        ),
        (
            json!({"model": "sim-model", "messages": [{}], "max_tokens": -3}),
            "max_tokens",
        ),
    ];
    for (request, param) in cases {
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &request)
            .await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some(param)),
            "{request}"
        );
    }
    let (status, body) = gateway
        .post_json(&key, "/v1/completions", &json!({"model": "sim-model"}))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("prompt"))
    );
    let (status, body) = gateway
        .post_json(&key, "/v1/embeddings", &json!({"model": "sim-model"}))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("input"))
    );

    let mut unknown = chat("hi", 1);
    unknown["model"] = json!("gpt-unknown");
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &unknown)
        .await;
    assert_eq!((status, error_code(&body)), (404, "model_not_found"));

    let wrong_method = gateway
        .client
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let body: Value = wrong_method.json().await.unwrap();
    assert_eq!(error_code(&body), "method_not_allowed");

    let nowhere = gateway
        .client
        .get(format!("{}/v1/fine_tuning/jobs", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    let body: Value = nowhere.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let too_big = "x".repeat(4 * 1024 * 1024 + 1);
    let response = gateway
        .client
        .post(&url)
        .bearer_auth(&key)
        .body(too_big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "request_too_large");
}

#[tokio::test]
async fn key_model_allow_list_limits_models_and_listing() {
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "0",
        "--model",
        "other-model",
    ]);
    let mut backend = BackendSpec::new(&sim.url);
    backend.models = r#"["sim-model", "other-model"]"#;
    let gateway = Gateway::start(&[backend], Options::default()).await;
    let limited = gateway.create_key("acme", &["--models", "other-model"]);

    let (status, body) = gateway
        .post_json(&limited, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!((status, error_code(&body)), (404, "model_not_found"));
    let mut allowed = chat("hi", 1);
    allowed["model"] = json!("other-model");
    let (status, _) = gateway
        .post_json(&limited, "/v1/chat/completions", &allowed)
        .await;
    assert_eq!(status, 200);

    let models: Value = gateway
        .get(&limited, "/v1/models")
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["other-model"]);
}

#[tokio::test]
async fn backend_failures_map_to_502_503_504() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    // Two dead backends: the retry fails too → 502.
    let gateway = Gateway::start(
        &[
            BackendSpec::new(&dead),
            BackendSpec::new(&dead.replace("127.0.0.1", "127.0.0.2")),
        ],
        Options::default(),
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!((status, error_code(&body)), (502, "bad_gateway"), "{body}");
    drop(gateway);

    // One dead backend: 502 (nothing else to retry on); then, while it is
    // known down, 503 at once.
    let gateway = Gateway::start(&[BackendSpec::new(&dead)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!((status, error_code(&body)), (502, "bad_gateway"), "{body}");
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (503, "no_backend_available"),
        "{body}"
    );
    // A client that sent `Expect: 100-continue` gets the error too.
    let response = gateway
        .client
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .header("expect", "100-continue")
        .json(&chat("hi", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "no_backend_available");
    drop(gateway);

    // A backend slower than read_timeout → 504.
    let slow = Sim::start(&["--ttft-ms", "5000", "--tokens-per-sec", "0"]);
    let options = Options {
        server: "read_timeout = \"300ms\"",
        ..Options::default()
    };
    let gateway = Gateway::start(&[BackendSpec::new(&slow.url)], options).await;
    let key = gateway.create_key("acme", &[]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (504, "gateway_timeout"),
        "{body}"
    );
}

#[tokio::test]
async fn streamed_requests_get_the_same_json_errors_before_the_first_byte() {
    let slow = Sim::start(&[
        "--model",
        "slow-model",
        "--ttft-ms",
        "5000",
        "--tokens-per-sec",
        "0",
    ]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut slow_backend = BackendSpec::new(&slow.url);
    slow_backend.models = r#"["slow-model"]"#;
    let mut dead_backend = BackendSpec::new(&dead);
    dead_backend.models = r#"["dead-model"]"#;
    let options = Options {
        server: "read_timeout = \"300ms\"",
        ..Options::default()
    };
    let gateway = Gateway::start(&[slow_backend, dead_backend], options).await;
    let key = gateway.create_key("acme", &[]);
    let with_model = |model: &str| {
        let mut request = streamed(chat("hi", 1));
        request["model"] = json!(model);
        request
    };
    let cases = [
        ("tg_wrong", with_model("slow-model"), 401, "invalid_api_key"),
        (key.as_str(), with_model("nope"), 404, "model_not_found"),
        (key.as_str(), with_model("dead-model"), 502, "bad_gateway"),
        (
            key.as_str(),
            with_model("dead-model"),
            503,
            "no_backend_available",
        ),
    ];
    for (key, request, status, code) in cases {
        let response = gateway.post(key, "/v1/chat/completions", &request).await;
        assert_eq!(response.status(), status, "{request}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(error_code(&body), code, "{body}");
    }

    // Like vLLM, gpu-sim sends a stream's 200 and headers before its first
    // token: a backend silent past read_timeout then ends the stream with an
    // error event.
    let response = gateway
        .post(&key, "/v1/chat/completions", &with_model("slow-model"))
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_data(&response.text().await.unwrap());
    let last: Value = serde_json::from_str(events.last().expect("an error event")).unwrap();
    assert_eq!(error_code(&last), "gateway_timeout", "{last}");
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_backend() {
    let sim = Sim::fast();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gateway = Gateway::start(
        &[BackendSpec::new(&dead), BackendSpec::new(&sim.url)],
        Options::default(),
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    // Round-robin starts on either backend; every request must succeed.
    for _ in 0..6 {
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn backend_dying_mid_stream_ends_with_an_sse_error_event() {
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "20"]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let mut response = gateway
        .post(&key, "/v1/chat/completions", &streamed(chat("hi", 200)))
        .await;
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(
        std::str::from_utf8(&first)
            .unwrap()
            .contains("chat.completion.chunk")
    );
    drop(sim); // kill -9 the backend mid-answer
    let mut rest = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        rest.extend_from_slice(&chunk);
    }
    let events = sse_data(&String::from_utf8(rest).unwrap());
    let last: Value = serde_json::from_str(events.last().expect("an error event")).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{last}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
}

#[tokio::test]
async fn five_hundred_concurrent_streams_complete() {
    let sim = Sim::start(&[
        "--ttft-ms",
        "5",
        "--tokens-per-sec",
        "200",
        "--max-concurrency",
        "512",
    ]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let streams: Vec<_> = (0..500)
        .map(|i| {
            let client = gateway.client.clone();
            let url = format!("{}/v1/chat/completions", gateway.url);
            let key = key.clone();
            tokio::spawn(async move {
                let request = streamed(chat(&format!("stream {i}"), 10));
                let body = client
                    .post(url)
                    .bearer_auth(key)
                    .json(&request)
                    .send()
                    .await?
                    .text()
                    .await?;
                Ok::<_, reqwest::Error>(body)
            })
        })
        .collect();
    for stream in streams {
        let body = stream.await.unwrap().unwrap();
        let events = sse_data(&body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let tokens = events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
            .count();
        assert_eq!(tokens, 10);
    }
}

#[tokio::test]
async fn revocation_reaches_a_running_gateway_through_redis() {
    let sim = Sim::fast();
    // A ten-minute cache TTL: only the Redis fan-out can make the revocation land.
    let options = Options {
        redis: Some(redis_url()),
        keys: "cache_ttl = \"10m\"",
        ..Options::default()
    };
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], options).await;
    eventually("the revocation listener subscribes", || async {
        gateway.readiness().await["revocation_fanout"] == "subscribed"
    })
    .await;
    let key = gateway.create_key("acme", &[]);
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200); // now cached

    // The CLI revokes in Postgres and publishes; it shares no memory with the gateway.
    let revoke = gateway
        .cli(&["keys", "revoke", &key])
        .env("REDIS_URL", redis_url())
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    eventually("the revoked key is refused", || {
        gateway.refused(&key, "revoked")
    })
    .await;
}

#[tokio::test]
async fn revoked_key_is_refused_once_the_default_cache_ttl_passes_without_redis() {
    // The default keys.cache_ttl of 5 s is the revocation bound without Redis.
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200);
    // Revoke by the display prefix that `keys list` shows.
    let prefix = &key[..11];
    let list = gateway
        .cli(&["keys", "list", "--account", "acme"])
        .output()
        .unwrap();
    assert!(String::from_utf8(list.stdout).unwrap().contains(prefix));
    assert!(
        gateway
            .cli(&["keys", "revoke", prefix])
            .status()
            .unwrap()
            .success()
    );
    eventually("the revoked key is refused", || {
        gateway.refused(&key, "revoked")
    })
    .await;
}

#[tokio::test]
async fn gateway_serves_while_redis_is_down_and_says_so() {
    let sim = Sim::fast();
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let options = Options {
        redis: Some(dead_redis),
        ..Options::default()
    };
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], options).await;
    let key = gateway.create_key("acme", &[]);
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200);
    let ready = gateway.readiness().await;
    assert_eq!(ready["revocation_fanout"], "connecting", "{ready}");
    assert_eq!(ready["postgres"], true);
}

#[tokio::test]
async fn allow_header_and_trailing_slash() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let wrong = gateway
        .client
        .get(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "POST");
    // gpu-sim, like vLLM, has no route with a trailing slash: Tollgate asks on the canonical path.
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions/", &chat("hi", 1))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn admin_api_manages_keys_and_accounts() {
    use reqwest::Method;
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let (status, _) = gateway.admin(Method::GET, "/admin/keys", None, None).await;
    assert_eq!(status, 401);
    let admin =
        |method, path: &'static str, body| gateway.admin(method, path, body, Some(ADMIN_TOKEN));

    let account = json!({"name": "globex", "tier": "free"});
    assert_eq!(
        admin(Method::POST, "/admin/accounts", Some(account))
            .await
            .0,
        201
    );
    let bad_tier = json!({"name": "x", "tier": "platinum"});
    assert_eq!(
        admin(Method::POST, "/admin/accounts", Some(bad_tier))
            .await
            .0,
        400
    );

    let new_key = json!({"account": "globex", "tier": "free", "name": "ci"});
    let (status, created) = admin(Method::POST, "/admin/keys", Some(new_key)).await;
    assert_eq!(status, 201);
    let secret = created["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tg_"));
    let (status, _) = gateway
        .post_json(&secret, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200);

    let (_, listed) = admin(Method::GET, "/admin/keys?account=globex", None).await;
    let listing = listed.to_string();
    assert!(listing.contains(created["prefix"].as_str().unwrap()));
    assert!(!listing.contains(&secret), "listings never show secrets");
    let (_, accounts) = admin(Method::GET, "/admin/accounts", None).await;
    assert_eq!(accounts["data"][0]["name"], "globex");

    let path = format!("/admin/keys/{}", created["id"].as_str().unwrap());
    let (status, _) = gateway
        .admin(Method::DELETE, &path, None, Some(ADMIN_TOKEN))
        .await;
    assert_eq!(status, 200);
    // The admin API revokes in this instance's cache at once.
    let (status, _) = gateway
        .post_json(&secret, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn keys_are_stored_hashed_only() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let (client, connection) = tokio_postgres::connect(&gateway.db.url, NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = client
        .query("SELECT hash, display_prefix FROM api_keys", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let hash: Vec<u8> = rows[0].get(0);
    assert_eq!(hash.len(), 32);
    let dump = client
        .query("SELECT row_to_json(k)::text FROM api_keys k", &[])
        .await
        .unwrap();
    let text: String = dump[0].get(0);
    assert!(!text.contains(&key[3..]), "the secret must not be stored");
}

#[tokio::test]
async fn health_and_readiness() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let healthz = gateway
        .client
        .get(format!("{}/healthz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    // Readiness is a background check (at most a second old): the first
    // one may not have answered yet when /healthz does.
    let expected = json!({"postgres": true, "backends": true, "revocation_fanout": "off"});
    eventually("/readyz reports Postgres and a backend", || async {
        let readyz = gateway
            .client
            .get(format!("{}/readyz", gateway.url))
            .send()
            .await
            .unwrap();
        readyz.status() == 200 && readyz.json::<Value>().await.unwrap() == expected
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_stream() {
    // 20 tokens at 20/s: about a second of streaming after SIGTERM.
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "20"]);
    let mut gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let mut response = gateway
        .post(&key, "/v1/chat/completions", &streamed(chat("hi", 20)))
        .await;
    let mut body = response.chunk().await.unwrap().unwrap().to_vec();
    gateway.sigterm();
    // While the stream drains, new connections get nowhere.
    eventually("the listener stops accepting", || async {
        gateway
            .client
            .get(format!("{}/healthz", gateway.url))
            .timeout(Duration::from_millis(200))
            .send()
            .await
            .is_err()
    })
    .await;
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let events = sse_data(&String::from_utf8(body).unwrap());
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream finished"
    );
    assert!(gateway.wait_exit().success());
    // The process is gone: the drained request's usage was written before it exited.
    let usage = gateway.usage_events().await;
    assert_eq!(usage.len(), 1);
    assert_eq!(
        (usage[0].status.as_str(), usage[0].completion_tokens),
        ("ok", 20)
    );
}

/// The official SDKs, as users run them. scripts/test.sh installs them: the
/// Python one in target/sdk-venv, the Node one in proxy/tests/sdk/node_modules.
#[tokio::test]
async fn official_openai_sdks_work_unchanged() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let sdk_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    let python = test_python("TOLLGATE_TEST_PYTHON", "sdk-venv");
    let runs = [
        (python, sdk_dir.join("openai_python.py")),
        (PathBuf::from("node"), sdk_dir.join("openai_node.mjs")),
    ];
    for (interpreter, script) in runs {
        let output = Command::new(&interpreter)
            .arg(&script)
            .env("TOLLGATE_BASE_URL", &gateway.url)
            .env("TOLLGATE_KEY", &key)
            .env("TOLLGATE_MODEL", "sim-model")
            .env("TOLLGATE_DIRECT_URL", &sim.url)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{} not runnable ({e}): run scripts/test.sh, which installs the SDKs",
                    interpreter.display()
                )
            });
        assert!(
            output.status.success(),
            "{}:\n{}\n{}",
            script.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
