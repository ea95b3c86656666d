//! A client's request body, any bytes: parsed, or refused with a 400 that
//! names what is wrong; a parsed one survives having its limit rewritten.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate::gateway::request::{Endpoint, parse};

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else {
        return;
    };
    let endpoint = match control % 3 {
        0 => Endpoint::ChatCompletions,
        1 => Endpoint::Completions,
        _ => Endpoint::Embeddings,
    };
    match parse(endpoint, Bytes::copy_from_slice(body)) {
        Ok(mut request) => {
            assert!(!request.model.is_empty());
            assert!(request.sequences >= 1);
            request.set_max_tokens(u64::from(control));
            let sent: serde_json::Value = serde_json::from_slice(&request.upstream_body)
                .expect("the body sent upstream is JSON");
            assert_eq!(sent["model"].as_str(), Some(request.model.as_str()));
        }
        Err(error) => assert_eq!(error.status(), 400),
    }
});
