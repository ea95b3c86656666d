//! Exact-count check, then interleaved single-thread timing of every
//! candidate against bpe-openai.
//!
//! ```sh
//! CARGO_INCREMENTAL=0 cargo bench --bench counters            # all
//! ROUNDS=31 cargo bench --bench counters -- cl100k            # one encoding
//! ```
//!
//! Check: each candidate's count must equal tiktoken-rs's (OpenAI's tiktoken
//! core, ported) on the three corpora, on every fixed piece and edge case, and
//! on 3,000 random slices of each corpus. A candidate with any disagreement is
//! reported and not timed.
//!
//! Timing: ROUNDS rounds; in each round every candidate counts each corpus
//! once (after one untimed warm-up pass), in a rotated order so no candidate
//! always runs first. Reported: median MiB/s, min–max, and the median of the
//! per-round ratio to bpe-openai (same round, same machine state).

use std::hint::black_box;
use std::time::Instant;

use tollgate_tokenizer_bench::*;

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(21);

    let corpora: Vec<(&str, String)> = vec![
        ("mixed 1 MiB", mixed_corpus(1 << 20)),
        ("chat 100 KiB", chat_text(100 << 10)),
        ("low-rep 1 MiB", low_repetition_corpus(1 << 20)),
    ];
    for (name, text) in &corpora {
        eprintln!("corpus {name}: {} bytes", text.len());
    }

    // One regex piece each: worst case for quadratic BPE merges.
    let mut rng = SplitMix(5);
    let long_letters: String = (0..32 << 10).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
    let long_cjk: String = (0..(32 << 10) / 3).map(|_| char::from_u32(0x4e00 + rng.below(20902) as u32).unwrap()).collect();
    let long_pieces = [("32 KiB one-word random letters", long_letters), ("32 KiB random CJK, no spaces", long_cjk)];

    for enc in ENCODINGS {
        if !filter.is_empty() && !filter.iter().any(|f| enc.name().contains(f.as_str())) {
            continue;
        }
        let t = Instant::now();
        let cands = candidates(enc);
        eprintln!("\n=== {} (candidates built in {:.1?})", enc.name(), t.elapsed());
        let reference = &cands[1]; // tiktoken-rs

        // ---- exactness -------------------------------------------------
        let mut exact = Vec::new();
        for c in &cands {
            let mut bad = 0usize;
            let mut checked = 0usize;
            let mut first: Option<String> = None;
            let mut check = |text: &str, what: &str| {
                checked += 1;
                let (want, got) = ((reference.count)(text), (c.count)(text));
                if want != got {
                    bad += 1;
                    if std::env::var_os("SHOW_BAD").is_some() {
                        let shown: String = text.chars().take(60).collect();
                        eprintln!("  {} bad {what} ({} B): want {want} got {got} {shown:?}", c.name, text.len());
                    }
                    if first.is_none() {
                        let shown: String = text.chars().take(80).collect();
                        first = Some(format!("{what}: tiktoken {want}, got {got}, text {shown:?}"));
                    }
                }
            };
            for (name, text) in &corpora {
                check(text, name);
            }
            for p in all_pieces().chain(EDGE_CASES.iter().copied()) {
                check(p, "piece");
            }
            let mut rng = SplitMix(99);
            for (name, text) in &corpora {
                for _ in 0..3000 {
                    let mut a = rng.below(text.len());
                    let mut b = (a + rng.below(4096)).min(text.len());
                    while !text.is_char_boundary(a) {
                        a -= 1;
                    }
                    while !text.is_char_boundary(b) {
                        b -= 1;
                    }
                    check(&text[a..b], name);
                }
            }
            let totals: Vec<String> = corpora.iter().map(|(_, t)| (c.count)(t).to_string()).collect();
            eprintln!(
                "{:<20} {:<30} tokens [{}]  {}",
                c.name,
                c.how,
                totals.join(", "),
                if bad == 0 {
                    format!("EXACT ({checked} texts)")
                } else {
                    format!("DISAGREES on {bad}/{checked}; first: {}", first.unwrap_or_default())
                }
            );
            exact.push(bad == 0);
        }

        // ---- timing ----------------------------------------------------
        let timed: Vec<usize> = (0..cands.len()).filter(|&i| exact[i]).collect();
        for (cname, text) in &corpora {
            let mib = text.len() as f64 / (1 << 20) as f64;
            // samples[candidate][round] = seconds for one pass
            let mut samples = vec![Vec::with_capacity(rounds); cands.len()];
            for &i in &timed {
                black_box((cands[i].count)(black_box(text))); // warm-up (caches, lazy DFAs)
            }
            for r in 0..rounds {
                for k in 0..timed.len() {
                    let i = timed[(k + r) % timed.len()];
                    let t = Instant::now();
                    black_box((cands[i].count)(black_box(text)));
                    samples[i].push(t.elapsed().as_secs_f64());
                }
            }
            println!("\n{} / {cname}: {rounds} rounds", enc.name());
            println!("| candidate | MiB/s median | MiB/s min–max | × bpe-openai (median of per-round ratios) |");
            println!("|---|---:|---:|---:|");
            for &i in &timed {
                let mut speed: Vec<f64> = samples[i].iter().map(|s| mib / s).collect();
                speed.sort_by(f64::total_cmp);
                let mut ratio: Vec<f64> = samples[0].iter().zip(&samples[i]).map(|(b, s)| b / s).collect();
                ratio.sort_by(f64::total_cmp);
                println!(
                    "| {} | {:.1} | {:.1}–{:.1} | {:.2} |",
                    cands[i].name,
                    speed[speed.len() / 2],
                    speed[0],
                    speed[speed.len() - 1],
                    ratio[ratio.len() / 2]
                );
            }
        }
        for (pname, text) in &long_pieces {
            println!("\n{} / {pname}: best of 3 single passes", enc.name());
            for &i in &timed {
                let want = (reference.count)(text);
                let mut best = f64::MAX;
                let mut got = 0;
                for _ in 0..3 {
                    let t = Instant::now();
                    got = black_box((cands[i].count)(black_box(text)));
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let verdict = if got == want { "exact".to_string() } else { format!("WRONG: {got} vs tiktoken {want}") };
                println!(
                    "| {} | {:.3} ms | {:.2} MiB/s | {verdict} |",
                    cands[i].name,
                    best * 1e3,
                    text.len() as f64 / (1 << 20) as f64 / best
                );
            }
        }
    }
}
