//! Completion callbacks: when a job ends (succeeded, failed or cancelled), a POST of an
//! event to the job's `callback_url`, else its account's, signed the way
//! Stripe signs webhooks (billing's signer, `tollgate_billing::webhook::sign`):
//! `x-tollgate-signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
//! with the account's secret (docs/jobs.md has
//! a snippet that verifies it). The delivery is queued in the statement
//! that ends the job (`store::finish`), so none is lost; senders on every
//! gateway take due deliveries under a lease, retry failures with backoff
//! (1 s doubling to an hour) for `[jobs] callback_retry_for`, and never
//! hold up anything else. Batch lines send none: their batch is what ends.
//!
//! A callback goes only to a public address unless
//! `[jobs] callback_allow_private` is set: the URL is the client's, and the
//! gateway must not be made to POST into its own network.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::json;
use tollgate_billing::webhook::sign;
use uuid::Uuid;

use super::Jobs;
use super::store;
use crate::keys::store::StoreError;

pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";
/// A URL longer than this is refused.
const MAX_URL_BYTES: usize = 2048;
/// Deliveries one sender takes at a time.
const DELIVERIES_AT_ONCE: i64 = 32;
/// A delivery (connect to answer) longer than this failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// A sender holds a delivery this long (longer than one attempt).
const DELIVERY_LEASE: Duration = Duration::from_secs(60);
/// One attempt, everything included, ends within this (below the lease).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(3600);

/// A URL a callback may be sent to: `http` or `https`, with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "`callback_url` is not a URL".to_owned())?;
    if url.len() > MAX_URL_BYTES
        || !matches!(uri.scheme_str(), Some("http" | "https"))
        || uri.host().is_none_or(str::is_empty)
    {
        return Err(format!(
            "`callback_url` must be an http or https URL of at most {MAX_URL_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The account's signing secret, made when it has none yet.
pub async fn account_secret(pool: &Pool, account_id: Uuid) -> Result<String, StoreError> {
    let client = pool.get().await?;
    let fresh: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let row = client
        .query_one(
            "UPDATE accounts SET callback_secret = coalesce(callback_secret, $2)
             WHERE id = $1 RETURNING callback_secret",
            &[&account_id, &format!("whsec_{fresh}")],
        )
        .await?;
    Ok(row.get(0))
}

/// The account's callback URL (`None`: only jobs that name one call back).
pub async fn account_url(pool: &Pool, account_id: Uuid) -> Result<Option<String>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT callback_url FROM accounts WHERE id = $1",
            &[&account_id],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn set_account_url(
    pool: &Pool,
    account_id: Uuid,
    url: Option<&str>,
) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE accounts SET callback_url = $2 WHERE id = $1",
            &[&account_id, &url],
        )
        .await?;
    Ok(())
}

/// A delivery a sender holds.
struct Due {
    job_id: Uuid,
    account_id: Uuid,
    url: String,
    attempts: i32,
    created_at: SystemTime,
    /// The account's signing secret (`None` until one is made).
    secret: Option<String>,
}

async fn take_due(pool: &Pool) -> Result<Vec<Due>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "UPDATE job_callbacks c
             SET lease_until = now() + make_interval(secs => $1), attempts = attempts + 1
             FROM jobs j JOIN accounts a ON a.id = j.account_id
             WHERE j.id = c.job_id AND c.job_id IN (
                 SELECT job_id FROM job_callbacks
                 WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_at <= now()
                   AND (lease_until IS NULL OR lease_until < now())
                 ORDER BY next_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             RETURNING c.job_id, j.account_id, c.url, c.attempts, c.created_at,
                       a.callback_secret",
            &[&DELIVERY_LEASE.as_secs_f64(), &DELIVERIES_AT_ONCE],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Due {
            job_id: row.get(0),
            account_id: row.get(1),
            url: row.get(2),
            attempts: row.get(3),
            created_at: row.get(4),
            secret: row.get(5),
        })
        .collect())
}

