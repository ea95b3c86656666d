//! Accounts and API keys in Postgres, the system of record.

use std::time::SystemTime;

use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

use super::secret::{KeyHash, NewKey, is_key_shaped};
use crate::admission::periods::BillingPeriod;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database did not answer in time")]
    Timeout,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// What the request path needs to know about a key.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub key_id: Uuid,
    pub account_id: Uuid,
    pub account_name: String,
    pub tier: String,
    pub account_active: bool,
    /// `None`: every model.
    pub allowed_models: Option<Vec<String>>,
    pub expires_at: Option<SystemTime>,
    pub revoked: bool,
    /// The current period of the subscription that grants the account its
    /// tier; `None` (no subscription): quotas run by calendar month.
    pub billing_period: Option<BillingPeriod>,
}

impl KeyRecord {
    /// Whether the key may be used right now.
    pub fn is_usable(&self, now: SystemTime) -> bool {
        !self.revoked && self.account_active && self.expires_at.is_none_or(|at| now < at)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// A key as listings show it: never its secret.
#[derive(Debug, Clone, Serialize)]
pub struct KeyListing {
    pub id: Uuid,
    pub account: String,
    pub tier: String,
    pub prefix: String,
    pub name: Option<String>,
    pub models: Option<Vec<String>>,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub id: Uuid,
    pub name: String,
    pub tier: String,
    pub status: String,
    pub created_at: u64,
}

pub struct CreateKey<'a> {
    pub account: &'a str,
    /// The account's tier when the account is created by this call; an
    /// existing account must already be on it.
    pub tier: &'a str,
    pub name: Option<&'a str>,
    pub expires_at: Option<SystemTime>,
    pub models: Option<Vec<String>>,
}

/// A created key: the only moment its secret exists outside the client.
pub struct CreatedKey {
    pub secret: String,
    pub listing: KeyListing,
}

#[derive(Clone)]
pub struct KeyStore {
    pool: Pool,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const LISTING_COLUMNS: &str = "k.id, a.name, a.tier, k.display_prefix, k.name, k.allowed_models, \
     k.created_at, k.expires_at, k.revoked_at";

fn listing(row: &Row) -> KeyListing {
    KeyListing {
        id: row.get(0),
        account: row.get(1),
        tier: row.get(2),
        prefix: row.get(3),
        name: row.get(4),
        models: row.get(5),
        created_at: unix(row.get(6)),
        expires_at: row.get::<_, Option<SystemTime>>(7).map(unix),
        revoked_at: row.get::<_, Option<SystemTime>>(8).map(unix),
    }
}

fn account(row: &Row) -> Account {
    Account {
        id: row.get(0),
        name: row.get(1),
        tier: row.get(2),
        status: row.get(3),
        created_at: unix(row.get(4)),
    }
}

impl KeyStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// The key with this hash, revoked or not; `None` if no such key exists.
    pub async fn lookup(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT k.id, k.account_id, a.name, a.tier, a.status, k.allowed_models, \
                        k.expires_at, k.revoked_at IS NOT NULL, k.hash, \
                        p.current_period_start, p.current_period_end \
                 FROM api_keys k JOIN accounts a ON a.id = k.account_id \
                 LEFT JOIN billing_subscriptions p \
                   ON p.subscription_id = a.billing_subscription_id AND p.tier = a.tier \
                 WHERE k.hash = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&hash.0.as_slice()]).await?;
        Ok(row
            .filter(|row| hash.matches(row.get::<_, &[u8]>(8)))
            .map(|row| KeyRecord {
                key_id: row.get(0),
                account_id: row.get(1),
                account_name: row.get(2),
                tier: row.get(3),
                account_active: row.get::<_, &str>(4) == "active",
                allowed_models: row.get(5),
                expires_at: row.get(6),
                revoked: row.get(7),
                billing_period: row
                    .get::<_, Option<SystemTime>>(9)
                    .zip(row.get::<_, Option<SystemTime>>(10))
                    .map(|(start, end)| BillingPeriod { start, end }),
            }))
    }

    /// Creates the account if it does not exist yet, then a key on it.
    pub async fn create_key(&self, request: CreateKey<'_>) -> Result<CreatedKey, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO accounts (id, name, tier) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            &[&Uuid::now_v7(), &request.account, &request.tier],
        )
        .await?;
        let row = tx
            .query_one(
                "SELECT id, tier FROM accounts WHERE name = $1",
                &[&request.account],
            )
            .await?;
        let account_id: Uuid = row.get(0);
        let tier: &str = row.get(1);
        if tier != request.tier {
            return Err(StoreError::Conflict(format!(
                "account `{}` is on tier `{tier}`, not `{}`",
                request.account, request.tier
            )));
        }
        let key = NewKey::generate();
        let key_id = Uuid::now_v7();
        tx.execute(
            "INSERT INTO api_keys (id, account_id, hash, display_prefix, name, allowed_models, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &key_id,
                &account_id,
                &key.hash.0.as_slice(),
                &key.display_prefix,
                &request.name,
                &request.models,
                &request.expires_at,
            ],
        )
        .await?;
        let row = tx
            .query_one(
                &format!(
                    "SELECT {LISTING_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id \
                     WHERE k.id = $1"
                ),
                &[&key_id],
            )
            .await?;
        tx.commit().await?;
        Ok(CreatedKey {
            secret: key.secret,
            listing: listing(&row),
        })
    }

    pub async fn list_keys(&self, account: Option<&str>) -> Result<Vec<KeyListing>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {LISTING_COLUMNS} FROM api_keys k JOIN accounts a ON a.id = k.account_id \
                     WHERE $1::text IS NULL OR a.name = $1 ORDER BY k.created_at, k.id"
                ),
                &[&account],
            )
            .await?;
        Ok(rows.iter().map(listing).collect())
    }

    /// Revokes the key named by its full secret, its id, or its display
    /// prefix (which must match exactly one key). Returns its hash, so
    /// caches can drop it. Revoking twice is not an error.
    pub async fn revoke(&self, ident: &str) -> Result<(KeyListing, KeyHash), StoreError> {
        let client = self.pool.get().await?;
        let rows = if is_key_shaped(ident) {
            let hash = KeyHash::of(ident);
            client
                .query(
                    "SELECT id FROM api_keys WHERE hash = $1",
                    &[&hash.0.as_slice()],
                )
                .await?
        } else if let Ok(id) = ident.parse::<Uuid>() {
            client
                .query("SELECT id FROM api_keys WHERE id = $1", &[&id])
                .await?
        } else {
            client
                .query(
                    "SELECT id FROM api_keys WHERE display_prefix = $1",
                    &[&ident],
                )
                .await?
        };
        let id: Uuid = match rows.as_slice() {
            [row] => row.get(0),
            [] => return Err(StoreError::NotFound(format!("no key matches `{ident}`"))),
            _ => {
                return Err(StoreError::Conflict(format!(
                    "`{ident}` matches {} keys; use the key id",
                    rows.len()
                )));
            }
        };
        client
            .execute(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                &[&id],
            )
            .await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT {LISTING_COLUMNS}, k.hash FROM api_keys k \
                     JOIN accounts a ON a.id = k.account_id WHERE k.id = $1"
                ),
                &[&id],
            )
            .await?;
        let hash: &[u8] = row.get(9);
        let hash = KeyHash(
            hash.try_into()
                .map_err(|_| StoreError::Conflict("stored key hash is malformed".into()))?,
        );
        Ok((listing(&row), hash))
    }

    pub async fn create_account(&self, name: &str, tier: &str) -> Result<Account, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "INSERT INTO accounts (id, name, tier) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING RETURNING id, name, tier, status, created_at",
                &[&Uuid::now_v7(), &name, &tier],
            )
            .await?;
        row.map(|row| account(&row))
            .ok_or_else(|| StoreError::Conflict(format!("account `{name}` already exists")))
    }

    pub async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, name, tier, status, created_at FROM accounts ORDER BY created_at, id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(account).collect())
    }
}
