//! `[database]`: the Postgres URL and the pool's limits, each also settable
//! by env (`DATABASE_URL`, `SQL_MAX_OPEN_CONNS`, `SQL_MAX_IDLE_CONNS`,
//! `SQL_MAX_LIFETIME`, `SQL_MAX_IDLE_TIME`), which wins over the file.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{
    ConfigError, Env, HumanDuration, defaults, invalid, override_duration, override_number,
    positive,
};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    url: Option<SecretString>,
    max_open_conns: Option<usize>,
    max_idle_conns: Option<usize>,
    max_lifetime: Option<HumanDuration>,
    max_idle_time: Option<HumanDuration>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub max_open_conns: usize,
    pub max_idle_conns: usize,
    pub max_lifetime: Duration,
    pub max_idle_time: Duration,
}

pub(super) fn validate(d: RawDatabase, env: &dyn Env) -> Result<DatabaseConfig, ConfigError> {
    let database = DatabaseConfig {
        url: env
            .var("DATABASE_URL")
            .map(SecretString::from)
            .or(d.url)
            .unwrap_or_else(|| SecretString::from(defaults::DATABASE_URL)),
        max_open_conns: positive(
            "database.max_open_conns (env SQL_MAX_OPEN_CONNS)",
            override_number(env, "SQL_MAX_OPEN_CONNS", d.max_open_conns)?
                .unwrap_or(defaults::MAX_OPEN_CONNS),
        )?,
        max_idle_conns: override_number(env, "SQL_MAX_IDLE_CONNS", d.max_idle_conns)?
            .unwrap_or(defaults::MAX_IDLE_CONNS),
        max_lifetime: override_duration(
            env,
            "SQL_MAX_LIFETIME",
            "database.max_lifetime (env SQL_MAX_LIFETIME)",
            d.max_lifetime,
            defaults::MAX_LIFETIME,
        )?,
        max_idle_time: override_duration(
            env,
            "SQL_MAX_IDLE_TIME",
            "database.max_idle_time (env SQL_MAX_IDLE_TIME)",
            d.max_idle_time,
            defaults::MAX_IDLE_TIME,
        )?,
    };
    let url = database.url.expose_secret();
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err(invalid(
            "database.url (env DATABASE_URL)",
            "must be a postgres:// URL",
        ));
    }
    if database.max_idle_conns > database.max_open_conns {
        return Err(invalid(
            "database.max_idle_conns (env SQL_MAX_IDLE_CONNS)",
            "must not exceed max_open_conns",
        ));
    }
    Ok(database)
}
