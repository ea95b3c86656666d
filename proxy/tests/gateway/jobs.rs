//! Async jobs end to end (docs/jobs.md): `Prefer: respond-async` and
//! `POST /v1/jobs` answer 202 at once, the gateway's runner sends the job
//! through the same admission, queue, routing and metering as a live
//! request, the answer is stored and read back; one usage event per job.

use super::*;

impl Gateway {
    /// Posts `body` to `path` with `Prefer: respond-async` and `extra` headers.
    pub(super) async fn ask_async(
        &self,
        key: &str,
        path: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .header("prefer", "respond-async")
            .json(body);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Submits `body` to `path` as a job: the 202's job object.
    async fn submit(&self, key: &str, path: &str, body: &Value, extra: &[(&str, &str)]) -> Value {
        let response = self.ask_async(key, path, body, extra).await;
        assert_eq!(response.status(), 202);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let job: Value = response.json().await.unwrap();
        assert_eq!(
            location,
            format!("/v1/jobs/{}", job["id"].as_str().unwrap())
        );
        job
    }

    /// The statuses of jobs `ids`, in order.
    async fn statuses(&self, key: &str, ids: &[String]) -> Vec<String> {
        let mut statuses = Vec::new();
        for id in ids {
            let job = self.job(key, id).await.1;
            statuses.push(job["status"].as_str().unwrap().to_owned());
        }
        statuses
    }

    async fn job(&self, key: &str, id: &str) -> (u16, Value) {
        let response = self.get(key, &format!("/v1/jobs/{id}")).await;
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// The job once it has ended.
    async fn ended(&self, key: &str, id: &str) -> Value {
        let ended = |job: &Value| {
            ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or(""))
        };
        eventually(&format!("job {id} ends"), || async {
            ended(&self.job(key, id).await.1)
        })
        .await;
        self.job(key, id).await.1
    }

    /// The usage events of job `id` (its billed one carries its id), and
    /// the units of every event of its runs (a run refused in the queue is
    /// logged too, as `rejected`).
    async fn events_of_job(&self, id: &str) -> (i64, i64) {
        let id: uuid::Uuid = id.parse().unwrap();
        let row = self
            .db_client()
            .await
            .query_one(
                "SELECT count(*) FILTER (WHERE event_id = $1), coalesce(sum(units), 0)::bigint
                 FROM usage_events WHERE request_id = $2",
                &[&id, &id.to_string()],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
}

/// A chat answer with its per-answer id and timestamp taken out.
fn without_ids(body: &[u8]) -> Value {
    let mut answer: Value = serde_json::from_slice(body).unwrap();
    answer["id"] = json!("ID");
    answer["created"] = json!(0);
    answer
}

#[tokio::test]
async fn a_job_runs_once_and_its_result_is_the_backends_answer() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let request = chat("Tell me about durable jobs.", 24);

    let job = gateway
        .submit(&key, "/v1/chat/completions", &request, &[])
        .await;
    assert_eq!(job["object"], "job");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["path"], "/v1/chat/completions");
    let id = job["id"].as_str().unwrap().to_owned();

    let job = gateway.ended(&key, &id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"]["status"], 200);
    assert_eq!(job["result"]["content_type"], "application/json");
    assert!(job["finished_at"].as_u64().unwrap() >= job["created_at"].as_u64().unwrap());

    let result = gateway.get(&key, &format!("/v1/jobs/{id}/result")).await;
    assert_eq!(result.status(), 200);
    assert_eq!(result.headers()["content-type"], "application/json");
    let stored = result.bytes().await.unwrap();
    assert_eq!(job["result"]["bytes"], stored.len());
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sim.url))
        .json(&request)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(without_ids(&stored), without_ids(&direct));

    // One usage event, named by the job.
    eventually("the job's usage event is stored", || async {
        gateway.events_of_job(&id).await.0 == 1
    })
    .await;
    let event = gateway.event_of(&id).await;
    assert_eq!((event.status.as_str(), event.kind.as_str()), ("ok", "chat"));
    assert_eq!(event.completion_tokens, 24);

