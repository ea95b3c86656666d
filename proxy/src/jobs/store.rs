//! Jobs in Postgres (`sql/V10__jobs.sql`), the system of record for them.
//!
//! Every gateway runs jobs; none owns one for longer than its lease. A
//! runner claims runnable jobs with `FOR UPDATE SKIP LOCKED` (two runners
//! never take the same job, and neither waits on the other's rows), holding
//! each by a lease it renews. A job whose lease lapses (its gateway died)
//! is runnable again; each claim raises the job's `attempt`, and every write
//! a runner makes names the attempt it holds, so a runner that lost its job
//! cannot overwrite what the next one did.

use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::keys::secret::KeyHash;
use crate::keys::store::StoreError;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl JobState {
    pub const ALL: [Self; 6] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }

    fn parse(state: &str) -> Self {
        match state {
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "expired" => Self::Expired,
            // The table's CHECK allows nothing else.
            _ => Self::Queued,
        }
    }
}

/// A request to run later, as submitted.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub account_id: Uuid,
    pub key_id: Uuid,
    pub tier: String,
    /// The tier's priority: higher is claimed first.
    pub priority: i32,
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// `Idempotency-Key`: the same key and body give the same job.
    pub idempotency_key: Option<String>,
    /// Where to POST the ended job (else the account's URL, if any).
    pub callback_url: Option<String>,
}

/// A job as its owner sees it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: Uuid,
    #[serde(skip)]
    pub account_id: Uuid,
    pub state: JobState,
    pub method: String,
    pub path: String,
    pub attempt: i32,
    #[serde(with = "unix_seconds")]
    pub created_at: SystemTime,
    #[serde(with = "unix_seconds::option")]
    pub started_at: Option<SystemTime>,
    #[serde(with = "unix_seconds::option")]
    pub finished_at: Option<SystemTime>,
    pub result_status: Option<i32>,
    pub result_type: Option<String>,
    #[serde(skip)]
    pub result_key: Option<String>,
    pub result_bytes: Option<i64>,
    pub error: Option<Value>,
    /// When its request got its GPU slot and was sent (a running job may
    /// still wait for one).
    #[serde(with = "unix_seconds::option")]
    pub sent_at: Option<SystemTime>,
    /// Waiting for a GPU to wake (its model had none up) since then.
    #[serde(with = "unix_seconds::option")]
    pub waiting_since: Option<SystemTime>,
    /// When it was expected to get its slot, where the queue knew.
    #[serde(with = "unix_seconds::option")]
    pub expected_start_at: Option<SystemTime>,
}

impl JobRecord {
    /// Its status as its owner sees it: a job claimed but still waiting for
    /// its GPU slot is `queued`, or `waiting_for_capacity` while a GPU wakes
    /// for it.
    pub fn status(&self) -> &'static str {
        match self.state {
            JobState::Running if self.sent_at.is_none() && self.waiting_since.is_some() => {
                "waiting_for_capacity"
            }
            JobState::Running if self.sent_at.is_none() => JobState::Queued.as_str(),
            state => state.as_str(),
        }
    }

    /// The job as the API shows it.
    pub fn json(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("object".into(), "job".into());
            object.insert("status".into(), self.status().into());
            object.remove("state");
            let result = match self.result_status {
                Some(status) if self.state == JobState::Succeeded => json!({
                    "status": status,
                    "content_type": self.result_type,
                    "bytes": self.result_bytes,
                    "url": format!("/v1/jobs/{}/result", self.id),
                }),
                _ => Value::Null,
            };
            object.insert("result".into(), result);
            for field in ["result_status", "result_type", "result_bytes"] {
                object.remove(field);
            }
        }
        value
    }
}

/// What submitting gave.
#[derive(Debug, Clone)]
pub enum Submitted {
    Created(JobRecord),
    /// The idempotency key named a job submitted before with the same body.
    Existing(JobRecord),
}

/// A job a runner now holds.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: Uuid,
    /// Names this claim in every later write (see the module's doc).
    pub attempt: i32,
    pub account_id: Uuid,
    pub key_id: Uuid,
    /// The submitting key's, so the run is authenticated as it (a key
    /// revoked since refuses its jobs too).
    pub key_hash: KeyHash,
    pub tier: String,
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// An earlier attempt sent the request to a backend.
    pub sent_before: bool,
    pub created_at: SystemTime,
    /// The batch it is a line of: finalized once its last job ends.
    pub batch_id: Option<Uuid>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum Finish {
    /// An answer was stored (any status: a backend's 400 is a result too).
    Answered {
        status: i32,
        content_type: Option<String>,
        result_key: String,
        bytes: i64,
    },
    /// No answer: why, OpenAI-shaped.
    Failed(Value),
}

