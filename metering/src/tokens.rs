//! Exact token counting with OpenAI's tiktoken encodings.
//!
//! Counting is exact at every length: no characters-per-token estimates. The
//! encoders are process-wide singletons built on first use, so counting costs
//! nothing beyond the BPE work itself.
//!
//! User text is encoded as *ordinary* text: a prompt that contains the string
//! `<|endoftext|>` is counted as the characters it is, the way OpenAI's API
//! treats user input, never as a special token.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// The byte-pair encodings Tollgate counts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-4, GPT-3.5-turbo and most OpenAI-compatible defaults.
    Cl100k,
    /// GPT-4o, GPT-4.1, o-series and later.
    O200k,
}

impl Encoding {
    /// The encoding OpenAI uses for `model`, by its name or family prefix
    /// (`gpt-4o-2024-11-20` → o200k). `None` for models tiktoken does not know,
    /// such as self-hosted open-weight models: the caller picks its default.
    pub fn for_model(model: &str) -> Option<Self> {
        match get_tokenizer(model)? {
            Tokenizer::Cl100kBase => Some(Self::Cl100k),
            // Harmony adds special tokens only; ordinary text encodes as o200k.
            Tokenizer::O200kBase | Tokenizer::O200kHarmony => Some(Self::O200k),
            Tokenizer::P50kBase | Tokenizer::R50kBase | Tokenizer::P50kEdit | Tokenizer::Gpt2 => {
                None
            }
        }
    }

    /// The tiktoken name of this encoding.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cl100k => "cl100k_base",
            Self::O200k => "o200k_base",
        }
    }

    /// Number of tokens in `text`, encoded as ordinary text.
    pub fn count(self, text: &str) -> usize {
        let bpe = match self {
            Self::Cl100k => tiktoken_rs::cl100k_base_singleton(),
            Self::O200k => tiktoken_rs::o200k_base_singleton(),
        };
        bpe.count_ordinary(text)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An encoding name that is not one of ours.
#[derive(Debug, thiserror::Error)]
#[error("unknown encoding `{0}` (expected cl100k_base or o200k_base)")]
pub struct UnknownEncoding(pub String);

impl FromStr for Encoding {
    type Err = UnknownEncoding;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cl100k_base" | "cl100k" => Ok(Self::Cl100k),
            "o200k_base" | "o200k" => Ok(Self::O200k),
            other => Err(UnknownEncoding(other.to_owned())),
        }
    }
}

/// Framing tokens OpenAI adds around every chat message (`<|start|>{role}\n … <|end|>`),
/// from OpenAI's published counting recipe for current chat models.
const TOKENS_PER_MESSAGE: usize = 3;
/// Extra token when a message carries `name`.
const TOKENS_PER_NAME: usize = 1;
/// Tokens that prime the assistant's reply (`<|start|>assistant<|message|>`), once per prompt.
const REPLY_PRIMING_TOKENS: usize = 3;

/// Prompt tokens of a chat request's `messages`, counted as OpenAI counts them:
/// per-message framing, role, text content, name. Content given as an array of
/// parts counts its `text` parts; other parts (images, audio) are not text and
/// are priced by their own rules, not here.
pub fn count_chat_prompt(encoding: Encoding, messages: &[Value]) -> usize {
    let mut tokens = REPLY_PRIMING_TOKENS;
    for message in messages {
        tokens += TOKENS_PER_MESSAGE;
        if let Some(role) = message.get("role").and_then(Value::as_str) {
            tokens += encoding.count(role);
        }
        match message.get("content") {
            Some(Value::String(text)) => tokens += encoding.count(text),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        tokens += encoding.count(text);
                    }
                }
            }
            _ => {}
        }
        if let Some(name) = message.get("name").and_then(Value::as_str) {
            tokens += encoding.count(name) + TOKENS_PER_NAME;
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn model_families_map_to_their_encoding() {
        assert_eq!(
            Encoding::for_model("gpt-4o-2024-11-20"),
            Some(Encoding::O200k)
        );
        assert_eq!(Encoding::for_model("gpt-4o"), Some(Encoding::O200k));
        assert_eq!(Encoding::for_model("gpt-4"), Some(Encoding::Cl100k));
        assert_eq!(
            Encoding::for_model("gpt-3.5-turbo-0125"),
            Some(Encoding::Cl100k)
        );
        assert_eq!(
            Encoding::for_model("meta-llama/Llama-3.1-8B-Instruct"),
            None
        );
    }

    #[test]
    fn counts_match_an_independent_implementation() {
        let samples = [
            "Hello, world!",
            "   leading and trailing   \n\n\t ",
            "fn main() { println!(\"{}\", 1 + 2); }",
            "日本語のテキストと中文文本，还有 한국어.",
            "emoji 👩‍👩‍👧‍👦🏳️‍🌈 and <|endoftext|> as plain text",
        ];
        for text in samples {
            assert_eq!(
                Encoding::Cl100k.count(text),
                bpe_openai::cl100k_base().count(text),
                "cl100k: {text:?}"
            );
            assert_eq!(
                Encoding::O200k.count(text),
                bpe_openai::o200k_base().count(text),
                "o200k: {text:?}"
            );
        }
    }

    #[test]
    fn chat_prompt_follows_openai_recipe() {
        // OpenAI's cookbook example: these two messages are 3 + 3 + role/content/name tokens + 3.
        let messages = [
            json!({"role": "system", "content": "You are a helpful assistant."}),
            json!({"role": "user", "name": "example_user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}),
        ];
        let e = Encoding::Cl100k;
        let expected = 3
            + (3 + e.count("system") + e.count("You are a helpful assistant."))
            + (3 + e.count("user") + e.count("Hi") + e.count("example_user") + 1);
        assert_eq!(count_chat_prompt(e, &messages), expected);
    }

    #[test]
    fn encoding_names_round_trip() {
        for e in [Encoding::Cl100k, Encoding::O200k] {
            assert_eq!(e.name().parse::<Encoding>().ok(), Some(e));
        }
        assert!("p50k_base".parse::<Encoding>().is_err());
    }
}
