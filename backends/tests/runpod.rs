//! The RunPod provider against the fake RunPod API over loopback: the exact
//! requests it sends (method, path, headers, body) and what it makes of the
//! answers, through a whole create → stop → start → terminate lifecycle,
//! RunPod's capacity and auth failures, and creates whose answers are lost
//! and are found again by name. One test reaches a real gpu-sim through the
//! address the provider reports.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::Sim;

use secrecy::SecretString;
use serde_json::{Value, json};
use tollgate_backends::fleet::providers::runpod::{CloudType, PodTemplate, RunPod, RunPodConfig};
use tollgate_backends::fleet::providers::{
    HourlyCost, Instance, InstanceStatus, Provider, ProviderError,
};
use tollgate_testkit::runpod::{FakeOptions, FakeRunPod, LostAnswer, RecordedRequest};

const INFERENCE_PORT: u16 = 8000;
/// A name as the controller mints them: `{pod.name}-{backend}-{uuid v7}`.
const NAME: &str = "tollgate-llama-gpu-1-01990c4e-8c1f-7b6e-9a51-3f0c2d7e4b10";
/// Where the fake says the inference port is published.
const PUBLIC_PORT: u16 = 41234;

fn template() -> PodTemplate {
    PodTemplate {
        name: "tollgate-llama".to_owned(),
        image_name: "vllm/vllm-openai:v0.9.1".to_owned(),
        gpu_type_ids: vec!["NVIDIA RTX A6000".to_owned(), "NVIDIA A40".to_owned()],
        gpu_count: 1,
        cloud_type: CloudType::Secure,
        container_disk_in_gb: 50,
        volume_in_gb: 100,
        volume_mount_path: "/workspace".to_owned(),
        ports: vec![
            "8000/tcp".to_owned(),
            "22/tcp".to_owned(),
            "8888/http".to_owned(),
        ],
        env: BTreeMap::from([
            ("HF_HOME".to_owned(), "/workspace/hf".to_owned()),
            ("HF_TOKEN".to_owned(), "hf_secret_token".to_owned()),
        ]),
    }
}

const COST: HourlyCost = HourlyCost {
    running: 0.69,
    stopped: 0.03,
};

fn config(fake: &FakeRunPod) -> RunPodConfig {
    RunPodConfig {
        api_url: fake.url().to_owned(),
        api_key: SecretString::from(fake.api_key()),
        pod: template(),
        inference_port: INFERENCE_PORT,
        timeout: Duration::from_secs(10),
    }
}

async fn fake_with(options: FakeOptions) -> (FakeRunPod, RunPod) {
    let fake = FakeRunPod::start(options.map_port(INFERENCE_PORT, PUBLIC_PORT))
        .await
        .unwrap();
    let provider = RunPod::new(config(&fake), COST).unwrap();
    (fake, provider)
}

async fn fake() -> (FakeRunPod, RunPod) {
    fake_with(FakeOptions::default()).await
}

fn expected_address() -> String {
    format!("127.0.0.1:{PUBLIC_PORT}")
}

fn last(fake: &FakeRunPod) -> RecordedRequest {
    fake.requests().pop().expect("a request")
}

fn assert_call(request: &RecordedRequest, method: &str, path: &str, fake: &FakeRunPod) {
    assert_eq!(request.method.as_str(), method, "{request:?}");
    assert_eq!(request.path, path, "{request:?}");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {}", fake.api_key()).as_str())
    );
}

fn status_of(fake: &FakeRunPod, id: &str) -> &'static str {
    fake.pods()
        .into_iter()
        .find(|pod| pod.id == id)
        .expect("pod known to the fake")
        .desired_status
}

#[tokio::test]
async fn create_posts_the_pod_template_to_pods() {
    let (fake, runpod) = fake().await;

    let instance = runpod.create(NAME).await.unwrap();

    let request = last(&fake);
    assert_call(&request, "POST", "/pods", &fake);
    assert!(
        request
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json"))
    );
    assert_eq!(
        request.body,
        json!({
            "name": NAME,
            "imageName": "vllm/vllm-openai:v0.9.1",
            "computeType": "GPU",
            "cloudType": "SECURE",
            "gpuTypeIds": ["NVIDIA RTX A6000", "NVIDIA A40"],
            "gpuCount": 1,
            "containerDiskInGb": 50,
            "volumeInGb": 100,
            "volumeMountPath": "/workspace",
            "ports": ["8000/tcp", "22/tcp", "8888/http"],
            "env": { "HF_HOME": "/workspace/hf", "HF_TOKEN": "hf_secret_token" },
            "supportPublicIp": true,
        })
    );
    assert_eq!(fake.requests().len(), 1, "one request per call");
    let pods = fake.pods();
    assert_eq!(pods.len(), 1);
    assert_eq!(instance.id, pods[0].id);
    assert_eq!(instance.address, Some(expected_address()));
    assert_eq!(runpod.kind(), "runpod");
    assert_eq!(runpod.cost().running, 0.69);
}

