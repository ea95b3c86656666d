//! [`Name`]: the one rule for what Tollgate names itself (tiers, backends,
//! pools, the Stripe meter's event): 1–64 characters of `a-z`, `0-9`, `-`
//! and `_`, so a name is safe in a Redis key, a metric label, a URL and a
//! Stripe lookup key alike. Model names are the clients' and follow no rule
//! of ours.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use serde::Deserialize;

/// A checked name; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

/// What a name must be, for the error that names the key.
pub const NAME_RULE: &str = "must be 1-64 characters of a-z, 0-9, '-' or '_'";

/// A name that breaks [`NAME_RULE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` {NAME_RULE}")]
pub struct BadName(pub String);

impl Name {
    pub fn new(name: impl Into<String>) -> Result<Self, BadName> {
        let name = name.into();
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(name))
        } else {
            Err(BadName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for Name {
    type Error = BadName;

    fn try_from(name: String) -> Result<Self, BadName> {
        Self::new(name)
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_in_full() {
        for good in ["a", "free", "pro-2", "gpu_a", &"x".repeat(64)] {
            assert_eq!(Name::new(good).map(String::from), Ok(good.to_owned()));
        }
        for bad in ["", "Free", "gpu a", "a/b", "a.b", "é", &"x".repeat(65)] {
            assert_eq!(Name::new(bad), Err(BadName(bad.to_owned())), "{bad:?}");
        }
    }
}
