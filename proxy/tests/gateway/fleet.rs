//! The GPU fleet end to end: instances woken from zero by a held request,
//! put back to sleep when idle, and operated by hand; every transition
//! recorded in `instance_events`; rented pods never orphaned by a create
//! whose answer was lost, nor by a restart in the middle of one.

use tollgate_testkit::runpod::{FakeOptions, FakeRunPod, LostAnswer};

use super::*;

/// A `process` backend running gpu-sim with a start-up delay, and a
/// `[fleet]` that scales it to zero after `idle_stop_secs`.
pub(super) fn process_fleet(startup_delay_secs: u32, idle_stop_secs: u32) -> String {
    let sim = tollgate_testkit::gpu_sim::binary();
    format!(
        "[[backends]]\nname = \"gpu\"\nprovider = \"process\"\nmodels = [\"sim-model\"]\n\
         max_concurrency = 4\nhourly_cost = 2.0\nstopped_hourly_cost = 0.1\n\
         command = [\"{}\", \"--listen\", \"127.0.0.1:{{port}}\", \"--model\", \"sim-model\", \
         \"--startup-delay\", \"{startup_delay_secs}\", \"--ttft-ms\", \"0\", \"--tokens-per-sec\", \"0\", \
         \"--exit-with-parent\"]\n\
         [fleet]\nmin_hot = 0\nidle_stop = \"{idle_stop_secs}s\"\ninterval = \"100ms\"\n",
        sim.display()
    )
}

