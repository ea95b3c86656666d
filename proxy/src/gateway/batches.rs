//! OpenAI's Files and Batch APIs: `POST /v1/files` (purpose `batch`, a JSONL
//! file), `GET|DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`;
//! `POST|GET /v1/batches`, `GET /v1/batches/{id}`,
//! `POST /v1/batches/{id}/cancel`. A batch's lines are checked as live
//! requests would be, then each runs as a job (see [`crate::jobs::batches`]).

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::jobs::{Stored, item_id, list_json, no_such, page};
use super::request::{Endpoint, parse, read_body};
use super::routes::{Action, Resource, Route, route};
use super::{Gateway, Stop};
use crate::error::ApiError;
use crate::jobs::batches::{
    self, BATCH_PREFIX, BatchLine, FILE_PREFIX, NewBatch, file_key, public_id,
};
use crate::jobs::results::ResultError;
use crate::keys::store::KeyRecord;

/// OpenAI's only completion window.
const COMPLETION_WINDOW: &str = "24h";
const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// OpenAI's limit on a batch's requests.
const MAX_LINES: usize = 50_000;
/// Line errors a failed batch lists (the first ones).
const MAX_LINE_ERRORS: usize = 100;

/// `POST /v1/batches`' body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Value>,
}

/// One line of a batch's input file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    custom_id: String,
    method: String,
    url: String,
    body: Value,
}

