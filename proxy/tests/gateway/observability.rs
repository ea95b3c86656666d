//! The per-request metrics as Prometheus scrapes them: the families, their
//! label names and bounded values, and counts that match the requests sent;
//! and the logs as a pipe receives them, in either `LOG_FORMAT`.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::join_all;

use super::admission::{one_slot, slow_sim, spawn_chat, tiers};
use super::api_metrics::priced_process_backend;
use super::metering::scrape;
use super::*;
use tollgate_metering::metric_names;
use tollgate_testkit::stripe::FakeStripe;

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
    // The configured tiers and models are exported from zero: 2 tiers x 1
    // model x every endpoint x 3 status classes, one of which counted.
    let (counted, zero): (Vec<Sample>, Vec<Sample>) = samples(metrics, "tollgate_requests_total")
        .await
        .into_iter()
        .partition(|(_, value)| *value > 0.0);
    assert_eq!(
        zero.len(),
        2 * tollgate_metering::endpoint::Endpoint::ALL.len() * 3 - 1,
        "{zero:?}"
    );
    assert!(
        zero.iter()
            .all(|(labels, _)| labels["model"] == "sim-model")
    );
    assert_eq!(
        sorted(counted),
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
    let mut counted_tokens = samples(metrics, "tollgate_tokens_total").await;
    counted_tokens.retain(|(_, value)| *value > 0.0);
    assert_eq!(
        sorted(counted_tokens),
        sorted(vec![
            (tokens("prompt"), prompt as f64),
            (tokens("completion"), completion as f64),
        ])
    );
}

/// Every key lookup counts once: fifty requests racing on a key nobody has
/// looked up yet share one Postgres read (one miss); the rest are hits.
#[tokio::test]
async fn racing_first_lookups_of_a_key_count_one_miss_and_the_rest_hits() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let responses = join_all((0..50).map(|_| gateway.get(&key, "/v1/models"))).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(
        sorted(
            samples(
                gateway.metrics_url.as_str(),
                "tollgate_key_cache_lookups_total"
            )
            .await
        ),
        vec![
            (labels(&[("result", "hit")]), 49.0),
            (labels(&[("result", "miss")]), 1.0),
            (labels(&[("result", "stale")]), 0.0),
        ]
    );
}

/// Time spent queued is the queue's, not Tollgate's, even when no slot comes:
/// a request that gives up in the queue after a second adds no overhead.
#[tokio::test]
async fn a_request_that_times_out_in_the_queue_adds_no_overhead() {
    let sim = slow_sim();
    let gateway = Gateway::start(
        &[one_slot(&sim)],
        Options {
            tiers: tiers("[[tiers]]\nname = \"free\"\npriority = 0\nmax_queue_wait = \"1s\"\n"),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("free-co", "free", &[]);
    // Holds the one slot for fifty seconds: longer than the test.
    let _blocker = spawn_chat(&gateway, &key, 1000);
    eventually("the blocker holds the slot", || async {
        gateway.queues().await["data"][0]["in_use"] == 1
    })
    .await;
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 2))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_code(&body), "server_busy");

    let metrics = gateway.metrics_url.as_str();
    eventually("the timed-out request is counted", || async {
        scrape(metrics, "tollgate_overhead_seconds_count").await == 1.0
    })
    .await;
    let waited = scrape(metrics, "tollgate_request_duration_seconds_sum").await;
    let overhead = scrape(metrics, "tollgate_overhead_seconds_sum").await;
    assert!(waited >= 1.0, "it waited out its second: {waited}");
    assert!(overhead < 0.25, "overhead {overhead}s of {waited}s");
}

/// Every family a scrape exposes, by name, with the label-name sets of its
/// series. Histograms are folded into their family (`le` dropped).
async fn families(url: &str) -> BTreeMap<String, BTreeSet<Vec<String>>> {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    let histograms: BTreeSet<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
        .collect();
    let mut families: BTreeMap<String, BTreeSet<Vec<String>>> = BTreeMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let series = line.rsplit_once(' ').unwrap().0;
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| histograms.contains(base))
            })
            .unwrap_or(name);
        let names = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|pair| Some(pair.split_once('=')?.0.to_owned()))
            .filter(|label| label != "le")
            .collect();
        families.entry(family.to_owned()).or_default().insert(names);
    }
    families
}

