//! OpenAI's Files and Batch APIs over jobs (`sql/V12__files_and_batches.sql`).
//! A batch is one job per line of its input file, all created in one
//! transaction; it is *finalized* once none of its jobs is left to run: its
//! answers are written to an output file (and its failures to an error
//! file) in OpenAI's JSONL shape, and it completes. Whoever sees a batch
//! done first finalizes it (the runner that finished its last job, a cancel,
//! or any gateway's upkeep); the claim on it is one conditional update.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use super::results::{ResultError, ResultStore};
use crate::keys::store::StoreError;

/// A finalizer that died leaves its batch `finalizing`; after this another
/// takes it over.
const FINALIZE_TAKEOVER: Duration = Duration::from_secs(600);

pub const FILE_PREFIX: &str = "file-";
pub const BATCH_PREFIX: &str = "batch_";

/// An id as the API writes it: `file-…`, `batch_…`.
pub fn public_id(prefix: &str, id: Uuid) -> String {
    format!("{prefix}{}", id.simple())
}

/// The id in `text` (`file-…` or the bare UUID).
pub fn parse_id(prefix: &str, text: &str) -> Option<Uuid> {
    Uuid::parse_str(text.strip_prefix(prefix).unwrap_or(text)).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Results(#[from] ResultError),
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Store(error.into())
    }
}

impl From<deadpool_postgres::PoolError> for BatchError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Self::Store(error.into())
    }
}

// ---------------------------------------------------------------- files

#[derive(Debug, Clone)]
pub struct FileRecord {
    pub id: Uuid,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub storage_key: String,
    pub created_at: SystemTime,
    pub expires_at: Option<SystemTime>,
}

impl FileRecord {
    /// OpenAI's file object.
    pub fn json(&self) -> Value {
        json!({
            "id": public_id(FILE_PREFIX, self.id),
            "object": "file",
            "bytes": self.bytes,
            "created_at": unix(self.created_at),
            "expires_at": self.expires_at.map(unix),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        })
    }
}

const FILE_COLUMNS: &str = "id, purpose, filename, bytes, storage_key, created_at, expires_at";

fn file(row: &Row) -> FileRecord {
    FileRecord {
        id: row.get("id"),
        purpose: row.get("purpose"),
        filename: row.get("filename"),
        bytes: row.get("bytes"),
        storage_key: row.get("storage_key"),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
    }
}

/// Where a file's bytes are kept.
pub fn file_key(account_id: Uuid, id: Uuid) -> String {
    format!("files/{account_id}/{id}")
}

/// Records a file whose bytes are stored under [`file_key`].
pub async fn create_file(
    pool: &Pool,
    account_id: Uuid,
    id: Uuid,
    purpose: &str,
    filename: &str,
    bytes: i64,
    expires_at: Option<SystemTime>,
) -> Result<FileRecord, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            &format!(
                "INSERT INTO files (id, account_id, purpose, filename, bytes, storage_key, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {FILE_COLUMNS}"
            ),
            &[
                &id,
                &account_id,
                &purpose,
                &filename,
                &bytes,
                &file_key(account_id, id),
                &expires_at,
            ],
        )
        .await?;
    Ok(file(&row))
}

/// The account's file `id`.
pub async fn get_file(
    pool: &Pool,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<FileRecord>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND account_id = $2"),
            &[&id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(file))
}

/// The account's files, newest first, older than `after` when given.
pub async fn list_files(
    pool: &Pool,
    account_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<FileRecord>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {FILE_COLUMNS} FROM files
                 WHERE account_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&account_id, &after, &limit],
        )
        .await?;
    Ok(rows.iter().map(file).collect())
}

/// Deletes the account's file `id`'s record, returning it (its bytes are
/// the caller's to delete).
pub async fn delete_file(
    pool: &Pool,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<FileRecord>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!(
                "DELETE FROM files WHERE id = $1 AND account_id = $2 RETURNING {FILE_COLUMNS}"
            ),
            &[&id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(file))
}

/// Deletes up to `limit` records of files past their expiry, returning them.
pub async fn expire_files(pool: &Pool, limit: i64) -> Result<Vec<FileRecord>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!(
                "DELETE FROM files WHERE id IN (
                     SELECT id FROM files WHERE expires_at < now()
                     LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING {FILE_COLUMNS}"
            ),
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(file).collect())
}

// ---------------------------------------------------------------- batches

