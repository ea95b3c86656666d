//! `[redis]`: the optional Redis (env `REDIS_URL`) that makes limits, quota
//! counters and revocations shared by every instance.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, Env, HumanDuration, defaults, invalid};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<SecretString>,
    key_prefix: Option<String>,
    timeout: Option<HumanDuration>,
}

/// How Tollgate uses Redis when `redis_url` is set.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Prefix of every key Tollgate writes (several deployments can share one Redis).
    pub key_prefix: String,
    /// Bound on one limiter call; past it the tier's `on_redis_down` applies.
    pub timeout: Duration,
}

/// The URL from env `REDIS_URL`, else the file; absent: no Redis.
pub(super) fn url(
    file: Option<SecretString>,
    env: &dyn Env,
) -> Result<Option<SecretString>, ConfigError> {
    let url = env.var("REDIS_URL").map(SecretString::from).or(file);
    if let Some(url) = &url
        && !(url.expose_secret().starts_with("redis://")
            || url.expose_secret().starts_with("rediss://"))
    {
        return Err(invalid(
            "redis.url (env REDIS_URL)",
            "must be a redis:// or rediss:// URL",
        ));
    }
    Ok(url)
}

pub(super) fn validate(r: RawRedis) -> Result<RedisConfig, ConfigError> {
    let redis = RedisConfig {
        key_prefix: r
            .key_prefix
            .unwrap_or_else(|| defaults::REDIS_KEY_PREFIX.to_owned()),
        timeout: HumanDuration::or(r.timeout, defaults::REDIS_TIMEOUT),
    };
    if redis.key_prefix.is_empty()
        || !redis
            .key_prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        return Err(invalid(
            "redis.key_prefix",
            "must be printable ASCII without spaces or braces",
        ));
    }
    if redis.timeout.is_zero() {
        return Err(invalid("redis.timeout", "must be longer than zero"));
    }
    Ok(redis)
}