const COLUMNS: &str = "id, account_id, state, method, path, attempt, created_at, started_at, \
                       finished_at, result_status, result_type, result_key, result_bytes, error, \
                       sent_at, waiting_since, expected_start_at";

fn record(row: &Row) -> JobRecord {
    JobRecord {
        id: row.get("id"),
        account_id: row.get("account_id"),
        state: JobState::parse(row.get("state")),
        method: row.get("method"),
        path: row.get("path"),
        attempt: row.get("attempt"),
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        result_status: row.get("result_status"),
        result_type: row.get("result_type"),
        result_key: row.get("result_key"),
        result_bytes: row.get("result_bytes"),
        error: row.get("error"),
        sent_at: row.get("sent_at"),
        waiting_since: row.get("waiting_since"),
        expected_start_at: row.get("expected_start_at"),
    }
}

/// Stores `job` as queued. With an idempotency key already used by the
/// account: the earlier job when the body is the same, else a conflict.
pub async fn submit(pool: &Pool, job: &NewJob) -> Result<Submitted, StoreError> {
    let client = pool.get().await?;
    let digest = Sha256::digest(&job.body).to_vec();
    let inserted = client
        .query_opt(
            &format!(
                "INSERT INTO jobs (id, account_id, key_id, tier, priority, method, path,
                                   content_type, body, body_sha256, idempotency_key, callback_url)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL
                 DO NOTHING
                 RETURNING {COLUMNS}"
            ),
            &[
                &Uuid::now_v7(),
                &job.account_id,
                &job.key_id,
                &job.tier,
                &job.priority,
                &job.method,
                &job.path,
                &job.content_type,
                &job.body,
                &digest,
                &job.idempotency_key,
                &job.callback_url,
            ],
        )
        .await?;
    if let Some(row) = inserted {
        return Ok(Submitted::Created(record(&row)));
    }
    // The key was used: the same request gets the same job.
    let row = client
        .query_one(
            &format!(
                "SELECT {COLUMNS}, body_sha256 FROM jobs
                 WHERE account_id = $1 AND idempotency_key = $2"
            ),
            &[&job.account_id, &job.idempotency_key],
        )
        .await?;
    let earlier: Vec<u8> = row.get("body_sha256");
    if earlier == digest {
        Ok(Submitted::Existing(record(&row)))
    } else {
        Err(StoreError::Conflict(
            "This Idempotency-Key was used with another request body.".into(),
        ))
    }
}

/// Whether the account has `cap` jobs or more waiting to be claimed
/// (counting no further than the cap).
pub async fn queued_at_least(pool: &Pool, account_id: Uuid, cap: u64) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let cap = i64::try_from(cap).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE account_id = $1 AND state = 'queued'
                                   LIMIT $2) AS queued",
            &[&account_id, &cap],
        )
        .await?;
    Ok(row.get::<_, i64>(0) >= cap)
}

/// The account's job `id` (`None` for another account's: a job is not
/// known to anyone else).
pub async fn get(pool: &Pool, account_id: Uuid, id: Uuid) -> Result<Option<JobRecord>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 AND account_id = $2"),
            &[&id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(record))
}

/// The account's jobs, newest first, up to `limit`, those older than
/// `before` when given (the last id of the previous page).
pub async fn list(
    pool: &Pool,
    account_id: Uuid,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<JobRecord>, StoreError> {
    let client = pool.get().await?;
    // Ids are UUIDv7, ordered by creation: one comparison pages.
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM jobs
                 WHERE account_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&account_id, &before, &limit],
        )
        .await?;
    Ok(rows.iter().map(record).collect())
}

/// Queues the callback of each job a statement ended, from its CTE `done`
/// (`RETURNING id, account_id, callback_url, batch_id`): the job's URL,
/// else its account's; a batch's lines have none (their batch is what ends).
const QUEUE_CALLBACK: &str = "callback AS (
    INSERT INTO job_callbacks (job_id, url)
    SELECT done.id, coalesce(done.callback_url, a.callback_url)
    FROM done JOIN accounts a ON a.id = done.account_id
    WHERE done.batch_id IS NULL AND coalesce(done.callback_url, a.callback_url) IS NOT NULL)";