/// One line of a batch's input, checked.
#[derive(Debug, Clone)]
pub struct BatchLine {
    pub custom_id: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct NewBatch {
    pub account_id: Uuid,
    pub key_id: Uuid,
    pub tier: String,
    /// The tier's priority, which its jobs are claimed by.
    pub priority: i32,
    pub endpoint: String,
    pub input_file_id: Uuid,
    pub completion_window: String,
    pub window: Duration,
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub id: Uuid,
    pub endpoint: String,
    pub input_file_id: Uuid,
    pub completion_window: String,
    pub status: String,
    pub metadata: Option<Value>,
    pub errors: Option<Value>,
    pub total: i32,
    pub completed: i64,
    pub failed: i64,
    pub output_file_id: Option<Uuid>,
    pub error_file_id: Option<Uuid>,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub in_progress_at: Option<SystemTime>,
    pub finalizing_at: Option<SystemTime>,
    pub completed_at: Option<SystemTime>,
    pub failed_at: Option<SystemTime>,
    pub cancelling_at: Option<SystemTime>,
    pub cancelled_at: Option<SystemTime>,
}

impl BatchRecord {
    /// OpenAI's batch object.
    pub fn json(&self) -> Value {
        let at = |t: Option<SystemTime>| t.map(unix);
        json!({
            "id": public_id(BATCH_PREFIX, self.id),
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": public_id(FILE_PREFIX, self.input_file_id),
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id.map(|id| public_id(FILE_PREFIX, id)),
            "error_file_id": self.error_file_id.map(|id| public_id(FILE_PREFIX, id)),
            "created_at": unix(self.created_at),
            "in_progress_at": at(self.in_progress_at),
            "expires_at": unix(self.expires_at),
            "finalizing_at": at(self.finalizing_at),
            "completed_at": at(self.completed_at),
            "failed_at": at(self.failed_at),
            "expired_at": null,
            "cancelling_at": at(self.cancelling_at),
            "cancelled_at": at(self.cancelled_at),
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        })
    }
}

/// A batch's columns, with its jobs' counts while it runs (once finalized,
/// its own: its jobs' records may be retired since), counted as finalizing
/// files them: a succeeded job's answer is output, anything else an error.
const BATCH_COLUMNS: &str = "b.id, b.endpoint, b.input_file_id, b.completion_window, b.status, \
     b.metadata, b.errors, b.total, b.output_file_id, b.error_file_id, b.created_at, \
     b.expires_at, b.in_progress_at, b.finalizing_at, b.completed_at, b.failed_at, \
     b.cancelling_at, b.cancelled_at, \
     coalesce(b.completed, (SELECT count(*) FROM jobs j WHERE j.batch_id = b.id \
                            AND j.state = 'succeeded'))::bigint AS completed, \
     coalesce(b.failed, (SELECT count(*) FROM jobs j WHERE j.batch_id = b.id \
                         AND j.state IN ('failed', 'cancelled', 'expired')))::bigint AS failed";

fn batch(row: &Row) -> BatchRecord {
    BatchRecord {
        id: row.get("id"),
        endpoint: row.get("endpoint"),
        input_file_id: row.get("input_file_id"),
        completion_window: row.get("completion_window"),
        status: row.get("status"),
        metadata: row.get("metadata"),
        errors: row.get("errors"),
        total: row.get("total"),
        completed: row.get("completed"),
        failed: row.get("failed"),
        output_file_id: row.get("output_file_id"),
        error_file_id: row.get("error_file_id"),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        in_progress_at: row.get("in_progress_at"),
        finalizing_at: row.get("finalizing_at"),
        completed_at: row.get("completed_at"),
        failed_at: row.get("failed_at"),
        cancelling_at: row.get("cancelling_at"),
        cancelled_at: row.get("cancelled_at"),
    }
}

/// Creates the batch and a queued job for each line, in one transaction:
/// either every line will run, or none.
pub async fn create_batch(
    pool: &Pool,
    new: &NewBatch,
    lines: &[BatchLine],
) -> Result<BatchRecord, StoreError> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    let id = Uuid::now_v7();
    transaction
        .execute(
            "INSERT INTO batches (id, account_id, tier, endpoint, input_file_id,
                                  completion_window, status, metadata, total, expires_at,
                                  in_progress_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'in_progress', $7, $8,
                     now() + make_interval(secs => $9), now())",
            &[
                &id,
                &new.account_id,
                &new.tier,
                &new.endpoint,
                &new.input_file_id,
                &new.completion_window,
                &new.metadata,
                &(lines.len() as i32),
                &new.window.as_secs_f64(),
            ],
        )
        .await?;
    // In input order: job ids are UUIDv7, minted here one after another.
    let ids: Vec<Uuid> = lines.iter().map(|_| Uuid::now_v7()).collect();
    let custom_ids: Vec<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
    let bodies: Vec<&[u8]> = lines.iter().map(|l| l.body.as_slice()).collect();
    transaction
        .execute(
            "INSERT INTO jobs (id, account_id, key_id, tier, priority, method, path, content_type,
                               body, body_sha256, batch_id, custom_id)
             SELECT id, $3, $4, $5, $6, 'POST', $7, 'application/json', body, sha256(body), $8,
                    custom_id
             FROM unnest($1::uuid[], $2::bytea[], $9::text[]) AS line (id, body, custom_id)",
            &[
                &ids,
                &bodies,
                &new.account_id,
                &new.key_id,
                &new.tier,
                &new.priority,
                &new.endpoint,
                &id,
                &custom_ids,
            ],
        )
        .await?;
    let row = transaction
        .query_one(
            &format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.id = $1"),
            &[&id],
        )
        .await?;
    transaction.commit().await?;
    Ok(batch(&row))
}

