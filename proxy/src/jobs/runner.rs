//! Each gateway's job runner. It claims runnable jobs (highest priority
//! first, up to `jobs.max_running` at once) and sends each to the gateway's
//! own listener, so a job is admitted, waits in the tier priority queue,
//! wakes the fleet, is routed and metered exactly as a live request is; its
//! usage event carries the job's id. The answer streams into the result
//! store, then the job is finished.
//!
//! A job is never run twice by mistake: the gateway marks it sent when its
//! GPU slot is granted (fenced by the claim's attempt), and a job reclaimed
//! after that (its gateway died) is run again only when its route is
//! idempotent; otherwise it fails, saying why. A refusal for now (the
//! queue's wait ran out, a rate limit) puts the job back in the queue until
//! its `Retry-After`, within its tier's `job_max_wait`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::Jobs;
use super::pass::JOB_RUN_HEADER;
use super::results::ResultStore;
use super::store::{self, Claim, Finish};
use crate::config::CustomRoute;
use crate::gateway::REQUEST_ID;
use crate::gateway::context::InFlight;
use crate::gateway::request::Endpoint;
use crate::gateway::routes::{Route, route};
use crate::keys::store::StoreError;

/// A failed answer's body is read this far for its error.
const ERROR_BODY_BYTES: usize = 64 * 1024;
/// When our own listener did not take a run (it is shutting down), the job
/// waits this long before another claim.
const LISTENER_RETRY: Duration = Duration::from_secs(1);
/// A 503 (no backend up, every GPU taken, the database away) without a
/// `Retry-After` is tried again after this, within the job's wait budget.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(5);

pub struct JobRunner {
    jobs: Arc<Jobs>,
    /// What each run shares.
    run: Arc<Run>,
}

impl JobRunner {
    /// A runner sending jobs to the gateway listening at `target`; its runs
    /// count in `in_flight` (a drain waits for them); `custom_routes` say
    /// which routes are idempotent.
    pub fn new(
        jobs: Arc<Jobs>,
        target: SocketAddr,
        in_flight: Arc<InFlight>,
        custom_routes: Vec<CustomRoute>,
    ) -> Self {
        let run = Arc::new(Run {
            jobs: Arc::clone(&jobs),
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{}", loopback(target)),
            in_flight,
            custom_routes,
        });
        Self { jobs, run }
    }
}

#[async_trait]
impl BackgroundService for JobRunner {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let config = &self.jobs.config;
        let mut runs = JoinSet::new();
        let mut poll = tokio::time::interval(config.poll_interval);
        let mut renewal = tokio::time::interval(config.lease / 3);
        for ticks in [&mut poll, &mut renewal] {
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut stopping = false;
        loop {
            tokio::select! {
                changed = shutdown.changed(), if !stopping => {
                    // Claim nothing more; the runs under way end within the
                    // drain (they count in it), their leases renewed until then.
                    stopping = true;
                    let _ = changed;
                    if runs.is_empty() {
                        return;
                    }
                    continue;
                }
                _ = renewal.tick() => {
                    self.renew().await;
                    continue;
                }
                ended = runs.join_next(), if !runs.is_empty() => {
                    if stopping && ended.is_some() && runs.is_empty() {
                        return;
                    }
                }
                _ = self.jobs.submitted.notified(), if !stopping => {}
                _ = poll.tick(), if !stopping => {}
            }
            if stopping {
                continue;
            }
            let room = config.max_running.saturating_sub(runs.len());
            if room == 0 {
                continue;
            }
            let claims =
                match store::claim(&self.jobs.pool, &self.jobs.owner, config.lease, room as i64)
                    .await
                {
                    Ok(claims) => claims,
                    Err(error) => {
                        tracing::warn!("job runner: claiming failed: {error}");
                        continue;
                    }
                };
            for claim in claims {
                let id = claim.id;
                let handle = runs.spawn(Arc::clone(&self.run).execute(claim));
                self.jobs.running().insert(id, handle);
            }
        }
    }
}

impl JobRunner {
    /// Renews this gateway's leases, and stops the runs whose job it no
    /// longer holds (cancelled through another gateway, or taken over).
    async fn renew(&self) {
        match store::renew(&self.jobs.pool, &self.jobs.owner, self.jobs.config.lease).await {
            Ok(held) => {
                let lost: Vec<_> = self
                    .jobs
                    .running()
                    .keys()
                    .filter(|id| !held.contains(id))
                    .copied()
                    .collect();
                for id in lost {
                    self.jobs.abort_local(id);
                }
            }
            Err(error) => tracing::warn!("job runner: renewing leases failed: {error}"),
        }
    }
}

/// What every run needs.
struct Run {
    jobs: Arc<Jobs>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// `http://` and the gateway's own listener.
    base: String,
    in_flight: Arc<InFlight>,
    custom_routes: Vec<CustomRoute>,
}

/// Forgets a run when it ends (or is aborted).
struct Running<'a> {
    jobs: &'a Jobs,
    id: uuid::Uuid,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.jobs.running().remove(&self.id);
    }
}