impl Gateway {
    /// `/v1/files…` and `/v1/batches…`, for `key`'s account.
    pub(super) async fn batches_api(
        &self,
        resource: Resource,
        action: Action,
        session: &mut Session,
        key: &KeyRecord,
    ) -> Result<Stop, Stop> {
        let pool = &self.jobs.pool;
        let account = key.account_id;
        let (what, prefix) = match resource {
            Resource::Files => ("file", FILE_PREFIX),
            _ => ("batch", BATCH_PREFIX),
        };
        let missing = |session: &Session| Stop::from(no_such(what, session.req_header()));
        match (resource, action) {
            (Resource::Files, Action::Create) => self.upload_file(session, key).await,
            (Resource::Files, Action::List) => {
                let (after, limit) = page(session.req_header(), prefix)?;
                let files = batches::list_files(pool, account, after, limit + 1).await?;
                Ok(Stop::Answer(
                    200,
                    list_json(files.iter().map(|f| f.json()), limit),
                ))
            }
            (Resource::Files, Action::Get(id)) => {
                let id = item_id(id, what, session.req_header())?;
                let file = batches::get_file(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                Ok(Stop::Answer(200, file.json()))
            }
            (Resource::Files, Action::Delete(id)) => {
                let id = item_id(id, what, session.req_header())?;
                let file = batches::delete_file(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                if let Err(error) = self.jobs.results.delete(&file.storage_key).await {
                    tracing::warn!(file = %file.id, "deleted file's bytes not deleted: {error}");
                }
                let id = public_id(FILE_PREFIX, file.id);
                Ok(Stop::Answer(
                    200,
                    json!({"id": id, "object": "file", "deleted": true}),
                ))
            }
            (Resource::Files, Action::Sub(id)) => {
                let id = item_id(id, what, session.req_header())?;
                let file = batches::get_file(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                let stored = Stored {
                    key: &file.storage_key,
                    status: 200,
                    content_type: Some("application/octet-stream"),
                    bytes: Some(file.bytes),
                    gone: "This file has expired and was deleted.",
                };
                let request_id = public_id(FILE_PREFIX, file.id);
                self.send_stored(session, &stored, &request_id).await
            }
            (_, Action::Create) => Box::pin(self.create_batch(session, key)).await,
            (_, Action::List) => {
                let (after, limit) = page(session.req_header(), prefix)?;
                let found = batches::list_batches(pool, account, after, limit + 1).await?;
                Ok(Stop::Answer(
                    200,
                    list_json(found.iter().map(|b| b.json()), limit),
                ))
            }
            (_, Action::Get(id)) => {
                let id = item_id(id, what, session.req_header())?;
                let batch = batches::get_batch(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                Ok(Stop::Answer(200, batch.json()))
            }
            (_, Action::Sub(Some(id))) => {
                let stopped = batches::cancel_batch(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                for job in stopped {
                    self.jobs.abort_local(job);
                }
                self.jobs.finalize_batch(id).await;
                let batch = batches::get_batch(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                Ok(Stop::Answer(200, batch.json()))
            }
            (_, Action::Sub(None) | Action::Delete(_)) => Err(missing(session)),
        }
    }

    /// `POST /v1/files`: a form with `purpose` (`batch`) and `file`.
    async fn upload_file(&self, session: &mut Session, key: &KeyRecord) -> Result<Stop, Stop> {
        let content_type = session
            .req_header()
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_body(session, self.max_upload_bytes).await?;
        let (purpose, filename, content) = read_file_form(content_type.as_deref(), body).await?;
        if purpose != "batch" {
            return Err(ApiError::bad_request(
                "`purpose` must be `batch`: files here are the Batch API's input.",
                Some("purpose"),
            )
            .into());
        }
        let id = Uuid::now_v7();
        let storage_key = file_key(key.account_id, id);
        let size = content.len() as i64;
        let chunks = futures_util::stream::once(async move { Ok::<_, std::io::Error>(content) });
        self.jobs
            .results
            .write(&storage_key, chunks)
            .await
            .map_err(|error| {
                tracing::error!("file not stored: {error}");
                Stop::from(ApiError::DatabaseUnavailable)
            })?;
        let pool = &self.jobs.pool;
        let file =
            match batches::create_file(pool, key.account_id, id, &purpose, &filename, size, None)
                .await
            {
                Ok(file) => file,
                Err(error) => {
                    // No record, no file: its bytes go too.
                    let _ = self.jobs.results.delete(&storage_key).await;
                    return Err(error.into());
                }
            };
        Ok(Stop::Answer(200, file.json()))
    }

    /// `POST /v1/batches`: checks every line of the input file as a live
    /// request; any bad line fails the batch (with the lines' errors), else
    /// each runs as a job.
    async fn create_batch(&self, session: &mut Session, key: &KeyRecord) -> Result<Stop, Stop> {
        let asked: BatchRequest = self.read_json(session, "batch request").await?;
        let endpoint = match route(&http::Method::POST, &asked.endpoint, &[]) {
            Ok(Route::Inference(
                endpoint @ (Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Responses),
            )) => endpoint,
            _ => {
                return Err(ApiError::bad_request(
                    "`endpoint` must be /v1/chat/completions, /v1/completions, /v1/embeddings \
                     or /v1/responses.",
                    Some("endpoint"),
                )
                .into());
            }
        };
        if asked.completion_window != COMPLETION_WINDOW {
            return Err(ApiError::bad_request(
                "`completion_window` must be `24h`.",
                Some("completion_window"),
            )
            .into());
        }
        let file = match batches::parse_id(FILE_PREFIX, &asked.input_file_id) {
            Some(id) => batches::get_file(&self.jobs.pool, key.account_id, id).await?,
            None => None,
        }
        .filter(|file| file.purpose == "batch")
        .ok_or_else(|| {
            Stop::from(ApiError::NotFound(format!(
                "No batch input file found with id `{}`.",
                asked.input_file_id
            )))
        })?;
        let content = match self.jobs.results.read_all(&file.storage_key).await {
            Ok(content) => content,
            Err(ResultError::Store(object_store::Error::NotFound { .. })) => {
                let gone = "The input file's bytes are gone.";
                return Err(ApiError::NotFound(gone.into()).into());
            }
            Err(error) => {
                tracing::error!(file = %file.id, "batch input unreadable: {error}");
                return Err(ApiError::DatabaseUnavailable.into());
            }
        };
        let (lines, errors) = self.check_lines(key, endpoint, &asked.endpoint, &content);
        let new = NewBatch {
            account_id: key.account_id,
            key_id: key.key_id,
            tier: key.tier.clone(),
            priority: self.admission.priority(&key.tier)?,
            endpoint: endpoint.path().unwrap_or_default().to_owned(),
            input_file_id: file.id,
            completion_window: asked.completion_window,
            window: WINDOW,
            metadata: asked.metadata,
        };
        let batch = if errors.is_empty() {
            let batch = batches::create_batch(&self.jobs.pool, &new, &lines).await?;
            self.jobs.submitted.notify_one();
            batch
        } else {
            let errors = json!({"object": "list", "data": errors});
            batches::fail_batch(&self.jobs.pool, &new, errors).await?
        };
        Ok(Stop::Answer(200, batch.json()))
    }

    /// The input file's lines, checked; or the errors of the bad ones.
    fn check_lines(
        &self,
        key: &KeyRecord,
        endpoint: Endpoint,
        url: &str,
        content: &[u8],
    ) -> (Vec<BatchLine>, Vec<Value>) {
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        let mut custom_ids = HashSet::new();
        let text = String::from_utf8_lossy(content);
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let number = i + 1;
            let checked = serde_json::from_str::<InputLine>(line)
                .map_err(|e| format!("not a batch request line: {e}"))
                .and_then(|line| {
                    if line.method != "POST"
                        || line.url.trim_end_matches('/') != url.trim_end_matches('/')
                    {
                        return Err(format!(
                            "`method` must be POST and `url` the batch's endpoint ({url})"
                        ));
                    }
                    if !custom_ids.insert(line.custom_id.clone()) {
                        return Err(format!("`custom_id` {} is used twice", line.custom_id));
                    }
                    let body = Bytes::from(line.body.to_string());
                    let request = parse(endpoint, body).map_err(|e| e.to_string())?;
                    self.model_route(key, &request.model)
                        .map_err(|e| e.to_string())?;
                    Ok(BatchLine {
                        custom_id: line.custom_id,
                        body: request.upstream_body.to_vec(),
                    })
                });
            match checked {
                Ok(line) => lines.push(line),
                Err(message) if errors.len() < MAX_LINE_ERRORS => errors.push(
                    json!({"code": "invalid_request", "message": message, "param": null, "line": number}),
                ),
                Err(_) => {}
            }
        }
        if lines.len() + errors.len() > MAX_LINES {
            errors.push(
                json!({"code": "too_many_requests", "line": null, "param": null,
                               "message": format!("A batch holds at most {MAX_LINES} requests.")}),
            );
        }
        if lines.is_empty() && errors.is_empty() {
            errors.push(json!({"code": "empty_file", "line": null, "param": null,
                               "message": "The input file holds no requests."}));
        }
        (lines, errors)
    }
}

/// `purpose`, the file's name and its bytes, from a files upload's form.
async fn read_file_form(
    content_type: Option<&str>,
    body: Bytes,
) -> Result<(String, String, Bytes), ApiError> {
    let form_error =
        |why: String| ApiError::bad_request(format!("Invalid upload form: {why}."), None);
    let boundary = content_type
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "Send the file as multipart/form-data with `purpose` and `file`.",
                None,
            )
        })?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| form_error(e.to_string()))?
    {
        match field.name() {
            Some("purpose") if purpose.is_none() => {
                purpose = Some(field.text().await.map_err(|e| form_error(e.to_string()))?);
            }
            Some("file") if file.is_none() => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let bytes = field.bytes().await.map_err(|e| form_error(e.to_string()))?;
                file = Some((name, bytes));
            }
            Some(name @ ("purpose" | "file")) => {
                return Err(form_error(format!("`{name}` is sent twice")));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::bad_request("Missing required parameter `purpose`.", Some("purpose"))
    })?;
    let (filename, bytes) = file
        .ok_or_else(|| ApiError::bad_request("Missing required parameter `file`.", Some("file")))?;
    Ok((purpose.trim().to_owned(), filename, bytes))
}
