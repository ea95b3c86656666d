//! Candidates for exact tiktoken token counting, compared with `bpe-openai`.
//!
//! Each candidate is a `Fn(&str) -> usize` that counts `text` as *ordinary*
//! text (special-token strings count as the characters they are), the way
//! Tollgate's `Encoding::count` does. Candidates that can only encode count
//! `encode(..).len()`.
//!
//! Vocabularies for the crates that take a `.tiktoken` file (kitoken,
//! riptoken) or a Hugging Face `tokenizer.json` (tokie) are rebuilt from
//! `bpe-openai`'s embedded tables and cross-checked against `tiktoken-rs`, so
//! nothing is read from disk or the network.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    Cl100k,
    O200k,
}

pub const ENCODINGS: [Enc; 2] = [Enc::Cl100k, Enc::O200k];

impl Enc {
    pub fn name(self) -> &'static str {
        match self {
            Enc::Cl100k => "cl100k_base",
            Enc::O200k => "o200k_base",
        }
    }

    fn bpe_openai(self) -> &'static bpe_openai::Tokenizer {
        match self {
            Enc::Cl100k => bpe_openai::cl100k_base(),
            Enc::O200k => bpe_openai::o200k_base(),
        }
    }

    fn tiktoken_rs(self) -> &'static tiktoken_rs::CoreBPE {
        match self {
            Enc::Cl100k => tiktoken_rs::cl100k_base_singleton(),
            Enc::O200k => tiktoken_rs::o200k_base_singleton(),
        }
    }

    /// tiktoken's split pattern, byte for byte as `tiktoken-rs` 0.12 (and
    /// OpenAI's `tiktoken_ext/openai_public.py`) spell it.
    fn pattern(self) -> &'static str {
        match self {
            Enc::Cl100k => {
                "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s"
            }
            Enc::O200k => concat!(
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|\p{N}{1,3}",
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
                r"|\s*[\r\n]+",
                r"|\s+(?!\S)|\s+",
            ),
        }
    }

    fn specials(self) -> Vec<(String, u32)> {
        let list: &[(&str, u32)] = match self {
            Enc::Cl100k => &[
                ("<|endoftext|>", 100257),
                ("<|fim_prefix|>", 100258),
                ("<|fim_middle|>", 100259),
                ("<|fim_suffix|>", 100260),
                ("<|endofprompt|>", 100276),
            ],
            Enc::O200k => &[("<|endoftext|>", 199999), ("<|endofprompt|>", 200018)],
        };
        list.iter().map(|(s, r)| (s.to_string(), *r)).collect()
    }

    /// The ordinary vocabulary, index = rank, from `bpe-openai`'s tables;
    /// every entry is checked against `tiktoken-rs`'s decoder.
    pub fn vocab(self) -> Vec<Vec<u8>> {
        let bpe = &self.bpe_openai().bpe;
        let reference = self.tiktoken_rs();
        (0..bpe.num_tokens() as u32)
            .map(|rank| {
                let bytes = bpe.token_bytes(rank).to_vec();
                let theirs = reference.decode_bytes(&[rank]).expect("rank known to tiktoken-rs");
                assert_eq!(bytes, theirs, "{}: rank {rank} differs", self.name());
                bytes
            })
            .collect()
    }
}

/// One counter under test.
pub struct Candidate {
    pub name: &'static str,
    /// How it counts, for the report.
    pub how: &'static str,
    pub count: Box<dyn Fn(&str) -> usize + Send + Sync>,
}

