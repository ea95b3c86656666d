//! Load signals scraped from the real gpu-sim binary, started on a free port.

mod support;

use std::time::Duration;
use support::Sim;

use serde_json::json;
use tollgate_backends::health::ProbeClient;
use tollgate_backends::signals::{LoadSignals, scrape};
use tollgate_testkit::poll::{POLL_DEADLINE, POLL_INTERVAL};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn scrape_sees_gpu_sim_running_one_and_queueing_two() {
    // One batch slot, and a first token so far off that the request holding
    // it cannot finish while we look: the state polled for below stays put
    // until the requests are aborted, however slow the machine.
    let sim = Sim::start(&["--max-concurrency", "1", "--ttft-ms", "600000"]);
    let http = reqwest::Client::new();
    let requests: Vec<_> = (0..3)
        .map(|_| {
            let request = http.post(sim.url("/v1/chat/completions")).json(&json!({
                "model": "sim-model",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }));
            tokio::spawn(request.send())
        })
        .collect();

    // gpu-sim exports Triton's names too, and reports the share of busy batch
    // slots as both KV-cache usage and GPU utilisation. The gauges move one
    // at a time (waiting, then pending), so a scrape can fall between two
    // of them: poll until the whole set agrees.
    let expected = LoadSignals {
        waiting: Some(2.0),
        running: Some(1.0),
        kv_cache_usage: Some(1.0),
        pending: Some(2.0),
        gpu_utilization: Some(1.0),
    };
    let client = ProbeClient::new();
    let deadline = tokio::time::Instant::now() + POLL_DEADLINE;
    let signals = loop {
        match scrape(&client, sim.address(), SCRAPE_TIMEOUT).await {
            Some(signals) if signals == expected => break signals,
            last => assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for 1 running and 2 waiting (all gauges); last scrape: {last:?}"
            ),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    assert_eq!(signals.queued(), Some(2.0));

    for request in requests {
        request.abort();
    }
}

#[tokio::test]
async fn an_idle_gpu_sim_reports_zeros_not_absence() {
    let sim = Sim::start(&[]);
    let signals = scrape(&ProbeClient::new(), sim.address(), SCRAPE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        signals,
        LoadSignals {
            waiting: Some(0.0),
            running: Some(0.0),
            kv_cache_usage: Some(0.0),
            pending: Some(0.0),
            gpu_utilization: Some(0.0),
        }
    );
}

#[tokio::test]
async fn an_unreachable_address_is_none() {
    // Bind then drop: the port is known and nothing listens on it.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    assert_eq!(
        scrape(&ProbeClient::new(), &address, SCRAPE_TIMEOUT).await,
        None
    );
}
