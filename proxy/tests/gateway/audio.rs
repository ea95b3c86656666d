//! Audio through the gateway: speech streams back as the backend writes it,
//! content type and bytes unchanged, billed in characters of input.

use super::*;

fn speech(input: &str) -> Value {
    json!({"model": "sim-model", "voice": "alloy", "input": input, "response_format": "wav"})
}

#[tokio::test]
async fn speech_streams_through_unchanged_and_is_billed_in_characters() {
    // Three seconds of audio, paced at 20x real time: a stream of chunks.
    let sim = Sim::start(&[
        "--speech-secs-per-char",
        "0.25",
        "--speech-realtime-factor",
        "20",
    ]);
    let gateway = Gateway::start(&[BackendSpec::new(&sim.url)], Options::default()).await;
    let key = gateway.create_key("acme", &[]);
    let input = "Héllo, wörld";
    let mut response = gateway
        .post_with_id(&key, "/v1/audio/speech", &speech(input), "hello")
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "audio/wav");
    assert!(response.headers().get("content-length").is_none());
    let mut through = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = response.chunk().await.unwrap() {
        through.extend_from_slice(&chunk);
        chunks += 1;
    }
    assert!(chunks > 1, "the audio came in one piece");
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/audio/speech", sim.url))
        .json(&speech(input))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(through, direct);
    assert_eq!(&through[..4], b"RIFF");
    let event = gateway.event_of("hello").await;
    assert_eq!(
        (
            event.kind.as_str(),
            event.unit_kind.as_str(),
            event.units,
            event.status.as_str()
        ),
        ("speech", "characters", input.chars().count() as i64, "ok")
    );

    // Refused by the backend: nothing billed.
    let response = gateway
        .post_with_id(
            &key,
            "/v1/audio/speech",
            &json!({"model": "sim-model", "input": "hi", "response_format": "flac"}),
            "flac",
        )
        .await;
    assert_eq!(response.status(), 400);
    let event = gateway.event_of("flac").await;
    assert_eq!((event.status.as_str(), event.units), ("client_error", 0));
    let (status, answer) = gateway
        .post_json(
            &key,
            "/v1/audio/speech",
            &json!({"model": "sim-model", "input": ""}),
        )
        .await;
    assert_eq!((status, &answer["error"]["param"]), (400, &json!("input")));
}

/// A tier's character quota holds the whole input before forwarding.
#[tokio::test]
async fn a_character_quota_refuses_an_input_it_cannot_hold() {
    let sim = Sim::start(&[]);
    let gateway = Gateway::start(
        &[BackendSpec::new(&sim.url)],
        Options {
            tiers: Some(
                "[[tiers]]\nname = \"free\"\npriority = 0\n\
                 [tiers.units.characters]\nincluded = 30\nhard_cap = true\n\
                 [[tiers]]\nname = \"pro\"\npriority = 10\n"
                    .to_owned(),
            ),
            ..Options::default()
        },
    )
    .await;
    let key = gateway.create_key_on("acme", "free", &[]);
    let spoken = |input: &'static str| {
        let (gateway, key) = (&gateway, &key);
        async move {
            let response = gateway.post(key, "/v1/audio/speech", &speech(input)).await;
            let status = response.status().as_u16();
            response.bytes().await.unwrap();
            status
        }
    };
    assert_eq!(spoken("twenty characters!!!").await, 200);
    let (status, answer) = gateway
        .post_json(&key, "/v1/audio/speech", &speech("eleven char"))
        .await;
    assert_eq!(status, 429);
    assert_eq!(answer["error"]["code"], "insufficient_quota");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("characters quota"),
        "{answer}"
    );
    assert_eq!(spoken("ten chars!").await, 200);
}
