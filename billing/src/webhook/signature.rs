//! `Stripe-Signature` verification, on the body exactly as it arrived.
//!
//! The header reads `t=<unix seconds>,v1=<hex>[,v1=<hex>…][,v0=<hex>]`. Each
//! `v1` is the hex HMAC-SHA256 of `"{t}.{body}"`, keyed with one of the
//! endpoint's signing secrets: the whole `whsec_…` string, prefix included.
//! While a secret is being rolled Stripe signs with both the old and the new
//! one, so a delivery may carry several `v1`s, and we may hold several
//! secrets: any `v1` matching under any secret is enough. `v0` (a fake
//! signature Stripe adds to test-mode events) and unknown schemes are ignored.
//!
//! The signature is checked before the timestamp, so [`SignatureError::Stale`]
//! and [`SignatureError::FromFuture`] only ever describe deliveries Stripe
//! really signed (a replay, or a clock out of step), never forgeries.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The header a delivery's signature comes in.
pub const SIGNATURE_HEADER: &str = "Stripe-Signature";

/// How far a signed timestamp may be from now, either way: five minutes, the
/// default of Stripe's own libraries.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// The one scheme accepted: HMAC-SHA256.
const SCHEME: &str = "v1";

/// Every endpoint signing secret starts with this.
const SECRET_PREFIX: &str = "whsec_";

/// Bytes in an HMAC-SHA256 tag (64 hex digits in the header).
const TAG_LEN: usize = 32;

/// The endpoint signing secrets deliveries are checked against, in the order
/// configured (`STRIPE_WEBHOOK_SECRET`, comma-separated: `whsec_new,whsec_old`
/// while a secret is being rolled). Its `Debug` shows how many, never which.
#[derive(Clone)]
pub struct WebhookSecrets {
    /// One HMAC per secret, keyed once here and cloned for each delivery.
    keys: Vec<HmacSha256>,
    tolerance: Duration,
}

/// Why a list of webhook secrets was refused. Messages say what to change
/// and never include a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "no webhook signing secret: set STRIPE_WEBHOOK_SECRET to the endpoint's `whsec_…` secret"
    )]
    Empty,
    #[error(
        "webhook signing secret {position} of {count} is empty: remove the stray comma from \
         STRIPE_WEBHOOK_SECRET"
    )]
    EmptyEntry { position: usize, count: usize },
    #[error(
        "webhook signing secret {position} of {count} does not start with `whsec_`: use the \
         webhook endpoint's signing secret (Dashboard → Developers → Webhooks, or what \
         `stripe listen` prints), not an API key"
    )]
    NotASigningSecret { position: usize, count: usize },
}

/// Why a delivery was refused. The gateway answers 400 with the message and
/// changes nothing; Stripe retries the delivery later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Stripe-Signature header")]
    MissingHeader,
    #[error("malformed Stripe-Signature header: {reason}")]
    MalformedHeader { reason: &'static str },
    #[error("Stripe-Signature header has no `t=` timestamp")]
    NoTimestamp,
    #[error("Stripe-Signature header has no `v1=` signature, the only scheme accepted")]
    NoV1Signature,
    #[error(
        "no `v1` signature in the Stripe-Signature header matches the body under any configured \
         webhook secret"
    )]
    NoMatchingSignature,
    #[error(
        "Stripe-Signature timestamp is {age_secs} s old, beyond the {tolerance_secs} s tolerance \
         (a replay, or a clock out of step)"
    )]
    Stale { age_secs: u64, tolerance_secs: u64 },
    #[error(
        "Stripe-Signature timestamp is {ahead_secs} s in the future, beyond the {tolerance_secs} s \
         tolerance (a clock out of step)"
    )]
    FromFuture {
        ahead_secs: u64,
        tolerance_secs: u64,
    },
}

impl SignatureError {
    /// A fixed label per variant, for a metric or a log field.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingHeader => "missing_header",
            Self::MalformedHeader { .. } => "malformed_header",
            Self::NoTimestamp => "no_timestamp",
            Self::NoV1Signature => "no_v1_signature",
            Self::NoMatchingSignature => "no_matching_signature",
            Self::Stale { .. } => "stale",
            Self::FromFuture { .. } => "from_future",
        }
    }
}

/// A body whose signature checked out. Only [`WebhookSecrets::verify`] makes
/// one, so holding one is proof the body came from Stripe.
#[derive(Clone, Copy)]
pub struct VerifiedPayload<'b> {
    pub(super) body: &'b [u8],
    timestamp: u64,
    secret_index: usize,
}

