//! Revocation fan-out through Redis pub/sub.
//!
//! Whoever revokes a key (the CLI or the admin API, on any instance) publishes
//! its hash on [`CHANNEL`]; every running instance listens and drops the key
//! from its cache, so a revocation lands everywhere at once instead of after
//! the cache TTL. Without Redis, or while it is unreachable, the TTL alone
//! bounds the delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{
    Builder, ClientLike, Config as RedisConfig, EventInterface, PubsubInterface, ReconnectPolicy,
};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::broadcast::error::RecvError;

use super::cache::KeyCache;
use super::secret::KeyHash;
use crate::store_errors::{self, RedisOperation};

pub const CHANNEL: &str = "tollgate:keys:revoked";
/// Published instead of a key hash when an account changed (its tier, by a
/// Stripe webhook): every instance drops every cached key.
const EVERY_KEY: &str = "*";

/// Bound on a publish: the revocation is already in Postgres, so a slow Redis
/// only delays the fan-out (the cache TTL still applies).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before listening again after the subscriber stopped with an error.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Tells every instance that `hash` was revoked. Failure is logged, not
/// fatal: Postgres has the revocation and caches expire within their TTL.
pub async fn publish(redis_url: &str, hash: &KeyHash) {
    publish_message(redis_url, hex::encode(hash.0)).await;
}

/// Tells every instance to drop every cached key: an account's tier changed.
pub async fn publish_account_change(redis_url: &str) {
    publish_message(redis_url, EVERY_KEY.to_owned()).await;
}

async fn publish_message(redis_url: &str, message: String) {
    let result = tokio::time::timeout(PUBLISH_TIMEOUT, async {
        let client = Builder::from_config(RedisConfig::from_url(redis_url)?).build()?;
        client.init().await?;
        let _: i64 = client.publish(CHANNEL, message).await?;
        client.quit().await?;
        Ok::<_, fred::error::Error>(())
    })
    .await;
    let error = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_owned(),
    };
    store_errors::redis(RedisOperation::Publish);
    tracing::warn!("revocation not published to Redis: {error}");
}

/// Background service: drops revoked keys from this instance's cache.
pub struct RevocationListener {
    pub redis_url: String,
    pub cache: KeyCache,
    /// True while subscribed: `/readyz` reports it.
    pub subscribed: Arc<AtomicBool>,
}

impl RevocationListener {
    async fn listen(&self) -> Result<(), fred::error::Error> {
        let mut config = RedisConfig::from_url(&self.redis_url)?;
        // Redis down at start must not end the fan-out: keep trying.
        config.fail_fast = false;
        let subscriber = Builder::from_config(config)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build_subscriber_client()?;
        // Taken before subscribing, so no message slips between the two.
        let mut messages = subscriber.message_rx();
        let mut reconnects = subscriber.reconnect_rx();
        subscriber.init().await?;
        // Re-subscribes after every reconnect.
        let _resubscribe = subscriber.manage_subscriptions();
        subscriber.subscribe(CHANNEL).await?;
        self.subscribed.store(true, Ordering::Relaxed);
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) if message.value.as_str().is_some_and(|m| m == EVERY_KEY) => {
                        self.cache.invalidate_all();
                    }
                    Ok(message) => {
                        let hash = message
                            .value
                            .as_str()
                            .and_then(|text| hex::decode(text.as_ref()).ok())
                            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
                        match hash {
                            Some(hash) => self.cache.invalidate(&KeyHash(hash)).await,
                            None => tracing::warn!("ignoring malformed message on {CHANNEL}"),
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "revocation messages missed; dropping every cached key");
                        self.cache.invalidate_all();
                    }
                    Err(RecvError::Closed) => break,
                },
                // Messages published while disconnected are lost: forget everything.
                Ok(_) = reconnects.recv() => self.cache.invalidate_all(),
            }
        }
        self.subscribed.store(false, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for RevocationListener {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                result = self.listen() => {
                    self.subscribed.store(false, Ordering::Relaxed);
                    if let Err(e) = result {
                        store_errors::redis(RedisOperation::Subscribe);
                        tracing::error!("revocation listener stopped: {e}; restarting");
                    }
                }
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(RESTART_DELAY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
