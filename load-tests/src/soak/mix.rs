//! What the soak sends: the request kinds, their weights (`--mix`), the keys they are
//! sent with (`--keys-file`), and each request's body.
//!
//! Choices are drawn from a hash of `--seed`, the request's sequence number and what
//! is being chosen, not from a round-robin: the kind and the key are drawn
//! independently, so no kind is tied to one key the way two round-robins with the
//! same cycle length would tie them, and two runs with the same seed send the same
//! sequence.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cli::FlagError;
use crate::key_mix::ApiKey;
use crate::request::prompt_text;

/// One kind of request in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// `/v1/chat/completions`, one JSON answer.
    Chat,
    /// `/v1/chat/completions` streamed, asking for the usage chunk as the SDKs do.
    ChatStream,
    /// `/v1/completions` with one prompt, one JSON answer.
    Completion,
    /// `/v1/completions` streamed with an array of `--prompts` prompts and `n` =
    /// `--n`: `prompts × n` choices, each with its own text.
    CompletionMulti,
    /// `/v1/embeddings` with two inputs.
    Embedding,
    /// `/v1/chat/completions` streamed by a client that reads a few events and then
    /// hangs up.
    Disconnect,
}

impl RequestKind {
    pub const ALL: [Self; 6] = [
        Self::Chat,
        Self::ChatStream,
        Self::Completion,
        Self::CompletionMulti,
        Self::Embedding,
        Self::Disconnect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::ChatStream => "chat_stream",
            Self::Completion => "completion",
            Self::CompletionMulti => "completion_multi",
            Self::Embedding => "embedding",
            Self::Disconnect => "disconnect",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Self::Chat | Self::ChatStream | Self::Disconnect => "/v1/chat/completions",
            Self::Completion | Self::CompletionMulti => "/v1/completions",
            Self::Embedding => "/v1/embeddings",
        }
    }

    pub fn streamed(self) -> bool {
        matches!(
            self,
            Self::ChatStream | Self::CompletionMulti | Self::Disconnect
        )
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// `--mix` by default: mostly chat, streamed and not, with every other kind present.
pub const DEFAULT_MIX: &str =
    "chat=3,chat_stream=3,completion=1,completion_multi=1,embedding=1,disconnect=1";

/// Request kinds with integer weights; at least one weight is above zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(RequestKind, u64)>,
}

impl Mix {
    /// Parses `KIND=WEIGHT,...`; kinds left out are not sent, a weight of 0 turns one off.
    pub fn parse(raw: &str) -> Result<Self, FlagError> {
        let mut weights: Vec<(RequestKind, u64)> = Vec::new();
        for entry in raw.split(',').map(str::trim) {
            let bad = || FlagError::MixEntry(entry.to_owned());
            let (name, weight) = entry.split_once('=').ok_or_else(bad)?;
            let kind = RequestKind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(bad)?;
            let weight: u64 = weight.trim().parse().map_err(|_| bad())?;
            if weight > MAX_WEIGHT {
                return Err(bad());
            }
            if weights.iter().any(|(k, _)| *k == kind) {
                return Err(bad());
            }
            weights.push((kind, weight));
        }
        if weights.iter().all(|(_, w)| *w == 0) {
            return Err(FlagError::MixEmpty);
        }
        Ok(Self { weights })
    }

