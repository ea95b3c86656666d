//! `GET /api/metrics` on the admin listener: the JSON summary agrees with the
//! traffic sent, the fleet and its spend; it answers without Postgres,
//! degraded; and it is guarded like the other admin routes.

use std::time::Instant;

use super::*;

/// $3.60 an hour running: a dollar-thousandth a second, so a few seconds
/// hot are a visible spend.
const RUNNING_PER_HOUR: f64 = 3.6;

/// Backend `gpu`, a priced `process` backend (gpu-sim) that stays cold
/// until woken and, once hot, is not stopped while the test runs.
pub(super) fn priced_process_backend() -> String {
    format!(
        "[[backends]]\nname = \"gpu\"\nprovider = \"process\"\nmodels = [\"sim-model\"]\n\
         max_concurrency = 4\nhourly_cost = {RUNNING_PER_HOUR}\nstopped_hourly_cost = 0.1\n\
         command = [\"{}\", \"--listen\", \"127.0.0.1:{{port}}\", \"--model\", \"sim-model\", \
         \"--ttft-ms\", \"0\", \"--tokens-per-sec\", \"0\", \"--exit-with-parent\"]\n\
         [fleet]\nmin_hot = 0\nidle_stop = \"1h\"\ninterval = \"100ms\"\n",
        tollgate_testkit::gpu_sim::binary().display()
    )
}

impl Gateway {
    async fn summary(&self) -> Value {
        let (status, summary) = self
            .admin(
                reqwest::Method::GET,
                "/api/metrics",
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(status, 200, "{summary}");
        summary
    }
}

fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[tokio::test]
async fn api_metrics_summarises_traffic_queues_fleet_and_spend() {
    let started = Instant::now();
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tail: priced_process_backend(),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);

    // Before any traffic: counted nothing, estimated nothing.
    let empty = gateway.summary().await;
    assert_eq!(empty["requests"]["total"], 0, "{empty}");
    assert_eq!(empty["requests"]["success_rate"], Value::Null, "{empty}");
    assert_eq!(empty["latency_secs"]["p50"], Value::Null, "{empty}");
    assert_eq!(empty["fleet"]["by_state"]["cold"], 1, "{empty}");

    let (status, body) = gateway
        .admin(
            reqwest::Method::POST,
            "/admin/backends/gpu/wake",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    eventually("gpu is hot", || async {
        gateway.backend("gpu").await["state"] == "hot"
    })
    .await;

    for _ in 0..3 {
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("Hello", 3))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut unknown = chat("Hello", 3);
    unknown["model"] = json!("no-such-model");
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &unknown)
        .await;
    assert_eq!(status, 404, "{body}");

    // Counted in `logging`, after the answers; the spend waits for the
    // transitions, written to Postgres off the request path.
    eventually(
        "four requests and the gpu's hot time are counted",
        || async {
            let summary = gateway.summary().await;
            summary["requests"]["total"] == 4
                && summary["gpu_spend_today"]["dollars"]
                    .as_f64()
                    .is_some_and(|d| d > 0.0)
        },
    )
    .await;
    let response = gateway
        .client
        .get(format!("{}/api/metrics", gateway.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let summary: Value = response.json().await.unwrap();

    assert_eq!(summary["status"], "ok", "{summary}");
    assert_eq!(summary["errors"], json!([]), "{summary}");
    assert_eq!(summary["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        number(&summary["uptime_secs"]) <= started.elapsed().as_secs_f64(),
        "{summary}"
    );

    let requests = &summary["requests"];
    assert_eq!(requests["total"], 4, "{summary}");
    assert_eq!(
        requests["by_status"],
        json!({"2xx": 3, "4xx": 1, "5xx": 0}),
        "{summary}"
    );
    assert_eq!(
        requests["by_tier"],
        json!({"free": 0, "pro": 4}),
        "{summary}"
    );
    assert_eq!(requests["success_rate"], 0.75, "{summary}");
    assert_eq!(requests["client_error_rate"], 0.25, "{summary}");
    assert_eq!(requests["server_error_rate"], 0.0, "{summary}");

    let latency = &summary["latency_secs"];
    assert_eq!(latency["estimated_from"], "histogram buckets", "{summary}");
    assert_eq!(latency["observations"], 4, "{summary}");
    let (p50, p95, p99) = (
        number(&latency["p50"]),
        number(&latency["p95"]),
        number(&latency["p99"]),
    );
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{summary}");
    let overhead = &summary["overhead_secs"];
    assert_eq!(overhead["observations"], 4, "{summary}");
    assert!(
        number(&overhead["p50"]) <= number(&overhead["p99"]),
        "{summary}"
    );

    for tier in ["free", "pro"] {
        let queue = &summary["queues"]["by_tier"][tier];
        assert_eq!(queue["depth"], 0, "{tier}: {summary}");
        assert_eq!(queue["oldest_wait_secs"], 0.0, "{tier}: {summary}");
    }

    let fleet = &summary["fleet"];
    assert_eq!(
        fleet["by_state"],
        json!({"cold": 0, "provisioning": 0, "warm": 0, "starting": 0, "hot": 2,
               "draining": 0, "failed": 0}),
        "{summary}"
    );
    assert_eq!(
        (&fleet["healthy"], &fleet["routable"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(
        fleet["backends"],
        json!([
            {"name": "b0", "state": "hot", "healthy": true, "routable": true},
            {"name": "gpu", "state": "hot", "healthy": true, "routable": true},
        ])
    );

    // The gpu billed at its running price since it was woken, at most for
    // the whole test; the static backend costs nothing.
    let spend = &summary["gpu_spend_today"];
    let dollars = number(&spend["dollars"]);
    let most = started.elapsed().as_secs_f64() * RUNNING_PER_HOUR / 3600.0;
    assert!(
        0.0 < dollars && dollars <= most,
        "{dollars} > {most}: {summary}"
    );
    assert_eq!(spend["by_backend"]["b0"], 0.0, "{summary}");
    assert_eq!(number(&spend["by_backend"]["gpu"]), dollars, "{summary}");
    assert_eq!(spend["day"].as_str().map(str::len), Some(10), "{summary}");
}

#[tokio::test]
async fn api_metrics_without_postgres_is_degraded_but_answers() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            // Nothing listens there: every Postgres call is refused.
            postgres_port: Some(free_port()),
            ..Options::default()
        },
    )
    .await;
    let summary = gateway.summary().await;
    assert_eq!(summary["status"], "degraded", "{summary}");
    assert_eq!(summary["gpu_spend_today"], Value::Null, "{summary}");
    let errors = summary["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{summary}");
    assert_eq!(errors[0]["source"], "postgres", "{summary}");
    // The rest is still there.
    assert_eq!(summary["requests"]["total"], 0, "{summary}");
    assert_eq!(summary["fleet"]["routable"], 1, "{summary}");
    assert_eq!(summary["queues"]["by_tier"]["pro"]["depth"], 0, "{summary}");
}

#[tokio::test]
async fn api_metrics_needs_the_admin_token_and_get() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let (status, body) = gateway
        .admin(reqwest::Method::GET, "/api/metrics", None, None)
        .await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = gateway
        .admin(reqwest::Method::GET, "/api/metrics", None, Some("wrong"))
        .await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = gateway
        .admin(
            reqwest::Method::POST,
            "/api/metrics",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 405, "{body}");
}