/// Every candidate for `enc`, the baseline first and the reference second.
/// Construction (table building) happens here, outside any timing.
pub fn candidates(enc: Enc) -> Vec<Candidate> {
    let vocab = enc.vocab();
    let mut out = Vec::new();

    let bpe = enc.bpe_openai();
    out.push(Candidate {
        name: "bpe-openai 0.3.2",
        how: "Tokenizer::count",
        count: Box::new(move |t| bpe.count(t)),
    });

    let tt = enc.tiktoken_rs();
    out.push(Candidate {
        name: "tiktoken-rs 0.12.1",
        how: "encode_ordinary().len()",
        count: Box::new(move |t| tt.encode_ordinary(t).len()),
    });

    let golia = tiktoken::get_encoding(enc.name()).expect("encoding compiled in");
    out.push(Candidate {
        name: "tiktoken 4.1.2",
        how: "CoreBpe::count",
        count: Box::new(move |t| golia.count(t)),
    });

    let rip = riptoken_for(enc, &vocab);
    out.push(Candidate {
        name: "riptoken 0.3.0",
        how: "encode_ordinary().len()",
        count: Box::new(move |t| rip.encode_ordinary(t).len()),
    });

    let kit = kitoken_for(&vocab);
    out.push(Candidate {
        name: "kitoken 0.11.1",
        how: "encode(_, false).len()",
        count: Box::new(move |t| kit.encode(t, false).map_or(usize::MAX, |v| v.len())),
    });

    match tokie_for(enc, &vocab) {
        Ok(tok) => out.push(Candidate {
            name: "tokie 0.1.4",
            how: "count_tokens (encode().len())",
            count: Box::new(move |t| tok.count_tokens(t)),
        }),
        Err(e) => eprintln!("tokie {}: could not load: {e}", enc.name()),
    }
    out
}

fn riptoken_for(enc: Enc, vocab: &[Vec<u8>]) -> riptoken::CoreBPE {
    let encoder: rustc_hash::FxHashMap<Vec<u8>, u32> =
        vocab.iter().enumerate().map(|(r, b)| (b.clone(), r as u32)).collect();
    let specials: rustc_hash::FxHashMap<String, u32> = enc.specials().into_iter().collect();
    riptoken::CoreBPE::new(encoder, specials, enc.pattern()).expect("riptoken builds")
}

/// A `.tiktoken` file: `base64(token) rank` per line.
pub fn tiktoken_file(vocab: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for (rank, bytes) in vocab.iter().enumerate() {
        s.push_str(&B64.encode(bytes));
        s.push(' ');
        s.push_str(&rank.to_string());
        s.push('\n');
    }
    s
}

fn kitoken_for(vocab: &[Vec<u8>]) -> kitoken::Kitoken {
    kitoken::Kitoken::from_tiktoken_slice(tiktoken_file(vocab).as_bytes()).expect("kitoken builds")
}

/// GPT-2's byte → printable-char map, as Hugging Face byte-level BPE uses.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    map
}

/// A Hugging Face `tokenizer.json` equivalent to the tiktoken vocabulary:
/// byte-level vocab plus the merge list, recovered the way tiktoken's own
/// `educational` converter does (BPE of each token over lower ranks only).
pub fn hf_tokenizer_json(enc: Enc, vocab: &[Vec<u8>]) -> String {
    let map = bytes_to_unicode();
    let show = |b: &[u8]| b.iter().map(|&x| map[x as usize]).collect::<String>();
    let ranks: HashMap<&[u8], u32> = vocab.iter().enumerate().map(|(r, b)| (b.as_slice(), r as u32)).collect();
    let mut merges = Vec::new();
    for (rank, token) in vocab.iter().enumerate() {
        if token.len() < 2 {
            continue;
        }
        let mut parts: Vec<&[u8]> = (0..token.len()).map(|i| &token[i..i + 1]).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..parts.len() - 1 {
                let joined = &token[offset(token, parts[i])..offset(token, parts[i + 1]) + parts[i + 1].len()];
                if let Some(&r) = ranks.get(joined) {
                    if (r as usize) < rank && best.is_none_or(|(b, _)| r < b) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let start = offset(token, parts[i]);
            let end = offset(token, parts[i + 1]) + parts[i + 1].len();
            parts[i] = &token[start..end];
            parts.remove(i + 1);
        }
        assert_eq!(parts.len(), 2, "{}: rank {rank} does not split in two", enc.name());
        merges.push(serde_json::Value::String(format!("{} {}", show(parts[0]), show(parts[1]))));
    }
    let vocab_json: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(r, b)| (show(b), serde_json::Value::from(r))).collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc.pattern()}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_json, "merges": merges}
    })
    .to_string()
}