/// Records a delivery's outcome: delivered (`Ok`), or failed with `error`,
/// tried again after `retry` (`None`: given up).
async fn record(
    pool: &Pool,
    job_id: Uuid,
    outcome: Result<(), (String, Option<Duration>)>,
) -> Result<(), StoreError> {
    let client = pool.get().await?;
    match outcome {
        Ok(()) => {
            client
                .execute(
                    "UPDATE job_callbacks SET delivered_at = now(), lease_until = NULL
                     WHERE job_id = $1",
                    &[&job_id],
                )
                .await?
        }
        Err((error, Some(retry))) => {
            client
                .execute(
                    "UPDATE job_callbacks SET last_error = $2, lease_until = NULL,
                                              next_at = now() + make_interval(secs => $3)
                     WHERE job_id = $1",
                    &[&job_id, &error, &retry.as_secs_f64()],
                )
                .await?
        }
        Err((error, None)) => {
            client
                .execute(
                    "UPDATE job_callbacks SET last_error = $2, lease_until = NULL,
                                              gave_up_at = now()
                     WHERE job_id = $1",
                    &[&job_id, &error],
                )
                .await?
        }
    };
    Ok(())
}

/// Sends the due callbacks, every `[jobs] poll_interval`.
pub struct CallbackSender {
    pub jobs: Arc<Jobs>,
}

#[async_trait]
impl BackgroundService for CallbackSender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticks = tokio::time::interval(self.jobs.config.poll_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            let due = match take_due(&self.jobs.pool).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!("callbacks: taking due deliveries failed: {error}");
                    continue;
                }
            };
            let deliveries = due.into_iter().map(|due| async move {
                // Within the lease, name lookup and Postgres included: a
                // delivery outliving it could be sent twice.
                let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, self.deliver(&due));
                let outcome = attempt
                    .await
                    .unwrap_or_else(|_| Err("no answer in time".to_owned()))
                    .map_err(|error| {
                    let retry = FIRST_RETRY
                        .saturating_mul(1 << due.attempts.clamp(1, 13).saturating_sub(1))
                        .min(LONGEST_RETRY);
                    let age = due.created_at.elapsed().unwrap_or_default();
                    let retry = (age + retry < self.jobs.config.callback_retry_for).then_some(retry);
                    if retry.is_none() {
                        tracing::warn!(job = %due.job_id, url = %due.url, "callback given up: {error}");
                    }
                    (error, retry)
                });
                if let Err(error) = record(&self.jobs.pool, due.job_id, outcome).await {
                    tracing::warn!(job = %due.job_id, "callbacks: recording a delivery failed: {error}");
                }
            });
            futures_util::future::join_all(deliveries).await;
        }
    }
}

impl CallbackSender {
    /// One attempt: the job's event, signed, POSTed to its URL.
    async fn deliver(&self, due: &Due) -> Result<(), String> {
        let pool = &self.jobs.pool;
        let store_error = |e: StoreError| e.to_string();
        let Some(job) = store::get(pool, due.account_id, due.job_id)
            .await
            .map_err(store_error)?
        else {
            // Its record was retired: nothing left to tell.
            return Ok(());
        };
        let secret = match &due.secret {
            Some(secret) => secret.clone(),
            // A job that named its own URL before its account asked for
            // a secret: made now, once.
            None => account_secret(pool, due.account_id)
                .await
                .map_err(store_error)?,
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let event = json!({
            "id": format!("evt_{}", due.job_id.simple()),
            "type": format!("job.{}", job.status()),
            "created": now,
            "data": job.json(),
        });
        let body = event.to_string();
        let client = self.client_for(&due.url).await?;
        let response = client
            .post(&due.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sign(&secret, body.as_bytes(), now))
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    }

    /// A client for `url` that connects only to the address checked here
    /// (a public one, unless private ones are allowed), never following a
    /// redirect elsewhere.
    async fn client_for(&self, url: &str) -> Result<reqwest::Client, String> {
        let uri: http::Uri = url.parse().map_err(|_| "not a URL".to_owned())?;
        let host = uri
            .host()
            .ok_or("no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let address: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("{host}: {e}"))?
            .find(|a| self.jobs.config.callback_allow_private || is_public(a.ip()))
            .ok_or_else(|| format!("{host} has no public address"))?;
        reqwest::Client::builder()
            .timeout(DELIVERY_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .resolve(&host, address)
            .build()
            .map_err(|e| e.to_string())
    }
}

/// An address on the internet at large: not loopback, private, link-local,
/// shared, documentation, multicast or unspecified.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_with_a_host_are_taken() {
        assert!(check_url("https://hooks.example.com/tollgate?x=1").is_ok());
        assert!(check_url("http://10.0.0.5:8080/cb").is_ok());
        for bad in [
            "ftp://example.com/",
            "example.com/cb",
            "https:///cb",
            "not a url",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(MAX_URL_BYTES))).is_err());
    }

    #[test]
    fn private_and_local_addresses_are_not_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "::ffff:93.184.216.34",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