/// Cancels the account's job `id` unless it has ended (its callback, if
/// any, is queued). A running job's runner learns of it at its next write,
/// which no longer matches.
pub async fn cancel(
    pool: &Pool,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<JobRecord>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!(
                "WITH done AS (
                     UPDATE jobs SET state = 'cancelled', finished_at = now(), lease_owner = NULL,
                                     lease_until = NULL
                     WHERE id = $1 AND account_id = $2 AND state IN ('queued', 'running')
                     RETURNING {COLUMNS}, callback_url, batch_id),
                 {QUEUE_CALLBACK}
                 SELECT {COLUMNS} FROM done"
            ),
            &[&id, &account_id],
        )
        .await?;
    match row {
        Some(row) => Ok(Some(record(&row))),
        // Ended already (or not the account's): as it is.
        None => get(pool, account_id, id).await,
    }
}

/// Claims up to `limit` runnable jobs for `owner`, highest priority and
/// oldest first: queued ones, and running ones whose lease lapsed.
pub async fn claim(
    pool: &Pool,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<Claim>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "UPDATE jobs j SET state = 'running', attempt = attempt + 1, lease_owner = $1,
                               lease_until = now() + make_interval(secs => $2),
                               started_at = coalesce(started_at, now())
             FROM api_keys k
             WHERE k.id = j.key_id AND j.id IN (
                 SELECT id FROM jobs
                 WHERE (state = 'queued' AND run_after <= now())
                    OR (state = 'running' AND lease_until < now())
                 ORDER BY priority DESC, created_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             RETURNING j.id, j.attempt, j.account_id, j.key_id, k.hash, j.tier, j.method,
                       j.path, j.content_type, j.body, j.sent_at IS NOT NULL AS sent,
                       j.created_at, j.batch_id",
            &[&owner, &lease.as_secs_f64(), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Claim {
            id: row.get("id"),
            attempt: row.get("attempt"),
            account_id: row.get("account_id"),
            key_id: row.get("key_id"),
            key_hash: KeyHash(row.get::<_, &[u8]>("hash").try_into().unwrap_or([0; 32])),
            tier: row.get("tier"),
            method: row.get("method"),
            path: row.get("path"),
            content_type: row.get("content_type"),
            body: row.get("body"),
            sent_before: row.get("sent"),
            created_at: row.get("created_at"),
            batch_id: row.get("batch_id"),
        })
        .collect())
}

/// Extends `owner`'s leases on the jobs it still runs; returns their ids
/// (a job missing from them was cancelled, or taken over).
pub async fn renew(pool: &Pool, owner: &str, lease: Duration) -> Result<Vec<Uuid>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "UPDATE jobs SET lease_until = now() + make_interval(secs => $2)
             WHERE lease_owner = $1 AND state = 'running'
             RETURNING id",
            &[&owner, &lease.as_secs_f64()],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Records what the claim's request waits for in its gateway's queue: a
/// GPU to wake (`waiting_since`), and when it is expected to start.
pub async fn note_wait(
    pool: &Pool,
    id: Uuid,
    attempt: i32,
    waiting_since: Option<SystemTime>,
    expected_start_at: Option<SystemTime>,
) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE jobs SET waiting_since = $3, expected_start_at = $4
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
            &[&id, &attempt, &waiting_since, &expected_start_at],
        )
        .await?;
    Ok(())
}

/// Records that the claim's request is going to a backend; `false` when
/// the claim was lost (cancelled, or taken over): then it must not be sent.
pub async fn mark_sent(pool: &Pool, id: Uuid, attempt: i32) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let updated = client
        .execute(
            "UPDATE jobs SET sent_at = now(), waiting_since = NULL, expected_start_at = NULL
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
            &[&id, &attempt],
        )
        .await?;
    Ok(updated == 1)
}

/// Puts the claim's job back in the queue, not to be claimed again for
/// `after`: for an answer showing no backend did its work (a refusal for
/// now, 429 or 503 with `Retry-After`), so its request counts as unsent.
/// `false` when the claim was lost.
pub async fn requeue(
    pool: &Pool,
    id: Uuid,
    attempt: i32,
    after: Duration,
) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let updated = client
        .execute(
            "UPDATE jobs SET state = 'queued', run_after = now() + make_interval(secs => $3),
                             sent_at = NULL, waiting_since = NULL, expected_start_at = NULL,
                             lease_owner = NULL, lease_until = NULL
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
            &[&id, &attempt, &after.as_secs_f64()],
        )
        .await?;
    Ok(updated == 1)
}