/// Records a batch whose input did not validate: `failed` at once, with
/// `errors` saying which lines and why (OpenAI's shape).
pub async fn fail_batch(
    pool: &Pool,
    new: &NewBatch,
    errors: Value,
) -> Result<BatchRecord, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            &format!(
                "WITH b AS (
                     INSERT INTO batches (id, account_id, tier, endpoint, input_file_id,
                                          completion_window, status, metadata, errors,
                                          expires_at, failed_at, completed, failed)
                     VALUES ($1, $2, $3, $4, $5, $6, 'failed', $7, $8,
                             now() + make_interval(secs => $9), now(), 0, 0)
                     RETURNING *)
                 SELECT {BATCH_COLUMNS} FROM b"
            ),
            &[
                &Uuid::now_v7(),
                &new.account_id,
                &new.tier,
                &new.endpoint,
                &new.input_file_id,
                &new.completion_window,
                &new.metadata,
                &errors,
                &new.window.as_secs_f64(),
            ],
        )
        .await?;
    Ok(batch(&row))
}

pub async fn get_batch(
    pool: &Pool,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<BatchRecord>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.id = $1 AND b.account_id = $2"),
            &[&id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(batch))
}

/// The account's batches, newest first, older than `after` when given.
pub async fn list_batches(
    pool: &Pool,
    account_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<BatchRecord>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {BATCH_COLUMNS} FROM batches b
                 WHERE b.account_id = $1 AND ($2::uuid IS NULL OR b.id < $2)
                 ORDER BY b.id DESC LIMIT $3"
            ),
            &[&account_id, &after, &limit],
        )
        .await?;
    Ok(rows.iter().map(batch).collect())
}

/// Cancels the batch's jobs not ended yet and marks it `cancelling`
/// (finalizing makes it `cancelled`); returns the ids of the jobs stopped,
/// for the runs under way here, or `None` when there is no such batch.
pub async fn cancel_batch(
    pool: &Pool,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<Vec<Uuid>>, StoreError> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    let found = transaction
        .execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = now()
             WHERE id = $1 AND account_id = $2 AND status = 'in_progress'",
            &[&id, &account_id],
        )
        .await?;
    let exists = found == 1
        || transaction
            .query_opt(
                "SELECT 1 FROM batches WHERE id = $1 AND account_id = $2",
                &[&id, &account_id],
            )
            .await?
            .is_some();
    let stopped = transaction
        .query(
            "UPDATE jobs SET state = 'cancelled', finished_at = now(), lease_owner = NULL,
                             lease_until = NULL
             WHERE batch_id = $1 AND account_id = $2 AND state IN ('queued', 'running')
             RETURNING id",
            &[&id, &account_id],
        )
        .await?;
    transaction.commit().await?;
    Ok(exists.then(|| stopped.iter().map(|row| row.get(0)).collect()))
}

/// Batches none of whose jobs is left to run, not finalized yet (or whose
/// finalizer died), up to `limit`.
pub async fn due_batches(pool: &Pool, limit: i64) -> Result<Vec<Uuid>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT b.id FROM batches b
             WHERE (b.status IN ('in_progress', 'cancelling')
                    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id
                                    AND j.state IN ('queued', 'running')))
                OR (b.status = 'finalizing' AND b.finalizing_at < now() - make_interval(secs => $2))
             LIMIT $1",
            &[&limit, &FINALIZE_TAKEOVER.as_secs_f64()],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Finalizes batch `id` if none of its jobs is left to run and nobody else
