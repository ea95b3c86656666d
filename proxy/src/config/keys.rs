//! `[keys]`: the in-process cache of verified API keys.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, HumanDuration, defaults, positive};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeys {
    cache_ttl: Option<HumanDuration>,
    negative_cache_ttl: Option<HumanDuration>,
    cache_capacity: Option<usize>,
    stale_while_unavailable: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy)]
pub struct KeyCacheConfig {
    /// How long a verified key is trusted without asking Postgres: the bound
    /// on how late a revocation takes effect when Redis is not configured.
    pub ttl: Duration,
    /// How long an unknown key is remembered as unknown.
    pub negative_ttl: Duration,
    pub capacity: usize,
    /// While Postgres cannot be reached, a key it verified within this long
    /// keeps authenticating (0: none does; every lookup then gets 503).
    pub stale_while_unavailable: Duration,
}

pub(super) fn validate(k: RawKeys) -> Result<KeyCacheConfig, ConfigError> {
    Ok(KeyCacheConfig {
        ttl: HumanDuration::or(k.cache_ttl, defaults::KEY_CACHE_TTL),
        negative_ttl: HumanDuration::or(k.negative_cache_ttl, defaults::NEGATIVE_CACHE_TTL),
        capacity: positive(
            "keys.cache_capacity",
            k.cache_capacity.unwrap_or(defaults::KEY_CACHE_CAPACITY),
        )?,
        stale_while_unavailable: HumanDuration::or(
            k.stale_while_unavailable,
            defaults::STALE_WHILE_UNAVAILABLE,
        ),
    })
}
