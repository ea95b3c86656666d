//! Deterministic text generation.
//!
//! The simulator's output is a function of the seed and the request alone, so
//! every test and benchmark sees the same text for the same request. Text is
//! built from words that are each exactly one token in both cl100k and o200k
//! (with or without a leading space), so a completion of `n` words is exactly
//! `n` tokens and `max_tokens` is honoured to the token.

/// Words that encode to a single token in cl100k_base and o200k_base, alone
/// and after a space (checked by a test).
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
    "exactly",
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
const MAX_NATURAL_TOKENS: u64 = 128;

pub use crate::protocol::FinishReason;

/// The planned answer to one request: its tokens, in order.
#[derive(Debug, Clone)]
pub struct Completion {
    key: u64,
    len: usize,
    pub finish_reason: FinishReason,
}

impl Completion {
    /// Plans the answer for a request identified by `key` (a stable hash of
    /// seed, model and prompt). `fixed_len` overrides the natural length;
    /// `max_tokens` caps it.
    pub fn plan(key: u64, fixed_len: Option<u32>, max_tokens: Option<u32>) -> Self {
        let natural = match fixed_len {
            Some(n) => u64::from(n),
            None => MIN_NATURAL_TOKENS + mix(key) % (MAX_NATURAL_TOKENS - MIN_NATURAL_TOKENS + 1),
        };
        let (len, finish_reason) = match max_tokens.map(u64::from) {
            Some(cap) if cap < natural => (cap, FinishReason::Length),
            _ => (natural, FinishReason::Stop),
        };
        Self {
            key,
            len: usize::try_from(len).unwrap_or(usize::MAX),
            finish_reason,
        }
    }

    /// Number of tokens in the answer: exact, since every word is one token
    /// in every encoding the simulator counts with (see the tests below).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th token's text, with its leading space after the first.
    pub fn piece(&self, i: usize) -> String {
        let mut piece = String::new();
        self.write_piece(i, &mut piece);
        piece
    }

    /// The whole answer text.
    pub fn text(&self) -> String {
        // Words average under 8 bytes with their space.
        let mut text = String::with_capacity(self.len * 8);
        for i in 0..self.len {
            self.write_piece(i, &mut text);
        }
        text
    }

    fn write_piece(&self, i: usize, out: &mut String) {
        let word = WORDS[(mix(self.key ^ i as u64) % WORDS.len() as u64) as usize];
        if i == 0 {
            out.push_str(&capitalize(word));
        } else {
            out.push(' ');
            out.push_str(word);
        }
    }
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
    fn max_tokens_caps_and_reports_length() {
        let completion = Completion::plan(7, Some(50), Some(5));
        assert_eq!(completion.len(), 5);
        assert_eq!(completion.finish_reason, FinishReason::Length);
        let completion = Completion::plan(7, Some(5), Some(50));
        assert_eq!(completion.len(), 5);
        assert_eq!(completion.finish_reason, FinishReason::Stop);
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
    fn unit_interval_stays_in_range() {
        for x in 0..10_000 {
            let u = unit_interval(x);
            assert!((0.0..1.0).contains(&u));
        }
    }
}