    let listing: Value = gateway.get(&key, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(listing["object"], "list");
    assert_eq!(listing["data"][0]["id"], id.as_str());
    assert_eq!(listing["has_more"], false);
}

#[tokio::test]
async fn bad_requests_are_refused_at_submission_and_store_nothing() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let ask = |path: &'static str, body: Value| {
        let (gateway, key) = (&gateway, key.clone());
        async move {
            let response = gateway.ask_async(&key, path, &body, &[]).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = ask("/v1/chat/completions", json!({"model": "sim-model"})).await;
    assert_eq!(status, 400, "{body}");
    let unknown = json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = ask("/v1/chat/completions", unknown).await;
    assert_eq!(
        (status, error_code(&body)),
        (404, "model_not_found"),
        "{body}"
    );
    for job in [
        json!({"path": "/v1/audio/transcriptions", "body": {}}),
        json!({"path": "/v1/jobs", "body": {}}),
        json!({"path": "/v1/chat/completions", "body": {"model": "sim-model"}}),
        json!({"path": "/v1/chat/completions"}),
    ] {
        let (status, body) = gateway.post_json(&key, "/v1/jobs", &job).await;
        assert_eq!(status, 400, "{job}: {body}");
    }
    let listing: Value = gateway.get(&key, "/v1/jobs").await.json().await.unwrap();
    assert_eq!(listing["data"], json!([]));
}

#[tokio::test]
async fn jobs_are_their_accounts_alone_and_idempotency_keys_give_the_same_job() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let (alice, mallory) = (
        gateway.create_key("alice", &[]),
        gateway.create_key("mallory", &[]),
    );
    let request = chat("once", 4);
    let first = gateway
        .submit(
            &alice,
            "/v1/chat/completions",
            &request,
            &[("idempotency-key", "k-1")],
        )
        .await;
    let again = gateway
        .submit(
            &alice,
            "/v1/chat/completions",
            &request,
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!(first["id"], again["id"]);
    let other = gateway
        .ask_async(
            &alice,
            "/v1/chat/completions",
            &chat("another body", 4),
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_eq!(other.status(), 409);

    let id = first["id"].as_str().unwrap();
    assert_eq!(gateway.ended(&alice, id).await["status"], "succeeded");
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/result")] {
        let response = gateway.get(&mallory, &path).await;
        assert_eq!(response.status(), 404, "{path}");
    }
    let cancel = gateway
        .client
        .delete(format!("{}/v1/jobs/{id}", gateway.url))
        .bearer_auth(&mallory)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 404);
    let listing: Value = gateway
        .get(&mallory, "/v1/jobs")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listing["data"], json!([]));
    // Same key, other account: its own job.
    let theirs = gateway
        .submit(
            &mallory,
            "/v1/chat/completions",
            &request,
            &[("idempotency-key", "k-1")],
        )
        .await;
    assert_ne!(theirs["id"], first["id"]);
    eventually("the job is billed once", || async {
        gateway.events_of_job(id).await.0 == 1
    })
    .await;
}