fn offset(whole: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

fn tokie_for(enc: Enc, vocab: &[Vec<u8>]) -> Result<tokie::Tokenizer, String> {
    let json = hf_tokenizer_json(enc, vocab);
    let pretok = match enc {
        Enc::Cl100k => tokie::PretokType::Cl100k,
        Enc::O200k => tokie::PretokType::O200k,
    };
    tokie::hf::from_json_str_with_pretokenizer(&json, pretok).map_err(|e| format!("{e:?}"))
}

// ---------------------------------------------------------------------------
// Corpora. The mixed generator follows Tollgate's metering/benches/tokens.rs.

const PROSE: &[&str] = &[
    "The gateway sits between clients and the model servers. Every request is authenticated, \
     checked against the account's limits, and forwarded to a healthy backend; on the way back \
     the response is metered so that the bill matches what was actually served. None of this \
     should be visible to the client, except when a limit is reached and the answer is a clear \
     error instead of a timeout.\n\n",
    "In the spring of that year the river rose higher than anyone in the village could remember. \
     The mill wheel, which had turned for three generations, was torn from its axle and carried a \
     mile downstream, where it lodged against the old stone bridge. People came from the farms \
     around to look at it, and for a week nobody talked of anything else.\n\n",
    "Q: What is the difference between latency and throughput?\nA: Latency is how long one \
     request takes from start to finish; throughput is how many requests complete per second. \
     A system can have excellent throughput and poor latency (think of a cargo ship), or the \
     reverse. Queueing theory ties them together: as utilisation approaches one, waiting time \
     grows without bound.\n\n",
    "Please summarise the following meeting notes in three bullet points, keeping the names of \
     the owners and the dates. Notes: Maria will send the revised contract by Friday, 14 June. \
     The migration to the new database is postponed until the load tests pass; Tom owns the \
     load tests. Budget for Q3 was approved at $42,500, which is 8% below the request.\n\n",
    "It's not that we didn't try; we'd tested it twice, and they'll tell you the same. \
     \"Honestly,\" she said, \"I've never seen a bug like it — it only shows up on Tuesdays.\" \
     (It turned out to be a cron job.) Lessons learned: log everything, trust nothing, and \
     don't deploy on a Friday afternoon.\n\n",
];

const RUST_CODE: &[&str] = &[
    "/// Picks the least-loaded healthy backend.\npub fn pick(backends: &[Backend]) -> \
     Option<&Backend> {\n    backends\n        .iter()\n        .filter(|b| b.healthy())\n        \
     .min_by_key(|b| b.in_flight.load(Ordering::Relaxed))\n}\n\n",
    "impl fmt::Display for Error {\n    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result \
     {\n        match self {\n            Self::Io(e) => write!(f, \"i/o error: {e}\"),\n            \
     Self::Parse { line, col } => write!(f, \"parse error at {line}:{col}\"),\n        }\n    \
     }\n}\n\n",
    "#[tokio::main]\nasync fn main() -> anyhow::Result<()> {\n    let listener = \
     TcpListener::bind(\"127.0.0.1:8080\").await?;\n    loop {\n        let (socket, addr) = \
     listener.accept().await?;\n        tokio::spawn(async move { serve(socket, addr).await });\n    \
     }\n}\n\n",
];

const PYTHON_CODE: &[&str] = &[
    "def fibonacci(n: int) -> list[int]:\n    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n    \
     seq = [0, 1]\n    while len(seq) < n:\n        seq.append(seq[-1] + seq[-2])\n    return \
     seq[:n]\n\n\nif __name__ == \"__main__\":\n    print(fibonacci(10))\n\n",
    "import json\nfrom pathlib import Path\n\nclass Config:\n    def __init__(self, path: Path):\n        \
     with path.open() as f:\n            self.data = json.load(f)\n\n    def get(self, key, \
     default=None):\n        return self.data.get(key, default)  # TODO: nested keys\n\n",
];

const CJK: &[&str] = &[
    "人工智能正在改变我们的工作方式。大型语言模型可以回答问题、翻译文本、编写代码，\
     但它们也会犯错，因此在关键场景中仍需要人工审核。\n\n",
    "東京の天気は晴れのち曇り、最高気温は二十四度の予想です。午後からは風が強くなる見込みなので、\
     洗濯物は早めに取り込んでください。\n\n",
    "오늘 회의는 오후 세 시에 시작합니다. 발표 자료는 미리 공유해 주시고, 질문이 있으면 \
     채팅으로 남겨 주세요.\n\n",
];

const EMOJI: &[&str] = &[
    "Shipped it! 🚀🎉 Thanks team 🙏 👩‍💻👨‍💻 — next stop: prod 🟢\n",
    "Weather: ☀️ → ⛅ → 🌧️ ; mood: 😅 then 😴 👍🏽 🏳️‍🌈 👨‍👩‍👧‍👦\n",
];

/// Every fixed piece the generators use, for piece-by-piece checks.
pub fn all_pieces() -> impl Iterator<Item = &'static str> {
    PROSE.iter().chain(RUST_CODE).chain(PYTHON_CODE).chain(CJK).chain(EMOJI).copied()
}

