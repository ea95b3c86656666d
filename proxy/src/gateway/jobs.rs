//! The job routes: `Prefer: respond-async` on any inference route and
//! `POST /v1/jobs` store a request as a job and answer `202 Accepted` at
//! once; `GET /v1/jobs[/{id}]` read them, `DELETE /v1/jobs/{id}` cancels
//! one, `GET /v1/jobs/{id}/result` streams its answer. A job is its
//! account's alone: another account's id is a 404, as an unknown one is.
//!
//! Submission writes to Postgres before answering: the 202 is the promise
//! that the job will run, so it waits for the write (the one place a client
//! request waits on Postgres; a live request never does).

use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::request::{Endpoint, InferenceRequest, read_body};
use super::routes::{JobsRoute, Route, route};
use super::{Gateway, REQUEST_ID, Stop};
use crate::error::ApiError;
use crate::jobs::results::ResultError;
use crate::jobs::store::{self, JobRecord, JobState, NewJob, Submitted};
use crate::keys::store::KeyRecord;

/// Jobs a page of `GET /v1/jobs` holds unless `limit` says.
const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;
/// The longest `Idempotency-Key` kept.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Whether the client asked for an async answer (RFC 7240's
/// `Prefer: respond-async`, one preference among others).
pub fn wants_async(header: &RequestHeader) -> bool {
    header.headers.get_all("prefer").iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',').any(|p| {
                p.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("respond-async")
            })
        })
    })
}

/// `POST /v1/jobs`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    #[serde(default = "post")]
    method: String,
    path: String,
    body: Value,
}

fn post() -> String {
    "POST".to_owned()
}

impl Gateway {
    /// The `/v1/jobs` routes, for `key`'s account.
    pub(super) async fn jobs_api(
        &self,
        route: JobsRoute,
        session: &mut Session,
        key: &KeyRecord,
    ) -> Result<Stop, Stop> {
        let pool = &self.jobs.pool;
        let account = key.account_id;
        let found = |job: Option<JobRecord>, id: Uuid| {
            job.ok_or_else(|| {
                Stop::from(ApiError::NotFound(format!("No job found with id `{id}`.")))
            })
        };
        Ok(match route {
            JobsRoute::Create => return Box::pin(self.create_job(session, key)).await,
            JobsRoute::List => {
                let (after, limit) = page(session.req_header())?;
                let jobs = store::list(pool, account, after, limit + 1).await?;
                let has_more = jobs.len() as i64 > limit;
                let data: Vec<Value> = jobs.iter().take(limit as usize).map(job_json).collect();
                let last = data.last().and_then(|job| job.get("id").cloned());
                Stop::Answer(
                    200,
                    json!({"object": "list", "data": data, "has_more": has_more,
                           "first_id": data.first().and_then(|job| job.get("id").cloned()),
                           "last_id": last}),
                )
            }
            JobsRoute::Get(id) => {
                let id = id.ok_or_else(|| Stop::from(not_a_job(session.req_header())))?;
                Stop::Answer(
                    200,
                    job_json(&found(store::get(pool, account, id).await?, id)?),
                )
            }
            JobsRoute::Cancel(id) => {
                let id = id.ok_or_else(|| Stop::from(not_a_job(session.req_header())))?;
                let job = found(store::cancel(pool, account, id).await?, id)?;
                // Running here: stopped now (elsewhere: at its runner's next renewal).
                self.jobs.abort_local(id);
                Stop::Answer(200, job_json(&job))
            }
            JobsRoute::Result(id) => {
                let id = id.ok_or_else(|| Stop::from(not_a_job(session.req_header())))?;
                let job = found(store::get(pool, account, id).await?, id)?;
                return self.job_result(session, &job).await;
            }
        })
    }

