//! The in-process key cache on the request path.
//!
//! Bounded and expiring (moka): a verified key is trusted for `cache_ttl`
//! (5 s by default: the bound on how late a revocation lands when Redis is not
//! configured), an unknown key is remembered as unknown for
//! `negative_cache_ttl` so a flood of bad keys cannot hammer Postgres, and
//! concurrent misses for the same key wait on one Postgres query
//! (`or_try_insert_with` coalesces them), bounded by [`LOOKUP_TIMEOUT`]. With Redis,
//! revocations also arrive at once through [`super::revocation`].
//!
//! A revocation leaves a tombstone for one cache lifetime: a lookup that read
//! the key just before the revocation committed may still store it as valid,
//! and the tombstone overrides that stale entry until it expires.
//!
//! Outages degrade, they do not stop the business: every key Postgres
//! verified is also kept for `stale_while_unavailable` (10 minutes by
//! default), and while Postgres cannot be reached such a key keeps
//! authenticating from that copy. Revocations still apply (a revocation, or
//! any message that drops the cache, drops the copy too), expiry is still
//! checked, and a key not verified in that window gets 503: nothing is
//! accepted that Postgres did not vouch for lately.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tollgate_metering::metric_names;

use super::secret::{KeyHash, is_key_shaped};
use super::store::{KeyRecord, KeyStore, StoreError};
use crate::config::KeyCacheConfig;
use crate::error::ApiError;
use crate::store_errors::{self, PostgresOperation};

#[derive(Clone)]
enum Lookup {
    Found(Arc<KeyRecord>),
    Unknown,
}

impl Lookup {
    /// The usable key, or why it is refused.
    fn answer(self) -> Result<Arc<KeyRecord>, ApiError> {
        match self {
            Self::Found(record) => usable(record),
            Self::Unknown => Err(ApiError::InvalidKey),
        }
    }
}

struct LookupExpiry {
    found: Duration,
    unknown: Duration,
}

impl Expiry<KeyHash, Lookup> for LookupExpiry {
    fn expire_after_create(
        &self,
        _key: &KeyHash,
        value: &Lookup,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(match value {
            Lookup::Found(_) => self.found,
            Lookup::Unknown => self.unknown,
        })
    }
}

/// How long a key lookup may wait on Postgres before the request gets 503:
/// a stalled database must not hang every request that needs it.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct KeyCache {
    store: KeyStore,
    cache: Cache<KeyHash, Lookup>,
    /// Keys revoked within the last cache lifetime.
    tombstones: Cache<KeyHash, ()>,
    /// Usable keys as Postgres last confirmed them, for while it is down.
    verified: Cache<KeyHash, Arc<KeyRecord>>,
    /// Lookups answered from `verified` because Postgres failed.
    stale: IntCounter,
    /// Lookups answered from the cache, or by another lookup's read.
    hits: IntCounter,
    /// Reads from Postgres.
    misses: IntCounter,
}