    /// The kind of the request whose draw is `draw`.
    pub fn pick(&self, draw: u64) -> RequestKind {
        let index = weighted_index(self.weights.iter().map(|(_, w)| *w), draw);
        self.weights
            .get(index)
            .map_or(RequestKind::Chat, |(kind, _)| *kind)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(kind, weight)| format!("{kind}={weight}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Weights above this buy nothing and keep the sums far from overflow.
const MAX_WEIGHT: u64 = 1_000_000;

/// The index whose share of the total weight `draw` falls in; weights of 0 are
/// never chosen. The caller guarantees one weight is positive.
fn weighted_index(weights: impl Iterator<Item = u64> + Clone, draw: u64) -> usize {
    let total: u64 = weights.clone().sum();
    let mut point = draw % total.max(1);
    for (index, weight) in weights.enumerate() {
        if point < weight {
            return index;
        }
        point -= weight;
    }
    0
}

/// What a draw is for: each gets its own stream of numbers from one seed.
#[derive(Debug, Clone, Copy)]
pub enum Draw {
    Kind = 1,
    Key = 2,
    /// How many content events a disconnecting client reads.
    Disconnect = 3,
}

/// A well-mixed number for request `seq`'s choice of `what` (SplitMix64's finaliser
/// over the three inputs).
pub fn draw(seed: u64, what: Draw, seq: u64) -> u64 {
    let mut x = seed
        ^ (what as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One key of the soak and what the checker needs to know about it.
#[derive(Debug, Clone)]
pub struct SoakKey {
    pub key: ApiKey,
    pub account: String,
    pub tier: String,
    pub weight: u64,
}

/// The keys of `--keys-file`: one per line, `KEY ACCOUNT TIER WEIGHT` separated by
/// whitespace; empty lines and lines starting with `#` are skipped.
#[derive(Debug, Clone)]
pub struct SoakKeys {
    keys: Vec<SoakKey>,
}

impl SoakKeys {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading keys file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in keys file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [key, account, tier, weight] = fields.as_slice() else {
                anyhow::bail!(
                    "line {}: expected KEY ACCOUNT TIER WEIGHT, got {} fields",
                    number + 1,
                    fields.len()
                );
            };
            let key = ApiKey::parse(key).with_context(|| format!("line {}", number + 1))?;
            let weight = match weight.parse::<u64>() {
                Ok(w) if (1..=MAX_WEIGHT).contains(&w) => w,
                _ => anyhow::bail!(
                    "line {}: weight {weight:?} must be a whole number from 1 to {MAX_WEIGHT}",
                    number + 1
                ),
            };
            keys.push(SoakKey {
                key,
                account: (*account).to_owned(),
                tier: (*tier).to_owned(),
                weight,
            });
        }
        anyhow::ensure!(!keys.is_empty(), "no keys");
        Ok(Self { keys })
    }

    pub fn keys(&self) -> &[SoakKey] {
        &self.keys
    }

    /// The index of the key for the request whose draw is `draw`.
    pub fn pick(&self, draw: u64) -> usize {
        weighted_index(self.keys.iter().map(|k| k.weight), draw)
    }
}

/// The parts of a request body that do not change between requests.
#[derive(Debug, Clone)]
pub struct BodyShape {
    pub model: String,
    pub max_tokens: u32,
    pub prompt_bytes: usize,
    /// Prompts in a `completion_multi` request.
    pub prompts: u32,
    /// `n` of a `completion_multi` request.
    pub n: u32,
}

impl BodyShape {
    /// The JSON body of request `seq` of `kind`. Its sequence number is in the
    /// prompt, so answers differ from request to request (gpu-sim derives its text
    /// from the prompt).
    pub fn body(&self, kind: RequestKind, seq: u64) -> Result<Bytes, serde_json::Error> {
        let prompt = |i: u32| format!("{} {seq}.{i}", prompt_text(self.prompt_bytes));
        let usage = serde_json::json!({"include_usage": true});
        let body = match kind {
            RequestKind::Chat | RequestKind::ChatStream | RequestKind::Disconnect => {
                let mut body = serde_json::json!({
                    "model": self.model,
                    "messages": [{"role": "user", "content": prompt(0)}],
                    "max_tokens": self.max_tokens,
                });
                if kind.streamed() {
                    body["stream"] = true.into();
                }
                // The disconnecting client asks for no usage: Tollgate asks for it on
                // its behalf and must strip it.
                if kind == RequestKind::ChatStream {
                    body["stream_options"] = usage;
                }
                body
            }
            RequestKind::Completion => serde_json::json!({
                "model": self.model,
                "prompt": prompt(0),
                "max_tokens": self.max_tokens,
            }),
            RequestKind::CompletionMulti => serde_json::json!({
                "model": self.model,
                "prompt": (0..self.prompts).map(prompt).collect::<Vec<_>>(),
                "n": self.n,
                "max_tokens": self.max_tokens,
                "stream": true,
                "stream_options": usage,
            }),
            RequestKind::Embedding => serde_json::json!({
                "model": self.model,
                "input": [prompt(0), prompt(1)],
            }),
        };
        serde_json::to_vec(&body).map(Bytes::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_names_and_weights() {
        let mix = Mix::parse("chat=2, embedding=1,disconnect=0").unwrap();
        assert_eq!(mix.to_string(), "chat=2,embedding=1,disconnect=0");
        assert!(Mix::parse(DEFAULT_MIX).is_ok());
    }

    #[test]
    fn mix_refuses_unknown_duplicate_and_all_zero() {
        for bad in ["chat", "chat=x", "chats=1", "chat=1,chat=2", "chat=-1", ""] {
            assert!(Mix::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Mix::parse("chat=0"), Err(FlagError::MixEmpty));
    }

    #[test]
    fn picks_follow_the_weights_and_skip_zero() {
        let mix = Mix::parse("chat=3,embedding=0,disconnect=1").unwrap();
        let picks: Vec<RequestKind> = (0..8).map(|d| mix.pick(d)).collect();
        assert_eq!(
            picks,
            [
                RequestKind::Chat,
                RequestKind::Chat,
                RequestKind::Chat,
                RequestKind::Disconnect,
                RequestKind::Chat,
                RequestKind::Chat,
                RequestKind::Chat,
                RequestKind::Disconnect,
            ]
        );
    }

    #[test]
    fn draws_are_deterministic_and_independent_per_purpose() {
        assert_eq!(draw(7, Draw::Kind, 3), draw(7, Draw::Kind, 3));
        assert_ne!(draw(7, Draw::Kind, 3), draw(7, Draw::Key, 3));
        assert_ne!(draw(7, Draw::Kind, 3), draw(8, Draw::Kind, 3));
        // Kind and key draws are not locked together: over many requests every
        // pairing of a 2-kind mix and a 2-key file occurs.
        let mut seen = std::collections::HashSet::new();
        for seq in 0..64 {
            seen.insert((draw(0, Draw::Kind, seq) % 2, draw(0, Draw::Key, seq) % 2));
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn keys_file_lines_comments_and_errors() {
        let keys =
            SoakKeys::parse("# key account tier weight\n\ntg_a acme free 2\n tg_b  bolt pro 1 \n")
                .unwrap();
        assert_eq!(keys.keys().len(), 2);
        assert_eq!(keys.keys()[1].account, "bolt");
        assert_eq!(keys.keys()[1].tier, "pro");
        assert_eq!(keys.pick(0), 0);
        assert_eq!(keys.pick(2), 1);
        assert!(SoakKeys::parse("tg_a acme free").is_err());
        assert!(SoakKeys::parse("tg_a acme free 0").is_err());
        assert!(SoakKeys::parse("# nothing\n").is_err());
    }

    #[test]
    fn bodies_have_each_kinds_shape() {
        let shape = BodyShape {
            model: "sim-model".into(),
            max_tokens: 8,
            prompt_bytes: 20,
            prompts: 2,
            n: 3,
        };
        let body = |kind| -> serde_json::Value {
            serde_json::from_slice(&shape.body(kind, 42).unwrap()).unwrap()
        };
        let multi = body(RequestKind::CompletionMulti);
        assert_eq!(multi["prompt"].as_array().unwrap().len(), 2);
        assert_eq!(multi["n"], 3);
        assert_eq!(multi["stream"], true);
        assert_eq!(multi["stream_options"]["include_usage"], true);
        let stream = body(RequestKind::ChatStream);
        assert_eq!(stream["stream_options"]["include_usage"], true);
        let disconnect = body(RequestKind::Disconnect);
        assert_eq!(disconnect["stream"], true);
        assert!(disconnect.get("stream_options").is_none());
        let chat = body(RequestKind::Chat);
        assert!(chat.get("stream").is_none());
        assert!(
            chat["messages"][0]["content"]
                .as_str()
                .unwrap()
                .ends_with(" 42.0")
        );
        assert_eq!(
            body(RequestKind::Embedding)["input"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert!(body(RequestKind::Completion)["prompt"].is_string());
    }
}