#[tokio::test]
async fn lifecycle_create_stop_start_terminate() {
    let (fake, runpod) = fake().await;

    let created = runpod.create(NAME).await.unwrap();
    let id = created.id.clone();
    let (status, seen) = runpod.status(&created).await.unwrap();
    assert_call(&last(&fake), "GET", &format!("/pods/{id}"), &fake);
    assert_eq!(last(&fake).body, Value::Null);
    assert_eq!(status, InstanceStatus::Running);
    assert_eq!(seen, created);

    runpod.stop(&created).await.unwrap();
    let request = last(&fake);
    assert_call(&request, "POST", &format!("/pods/{id}/stop"), &fake);
    assert_eq!(request.body, Value::Null, "stop sends no body");
    assert_eq!(status_of(&fake, &id), "EXITED");
    let (status, stopped) = runpod.status(&created).await.unwrap();
    assert_eq!(status, InstanceStatus::Stopped);
    assert_eq!(stopped.address, None);

    let resumed = runpod.start(&stopped).await.unwrap();
    let request = last(&fake);
    assert_call(&request, "POST", &format!("/pods/{id}/start"), &fake);
    assert_eq!(request.body, Value::Null, "start sends no body");
    assert_eq!(resumed.id, id);
    assert_eq!(status_of(&fake, &id), "RUNNING");
    let (status, running) = runpod.status(&resumed).await.unwrap();
    assert_eq!(status, InstanceStatus::Running);
    assert_eq!(running.address, Some(expected_address()));

    runpod.terminate(&running).await.unwrap();
    assert_call(&last(&fake), "DELETE", &format!("/pods/{id}"), &fake);
    assert_eq!(status_of(&fake, &id), "TERMINATED");

    let methods: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        methods,
        [
            "POST /pods".to_owned(),
            format!("GET /pods/{id}"),
            format!("POST /pods/{id}/stop"),
            format!("GET /pods/{id}"),
            format!("POST /pods/{id}/start"),
            format!("GET /pods/{id}"),
            format!("DELETE /pods/{id}"),
        ]
    );
}

/// RunPod forgets a deleted pod: every call about it is NotFound, naming it.
#[tokio::test]
async fn a_deleted_pod_is_not_found() {
    let (_fake, runpod) = fake().await;
    let pod = runpod.create(NAME).await.unwrap();
    runpod.terminate(&pod).await.unwrap();

    let not_found =
        |e: ProviderError| matches!(e, ProviderError::NotFound(ref id) if *id == pod.id);
    assert!(not_found(runpod.status(&pod).await.unwrap_err()));
    assert!(not_found(runpod.start(&pod).await.unwrap_err()));
    assert!(not_found(runpod.stop(&pod).await.unwrap_err()));
    assert!(not_found(runpod.terminate(&pod).await.unwrap_err()));
}

#[tokio::test]
async fn resume_without_a_free_gpu_on_the_host_is_no_capacity() {
    let (fake, runpod) = fake().await;
    let pod = runpod.create(NAME).await.unwrap();
    runpod.stop(&pod).await.unwrap();
    fake.set_resume_capacity(false);

    let error = runpod.start(&pod).await.unwrap_err();

    match error {
        ProviderError::NoCapacity(message) => {
            assert!(
                message.contains("not enough free GPUs on the host machine"),
                "{message}"
            );
        }
        other => panic!("expected NoCapacity, got {other:?}"),
    }
    assert_eq!(status_of(&fake, &pod.id), "EXITED", "the pod stays stopped");
    let starts = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/start"))
        .count();
    assert_eq!(
        starts, 1,
        "one attempt: the controller decides about retries"
    );

    // Once the host has a GPU again, the same pod resumes.
    fake.set_resume_capacity(true);
    runpod.start(&pod).await.unwrap();
    assert_eq!(status_of(&fake, &pod.id), "RUNNING");
}