impl Run {
    async fn execute(self: Arc<Self>, claim: Claim) {
        let _counted = self.in_flight.enter();
        let running = Running {
            jobs: &self.jobs,
            id: claim.id,
        };
        if let Err(error) = self.attempt(&claim).await {
            // The job's lease lapses, and a later claim tries again.
            tracing::warn!(job = %claim.id, "job run: {error}");
        }
        // Done with the job: from here a cancel must not abort this task, which
        // may be finalizing its batch (a batch cut off there stays
        // `finalizing` until the upkeep takes it over).
        drop(running);
        if let Some(batch) = claim.batch_id {
            self.jobs.finalize_batch(batch).await;
        }
    }

    async fn attempt(&self, claim: &Claim) -> Result<(), StoreError> {
        let pool = &self.jobs.pool;
        let (id, attempt) = (claim.id, claim.attempt);
        if claim.sent_before && !self.idempotent(&claim.path) {
            let why = format!(
                "The gateway running this job stopped after sending it to a backend, and a \
                 request to {} is not run twice.",
                claim.path
            );
            store::finish(pool, id, attempt, &failure("job_interrupted", &why)).await?;
            return Ok(());
        }
        let max_wait = self.jobs.max_wait(&claim.tier);
        let deadline = claim.created_at + max_wait;
        if !claim.sent_before && SystemTime::now() > deadline {
            let why = format!(
                "The job did not start within its tier's job_max_wait ({}).",
                humantime::format_duration(max_wait)
            );
            store::finish(pool, id, attempt, &failure("job_wait_exceeded", &why)).await?;
            return Ok(());
        }
        let response = match self.client.request(self.request(claim)).await {
            Ok(response) => response,
            Err(error) if error.is_connect() => {
                store::requeue(pool, id, attempt, LISTENER_RETRY).await?;
                return Ok(());
            }
            Err(error) => {
                let why = format!("The job's request ended without an answer: {error}.");
                store::finish(pool, id, attempt, &failure("job_interrupted", &why)).await?;
                return Ok(());
            }
        };
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = Limited::new(response.into_body(), ERROR_BODY_BYTES)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .unwrap_or_default();
            let error = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|answer| answer.get("error").cloned())
                .unwrap_or_else(
                    || json!({"message": String::from_utf8_lossy(&body), "type": "server_error"}),
                );
            let after = match status {
                StatusCode::SERVICE_UNAVAILABLE => Some(retry_after.unwrap_or(UNAVAILABLE_RETRY)),
                _ => retry_after.filter(|_| for_now(status, &error)),
            };
            if let Some(after) = after
                && SystemTime::now() + after < deadline
            {
                store::requeue(pool, id, attempt, after).await?;
                return Ok(());
            }
            store::finish(
                pool,
                id,
                attempt,
                &Finish::Failed(with_status(error, status)),
            )
            .await?;
            return Ok(());
        }
        let key = ResultStore::key(claim.account_id, id);
        let body = response
            .into_body()
            .into_data_stream()
            .map_err(std::io::Error::other);
        let how = match self.jobs.results.write(&key, body).await {
            Ok(bytes) => Finish::Answered {
                status: i32::from(status.as_u16()),
                content_type,
                result_key: key.clone(),
                bytes: bytes as i64,
            },
            Err(error) => {
                tracing::error!(job = %id, "job result not stored: {error}");
                let why = format!("The answer could not be stored: {error}.");
                failure("result_not_stored", &why)
            }
        };
        if !store::finish(pool, id, attempt, &how).await? {
            // Cancelled (or taken over) meanwhile: its answer is not kept.
            let _ = self.jobs.results.delete(&key).await;
        }
        Ok(())
    }

    /// The job's request, to the gateway's own listener.
    fn request(&self, claim: &Claim) -> http::Request<Full<Bytes>> {
        let mut request = http::Request::builder()
            .method(Method::from_bytes(claim.method.as_bytes()).unwrap_or(Method::POST))
            .uri(format!("{}{}", self.base, claim.path))
            .header(REQUEST_ID, claim.id.to_string())
            .header(JOB_RUN_HEADER, self.jobs.pass.header(claim));
        if let Some(content_type) = &claim.content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request
            .body(Full::new(Bytes::from(claim.body.clone())))
            // Every part was valid when the job was stored.
            .unwrap_or_default()
    }

    /// Whether running the request at `path` twice does no harm.
    fn idempotent(&self, path: &str) -> bool {
        match route(&Method::POST, path, &self.custom_routes) {
            Ok(Route::Inference(Endpoint::Embeddings)) => true,
            Ok(Route::Custom(i)) => self.custom_routes.get(i).is_some_and(|r| r.idempotent),
            _ => false,
        }
    }
}

/// A 429 saying "not now" (a rate limit, too many in progress); a spent
/// quota is not one (it renews in days).
fn for_now(status: StatusCode, error: &Value) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        && error.get("code").and_then(Value::as_str) != Some("insufficient_quota")
}

/// A job's failure, OpenAI-shaped.
fn failure(code: &str, message: &str) -> Finish {
    Finish::Failed(json!({"message": message, "type": "server_error", "code": code}))
}

/// The error of an answer, with its HTTP status.
fn with_status(mut error: Value, status: StatusCode) -> Value {
    if let Some(error) = error.as_object_mut() {
        error.insert("status".into(), status.as_u16().into());
    }
    error
}

/// Where to reach a listener bound to every address.
fn loopback(address: SocketAddr) -> SocketAddr {
    let ip = match address.ip() {
        ip if !ip.is_unspecified() => ip,
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    SocketAddr::new(ip, address.port())
}