    /// `POST /v1/jobs`: `{method, path, body}` for a JSON route.
    async fn create_job(&self, session: &mut Session, key: &KeyRecord) -> Result<Stop, Stop> {
        let body = read_body(session, self.max_body_bytes).await?;
        let job: JobRequest = serde_json::from_slice(&body).map_err(|e| {
            Stop::from(ApiError::bad_request(
                format!("The body must be a job: {{\"path\", \"body\"}} ({e})."),
                None,
            ))
        })?;
        let method = http::Method::from_bytes(job.method.as_bytes()).unwrap_or_default();
        let (endpoint, custom) = match route(&method, &job.path, &self.custom_routes) {
            Ok(Route::Inference(endpoint)) if !endpoint.takes_upload() => (endpoint, None),
            Ok(Route::Custom(i)) => (Endpoint::Custom, self.custom_routes.get(i)),
            Ok(_) | Err(_) => {
                return Err(Stop::from(ApiError::bad_request(
                    format!(
                        "`{} {}` is not an inference route taking JSON (an upload is submitted \
                         with `Prefer: respond-async` on its own route).",
                        job.method, job.path
                    ),
                    Some("path"),
                )));
            }
        };
        let body = Bytes::from(job.body.to_string());
        let request = match custom {
            Some(custom) => InferenceRequest::custom(custom, body),
            None => super::request::parse(endpoint, body)?,
        };
        self.model_route(key, &request.model)?;
        let path = job.path.trim_end_matches('/').to_owned();
        self.submit_job(
            session,
            key,
            path,
            Some("application/json".to_owned()),
            request.upstream_body,
        )
        .await
    }

    /// Stores a request, checked as a live one would be, as a job; answers
    /// 202 with the job (or the job its `Idempotency-Key` named before).
    pub(super) async fn submit_job(
        &self,
        session: &mut Session,
        key: &KeyRecord,
        path: String,
        content_type: Option<String>,
        body: Bytes,
    ) -> Result<Stop, Stop> {
        let header = session.req_header();
        let idempotency_key = match header.headers.get("idempotency-key") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .filter(|v| !v.is_empty() && v.len() <= MAX_IDEMPOTENCY_KEY)
                    .ok_or_else(|| {
                        Stop::from(ApiError::bad_request(
                            format!(
                                "`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY} visible characters."
                            ),
                            None,
                        ))
                    })?
                    .to_owned(),
            ),
        };
        let limit = self.jobs.config.max_queued_per_account;
        if store::queued(&self.jobs.pool, key.account_id).await? >= limit {
            return Err(ApiError::TooManyJobs { limit }.into());
        }
        let priority = self.admission.priority(&key.tier)?;
        let job = NewJob {
            account_id: key.account_id,
            key_id: key.key_id,
            tier: key.tier.clone(),
            priority,
            method: "POST".to_owned(),
            path,
            content_type,
            body: body.to_vec(),
            idempotency_key,
        };
        let job = match store::submit(&self.jobs.pool, &job).await? {
            Submitted::Created(job) => {
                self.jobs.submitted.notify_one();
                job
            }
            Submitted::Existing(job) => job,
        };
        let location = format!("/v1/jobs/{}", job.id);
        Ok(Stop::AnswerWith(
            202,
            job_json(&job),
            vec![("location", location)],
        ))
    }

    /// `GET /v1/jobs/{id}/result`: the stored answer, with its status and
    /// type, streamed from the result store.
    async fn job_result(&self, session: &mut Session, job: &JobRecord) -> Result<Stop, Stop> {
        let (Some(key), Some(status)) = (&job.result_key, job.result_status) else {
            let message = match job.state {
                JobState::Expired => "This job's result has expired and was deleted.".to_owned(),
                state => format!("This job has no result ({}).", status_name(job, state)),
            };
            return Err(ApiError::NotFound(message).into());
        };
        if job.state == JobState::Expired {
            return Err(ApiError::NotFound(
                "This job's result has expired and was deleted.".to_owned(),
            )
            .into());
        }
        let mut stream = match self.jobs.results.read(key).await {
            Ok(stream) => stream,
            Err(ResultError::Store(object_store::Error::NotFound { .. })) => {
                return Err(ApiError::NotFound(
                    "This job's result has expired and was deleted.".to_owned(),
                )
                .into());
            }
            Err(error) => {
                tracing::error!(job = %job.id, "job result unreadable: {error}");
                return Err(ApiError::DatabaseUnavailable.into());
            }
        };
        let status = u16::try_from(status).unwrap_or(200);
        let written = async {
            let mut answer = ResponseHeader::build(status, Some(4))?;
            if let Some(content_type) = &job.result_type {
                answer.insert_header(header::CONTENT_TYPE, content_type.as_str())?;
            }
            if let Some(bytes) = job.result_bytes {
                answer.insert_header(header::CONTENT_LENGTH, bytes.to_string())?;
            }
            answer.insert_header(REQUEST_ID, job.id.to_string())?;
            let head_only = session.req_header().method == http::Method::HEAD;
            session
                .write_response_header(Box::new(answer), head_only)
                .await?;
            if head_only {
                return Ok(());
            }
            use futures_util::StreamExt;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    pingora::Error::explain(pingora::ErrorType::ReadError, e.to_string())
                })?;
                session.write_response_body(Some(chunk), false).await?;
            }
            session.write_response_body(None, true).await
        };
        Ok(match written.await {
            Ok(()) => Stop::Written,
            Err(error) => Stop::ClientGone(error),
        })
    }
}

