//! The admin API, on its own listener (`server.admin_listen`), for operators:
//!
//! - `POST /admin/keys` `{"account", "tier", "name"?, "expires_in"? ("30d"), "models"?}`
//!   → 201 with the new key's secret, shown this once;
//! - `GET /admin/keys[?account=NAME]`; `DELETE /admin/keys/{id or prefix}`;
//! - `POST /admin/accounts` `{"name", "tier"}`; `GET /admin/accounts`;
//! - `GET /admin/usage?account=&from=&to=&group_by=model|day|key|total`: totals
//!   (every account without `account`); `GET /admin/usage/events?account=…`:
//!   one account's events, newest first; `GET /admin/stats`: requests and
//!   tokens in the last minute, units this month; `DELETE /admin/usage?before=<unix ts>`:
//!   drop usage events older than that (see [`crate::usage_api`]);
//! - `POST /admin/accounts/{name}/billing/checkout` `{"tier", "success_url"?, "cancel_url"?}`
//!   and `POST /admin/accounts/{name}/billing/portal` `{"return_url"?}`: a
//!   Stripe Checkout or Customer Portal URL for that account (as
//!   `/v1/billing/*` gives a key's own; 404 with billing off);
//! - `GET /admin/queues`: per backend pool, its slots and, per tier, queue
//!   depth, oldest and expected wait, admitted and shed counts;
//! - `GET /admin/backends`: each backend's lifecycle state, provider and
//!   instance, health verdict, breaker, whether it is routable, requests in
//!   flight and slots, load signals scraped from it, and its cost so far;
//! - `POST /admin/backends/{name}/drain|wake|sleep`: take a backend out of
//!   rotation (pinned until woken), put it back or wake it, or stop it
//!   (→ warm) once its requests are done. 202 with the state now; the
//!   transition continues in the background.
//! - `GET /api/metrics`: a JSON summary for people and uptime checkers
//!   (requests, estimated latency percentiles, queues, fleet, today's GPU
//!   spend, `status` ok or degraded; see [`crate::summary`]).
//!
//! Every request needs `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`; with no
//! token configured the admin API refuses everything.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use deadpool_postgres::Pool;
use http::{Method, Response, StatusCode, header};
use percent_encoding::percent_decode_str;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use tollgate_backends::fleet::controller::{Command, CommandError, FleetController};
use tollgate_backends::routing::UpstreamSelector;

use crate::admission::AdmissionQueues;
use crate::billing::BillingSessions;
use crate::config::parse_duration;
use crate::error::ApiError;
use crate::keys::{KeyAdmin, KeyAdminError, NewKeyRequest};
use crate::summary::Summary;
use crate::usage_api::{self, UsageQuery};