/// Ends the claim's run; `false` when the claim was lost, and then nothing
/// changed. Its callback, if any, is queued in the same statement.
pub async fn finish(pool: &Pool, id: Uuid, attempt: i32, how: &Finish) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let ended = |set: &str| {
        format!(
            "WITH done AS (
                 UPDATE jobs SET {set}, finished_at = now(), lease_owner = NULL, lease_until = NULL
                 WHERE id = $1 AND attempt = $2 AND state = 'running'
                 RETURNING id, account_id, callback_url, batch_id),
             {QUEUE_CALLBACK}
             SELECT count(*) FROM done"
        )
    };
    let row = match how {
        Finish::Answered {
            status,
            content_type,
            result_key,
            bytes,
        } => {
            let set = "state = 'succeeded', result_status = $3, result_type = $4, \
                       result_key = $5, result_bytes = $6";
            client
                .query_one(
                    &ended(set),
                    &[&id, &attempt, status, content_type, result_key, bytes],
                )
                .await?
        }
        Finish::Failed(error) => {
            client
                .query_one(
                    &ended("state = 'failed', error = $3"),
                    &[&id, &attempt, error],
                )
                .await?
        }
    };
    Ok(row.get::<_, i64>(0) == 1)
}

/// A result whose time is up: its key in the result store, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub id: Uuid,
    pub result_key: String,
    pub bytes: i64,
}

/// Marks `expired` the succeeded jobs of `tier` that finished more than
/// `retention` ago, up to `limit` of them, and returns their results for
/// the caller to delete. A crash between the two leaks those files: no
/// later sweep sees them (comparing the store's listing with the table
/// would).
pub async fn expire(
    pool: &Pool,
    tier: &str,
    retention: Duration,
    limit: i64,
) -> Result<Vec<Expired>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "UPDATE jobs SET state = 'expired'
             WHERE id IN (
                 SELECT id FROM jobs
                 WHERE state = 'succeeded' AND tier = $1
                   AND finished_at < now() - make_interval(secs => $2)
                 ORDER BY finished_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             RETURNING id, result_key, coalesce(result_bytes, 0) AS bytes",
            &[&tier, &retention.as_secs_f64(), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some(Expired {
                id: row.get("id"),
                result_key: row.get::<_, Option<String>>("result_key")?,
                bytes: row.get("bytes"),
            })
        })
        .collect())
}

/// Deletes up to `limit` records of jobs that ended (failed, cancelled,
/// their result expired) more than `retention` ago; returns how many.
pub async fn retire(pool: &Pool, retention: Duration, limit: i64) -> Result<u64, StoreError> {
    let client = pool.get().await?;
    Ok(client
        .execute(
            "DELETE FROM jobs WHERE id IN (
                 SELECT id FROM jobs
                 WHERE state IN ('failed', 'cancelled', 'expired')
                   AND finished_at < now() - make_interval(secs => $1)
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
            &[&retention.as_secs_f64(), &limit],
        )
        .await?)
}

/// The jobs as a whole, for the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Jobs by state (every state listed, 0 when none).
    pub by_state: Vec<(JobState, i64)>,
    /// Bytes of the results kept.
    pub result_bytes: i64,
    /// Age of the oldest queued job.
    pub oldest_queued: Duration,
}

pub async fn figures(pool: &Pool) -> Result<Figures, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT state, count(*), coalesce(sum(result_bytes) FILTER (WHERE state = 'succeeded'), 0)::bigint,
                    coalesce(extract(epoch FROM now() - min(created_at)
                                     FILTER (WHERE state = 'queued')), 0)::float8
             FROM jobs GROUP BY state",
            &[],
        )
        .await?;
    let mut figures = Figures {
        by_state: JobState::ALL.iter().map(|state| (*state, 0)).collect(),
        ..Figures::default()
    };
    for row in rows {
        let state = JobState::parse(row.get(0));
        if let Some(count) = figures.by_state.iter_mut().find(|(s, _)| *s == state) {
            count.1 = row.get(1);
        }
        figures.result_bytes += row.get::<_, i64>(2);
        let oldest = Duration::try_from_secs_f64(row.get(3)).unwrap_or_default();
        figures.oldest_queued = figures.oldest_queued.max(oldest);
    }
    Ok(figures)
}

/// Timestamps as Unix seconds, OpenAI's convention (`created_at`).
mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde::Serializer;

    pub fn serialize<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }

    pub mod option {
        use std::time::SystemTime;

        use serde::Serializer;

        pub fn serialize<S: Serializer>(at: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match at {
                Some(at) => super::serialize(at, s),
                None => s.serialize_none(),
            }
        }
    }
}