#[tokio::test]
async fn a_cancelled_job_never_runs_and_is_not_billed() {
    // One slot, held by a slow request: the job waits in the queue.
    let sim = Sim::start(&["--ttft-ms", "0", "--tokens-per-sec", "20"]);
    let gateway = Gateway::start(
        &[BackendSpec {
            max_concurrency: Some(1),
            ..BackendSpec::new(&sim.url)
        }],
        Options::default(),
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let holder = {
        let (client, url, key) = (gateway.client.clone(), gateway.url.clone(), key.clone());
        tokio::spawn(async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&chat("hold the slot", 60))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        })
    };
    eventually("the slot is taken", || async {
        gateway.backend("b0").await["in_flight"] == 1
    })
    .await;
    let job = gateway
        .submit(&key, "/v1/chat/completions", &chat("never", 4), &[])
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let cancel = gateway
        .client
        .delete(format!("{}/v1/jobs/{id}", gateway.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let cancelled: Value = cancel.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    holder.await.unwrap();
    // The live request is billed; the job never is (its run, stopped in
    // the queue, is logged as rejected, with no units).
    eventually("the live request is billed", || async {
        gateway
            .usage_events()
            .await
            .iter()
            .any(|e| e.status == "ok")
    })
    .await;
    assert_eq!(gateway.events_of_job(&id).await, (0, 0));
    assert_eq!(gateway.job(&key, &id).await.1["status"], "cancelled");
    let result = gateway.get(&key, &format!("/v1/jobs/{id}/result")).await;
    assert_eq!(result.status(), 404);
}

#[tokio::test]
async fn a_job_posted_to_v1_jobs_runs_like_one_asked_async() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let (status, job) = gateway
        .post_json(
            &key,
            "/v1/jobs",
            &json!({"method": "POST", "path": "/v1/embeddings",
                    "body": {"model": "sim-model", "input": "durable"}}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let job = gateway.ended(&key, id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let answer: Value = gateway
        .get(&key, &format!("/v1/jobs/{id}/result"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "list", "{answer}");
    assert_eq!(gateway.event_of(id).await.kind, "embedding");
}

#[tokio::test]
async fn results_expire_on_schedule_and_their_files_are_deleted() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(format!(
                "{DEFAULT_TIERS}\n[[tiers]]\nname = \"brief\"\npriority = 5\nresult_retention = \"1s\"\n"
            )),
            jobs: "sweep_interval = \"200ms\"",
            ..Options::default()
        },
    )
    .await;
    let (brief, pro) = (
        gateway.create_key_on("brief", "brief", &[]),
        gateway.create_key("keeper", &[]),
    );
    let short = gateway
        .submit(&brief, "/v1/chat/completions", &chat("short", 4), &[])
        .await;
    let kept = gateway
        .submit(&pro, "/v1/chat/completions", &chat("kept", 4), &[])
        .await;
    let (short, kept) = (short["id"].as_str().unwrap(), kept["id"].as_str().unwrap());
    assert_eq!(gateway.ended(&pro, kept).await["status"], "succeeded");
    eventually("the brief tier's result expires", || async {
        gateway.job(&brief, short).await.1["status"] == "expired"
    })
    .await;
    let result = gateway
        .get(&brief, &format!("/v1/jobs/{short}/result"))
        .await;
    assert_eq!(result.status(), 404);
    // Only the kept result is left on disk.
    let files = walk(&gateway.results_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        gateway
            .get(&pro, &format!("/v1/jobs/{kept}/result"))
            .await
            .status(),
        200
    );
    let metrics = reqwest::get(&gateway.metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("tollgate_job_results_freed_bytes_total ")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn jobs_under_way_when_the_gateway_is_killed_end_once_after_its_restart() {
    const JOBS: usize = 50;
    // A second a job, eight at a time: the kill finds some done, some
    // generating and some still queued.
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "20",
        "--output-tokens",
        "1000",
    ]);
    let mut gateway = Gateway::start(
        &[BackendSpec {
            max_concurrency: Some(8),
            ..BackendSpec::new(&sim.url)
        }],
        Options {
            jobs: "lease = \"3s\"",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let job = gateway
            .submit(
                &key,
                "/v1/chat/completions",
                &chat(&format!("job {i}"), 20),
                &[],
            )
            .await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    eventually("some jobs are done and others running", || async {
        let now = gateway.statuses(&key, &ids).await;
        now.iter().filter(|s| *s == "succeeded").count() >= 8 && now.iter().any(|s| s == "running")
    })
    .await;
    kill(gateway.proc.as_ref().unwrap().pid(), Signal::SIGKILL).unwrap();
    gateway.wait_exit();
    gateway.serve().await;

    let (mut interrupted, mut run_again) = (0, 0);
    for id in &ids {
        let job = gateway.ended(&key, id).await;
        let (billed, _) = gateway.events_of_job(id).await;
        match job["status"].as_str().unwrap() {
            "succeeded" => {
                if job["attempt"].as_i64().unwrap() > 1 {
                    run_again += 1;
                }
                let result = gateway.get(&key, &format!("/v1/jobs/{id}/result")).await;
                assert_eq!(result.status(), 200);
                let answer: Value = result.json().await.unwrap();
                assert_eq!(answer["usage"]["completion_tokens"], 20, "{answer}");
                eventually(&format!("job {id} is billed once"), || async {
                    gateway.events_of_job(id).await.0 == 1
                })
                .await;
            }
            // Sent to the backend when the gateway died: not run twice.
            "failed" => {
                assert_eq!(job["error"]["code"], "job_interrupted", "{job}");
                assert!(billed <= 1);
                interrupted += 1;
            }
            other => panic!("job {id} ended {other}: {job}"),
        }
    }
    // Those generating when it died are not run twice; those still queued
    // for a slot are run by the restarted gateway.
    assert!(
        interrupted >= 1 && run_again >= 1,
        "{interrupted} interrupted, {run_again} run again"
    );
    // The ids are the events' keys: none is stored twice.
    let client = gateway.db_client().await;
    let repeated: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT event_id FROM usage_events
                                   GROUP BY event_id HAVING count(*) > 1) AS twice",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(repeated, 0);
}

/// A TCP proxy that cuts every connection `after` it was opened, as hosting
/// platforms cut requests at 60 s.
struct CuttingProxy {
    url: String,
    accept: tokio::task::AbortHandle,
}

impl CuttingProxy {
    async fn start(target: &str, after: Duration) -> Self {
        let target = target.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = tokio::time::timeout(
                        after,
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound),
                    )
                    .await;
                });
            }
        })
        .abort_handle();
        Self { url, accept }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test]
