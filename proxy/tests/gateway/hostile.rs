//! Hostile input: work before admission is bounded, and no number a client
//! or an admin sends can panic a task. Each test is named after the defect
//! it pins.

use super::*;

/// Before: every request was tokenized before its limits were checked, so
/// a key over its requests-per-minute kept a CPU busy counting prompts that
/// were refused anyway.
#[tokio::test]
async fn a_throttled_key_is_refused_before_its_prompt_is_counted() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(
                "[[tiers]]\nname = \"free\"\npriority = 0\nkey_requests_per_minute = 1\n\
                 [[tiers]]\nname = \"pro\"\npriority = 10\n"
                    .to_owned(),
            ),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("hi", 1))
        .await;
    assert_eq!(status, 200);
    let long_prompt = "many words of a long prompt ".repeat(4_000);
    for i in 0..5 {
        let response = gateway
            .post_with_id(
                &key,
                "/v1/chat/completions",
                &chat(&long_prompt, 1),
                &format!("throttled-{i}"),
            )
            .await;
        assert_eq!(response.status(), 429);
    }
    for i in 0..5 {
        let event = gateway.event_of(&format!("throttled-{i}")).await;
        assert_eq!(event.status, "rejected");
        assert_eq!(event.counted_prompt_tokens, None, "counted before refusing");
    }
}

/// Before: the webhook read bodies up to the API's limit and HMAC'd them
/// before refusing: work anyone could make the gateway do.
#[tokio::test]
async fn an_oversized_stripe_webhook_is_refused_before_it_is_verified() {
    let sim = Sim::fast();
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            env: vec![
                ("STRIPE_SECRET_KEY", "sk_test_gateway".to_owned()),
                ("STRIPE_WEBHOOK_SECRET", "whsec_hostile".to_owned()),
            ],
            ..Options::default()
        },
    )
    .await;
    let body = format!(
        r#"{{"id":"evt_big","padding":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let response = gateway
        .client
        .post(format!("{}/stripe/webhook", gateway.url))
        .header("stripe-signature", "t=1,v1=00")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "request_too_large");
}

/// Before: headers of any size up to Pingora's own 1 MiB were accepted.
#[tokio::test]
async fn request_headers_over_32_kib_get_431() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let send = |padding: usize| {
        let gateway = &gateway;
        let key = key.clone();
        async move {
            let mut request = gateway
                .client
                .post(format!("{}/v1/chat/completions", gateway.url))
                .bearer_auth(&key)
                .json(&chat("hi", 1));
            for i in 0..padding / 1024 {
                request = request.header(format!("x-pad-{i}"), "p".repeat(1000));
            }
            request.send().await.unwrap()
        }
    };
    assert_eq!(send(16 * 1024).await.status(), 200);
    let refused = send(40 * 1024).await;
    assert_eq!(refused.status(), 431);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(error_code(&body), "request_header_fields_too_large");
}

/// Before: `/v1/usage?from=18446744073709551615` overflowed the time
/// arithmetic and panicked the request's task, and an admin key with a
/// huge `expires_in` did the same.
#[tokio::test]
async fn numbers_past_what_time_can_hold_get_400_naming_the_parameter() {
    let sim = Sim::fast();
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    for (query, param) in [
        ("from=18446744073709551615", "from"),
        ("to=18446744073709551615", "to"),
        ("from=253402300800", "from"),
        ("from=99999999999999999999999", "from"),
        ("limit=18446744073709551616", "limit"),
    ] {
        let path = if param == "limit" {
            format!("/admin/usage/events?account=acme&{query}")
        } else {
            format!("/v1/usage?{query}")
        };
        let (status, body) = if param == "limit" {
            gateway
                .admin(reqwest::Method::GET, &path, None, Some(ADMIN_TOKEN))
                .await
        } else {
            let response = gateway.get(&key, &path).await;
            let status = response.status().as_u16();
            (status, response.json().await.unwrap())
        };
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
    }
    let (status, body) = gateway
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"account": "acme", "tier": "pro", "expires_in": "18446744073709551615"})),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "expires_in");
    let (status, body) = gateway
        .admin(
            reqwest::Method::DELETE,
            "/admin/usage?before=18446744073709551615",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "before");
    // Every one of them was answered: no task died, and the gateway serves.
    let (status, _) = gateway
        .post_json(&key, "/v1/chat/completions", &chat("still here", 1))
        .await;
    assert_eq!(status, 200);
}