/// Admin request bodies are small JSON objects.
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub struct AdminApi {
    pub token: Option<SecretString>,
    pub keys: Arc<KeyAdmin>,
    pub pool: Pool,
    pub queues: Arc<AdmissionQueues>,
    pub selector: Arc<dyn UpstreamSelector>,
    pub fleet: Arc<FleetController>,
    /// `None` with billing off: the billing routes answer 404.
    pub billing: Option<Arc<BillingSessions>>,
    /// `GET /api/metrics`.
    pub summary: Summary,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    account: String,
    tier: String,
    name: Option<String>,
    expires_in: Option<String>,
    models: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccountBody {
    name: String,
    tier: String,
}

impl From<KeyAdminError> for ApiError {
    fn from(error: KeyAdminError) -> Self {
        match error {
            KeyAdminError::UnknownTier { .. } => {
                ApiError::bad_request(error.to_string(), Some("tier"))
            }
            KeyAdminError::InvalidModels(_) => {
                ApiError::bad_request(error.to_string(), Some("models"))
            }
            KeyAdminError::InvalidAccountName => {
                ApiError::bad_request(error.to_string(), Some("account"))
            }
            KeyAdminError::InvalidExpiry => {
                ApiError::bad_request(error.to_string(), Some("expires_in"))
            }
            KeyAdminError::Store(error) => error.into(),
        }
    }
}

impl AdminApi {
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let presented = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        // Digests compare in constant time whatever the lengths: no length leak.
        let presented = Sha256::digest(presented.as_bytes());
        let expected = Sha256::digest(token.expose_secret().as_bytes());
        presented.ct_eq(&expected).into()
    }

    async fn handle(&self, session: &mut ServerSession) -> Result<(StatusCode, Value), ApiError> {
        if !self.authorized(session) {
            return Err(ApiError::AdminUnauthorized);
        }
        let method = session.req_header().method.clone();
        let uri = session.req_header().uri.clone();
        let path = uri.path().trim_end_matches('/');
        match (&method, path) {
            (&Method::POST, "/admin/keys") => {
                let body: CreateKeyBody = read_json(session).await?;
                let expires_in = body
                    .expires_in
                    .as_deref()
                    .map(|d| {
                        parse_duration(d).ok_or_else(|| {
                            ApiError::bad_request(
                                format!("`expires_in` {d:?} is not a duration like \"30d\""),
                                Some("expires_in"),
                            )
                        })
                    })
                    .transpose()?;
                let created = self
                    .keys
                    .create_key(NewKeyRequest {
                        account: body.account,
                        tier: body.tier,
                        name: body.name,
                        expires_in,
                        models: body.models,
                    })
                    .await?;
                let mut listing = serde_json::to_value(&created.listing).unwrap_or_default();
                listing["key"] = json!(created.secret);
                Ok((StatusCode::CREATED, listing))
            }
            (&Method::GET, "/admin/keys") => {
                let account = uri.query().and_then(|query| {
                    form_urlencoded::parse(query.as_bytes())
                        .find(|(name, _)| name == "account")
                        .map(|(_, value)| value.into_owned())
                });
                let keys = self.keys.list_keys(account.as_deref()).await?;
                Ok((StatusCode::OK, json!({"object": "list", "data": keys})))
            }
            (&Method::DELETE, _) if path.starts_with("/admin/keys/") => {
                let ident = &path["/admin/keys/".len()..];
                let revoked = self.keys.revoke_key(ident).await?;
                Ok((
                    StatusCode::OK,
                    serde_json::to_value(revoked).unwrap_or_default(),
                ))
            }
            (&Method::POST, "/admin/accounts") => {
                let body: CreateAccountBody = read_json(session).await?;
                let account = self.keys.create_account(&body.name, &body.tier).await?;
                Ok((
                    StatusCode::CREATED,
                    serde_json::to_value(account).unwrap_or_default(),
                ))
            }
            (&Method::POST, path) if path.starts_with("/admin/accounts/") => {
                Ok((StatusCode::OK, self.billing_session(session, path).await?))
            }
            (&Method::GET, "/admin/accounts") => {
                let accounts = self.keys.list_accounts().await?;
                Ok((StatusCode::OK, json!({"object": "list", "data": accounts})))
            }
            (&Method::GET, "/admin/usage") => {
                let query = UsageQuery::parse(uri.query())?;
                Ok((
                    StatusCode::OK,
                    usage_api::totals(&self.pool, None, &query).await?,
                ))
            }
            (&Method::GET, "/admin/usage/events") => {
                let query = UsageQuery::parse(uri.query())?;
                Ok((StatusCode::OK, usage_api::events(&self.pool, &query).await?))
            }
            (&Method::GET, "/admin/queues") => Ok((StatusCode::OK, self.queues.signals_json())),
            (&Method::GET, "/admin/backends") => Ok((StatusCode::OK, self.backends_json())),
            (&Method::POST, path) if path.starts_with("/admin/backends/") => {
                let (name, verb) = path["/admin/backends/".len()..]
                    .split_once('/')
                    .ok_or_else(|| ApiError::NotFound(format!("no admin route {path}")))?;
                let command = match verb {
                    "drain" => Command::Drain,
                    "wake" => Command::Wake,
                    "sleep" => Command::Sleep,
                    other => {
                        return Err(ApiError::NotFound(format!(
                            "unknown backend command `{other}` (drain, wake, sleep)"
                        )));
                    }
                };
                let state = self.fleet.command(name, command).map_err(|e| match e {
                    CommandError::UnknownBackend(_) => ApiError::NotFound(e.to_string()),
                    CommandError::Static(_) => ApiError::bad_request(e.to_string(), None),
                    CommandError::Busy(_) => ApiError::Conflict(e.to_string()),
                })?;
                Ok((
                    StatusCode::ACCEPTED,
                    json!({"name": name, "command": verb, "state": state.as_str()}),
                ))
            }
            (&Method::GET, "/api/metrics") => Ok((StatusCode::OK, self.summary.json().await)),
            (&Method::GET, "/admin/stats") => {
                Ok((StatusCode::OK, usage_api::stats(&self.pool).await?))
            }
            (&Method::DELETE, "/admin/usage") => {
                let before = uri
                    .query()
                    .and_then(|query| {
                        form_urlencoded::parse(query.as_bytes())
                            .find(|(name, _)| name == "before")
                            .map(|(_, value)| value.into_owned())
                    })
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "`before` (unix seconds) is required.",
                            Some("before"),
                        )
                    })?;
                let before = usage_api::parse_time(&before, "before")?;
                let purged = usage_api::purge(&self.pool, before).await?;
                Ok((
                    StatusCode::OK,
                    serde_json::to_value(purged).unwrap_or_default(),
                ))
            }
            (_, "/api/metrics") => Err(ApiError::MethodNotAllowed {
                allow: "GET",
                method: method.to_string(),
                path: path.to_owned(),
            }),
            (_, "/admin/usage") => Err(ApiError::MethodNotAllowed {
                allow: "GET, DELETE",
                method: method.to_string(),
                path: path.to_owned(),
            }),
            (_, "/admin/keys" | "/admin/accounts") => Err(ApiError::MethodNotAllowed {
                allow: "GET, POST",
                method: method.to_string(),
                path: path.to_owned(),
            }),
            _ => Err(ApiError::UnknownRoute {
                method: method.to_string(),
                path: path.to_owned(),
            }),
        }
    }
}

