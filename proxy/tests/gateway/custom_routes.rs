//! Custom GPU routes (`[[routes]]`): a server that speaks no OpenAI, behind
//! the same keys, admission and metering, billed per request or by the
//! GPU-seconds its requests held a slot.

use std::time::Instant;

use super::*;

fn route(unit: &str, reserve: Option<u64>) -> String {
    let reserve = reserve.map_or(String::new(), |r| format!("reserve = {r}\n"));
    format!("[[routes]]\npath = \"/sim/work\"\nmodel = \"sim-model\"\nunit = \"{unit}\"\n{reserve}")
}

#[tokio::test]
async fn a_custom_route_is_forwarded_as_it_came_and_billed_per_request() {
    let sim = Sim::start(&[]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tail: route("requests", None),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    for id in ["w1", "w2"] {
        let response = gateway
            .post_with_id(&key, "/sim/work", &json!({"avatar": "a", "text": "hi"}), id)
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "done");
        let event = gateway.event_of(id).await;
        assert_eq!(
            (
                event.kind.as_str(),
                event.unit_kind.as_str(),
                event.units,
                event.status.as_str()
            ),
            ("custom", "requests", 1, "ok")
        );
    }
    let (status, body) = gateway.post_json("tg_wrong", "/sim/work", &json!({})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("invalid_api_key"))
    );
    let response = gateway.get(&key, "/sim/work").await;
    assert_eq!(response.status(), 405);
}

#[tokio::test]
async fn gpu_seconds_are_the_slot_hold_rounded_up() {
    let sim = Sim::start(&["--work-ms", "1200"]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tail: route("gpu_seconds", Some(5)),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let sent = Instant::now();
    let response = gateway
        .post_with_id(&key, "/sim/work", &json!({}), "render")
        .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let seen = sent.elapsed().as_secs_f64();
    let event = gateway.event_of("render").await;
    assert_eq!(event.unit_kind, "gpu_seconds");
    // At least the 1.2 s the backend held its slot, at most what the client saw.
    assert!(
        event.units >= 2 && event.units as f64 <= seen.ceil(),
        "{} GPU-seconds for a {seen:.2} s request",
        event.units
    );
}

/// A GPU-seconds quota reserves the route's `reserve` before forwarding and
/// settles to the hold: the third job, whose reservation no longer fits, is
/// refused before it reaches a GPU.
#[tokio::test]
async fn a_gpu_seconds_quota_reserves_then_settles_to_the_hold() {
    let sim = Sim::start(&["--work-ms", "300"]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(
                "[[tiers]]\nname = \"free\"\npriority = 0\n\
                 [tiers.units.gpu_seconds]\nincluded = 3\nhard_cap = true\n\
                 [[tiers]]\nname = \"pro\"\npriority = 10\n"
                    .to_owned(),
            ),
            tail: route("gpu_seconds", Some(2)),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    for expected in [200, 200, 429] {
        let (status, body) = gateway.post_json(&key, "/sim/work", &json!({})).await;
        assert_eq!(status, expected, "{body}");
    }
    eventually("two GPU-seconds are logged", || async {
        gateway.units_logged().await == 2
    })
    .await;
}

/// A figure the backend reports, in a header or at a JSON pointer of its
/// answer, is what the request is billed, rounded up.
#[tokio::test]
async fn a_unit_the_backend_reports_is_billed_from_its_header_or_its_answer() {
    let sim = Sim::start(&["--work-ms", "1300"]);
    let routes = "[[routes]]\npath = \"/sim/work\"\nmodel = \"sim-model\"\n\
                  unit = \"audio_seconds\"\nreserve = 10\n\
                  reported = { header = \"x-sim-work-seconds\" }\n";
    for (routes, id) in [
        (routes.to_owned(), "by-header"),
        (
            routes.replace(
                "reported = { header = \"x-sim-work-seconds\" }",
                "reported = { json = \"/usage/seconds\" }",
            ),
            "by-pointer",
        ),
    ] {
        let gateway = Gateway::start(
            &[BackendSpec::new(&sim.url)],
            Options {
                tail: routes,
                ..Options::default()
            },
        )
        .await;
        let key = gateway.create_key("acme", &[]);
        let response = gateway
            .post_with_id(&key, "/sim/work", &json!({}), id)
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        let event = gateway.event_of(id).await;
        assert_eq!(
            (
                event.unit_kind.as_str(),
                event.units,
                event.usage_source.as_str()
            ),
            ("audio_seconds", 2, "backend"),
            "{id}"
        );
    }
}

/// A route's own body limit: an upload over it gets 413 and is billed nothing.
#[tokio::test]
async fn a_routes_body_limit_refuses_a_larger_upload() {
    let sim = Sim::start(&[]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tail: format!("{}max_body_bytes = 64\n", route("requests", None)),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key("acme", &[]);
    let (status, _) = gateway.post_json(&key, "/sim/work", &json!({"a": 1})).await;
    assert_eq!(status, 200);
    let (status, body) = gateway
        .post_json(&key, "/sim/work", &json!({"text": "x".repeat(100)}))
        .await;
    assert_eq!(status, 413, "{body}");
    // Chat keeps the server's limit.
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat(&"word ".repeat(40), 4))
        .await;
    assert_eq!(status, 200);
    eventually("one request is billed", || async {
        gateway.units_logged().await > 1
    })
    .await;
    let custom: Vec<_> = gateway
        .usage_events()
        .await
        .into_iter()
        .filter(|e| e.kind == "custom")
        .collect();
    assert_eq!(custom.len(), 1, "the refused upload has no event");
}
