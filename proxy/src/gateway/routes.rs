//! The routes beside inference: what each path is, and the answers that
//! need no backend (health, readiness, the model list, the caller's usage,
//! Stripe's webhook, Checkout and Portal sessions). Inference requests go on
//! to admission; these are answered in `request_filter`.

use std::sync::atomic::Ordering;

use http::Method;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use serde_json::json;
use tollgate_backends::fleet::state::InstanceState;
use uuid::Uuid;

use super::request::{Endpoint, read_body};
use super::{Gateway, Stop};
use crate::config::CustomRoute;
use crate::error::ApiError;
use crate::keys::store::KeyRecord;
use crate::usage_api::{self, UsageQuery};

/// Stripe's event payloads are a few KiB, and far below this; a bigger body
/// is refused before its signature is checked (HMAC over a body of any size
/// is work anyone could make us do).
const STRIPE_WEBHOOK_MAX_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Inference(Endpoint),
    /// `[[routes]]`: the index of the custom route in config order.
    Custom(usize),
    Models,
    /// `GET /v1/usage`: the caller's own usage.
    Usage,
    Healthz,
    Readyz,
    /// `POST /stripe/webhook`: Stripe's event deliveries.
    StripeWebhook,
    /// `POST /v1/billing/checkout`: a Checkout Session for the caller's account.
    BillingCheckout,
    /// `POST /v1/billing/portal`: a Customer Portal session for it.
    BillingPortal,
    /// `/v1/jobs…`, `/v1/files…`, `/v1/batches…`: the caller's own.
    Resource(Resource, Action),
    /// `GET|POST /v1/callbacks`: the account's job callback URL and secret.
    Callbacks,
}

/// The collections a key reads and writes under `/v1`: its jobs, its files
/// and its batches (OpenAI's Files and Batch APIs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Jobs,
    Files,
    Batches,
}

impl Resource {
    const ALL: [Self; 3] = [Self::Jobs, Self::Files, Self::Batches];

    fn path(self) -> &'static str {
        match self {
            Self::Jobs => "/v1/jobs",
            Self::Files => "/v1/files",
            Self::Batches => "/v1/batches",
        }
    }

    /// The one route under an item (`/v1/jobs/{id}/result`), and its method.
    fn sub(self) -> (&'static str, Method) {
        match self {
            Self::Jobs => ("result", Method::GET),
            Self::Files => ("content", Method::GET),
            Self::Batches => ("cancel", Method::POST),
        }
    }

    /// How the API writes the ids (`file-…`, `batch_…`; a job's is bare).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Self::Jobs => "",
            Self::Files => "file-",
            Self::Batches => "batch_",
        }
    }
}

/// What is asked of a [`Resource`]. An id that is not one of its ids is
/// `None`: no such item, a 404 once the key is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `GET /v1/jobs`
    List,
    /// `POST /v1/jobs`
    Create,
    /// `GET /v1/jobs/{id}`
    Get(Option<Uuid>),
    /// `DELETE /v1/jobs/{id}` (jobs: cancel; files: delete)
    Delete(Option<Uuid>),
    /// `/v1/jobs/{id}/result`, `/v1/files/{id}/content`, `/v1/batches/{id}/cancel`
    Sub(Option<Uuid>),
}

/// The resource route for `method` and `path`; `None` when the path is not one.
fn resource_route(method: &Method, path: &str) -> Option<Result<Route, ApiError>> {
    let trimmed = path.trim_end_matches('/');
    let (resource, rest) = Resource::ALL
        .into_iter()
        .find_map(|r| trimmed.strip_prefix(r.path()).map(|rest| (r, rest)))?;
    let get = *method == Method::GET || *method == Method::HEAD;
    let refuse = |allow| {
        Some(Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allow,
        }))
    };
    let id = |text: &str| {
        let prefix = resource.id_prefix();
        Uuid::parse_str(text.strip_prefix(prefix).unwrap_or(text)).ok()
    };
    let deletable = resource != Resource::Batches;
    let action = match rest.strip_prefix('/').map(|r| r.split_once('/')) {
        None if !rest.is_empty() => return None,
        None if get => Action::List,
        None if *method == Method::POST => Action::Create,
        None => return refuse("GET, HEAD, POST"),
        Some(None) => match method {
            &Method::DELETE if deletable => Action::Delete(id(&rest[1..])),
            _ if get => Action::Get(id(&rest[1..])),
            _ if deletable => return refuse("GET, HEAD, DELETE"),
            _ => return refuse("GET, HEAD"),
        },
        Some(Some((item, sub))) if sub == resource.sub().0 => {
            let allowed = resource.sub().1;
            if *method == allowed || (allowed == Method::GET && get) {
                Action::Sub(id(item))
            } else if allowed == Method::GET {
                return refuse("GET, HEAD");
            } else {
                return refuse("POST");
            }
        }
        Some(Some(_)) => return None,
    };
    Some(Ok(Route::Resource(resource, action)))
}

