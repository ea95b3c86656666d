//! Exact token counting with OpenAI's tiktoken encodings.
//!
//! Counting is exact at every length: no characters-per-token estimates and
//! no shortcut for long inputs. The counts come from `bpe-openai`, which
//! produces tiktoken's exact token counts faster than `tiktoken-rs` (on this
//! project's machine about 25 MiB/s against 9 for cl100k and 15 for o200k,
//! `benches/tokens.rs`). `tiktoken-rs` supplies the model → encoding map and
//! is the reference the differential tests below compare against. The
//! encoders are process-wide singletons built on first use.
//!
//! The module has three layers:
//!
//! - [`Encoding`] counts the tokens of a text.
//! - [`EncodingMap`], built once from config, picks the encoding for a
//!   request's `model`: an operator override, else the OpenAI family the name
//!   belongs to, else the configured default.
//! - [`PromptCounter`] counts the prompt of each OpenAI endpoint from the
//!   request JSON: chat `messages` with `tools`/`functions`, completions
//!   `prompt`, embeddings `input`. A request of the wrong shape is counted as
//!   far as it can be and never panics: the upstream rejects it anyway, and
//!   metering must not be the thing that fails.
//!
//! User text is encoded as *ordinary* text: a prompt that contains the string
//! `<|endoftext|>` is counted as the characters it is, the way OpenAI's API
//! treats user input, never as a special token.
//!
//! What the counts leave out, because the request does not say enough:
//! high-detail images (their cost depends on the pixel size, and the gateway
//! does not fetch images: every image costs the flat
//! [`PromptCounter::image_tokens`]), audio and file parts (priced by their
//! own rules), and nested object schemas inside tool parameters (OpenAI's
//! published recipe counts top-level properties only).
//!
//! Counting runs on the calling thread at about 25 bytes per microsecond, so
//! a large body holds a runtime worker for milliseconds (4 ms for a 100 KiB
//! chat body); callers on a Tokio worker should move bodies above
//! [`BLOCKING_THRESHOLD_BYTES`] to the blocking pool.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde_json::Value;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// The byte-pair encodings Tollgate counts with. Config spells them as
/// [`FromStr`] reads them: tiktoken's name, or that name without `_base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
pub enum Encoding {
    /// GPT-4, GPT-3.5-turbo and most OpenAI-compatible defaults.
    #[serde(rename = "cl100k_base", alias = "cl100k")]
    Cl100k,
    /// GPT-4o, GPT-4.1, o-series and later.
    #[serde(rename = "o200k_base", alias = "o200k")]
    O200k,
}