/// The job as the API shows it.
pub fn job_json(job: &JobRecord) -> Value {
    let mut value = serde_json::to_value(job).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("object".into(), "job".into());
        object.insert("status".into(), status_name(job, job.state).into());
        object.remove("state");
        object.insert(
            "result".into(),
            match job.result_status {
                Some(status) if job.state == JobState::Succeeded => json!({
                    "status": status,
                    "content_type": job.result_type,
                    "bytes": job.result_bytes,
                    "url": format!("/v1/jobs/{}/result", job.id),
                }),
                _ => Value::Null,
            },
        );
        for field in ["result_status", "result_type", "result_bytes"] {
            object.remove(field);
        }
    }
    value
}

/// A job claimed but still waiting for its GPU slot is `queued` to its owner.
fn status_name(job: &JobRecord, state: JobState) -> &'static str {
    match state {
        JobState::Running if job.sent_at.is_none() => JobState::Queued.as_str(),
        state => state.as_str(),
    }
}

/// `GET /v1/jobs`' page: `after` (the last id of the previous page), `limit`.
fn page(header: &RequestHeader) -> Result<(Option<Uuid>, i64), ApiError> {
    let mut after = None;
    let mut limit = DEFAULT_PAGE;
    for (name, value) in form_urlencoded::parse(header.uri.query().unwrap_or("").as_bytes()) {
        match &*name {
            "after" => {
                after = Some(value.parse().map_err(|_| {
                    ApiError::bad_request("`after` must be a job id.", Some("after"))
                })?);
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            format!("`limit` must be between 1 and {MAX_PAGE}."),
                            Some("limit"),
                        )
                    })?;
            }
            _ => {}
        }
    }
    Ok((after, limit))
}

fn not_a_job(header: &RequestHeader) -> ApiError {
    let id = header.uri.path().trim_start_matches("/v1/jobs/");
    let id = id.split('/').next().unwrap_or_default();
    ApiError::NotFound(format!("No job found with id `{id}`."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respond_async_is_one_preference_among_others() {
        let ask = |values: &[&str]| {
            let mut header = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
            for value in values {
                header.append_header("prefer", *value).unwrap();
            }
            wants_async(&header)
        };
        assert!(ask(&["respond-async"]));
        assert!(ask(&["return=minimal, Respond-Async; wait=10"]));
        assert!(ask(&["wait=5", "respond-async"]));
        assert!(!ask(&[]));
        assert!(!ask(&["respond-asynchronously", "return=representation"]));
    }
}