/// The route for `method` and `path`, or the 404/405 to answer. Custom
/// routes (which config keeps off the gateway's own paths) take `POST`.
pub fn route(method: &Method, path: &str, custom: &[CustomRoute]) -> Result<Route, ApiError> {
    if let Some(route) = resource_route(method, path) {
        return route;
    }
    if path.trim_end_matches('/') == "/v1/callbacks" {
        return match *method {
            Method::GET | Method::HEAD | Method::POST => Ok(Route::Callbacks),
            _ => Err(ApiError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_owned(),
                allow: "GET, HEAD, POST",
            }),
        };
    }
    let custom = custom
        .iter()
        .position(|route| route.matches(path))
        .map(|i| (Route::Custom(i), Method::POST));
    let (route, allowed) = match custom {
        Some(found) => found,
        None => builtin(method, path)?,
    };
    if *method == allowed || (allowed == Method::GET && *method == Method::HEAD) {
        Ok(route)
    } else {
        Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allow: if allowed == Method::GET {
                "GET, HEAD"
            } else {
                "POST"
            },
        })
    }
}

/// The gateway's own route for `path` and the method it takes.
fn builtin(method: &Method, path: &str) -> Result<(Route, Method), ApiError> {
    Ok(match path.trim_end_matches('/') {
        "/v1/chat/completions" => (Route::Inference(Endpoint::ChatCompletions), Method::POST),
        "/v1/completions" => (Route::Inference(Endpoint::Completions), Method::POST),
        "/v1/embeddings" => (Route::Inference(Endpoint::Embeddings), Method::POST),
        "/v1/responses" => (Route::Inference(Endpoint::Responses), Method::POST),
        "/v1/images/generations" => (Route::Inference(Endpoint::ImageGenerations), Method::POST),
        "/v1/images/edits" => (Route::Inference(Endpoint::ImageEdits), Method::POST),
        "/v1/audio/speech" => (Route::Inference(Endpoint::Speech), Method::POST),
        "/v1/audio/transcriptions" => (Route::Inference(Endpoint::Transcription), Method::POST),
        "/v1/audio/translations" => (Route::Inference(Endpoint::Translation), Method::POST),
        "/v1/models" => (Route::Models, Method::GET),
        "/v1/usage" => (Route::Usage, Method::GET),
        "/healthz" => (Route::Healthz, Method::GET),
        "/readyz" => (Route::Readyz, Method::GET),
        "/stripe/webhook" => (Route::StripeWebhook, Method::POST),
        "/v1/billing/checkout" => (Route::BillingCheckout, Method::POST),
        "/v1/billing/portal" => (Route::BillingPortal, Method::POST),
        _ => {
            return Err(ApiError::UnknownRoute {
                method: method.to_string(),
                path: path.to_owned(),
            });
        }
    })
}

impl Gateway {
    /// `POST /stripe/webhook`; 404 when billing has no webhook secret.
    pub(super) async fn stripe_webhook(&self, session: &mut Session) -> Stop {
        let Some(webhooks) = &self.stripe_webhooks else {
            return unknown_route(session.req_header()).into();
        };
        let signature = session
            .req_header()
            .headers
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match read_body(session, STRIPE_WEBHOOK_MAX_BYTES).await {
            Ok(body) => body,
            Err(e) => return e.into(),
        };
        let (status, answer) = webhooks
            .handle(&self.pool, &self.keys, signature.as_deref(), &body)
            .await;
        Stop::Answer(status, answer)
    }

    /// `POST /v1/billing/checkout|portal` for the key's own account.
    pub(super) async fn billing_session(
        &self,
        route: Route,
        session: &mut Session,
        key: &KeyRecord,
    ) -> Result<serde_json::Value, Stop> {
        let Some(sessions) = &self.billing_sessions else {
            return Err(unknown_route(session.req_header()).into());
        };
        let body = read_body(session, self.max_body_bytes).await?;
        Ok(if route == Route::BillingCheckout {
            sessions.checkout_json(key.account_id, &body).await?
        } else {
            sessions.portal_json(key.account_id, &body).await?
        })
    }

    /// `/v1/usage`: usage totals of the key's own account.
    pub(super) async fn own_usage(
        &self,
        header: &RequestHeader,
        key: &KeyRecord,
    ) -> Result<serde_json::Value, ApiError> {
        let query = UsageQuery::parse(header.uri.query())?;
        if query.account.is_some() {
            return Err(ApiError::bad_request(
                "`account` is not a parameter here: a key reads its own account's usage.",
                Some("account"),
            ));
        }
        usage_api::totals(&self.pool, Some(key.account_id), &query).await
    }