async fn a_job_longer_than_the_hosts_request_timeout_completes() {
    // Scaled down: the host cuts at 2 s, the work takes 5 s.
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "10",
        "--output-tokens",
        "1000",
    ]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let host = CuttingProxy::start(&gateway.url, Duration::from_secs(2)).await;
    // A fresh connection a request, as each would be through the platform.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let request = chat("a long render", 50);

    let live = client
        .post(format!("{}/v1/chat/completions", host.url))
        .bearer_auth(&key)
        .json(&request)
        .send()
        .await;
    let cut = match live {
        Err(_) => true,
        Ok(response) => response.bytes().await.is_err(),
    };
    assert!(cut, "the host's timeout cuts a live request");

    let submitted = client
        .post(format!("{}/v1/chat/completions", host.url))
        .bearer_auth(&key)
        .header("prefer", "respond-async")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 202);
    let id = submitted.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the job succeeds, polled through the host", || async {
        let Ok(response) = client
            .get(format!("{}/v1/jobs/{id}", host.url))
            .bearer_auth(&key)
            .send()
            .await
        else {
            return false;
        };
        response.json::<Value>().await.unwrap()["status"] == "succeeded"
    })
    .await;
    let answer: Value = client
        .get(format!("{}/v1/jobs/{id}/result", host.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 50, "{answer}");
}