/// What the issue asks `/metrics` to expose: each family and the label names
/// of its series (all series of a family carry the same ones).
const EXPECTED_FAMILIES: &[(&str, &[&str])] = &[
    // Requests.
    (
        "tollgate_requests_total",
        &["endpoint", "model", "status", "tier"],
    ),
    (
        "tollgate_request_duration_seconds",
        &["endpoint", "model", "tier"],
    ),
    ("tollgate_overhead_seconds", &["endpoint"]),
    ("tollgate_time_to_first_token_seconds", &["model", "tier"]),
    ("tollgate_tokens_total", &["direction", "model", "tier"]),
    // Queues, shedding and limits.
    ("tollgate_queue_depth", &["pool", "tier"]),
    ("tollgate_queue_oldest_wait_seconds", &["pool", "tier"]),
    ("tollgate_queue_expected_wait_seconds", &["pool", "tier"]),
    ("tollgate_queue_wait_seconds", &["pool", "tier"]),
    ("tollgate_queue_shed_total", &["pool", "reason", "tier"]),
    ("tollgate_admission_rejected_total", &["reason", "tier"]),
    ("tollgate_pool_slots", &["pool"]),
    ("tollgate_pool_slots_in_use", &["pool"]),
    // Backends and the fleet.
    ("tollgate_backend_state", &["backend", "state"]),
    ("tollgate_backend_up", &["backend"]),
    ("tollgate_backend_breaker_state", &["backend", "state"]),
    ("tollgate_backend_in_flight", &["backend"]),
    ("tollgate_backend_load", &["backend", "signal"]),
    ("tollgate_backend_gpu_utilization", &["backend"]),
    ("tollgate_gpu_instance_seconds_total", &["backend", "state"]),
    ("tollgate_gpu_cost_dollars_total", &["backend", "state"]),
    // Usage writer.
    ("tollgate_usage_writer_batches_total", &[]),
    ("tollgate_usage_events_written_total", &[]),
    ("tollgate_usage_events_duplicate_total", &[]),
    ("tollgate_usage_events_spooled_total", &[]),
    ("tollgate_usage_events_replayed_total", &[]),
    ("tollgate_usage_events_lost_total", &[]),
    ("tollgate_usage_write_errors_total", &[]),
    ("tollgate_usage_spool_events", &[]),
    // Stripe.
    ("tollgate_stripe_export_events_total", &["outcome"]),
    ("tollgate_stripe_export_pass_errors_total", &[]),
    ("tollgate_stripe_export_pending_events", &[]),
    ("tollgate_stripe_export_oldest_pending_seconds", &[]),
    ("tollgate_stripe_webhooks_total", &["outcome", "type"]),
    // Keys and stores.
    ("tollgate_key_cache_lookups_total", &["result"]),
    ("tollgate_postgres_errors_total", &["operation"]),
    ("tollgate_redis_errors_total", &["operation"]),
];