impl Gateway {
    pub(super) async fn backend_state(&self, name: &str) -> String {
        self.backend(name).await["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub(super) async fn wait_state(&self, name: &str, state: &str) {
        eventually(&format!("backend {name} is {state}"), || async {
            self.backend_state(name).await == state
        })
        .await;
    }

    async fn command(&self, name: &str, verb: &str) -> (u16, Value) {
        self.admin(
            reqwest::Method::POST,
            &format!("/admin/backends/{name}/{verb}"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await
    }

    /// `(from, to, reason)` of every recorded transition of `backend`, in order.
    async fn transitions(&self, backend: &str) -> Vec<(String, String, String)> {
        let (client, connection) = tokio_postgres::connect(&self.db.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .query(
                "SELECT from_state, to_state, reason FROM instance_events \
                 WHERE backend = $1 ORDER BY at, id",
                &[&backend],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }
}

/// One row of `instance_events`.
#[derive(Debug)]
struct Recorded {
    hop: String,
    instance_id: Option<String>,
    instance_name: Option<String>,
}

impl Gateway {
    /// Every recorded transition of `backend`, in order, with the instance's
    /// id and name.
    async fn recorded(&self, backend: &str) -> Vec<Recorded> {
        let (client, connection) = tokio_postgres::connect(&self.db.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .query(
                "SELECT from_state, to_state, reason, instance_id, instance_name \
                 FROM instance_events WHERE backend = $1 ORDER BY at, id",
                &[&backend],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| Recorded {
                hop: format!(
                    "{}->{}:{}",
                    row.get::<_, &str>(0),
                    row.get::<_, &str>(1),
                    row.get::<_, &str>(2)
                ),
                instance_id: row.get(3),
                instance_name: row.get(4),
            })
            .collect()
    }

    /// Kills `tollgate serve` at once, as a crash would: nothing is drained.
    fn crash(&mut self) {
        drop(self.proc.take());
    }
}

fn hops(transitions: &[(String, String, String)]) -> Vec<String> {
    transitions
        .iter()
        .map(|(from, to, reason)| format!("{from}->{to}:{reason}"))
        .collect()
}

#[tokio::test]
async fn a_request_to_a_model_scaled_to_zero_wakes_an_instance_and_waits_for_it() {
    let gateway = Gateway::start(
        &[],
        Options {
            tail: process_fleet(3, 2),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    assert_eq!(gateway.backend_state("gpu").await, "cold");
    assert_eq!(
        gateway.readiness().await["backends"],
        true,
        "a fleet scaled to zero is ready: it serves by waking"
    );

    // Held in the queue while the process starts and loads (3 s), not failed.
    let response = gateway
        .post(&key, "/v1/chat/completions", &chat("wake up", 4))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-cold-start"], "true");
    let waited: u64 = response.headers()["x-tollgate-queue-wait-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        waited >= 3000,
        "held for the start-up delay, waited {waited} ms"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 4);

    // A hot instance answers at once, without the header.
    let response = gateway
        .post(&key, "/v1/chat/completions", &chat("again", 2))
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-tollgate-cold-start").is_none());

    // Idle for idle_stop_secs: back to warm (stopped, resumable).
    gateway.wait_state("gpu", "warm").await;

    // From warm, a request resumes it: a start, not a new rental.
    let response = gateway
        .post(&key, "/v1/chat/completions", &chat("and again", 3))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-cold-start"], "true");

    let gpu = gateway.backend("gpu").await;
    assert_eq!(gpu["provider"], "process");
    assert!(gpu["cost_so_far"].as_f64().unwrap() > 0.0, "{gpu}");

    eventually("the resume is recorded", || async {
        gateway.transitions("gpu").await.len() >= 7
    })
    .await;
    let recorded = hops(&gateway.transitions("gpu").await);
    assert_eq!(
        recorded[..7],
        [
            "cold->provisioning:scale_from_zero",
            "provisioning->starting:started",
            "starting->hot:ready",
            "hot->draining:idle",
            "draining->warm:stopped",
            "warm->starting:scale_from_zero",
            "starting->hot:ready",
        ]
    );
}

#[tokio::test]
async fn operators_drain_wake_and_sleep_backends() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tail: process_fleet(0, 3600),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    // b0 is static and hot; the process backend stays cold with min_hot = 0
    // and nothing waiting.
    assert_eq!(gateway.backend_state("b0").await, "hot");
    assert_eq!(gateway.backend_state("gpu").await, "cold");

    let (status, body) = gateway.command("gpu", "wake").await;
    assert_eq!(status, 202, "{body}");
    gateway.wait_state("gpu", "hot").await;

    // A drained static backend takes no new requests: they go to the other.
    // (By the CLI here; the admin API below.)
    let drained = gateway.cli(&["fleet", "drain", "b0"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&drained.stdout).contains("state now draining"),
        "{drained:?}"
    );
    let listing = gateway.cli(&["fleet", "status"]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let row = |name: &str| {
        listing
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>())
    };
    assert_eq!(
        row("b0"),
        Some(vec!["b0", "static", "draining"]),
        "{listing}"
    );
    assert_eq!(row("gpu"), Some(vec!["gpu", "process", "hot"]), "{listing}");
    for _ in 0..5 {
        let (status, body) = gateway
            .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let usage_events = || async {
        gateway
            .admin(
                reqwest::Method::GET,
                "/admin/usage/events?account=acme",
                None,
                Some(ADMIN_TOKEN),
            )
            .await
            .1
    };
    eventually("five usage events", || async {
        usage_events().await["data"].as_array().unwrap().len() == 5
    })
    .await;
    let events = usage_events().await;
    let served_by: Vec<_> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["backend"].as_str().unwrap_or("-").to_owned())
        .collect();
    assert_eq!(served_by, ["gpu"; 5], "{events}");

    // Static backends cannot be put to sleep; unknown ones are 404.
    let (status, body) = gateway.command("b0", "sleep").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(gateway.command("nope", "wake").await.0, 404);
    assert_eq!(gateway.command("gpu", "reboot").await.0, 404);

    gateway.command("b0", "wake").await;
    gateway.wait_state("b0", "hot").await;

    // Sleep stops the instance once idle; it stays warm (nothing waits).
    let (status, _) = gateway.command("gpu", "sleep").await;
    assert_eq!(status, 202);
    gateway.wait_state("gpu", "warm").await;
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200, "served by b0: {body}");

    // Transitions are written off the request path: wait for the last one.
    eventually("the stop is recorded", || async {
        hops(&gateway.transitions("gpu").await)
            .last()
            .is_some_and(|hop| hop == "draining->warm:stopped")
    })
    .await;
    let recorded = hops(&gateway.transitions("gpu").await);
    assert!(
        recorded.contains(&"warm->starting:operator_wake".to_owned())
            || recorded.contains(&"cold->provisioning:operator_wake".to_owned()),
        "{recorded:?}"
    );
    assert!(
        recorded.contains(&"hot->draining:operator_sleep".to_owned()),
        "{recorded:?}"
    );
    assert_eq!(recorded.last().unwrap(), "draining->warm:stopped");
}

/// A `runpod` backend against a fake of RunPod's API whose pods are all
/// reached at `sim`.
fn runpod_fleet(fake: &FakeRunPod) -> String {
    runpod_fleet_with(fake, "", "")
}

/// [`runpod_fleet`] with extra `[backends.runpod]` and `[fleet]` lines.
fn runpod_fleet_with(fake: &FakeRunPod, runpod: &str, fleet: &str) -> String {
    format!(
        "[[backends]]\nname = \"pod\"\nprovider = \"runpod\"\nmodels = [\"sim-model\"]\n\
         max_concurrency = 4\nhourly_cost = 0.69\nstopped_hourly_cost = 0.03\n\
         [backends.runpod]\napi_url = \"{}\"\napi_key = \"{}\"\ninference_port = 8000\n{runpod}\
         [backends.runpod.pod]\nimage_name = \"vllm/vllm-openai:v0.9.1\"\n\
         gpu_type_ids = [\"NVIDIA RTX A6000\"]\nports = [\"8000/tcp\"]\n\
         [fleet]\nmin_hot = 0\nidle_stop = \"1h\"\ninterval = \"100ms\"\n{fleet}",
        fake.url(),
        fake.api_key()
    )
}

/// A fake RunPod whose pods are reached at a fast gpu-sim.
async fn fake_runpod_at(sim: &Sim) -> FakeRunPod {
    let sim_port: u16 = sim.url.rsplit(':').next().unwrap().parse().unwrap();
    FakeRunPod::start(FakeOptions::default().map_port(8000, sim_port))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cannot_resume_is_replaced_by_a_new_one_and_adopted_after_a_restart() {
    let sim = Sim::fast();
    let fake = fake_runpod_at(&sim).await;
    let mut gateway = Gateway::start(
        &[],
        Options {
            tail: runpod_fleet(&fake),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);

    // Scale from zero rents a pod.
    let response = gateway
        .post(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-cold-start"], "true");
    let first = fake.pods()[0].id.clone();

    gateway.command("pod", "sleep").await;
    gateway.wait_state("pod", "warm").await;

    // The host's GPU was rented meanwhile: the resume fails, a new pod is
    // rented and the stopped one released. The request is still served.
    fake.set_resume_capacity(false);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(status, 200, "{body}");
    let pods = fake.pods();
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert_eq!(
        (pods[0].id.as_str(), pods[0].desired_status),
        (first.as_str(), "TERMINATED")
    );
    assert_eq!(pods[1].desired_status, "RUNNING");
    let calls: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method != reqwest::Method::GET)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        calls,
        [
            "POST /pods".to_owned(),
            format!("POST /pods/{first}/stop"),
            format!("POST /pods/{first}/start"),
            format!("DELETE /pods/{first}"),
            "POST /pods".to_owned(),
        ]
    );
    // Transitions are written off the request path: wait for the last one.
    let replaced = [
        "warm->starting:scale_from_zero",
        "starting->provisioning:resume_no_capacity",
        "provisioning->starting:started",
        "starting->hot:ready",
    ];
    eventually("the replacement is recorded", || async {
        hops(&gateway.transitions("pod").await).ends_with(&replaced.map(str::to_owned))
    })
    .await;

    // A restarted gateway adopts the rented pod instead of renting another.
    gateway.sigterm();
    gateway.wait_exit();
    gateway.serve().await;
    gateway.wait_state("pod", "hot").await;
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.pods().len(), 2, "no third pod");
    assert_eq!(
        gateway.backend("pod").await["instance_id"],
        pods[1].id.as_str()
    );
}

/// Issue 17, item 7: RunPod rented the pod but the answer to the create was
/// lost (here: the connection reset), so the controller rented again, and
/// the first pod ran, billed, forever. The create is looked up by its name
/// instead, and the pod it rented is the one that serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_create_answer_was_lost_is_found_by_name_and_serves() {
    let sim = Sim::fast();
    let fake = fake_runpod_at(&sim).await;
    fake.set_lose_create_answers(Some(LostAnswer::Reset));
    // A failed create is retried after a second, not a minute: without the
    // lookup more pods would be rented well within the request's wait, which
    // is a minute rather than pro's default five.
    let gateway = Gateway::start(
        &[],
        Options {
            tail: runpod_fleet_with(&fake, "", "failed_retry = \"1s\"\n"),
            tiers: Some(format!("{DEFAULT_TIERS}max_queue_wait = \"60s\"\n")),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);

    let response = gateway
        .post(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(
        response.status(),
        200,
        "pods rented meanwhile: {}",
        fake.pods().len()
    );
    assert_eq!(response.headers()["x-tollgate-cold-start"], "true");

    let pods = fake.pods();
    assert_eq!(pods.len(), 1, "one pod rented: {pods:?}");
    let pod = &pods[0];
    assert_eq!(pod.desired_status, "RUNNING");
    let name = pod.name.clone().unwrap();
    assert!(name.starts_with("tollgate-pod-"), "{name}");
    assert_eq!(gateway.backend("pod").await["instance_id"], pod.id.as_str());
    let creates = fake
        .requests()
        .iter()
        .filter(|r| r.method == reqwest::Method::POST && r.path == "/pods")
        .count();
    assert_eq!(creates, 1);

    eventually("the start is recorded", || async {
        gateway.recorded("pod").await.len() >= 3
    })
    .await;
    let recorded = gateway.recorded("pod").await;
    let hops: Vec<_> = recorded.iter().map(|r| r.hop.as_str()).collect();
    assert_eq!(
        hops[..3],
        [
            "cold->provisioning:scale_from_zero",
            "provisioning->starting:found_by_name",
            "starting->hot:ready",
        ]
    );
    assert_eq!(recorded[0].instance_id, None, "not known before the answer");
    assert_eq!(recorded[0].instance_name.as_deref(), Some(name.as_str()));
    assert_eq!(recorded[1].instance_id.as_deref(), Some(pod.id.as_str()));
    assert_eq!(recorded[1].instance_name.as_deref(), Some(name.as_str()));
}

/// Tollgate dies after the create is sent and before its answer: the name
/// is in the log already, and the restarted gateway adopts the pod by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_pending_create_adopts_the_pod_it_rented() {
    let sim = Sim::fast();
    let fake = fake_runpod_at(&sim).await;
    // The create is carried out and never answered; an hour's timeout keeps
    // Tollgate waiting for the answer until it is killed.
    fake.set_lose_create_answers(Some(LostAnswer::Silence));
    let mut gateway = Gateway::start(
        &[],
        Options {
            tail: runpod_fleet_with(&fake, "timeout = \"1h\"\n", ""),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);

    let (status, body) = gateway.command("pod", "wake").await;
    assert_eq!(status, 202, "{body}");
    eventually("RunPod has the pod", || async { fake.pods().len() == 1 }).await;
    let pod = fake.pods().remove(0);
    let name = pod.name.clone().unwrap();
    // Written before the create was sent: no waiting for it here.
    let recorded = gateway.recorded("pod").await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].hop, "cold->provisioning:operator_wake");
    assert_eq!(recorded[0].instance_id, None);
    assert_eq!(recorded[0].instance_name.as_deref(), Some(name.as_str()));

    gateway.crash();
    fake.set_lose_create_answers(None);
    gateway.serve().await;
    gateway.wait_state("pod", "hot").await;

    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.pods().len(), 1, "no second pod");
    assert_eq!(gateway.backend("pod").await["instance_id"], pod.id.as_str());
    let creates = fake
        .requests()
        .iter()
        .filter(|r| r.method == reqwest::Method::POST && r.path == "/pods")
        .count();
    assert_eq!(creates, 1);
    let adoption = "provisioning->starting:found_by_name";
    eventually("the adoption is recorded", || async {
        gateway
            .recorded("pod")
            .await
            .iter()
            .any(|r| r.hop == adoption)
    })
    .await;
    let recorded = gateway.recorded("pod").await;
    let found = recorded.iter().find(|r| r.hop == adoption).unwrap();
    assert_eq!(found.instance_id.as_deref(), Some(pod.id.as_str()));
    assert_eq!(found.instance_name.as_deref(), Some(name.as_str()));
}