/// SplitMix64: a tiny deterministic generator.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, pieces: &[&'a str]) -> &'a str {
        pieces[self.below(pieces.len())]
    }
}

fn push_piece(rng: &mut SplitMix, out: &mut String) {
    match rng.next() % 100 {
        0..45 => out.push_str(rng.pick(PROSE)),
        45..60 => out.push_str(rng.pick(RUST_CODE)),
        60..75 => out.push_str(rng.pick(PYTHON_CODE)),
        75..87 => out.push_str(rng.pick(CJK)),
        87..93 => out.push_str(rng.pick(EMOJI)),
        _ => {
            let spaces = 1 + rng.below(48);
            let blank_lines = rng.below(4);
            out.push_str(&"\n".repeat(blank_lines));
            out.push_str(&" ".repeat(spaces));
            out.push_str("\t\tindented;   trailing   \n");
        }
    }
}

/// The ~1 MiB mixed corpus of Tollgate's `benches/tokens.rs` (same seed and
/// generator, so the same bytes).
pub fn mixed_corpus(bytes: usize) -> String {
    let mut rng = SplitMix(1);
    let mut out = String::with_capacity(bytes + 1024);
    while out.len() < bytes {
        push_piece(&mut rng, &mut out);
    }
    out
}

/// A ~100 KiB chat transcript as plain text: a system prompt, then
/// alternating user/assistant turns of 300 B–1.5 KiB of mixed text, with
/// role markers written as ordinary text (including a special-token string,
/// which must count as its characters).
pub fn chat_text(bytes: usize) -> String {
    let mut rng = SplitMix(7);
    let mut out = String::from(
        "system: You are a careful assistant. Answer briefly and cite the notes you used.\n<|endoftext|>\n",
    );
    let mut turn = 0;
    while out.len() < bytes {
        out.push_str(if turn % 2 == 0 { "user: " } else { "assistant: " });
        let target = out.len() + 300 + rng.below(1200);
        while out.len() < target.min(bytes) {
            push_piece(&mut rng, &mut out);
        }
        out.push('\n');
        turn += 1;
    }
    out
}

