//! Active health probes against a real gpu-sim, per protocol, through an
//! injected engine failure and back.

mod support;

use std::time::Duration;

use support::Sim;
use tollgate_backends::health::{Probe, ProbeClient, probe};

const TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test]
async fn probes_a_real_gpu_sim() {
    let sim = Sim::start(&["--model", "sim-model"]);
    let client = ProbeClient::new();
    let addr = sim.address();
    let triton = |model: &str| Probe::Triton {
        model: model.to_owned(),
    };

    assert!(probe(&client, addr, &Probe::openai(), TIMEOUT).await);
    assert!(probe(&client, addr, &triton("sim-model"), TIMEOUT).await);
    assert!(!probe(&client, addr, &triton("nope"), TIMEOUT).await);
    // Another health path is asked as configured (gpu-sim has none there).
    let elsewhere = Probe::OpenAi {
        path: "/health/ready".to_owned(),
    };
    assert!(!probe(&client, addr, &elsewhere, TIMEOUT).await);

    // An injected engine failure makes every readiness endpoint answer 503.
    let http = reqwest::Client::new();
    http.post(sim.url("/sim/fail")).send().await.unwrap();
    assert!(!probe(&client, addr, &Probe::openai(), TIMEOUT).await);
    assert!(!probe(&client, addr, &triton("sim-model"), TIMEOUT).await);

    http.post(sim.url("/sim/recover")).send().await.unwrap();
    assert!(probe(&client, addr, &Probe::openai(), TIMEOUT).await);
    assert!(probe(&client, addr, &triton("sim-model"), TIMEOUT).await);
}
