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
use futures_util::StreamExt;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::request::{Endpoint, InferenceRequest, read_body};
use super::routes::{Action, Route, route};
use super::{Gateway, REQUEST_ID, Stop};
use crate::error::ApiError;
use crate::jobs::callbacks;
use crate::jobs::results::ResultError;
use crate::jobs::store::{self, JobRecord, JobState, NewJob, Submitted};
use crate::keys::store::KeyRecord;

/// A job's own callback URL, on a `Prefer: respond-async` request.
const CALLBACK_URL_HEADER: &str = "x-tollgate-callback-url";
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
    #[serde(default)]
    callback_url: Option<String>,
}

fn post() -> String {
    "POST".to_owned()
}

impl Gateway {
    /// The `/v1/jobs` routes, for `key`'s account.
    pub(super) async fn jobs_api(
        &self,
        action: Action,
        session: &mut Session,
        key: &KeyRecord,
    ) -> Result<Stop, Stop> {
        let pool = &self.jobs.pool;
        let account = key.account_id;
        let missing = |session: &Session| Stop::from(no_such("job", session.req_header()));
        Ok(match action {
            Action::Create => return Box::pin(self.create_job(session, key)).await,
            Action::List => {
                let (after, limit) = page(session.req_header(), "")?;
                let jobs = store::list(pool, account, after, limit + 1).await?;
                Stop::Answer(200, list_json(jobs.iter().map(JobRecord::json), limit))
            }
            Action::Get(id) => {
                let id = item_id(id, "job", session.req_header())?;
                let job = store::get(pool, account, id).await?;
                Stop::Answer(200, job.ok_or_else(|| missing(session))?.json())
            }
            Action::Delete(id) => {
                let id = item_id(id, "job", session.req_header())?;
                let job = store::cancel(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                // Running here: stopped now (elsewhere: at its runner's next renewal).
                self.jobs.abort_local(id);
                Stop::Answer(200, JobRecord::json(&job))
            }
            Action::Sub(id) => {
                let id = item_id(id, "job", session.req_header())?;
                let job = store::get(pool, account, id)
                    .await?
                    .ok_or_else(|| missing(session))?;
                return self.job_result(session, &job).await;
            }
        })
    }

    /// `GET /v1/callbacks`: the account's callback URL and the secret its
    /// callbacks are signed with (made on first ask); `POST` with
    /// `{"url": …}` (or `null`) sets the URL first.
    pub(super) async fn callbacks_api(
        &self,
        session: &mut Session,
        key: &KeyRecord,
    ) -> Result<Stop, Stop> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Settings {
            url: Option<String>,
        }
        let pool = &self.jobs.pool;
        if session.req_header().method == http::Method::POST {
            let settings: Settings = self.read_json(session, "callback settings").await?;
            if let Some(url) = &settings.url {
                callbacks::check_url(url)
                    .map_err(|why| Stop::from(ApiError::bad_request(why, Some("url"))))?;
            }
            callbacks::set_account_url(pool, key.account_id, settings.url.as_deref()).await?;
        }
        let secret = callbacks::account_secret(pool, key.account_id).await?;
        let url = callbacks::account_url(pool, key.account_id).await?;
        Ok(Stop::Answer(
            200,
            json!({"object": "callback_settings", "url": url, "secret": secret}),
        ))
    }