impl Encoding {
    /// The encoding OpenAI uses for `model`, by its name or family prefix
    /// (`gpt-4o-2024-11-20` → o200k). An organisation prefix, as routers and
    /// aggregators write it (`openai/gpt-4o`), is dropped first. `None` for
    /// models tiktoken does not know, such as self-hosted open-weight models:
    /// the caller picks its default.
    pub fn for_model(model: &str) -> Option<Self> {
        // tiktoken names never contain `/`, so only the part after the last
        // one can match.
        let bare = model.rsplit_once('/').map_or(model, |(_, name)| name);
        match get_tokenizer(bare)? {
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

    /// Loads the tokenizer now. The first use of each one builds its tables
    /// (about 150M instructions, tens of milliseconds), which would otherwise
    /// land on the first request that counts with it.
    pub fn preload(self) {
        self.count("");
    }

    /// Number of tokens in `text`, encoded as ordinary text.
    pub fn count(self, text: &str) -> usize {
        let tokenizer = match self {
            Self::Cl100k => bpe_openai::cl100k_base(),
            Self::O200k => bpe_openai::o200k_base(),
        };
        tokenizer.count(text)
    }

    /// Tokens at the start of each tool definition in OpenAI's cookbook
    /// recipe: 10 for the cl100k chat models (gpt-3.5-turbo, gpt-4), 7 for
    /// the o200k ones (gpt-4o, gpt-4o-mini), each fitted there against the
    /// API's reported `prompt_tokens`.
    fn tool_definition_tokens(self) -> usize {
        match self {
            Self::Cl100k => 10,
            Self::O200k => 7,
        }
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

/// Which encoding counts a request, decided from its `model`; built once from
/// config and shared read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodingMap {
    default: Encoding,
    overrides: HashMap<String, Encoding>,
}

impl EncodingMap {
    /// `overrides` maps exact model names, as clients send them, to an
    /// encoding; `default` covers models neither an override nor tiktoken knows.
    pub fn new(default: Encoding, overrides: HashMap<String, Encoding>) -> Self {
        Self { default, overrides }
    }

    /// The encoding for `model`: the override for exactly this name, else
    /// the model's OpenAI family ([`Encoding::for_model`], which also drops
    /// an `org/` prefix), else the default. Overrides match the name as sent,
    /// so an operator can pin `openai/gpt-4o` and `gpt-4o` separately.
    pub fn for_model(&self, model: &str) -> Encoding {
        self.overrides
            .get(model)
            .copied()
            .or_else(|| Encoding::for_model(model))
            .unwrap_or(self.default)
    }

    /// The encoding for models nothing else names.
    pub fn default_encoding(&self) -> Encoding {
        self.default
    }
}

/// Request bodies larger than this should be counted on Tokio's blocking
/// pool (`spawn_blocking`) rather than on a runtime worker; compare it with
/// the raw body length, which is known before parsing.
///
/// Tokio asks tasks not to hold a worker for more than 10–100 µs between
/// awaits. `benches/tokens.rs` (2-core dev machine, medians of 3 runs)
/// counts a 2.3 KB chat body in 63–71 µs (about 35 MiB/s) and a 100 KiB one
/// in 4.1–4.4 ms (22–24 MiB/s). A 2 KiB body is thus about 60 µs inline,
/// inside Tokio's budget, while the hand-off itself costs 17–50 µs of
/// latency there, so moving smaller bodies would free the worker for little
/// and cost the request about as much. Above it, inline cost grows linearly
/// past the budget and the hand-off is the cheaper side.
pub const BLOCKING_THRESHOLD_BYTES: usize = 2 * 1024;

/// Framing tokens OpenAI adds around every chat message (`<|start|>{role}\n … <|end|>`),
/// from OpenAI's published counting recipe for current chat models.
const TOKENS_PER_MESSAGE: usize = 3;
/// Extra token when a message carries `name`.
const TOKENS_PER_NAME: usize = 1;
/// Tokens that prime the assistant's reply (`<|start|>assistant<|message|>`), once per prompt.
const REPLY_PRIMING_TOKENS: usize = 3;

// Tool-definition overheads from OpenAI's cookbook, "How to count tokens with
// tiktoken", `num_tokens_for_tools`. The per-function start cost depends on
// the model family (`Encoding::tool_definition_tokens`); these do not.
/// Once per function that has any properties.
const TOOL_PROPERTIES_START_TOKENS: usize = 3;
/// Once per property.
const TOOL_PROPERTY_TOKENS: usize = 3;
/// Taken off once per property that has an `enum` (the recipe's `enum_init = -3`).
const TOOL_ENUM_DISCOUNT_TOKENS: usize = 3;
/// Once per `enum` item, besides the item's own text.
const TOOL_ENUM_ITEM_TOKENS: usize = 3;
/// Once per request that defines any function.
const TOOL_LIST_END_TOKENS: usize = 12;

/// What one image part costs when nothing else is configured: OpenAI's flat
/// price for a `detail: "low"` image on GPT-4o (85 tokens at any size).
/// High detail adds 170 tokens per 512-px tile of the resized image, which
/// needs the image's pixel size; the gateway does not fetch images, so it
/// cannot tile. Other models price images differently (gpt-4o-mini's low
/// detail is 2,833 tokens), hence [`PromptCounter::image_tokens`] is set
/// from config.
pub const DEFAULT_IMAGE_TOKENS: usize = 85;

/// Counts the prompt tokens of OpenAI requests with one encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptCounter {
    /// The encoding every text in the request is counted with.
    pub encoding: Encoding,
    /// Tokens charged per image part (`image_url` or `input_image`).
    pub image_tokens: usize,
}

impl PromptCounter {
    /// A counter for `encoding` with [`DEFAULT_IMAGE_TOKENS`] per image.
    pub fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            image_tokens: DEFAULT_IMAGE_TOKENS,
        }
    }

    /// Tokens in `text`, encoded as ordinary text.
    pub fn count_text(&self, text: &str) -> usize {
        self.encoding.count(text)
    }

    /// Prompt tokens of a chat-completions request body: its `messages`
    /// ([`Self::count_messages`]) plus its tool definitions
    /// ([`Self::count_tools`]). A body without `messages` counts as an empty
    /// conversation.
    pub fn count_chat(&self, body: &Value) -> usize {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        self.count_messages(messages) + self.count_tools(body)
    }