    /// `/v1/models`: the models this key may use, in OpenAI's list shape.
    pub(super) fn model_list(&self, key: &KeyRecord) -> serde_json::Value {
        let data: Vec<_> = self
            .models
            .names()
            .filter(|m| key.allows_model(m))
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"}))
            .collect();
        json!({"object": "list", "data": data})
    }

    /// `/readyz`: Postgres answered within the last second (a check made in
    /// the background, see [`crate::readiness`]) and at least one backend
    /// routable or on its way (a scaled-to-zero fleet serves by waking an
    /// instance); also reports whether revocations fan out through Redis
    /// (informative: without it revocations still land within the key cache
    /// TTL).
    pub(super) fn readiness(&self) -> Stop {
        let postgres = self.readiness.reachable();
        let backends = self.selector.statuses().iter().any(|b| {
            b.routable
                || matches!(
                    b.state,
                    InstanceState::Cold
                        | InstanceState::Warm
                        | InstanceState::Provisioning
                        | InstanceState::Starting
                )
        });
        let status = if postgres && backends { 200 } else { 503 };
        let fanout = match &self.revocation_fanout {
            None => "off",
            Some(up) if up.load(Ordering::Relaxed) => "subscribed",
            Some(_) => "connecting",
        };
        Stop::Answer(
            status,
            json!({"postgres": postgres, "backends": backends, "revocation_fanout": fanout}),
        )
    }
}

fn unknown_route(header: &RequestHeader) -> ApiError {
    ApiError::UnknownRoute {
        method: header.method.to_string(),
        path: header.uri.path().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_method_and_path() {
        assert_eq!(
            route(&Method::POST, "/v1/chat/completions", &[]).unwrap(),
            Route::Inference(Endpoint::ChatCompletions)
        );
        assert_eq!(
            route(&Method::GET, "/v1/models/", &[]).unwrap(),
            Route::Models
        );
        assert!(matches!(
            route(&Method::GET, "/v1/chat/completions", &[]),
            Err(ApiError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            route(&Method::POST, "/v2/anything", &[]),
            Err(ApiError::UnknownRoute { .. })
        ));
    }

    #[test]
    fn resource_routes_take_their_ids_and_methods() {
        let id = Uuid::now_v7();
        let ask = |method: Method, path: &str| route(&method, path, &[]);
        let jobs = |action| Route::Resource(Resource::Jobs, action);
        assert_eq!(ask(Method::GET, "/v1/jobs").unwrap(), jobs(Action::List));
        assert_eq!(
            ask(Method::POST, "/v1/jobs/").unwrap(),
            jobs(Action::Create)
        );
        assert_eq!(
            ask(Method::GET, &format!("/v1/jobs/{id}")).unwrap(),
            jobs(Action::Get(Some(id)))
        );
        assert_eq!(
            ask(Method::DELETE, &format!("/v1/jobs/{id}")).unwrap(),
            jobs(Action::Delete(Some(id)))
        );
        assert_eq!(
            ask(Method::GET, &format!("/v1/jobs/{id}/result")).unwrap(),
            jobs(Action::Sub(Some(id)))
        );
        assert_eq!(
            ask(Method::GET, "/v1/jobs/not-an-id").unwrap(),
            jobs(Action::Get(None))
        );
        // Files and batches take OpenAI's ids.
        assert_eq!(
            ask(
                Method::GET,
                &format!("/v1/files/file-{}/content", id.simple())
            )
            .unwrap(),
            Route::Resource(Resource::Files, Action::Sub(Some(id)))
        );
        assert_eq!(
            ask(
                Method::POST,
                &format!("/v1/batches/batch_{}/cancel", id.simple())
            )
            .unwrap(),
            Route::Resource(Resource::Batches, Action::Sub(Some(id)))
        );
        for (method, path) in [
            (Method::PUT, "/v1/jobs".to_owned()),
            (Method::POST, format!("/v1/jobs/{id}")),
            (Method::DELETE, format!("/v1/jobs/{id}/result")),
            (Method::DELETE, format!("/v1/batches/{id}")),
            (Method::GET, format!("/v1/batches/{id}/cancel")),
        ] {
            assert_eq!(ask(method, &path).unwrap_err().status(), 405, "{path}");
        }
        for path in ["/v1/jobsx", &format!("/v1/jobs/{id}/other")] {
            assert_eq!(ask(Method::GET, path).unwrap_err().status(), 404, "{path}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn any_path_routes_or_gets_404_or_405(path in "/[a-z/_.%]{0,40}", post in any::<bool>()) {
                let method = if post { Method::POST } else { Method::GET };
                if let Err(error) = route(&method, &path, &[]) {
                    prop_assert!(matches!(error.status(), 404 | 405));
                }
            }
        }
    }
}
