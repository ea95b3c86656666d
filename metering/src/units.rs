//! What a request is billed in. Every usage event carries one unit kind and
//! a quantity of it; quotas, rollups, reports and the Stripe export count
//! each kind on its own (docs/units.md says where each is measured).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kind of a billed quantity. Serialised (usage events, the usage log's
/// `unit_kind`, config keys, Stripe meter names) by [`UnitKind::as_str`].
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// Prompt plus completion tokens, grouped `tokens_per_unit` to a unit.
    /// What every event before unit kinds existed was billed in.
    #[default]
    Tokens,
    /// Images generated: `n` times the size and quality weight.
    Images,
    /// Seconds of audio sent (transcription, translation), rounded up.
    AudioSeconds,
    /// Characters of text turned into speech.
    Characters,
    /// One per request answered.
    Requests,
    /// Seconds a request held a backend slot, measured by Tollgate, rounded up.
    GpuSeconds,
}

impl UnitKind {
    pub const ALL: [Self; 6] = [
        Self::Tokens,
        Self::Images,
        Self::AudioSeconds,
        Self::Characters,
        Self::Requests,
        Self::GpuSeconds,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokens => "tokens",
            Self::Images => "images",
            Self::AudioSeconds => "audio_seconds",
            Self::Characters => "characters",
            Self::Requests => "requests",
            Self::GpuSeconds => "gpu_seconds",
        }
    }
}

impl fmt::Display for UnitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a unit kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown unit kind `{0}` (one of tokens, images, audio_seconds, characters, requests, gpu_seconds)"
)]
pub struct UnknownUnitKind(pub String);

impl FromStr for UnitKind {
    type Err = UnknownUnitKind;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| UnknownUnitKind(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::UnitKind;

    #[test]
    fn serialised_and_parsed_by_the_same_name() {
        for kind in UnitKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<UnitKind>(&json).unwrap(), kind);
            assert_eq!(kind.as_str().parse::<UnitKind>().unwrap(), kind);
        }
        assert!("seconds".parse::<UnitKind>().is_err());
    }
}