#[tokio::test]
async fn create_without_capacity_is_no_capacity() {
    let (fake, runpod) = fake_with(FakeOptions {
        create_capacity: false,
        ..FakeOptions::default()
    })
    .await;

    let error = runpod.create(NAME).await.unwrap_err();

    assert!(
        matches!(&error, ProviderError::NoCapacity(m) if m.contains("no instances currently available")),
        "{error:?}"
    );
    assert_eq!(fake.requests().len(), 1);
    assert!(fake.pods().is_empty());
    fake.set_create_capacity(true);
    runpod.create(NAME).await.unwrap();
}

#[tokio::test]
async fn wrong_api_key_is_an_error_naming_401() {
    let fake = FakeRunPod::start(FakeOptions::default()).await.unwrap();
    let runpod = RunPod::new(
        RunPodConfig {
            api_key: SecretString::from("rpa_wrong"),
            ..config(&fake)
        },
        COST,
    )
    .unwrap();

    let error = runpod.create(NAME).await.unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(error));
    assert!(
        text.contains("401") && text.contains("Unauthorized"),
        "{text}"
    );
    assert_eq!(
        last(&fake).header("authorization"),
        Some("Bearer rpa_wrong")
    );

    let probe = Instance {
        id: "fakepod0000001".to_owned(),
        address: None,
    };
    let error = runpod.status(&probe).await.unwrap_err();
    assert!(
        matches!(error, ProviderError::Other(_)),
        "a 401 is no missing pod: {error:?}"
    );
    assert!(format!("{:#}", anyhow::Error::from(error)).contains("401"));
}

/// RunPod answers RUNNING at once; the IP and port mapping come once the
/// container is up, are cleared by a stop, and may differ after a resume.
#[tokio::test]
async fn address_is_public_ip_and_mapped_port_only_while_running() {
    let (fake, runpod) = fake_with(FakeOptions {
        boot_polls: 1,
        ..FakeOptions::default()
    })
    .await;

    let created = runpod.create(NAME).await.unwrap();
    assert_eq!(
        created.address, None,
        "no mapping while the container starts"
    );
    let (status, booting) = runpod.status(&created).await.unwrap();
    assert_eq!((status, booting.address), (InstanceStatus::Pending, None));
    let (status, running) = runpod.status(&created).await.unwrap();
    assert_eq!(status, InstanceStatus::Running);
    assert_eq!(running.address, Some(expected_address()));

    runpod.stop(&running).await.unwrap();
    let (status, stopped) = runpod.status(&running).await.unwrap();
    assert_eq!(
        (status, stopped.address.as_deref()),
        (InstanceStatus::Stopped, None)
    );

    fake.set_port_mapping(INFERENCE_PORT, 41999);
    let resumed = runpod.start(&stopped).await.unwrap();
    assert_eq!(resumed.address, None);
    let (status, _) = runpod.status(&resumed).await.unwrap();
    assert_eq!(status, InstanceStatus::Pending);
    let (status, running) = runpod.status(&resumed).await.unwrap();
    assert_eq!(status, InstanceStatus::Running);
    assert_eq!(running.address.as_deref(), Some("127.0.0.1:41999"));
}