impl KeyCache {
    /// A cache whose hits and misses are counted on `registry`.
    pub fn new(
        store: KeyStore,
        config: KeyCacheConfig,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let cache = Cache::builder()
            .max_capacity(config.capacity as u64)
            .expire_after(LookupExpiry {
                found: config.ttl,
                unknown: config.negative_ttl,
            })
            .build();
        let tombstones = Cache::builder()
            .max_capacity(config.capacity as u64)
            .time_to_live(config.ttl + LOOKUP_TIMEOUT)
            .build();
        let lookups = IntCounterVec::new(
            Opts::new(
                metric_names::KEY_CACHE_LOOKUPS_TOTAL,
                "API key lookups the cache answered: hit (from the cache, or by a concurrent lookup's read), miss (read from Postgres) or stale (Postgres unreachable: a key it verified within keys.stale_while_unavailable).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(lookups.clone()))?;
        let verified = Cache::builder()
            .max_capacity(config.capacity as u64)
            .time_to_live(config.stale_while_unavailable)
            .build();
        Ok(Self {
            store,
            cache,
            tombstones,
            verified,
            hits: lookups.with_label_values(&["hit"]),
            misses: lookups.with_label_values(&["miss"]),
            stale: lookups.with_label_values(&["stale"]),
        })
    }

    /// The usable key for `secret`, or why it is refused.
    pub async fn authenticate(&self, secret: &str) -> Result<Arc<KeyRecord>, ApiError> {
        // Not even shaped like a key: refuse without touching cache or database.
        if !is_key_shaped(secret) {
            return Err(ApiError::InvalidKey);
        }
        self.authenticate_hash(KeyHash::of(secret)).await
    }

    /// The usable key whose secret hashes to `hash` (a job's run, which
    /// carries the hash its key had at submission), or why it is refused.
    pub async fn authenticate_hash(&self, hash: KeyHash) -> Result<Arc<KeyRecord>, ApiError> {
        if self.tombstones.contains_key(&hash) {
            return Err(ApiError::RevokedKey);
        }
        // A cached answer, the common case, keeps this future small; the
        // read from Postgres (kilobytes of state) is boxed. The gateway's
        // request future is moved into a box on every request, so its size
        // is paid in copying each time.
        if let Some(cached) = self.cache.get(&hash).await {
            self.hits.inc();
            return cached.answer();
        }
        Box::pin(self.read_through(hash)).await
    }

    /// A cache miss: reads the key from Postgres (once for concurrent
    /// misses), or answers from a recently verified copy while Postgres is
    /// unreachable.
    async fn read_through(&self, hash: KeyHash) -> Result<Arc<KeyRecord>, ApiError> {
        let store = &self.store;
        let read = self
            .cache
            .entry(hash)
            .or_try_insert_with(async move {
                let found = tokio::time::timeout(LOOKUP_TIMEOUT, store.lookup(&hash))
                    .await
                    .map_err(|_| StoreError::Timeout)
                    .and_then(|found| found)
                    // Inside the read: lookups sharing a failed read count it once.
                    .inspect_err(|_| store_errors::postgres(PostgresOperation::KeyLookup))?;
                Ok::<_, StoreError>(found.map_or(Lookup::Unknown, |r| Lookup::Found(Arc::new(r))))
            })
            .await;
        let entry = match read {
            Ok(entry) => entry,
            Err(error) => {
                let Some(record) = self.verified.get(&hash).await else {
                    tracing::warn!("key lookup failed: {error}");
                    return Err(ApiError::AuthUnavailable);
                };
                self.stale.inc();
                return usable(record);
            }
        };
        // Fresh: this lookup made the Postgres read. Concurrent misses for the
        // key waited on it and, like cached answers, count as hits.
        let fresh = entry.is_fresh();
        if fresh { &self.misses } else { &self.hits }.inc();
        let checked = entry.into_value().answer();
        if fresh && let Ok(record) = &checked {
            self.verified.insert(hash, Arc::clone(record)).await;
        }
        checked
    }

    /// Refuses a revoked key from now on, whatever is cached for it.
    pub async fn invalidate(&self, hash: &KeyHash) {
        self.tombstones.insert(*hash, ()).await;
        self.cache.invalidate(hash).await;
        self.verified.invalidate(hash).await;
    }

    /// Forgets every cached key (after missed revocation messages, or an
    /// account change that may have disabled keys): the copies kept for an
    /// outage too, since any of them may be the one that changed.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
        self.verified.invalidate_all();
    }
}

/// The record, if the key may be used now.
fn usable(record: Arc<KeyRecord>) -> Result<Arc<KeyRecord>, ApiError> {
    if record.revoked {
        Err(ApiError::RevokedKey)
    } else if !record.account_active {
        Err(ApiError::InvalidKey)
    } else if !record.is_usable(SystemTime::now()) {
        Err(ApiError::ExpiredKey)
    } else {
        Ok(record)
    }
}