    /// The request's JSON body as a `T` (`what` names it in the 400).
    pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        session: &mut Session,
        what: &str,
    ) -> Result<T, Stop> {
        let body = read_body(session, self.max_body_bytes).await?;
        serde_json::from_slice(&body)
            .map_err(|e| Stop::from(ApiError::bad_request(format!("Invalid {what}: {e}."), None)))
    }

    /// `POST /v1/jobs`: `{method, path, body}` for a JSON route.
    async fn create_job(&self, session: &mut Session, key: &KeyRecord) -> Result<Stop, Stop> {
        let job: JobRequest = self.read_json(session, "job").await?;
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
        self.store_job(
            session,
            key,
            path,
            Some("application/json".to_owned()),
            request.upstream_body,
            job.callback_url,
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
        let callback_url = header_text(session.req_header(), CALLBACK_URL_HEADER, 2048)?;
        self.store_job(session, key, path, content_type, body, callback_url)
            .await
    }

    /// [`Self::submit_job`] with the callback URL given.
    async fn store_job(
        &self,
        session: &mut Session,
        key: &KeyRecord,
        path: String,
        content_type: Option<String>,
        body: Bytes,
        callback_url: Option<String>,
    ) -> Result<Stop, Stop> {
        if let Some(url) = &callback_url {
            callbacks::check_url(url)
                .map_err(|why| Stop::from(ApiError::bad_request(why, Some("callback_url"))))?;
        }
        let header = session.req_header();
        let idempotency_key = header_text(header, "idempotency-key", MAX_IDEMPOTENCY_KEY)?;
        let limit = self.jobs.config.max_queued_per_account;
        if store::queued_at_least(&self.jobs.pool, key.account_id, limit).await? {
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
            callback_url,
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
            JobRecord::json(&job),
            vec![("location", location)],
        ))
    }

    /// `GET /v1/jobs/{id}/result`: the stored answer, with its status and
    /// type, streamed from the result store.
    async fn job_result(&self, session: &mut Session, job: &JobRecord) -> Result<Stop, Stop> {
        let (Some(key), Some(status)) = (&job.result_key, job.result_status) else {
            let message = match job.state {
                JobState::Expired => "This job's result has expired and was deleted.".to_owned(),
                _ => format!("This job has no result ({}).", job.status()),
            };
            return Err(ApiError::NotFound(message).into());
        };
        if job.state == JobState::Expired {
            return Err(ApiError::NotFound(
                "This job's result has expired and was deleted.".to_owned(),
            )
            .into());
        }
        let stored = Stored {
            key,
            status: u16::try_from(status).unwrap_or(200),
            content_type: job.result_type.as_deref(),
            bytes: job.result_bytes,
            gone: "This job's result has expired and was deleted.",
        };
        self.send_stored(session, &stored, &job.id.to_string())
            .await
    }

    /// Streams a stored answer or file from the result store.
    pub(super) async fn send_stored(
        &self,
        session: &mut Session,
        stored: &Stored<'_>,
        request_id: &str,
    ) -> Result<Stop, Stop> {
        let mut stream = match self.jobs.results.read(stored.key).await {
            Ok(stream) => stream,
            Err(ResultError::Store(object_store::Error::NotFound { .. })) => {
                return Err(ApiError::NotFound(stored.gone.to_owned()).into());
            }
            Err(error) => {
                tracing::error!(key = stored.key, "stored answer unreadable: {error}");
                return Err(ApiError::DatabaseUnavailable.into());
            }
        };
        let written = async {
            let mut answer = ResponseHeader::build(stored.status, Some(4))?;
            if let Some(content_type) = stored.content_type {
                answer.insert_header(header::CONTENT_TYPE, content_type)?;
            }
            if let Some(bytes) = stored.bytes {
                answer.insert_header(header::CONTENT_LENGTH, bytes.to_string())?;
            }
            answer.insert_header(REQUEST_ID, request_id)?;
            let head_only = session.req_header().method == http::Method::HEAD;
            session
                .write_response_header(Box::new(answer), head_only)
                .await?;
            if head_only {
                return Ok(());
            }
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

/// A stored answer or file, as [`Gateway::send_stored`] sends it.
pub(super) struct Stored<'a> {
    pub key: &'a str,
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub bytes: Option<i64>,
    /// The 404's message when its bytes are gone.
    pub gone: &'a str,
}

/// Header `name`'s value, when sent: 1 to `most` visible characters, else 400.
fn header_text(header: &RequestHeader, name: &str, most: usize) -> Result<Option<String>, Stop> {
    let Some(value) = header.headers.get(name) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= most)
        .map(|v| Some(v.to_owned()))
        .ok_or_else(|| {
            ApiError::bad_request(
                format!("`{name}` must be 1 to {most} visible characters."),
                None,
            )
            .into()
        })
}

/// A page of a listing, OpenAI's shape: `items` holds one more than
/// `limit` when there are more.
pub(super) fn list_json(items: impl Iterator<Item = Value>, limit: i64) -> Value {
    let mut data: Vec<Value> = items.collect();
    let has_more = data.len() as i64 > limit;
    data.truncate(limit as usize);
    let id = |item: Option<&Value>| item.and_then(|item| item.get("id").cloned());
    json!({"object": "list", "first_id": id(data.first()), "last_id": id(data.last()),
           "has_more": has_more, "data": data})
}

/// A listing's page: `after` (the last id of the previous page, written
/// with `prefix`), `limit`.
pub(super) fn page(header: &RequestHeader, prefix: &str) -> Result<(Option<Uuid>, i64), ApiError> {
    let mut after = None;
    let mut limit = DEFAULT_PAGE;
    for (name, value) in form_urlencoded::parse(header.uri.query().unwrap_or("").as_bytes()) {
        match &*name {
            "after" => {
                let id = value.strip_prefix(prefix).unwrap_or(&value);
                after = Some(Uuid::parse_str(id).map_err(|_| {
                    ApiError::bad_request("`after` must be an id from the listing.", Some("after"))
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

/// The id of an item's route, or the 404 of one that is none of `what`'s.
pub(super) fn item_id(id: Option<Uuid>, what: &str, header: &RequestHeader) -> Result<Uuid, Stop> {
    id.ok_or_else(|| no_such(what, header).into())
}

/// The 404 for an id that is not one of the collection's (the path's third
/// segment).
pub(super) fn no_such(what: &str, header: &RequestHeader) -> ApiError {
    let id = header.uri.path().split('/').nth(3).unwrap_or_default();
    ApiError::NotFound(format!("No {what} found with id `{id}`."))
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