impl<'b> VerifiedPayload<'b> {
    /// The body, byte for byte as received and signed.
    pub fn body(&self) -> &'b [u8] {
        self.body
    }

    /// When Stripe signed it (Unix seconds, the header's `t`).
    pub fn timestamp(&self) -> u64 {
        self.timestamp
    }

    /// Which configured secret matched (0-based, in list order). Deliveries
    /// still matching only an old secret mean a roll is not finished.
    pub fn secret_index(&self) -> usize {
        self.secret_index
    }
}

impl fmt::Debug for VerifiedPayload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedPayload")
            .field("body_len", &self.body.len())
            .field("timestamp", &self.timestamp)
            .field("secret_index", &self.secret_index)
            .finish()
    }
}

impl WebhookSecrets {
    /// Secrets from a comma-separated list (spaces around entries are
    /// ignored), with [`DEFAULT_TOLERANCE`].
    pub fn from_list(list: &str) -> Result<Self, SecretsError> {
        if list.trim().is_empty() {
            return Err(SecretsError::Empty);
        }
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let count = entries.len();
        let mut keys = Vec::with_capacity(count);
        for (i, entry) in entries.into_iter().enumerate() {
            let position = i + 1;
            if entry.is_empty() {
                return Err(SecretsError::EmptyEntry { position, count });
            }
            if !entry.starts_with(SECRET_PREFIX) {
                return Err(SecretsError::NotASigningSecret { position, count });
            }
            keys.push(keyed(entry));
        }
        Ok(Self {
            keys,
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// The same secrets with another timestamp tolerance.
    pub fn with_tolerance(self, tolerance: Duration) -> Self {
        Self { tolerance, ..self }
    }

    /// Checks a delivery: `header` is the `Stripe-Signature` value (`None`
    /// when absent), `body` the raw request body, `now` the time to judge the
    /// signed timestamp against.
    pub fn verify<'b>(
        &self,
        header: Option<&str>,
        body: &'b [u8],
        now: SystemTime,
    ) -> Result<VerifiedPayload<'b>, SignatureError> {
        let header = SignatureHeader::parse(header.ok_or(SignatureError::MissingHeader)?)?;
        let secret_index = self
            .keys
            .iter()
            .position(|key| {
                let expected = tag(key, header.timestamp, body);
                // Constant-time per comparison, so response times say nothing
                // about how much of a forged signature was right.
                header
                    .v1
                    .iter()
                    .any(|candidate| bool::from(candidate.ct_eq(&expected)))
            })
            .ok_or(SignatureError::NoMatchingSignature)?;

        // A clock before 1970 is as wrong as any other: the tolerance catches it.
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let tolerance_secs = self.tolerance.as_secs();
        if now > header.timestamp && now - header.timestamp > tolerance_secs {
            return Err(SignatureError::Stale {
                age_secs: now - header.timestamp,
                tolerance_secs,
            });
        }
        if header.timestamp > now && header.timestamp - now > tolerance_secs {
            return Err(SignatureError::FromFuture {
                ahead_secs: header.timestamp - now,
                tolerance_secs,
            });
        }
        Ok(VerifiedPayload {
            body,
            timestamp: header.timestamp,
            secret_index,
        })
    }
}

impl FromStr for WebhookSecrets {
    type Err = SecretsError;

    fn from_str(list: &str) -> Result<Self, SecretsError> {
        Self::from_list(list)
    }
}

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSecrets")
            .field("secrets", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

/// A `Stripe-Signature` value for `body` signed with `secret` at `timestamp`
/// (Unix seconds), built as Stripe's libraries' `generate_test_header_string`
/// builds it: `t=<timestamp>,v1=<hex>`.
///
/// For tests and tools (such as replaying a delivery at a local gateway),
/// and for the gateway's job callbacks, which are signed the same way.
pub fn sign(secret: &str, body: &[u8], timestamp: u64) -> String {
    let tag = tag(&keyed(secret), timestamp, body);
    format!("t={timestamp},{SCHEME}={}", hex::encode(tag))
}

#[expect(
    clippy::expect_used,
    reason = "HMAC takes a key of any length (RFC 2104 hashes a long one), so this cannot fail"
)]
fn keyed(secret: &str) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length")
}

