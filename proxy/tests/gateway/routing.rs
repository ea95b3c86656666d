//! Routing end to end: a backend that dies under load is passed over with
//! no failed requests, and one that comes back is found again through its
//! breaker's half-open probe.

use std::sync::Arc;

use super::*;

/// A gpu-sim on a port the test chooses (to restart it in the same place),
/// once it accepts connections.
fn sim_on(port: u16) -> GpuSim {
    GpuSim::start_on(
        &format!("127.0.0.1:{port}"),
        &[
            "--model",
            "sim-model",
            "--ttft-ms",
            "20",
            "--tokens-per-sec",
            "0",
        ],
    )
}

/// Two gpu-sims on ports of their own: b0 (`a`, which tests kill) and b1.
struct TwoSims {
    a: Option<GpuSim>,
    _b: GpuSim,
    port_a: u16,
    port_b: u16,
}

impl TwoSims {
    fn start() -> Self {
        let (port_a, port_b) = (free_port(), free_port());
        Self {
            a: Some(sim_on(port_a)),
            _b: sim_on(port_b),
            port_a,
            port_b,
        }
    }

    fn backends(&self) -> [BackendSpec; 2] {
        [self.port_a, self.port_b].map(|port| BackendSpec::new(&format!("http://127.0.0.1:{port}")))
    }
}

/// Which backend served each stored usage event.
async fn served_by(gateway: &Gateway) -> Vec<String> {
    let (client, connection) = tokio_postgres::connect(&gateway.db.url, NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query(
            "SELECT coalesce(backend, '-') FROM usage_events ORDER BY created_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn a_backend_killed_under_load_is_passed_over_with_no_failed_requests() {
    let mut sims = TwoSims::start();
    // A long open period, so the breaker is still open when the test looks.
    let options = Options {
        routing: "breaker_open = \"60s\"",
        ..Options::default()
    };
    let gateway = Gateway::start(&sims.backends(), options).await;
    let key = gateway.create_key("acme", &[]);
    // 16 clients, 20 requests each; backend a dies once 80 have been answered.
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let request = gateway
            .client
            .post(format!("{}/v1/chat/completions", gateway.url))
            .bearer_auth(&key)
            .json(&chat("hi", 4));
        let answered = Arc::clone(&answered);
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..20 {
                let response = request.try_clone().unwrap().send().await.unwrap();
                statuses.push(response.status().as_u16());
                answered.fetch_add(1, Ordering::Relaxed);
            }
            statuses
        }));
    }
    eventually("80 answers", || async {
        answered.load(Ordering::Relaxed) >= 80
    })
    .await;
    sims.a.take();
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.unwrap());
    }
    assert_eq!(statuses.len(), 320);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Both served before the kill; only b at the end.
    eventually("every request recorded", || async {
        served_by(&gateway).await.len() == 320
    })
    .await;
    let backends = served_by(&gateway).await;
    assert!(backends[..40].iter().any(|b| b == "b0"));
    assert!(backends[..40].iter().any(|b| b == "b1"));
    assert!(backends[300..].iter().all(|b| b == "b1"), "{backends:?}");

    // Operators see it: the dead backend's breaker is open.
    let (status, listing) = gateway
        .admin(
            reqwest::Method::GET,
            "/admin/backends",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200);
    let states: Vec<_> = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].clone(),
                b["breaker"].clone(),
                b["in_flight"].clone(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (json!("b0"), json!("open"), json!(0)),
            (json!("b1"), json!("closed"), json!(0))
        ]
    );
    let output = gateway.cli(&["fleet", "status"]).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8(output.stdout).unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0][..7],
        [
            "NAME", "PROVIDER", "STATE", "ADDRESS", "ROUTABLE", "HEALTHY", "BREAKER"
        ]
    );
    assert_eq!(
        (rows[1][0], rows[1][2], rows[1][4], rows[1][6]),
        ("b0", "hot", "no", "open")
    );
    assert_eq!(
        (rows[2][0], rows[2][2], rows[2][4], rows[2][6]),
        ("b1", "hot", "yes", "closed")
    );
}

#[tokio::test]
async fn a_backend_that_returns_is_found_again_through_a_half_open_probe() {
    let mut sims = TwoSims::start();
    let gateway = Gateway::start(
        &sims.backends(),
        Options {
            routing: "policy = \"round_robin\"\nbreaker_failures = 1\nbreaker_open = \"500ms\"",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    sims.a.take();
    // Refused by a: retried on b, and a's breaker opens.
    for _ in 0..4 {
        let (status, _) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
            .await;
        assert_eq!(status, 200);
    }
    let _sim_a = sim_on(sims.port_a);
    // After breaker_open one probe goes to a; it answers, the breaker
    // closes, and round-robin reaches a again.
    eventually("backend a serves again", || async {
        let (status, _) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
            .await;
        assert_eq!(status, 200);
        let backends = served_by(&gateway).await;
        backends.len() > 4 && backends[4..].iter().any(|b| b == "b0")
    })
    .await;
}

#[tokio::test]
async fn a_backend_failing_its_health_checks_is_passed_over_until_it_recovers() {
    let sims = TwoSims::start();
    let gateway = Gateway::start(
        &sims.backends(),
        Options {
            health: "interval = \"50ms\"\ngrace = \"0s\"\nunhealthy_after = 2\nhealthy_after = 2",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let healthy = |name: &'static str| {
        let gateway = &gateway;
        async move { gateway.backend(name).await["healthy"] == true }
    };
    assert!(healthy("b0").await);
    // The engine fails: its /health answers 503 (no request need fail first).
    let sim_a = format!("http://127.0.0.1:{}", sims.port_a);
    gateway
        .client
        .post(format!("{sim_a}/sim/fail"))
        .send()
        .await
        .unwrap();
    eventually("b0 found unhealthy", || async { !healthy("b0").await }).await;
    for _ in 0..6 {
        let (status, _) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
            .await;
        assert_eq!(status, 200);
    }
    eventually("six requests recorded", || async {
        served_by(&gateway).await.len() == 6
    })
    .await;
    assert!(served_by(&gateway).await.iter().all(|b| b == "b1"));
    gateway
        .client
        .post(format!("{sim_a}/sim/recover"))
        .send()
        .await
        .unwrap();
    eventually("b0 healthy again", || async { healthy("b0").await }).await;
}

#[tokio::test]
async fn a_backend_given_by_host_name_serves() {
    let sim = Sim::fast();
    let by_name = sim.url.replace("127.0.0.1", "localhost");
    let gateway = Gateway::start(&[BackendSpec::new(&by_name)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(status, 200, "{body}");
}
