//! API keys: their secrets ([`secret`]), their records in Postgres
//! ([`store`]), the request path's cache ([`cache`]) and revocation fan-out
//! across instances ([`revocation`]). [`KeyAdmin`] holds the operations the
//! CLI and the admin API share, so both check tiers and announce revocations
//! the same way.

pub mod cache;
pub mod revocation;
pub mod secret;
pub mod store;

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

use self::cache::KeyCache;
use self::store::{Account, CreateKey, CreatedKey, KeyListing, KeyStore, StoreError};
use crate::config::Config;

/// Why a key operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyAdminError {
    #[error("unknown tier `{tier}` (configured tiers: {known})")]
    UnknownTier { tier: String, known: String },
    #[error("invalid model list: {0}")]
    InvalidModels(String),
    #[error("account names are 1-128 characters with no control characters or surrounding spaces")]
    InvalidAccountName,
    #[error("a key expires within {} days at most", MAX_KEY_LIFETIME.as_secs() / 86_400)]
    InvalidExpiry,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The longest `expires_in` a key may have: a century, far beyond any real
/// key's life, yet a bound on the time arithmetic an admin body feeds.
pub const MAX_KEY_LIFETIME: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A key to create, as the CLI and the admin API receive it.
pub struct NewKeyRequest {
    pub account: String,
    pub tier: String,
    pub name: Option<String>,
    pub expires_in: Option<Duration>,
    pub models: Option<Vec<String>>,
}

pub struct KeyAdmin {
    store: KeyStore,
    tiers: Vec<String>,
    redis_url: Option<SecretString>,
    /// This instance's cache, dropped from at once on revocation.
    cache: Option<KeyCache>,
}

impl KeyAdmin {
    pub fn new(store: KeyStore, config: &Config, cache: Option<KeyCache>) -> Self {
        Self {
            store,
            tiers: config.tiers.iter().map(|t| t.name.clone()).collect(),
            redis_url: config.redis_url.clone(),
            cache,
        }
    }

    fn check_account_name(name: &str) -> Result<(), KeyAdminError> {
        let valid = (1..=128).contains(&name.chars().count())
            && name.trim() == name
            && !name.chars().any(char::is_control);
        if valid {
            Ok(())
        } else {
            Err(KeyAdminError::InvalidAccountName)
        }
    }

    fn check_tier(&self, tier: &str) -> Result<(), KeyAdminError> {
        if self.tiers.iter().any(|t| t == tier) {
            Ok(())
        } else {
            Err(KeyAdminError::UnknownTier {
                tier: tier.to_owned(),
                known: self.tiers.join(", "),
            })
        }
    }

    pub async fn create_key(&self, request: NewKeyRequest) -> Result<CreatedKey, KeyAdminError> {
        Self::check_account_name(&request.account)?;
        self.check_tier(&request.tier)?;
        if let Some(models) = &request.models
            && (models.is_empty() || models.iter().any(|m| m.trim().is_empty()))
        {
            return Err(KeyAdminError::InvalidModels(
                "name at least one model, none empty".into(),
            ));
        }
        let expires_at = match request.expires_in {
            None => None,
            Some(after) if after <= MAX_KEY_LIFETIME => SystemTime::now().checked_add(after),
            Some(_) => return Err(KeyAdminError::InvalidExpiry),
        };
        let created = self
            .store
            .create_key(CreateKey {
                account: &request.account,
                tier: &request.tier,
                name: request.name.as_deref(),
                expires_at,
                models: request.models,
            })
            .await?;
        Ok(created)
    }

    pub async fn list_keys(&self, account: Option<&str>) -> Result<Vec<KeyListing>, KeyAdminError> {
        Ok(self.store.list_keys(account).await?)
    }

    /// Revokes in Postgres, then tells every instance to forget the key.
    pub async fn revoke_key(&self, ident: &str) -> Result<KeyListing, KeyAdminError> {
        let (listing, hash) = self.store.revoke(ident).await?;
        if let Some(cache) = &self.cache {
            cache.invalidate(&hash).await;
        }
        if let Some(url) = &self.redis_url {
            revocation::publish(url.expose_secret(), &hash).await;
        }
        Ok(listing)
    }

    pub async fn create_account(&self, name: &str, tier: &str) -> Result<Account, KeyAdminError> {
        Self::check_account_name(name)?;
        self.check_tier(tier)?;
        Ok(self.store.create_account(name, tier).await?)
    }

    pub async fn list_accounts(&self) -> Result<Vec<Account>, KeyAdminError> {
        Ok(self.store.list_accounts().await?)
    }
}