/// is finalizing it: writes its output and error files and completes it
/// (or, cancelled, ends it `cancelled`). `retention`: how long its tier keeps
/// results, which its output files follow. Returns whether it did.
pub async fn finalize(
    pool: &Pool,
    results: &ResultStore,
    id: Uuid,
    retention: impl Fn(&str) -> Duration,
) -> Result<bool, BatchError> {
    let client = pool.get().await?;
    let Some(claimed) = client
        .query_opt(
            "UPDATE batches b SET status = 'finalizing', finalizing_at = now()
             WHERE b.id = $1
               AND ((b.status IN ('in_progress', 'cancelling')
                     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id
                                     AND j.state IN ('queued', 'running')))
                    OR (b.status = 'finalizing'
                        AND b.finalizing_at < now() - make_interval(secs => $2)))
             RETURNING b.account_id, b.tier, b.cancelling_at IS NOT NULL AS cancelled",
            &[&id, &FINALIZE_TAKEOVER.as_secs_f64()],
        )
        .await?
    else {
        return Ok(false);
    };
    let account_id: Uuid = claimed.get("account_id");
    let tier: String = claimed.get("tier");
    let cancelled: bool = claimed.get("cancelled");
    let jobs = client
        .query(
            "SELECT id, custom_id, state, result_status, result_key, error FROM jobs
             WHERE batch_id = $1 ORDER BY id",
            &[&id],
        )
        .await?;
    let mut outputs = Vec::new();
    let mut errors = Vec::new();
    for job in &jobs {
        let job_id: Uuid = job.get("id");
        let line = json!({
            "id": format!("batch_req_{}", job_id.simple()),
            "custom_id": job.get::<_, Option<String>>("custom_id"),
        });
        let state: &str = job.get("state");
        let result_key: Option<String> = job.get("result_key");
        match (state, result_key) {
            ("succeeded", Some(key)) => {
                let status: Option<i32> = job.get("result_status");
                let body = read_json(results, &key).await?;
                outputs.push(with(
                    line,
                    json!({"status_code": status, "request_id": job_id.to_string(), "body": body}),
                    Value::Null,
                ));
            }
            _ => {
                let error: Option<Value> = job.get("error");
                let error = error.unwrap_or_else(|| match state {
                    "cancelled" => json!({"code": "batch_cancelled", "message": "The batch was cancelled before this request ran."}),
                    _ => json!({"code": "batch_expired", "message": "This request's result expired before the batch was finalized."}),
                });
                let entry = match error.get("status").and_then(Value::as_u64) {
                    // An answer from the backend (or the gateway): as OpenAI
                    // records a request that got a non-2xx answer.
                    Some(status) => with(
                        line,
                        json!({"status_code": status, "request_id": job_id.to_string(),
                               "body": {"error": without_status(&error)}}),
                        Value::Null,
                    ),
                    None => with(
                        line,
                        Value::Null,
                        json!({"code": error.get("code"), "message": error.get("message")}),
                    ),
                };
                errors.push(entry);
            }
        }
    }
    let expires_at = SystemTime::now() + retention(&tier);
    let output_file_id = write_file(
        pool, results, account_id, &outputs, "output", id, expires_at,
    )
    .await?;
    let error_file_id =
        write_file(pool, results, account_id, &errors, "errors", id, expires_at).await?;
    let end = if cancelled { "cancelled" } else { "completed" };
    client
        .execute(
            &format!(
                "UPDATE batches SET status = '{end}', {end}_at = now(), output_file_id = $2,
                                    error_file_id = $3, completed = $4, failed = $5
                 WHERE id = $1 AND status = 'finalizing'"
            ),
            &[
                &id,
                &output_file_id,
                &error_file_id,
                &(outputs.len() as i32),
                &(errors.len() as i32),
            ],
        )
        .await?;
    Ok(true)
}

/// `line` with its `response` and `error`.
fn with(mut line: Value, response: Value, error: Value) -> Value {
    line["response"] = response;
    line["error"] = error;
    line
}

fn without_status(error: &Value) -> Value {
    let mut error = error.clone();
    if let Some(object) = error.as_object_mut() {
        object.remove("status");
    }
    error
}

/// A stored answer as JSON (a batch's endpoints answer JSON); text otherwise.
async fn read_json(results: &ResultStore, key: &str) -> Result<Value, ResultError> {
    let bytes = results.read_all(key).await?;
    Ok(serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
}

/// Writes `lines` as a JSONL file of the account (`None` when there are none).
async fn write_file(
    pool: &Pool,
    results: &ResultStore,
    account_id: Uuid,
    lines: &[Value],
    what: &str,
    batch_id: Uuid,
    expires_at: SystemTime,
) -> Result<Option<Uuid>, BatchError> {
    if lines.is_empty() {
        return Ok(None);
    }
    let id = Uuid::now_v7();
    let chunks = futures_util::stream::iter(lines.iter().map(|line| {
        let mut text = line.to_string();
        text.push('\n');
        Ok::<_, std::io::Error>(Bytes::from(text))
    }));
    let bytes = results.write(&file_key(account_id, id), chunks).await?;
    let filename = format!("{}_{what}.jsonl", public_id(BATCH_PREFIX, batch_id));
    create_file(
        pool,
        account_id,
        id,
        "batch_output",
        &filename,
        bytes as i64,
        Some(expires_at),
    )
    .await?;
    Ok(Some(id))
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