/// OpenAI's Batch API through the official Python SDK, unchanged (see
/// `tests/sdk/openai_batch.py`); then what the batch left in Tollgate.
#[tokio::test]
async fn the_python_sdks_batch_flow_works_unchanged() {
    let sim = Sim::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-sec",
        "200",
        "--output-tokens",
        "1000",
    ]);
    let gateway = Gateway::start(
        &[BackendSpec {
            max_concurrency: Some(4),
            ..BackendSpec::new(&sim.url)
        }],
        Options::default(),
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_batch.py");
    let python = test_python("TOLLGATE_TEST_PYTHON", "sdk-venv");
    let output = Command::new(&python)
        .arg(&script)
        .env("TOLLGATE_BASE_URL", &gateway.url)
        .env("TOLLGATE_KEY", &key)
        .env("TOLLGATE_MODEL", "sim-model")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} not runnable ({e}): run scripts/test.sh",
                python.display()
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("batch flow ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The first batch's five requests were billed once each, as jobs.
    let client = gateway.db_client().await;
    let billed: i64 = client
        .query_one(
            "SELECT count(*) FROM usage_events e JOIN jobs j ON j.id = e.event_id
             WHERE j.custom_id LIKE 'req-%' AND e.status = 'ok'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(billed >= 5, "{billed}");
    // Another account sees none of it.
    let other = gateway.create_key("other", &[]);
    let listing: Value = gateway
        .get(&other, "/v1/batches")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listing["data"], json!([]));
    let files: Value = gateway.get(&key, "/v1/files").await.json().await.unwrap();
    let id = files["data"][0]["id"].as_str().unwrap();
    for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
        assert_eq!(gateway.get(&other, &path).await.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn two_hundred_jobs_over_three_tiers_wake_the_fleet_run_once_in_priority_order() {
    const JOBS: usize = 200;
    const TIERS: [&str; 3] = ["free", "pro", "enterprise"];
    let gateway = Gateway::start(
        &[],
        Options {
            tiers: Some(
                "[[tiers]]\nname = \"free\"\npriority = 0\n[[tiers]]\nname = \"pro\"\npriority = 10\n\
                 [[tiers]]\nname = \"enterprise\"\npriority = 20\n"
                    .to_owned(),
            ),
            jobs: "max_running = 200",
            // Scaled to zero; a 5 s start-up, back to warm after 2 s idle.
            tail: super::fleet::process_fleet(5, 2),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(gateway.backend_state("gpu").await, "cold");
    let keys: Vec<String> = TIERS
        .iter()
        .map(|tier| gateway.create_key_on(&format!("{tier}-co"), tier, &[]))
        .collect();
    // Submitted in mixed order, each tier a third.
    let mut jobs = Vec::new();
    for i in 0..JOBS {
        let tier = i % TIERS.len();
        let request = chat(&format!("job {i} of tier {}", TIERS[tier]), 8);
        let job = gateway
            .submit(&keys[tier], "/v1/chat/completions", &request, &[])
            .await;
        jobs.push((tier, job["id"].as_str().unwrap().to_owned(), request));
    }
    assert_ne!(
        gateway.backend_state("gpu").await,
        "hot",
        "every job is submitted while the GPU wakes"
    );
    // Claimed, and shown waiting for the GPU that wakes for it.
    let (first_key, first_id) = (&keys[jobs[0].0], &jobs[0].1);
    eventually("a job shows it waits for capacity", || async {
        let job = gateway.job(first_key, first_id).await.1;
        job["status"] == "waiting_for_capacity" && job["waiting_since"].is_u64()
    })
    .await;

    // The same gpu-sim, run directly, for the answers to compare.
    let reference = Sim::fast();
    let client = gateway.db_client().await;
    let mut sent = [Vec::new(), Vec::new(), Vec::new()];
    for (tier, id, request) in &jobs {
        let job = gateway.ended(&keys[*tier], id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempt"], 1, "{job}");
        let stored = gateway
            .get(&keys[*tier], &format!("/v1/jobs/{id}/result"))
            .await
            .bytes()
            .await
            .unwrap();
        let direct = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", reference.url))
            .json(request)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(without_ids(&stored), without_ids(&direct), "job {id}");
        let uuid: uuid::Uuid = id.parse().unwrap();
        let at: SystemTime = client
            .query_one("SELECT sent_at FROM jobs WHERE id = $1", &[&uuid])
            .await
            .unwrap()
            .get(0);
        sent[*tier].push(at);
    }
    // Once each: one usage event per job.
    let events: i64 = client
        .query_one(
            "SELECT count(*) FROM usage_events e JOIN jobs j ON j.id = e.event_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, JOBS as i64);
    // By priority: a lower tier's job got a slot before a higher tier's last
    // only in the window where the slots turned over (4 at a time).
    for (higher, lower) in [(2, 1), (1, 0)] {
        let last_higher = sent[higher].iter().max().unwrap();
        let overtaking = sent[lower].iter().filter(|at| *at < last_higher).count();
        assert!(
            overtaking <= 4,
            "{overtaking} {} jobs ran before the last {} job",
            TIERS[lower],
            TIERS[higher]
        );
    }
    // Drained: the GPU goes back to warm.
    gateway.wait_state("gpu", "warm").await;
}

/// The Python function docs/jobs.md gives to verify a callback's signature.
fn documented_verifier() -> String {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/jobs.md"))
            .unwrap();
    let after = docs.split("<!-- verify-callback").nth(1).unwrap();
    let code = after.split("```python\n").nth(1).unwrap();
    code.split("```").next().unwrap().to_owned()
}

/// Each callback received: its signature header and its body.
type Received = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A receiver of callbacks: answers 500 to the first, then 200.
struct Receiver {
    url: String,
    received: Received,
    accept: tokio::task::AbortHandle,
}

use std::sync::Arc;

impl Receiver {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/tollgate", listener.local_addr().unwrap());
        let received: Received = Arc::default();
        let kept = Arc::clone(&received);
        let accept = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                // Headers, then Content-Length bytes of body.
                let (head, body) = loop {
                    let n = stream.read(&mut buffer).await.unwrap();
                    if n == 0 {
                        break (String::new(), Vec::new());
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if request.len() >= end + 4 + length {
                        break (head, request[end + 4..end + 4 + length].to_vec());
                    }
                };
                let signature = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-tollgate-signature:"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                let first = {
                    let mut all = kept.lock().unwrap();
                    all.push((signature, body));
                    all.len() == 1
                };
                let status = if first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let answer =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        })
        .abort_handle();
        Self {
            url,
            received,
            accept,
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test]
async fn a_job_calls_back_signed_and_retries_until_answered() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            jobs: "callback_allow_private = true\npoll_interval = \"200ms\"",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let receiver = Receiver::start().await;
    let (status, settings) = gateway
        .post_json(&key, "/v1/callbacks", &json!({"url": receiver.url}))
        .await;
    assert_eq!(status, 200, "{settings}");
    let secret = settings["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let again: Value = gateway
        .get(&key, "/v1/callbacks")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (again["secret"].as_str(), again["url"].as_str()),
        (Some(secret.as_str()), Some(receiver.url.as_str()))
    );

    let job = gateway
        .submit(&key, "/v1/chat/completions", &chat("call me", 4), &[])
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    // Refused once (500), delivered on the retry.
    eventually("the callback is retried until answered", || async {
        receiver.received.lock().unwrap().len() >= 2
    })
    .await;
    let (signature, body) = receiver.received.lock().unwrap()[1].clone();
    let event: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["type"], "job.succeeded", "{event}");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["status"], "succeeded");

    // The documented snippet accepts it, and refuses a changed body or secret.
    let python = test_python("TOLLGATE_TEST_PYTHON", "sdk-venv");
    let driver = format!(
        "{}\nimport os, sys\nbody = open(sys.argv[1], 'rb').read()\n\
         print(verify(os.environ['SECRET'], os.environ['HEADER'], body))\n",
        documented_verifier()
    );
    let dir = std::env::temp_dir().join(unique("callback"));
    std::fs::create_dir_all(&dir).unwrap();
    let verify = |secret: &str, body: &[u8]| {
        std::fs::write(dir.join("body"), body).unwrap();
        let output = Command::new(&python)
            .arg("-c")
            .arg(&driver)
            .arg(dir.join("body"))
            .env("SECRET", secret)
            .env("HEADER", &signature)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(verify(&secret, &body), "True");
    let mut changed = body.clone();
    changed.extend_from_slice(b" ");
    assert_eq!(verify(&secret, &changed), "False");
    assert_eq!(verify("whsec_other", &body), "False");
    let _ = std::fs::remove_dir_all(&dir);

    // A job's own URL is checked at submission.
    let response = gateway
        .ask_async(
            &key,
            "/v1/chat/completions",
            &chat("bad url", 4),
            &[("x-tollgate-callback-url", "ftp://example.com/")],
        )
        .await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn callbacks_to_private_addresses_are_refused_by_default() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let receiver = Receiver::start().await;
    let (status, job) = gateway
        .post_json(
            &key,
            "/v1/jobs",
            &json!({"path": "/v1/chat/completions", "body": chat("inside", 4),
                    "callback_url": receiver.url}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    assert_eq!(gateway.ended(&key, id).await["status"], "succeeded");
    let client = gateway.db_client().await;
    let uuid: uuid::Uuid = id.parse().unwrap();
    eventually("the delivery is tried", || async {
        client
            .query_one(
                "SELECT last_error FROM job_callbacks WHERE job_id = $1",
                &[&uuid],
            )
            .await
            .is_ok_and(|row| row.get::<_, Option<String>>(0).is_some())
    })
    .await;
    let row = client
        .query_one(
            "SELECT delivered_at IS NULL, last_error FROM job_callbacks WHERE job_id = $1",
            &[&uuid],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(
        row.get::<_, Option<String>>(1)
            .unwrap()
            .contains("no public address")
    );
    assert!(receiver.received.lock().unwrap().is_empty());
}

/// moto's S3 server (PyPI `moto[server]`, installed in the SDK venv by
/// scripts/test.sh): a stateful S3 speaking its wire format, as S3 itself
/// cannot be reached from here.
struct S3Fake {
    url: String,
    _server: Proc,
}

impl S3Fake {
    async fn start() -> Self {
        let port = free_port();
        let python = test_python("TOLLGATE_TEST_PYTHON", "sdk-venv");
        let moto = python.with_file_name("moto_server");
        let server = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{} not runnable ({e}): run scripts/test.sh", moto.display())
            });
        let fake = Self {
            url: format!("http://127.0.0.1:{port}"),
            _server: Proc(server),
        };
        eventually("moto's S3 answers", || async {
            reqwest::get(&fake.url).await.is_ok()
        })
        .await;
        fake
    }

    async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.url))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// The keys in `bucket`.
    async fn keys(&self, bucket: &str) -> Vec<String> {
        let listing = reqwest::get(format!("{}/{bucket}?list-type=2", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        listing
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// The environment that points `object_store`'s S3 client at this fake.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.url.clone()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_ACCESS_KEY_ID", "tollgate-test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "tollgate-test".to_owned()),
            ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
        ]
    }
}

#[tokio::test]
async fn results_kept_in_an_s3_bucket_are_served_and_expire() {
    let s3 = S3Fake::start().await;
    s3.create_bucket("results").await;
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(format!(
                "{DEFAULT_TIERS}\n[[tiers]]\nname = \"brief\"\npriority = 5\nresult_retention = \"1s\"\n"
            )),
            jobs: "results_url = \"s3://results/tollgate\"\nsweep_interval = \"200ms\"",
            env: s3.env(),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "brief", &[]);
    let request = chat("into the bucket", 8);
    let job = gateway
        .submit(&key, "/v1/chat/completions", &request, &[])
        .await;
    let id = job["id"].as_str().unwrap();
    let job = gateway.ended(&key, id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // Stored under the prefix, by account and job; nothing on local disk.
    let keys = s3.keys("results").await;
    assert!(
        keys.iter()
            .any(|k| k.starts_with("tollgate/results/") && k.ends_with(id)),
        "{keys:?}"
    );
    assert!(walk(&gateway.results_dir).is_empty());
    let answer: Value = gateway
        .get(&key, &format!("/v1/jobs/{id}/result"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");

    eventually("the result expires and leaves the bucket", || async {
        gateway.job(&key, id).await.1["status"] == "expired" && s3.keys("results").await.is_empty()
    })
    .await;
}