    /// Prompt tokens of chat `messages`, counted as OpenAI's cookbook counts
    /// them: per-message framing, role, content, name, plus the reply
    /// priming. Besides the recipe's text fields this counts an assistant's
    /// `refusal`, and the `name` and `arguments` text of its `tool_calls` and
    /// legacy `function_call`; content parts count their `text` (or
    /// `refusal`), and each image part costs [`Self::image_tokens`]. Other
    /// parts (audio, files) are priced by their own rules, not here.
    pub fn count_messages(&self, messages: &[Value]) -> usize {
        let mut tokens = REPLY_PRIMING_TOKENS;
        for message in messages {
            tokens += TOKENS_PER_MESSAGE;
            tokens += self.count_field(message, "role");
            tokens += self.count_content(message.get("content"));
            if let Some(name) = message.get("name").and_then(Value::as_str) {
                tokens += self.count_text(name) + TOKENS_PER_NAME;
            }
            tokens += self.count_field(message, "refusal");
            if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
                tokens += calls
                    .iter()
                    .filter_map(|call| call.get("function"))
                    .map(|function| self.count_function_call(function))
                    .sum::<usize>();
            }
            if let Some(function) = message.get("function_call") {
                tokens += self.count_function_call(function);
            }
        }
        tokens
    }

    /// Tokens of the function definitions in a chat request: `tools` entries
    /// of type `function` and legacy `functions`, counted with the cookbook's
    /// `num_tokens_for_tools`. Per function: a start cost (7 on o200k, 10 on
    /// cl100k), `name:description` without the description's final period,
    /// and, when it has parameters, 3 plus per top-level property 3 +
    /// `key:type:description`, with each `enum` item costing 3 + its text
    /// minus 3 per enum. 12 more close the list. 0 without definitions.
    ///
    /// Where the recipe would fail on a missing field, the field counts as
    /// empty; a non-string `type` (`["string", "null"]`) or enum item counts
    /// as its JSON text.
    pub fn count_tools(&self, body: &Value) -> usize {
        let tools = body
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|tool| {
                tool.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(|kind| kind == "function")
            })
            .filter_map(|tool| tool.get("function"));
        let functions = body
            .get("functions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        let mut defined = 0;
        let mut tokens = 0;
        let mut line = String::new();
        for function in tools.chain(functions) {
            defined += 1;
            tokens += self.count_function_definition(function, &mut line);
        }
        if defined > 0 {
            tokens += TOOL_LIST_END_TOKENS;
        }
        tokens
    }

    /// Prompt tokens of a Responses API request (`/v1/responses`), by the
    /// chat recipe: `instructions` as a system message, then `input`, a
    /// string (one user message) or a list of items. A message item counts
    /// as a chat message; a function call its `name` and `arguments`, a
    /// call's output its `output`, each framed as a message. Tool
    /// definitions are not counted: the backend's usage prices them.
    pub fn count_responses(&self, body: &Value) -> usize {
        let mut tokens = REPLY_PRIMING_TOKENS;
        if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
            tokens +=
                TOKENS_PER_MESSAGE + self.count_text("system") + self.count_text(instructions);
        }
        match body.get("input") {
            Some(Value::String(text)) => {
                tokens += TOKENS_PER_MESSAGE + self.count_text("user") + self.count_text(text);
            }
            Some(Value::Array(items)) => {
                for item in items {
                    tokens += TOKENS_PER_MESSAGE
                        + self.count_field(item, "role")
                        + self.count_content(item.get("content"))
                        + self.count_function_call(item)
                        + self.count_field(item, "output");
                }
            }
            _ => {}
        }
        tokens
    }

    /// Prompt tokens of a completions `prompt`: a string, an array of
    /// strings, a token array (its length), or an array of token arrays.
    pub fn count_completion_prompt(&self, prompt: &Value) -> usize {
        self.count_text_or_tokens(prompt)
    }

    /// Prompt tokens of an embeddings `input`, which takes the same four
    /// shapes as a completions prompt.
    pub fn count_embedding_input(&self, input: &Value) -> usize {
        self.count_text_or_tokens(input)
    }

    /// The four shapes of `prompt`/`input`. Token ids are counted, not
    /// checked: the upstream validates them against its vocabulary.
    fn count_text_or_tokens(&self, value: &Value) -> usize {
        match value {
            Value::String(text) => self.count_text(text),
            Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => self.count_text(text),
                    // One element of a flat token array.
                    Value::Number(_) => 1,
                    Value::Array(ids) => ids.iter().filter(|id| id.is_number()).count(),
                    _ => 0,
                })
                .sum(),
            _ => 0,
        }
    }

    /// A string field of `object`, or 0 when absent or not a string.
    fn count_field(&self, object: &Value, key: &str) -> usize {
        object
            .get(key)
            .and_then(Value::as_str)
            .map_or(0, |text| self.count_text(text))
    }

    fn count_content(&self, content: Option<&Value>) -> usize {
        match content {
            Some(Value::String(text)) => self.count_text(text),
            Some(Value::Array(parts)) => parts.iter().map(|part| self.count_part(part)).sum(),
            _ => 0,
        }
    }

    fn count_part(&self, part: &Value) -> usize {
        match part.get("type").and_then(Value::as_str) {
            Some("image_url" | "input_image") => self.image_tokens,
            Some("refusal") => self.count_field(part, "refusal"),
            // `text`, `input_text`, `output_text`, and parts of unknown type
            // that still carry text.
            _ => match part {
                Value::String(text) => self.count_text(text),
                _ => self.count_field(part, "text"),
            },
        }
    }

    /// `name` and `arguments` of a call the model made.
    fn count_function_call(&self, function: &Value) -> usize {
        self.count_field(function, "name") + self.count_field(function, "arguments")
    }

    /// One function definition by the cookbook recipe; `line` is scratch
    /// space reused across definitions.
    fn count_function_definition(&self, function: &Value, line: &mut String) -> usize {
        let mut tokens = self.encoding.tool_definition_tokens();
        line.clear();
        line.push_str(str_field(function, "name"));
        line.push(':');
        line.push_str(without_final_period(str_field(function, "description")));
        tokens += self.count_text(line);

        let properties = function
            .get("parameters")
            .and_then(|parameters| parameters.get("properties"))
            .and_then(Value::as_object);
        let Some(properties) = properties.filter(|p| !p.is_empty()) else {
            return tokens;
        };
        tokens += TOOL_PROPERTIES_START_TOKENS;
        for (key, property) in properties {
            let mut property_tokens = TOOL_PROPERTY_TOKENS;
            if let Some(items) = property.get("enum") {
                let items = items.as_array().map_or(&[][..], Vec::as_slice);
                for item in items {
                    property_tokens += TOOL_ENUM_ITEM_TOKENS;
                    property_tokens += match item {
                        Value::String(text) => self.count_text(text),
                        other => self.count_text(&other.to_string()),
                    };
                }
                // Never underflows: TOOL_PROPERTY_TOKENS is already in.
                property_tokens = property_tokens.saturating_sub(TOOL_ENUM_DISCOUNT_TOKENS);
            }
            line.clear();
            line.push_str(key);
            line.push(':');
            match property.get("type") {
                Some(Value::String(kind)) => line.push_str(kind),
                Some(other) => line.push_str(&other.to_string()),
                None => {}
            }
            line.push(':');
            line.push_str(without_final_period(str_field(property, "description")));
            property_tokens += self.count_text(line);
            tokens += property_tokens;
        }
        tokens
    }
}

