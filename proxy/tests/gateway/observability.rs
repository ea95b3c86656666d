//! The per-request metrics as Prometheus scrapes them: the families, their
//! label names and bounded values, and counts that match the requests sent.

use std::collections::BTreeMap;

use super::metering::scrape;
use super::*;

/// One sample of a scrape: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

/// The samples named exactly `name` at a Prometheus text endpoint.
async fn samples(url: &str, name: &str) -> Vec<Sample> {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (label, value) = pair.split_once('=').unwrap();
                    (label.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// Label maps from `(name, value)` pairs, for comparing with [`samples`].
fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn sorted(mut samples: Vec<Sample>) -> Vec<Sample> {
    samples.sort_by(|a, b| a.0.cmp(&b.0));
    samples
}

#[tokio::test]
async fn request_metrics_have_bounded_labels_and_match_the_requests() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);

    let plain = gateway
        .post_with_id(&key, "/v1/chat/completions", &chat("Hello", 5), "obs-plain")
        .await;
    assert_eq!(plain.status(), 200);
    plain.bytes().await.unwrap();
    let stream = gateway
        .post_with_id(
            &key,
            "/v1/chat/completions",
            &streamed(chat("Hello there", 4)),
            "obs-stream",
        )
        .await;
    assert_eq!(stream.status(), 200);
    stream.text().await.unwrap();
    let mut unknown = chat("Hello", 5);
    unknown["model"] = json!("no-such-model");
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &unknown)
        .await;
    assert_eq!(status, 404, "{body}");

    // `logging` runs after the answer is sent: wait for all three.
    let metrics = gateway.metrics_url.as_str();
    eventually("three requests are counted", || async {
        scrape(metrics, "tollgate_requests_total").await == 3.0
    })
    .await;

    let served = [
        ("tier", "pro"),
        ("model", "sim-model"),
        ("endpoint", "chat_completions"),
    ];
    let refused = [
        ("tier", "pro"),
        ("model", "other"),
        ("endpoint", "chat_completions"),
    ];
    assert_eq!(
        sorted(samples(metrics, "tollgate_requests_total").await),
        sorted(vec![
            (labels(&[&served[..], &[("status", "2xx")]].concat()), 2.0),
            (labels(&[&refused[..], &[("status", "4xx")]].concat()), 1.0),
        ])
    );
    assert_eq!(
        sorted(samples(metrics, "tollgate_request_duration_seconds_count").await),
        sorted(vec![(labels(&served), 2.0), (labels(&refused), 1.0)])
    );
    assert_eq!(
        samples(metrics, "tollgate_overhead_seconds_count").await,
        vec![(labels(&[("endpoint", "chat_completions")]), 3.0)]
    );
    assert_eq!(
        samples(metrics, "tollgate_time_to_first_token_seconds_count").await,
        vec![(labels(&[("tier", "pro"), ("model", "sim-model")]), 1.0)],
        "only the streamed answer has a first token"
    );

    let (plain, stream) = (
        gateway.event_of("obs-plain").await,
        gateway.event_of("obs-stream").await,
    );
    let prompt = plain.prompt_tokens + stream.prompt_tokens;
    let completion = plain.completion_tokens + stream.completion_tokens;
    assert_eq!(completion, 9);
    let tokens = |direction| {
        labels(&[
            ("tier", "pro"),
            ("model", "sim-model"),
            ("direction", direction),
        ])
    };
    assert_eq!(
        sorted(samples(metrics, "tollgate_tokens_total").await),
        sorted(vec![
            (tokens("prompt"), prompt as f64),
            (tokens("completion"), completion as f64),
        ])
    );
}