impl AdminApi {
    /// `POST /admin/accounts/{name}/billing/checkout|portal`: the same
    /// sessions as `/v1/billing/*`, for any account.
    async fn billing_session(
        &self,
        session: &mut ServerSession,
        path: &str,
    ) -> Result<Value, ApiError> {
        let unknown = || ApiError::NotFound(format!("no admin route {path}"));
        let (name, verb) = path["/admin/accounts/".len()..]
            .split_once("/billing/")
            .ok_or_else(unknown)?;
        // Account names may hold spaces or slashes, sent percent-encoded.
        let name = percent_decode_str(name)
            .decode_utf8()
            .map_err(|_| ApiError::bad_request("The account name is not UTF-8.", None))?;
        let billing = self.billing.as_ref().ok_or_else(|| {
            ApiError::NotFound("billing is off: STRIPE_SECRET_KEY is not set".to_owned())
        })?;
        let account_id = billing.account_id(&name).await?;
        let body = read_body(session).await?;
        match verb {
            "checkout" => billing.checkout_json(account_id, &body).await,
            "portal" => billing.portal_json(account_id, &body).await,
            _ => Err(unknown()),
        }
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    session: &mut ServerSession,
) -> Result<T, ApiError> {
    let body = read_body(session).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}."), None))
}

async fn read_body(session: &mut ServerSession) -> Result<BytesMut, ApiError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|_| ApiError::bad_request("Could not read the request body.", None))?
    {
        if body.len() + chunk.len() > MAX_ADMIN_BODY {
            return Err(ApiError::BodyTooLarge {
                limit: MAX_ADMIN_BODY,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn json_response(status: StatusCode, body: &Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

impl AdminApi {
    fn backends_json(&self) -> Value {
        let lifecycles = self.fleet.statuses();
        let data: Vec<Value> = self
            .selector
            .statuses()
            .into_iter()
            .zip(lifecycles)
            .map(|(b, life)| {
                json!({
                    "name": b.name,
                    "address": b.address,
                    "models": b.models,
                    "provider": life.provider,
                    "instance_id": life.instance_id,
                    "state": life.state.as_str(),
                    "state_secs": life.in_state_for.as_secs_f64(),
                    "pinned": life.pinned,
                    "cost_so_far": life.cost_so_far,
                    "routable": b.routable,
                    "healthy": b.healthy,
                    "breaker": b.breaker,
                    "in_flight": b.in_flight,
                    "max_concurrency": b.max_concurrency,
                    "signals": b.signals,
                })
            })
            .collect();
        json!({"object": "list", "data": data})
    }
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match self.handle(session).await {
            Ok((status, body)) => json_response(status, &body),
            Err(error) => json_response(
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &error.json(),
            ),
        }
    }
}

/// `GET /metrics` on the metrics listener: the Prometheus text exposition of
/// everything registered in the default registry.
pub struct MetricsApp;

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, _session: &mut ServerSession) -> Response<Vec<u8>> {
        use prometheus::Encoder;
        let mut body = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = encoder.encode(&prometheus::gather(), &mut body);
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, encoder.format_type())
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}
