//! `[admin]`: the admin API's bearer token (env `TOLLGATE_ADMIN_TOKEN`).

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, Env, invalid};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    token: Option<SecretString>,
}

/// The token from env, else the file; absent: the admin API refuses every request.
pub(super) fn token(a: RawAdmin, env: &dyn Env) -> Result<Option<SecretString>, ConfigError> {
    let token = env
        .var("TOLLGATE_ADMIN_TOKEN")
        .map(SecretString::from)
        .or(a.token);
    if let Some(token) = &token
        && token.expose_secret().len() < 16
    {
        return Err(invalid(
            "admin.token (env TOLLGATE_ADMIN_TOKEN)",
            "must be at least 16 characters",
        ));
    }
    Ok(token)
}