/// A ~1 MiB corpus with little repetition, so memoising counters (whole-piece
/// caches) cannot serve most pieces from a cache: pseudo-words from random
/// syllables, identifiers, numbers, random CJK/Hangul, accented Latin,
/// emoji, punctuation and whitespace runs.
pub fn low_repetition_corpus(bytes: usize) -> String {
    const SYL: &[&str] = &[
        "ka", "lo", "mir", "ten", "sa", "vor", "qu", "ish", "ble", "tr", "ön", "ez", "ya", "dru", "pha", "nc", "ght",
        "ré", "ss", "ü", "ow", "x", "zel", "im", "ar", "th", "ing", "un", "co", "ple",
    ];
    const PUNCT: &[&str] = &[". ", ", ", "; ", ": ", "? ", "! ", " (", ") ", " \"", "\" ", " - ", "->", "::", "{}", "[]", " = ", "//", "'s ", "'ll ", "'RE "];
    let mut rng = SplitMix(42);
    let mut out = String::with_capacity(bytes + 64);
    while out.len() < bytes {
        match rng.below(100) {
            0..50 => {
                if rng.below(4) == 0 {
                    out.push(' ');
                }
                if rng.below(6) == 0 {
                    out.push_str(&"ABCDEFGHIJKLMNOPQRSTUVWXYZ"[rng.below(26)..][..1]);
                }
                for _ in 0..1 + rng.below(5) {
                    out.push_str(SYL[rng.below(SYL.len())]);
                }
                if rng.below(3) > 0 {
                    out.push(' ');
                }
            }
            50..58 => {
                out.push_str(&format!("{}", rng.next() % 10u64.pow(1 + rng.below(9) as u32)));
                out.push(' ');
            }
            58..66 => {
                for _ in 0..1 + rng.below(3) {
                    out.push_str(SYL[rng.below(SYL.len())]);
                    out.push('_');
                }
                out.push_str(&format!("{}", rng.below(100)));
                out.push_str(PUNCT[rng.below(PUNCT.len())]);
            }
            66..74 => {
                for _ in 0..1 + rng.below(12) {
                    let c = if rng.below(3) == 0 { 0xac00 + rng.below(11172) } else { 0x4e00 + rng.below(20902) };
                    out.push(char::from_u32(c as u32).unwrap());
                }
                if rng.below(2) == 0 {
                    out.push_str("。");
                }
            }
            74..78 => {
                for _ in 0..1 + rng.below(4) {
                    out.push(char::from_u32(0x1f300 + rng.below(0x300) as u32).unwrap_or('?'));
                }
                out.push(' ');
            }
            78..90 => out.push_str(PUNCT[rng.below(PUNCT.len())]),
            _ => {
                let ws = [" ", "\t", "\n", "\r\n", "  ", "\n\n"];
                for _ in 0..1 + rng.below(6) {
                    out.push_str(ws[rng.below(ws.len())]);
                }
            }
        }
    }
    out
}

/// Hand-picked edge cases for the split patterns.
pub const EDGE_CASES: &[&str] = &[
    "",
    " ",
    "   ",
    "\n",
    "\r\n",
    " \n \n",
    "hello   world",
    "hello world   ",
    "   leading spaces",
    "trailing\n\n\n",
    "I'm you're he's they'LL WE'VE it'D",
    "don't DON'T Don'T",
    "1234567890 12 123 1234",
    "<|endoftext|> <|fim_prefix|><|endofprompt|>",
    "a\u{0}b\u{1}c\u{7f}",
    "naïve café résumé ÀÉÎÕÜ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "👨‍👩‍👧‍👦🏳️‍🌈👍🏽",
    "مرحبا بالعالم",
    "Привет, мир! ПРИВЕТ",
    "नमस्ते दुनिया",
    "CamelCaseIdentifierHTTPServer getHTTPResponseCode",
    "path/to/file.rs:12:34 http://example.com/a/b?c=d",
    "\t\t\tif x:\n\t\t\t\treturn y\n",
    "a\u{300}\u{301}\u{302}b",
    "            \n            x",
    "x    \n    y",
    "!!!???...,,,;;;",
    "\u{3000}全角スペース\u{3000}",
];