/// HMAC of Stripe's signed payload, `"{timestamp}.{body}"`.
fn tag(key: &HmacSha256, timestamp: u64, body: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = key.clone();
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// What a `Stripe-Signature` header says.
struct SignatureHeader {
    timestamp: u64,
    /// The decodable `v1` values; one that is not 64 hex digits can match
    /// nothing, so it is dropped rather than failing the others.
    v1: Vec<[u8; TAG_LEN]>,
}

impl SignatureHeader {
    fn parse(header: &str) -> Result<Self, SignatureError> {
        let malformed = |reason| SignatureError::MalformedHeader { reason };
        if header.trim().is_empty() {
            return Err(malformed("the header is empty"));
        }
        let mut timestamp = None;
        let mut v1 = Vec::new();
        let mut saw_v1 = false;
        // Stripe writes `k=v,k=v`; spaces after commas or around `=` are
        // tolerated, as its libraries do, and so is a stray empty element.
        for element in header.split(',').map(str::trim) {
            if element.is_empty() {
                continue;
            }
            let Some((key, value)) = element.split_once('=') else {
                return Err(malformed("an element is not `key=value`"));
            };
            let value = value.trim();
            match key.trim() {
                "t" => {
                    if timestamp.is_some() {
                        return Err(malformed("`t` appears more than once"));
                    }
                    // Digits only: `u64::from_str` would also take `+5`, which
                    // Stripe never writes.
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(malformed("`t` is not a whole number of seconds"));
                    }
                    timestamp = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| malformed("`t` is out of range"))?,
                    );
                }
                SCHEME => {
                    saw_v1 = true;
                    let mut decoded = [0; TAG_LEN];
                    if hex::decode_to_slice(value, &mut decoded).is_ok() {
                        v1.push(decoded);
                    }
                }
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(SignatureError::NoTimestamp)?;
        if !saw_v1 {
            return Err(SignatureError::NoV1Signature);
        }
        Ok(Self { timestamp, v1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test";
    const OTHER_SECRET: &str = "whsec_other";
    const T: u64 = 1_700_000_000;
    const BODY: &[u8] = br#"{"id":"evt_1","object":"event"}"#;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn secrets(list: &str) -> WebhookSecrets {
        WebhookSecrets::from_list(list).unwrap()
    }

    /// The `v1=…` part of a header made by [`sign`].
    fn v1_of(header: &str) -> &str {
        header.split_once(',').unwrap().1
    }

    fn verify(list: &str, header: &str, body: &[u8], now: u64) -> Result<usize, SignatureError> {
        secrets(list)
            .verify(Some(header), body, at(now))
            .map(|payload| payload.secret_index())
    }

    #[test]
    fn accepts_a_valid_signature() {
        let header = sign(SECRET, BODY, T);
        let payload = secrets(SECRET).verify(Some(&header), BODY, at(T)).unwrap();
        assert_eq!(payload.body(), BODY);
        assert_eq!(payload.timestamp(), T);
        assert_eq!(payload.secret_index(), 0);
    }

    /// Pins the exact scheme against an HMAC computed outside this code
    /// (Python's `hmac`): key = the whole secret including `whsec_`, message
    /// = `"{t}.{body}"`, lowercase hex.
    #[test]
    fn known_answer_vector() {
        const EXPECTED: &str = "35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91";
        let header = format!("t=1700000000,v1={EXPECTED}");
        assert_eq!(sign("whsec_test", b"{}", 1_700_000_000), header);
        assert_eq!(verify("whsec_test", &header, b"{}", T), Ok(0));
    }

    #[test]
    fn sign_writes_a_timestamp_and_one_v1() {
        let header = sign(SECRET, BODY, T);
        let (t, v1) = header.split_once(',').unwrap();
        assert_eq!(t, "t=1700000000");
        let hex = v1.strip_prefix("v1=").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn accepts_when_any_of_several_v1_matches() {
        let good = sign(SECRET, BODY, T);
        let wrong = v1_of(&sign(OTHER_SECRET, BODY, T)).to_owned();
        let wrong_first = format!("t={T},{wrong},{}", v1_of(&good));
        let wrong_last = format!("{good},{wrong}");
        assert_eq!(verify(SECRET, &wrong_first, BODY, T), Ok(0));
        assert_eq!(verify(SECRET, &wrong_last, BODY, T), Ok(0));
    }

    #[test]
    fn rotation_accepts_the_second_configured_secret() {
        let list = format!("{SECRET},{OTHER_SECRET}");
        let header = sign(OTHER_SECRET, BODY, T);
        assert_eq!(verify(&list, &header, BODY, T), Ok(1));
    }

    /// Mid-roll Stripe sends one `v1` per live secret; we may hold only the
    /// new one, or only the old one.
    #[test]
    fn rotation_accepts_a_header_signed_with_both_secrets() {
        let header = format!(
            "{},{}",
            sign(OTHER_SECRET, BODY, T),
            v1_of(&sign(SECRET, BODY, T))
        );
        assert_eq!(verify(SECRET, &header, BODY, T), Ok(0));
        assert_eq!(verify(OTHER_SECRET, &header, BODY, T), Ok(0));
        assert_eq!(
            verify("whsec_neither", &header, BODY, T),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn rejects_a_stale_timestamp() {
        let header = sign(SECRET, BODY, T - 301);
        assert_eq!(
            verify(SECRET, &header, BODY, T),
            Err(SignatureError::Stale {
                age_secs: 301,
                tolerance_secs: 300
            })
        );
        let edge = sign(SECRET, BODY, T - 300);
        assert_eq!(verify(SECRET, &edge, BODY, T), Ok(0));
    }

    #[test]
    fn rejects_a_timestamp_beyond_tolerance_in_the_future() {
        let header = sign(SECRET, BODY, T + 301);
        assert_eq!(
            verify(SECRET, &header, BODY, T),
            Err(SignatureError::FromFuture {
                ahead_secs: 301,
                tolerance_secs: 300
            })
        );
        let edge = sign(SECRET, BODY, T + 300);
        assert_eq!(verify(SECRET, &edge, BODY, T), Ok(0));
    }

    #[test]
    fn tolerance_can_be_changed() {
        let strict = secrets(SECRET).with_tolerance(Duration::from_secs(10));
        let header = sign(SECRET, BODY, T - 11);
        assert_eq!(
            strict.verify(Some(&header), BODY, at(T)).unwrap_err(),
            SignatureError::Stale {
                age_secs: 11,
                tolerance_secs: 10
            }
        );
    }

    #[test]
    fn rejects_a_body_changed_by_one_byte() {
        let header = sign(SECRET, BODY, T);
        let mut forged = BODY.to_vec();
        forged[8] ^= 1;
        assert_eq!(
            verify(SECRET, &header, &forged, T),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    /// The timestamp is signed too: moving it breaks the signature.
    #[test]
    fn rejects_a_changed_timestamp() {
        let header = sign(SECRET, BODY, T).replacen("t=1700000000", "t=1700000001", 1);
        assert_eq!(
            verify(SECRET, &header, BODY, T),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn rejects_the_wrong_secret() {
        let header = sign(OTHER_SECRET, BODY, T);
        assert_eq!(
            verify(SECRET, &header, BODY, T),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    /// A forgery with an old timestamp is reported as a forgery: staleness is
    /// only judged once the signature holds.
    #[test]
    fn forged_and_stale_is_reported_as_forged() {
        let header = sign(OTHER_SECRET, BODY, T - 10_000);
        assert_eq!(
            verify(SECRET, &header, BODY, T),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn rejects_a_missing_header() {
        let result = secrets(SECRET).verify(None, BODY, at(T));
        assert_eq!(result.unwrap_err(), SignatureError::MissingHeader);
    }

    #[test]
    fn rejects_malformed_headers() {
        let v1 = v1_of(&sign(SECRET, BODY, T)).to_owned();
        let malformed = |reason| Err(SignatureError::MalformedHeader { reason });
        let cases = [
            (v1.clone(), Err(SignatureError::NoTimestamp)),
            (format!("t={T}"), Err(SignatureError::NoV1Signature)),
            (
                format!("t=abc,{v1}"),
                malformed("`t` is not a whole number of seconds"),
            ),
            (
                format!("t=-5,{v1}"),
                malformed("`t` is not a whole number of seconds"),
            ),
            (
                format!("t=,{v1}"),
                malformed("`t` is not a whole number of seconds"),
            ),
            (
                format!("t=1.5,{v1}"),
                malformed("`t` is not a whole number of seconds"),
            ),
            (
                format!("t=99999999999999999999,{v1}"),
                malformed("`t` is out of range"),
            ),
            (
                format!("t={T},t={T},{v1}"),
                malformed("`t` appears more than once"),
            ),
            (
                format!("t={T},{v1},garbage"),
                malformed("an element is not `key=value`"),
            ),
            (String::new(), malformed("the header is empty")),
            ("  ".to_owned(), malformed("the header is empty")),
            (",,".to_owned(), Err(SignatureError::NoTimestamp)),
        ];
        for (header, expected) in cases {
            assert_eq!(
                verify(SECRET, &header, BODY, T),
                expected,
                "header {header:?}"
            );
        }
    }

    #[test]
    fn tolerates_whitespace_and_empty_elements() {
        let v1 = v1_of(&sign(SECRET, BODY, T)).to_owned();
        for header in [
            format!("t={T}, {v1}"),
            format!("  t={T} ,\t{v1}  "),
            format!("t = {T},v1 = {}", v1.trim_start_matches("v1=")),
            format!("t={T},,{v1},"),
        ] {
            assert_eq!(verify(SECRET, &header, BODY, T), Ok(0), "header {header:?}");
        }
    }

    /// `v0` is computed the same way here to show it is the scheme name, not
    /// the value, that is refused.
    #[test]
    fn rejects_a_v0_only_header() {
        let v0 = sign(SECRET, BODY, T).replacen("v1=", "v0=", 1);
        assert_eq!(
            verify(SECRET, &v0, BODY, T),
            Err(SignatureError::NoV1Signature)
        );
    }

    #[test]
    fn ignores_v0_and_unknown_schemes_next_to_a_good_v1() {
        let good = sign(SECRET, BODY, T);
        let header = format!("{good},v0={},v2=future,x=", "ab".repeat(32));
        assert_eq!(verify(SECRET, &header, BODY, T), Ok(0));
    }

    #[test]
    fn a_v1_that_is_not_hex_matches_nothing_but_does_not_hide_a_good_one() {
        let good = sign(SECRET, BODY, T);
        let with_junk = format!("t={T},v1=not-hex,v1=abc,{}", v1_of(&good));
        assert_eq!(verify(SECRET, &with_junk, BODY, T), Ok(0));
        let only_junk = format!("t={T},v1=not-hex");
        assert_eq!(
            verify(SECRET, &only_junk, BODY, T),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn secrets_are_read_from_a_comma_separated_list() {
        let list = secrets(" whsec_a , whsec_b ");
        let header = sign("whsec_b", BODY, T);
        let payload = list.verify(Some(&header), BODY, at(T)).unwrap();
        assert_eq!(payload.secret_index(), 1);
        assert!("whsec_a".parse::<WebhookSecrets>().is_ok());
    }

    #[test]
    fn refuses_bad_secret_lists() {
        let cases = [
            ("", SecretsError::Empty),
            (" ", SecretsError::Empty),
            (
                "whsec_a,",
                SecretsError::EmptyEntry {
                    position: 2,
                    count: 2,
                },
            ),
            (
                "whsec_a,sk_test_123",
                SecretsError::NotASigningSecret {
                    position: 2,
                    count: 2,
                },
            ),
        ];
        for (list, expected) in cases {
            assert_eq!(
                WebhookSecrets::from_list(list).unwrap_err(),
                expected,
                "list {list:?}"
            );
        }
        let message = WebhookSecrets::from_list("sk_live_secretvalue")
            .unwrap_err()
            .to_string();
        assert!(!message.contains("secretvalue"), "{message}");
    }

    #[test]
    fn debug_never_prints_a_secret() {
        let list = secrets("whsec_firstsecret,whsec_secondsecret");
        let debug = format!("{list:?}");
        assert!(
            !debug.contains("firstsecret") && !debug.contains("whsec"),
            "{debug}"
        );
        assert!(debug.contains("secrets: 2"), "{debug}");
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            SignatureError::MissingHeader.to_string(),
            "missing Stripe-Signature header"
        );
        let stale = SignatureError::Stale {
            age_secs: 301,
            tolerance_secs: 300,
        };
        assert!(stale.to_string().contains("301 s old"), "{stale}");
        assert_eq!(stale.reason(), "stale");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Any header and body: refused or verified, never a panic; a
            /// forged delivery is never verified.
            #[test]
            fn any_delivery_is_verified_or_refused_without_a_panic(
                header in "(t=[0-9]{0,22}|v1=[0-9a-f]{0,70}|v0=x|,| |=|[a-z0-9]{1,4}){0,8}",
                body in prop::collection::vec(any::<u8>(), 0..256),
                now in any::<u64>(),
            ) {
                let now = UNIX_EPOCH.checked_add(Duration::from_secs(now)).unwrap_or(UNIX_EPOCH);
                let verified = secrets(SECRET).verify(Some(&header), &body, now);
                prop_assert!(verified.is_err(), "a header made without the secret passed");
                let _ = super::super::super::Event::parse(&body);
            }

            /// A real signature verifies whatever the body, at its own time.
            #[test]
            fn any_body_signed_with_the_secret_verifies(
                body in prop::collection::vec(any::<u8>(), 0..256),
                t in 0u64..4_000_000_000,
            ) {
                let header = sign(SECRET, &body, t);
                let payload = secrets(SECRET).verify(Some(&header), &body, at(t));
                prop_assert!(payload.is_ok());
            }
        }
    }
}