/// A string field, or `""` when absent or not a string.
fn str_field<'a>(object: &'a Value, key: &str) -> &'a str {
    object.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The recipe drops one trailing period from descriptions.
fn without_final_period(text: &str) -> &str {
    text.strip_suffix('.').unwrap_or(text)
}

/// Prompt tokens of a chat request's `messages` with the default image cost;
/// the building block for callers that hold only the messages (gpu-sim).
/// Tool definitions are not part of `messages`: see [`PromptCounter::count_chat`].
pub fn count_chat_prompt(encoding: Encoding, messages: &[Value]) -> usize {
    PromptCounter::new(encoding).count_messages(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tiktoken_rs::{ChatCompletionRequestMessage, FunctionCall};

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

    /// tiktoken-rs, the reference implementation of the same encodings.
    fn reference(encoding: Encoding, text: &str) -> usize {
        match encoding {
            Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton().count_ordinary(text),
            Encoding::O200k => tiktoken_rs::o200k_base_singleton().count_ordinary(text),
        }
    }

    /// Pieces of real-world and adversarial text the corpus is assembled from.
    const PIECES: &[&str] = &[
        "The quick brown fox jumps over the lazy dog. ",
        "It's what they'll say; we've seen I'd you're ",
        "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n}\n",
        "def f(x):\n\treturn x ** 2  # square\n",
        "SELECT id, name FROM accounts WHERE tier = 'pro';",
        "日本語のテキストと中文文本，还有 한국어 문장.",
        "Ünïcödé àccents, ﬁ ligatures, e\u{301} combining marks ",
        "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🚀",
        "مرحبا بالعالم עברית ",
        "   ",
        "\n\n",
        "\t",
        " \n \n  ",
        "\r\n",
        "\u{a0}\u{2003}",
        "1234567890 3.14159 1e10 -42 ",
        "https://example.com/path?q=1&r=2#frag ",
        "<|endoftext|> <|im_start|>user ",
        "!!!??? ... --- *** ",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "{\"model\": \"gpt-4o\", \"messages\": []}",
    ];

    /// A deterministic pseudo-random text of `pieces` pieces.
    fn corpus_text(seed: u64, pieces: usize) -> String {
        let mut state = seed;
        (0..pieces)
            .map(|_| {
                // SplitMix64 step.
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                PIECES[((z ^ (z >> 31)) % PIECES.len() as u64) as usize]
            })
            .collect()
    }

    #[test]
    fn counts_equal_tiktoken_on_a_mixed_corpus() {
        let mut texts: Vec<String> = PIECES.iter().map(|p| (*p).to_owned()).collect();
        texts.extend((0..400).map(|seed| corpus_text(seed, 1 + (seed as usize % 40))));
        // Long inputs: whitespace runs and repetition stress the pre-tokenizer.
        texts.push(corpus_text(9_999, 5_000));
        texts.push(" ".repeat(10_000));
        texts.push("a".repeat(50_000));
        texts.push(String::new());
        for text in &texts {
            for encoding in [Encoding::Cl100k, Encoding::O200k] {
                assert_eq!(
                    encoding.count(text),
                    reference(encoding, text),
                    "{encoding}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn chat_prompt_follows_openai_recipe() {
        // 3 framing tokens per message + role/content/name tokens (+1 for a
        // name) + 3 reply-priming tokens; the image part costs its flat 85.
        let messages = [
            json!({"role": "system", "content": "You are a helpful assistant."}),
            json!({"role": "user", "name": "example_user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}),
        ];
        let e = Encoding::Cl100k;
        let expected = 3
            + (3 + e.count("system") + e.count("You are a helpful assistant."))
            + (3 + e.count("user") + e.count("Hi") + 85 + e.count("example_user") + 1);
        assert_eq!(count_chat_prompt(e, &messages), expected);
    }

    #[test]
    fn encoding_map_prefers_override_then_family_then_default() {
        let overrides = HashMap::from([
            ("gpt-4o".to_owned(), Encoding::Cl100k),
            ("my-llama".to_owned(), Encoding::O200k),
        ]);
        let map = EncodingMap::new(Encoding::Cl100k, overrides);
        // An override beats the family tiktoken would pick.
        assert_eq!(map.for_model("gpt-4o"), Encoding::Cl100k);
        assert_eq!(map.for_model("my-llama"), Encoding::O200k);
        // Overrides are exact: a dated or prefixed name falls through to its family.
        assert_eq!(map.for_model("gpt-4o-2024-11-20"), Encoding::O200k);
        assert_eq!(map.for_model("openai/gpt-4o"), Encoding::O200k);
        assert_eq!(map.for_model("openai/gpt-4o-mini"), Encoding::O200k);
        assert_eq!(map.for_model("azure/gpt-35-turbo"), Encoding::Cl100k);
        assert_eq!(map.for_model("openai/gpt-oss-120b"), Encoding::O200k);
        assert_eq!(map.for_model("o3-mini"), Encoding::O200k);
        assert_eq!(
            map.for_model("ft:gpt-4o-mini:acme::abc123"),
            Encoding::O200k
        );
        // Unknown families, and families we do not count with, take the default.
        assert_eq!(
            map.for_model("meta-llama/Llama-3.1-8B-Instruct"),
            Encoding::Cl100k
        );
        assert_eq!(map.for_model("text-davinci-003"), Encoding::Cl100k);
        assert_eq!(map.for_model(""), Encoding::Cl100k);
        assert_eq!(map.for_model("openai/"), Encoding::Cl100k);

        let o200k_default = EncodingMap::new(Encoding::O200k, HashMap::new());
        assert_eq!(o200k_default.for_model("mistral-large"), Encoding::O200k);
        assert_eq!(o200k_default.for_model("gpt-4-0613"), Encoding::Cl100k);
        assert_eq!(o200k_default.default_encoding(), Encoding::O200k);
    }

    /// A JSON chat message as tiktoken-rs's message type, for the differential tests.
    fn reference_message(message: &Value) -> ChatCompletionRequestMessage {
        let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let call = |f: &Value| FunctionCall {
            name: text(f, "name").unwrap_or_default(),
            arguments: text(f, "arguments").unwrap_or_default(),
        };
        ChatCompletionRequestMessage {
            role: text(message, "role").unwrap_or_default(),
            content: text(message, "content"),
            name: text(message, "name"),
            function_call: message.get("function_call").map(call),
            tool_calls: message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("function"))
                .map(call)
                .collect(),
            refusal: text(message, "refusal"),
        }
    }

    /// tiktoken-rs adds one token per tool or function call on top of its
    /// name and arguments, which it calls a heuristic; we count the text
    /// only, so the reference is compared minus that token.
    fn reference_chat_count(model: &str, messages: &[Value]) -> Option<usize> {
        let reference: Vec<_> = messages.iter().map(reference_message).collect();
        let calls: usize = reference
            .iter()
            .map(|m| m.tool_calls.len() + usize::from(m.function_call.is_some()))
            .sum();
        tiktoken_rs::num_tokens_from_messages(model, &reference)
            .ok()
            .map(|n| n - calls)
    }

    /// OpenAI cookbook's example conversation, whose `prompt_tokens` the
    /// notebook checked against the API: 129 on gpt-4/gpt-3.5-turbo, 124 on gpt-4o.
    fn cookbook_messages() -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."}),
            json!({"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."}),
            json!({"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."}),
            json!({"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."}),
            json!({"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."}),
            json!({"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}),
        ]
    }

    #[test]
    fn cookbook_conversation_matches_the_api_figures() {
        let messages = cookbook_messages();
        assert_eq!(count_chat_prompt(Encoding::Cl100k, &messages), 129);
        assert_eq!(count_chat_prompt(Encoding::O200k, &messages), 124);
    }

    #[test]
    fn chat_counts_equal_tiktoken_num_tokens_from_messages() {
        let mut conversations = vec![
            cookbook_messages(),
            vec![],
            vec![json!({"role": "user", "content": ""})],
            vec![
                json!({"role": "developer", "content": "Answer in French."}),
                json!({"role": "user", "name": "alice", "content": "Bonjour ! Ça va ? 日本語も少し。"}),
                json!({"role": "assistant", "name": "bot_2", "content": "Très bien 👍🏽"}),
            ],
            vec![
                json!({"role": "user", "content": "Weather in Paris and Tokyo?"}),
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"東京\", \"unit\": \"celsius\"}"}}
                ]}),
                json!({"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"}),
                json!({"role": "tool", "tool_call_id": "call_2", "content": "24°C, sunny"}),
            ],
            vec![
                json!({"role": "user", "content": "What is 2+2?"}),
                json!({"role": "assistant", "function_call": {"name": "calculator", "arguments": "{\"expression\":\"2+2\"}"}}),
                json!({"role": "function", "name": "calculator", "content": "4"}),
            ],
            vec![
                json!({"role": "user", "content": "Help me with something harmful."}),
                json!({"role": "assistant", "refusal": "I can't help with that."}),
            ],
        ];
        // Generated conversations from the mixed corpus, with and without
        // names. The reference counts special-token text as one special
        // token, which we deliberately do not, so that piece is left out.
        for seed in 0..60_u64 {
            let conversation = (0..1 + seed % 5)
                .map(|i| {
                    let content: String = corpus_text(seed * 31 + i, 1 + (seed as usize % 25))
                        .replace("<|endoftext|>", "")
                        .replace("<|im_start|>", "");
                    let role = ["system", "user", "assistant"][(i % 3) as usize];
                    if (seed + i) % 3 == 0 {
                        json!({"role": role, "name": format!("speaker_{i}"), "content": content})
                    } else {
                        json!({"role": role, "content": content})
                    }
                })
                .collect();
            conversations.push(conversation);
        }
        for model in ["gpt-4o", "gpt-4o-mini", "gpt-4", "gpt-3.5-turbo", "gpt-4.1"] {
            let counter = PromptCounter::new(
                EncodingMap::new(Encoding::Cl100k, HashMap::new()).for_model(model),
            );
            for messages in &conversations {
                assert_eq!(
                    Some(counter.count_messages(messages)),
                    reference_chat_count(model, messages),
                    "{model}: {messages:?}"
                );
            }
        }
    }

    /// OpenAI cookbook's tools example, checked there against the API.
    fn cookbook_tools_request() -> Value {
        json!({
            "messages": [
                {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
                {"role": "user", "content": "What's the weather like in San Francisco?"}
            ],
            "tools": [{
                "type": "function",
                "function": {
                    "name": "get_current_weather",
                    "description": "Get the current weather in a given location",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                            "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
                        },
                        "required": ["location"]
                    }
                }
            }]
        })
    }

    #[test]
    fn tools_follow_the_cookbook_recipe() {
        let body = cookbook_tools_request();
        // o200k (gpt-4o, gpt-4o-mini), by hand from the recipe:
        //   messages: 3 priming + (3 + "system" 1 + content 14) + (3 + "user" 1 + content 8) = 33
        //   tools:    func_init 7 + "get_current_weather:Get the current weather in a given location" 11
        //           + prop_init 3
        //           + location: prop_key 3 + "location:string:The city and state, e.g. San Francisco, CA" 14
        //           + unit:     prop_key 3 + enum_init -3 + (3 + "celsius" 2) + (3 + "fahrenheit" 2)
        //                       + "unit:string:The unit of temperature to return" 8
        //           + func_end 12                                                             = 68
        //   total 101: the figure the cookbook got back from the API for gpt-4o and gpt-4o-mini.
        let o200k = PromptCounter::new(Encoding::O200k);
        assert_eq!(o200k.count_messages(&cookbook_messages_of(&body)), 33);
        assert_eq!(o200k.count_tools(&body), 68);
        assert_eq!(o200k.count_chat(&body), 101);
        // cl100k (gpt-4, gpt-3.5-turbo): func_init 10, and the user message is
        // 9 tokens instead of 8; the rest tokenizes the same.
        //   messages 34 + tools 71 = 105: the API's figure for gpt-4 and gpt-3.5-turbo.
        // (func_init 7 here would give 102: the start cost differs by family.)
        let cl100k = PromptCounter::new(Encoding::Cl100k);
        assert_eq!(cl100k.count_messages(&cookbook_messages_of(&body)), 34);
        assert_eq!(cl100k.count_tools(&body), 71);
        assert_eq!(cl100k.count_chat(&body), 105);
    }

    fn cookbook_messages_of(body: &Value) -> Vec<Value> {
        body.get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn legacy_functions_count_like_tools() {
        let tools = cookbook_tools_request();
        let function = tools["tools"][0]["function"].clone();
        let legacy = json!({"messages": tools["messages"].clone(), "functions": [function]});
        let counter = PromptCounter::new(Encoding::O200k);
        assert_eq!(counter.count_chat(&legacy), counter.count_chat(&tools));
    }

    #[test]
    fn tools_without_parameters_or_of_other_types() {
        let e = Encoding::O200k;
        let counter = PromptCounter::new(e);
        // No properties: func_init + "ping:Ping" (the period dropped) +
        // func_end. A built-in tool, and a function tool with no definition,
        // describe no function and count nothing.
        let body = json!({"tools": [
            {"type": "function", "function": {"name": "ping", "description": "Ping."}},
            {"type": "web_search_preview"},
            {"type": "function"}
        ]});
        assert_eq!(counter.count_tools(&body), 7 + e.count("ping:Ping") + 12);
        // A definition without name or description still costs its frame.
        let body = json!({"functions": [{}]});
        assert_eq!(counter.count_tools(&body), 7 + e.count(":") + 12);
        // Non-string type and enum items count as their JSON text. The
        // property's prop_key 3 and enum_init -3 cancel out.
        let body = json!({"tools": [{"type": "function", "function": {
            "name": "f",
            "parameters": {"properties": {"n": {"type": ["integer", "null"], "enum": [1, 2]}}}
        }}]});
        let property =
            (3 + e.count("1")) + (3 + e.count("2")) + e.count("n:[\"integer\",\"null\"]:");
        assert_eq!(
            counter.count_tools(&body),
            7 + e.count("f:") + 3 + property + 12
        );
        assert_eq!(counter.count_tools(&json!({"tools": []})), 0);
        assert_eq!(counter.count_tools(&json!({"tools": "nope"})), 0);
    }

    #[test]
    fn assistant_calls_and_refusals_count_their_text() {
        let e = Encoding::O200k;
        let counter = PromptCounter::new(e);
        let messages = [json!({
            "role": "assistant",
            "content": [{"type": "refusal", "refusal": "No."}],
            "refusal": "I won't.",
            "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"x\"}"}}],
            "function_call": {"name": "legacy", "arguments": "{}"}
        })];
        let expected = 3
            + 3
            + e.count("assistant")
            + e.count("No.")
            + e.count("I won't.")
            + e.count("lookup")
            + e.count("{\"q\":\"x\"}")
            + e.count("legacy")
            + e.count("{}");
        assert_eq!(counter.count_messages(&messages), expected);
    }

    #[test]
    fn image_parts_cost_the_configured_flat_price() {
        let e = Encoding::O200k;
        let messages = [json!({"role": "user", "content": [
            {"type": "text", "text": "Compare these."},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        ]})];
        let text = 3 + 3 + e.count("user") + e.count("Compare these.");
        assert_eq!(
            PromptCounter::new(e).count_messages(&messages),
            text + 2 * 85
        );
        let high = PromptCounter {
            encoding: e,
            image_tokens: 765,
        };
        assert_eq!(high.count_messages(&messages), text + 2 * 765);
    }

    #[test]
    fn special_token_text_is_ordinary_text() {
        // A user cannot smuggle in `<|endoftext|>` as one token.
        let counter = PromptCounter::new(Encoding::Cl100k);
        assert_eq!(
            counter.count_text("<|endoftext|>"),
            reference(Encoding::Cl100k, "<|endoftext|>")
        );
        assert!(counter.count_text("<|endoftext|>") > 1);
    }

    #[test]
    fn completion_prompt_shapes() {
        let e = Encoding::Cl100k;
        let counter = PromptCounter::new(e);
        let hello = e.count("Hello, world");
        assert_eq!(
            counter.count_completion_prompt(&json!("Hello, world")),
            hello
        );
        assert_eq!(
            counter.count_completion_prompt(&json!(["Hello, world", "Bye"])),
            hello + e.count("Bye")
        );
        assert_eq!(counter.count_completion_prompt(&json!([9906, 11, 1917])), 3);
        assert_eq!(
            counter.count_completion_prompt(&json!([[9906, 11], [1917], []])),
            3
        );
        assert_eq!(counter.count_completion_prompt(&json!("")), 0);
        assert_eq!(counter.count_completion_prompt(&json!([])), 0);
    }

    #[test]
    fn embedding_input_shapes() {
        let e = Encoding::O200k;
        let counter = PromptCounter::new(e);
        assert_eq!(
            counter.count_embedding_input(&json!("café")),
            e.count("café")
        );
        assert_eq!(
            counter.count_embedding_input(&json!(["a b", "日本"])),
            e.count("a b") + e.count("日本")
        );
        assert_eq!(counter.count_embedding_input(&json!([1, 2, 3, 4])), 4);
        assert_eq!(counter.count_embedding_input(&json!([[1, 2], [3]])), 3);
    }

    #[test]
    fn malformed_bodies_count_what_they_can() {
        let e = Encoding::O200k;
        let counter = PromptCounter::new(e);
        for bad in [json!(null), json!(7), json!({"prompt": "x"}), json!(true)] {
            assert_eq!(counter.count_completion_prompt(&bad), 0);
            assert_eq!(counter.count_embedding_input(&bad), 0);
        }
        // Mixed arrays: strings and token ids count, the rest is skipped.
        assert_eq!(
            counter.count_completion_prompt(&json!(["hi", 5, null, {"a": 1}, [1, "x", 2]])),
            e.count("hi") + 1 + 2
        );
        // Chat bodies of the wrong shape: still no panic, still a count.
        assert_eq!(counter.count_chat(&json!(null)), 3);
        assert_eq!(counter.count_chat(&json!({"messages": "hi"})), 3);
        assert_eq!(
            counter.count_chat(&json!({"messages": [7, {"role": 1, "content": {"x": 1}}, {"content": [null, "loose", {"type": "text"}]}]})),
            3 + 3 + 3 + 3 + e.count("loose")
        );
        assert_eq!(
            counter.count_chat(&json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}, "x"], "function_call": "y"}]})),
            3 + 3 + e.count("assistant")
        );
    }

    #[test]
    fn encoding_names_round_trip() {
        for e in [Encoding::Cl100k, Encoding::O200k] {
            assert_eq!(e.name().parse::<Encoding>().ok(), Some(e));
        }
        assert!("p50k_base".parse::<Encoding>().is_err());
    }

    /// Config reads an encoding by exactly the names `FromStr` takes.
    #[test]
    fn config_spells_encodings_as_from_str_does() {
        for name in [
            "cl100k_base",
            "cl100k",
            "o200k_base",
            "o200k",
            "p50k_base",
            "CL100K",
        ] {
            let from_config = serde_json::from_value::<Encoding>(json!(name)).ok();
            assert_eq!(from_config, name.parse::<Encoding>().ok(), "{name}");
        }
    }
}
