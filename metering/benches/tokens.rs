//! Token-counting cost on one core.
//!
//! Two questions, one binary:
//!
//! - `count_1mib/*`: throughput of `bpe-openai` (what Tollgate counts with)
//!   against `tiktoken-rs` (`encode_ordinary(..).len()`, the usual way to
//!   count with it) on the same ~1 MiB corpus, for cl100k and o200k.
//! - `chat_prompt/*`: time to count a whole 2 KiB and 100 KiB chat request
//!   body through `PromptCounter::count_chat`, the figure that decides when
//!   counting should leave a Tokio worker for the blocking pool.
//! - `handoff/spawn_blocking`: what that move costs, a `spawn_blocking`
//!   round trip awaited from a runtime worker.
//!
//! The corpus is generated deterministically here (English prose, Rust and
//! Python code, CJK, emoji, whitespace runs), so the bench needs no files or
//! network and every run counts the same bytes. Criterion's settings are in
//! code and kept short; the whole run takes about a minute.
//!
//! ```sh
//! cargo bench -p tollgate-metering --bench tokens
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use serde_json::{Value, json};
use tiktoken_rs::CoreBPE;
use tollgate_metering::tokens::{Encoding, PromptCounter};

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

/// SplitMix64: a tiny deterministic generator, so every run counts the same text.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick<'a>(&mut self, pieces: &[&'a str]) -> &'a str {
        pieces[(self.next() % pieces.len() as u64) as usize]
    }
}

/// Appends one piece of text: mostly prose, then code, CJK, emoji, and runs
/// of indentation and blank lines as pasted logs and code bring.
fn push_piece(rng: &mut SplitMix, out: &mut String) {
    match rng.next() % 100 {
        0..45 => out.push_str(rng.pick(PROSE)),
        45..60 => out.push_str(rng.pick(RUST_CODE)),
        60..75 => out.push_str(rng.pick(PYTHON_CODE)),
        75..87 => out.push_str(rng.pick(CJK)),
        87..93 => out.push_str(rng.pick(EMOJI)),
        _ => {
            let spaces = 1 + (rng.next() % 48) as usize;
            let blank_lines = (rng.next() % 4) as usize;
            out.push_str(&"\n".repeat(blank_lines));
            out.push_str(&" ".repeat(spaces));
            out.push_str("\t\tindented;   trailing   \n");
        }
    }
}

/// A deterministic mixed text of at least `bytes` bytes.
fn corpus(seed: u64, bytes: usize) -> String {
    let mut rng = SplitMix(seed);
    let mut out = String::with_capacity(bytes + 1024);
    while out.len() < bytes {
        push_piece(&mut rng, &mut out);
    }
    out
}

/// A chat request body of about `bytes` bytes of JSON: a system prompt, one
/// tool, and alternating user/assistant turns of mixed text.
fn chat_body(seed: u64, bytes: usize) -> Value {
    let mut rng = SplitMix(seed);
    let mut messages = vec![json!({
        "role": "system",
        "content": "You are a careful assistant. Answer briefly and cite the notes you used."
    })];
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [],
        "tools": [{"type": "function", "function": {
            "name": "search_notes",
            "description": "Search the user's notes.",
            "parameters": {"type": "object", "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "scope": {"type": "string", "description": "Where to look.", "enum": ["all", "recent"]}
            }}
        }}]
    });
    let mut size = body.to_string().len() + messages[0].to_string().len();
    while size < bytes {
        let mut content = String::new();
        // Turns of 300 B to 1.5 KiB, capped so the body lands near `bytes`.
        let turn = (300 + (rng.next() % 1200) as usize).min(bytes - size);
        while content.len() < turn {
            push_piece(&mut rng, &mut content);
        }
        let role = if messages.len() % 2 == 1 {
            "user"
        } else {
            "assistant"
        };
        let message = json!({"role": role, "content": content});
        size += message.to_string().len() + 1;
        messages.push(message);
    }
    body["messages"] = Value::Array(messages);
    body
}

fn tiktoken(encoding: Encoding) -> &'static CoreBPE {
    match encoding {
        Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
    }
}

const ENCODINGS: [Encoding; 2] = [Encoding::Cl100k, Encoding::O200k];

fn count_1mib(c: &mut Criterion) {
    let text = corpus(1, 1 << 20);
    for encoding in ENCODINGS {
        // Builds both encoders before timing, and checks they agree.
        let ours = encoding.count(&text);
        let reference = tiktoken(encoding).encode_ordinary(&text).len();
        eprintln!(
            "corpus: {} bytes, {encoding}: {ours} tokens ({:.2} bytes/token), tiktoken-rs {}",
            text.len(),
            text.len() as f64 / ours as f64,
            if ours == reference {
                "agrees"
            } else {
                "DISAGREES"
            },
        );
    }
    let mut group = c.benchmark_group("count_1mib");
    group.throughput(Throughput::Bytes(text.len() as u64));
    // One iteration is tens of milliseconds: take a fixed number per sample.
    group.sampling_mode(SamplingMode::Flat);
    for encoding in ENCODINGS {
        group.bench_with_input(
            BenchmarkId::new("bpe-openai", encoding.name()),
            &text,
            |b, text| b.iter(|| encoding.count(black_box(text))),
        );
        let bpe = tiktoken(encoding);
        group.bench_with_input(
            BenchmarkId::new("tiktoken-rs", encoding.name()),
            &text,
            |b, text| b.iter(|| bpe.encode_ordinary(black_box(text)).len()),
        );
    }
    group.finish();
}

fn chat_prompt(c: &mut Criterion) {
    let mut group = c.benchmark_group("chat_prompt");
    for (label, bytes) in [("2KiB", 2 << 10), ("100KiB", 100 << 10)] {
        let body = chat_body(7, bytes);
        let size = body.to_string().len();
        group.throughput(Throughput::Bytes(size as u64));
        for encoding in ENCODINGS {
            let counter = PromptCounter::new(encoding);
            eprintln!(
                "chat {label}: {size} bytes of JSON, {} {encoding} tokens",
                counter.count_chat(&body)
            );
            group.bench_with_input(
                BenchmarkId::new(label, encoding.name()),
                &body,
                |b, body| b.iter(|| counter.count_chat(black_box(body))),
            );
        }
    }
    group.finish();
}

fn handoff(c: &mut Criterion) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("handoff: no Tokio runtime ({e}); skipped");
            return;
        }
    };
    let mut group = c.benchmark_group("handoff");
    group.bench_function("spawn_blocking", |b| {
        b.iter_custom(|iters| {
            // Timed inside a spawned task, so the awaiting side is a runtime
            // worker as in the proxy, not `block_on`'s own thread.
            let on_worker = runtime.spawn(async move {
                let start = Instant::now();
                for _ in 0..iters {
                    // The closure does no work: this is the hand-off alone.
                    let _ = tokio::task::spawn_blocking(|| black_box(1)).await;
                }
                start.elapsed()
            });
            runtime.block_on(on_worker).unwrap_or_default()
        })
    });
    group.finish();
}

/// Short settings: the figures are stable to a few percent at these lengths,
/// and the machine is shared with other builds.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
}

criterion_group! {
    name = benches;
    config = config();
    targets = count_1mib, chat_prompt, handoff
}
criterion_main!(benches);