#[tokio::test]
async fn the_reported_address_reaches_the_inference_server() {
    let sim = Sim::start(&[]);
    let fake = FakeRunPod::start(FakeOptions::default().map_port(INFERENCE_PORT, sim.port()))
        .await
        .unwrap();
    let runpod = RunPod::new(config(&fake), COST).unwrap();

    let pod = runpod.create(NAME).await.unwrap();
    let address = pod.address.expect("a running pod has an address");
    let health = reqwest::get(format!("http://{address}/health"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    fake.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_api_is_an_error_after_the_timeout() {
    // Accepts connections (the kernel's backlog) and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = FakeRunPod::start(FakeOptions::default()).await.unwrap();
    let runpod = RunPod::new(
        RunPodConfig {
            api_url: format!("http://{}/v1", listener.local_addr().unwrap()),
            timeout: Duration::from_millis(200),
            ..config(&fake)
        },
        COST,
    )
    .unwrap();

    let error = runpod.create(NAME).await.unwrap_err();

    let text = format!("{:#}", anyhow::Error::from(error));
    assert!(
        text.contains("POST /pods: no answer within 200ms"),
        "{text}"
    );
}

/// The fake refuses malformed creates as RunPod does, with its error shape.
#[tokio::test]
async fn the_fake_refuses_creates_runpod_would_refuse() {
    let fake = FakeRunPod::start(FakeOptions::default()).await.unwrap();
    let client = reqwest::Client::new();
    let post = |body: Value| {
        client
            .post(format!("{}/pods", fake.url()))
            .bearer_auth(fake.api_key())
            .json(&body)
            .send()
    };

    for (body, problem) in [
        (json!({ "gpuTypeIds": ["NVIDIA A40"] }), "imageName"),
        (json!({ "imageName": "img" }), "gpuTypeIds"),
        (
            json!({ "imageName": "img", "gpuTypeIds": ["NVIDIA A40"], "gpuCount": "2" }),
            "gpuCount",
        ),
        (
            json!({ "imageName": "img", "gpuTypeId": "NVIDIA A40" }),
            "gpuTypeId",
        ),
    ] {
        let response = post(body.clone()).await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["status"], 400);
        assert!(
            answer["error"].as_str().unwrap().contains(problem),
            "{answer}"
        );
    }

    let unauthorized = client
        .post(format!("{}/pods", fake.url()))
        .json(&json!({ "imageName": "img", "gpuTypeIds": ["NVIDIA A40"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    assert!(fake.pods().is_empty());
    assert_eq!(
        fake.requests().len(),
        5,
        "refused requests are recorded too"
    );

    let created = post(json!({ "imageName": "img", "gpuTypeIds": ["NVIDIA A40"], "ports": ["8000/http", "22/tcp"] }))
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let pod: Value = created.json().await.unwrap();
    assert_eq!(pod["desiredStatus"], "RUNNING");
    assert_eq!(pod["publicIp"], "127.0.0.1");
    assert_eq!(
        pod["portMappings"],
        json!({ "22": 30022 }),
        "only tcp ports are mapped"
    );
}

/// `find` is `GET /pods?name=…`, and only pods of exactly that name count.
#[tokio::test]
async fn find_lists_the_pods_of_a_name() {
    let (fake, runpod) = fake().await;
    let other = "tollgate-llama-gpu-2-01990c4e-8c1f-7b6e-9a51-000000000000";
    let pod = runpod.create(NAME).await.unwrap();
    runpod.create(other).await.unwrap();

    let found = runpod.find(NAME).await.unwrap();

    let request = last(&fake);
    assert_call(&request, "GET", "/pods", &fake);
    assert_eq!(request.query, [("name".to_owned(), NAME.to_owned())]);
    assert_eq!(request.body, Value::Null);
    assert_eq!(found, [pod], "with its address, as a create answers");
    assert!(runpod.find("tollgate-llama").await.unwrap().is_empty());

    runpod.terminate(&found[0]).await.unwrap();
    assert!(
        runpod.find(NAME).await.unwrap().is_empty(),
        "a deleted pod is not listed"
    );
}

/// The fault the controller's idempotent create is for: RunPod rented the
/// pod, the connection broke before its answer arrived.
#[tokio::test]
async fn a_create_whose_answer_is_reset_fails_but_its_pod_is_found_by_name() {
    let (fake, runpod) = fake().await;
    fake.set_lose_create_answers(Some(LostAnswer::Reset));

    let error = runpod.create(NAME).await.unwrap_err();

    assert!(matches!(error, ProviderError::Other(_)), "{error:?}");
    let text = format!("{:#}", anyhow::Error::from(error));
    assert!(
        text.contains("POST /pods:") && text.contains("connection closed"),
        "{text}"
    );
    let pods = fake.pods();
    assert_eq!(pods.len(), 1, "carried out all the same");
    assert_eq!(
        (pods[0].name.as_deref(), pods[0].desired_status),
        (Some(NAME), "RUNNING")
    );
    let found = runpod.find(NAME).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, pods[0].id);
    assert_eq!(found[0].address, Some(expected_address()));

    // Only a create that was carried out loses its answer.
    fake.set_create_capacity(false);
    let refused = runpod.create(NAME).await.unwrap_err();
    assert!(
        matches!(refused, ProviderError::NoCapacity(_)),
        "{refused:?}"
    );
    assert_eq!(fake.pods().len(), 1);
}

#[tokio::test]
async fn a_create_whose_answer_never_comes_times_out_and_its_pod_is_found_by_name() {
    let fake = FakeRunPod::start(FakeOptions {
        lose_create_answers: Some(LostAnswer::Silence),
        ..FakeOptions::default().map_port(INFERENCE_PORT, PUBLIC_PORT)
    })
    .await
    .unwrap();
    let runpod = RunPod::new(
        RunPodConfig {
            timeout: Duration::from_millis(200),
            ..config(&fake)
        },
        COST,
    )
    .unwrap();

    let error = runpod.create(NAME).await.unwrap_err();

    let text = format!("{:#}", anyhow::Error::from(error));
    assert!(
        text.contains("POST /pods: no answer within 200ms"),
        "{text}"
    );
    let found = runpod.find(NAME).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, fake.pods()[0].id);
    // The request left unanswered does not hold the fake's shutdown up.
    fake.shutdown().await.unwrap();
}

const CONFIG_TOML: &str = r#"
[backends.runpod]
api_key = "rpa_0123456789"
inference_port = 8000
timeout = "20s"

[backends.runpod.pod]
name = "tollgate-llama"
image_name = "vllm/vllm-openai:v0.9.1"
gpu_type_ids = ["NVIDIA RTX A6000", "NVIDIA A40"]
volume_in_gb = 100
ports = ["8000/tcp", "22/tcp"]
env = { HF_HOME = "/workspace/hf", HF_TOKEN = "hf_secret_token" }
"#;

#[derive(serde::Deserialize)]
struct File {
    backends: Backends,
}

#[derive(serde::Deserialize)]
struct Backends {
    runpod: RunPodConfig,
}

fn parse(text: &str) -> Result<RunPodConfig, toml::de::Error> {
    toml::from_str::<File>(text).map(|file| file.backends.runpod)
}

#[test]
fn config_from_toml_takes_runpods_defaults() {
    let config = parse(CONFIG_TOML).unwrap();
    config.validate().unwrap();
    assert_eq!(config.api_url, "https://rest.runpod.io/v1");
    assert_eq!(config.timeout, Duration::from_secs(20));
    let pod = &config.pod;
    assert_eq!(pod.gpu_count, 1);
    assert_eq!(pod.cloud_type, CloudType::Secure);
    assert_eq!(pod.container_disk_in_gb, 50);
    assert_eq!(pod.volume_in_gb, 100);
    assert_eq!(pod.volume_mount_path, "/workspace");
    RunPod::new(config, COST).unwrap();
}

#[test]
fn config_debug_does_not_print_secrets() {
    let config = parse(CONFIG_TOML).unwrap();
    let printed = format!("{config:?} {config:#?}");
    assert!(!printed.contains("rpa_0123456789"), "{printed}");
    assert!(!printed.contains("hf_secret_token"), "{printed}");
    assert!(
        printed.contains("HF_TOKEN"),
        "env names still show: {printed}"
    );
}

#[test]
fn config_mistakes_are_named() {
    let with = |from: &str, to: &str| parse(&CONFIG_TOML.replace(from, to));

    let unknown = with("volume_in_gb", "volume_gb").err().unwrap().to_string();
    assert!(unknown.contains("volume_gb"), "{unknown}");
    let duration = with("\"20s\"", "\"soon\"").err().unwrap().to_string();
    assert!(duration.contains("not a duration"), "{duration}");

    let http_only = with("\"8000/tcp\"", "\"8000/http\"").unwrap();
    let problem = RunPod::new(http_only, COST).err().unwrap().to_string();
    assert!(
        problem.contains("`pod.ports` must contain \"8000/tcp\""),
        "{problem}"
    );

    let long_prefix = with("\"tollgate-llama\"", &format!("\"{}\"", "x".repeat(65))).unwrap();
    let problem = long_prefix.validate().unwrap_err().to_string();
    assert!(
        problem.contains("`pod.name` must have 1 to 64"),
        "{problem}"
    );

    let no_gpus = with("[\"NVIDIA RTX A6000\", \"NVIDIA A40\"]", "[]").unwrap();
    let problem = no_gpus.validate().unwrap_err().to_string();
    assert!(problem.contains("`pod.gpu_type_ids`"), "{problem}");

    let community = with("volume_in_gb", "cloud_type = \"COMMUNITY\"\nvolume_in_gb").unwrap();
    assert_eq!(community.pod.cloud_type, CloudType::Community);
}
