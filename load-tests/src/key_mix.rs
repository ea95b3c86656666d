//! API keys for the load and the deterministic weighted choice among them (`--key-mix`).
//!
//! Keys are picked by smooth weighted round-robin (the nginx upstream algorithm): with
//! weights 6:3:1 every run of 10 requests has exactly 6, 3 and 1 of each key, spread out
//! rather than in blocks, and two runs with the same flags send the same sequence. That
//! matters for `--compare`, where both targets must see the same tier mix.

use std::fmt;

use anyhow::Context;
use hyper::header::HeaderValue;

use crate::cli::FlagError;

/// Weights above this buy nothing (a cycle of a million requests is already longer than
/// most runs) and keep the round-robin arithmetic far from overflow.
const MAX_WEIGHT: u32 = 1_000_000;

/// An API key. `Debug` and [`ApiKey::redacted`] never show it whole, because reports
/// may be committed next to benchmark figures.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Visible ASCII only: the key becomes an `Authorization` header value.
    pub fn parse(raw: &str) -> Result<Self, FlagError> {
        if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FlagError::KeyCharacters);
        }
        Ok(Self(raw.to_owned()))
    }

    /// `Authorization: Bearer KEY`, marked sensitive so it is never logged.
    pub fn authorization(&self) -> anyhow::Result<HeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .with_context(|| format!("key {} is not a valid header value", self.redacted()))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// First 6 and last 4 characters of keys longer than 12 (enough to tell tier test
    /// keys apart); shorter keys are obviously test keys and shown whole.
    pub fn redacted(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() <= 12 {
            return self.0.clone();
        }
        let head: String = chars[..6].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}…{tail}")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.redacted())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedKey {
    pub key: ApiKey,
    pub weight: u32,
}

/// One or more keys with weights; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMix {
    keys: Vec<WeightedKey>,
}

impl KeyMix {
    pub fn single(key: ApiKey) -> Self {
        Self {
            keys: vec![WeightedKey { key, weight: 1 }],
        }
    }

    /// Parses `KEY:WEIGHT,KEY:WEIGHT`. The weight follows the *last* colon, so keys
    /// that contain colons still work.
    pub fn parse(raw: &str) -> Result<Self, FlagError> {
        let mut keys: Vec<WeightedKey> = Vec::new();
        for entry in raw.split(',').map(str::trim) {
            let Some((key, weight)) = entry.rsplit_once(':') else {
                return Err(FlagError::KeyMixEntry(entry.to_owned()));
            };
            let key = ApiKey::parse(key)?;
            let weight = match weight.parse::<u32>() {
                Ok(w) if (1..=MAX_WEIGHT).contains(&w) => w,
                _ => return Err(FlagError::KeyMixWeight(entry.to_owned())),
            };
            if keys.iter().any(|k| k.key == key) {
                return Err(FlagError::KeyMixDuplicate(key.redacted()));
            }
            keys.push(WeightedKey { key, weight });
        }
        Ok(Self { keys })
    }

    pub fn keys(&self) -> &[WeightedKey] {
        &self.keys
    }

    pub fn picker(&self) -> SmoothWeightedPicker {
        SmoothWeightedPicker {
            weights: self.keys.iter().map(|k| i64::from(k.weight)).collect(),
            current: vec![0; self.keys.len()],
            total: self.keys.iter().map(|k| i64::from(k.weight)).sum(),
        }
    }
}

/// Smooth weighted round-robin state: each pick adds every weight to its running score,
/// takes the highest score (first on ties) and subtracts the total weight from it.
#[derive(Debug, Clone)]
pub struct SmoothWeightedPicker {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl SmoothWeightedPicker {
    /// Index into [`KeyMix::keys`] of the key for the next request.
    pub fn next_index(&mut self) -> usize {
        let mut best = 0;
        let mut best_score = i64::MIN;
        for (i, (score, weight)) in self.current.iter_mut().zip(&self.weights).enumerate() {
            *score += weight;
            if *score > best_score {
                best = i;
                best_score = *score;
            }
        }
        if let Some(score) = self.current.get_mut(best) {
            *score -= self.total;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(mix: &str, n: usize) -> Vec<usize> {
        let mix = KeyMix::parse(mix).unwrap();
        let mut picker = mix.picker();
        (0..n).map(|_| picker.next_index()).collect()
    }

    #[test]
    fn nginx_reference_sequence_for_5_1_1() {
        // The sequence nginx documents for weights a=5, b=1, c=1.
        assert_eq!(sequence("a:5,b:1,c:1", 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn every_full_cycle_has_exact_weight_counts() {
        let seq = sequence("free:6,pro:3,ent:1", 10 * 7);
        for cycle in seq.chunks(10) {
            let count = |i| cycle.iter().filter(|&&k| k == i).count();
            assert_eq!((count(0), count(1), count(2)), (6, 3, 1), "{cycle:?}");
        }
    }

    #[test]
    fn heavy_key_is_spread_not_blocked() {
        // 1:1 must alternate, never send two of the same key in a row.
        let seq = sequence("a:1,b:1", 8);
        assert_eq!(seq, vec![0, 1, 0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn single_key_always_picks_it() {
        let mut picker = KeyMix::single(ApiKey::parse("k").unwrap()).picker();
        assert!((0..5).all(|_| picker.next_index() == 0));
    }

    #[test]
    fn weight_is_after_the_last_colon() {
        let mix = KeyMix::parse("tg:live:abc:2, other:1").unwrap();
        assert_eq!(mix.keys()[0].key, ApiKey::parse("tg:live:abc").unwrap());
        assert_eq!(mix.keys()[0].weight, 2);
        assert_eq!(mix.keys()[1].key, ApiKey::parse("other").unwrap());
    }

    #[test]
    fn malformed_mixes_say_what_is_wrong() {
        assert_eq!(KeyMix::parse("a"), Err(FlagError::KeyMixEntry("a".into())));
        assert_eq!(
            KeyMix::parse("a:1,"),
            Err(FlagError::KeyMixEntry(String::new()))
        );
        assert_eq!(
            KeyMix::parse("a:0"),
            Err(FlagError::KeyMixWeight("a:0".into()))
        );
        assert_eq!(
            KeyMix::parse("a:x"),
            Err(FlagError::KeyMixWeight("a:x".into()))
        );
        assert_eq!(KeyMix::parse(":3"), Err(FlagError::KeyCharacters));
        assert_eq!(KeyMix::parse("a b:3"), Err(FlagError::KeyCharacters));
        assert_eq!(
            KeyMix::parse("a:1,a:2"),
            Err(FlagError::KeyMixDuplicate("a".into()))
        );
    }

    #[test]
    fn long_keys_are_shortened_in_reports_and_debug() {
        let key = ApiKey::parse("sk-live-0123456789abcdef").unwrap();
        assert_eq!(key.redacted(), "sk-liv…cdef");
        assert_eq!(format!("{key:?}"), "ApiKey(sk-liv…cdef)");
        assert_eq!(ApiKey::parse("sk-free").unwrap().redacted(), "sk-free");
    }
}
