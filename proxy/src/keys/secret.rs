//! API key secrets: their format, generation and hashing.
//!
//! A key is `tg_` followed by 40 random base62 characters (~238 bits), so a
//! plain SHA-256 is enough to store it: there is nothing to brute-force. Only
//! the hash and a short display prefix are ever stored.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "tg_";
const RANDOM_CHARS: usize = 40;
/// Random characters shown in listings after `tg_`: enough to tell keys apart.
const DISPLAY_CHARS: usize = 8;

/// SHA-256 of a key's secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Constant-time comparison, so a stored hash never leaks through timing.
    pub fn matches(&self, other: &[u8]) -> bool {
        self.0.as_slice().ct_eq(other).into()
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// A newly generated key; its secret is shown once and then dropped.
pub struct NewKey {
    pub secret: String,
    pub hash: KeyHash,
    pub display_prefix: String,
}

impl NewKey {
    pub fn generate() -> Self {
        let random: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(RANDOM_CHARS)
            .map(char::from)
            .collect();
        let secret = format!("{KEY_PREFIX}{random}");
        Self {
            hash: KeyHash::of(&secret),
            display_prefix: display_prefix(&secret),
            secret,
        }
    }
}

/// `tg_` and the first random characters: how listings name a key.
pub fn display_prefix(secret: &str) -> String {
    secret
        .chars()
        .take(KEY_PREFIX.len() + DISPLAY_CHARS)
        .collect()
}

/// Whether `s` has the shape of a full key (cheap check before hashing).
pub fn is_key_shaped(s: &str) -> bool {
    s.len() == KEY_PREFIX.len() + RANDOM_CHARS
        && s.starts_with(KEY_PREFIX)
        && s[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = NewKey::generate();
        assert!(is_key_shaped(&key.secret), "{}", key.secret);
        assert!(key.secret.starts_with("tg_"));
        assert_eq!(key.display_prefix.len(), 11);
        assert!(key.secret.starts_with(&key.display_prefix));
        assert_eq!(key.hash, KeyHash::of(&key.secret));
        assert!(key.hash.matches(&KeyHash::of(&key.secret).0));
        assert!(!key.hash.matches(&KeyHash::of("tg_other").0));
    }

    #[test]
    fn keys_are_distinct() {
        assert_ne!(NewKey::generate().secret, NewKey::generate().secret);
    }

    #[test]
    fn malformed_keys_are_not_key_shaped() {
        assert!(!is_key_shaped("sk-abc"));
        assert!(!is_key_shaped("tg_short"));
        assert!(!is_key_shaped(&format!("tg_{}", "!".repeat(40))));
    }
}
