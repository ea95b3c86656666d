//! Image generation through the gateway: billed in `images` units (`n`
//! times the price book's weight of the size and quality), reserved before
//! forwarding, and held to a tier's image quota under concurrency.

use std::sync::Arc;

use tokio::task::JoinSet;
use tollgate_metering::units::UnitKind;

use super::metering::sim_counter;
use super::*;

const WEIGHTS: &str = r#"image_weights = { size = { "512x256" = 2 }, quality = { hd = 2 } }"#;

fn image_request(n: u32, size: &str, quality: &str) -> Value {
    json!({
        "model": "sim-model",
        "prompt": "a lighthouse at dusk",
        "n": n,
        "size": size,
        "quality": quality,
        "response_format": "b64_json",
    })
}

#[tokio::test]
async fn images_are_billed_as_n_times_their_size_and_quality_weight() {
    let sim = Sim::start(&[]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            metering: WEIGHTS,
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let body = image_request(3, "512x256", "hd");
    let response = gateway
        .post_with_id(&key, "/v1/images/generations", &body, "wide-hd")
        .await;
    assert_eq!(response.status(), 200);
    let through: Value = response.json().await.unwrap();
    let direct: Value = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", sim.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The same pictures, byte for byte, as gpu-sim answers directly.
    assert_eq!(through["data"], direct["data"]);
    assert_eq!(through["data"].as_array().unwrap().len(), 3);
    let event = gateway.event_of("wide-hd").await;
    assert_eq!(
        (event.kind.as_str(), event.unit_kind.as_str(), event.units),
        ("image", "images", 3 * 2 * 2)
    );
    assert_eq!((event.prompt_tokens, event.completion_tokens), (0, 0));

    // A size and quality the price book does not list weigh 1 each.
    let response = gateway
        .post_with_id(
            &key,
            "/v1/images/generations",
            &image_request(2, "512x512", "standard"),
            "plain",
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(gateway.event_of("plain").await.units, 2);
}

/// An edit form: the fields after the image (as the Node SDK may send
/// them), so the gateway must read the whole form before it reserves.
fn edit_form(n: &str, size: &str, quality: &str) -> reqwest::multipart::Form {
    let image =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image.png"))
            .unwrap();
    reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(image).file_name("in.png"),
        )
        .text("prompt", "add a lighthouse")
        .text("model", "sim-model")
        .text("n", n.to_owned())
        .text("size", size.to_owned())
        .text("quality", quality.to_owned())
        .text("response_format", "b64_json")
}

#[tokio::test]
async fn image_edits_are_billed_as_n_times_their_weight_read_from_the_whole_form() {
    let sim = Sim::start(&[]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            metering: WEIGHTS,
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let edit = |form, id: &'static str| gateway.upload(&key, "/v1/images/edits", form, id);
    let response = edit(edit_form("2", "512x256", "hd"), "edit").await;
    assert_eq!(response.status(), 200);
    let through: Value = response.json().await.unwrap();
    let direct: Value = reqwest::Client::new()
        .post(format!("{}/v1/images/edits", sim.url))
        .multipart(edit_form("2", "512x256", "hd"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(through["data"], direct["data"]);
    assert_eq!(through["data"].as_array().unwrap().len(), 2);
    let event = gateway.event_of("edit").await;
    assert_eq!(
        (event.kind.as_str(), event.unit_kind.as_str(), event.units),
        ("image_edit", "images", 2 * 2 * 2)
    );
    // No image, or `n` sent twice: refused before a backend sees it.
    let no_image = reqwest::multipart::Form::new()
        .text("model", "sim-model")
        .text("prompt", "x");
    let response = edit(no_image, "no-image").await;
    assert_eq!(response.status(), 400);
    let twice = edit_form("1", "512x256", "hd").text("n", "9");
    let response = edit(twice, "n-twice").await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        sim_counter(&sim, "gpu_sim_images_generated_total").await,
        4.0
    );
}

#[tokio::test]
async fn a_refused_image_request_is_billed_nothing() {
    let sim = Sim::start(&[]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    // gpu-sim refuses more than ten images, as OpenAI does.
    let response = gateway
        .post_with_id(
            &key,
            "/v1/images/generations",
            &image_request(11, "256x256", "standard"),
            "too-many",
        )
        .await;
    assert_eq!(response.status(), 400);
    let event = gateway.event_of("too-many").await;
    assert_eq!((event.status.as_str(), event.units), ("client_error", 0));
    for (body, param) in [
        (
            json!({"model": "sim-model", "prompt": ["a", "b"]}),
            "prompt",
        ),
        (
            json!({"model": "sim-model", "prompt": "a", "stream": true}),
            "stream",
        ),
        (
            json!({"model": "sim-model", "prompt": "a", "size": 1024}),
            "size",
        ),
    ] {
        let (status, answer) = gateway
            .post_json(&key, "/v1/images/generations", &body)
            .await;
        assert_eq!(
            (status, &answer["error"]["param"]),
            (400, &json!(param)),
            "{body}"
        );
    }
}

/// "Free: 20 images a day" as a daily cap in images: 200 requests at once
/// never spend more than the cap.
#[tokio::test]
async fn a_daily_image_cap_holds_under_200_concurrent_requests() {
    const CAP: usize = 20;
    let sim = Sim::start(&["--ms-per-image", "20"]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(format!(
                "[[tiers]]\nname = \"free\"\npriority = 0\n\
                 [tiers.units.images]\ndaily_cap = {CAP}\n\
                 [[tiers]]\nname = \"pro\"\npriority = 10\n"
            )),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let gateway = Arc::new(gateway);
    let mut requests = JoinSet::new();
    for _ in 0..200 {
        let (gateway, key) = (Arc::clone(&gateway), key.clone());
        requests.spawn(async move {
            let (status, body) = gateway
                .post_json(
                    &key,
                    "/v1/images/generations",
                    &image_request(1, "256x256", "standard"),
                )
                .await;
            (status, body["error"]["code"].clone())
        });
    }
    let mut served = 0;
    while let Some(outcome) = requests.join_next().await {
        match outcome.unwrap() {
            (200, _) => served += 1,
            (429, code) => assert_eq!(code, "insufficient_quota"),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(served, CAP);
    eventually("every image is logged", || async {
        gateway.units_logged().await == CAP as i64
    })
    .await;
    // Chat, billed in tokens, is not held by the image cap.
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 4))
        .await;
    assert_eq!(status, 200);
}

/// Regression: the period reconciler restored token counters only, so after
/// a Redis flush a tier's image quota started again from zero.
#[tokio::test]
async fn a_redis_flush_does_not_grant_free_images() {
    let sim = Sim::start(&[]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            redis: Some(redis_url()),
            tiers: Some(
                "[[tiers]]\nname = \"free\"\npriority = 0\n\
                 [tiers.units.images]\nincluded = 3\nhard_cap = true\n\
                 [[tiers]]\nname = \"pro\"\npriority = 10\n"
                    .to_owned(),
            ),
            admission: "reconcile_interval = \"200ms\"",
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let account = gateway.account_id("acme").await;
    let (status, _) = gateway
        .post_json(
            &key,
            "/v1/images/generations",
            &image_request(3, "256x256", "standard"),
        )
        .await;
    assert_eq!(status, 200);
    eventually("the usage log holds 3 images", || async {
        gateway.units_logged().await == 3
    })
    .await;
    delete_redis_keys(&redis_url(), &gateway.redis_prefix);
    // Before any request could restore them from the gateway's own copy.
    eventually(
        "the image counters are restored from the usage log",
        || async {
            gateway
                .quota_state_of(account, None, UnitKind::Images)
                .await
                .month_used
                == 3
        },
    )
    .await;
    let (status, body) = gateway
        .post_json(
            &key,
            "/v1/images/generations",
            &image_request(1, "256x256", "standard"),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (429, &json!("insufficient_quota"))
    );
}
