//! Deterministic generation: answer text, tool-call arguments and log
//! probabilities.
//!
//! The simulator's output is a function of the seed and the request alone, so
//! every test and benchmark sees the same text for the same request. Text is
//! built from words that are each exactly one token in both cl100k and o200k
//! (with or without a leading space), so a completion of `n` words is exactly
//! `n` tokens and `max_tokens` is honoured to the token. Tool-call arguments
//! are a small JSON object made of the same words and of JSON punctuation
//! that is one token too, so they are as exact (checked by the tests below,
//! for every prefix, since a limit may cut them anywhere).

/// Words that encode to a single token in cl100k_base and o200k_base, alone
/// (lowercase and capitalised) and after a space (checked by a test). Tool-call
/// arguments use them lowercase after JSON punctuation.
const WORDS: &[&str] = &[
    "the",
    "model",
    "is",
    "running",
    "on",
    "a",
    "virtual",
    "GPU",
    "and",
    "this",
    "answer",
    "was",
    "generated",
    "from",
    "seed",
    "with",
    "tokens",
    "that",
    "are",
    "read",
    "exact",
    "for",
    "every",
    "request",
    "in",
    "order",
    "to",
    "test",
    "gateway",
    "billing",
    "time",
    "fast",
    "data",
    "server",
    "queue",
    "user",
    "work",
    "will",
    "be",
    "done",
    "when",
    "you",
    "can",
    "see",
    "it",
    "here",
    "now",
    "text",
    "more",
    "than",
    "one",
    "line",
    "of",
    "code",
    "we",
    "have",
    "all",
    "good",
    "new",
    "first",
    "last",
    "long",
    "short",
    "value",
];

