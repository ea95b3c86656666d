//! Which kind of text makes tiktoken 4.1.2's o200k count slow (low-rep corpus)?
use tollgate_tokenizer_bench::SplitMix;
use std::time::Instant;
fn main() {
    let mut rng = SplitMix(3);
    let mut make = |f: &mut dyn FnMut(&mut SplitMix) -> char| -> String {
        let mut s = String::new();
        while s.len() < 256 << 10 { for _ in 0..1 + rng.below(8) { s.push(f(&mut rng)); } s.push(' '); }
        s
    };
    let kinds: Vec<(&str, String)> = vec![
        ("ascii words", make(&mut |r| (b'a' + r.below(26) as u8) as char)),
        ("latin+accents", make(&mut |r| ['a','e','ü','ö','é','r','s','t','n','ß'][r.below(10)])),
        ("hangul", make(&mut |r| char::from_u32(0xac00 + r.below(11172) as u32).unwrap())),
        ("han", make(&mut |r| char::from_u32(0x4e00 + r.below(20902) as u32).unwrap())),
        ("emoji", make(&mut |r| char::from_u32(0x1f300 + r.below(0x300) as u32).unwrap_or('?'))),
    ];
    for name in ["cl100k_base", "o200k_base"] {
        let g = tiktoken::get_encoding(name).unwrap();
        let b = if name == "cl100k_base" { bpe_openai::cl100k_base() } else { bpe_openai::o200k_base() };
        for (k, t) in &kinds {
            assert_eq!(g.count(t), b.count(t.as_str()), "{name} {k}");
            let mut tg = f64::MAX; let mut tb = f64::MAX;
            for _ in 0..5 {
                let s = Instant::now(); std::hint::black_box(g.count(t)); tg = tg.min(s.elapsed().as_secs_f64());
                let s = Instant::now(); std::hint::black_box(b.count(t.as_str())); tb = tb.min(s.elapsed().as_secs_f64());
            }
            let mib = t.len() as f64 / 1048576.0;
            println!("{name} {k:14} tiktoken4 {:7.1} MiB/s  bpe-openai {:6.1} MiB/s  ratio {:.2}", mib / tg, mib / tb, tb / tg);
        }
    }
}
