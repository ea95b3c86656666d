//! A delivery to the Stripe webhook, any header and body: verified or
//! refused, never a panic, and a header not made with the secret never
//! verifies.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tollgate_billing::webhook::{Event, WebhookSecrets};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (header, body) = data.split_at(split);
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    let Ok(secrets) = WebhookSecrets::from_list("whsec_fuzz") else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert!(secrets.verify(Some(header), body, now).is_err());
    let _ = Event::parse(body);
});