/// FNV-1a over bytes: a stable hash (std's hasher may change between releases).
pub fn stable_hash(seed: u64, parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET ^ seed;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
        // Separator so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// SplitMix64: one well-mixed 64-bit value per input, for per-token and
/// per-request draws without shared RNG state.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` from `x`.
pub fn unit_interval(x: u64) -> f64 {
    // The top 53 bits fill an f64 mantissa exactly.
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

/// Natural answer lengths when `--output-tokens` is not set: long enough to
/// look like an answer, short enough to keep tests quick.
const MIN_NATURAL_TOKENS: u64 = 16;
pub const MAX_NATURAL_TOKENS: u64 = 128;

/// Salts that keep the draws below independent of each other.
const SEQUENCE_DRAW: u64 = 0x5345_5155_454e_0001;
const PROPERTIES_DRAW: u64 = 0x5052_4f50_5300_0002;
const PROPERTY_NAME_DRAW: u64 = 0x4e41_4d45_0000_0003;
const VALUE_LEN_DRAW: u64 = 0x564c_454e_0000_0004;
const VALUE_WORD_DRAW: u64 = 0x5657_4f52_4400_0005;
const LOGPROB_DRAW: u64 = 0x4c4f_4750_0000_0006;
const ALTERNATIVES_DRAW: u64 = 0x414c_5453_0000_0007;

pub use crate::protocol::FinishReason;

/// The key of sequence `sequence` of an answer whose key is `answer_key`: the
/// `n` choices (and `best_of` candidates) of one prompt differ, as sampled
/// sequences do, and the first is the answer an `n = 1` request gets.
pub fn sequence_key(answer_key: u64, sequence: usize) -> u64 {
    if sequence == 0 {
        answer_key
    } else {
        mix(answer_key ^ SEQUENCE_DRAW.wrapping_mul(sequence as u64))
    }
}

/// What a sequence's tokens spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// An answer in words.
    Text,
    /// The `arguments` JSON of a tool call.
    Arguments,
}

/// One planned sequence: its tokens, in order.
#[derive(Debug, Clone)]
pub struct Completion {
    key: u64,
    len: usize,
    shape: Shape,
    pub finish_reason: FinishReason,
}

impl Completion {
    /// Plans the answer for a sequence identified by `key` (a stable hash of
    /// seed, model and prompt; see [`sequence_key`]). `fixed_len` overrides
    /// the natural length; `max_tokens` caps it.
    pub fn plan(key: u64, fixed_len: Option<u32>, max_tokens: Option<u64>) -> Self {
        let natural = match fixed_len {
            Some(n) => u64::from(n),
            None => MIN_NATURAL_TOKENS + mix(key) % (MAX_NATURAL_TOKENS - MIN_NATURAL_TOKENS + 1),
        };
        Self::capped(key, Shape::Text, natural, max_tokens)
    }

    /// Plans the `arguments` of a tool call: a JSON object of one or two
    /// string properties, cut off at `max_tokens` like any answer.
    pub fn tool_arguments(key: u64, max_tokens: Option<u64>) -> Self {
        let natural = argument_pieces(key).count() as u64;
        Self::capped(key, Shape::Arguments, natural, max_tokens)
    }

    fn capped(key: u64, shape: Shape, natural: u64, max_tokens: Option<u64>) -> Self {
        let (len, finish_reason) = match max_tokens {
            Some(cap) if cap < natural => (cap, FinishReason::Length),
            _ => (natural, FinishReason::Stop),
        };
        Self {
            key,
            len: usize::try_from(len).unwrap_or(usize::MAX),
            shape,
            finish_reason,
        }
    }

    /// Number of tokens in the answer: exact, since every piece is one token
    /// in every encoding the simulator counts with (see the tests below).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th token's text.
    pub fn piece(&self, i: usize) -> String {
        let mut piece = String::new();
        self.write_piece(i, &mut piece);
        piece
    }

    /// The whole text: the answer, or the tool call's `arguments`.
    pub fn text(&self) -> String {
        // Words average under 8 bytes with their space.
        let mut text = String::with_capacity(self.len.saturating_mul(8));
        match self.shape {
            Shape::Text => (0..self.len).for_each(|i| self.write_piece(i, &mut text)),
            Shape::Arguments => argument_pieces(self.key)
                .take(self.len)
                .for_each(|piece| piece.iter().for_each(|part| text.push_str(part))),
        }
        text
    }

    fn write_piece(&self, i: usize, out: &mut String) {
        match self.shape {
            Shape::Text => write_word(word_index(self.key ^ i as u64), i, out),
            Shape::Arguments => {
                if let Some(piece) = argument_pieces(self.key).nth(i) {
                    piece.iter().for_each(|part| out.push_str(part));
                }
            }
        }
    }

    /// The log probabilities of token `i`: the token itself first, then the
    /// `alternatives` next most likely tokens, most likely first.
    ///
    /// The generated token is always the most likely one (as with greedy
    /// sampling), with a probability of 0.35–0.95; each alternative has at
    /// most half the remaining probability of the one before it, so the
    /// probabilities decrease and sum to less than 1. Alternatives are other
    /// words, written as a word at that position would be.
    pub fn ranked_logprobs(&self, i: usize, alternatives: usize) -> Vec<(String, f64)> {
        let chosen = self.chosen_probability(i);
        let mut ranked = Vec::with_capacity(alternatives + 1);
        ranked.push((self.piece(i), chosen.ln()));
        let draw = mix(self.key ^ ALTERNATIVES_DRAW) ^ i as u64;
        let start = word_index(draw);
        let mut remaining = 1.0 - chosen;
        // Each word once, from a position drawn per token; words are distinct,
        // so only the token itself needs skipping.
        for step in 1..=WORDS.len() {
            if ranked.len() > alternatives {
                break;
            }
            let mut text = String::new();
            write_word((start + step) % WORDS.len(), i, &mut text);
            if ranked.first().is_some_and(|(token, _)| *token == text) {
                continue;
            }
            remaining *= 0.25 + 0.25 * unit_interval(draw ^ ((step as u64) << 32));
            ranked.push((text, remaining.ln()));
        }
        ranked
    }

    /// Sum of the log probabilities of the sequence's tokens: how `best_of`
    /// ranks candidates.
    pub fn cumulative_logprob(&self) -> f64 {
        (0..self.len).map(|i| self.chosen_probability(i).ln()).sum()
    }

    fn chosen_probability(&self, i: usize) -> f64 {
        0.35 + 0.6 * unit_interval(mix(self.key ^ LOGPROB_DRAW) ^ i as u64)
    }
}

fn word_index(draw: u64) -> usize {
    (mix(draw) % WORDS.len() as u64) as usize
}

/// Word `index` as token `position` of an answer: capitalised first, with a
/// leading space after.
fn write_word(index: usize, position: usize, out: &mut String) {
    let word = WORDS[index % WORDS.len()];
    if position == 0 {
        out.push_str(&capitalize(word));
    } else {
        out.push(' ');
        out.push_str(word);
    }
}

/// The tokens of the tool-call arguments for `key`, each as its parts:
/// `{"name": "word word", "name": "word"}`. Every piece is one token in both
/// encodings, and the JSON punctuation pieces are split where tiktoken's
/// pre-tokenizer splits them, so any prefix counts as its number of pieces.
fn argument_pieces(key: u64) -> impl Iterator<Item = [&'static str; 2]> {
    let properties = 1 + (mix(key ^ PROPERTIES_DRAW) % 2) as usize;
    let first_name = word_index(key ^ PROPERTY_NAME_DRAW);
    // The second name is another word, so the object has no duplicate key.
    let second_name =
        (first_name + 1 + (mix(key ^ PROPERTY_NAME_DRAW) as usize) % (WORDS.len() - 1))
            % WORDS.len();
    (0..properties)
        .flat_map(move |property| {
            let opening: &'static [&'static str] = if property == 0 {
                &["{\""]
            } else {
                &["\",", " \""]
            };
            let name = WORDS[if property == 0 {
                first_name
            } else {
                second_name
            }];
            let words = 1 + (mix(key ^ VALUE_LEN_DRAW ^ property as u64) % 4) as usize;
            let value_key = mix(key ^ VALUE_WORD_DRAW ^ property as u64);
            opening
                .iter()
                .map(|part| [*part, ""])
                .chain([[name, ""], ["\":", ""], [" \"", ""]])
                .chain((0..words).map(move |w| {
                    let space = if w == 0 { "" } else { " " };
                    [space, WORDS[word_index(value_key ^ w as u64)]]
                }))
        })
        .chain(std::iter::once(["\"}", ""]))
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_metering::tokens::Encoding;

    #[test]
    fn every_word_is_one_token_in_both_encodings() {
        for encoding in [Encoding::Cl100k, Encoding::O200k] {
            for word in WORDS {
                assert_eq!(
                    encoding.count(&format!(" {word}")),
                    1,
                    "{encoding}: {word:?}"
                );
                assert_eq!(encoding.count(&capitalize(word)), 1, "{encoding}: {word:?}");
                assert_eq!(encoding.count(word), 1, "{encoding}: {word:?}");
            }
        }
    }

    #[test]
    fn completion_of_n_words_is_n_tokens() {
        for key in 0..200u64 {
            let completion = Completion::plan(mix(key), None, None);
            for encoding in [Encoding::Cl100k, Encoding::O200k] {
                assert_eq!(encoding.count(&completion.text()), completion.len());
            }
        }
    }

    #[test]
    fn every_prefix_of_tool_arguments_counts_its_pieces() {
        for key in 0..500u64 {
            let whole = Completion::tool_arguments(mix(key), None);
            let json: serde_json::Value = serde_json::from_str(&whole.text()).unwrap();
            assert!(json.as_object().is_some_and(|o| !o.is_empty()), "{json}");
            for len in 1..=whole.len() {
                let cut = Completion::tool_arguments(mix(key), Some(len as u64));
                let text = cut.text();
                assert!(whole.text().starts_with(&text));
                for encoding in [Encoding::Cl100k, Encoding::O200k] {
                    assert_eq!(encoding.count(&text), len, "{encoding}: {text:?}");
                }
            }
        }
    }

    #[test]
    fn pieces_make_the_text() {
        for completion in [
            Completion::plan(9, None, None),
            Completion::tool_arguments(9, None),
        ] {
            let pieces: String = (0..completion.len()).map(|i| completion.piece(i)).collect();
            assert_eq!(pieces, completion.text());
        }
    }

    #[test]
    fn max_tokens_caps_and_reports_length() {
        let completion = Completion::plan(7, Some(50), Some(5));
        assert_eq!(completion.len(), 5);
        assert_eq!(completion.finish_reason, FinishReason::Length);
        let completion = Completion::plan(7, Some(5), Some(50));
        assert_eq!(completion.len(), 5);
        assert_eq!(completion.finish_reason, FinishReason::Stop);
        let arguments = Completion::tool_arguments(7, Some(2));
        assert_eq!(arguments.len(), 2);
        assert_eq!(arguments.finish_reason, FinishReason::Length);
        let cap = Completion::plan(7, Some(5), Some(u64::MAX));
        assert_eq!(cap.len(), 5);
    }

    #[test]
    fn same_key_same_text() {
        assert_eq!(
            Completion::plan(42, None, None).text(),
            Completion::plan(42, None, None).text()
        );
        assert_ne!(
            Completion::plan(42, None, None).text(),
            Completion::plan(43, None, None).text()
        );
    }

    #[test]
    fn sequences_of_one_answer_differ_and_the_first_is_the_answer() {
        assert_eq!(sequence_key(42, 0), 42);
        let texts: Vec<String> = (0..4)
            .map(|s| Completion::plan(sequence_key(42, s), None, None).text())
            .collect();
        for (i, a) in texts.iter().enumerate() {
            for b in &texts[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn logprobs_rank_the_token_first_and_decrease() {
        let completion = Completion::plan(5, Some(30), None);
        for i in 0..completion.len() {
            let ranked = completion.ranked_logprobs(i, 20);
            assert_eq!(ranked.len(), 21);
            assert_eq!(ranked[0].0, completion.piece(i));
            assert!(ranked.windows(2).all(|w| w[0].1 >= w[1].1), "{ranked:?}");
            let total: f64 = ranked.iter().map(|(_, lp)| lp.exp()).sum();
            assert!(total < 1.0, "{total}");
            let mut tokens: Vec<&str> = ranked.iter().map(|(t, _)| t.as_str()).collect();
            tokens.sort_unstable();
            tokens.dedup();
            assert_eq!(tokens.len(), 21, "distinct tokens");
            assert_eq!(completion.ranked_logprobs(i, 20), ranked, "deterministic");
        }
        let chosen: f64 = (0..completion.len())
            .map(|i| completion.ranked_logprobs(i, 0)[0].1)
            .sum();
        assert!((chosen - completion.cumulative_logprob()).abs() < 1e-9);
    }

    #[test]
    fn unit_interval_stays_in_range() {
        for x in 0..10_000 {
            let u = unit_interval(x);
            assert!((0.0..1.0).contains(&u));
        }
    }
}