#[tokio::test]
async fn every_metric_family_is_exported_with_bounded_labels() {
    let fake = FakeStripe::start().await.unwrap();
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            env: vec![
                ("STRIPE_SECRET_KEY", fake.secret_key().to_owned()),
                ("STRIPE_API_BASE", fake.base_url().to_owned()),
                ("STRIPE_WEBHOOK_SECRET", "whsec_observability".to_owned()),
            ],
            // A managed backend besides b0: instance time and cost are its.
            tail: priced_process_backend(),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    for stream in [false, true] {
        let mut body = chat("Hello", 3);
        if stream {
            body = streamed(body);
        }
        let response = gateway.post(&key, "/v1/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    // A delivery that is not Stripe's: counted as refused.
    let forged = gateway
        .client
        .post(format!("{}/stripe/webhook", gateway.url))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);

    let metrics = gateway.metrics_url.as_str();
    // Usage is written, and load signals scraped, off the request path.
    eventually("usage written and backend load scraped", || async {
        let found = families(metrics).await;
        scrape(metrics, "tollgate_usage_events_written_total").await == 2.0
            && found.contains_key("tollgate_backend_load")
            && found.contains_key("tollgate_backend_gpu_utilization")
    })
    .await;

    let found = families(metrics).await;
    let missing: Vec<&str> = EXPECTED_FAMILIES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !found.contains_key(*name))
        .collect();
    assert!(missing.is_empty(), "families not exported: {missing:?}");
    for (name, labels) in EXPECTED_FAMILIES {
        let expected: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        assert_eq!(
            found[*name],
            BTreeSet::from([expected]),
            "label names of {name}"
        );
    }
    // The list the alert rules' test trusts, held against the scrape both
    // ways: every `tollgate_*` family exported is in it, so a metric cannot
    // be registered without its constant, and every name in it is exported,
    // but the Redis fallbacks, whose series exist only with Redis configured
    // (counted in admission.rs, and the dashboards' traffic exports them).
    let unlisted: Vec<&String> = found
        .keys()
        .filter(|name| name.starts_with("tollgate_") && !metric_names::ALL.contains(&name.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "exported but not in tollgate_metering::metric_names::ALL: {unlisted:?}"
    );
    let unexported: Vec<&str> = metric_names::ALL
        .iter()
        .copied()
        .filter(|name| {
            !found.contains_key(*name) && *name != metric_names::ADMISSION_REDIS_FALLBACK_TOTAL
        })
        .collect();
    assert!(
        unexported.is_empty(),
        "in tollgate_metering::metric_names::ALL but not exported: {unexported:?}"
    );
    // Nothing identifies a customer or a request.
    for (name, label_sets) in &found {
        for label in label_sets.iter().flatten() {
            assert!(
                !["key", "account", "account_id", "request_id", "user"].contains(&label.as_str()),
                "{name} is labelled by {label}"
            );
        }
    }

    // One key, two requests: Postgres was read once.
    assert_eq!(
        sorted(samples(metrics, "tollgate_key_cache_lookups_total").await),
        sorted(vec![
            (labels(&[("result", "hit")]), 1.0),
            (labels(&[("result", "miss")]), 1.0),
            (labels(&[("result", "stale")]), 0.0),
        ])
    );
    assert_eq!(
        samples(metrics, "tollgate_stripe_webhooks_total").await,
        vec![(
            labels(&[("type", "unverified"), ("outcome", "refused")]),
            1.0
        )]
    );
    // Bounded values: one series per backend and state, all at 0 but one.
    let states = samples(metrics, "tollgate_backend_state").await;
    assert_eq!(states.len(), 2 * 7, "{states:?}");
    assert_eq!(states.iter().map(|(_, v)| v).sum::<f64>(), 2.0);
    // Instance time and cost: the managed backend's only.
    let cost = samples(metrics, "tollgate_gpu_cost_dollars_total").await;
    assert_eq!(cost.len(), 7, "{cost:?}");
    assert!(
        cost.iter().all(|(labels, _)| labels["backend"] == "gpu"),
        "{cost:?}"
    );
    let breaker = samples(metrics, "tollgate_backend_breaker_state").await;
    assert!(
        breaker.contains(&(labels(&[("backend", "b0"), ("state", "closed")]), 1.0)),
        "{breaker:?}"
    );
    assert_eq!(scrape(metrics, "tollgate_postgres_errors_total").await, 0.0);
    assert_eq!(scrape(metrics, "tollgate_redis_errors_total").await, 0.0);
}

/// A gateway with one fast backend, logging at info to a pipe with `env`;
/// serves one chat completion, stops, and answers what it logged.
async fn logs_of_one_request(env: &[(&'static str, &str)]) -> Vec<u8> {
    let sim = Sim::fast();
    let mut options = Options {
        capture_stderr: true,
        env: vec![("LOG_LEVEL", "info".to_owned())],
        ..Options::default()
    };
    options
        .env
        .extend(env.iter().map(|(name, value)| (*name, (*value).to_owned())));
    let mut gateway = Gateway::start(&[BackendSpec::new(&sim.url)], options).await;
    let key = gateway.create_key("acme", &[]);
    let (status, body) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
        .await;
    assert_eq!(status, 200, "{body}");
    gateway.stop_and_read_logs()
}

/// Before: text logs were coloured whatever stderr was, so a pipe, a file or
/// journald got escape codes around every level and field name.
#[tokio::test]
async fn logs_to_a_pipe_carry_no_colour_codes() {
    // An empty NO_COLOR counts as unset: only the pipe turns colour off.
    let logs = logs_of_one_request(&[("LOG_FORMAT", "text"), ("NO_COLOR", "")]).await;
    let text = String::from_utf8_lossy(&logs);
    assert!(text.contains("drained; exiting"), "{text}");
    assert!(
        !logs.contains(&0x1b),
        "escape codes in logs written to a pipe:\n{text}"
    );
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let logs = logs_of_one_request(&[("LOG_FORMAT", "json")]).await;
    let text = String::from_utf8(logs).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(
        events
            .iter()
            .all(|e| e.is_object() && e["level"].is_string()),
        "{text}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "drained; exiting"),
        "{text}"
    );
    // One line per request, with what an operator searches by and what the
    // request cost.
    // (The harness's /healthz polls have lines too, with no account.)
    let requests: Vec<&Value> = events
        .iter()
        .filter(|e| e["fields"]["message"] == "request" && e["fields"]["account"] != "-")
        .collect();
    assert_eq!(requests.len(), 1, "{text}");
    let line = &requests[0]["fields"];
    assert!(
        line["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{line}"
    );
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["account"], "acme", "{line}");
    assert_eq!(line["tier"], "pro", "{line}");
    assert_eq!(line["model"], "sim-model", "{line}");
    assert_eq!(line["backend"], "b0", "{line}");
    assert!(
        line["completion_tokens"].as_u64().is_some_and(|n| n > 0),
        "{line}"
    );
    assert!(line["units"].as_u64().is_some_and(|n| n > 0), "{line}");
    for timing in ["elapsed_ms", "queue_ms", "upstream_ms"] {
        assert!(line[timing].is_u64(), "{timing}: {line}");
    }
}
