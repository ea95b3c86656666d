//! A stateful fake of the part of Stripe's API that Tollgate uses, for tests
//! on a machine that cannot reach Stripe. It speaks Stripe's wire format:
//! form-encoded request bodies in bracket notation (`tiers[0][up_to]`,
//! `lookup_keys[]`, `lookup_keys[0]`), JSON answers, list objects, Stripe's
//! error envelope, Bearer (or Basic) auth and `Idempotency-Key` replay, so
//! both `async-stripe` and a hand-rolled client can be pointed at it.
//!
//! Shapes follow Stripe's API reference (docs.stripe.com/api):
//! `billing/meter` (object, create, list, retrieve), `billing/meter-event`
//! (create), `billing/meter-event-summary` (list), `products` (update:
//! name, active, metadata), `prices` (object, create, list by
//! `lookup_keys`, `transfer_lookup_key`, update: active, lookup key),
//! `customers`, `checkout/sessions`, `customer_portal/sessions`,
//! `subscriptions`, `errors`, `idempotent_requests` and `pagination`; the
//! fields each object always carries are the ones `async-stripe` 1.0 requires
//! (the tests deserialize every answer into its types). Error messages are
//! Stripe's own where they are known:
//!
//! - duplicate meter event: 400 `invalid_request_error`, no code,
//!   "An event already exists with identifier {id}."
//! - same Idempotency-Key, other parameters: 400 `idempotency_error`,
//!   "Keys for idempotent requests can only be used with the same parameters
//!   they were first used with. Try using a key other than '{key}' if you
//!   meant to execute a different request."
//! - timestamp too old: "The event timestamp cannot be more than 35 days in
//!   past. Expected a timestamp greater than or equal to {t}."
//! - lookup key taken: "A price (`{id}`) already uses that lookup key."
//! - quantity on a metered line item, missing/invalid API key, unknown or
//!   missing parameter, unknown URL, `No such {object}: '{id}'`, rate limit.
//!
//! Simplified, on purpose:
//! - Meter events are aggregated at once (Stripe is eventually consistent)
//!   and, as in Stripe's v1 API, the customer mapping and value are not
//!   checked synchronously: an event for an unknown customer or meter is
//!   accepted. Event summaries list only windows that have events, newest
//!   first; `ending_before` paging is supported, `created` filters are not.
//! - Idempotency compares the parsed parameters (so a reordered body is the
//!   same request), saves answers of executed requests (not of parameter
//!   errors, as Stripe does), forgets keys after 24 hours of the fake's
//!   clock, and has no 409 for concurrent use of a key (requests are handled
//!   one at a time under the store's lock).
//! - Subscriptions come into being only through [`FakeStripe::complete_checkout`]
//!   (the customer paying); a month is 30 days; nothing is invoiced.
//! - Only top-level parameter names are checked against each endpoint's list,
//!   and only the expansions listed per endpoint are supported.
//! - The 5-minutes-in-the-future message and the duplicate-meter message are
//!   modelled on the 35-days one; their exact wording is not confirmed.
//!
//! The server is axum behind a per-connection hyper loop: a fault that "loses
//! the response" must close the connection without writing anything, which a
//! handler alone cannot do.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use base64::Engine;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rand::distr::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// Stripe enforces meter event identifier uniqueness "within a rolling period
/// of at least 24 hours" (meter event create, `identifier`).
const IDENTIFIER_WINDOW: i64 = 24 * 3600;
/// Idempotency keys "can be removed once at least 24 hours old".
const IDEMPOTENCY_WINDOW: i64 = 24 * 3600;
/// Meter event timestamps "must be within the past 35 calendar days or up to
/// 5 minutes in the future".
const MAX_EVENT_AGE: i64 = 35 * 86_400;
const MAX_EVENT_LEAD: i64 = 5 * 60;
/// Checkout sessions expire 24 hours after creation unless told otherwise.
const CHECKOUT_EXPIRY: i64 = 24 * 3600;
/// Far above any form Tollgate sends; Stripe's own limit is not documented.
const BODY_LIMIT: usize = 1 << 20;
/// The seed of the fault RNG until [`FakeStripe::seed_faults`] changes it.
const DEFAULT_FAULT_SEED: u64 = 0x7017_6a7e;

/// A fake Stripe on `127.0.0.1:<ephemeral>`, stopped when dropped.
pub struct FakeStripe {
    base_url: String,
    secret_key: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

/// What goes wrong with requests a fault rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500 `api_error`; nothing is applied.
    ServerError,
    /// HTTP 429 `rate_limit` with `Retry-After`; nothing is applied.
    RateLimited { retry_after_secs: u64 },
    /// Read, never applied and never answered: the connection stays open
    /// until the client gives up (its timeout) or the fake is dropped.
    Timeout,
    /// Applied (and saved under its Idempotency-Key), then the connection is
    /// closed without an answer, as a network failure after Stripe accepted.
    ResponseLost,
    /// Applied (and saved), then answered with a 500 instead, as a proxy on
    /// the way back would: a retry with the same key gets the saved answer.
    ResponseLost500,
}

/// Requests a fault applies to: one method and a path prefix.
#[derive(Debug, Clone)]
pub struct Route {
    method: Method,
    path_prefix: String,
}

impl Route {
    pub fn post(path_prefix: &str) -> Self {
        Self {
            method: Method::POST,
            path_prefix: path_prefix.to_owned(),
        }
    }

    pub fn get(path_prefix: &str) -> Self {
        Self {
            method: Method::GET,
            path_prefix: path_prefix.to_owned(),
        }
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        *method == self.method && path.starts_with(&self.path_prefix)
    }
}

/// Whether the fake can be reached at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outage {
    #[default]
    None,
    /// Every request is read and its connection closed without an answer.
    DropConnections,
    /// Every request is answered 500 `api_error`, before authentication.
    ServerErrors,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The query string, parsed like a form (bracket notation → JSON).
    pub query: Value,
    /// The form body, parsed (bracket notation → JSON; values are strings).
    pub form: Value,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    /// The status answered, or `None` if the connection was closed or held.
    pub status: Option<u16>,
}

/// One meter event Stripe accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub payload: BTreeMap<String, String>,
    pub timestamp: i64,
    pub created: i64,
}

impl FakeStripe {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let secret_key = "sk_test_51TollgateFakeStripeKey0000000000".to_owned();
        let shared = Arc::new(Shared {
            secret_key: secret_key.clone(),
            store: Mutex::new(Store::new()),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(serve(listener, app));
        Ok(Self {
            base_url: format!("http://{addr}"),
            secret_key,
            shared,
            server,
        })
    }

    /// Scheme, host and port; requests go to `{base_url}/v1/...`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The one secret key the fake accepts.
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The fake's clock (unix seconds): the real one plus what
    /// [`Self::advance_clock`] added.
    pub fn now(&self) -> i64 {
        self.shared.lock().now()
    }

    /// Moves the fake's clock forward, to let identifier deduplication and
    /// idempotency keys lapse (both 24 hours) without waiting for them.
    pub fn advance_clock(&self, by: Duration) {
        self.shared.lock().clock_offset += by.as_secs() as i64;
    }

    /// The next `times` requests matching `route` fail with `fault`. Rules
    /// apply in the order they were added, one rule per request.
    pub fn fail_next(&self, route: Route, times: u32, fault: Fault) {
        if times > 0 {
            self.shared.lock().faults.push(FaultRule {
                route,
                fault,
                trigger: Trigger::Next(times),
            });
        }
    }

    /// Each request matching `route` fails with `fault` with this
    /// probability, drawn from the seeded fault RNG.
    pub fn fail_randomly(&self, route: Route, probability: f64, fault: Fault) {
        self.shared.lock().faults.push(FaultRule {
            route,
            fault,
            trigger: Trigger::Probability(probability),
        });
    }

    /// Reseeds the RNG behind [`Self::fail_randomly`].
    pub fn seed_faults(&self, seed: u64) {
        self.shared.lock().fault_rng = StdRng::seed_from_u64(seed);
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// `false`: every connection is closed without an answer (Stripe cannot
    /// be reached); `true`: back to normal.
    pub fn set_reachable(&self, reachable: bool) {
        self.set_outage(if reachable {
            Outage::None
        } else {
            Outage::DropConnections
        });
    }

    pub fn set_outage(&self, outage: Outage) {
        self.shared.lock().outage = outage;
    }

    /// Every meter event accepted, in order.
    pub fn meter_events(&self) -> Vec<RecordedMeterEvent> {
        self.shared.lock().meter_events.clone()
    }

    /// What Stripe would bill: the sum of accepted meter event values per
    /// customer and hour (the hour's first second), read through the payload
    /// keys of the event's meter (Stripe's defaults, `stripe_customer_id` and
    /// `value`, when there is none). Events whose value is not a whole
    /// number are left out.
    pub fn meter_event_totals(&self) -> BTreeMap<(String, i64), u64> {
        let store = self.shared.lock();
        let mut totals = BTreeMap::new();
        for event in &store.meter_events {
            let (customer_key, value_key) = store.payload_keys(&event.event_name);
            let customer = event.payload.get(&customer_key);
            let value = event
                .payload
                .get(&value_key)
                .and_then(|v| v.parse::<u64>().ok());
            if let (Some(customer), Some(value)) = (customer, value) {
                let hour = event.timestamp - event.timestamp.rem_euclid(3600);
                *totals.entry((customer.clone(), hour)).or_default() += value;
            }
        }
        totals
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The customer pays: the open Checkout Session becomes `complete`, with
    /// a customer (created from `customer_email` if it had none) and, in
    /// subscription mode, an active subscription of its line items. Returns
    /// the session as `GET /v1/checkout/sessions/{id}` would.
    pub fn complete_checkout(&self, session_id: &str) -> anyhow::Result<Value> {
        self.shared.lock().complete_checkout(session_id)
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        // The accept loop owns every connection task: aborting it ends them.
        self.server.abort();
    }
}

struct Shared {
    secret_key: String,
    /// A std mutex: it is never held across an await, each request is
    /// handled start to finish under it.
    store: Mutex<Store>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Closes the connection it was handed to, without an answer.
#[derive(Clone, Default)]
struct Hangup(Arc<Notify>);

async fn serve(listener: TcpListener, app: Router) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("fake stripe: accept failed: {error}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let hangup = Hangup::default();
        let service = TowerToHyperService::new(app.clone().layer(Extension(hangup.clone())));
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = hangup.0.notified() => {}
            }
        });
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Extension(hangup): Extension<Hangup>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, BODY_LIMIT).await.unwrap_or_default();
    let outcome = {
        let mut store = shared.lock();
        store.receive(
            &shared.secret_key,
            &parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or(""),
            &parts.headers,
            &String::from_utf8_lossy(&body),
        )
    };
    match outcome {
        Outcome::Reply(reply) => reply.into_response(),
        Outcome::HangUp => {
            hangup.0.notify_one();
            std::future::pending().await
        }
        Outcome::Hold => std::future::pending().await,
    }
}

enum Outcome {
    Reply(Reply),
    /// Close the connection without answering.
    HangUp,
    /// Never answer.
    Hold,
}

#[derive(Clone)]
struct Reply {
    status: StatusCode,
    body: Value,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

/// Stripe's error object (docs.stripe.com/api/errors).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
    param: Option<String>,
    /// Whether an Idempotency-Key keeps this answer: Stripe saves answers
    /// once an endpoint began executing, not those of parameter validation.
    saved: bool,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
            param: None,
            saved: true,
        }
    }

    /// A parameter Stripe refuses before executing anything.
    fn rejected_param(message: impl Into<String>, param: &str) -> Self {
        Self {
            saved: false,
            ..Self::invalid(message).param(param)
        }
    }

    fn missing(param: &str) -> Self {
        Self {
            code: Some("parameter_missing"),
            ..Self::rejected_param(format!("Missing required param: {param}."), param)
        }
    }

    fn unknown_param(param: &str) -> Self {
        Self {
            code: Some("parameter_unknown"),
            ..Self::rejected_param(format!("Received unknown parameter: {param}"), param)
        }
    }

    /// `No such {object}: '{id}'`: 404 for an id in the path, 400 for one in
    /// a parameter.
    fn no_such(object: &str, id: &str, param: &str, status: StatusCode) -> Self {
        Self {
            status,
            code: Some("resource_missing"),
            ..Self::invalid(format!("No such {object}: '{id}'")).param(param)
        }
    }

    fn unauthorized(message: String) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            saved: false,
            ..Self::invalid(message)
        }
    }

    fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    fn reply(&self) -> Reply {
        let mut error = Map::new();
        if let Some(code) = self.code {
            error.insert("code".into(), code.into());
            error.insert(
                "doc_url".into(),
                format!(
                    "https://stripe.com/docs/error-codes/{}",
                    code.replace('_', "-")
                )
                .into(),
            );
        }
        error.insert("message".into(), self.message.clone().into());
        if let Some(param) = &self.param {
            error.insert("param".into(), param.clone().into());
        }
        error.insert("type".into(), self.kind.into());
        Reply {
            status: self.status,
            body: json!({ "error": error }),
            headers: Vec::new(),
        }
    }
}

fn server_error() -> Reply {
    Reply {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body: json!({ "error": { "message": "An unknown error occurred", "type": "api_error" } }),
        headers: Vec::new(),
    }
}

fn rate_limited(retry_after_secs: u64) -> Reply {
    Reply {
        status: StatusCode::TOO_MANY_REQUESTS,
        body: json!({ "error": {
            "code": "rate_limit",
            "doc_url": "https://stripe.com/docs/error-codes/rate-limit",
            "message": "Request rate limit exceeded. You can learn more about rate limits here https://stripe.com/docs/rate-limits.",
            "type": "invalid_request_error",
        } }),
        headers: vec![("retry-after", retry_after_secs.to_string())],
    }
}

enum Trigger {
    Next(u32),
    Probability(f64),
}

struct FaultRule {
    route: Route,
    fault: Fault,
    trigger: Trigger,
}

/// A Checkout Session's line items (price id, quantity) and
/// `subscription_data[metadata]`: `line_items` is returned only when
/// expanded, which the fake does not support.
struct CheckoutOrder {
    line_items: Vec<(String, Option<i64>)>,
    subscription_metadata: Value,
}

/// An answer kept under its Idempotency-Key.
struct Saved {
    method: Method,
    path: String,
    params: Value,
    reply: Reply,
    request_id: String,
    created: i64,
}

struct Store {
    clock_offset: i64,
    ids: StdRng,
    fault_rng: StdRng,
    faults: Vec<FaultRule>,
    outage: Outage,
    requests: Vec<RecordedRequest>,
    idempotency: HashMap<String, Saved>,
    meters: Vec<Value>,
    meter_events: Vec<RecordedMeterEvent>,
    /// identifier → when it was accepted
    identifiers: HashMap<String, i64>,
    products: Vec<Value>,
    prices: Vec<Value>,
    customers: Vec<Value>,
    checkout_sessions: Vec<Value>,
    /// What a session keeps to itself until the customer pays.
    checkout_orders: HashMap<String, CheckoutOrder>,
    portal_configuration: String,
    portal_sessions: Vec<Value>,
    subscriptions: Vec<Value>,
}

impl Store {
    fn new() -> Self {
        let mut ids = StdRng::seed_from_u64(1);
        let portal_configuration = random_id(&mut ids, "bpc");
        Self {
            clock_offset: 0,
            ids,
            fault_rng: StdRng::seed_from_u64(DEFAULT_FAULT_SEED),
            faults: Vec::new(),
            outage: Outage::None,
            requests: Vec::new(),
            idempotency: HashMap::new(),
            meters: Vec::new(),
            meter_events: Vec::new(),
            identifiers: HashMap::new(),
            products: Vec::new(),
            prices: Vec::new(),
            customers: Vec::new(),
            checkout_sessions: Vec::new(),
            checkout_orders: HashMap::new(),
            portal_configuration,
            portal_sessions: Vec::new(),
            subscriptions: Vec::new(),
        }
    }

    fn now(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        real + self.clock_offset
    }

    fn new_id(&mut self, prefix: &str) -> String {
        random_id(&mut self.ids, prefix)
    }

    /// Logs the request, then answers it.
    fn receive(
        &mut self,
        secret_key: &str,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: &str,
    ) -> Outcome {
        let query = parse_form(query);
        let form = parse_form(body);
        self.requests.push(RecordedRequest {
            method: method.to_string(),
            path: path.to_owned(),
            query: query.clone(),
            form: form.clone(),
            headers: headers
                .iter()
                .filter_map(|(name, value)| {
                    Some((name.to_string(), value.to_str().ok()?.to_owned()))
                })
                .collect(),
            status: None,
        });
        let index = self.requests.len() - 1;
        let outcome = self.respond(secret_key, method, path, headers, &query, &form);
        if let Outcome::Reply(reply) = &outcome {
            self.requests[index].status = Some(reply.status.as_u16());
        }
        outcome
    }

    fn respond(
        &mut self,
        secret_key: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        query: &Value,
        form: &Value,
    ) -> Outcome {
        match self.outage {
            Outage::None => {}
            Outage::DropConnections => return Outcome::HangUp,
            Outage::ServerErrors => return Outcome::Reply(server_error()),
        }
        if let Err(error) = authenticate(headers, secret_key) {
            return Outcome::Reply(
                error
                    .reply()
                    .header("www-authenticate", "Basic realm=\"Stripe\""),
            );
        }
        let fault = self.next_fault(method, path);
        match fault {
            Some(Fault::ServerError) => return Outcome::Reply(server_error()),
            Some(Fault::RateLimited { retry_after_secs }) => {
                return Outcome::Reply(rate_limited(retry_after_secs));
            }
            Some(Fault::Timeout) => return Outcome::Hold,
            Some(Fault::ResponseLost | Fault::ResponseLost500) | None => {}
        }
        let reply = self.execute_idempotently(method, path, headers, query, form);
        match fault {
            Some(Fault::ResponseLost) => Outcome::HangUp,
            Some(Fault::ResponseLost500) => Outcome::Reply(server_error()),
            _ => Outcome::Reply(reply),
        }
    }

    fn next_fault(&mut self, method: &Method, path: &str) -> Option<Fault> {
        let mut fired = None;
        for (index, rule) in self.faults.iter_mut().enumerate() {
            if !rule.route.matches(method, path) {
                continue;
            }
            let fires = match &mut rule.trigger {
                Trigger::Next(left) => {
                    *left -= 1;
                    true
                }
                Trigger::Probability(p) => self.fault_rng.random::<f64>() < *p,
            };
            if fires {
                fired = Some((index, rule.fault));
                break;
            }
        }
        let (index, fault) = fired?;
        if matches!(self.faults[index].trigger, Trigger::Next(0)) {
            self.faults.remove(index);
        }
        Some(fault)
    }

    fn execute_idempotently(
        &mut self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        query: &Value,
        form: &Value,
    ) -> Reply {
        let now = self.now();
        let request_id = self.new_id("req");
        // Keys on GET (and DELETE) requests have no effect.
        let key = (*method == Method::POST)
            .then(|| headers.get("idempotency-key")?.to_str().ok())
            .flatten()
            .map(str::to_owned);
        if let Some(key) = &key {
            self.idempotency
                .retain(|_, saved| now - saved.created < IDEMPOTENCY_WINDOW);
            if let Some(saved) = self.idempotency.get(key) {
                let reply = if saved.method == *method
                    && saved.path == path
                    && saved.params == *form
                {
                    saved
                        .reply
                        .clone()
                        .header("idempotent-replayed", "true")
                        .header("original-request", saved.request_id.clone())
                } else {
                    ApiError {
                        kind: "idempotency_error",
                        saved: false,
                        ..ApiError::invalid(format!(
                            "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
                        ))
                    }
                    .reply()
                };
                return reply
                    .header("request-id", request_id)
                    .header("idempotency-key", key.clone());
            }
        }
        let params = Params(if *method == Method::GET { query } else { form });
        let (reply, save) = match self.route(method, path, params, now) {
            Ok(body) => (Reply::ok(body), true),
            Err(error) => (error.reply(), error.saved),
        };
        let mut reply = reply.header("request-id", request_id.clone());
        if let Some(key) = key {
            reply = reply.header("idempotency-key", key.clone());
            if save {
                self.idempotency.insert(
                    key,
                    Saved {
                        method: method.clone(),
                        path: path.to_owned(),
                        params: form.clone(),
                        reply: reply.clone(),
                        request_id,
                        created: now,
                    },
                );
            }
        }
        reply
    }

    fn route(
        &mut self,
        method: &Method,
        path: &str,
        p: Params,
        now: i64,
    ) -> Result<Value, ApiError> {
        let segments: Vec<&str> = path
            .strip_prefix("/v1/")
            .map(|rest| rest.trim_end_matches('/').split('/').collect())
            .unwrap_or_default();
        let get = *method == Method::GET;
        let post = *method == Method::POST;
        match segments.as_slice() {
            ["billing", "meters"] if post => self.create_meter(p, now),
            ["billing", "meters"] if get => self.list_meters(p),
            ["billing", "meters", id] if get => {
                p.allow(&[])?;
                Ok(self.meter(id)?.clone())
            }
            ["billing", "meters", id, "event_summaries"] if get => self.event_summaries(id, p),
            ["billing", "meter_events"] if post => self.create_meter_event(p, now),
            ["products"] if post => self.create_product(p, now),
            ["products"] if get => self.list_products(p),
            ["products", id] if post => self.update_product(id, p, now),
            ["products", id] if get => {
                p.allow(&[])?;
                find(&self.products, id)
                    .cloned()
                    .ok_or_else(|| ApiError::no_such("product", id, "id", StatusCode::NOT_FOUND))
            }
            ["prices"] if post => self.create_price(p, now),
            ["prices"] if get => self.list_prices(p),
            ["prices", id] if get => self.retrieve_price(id, p),
            ["prices", id] if post => self.update_price(id, p),
            ["customers"] if post => self.create_customer(p, now),
            ["customers", id] if get => {
                p.allow(&[])?;
                find(&self.customers, id)
                    .cloned()
                    .ok_or_else(|| ApiError::no_such("customer", id, "id", StatusCode::NOT_FOUND))
            }
            ["checkout", "sessions"] if post => self.create_checkout_session(p, now),
            ["checkout", "sessions"] if get => self.list_checkout_sessions(p),
            ["checkout", "sessions", id, "expire"] if post => self.expire_checkout_session(id, p),
            ["checkout", "sessions", id] if get => {
                p.allow(&[])?;
                find(&self.checkout_sessions, id).cloned().ok_or_else(|| {
                    ApiError::no_such("checkout.session", id, "session", StatusCode::NOT_FOUND)
                })
            }
            ["billing_portal", "sessions"] if post => self.create_portal_session(p, now),
            ["subscriptions"] if get => self.list_subscriptions(p),
            ["subscriptions", id] if get => {
                p.allow(&[])?;
                find(&self.subscriptions, id).cloned().ok_or_else(|| {
                    ApiError::no_such("subscription", id, "id", StatusCode::NOT_FOUND)
                })
            }
            _ => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                saved: false,
                ..ApiError::invalid(format!(
                    "Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/."
                ))
            }),
        }
    }

    // ---- Billing meters -------------------------------------------------

    fn meter(&self, id: &str) -> Result<&Value, ApiError> {
        find(&self.meters, id)
            .ok_or_else(|| ApiError::no_such("billing.meter", id, "id", StatusCode::NOT_FOUND))
    }

    /// (customer key, value key) of the meter for `event_name`.
    fn payload_keys(&self, event_name: &str) -> (String, String) {
        let meter = self
            .meters
            .iter()
            .find(|m| m["event_name"] == event_name && m["status"] == "active");
        let key = |field: &str, default: &str| {
            meter
                .and_then(|m| m[field]["event_payload_key"].as_str())
                .unwrap_or(default)
                .to_owned()
        };
        (
            key("customer_mapping", "stripe_customer_id"),
            key("value_settings", "value"),
        )
    }

    fn create_meter(&mut self, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&[
            "customer_mapping",
            "default_aggregation",
            "display_name",
            "event_name",
            "event_time_window",
            "value_settings",
        ])?;
        let display_name = p.require("display_name")?;
        let event_name = p.require("event_name")?;
        let formula = p.require_in("default_aggregation", "formula")?;
        one_of(
            formula,
            &["count", "last", "sum"],
            "default_aggregation[formula]",
        )?;
        let customer_key = p
            .nested("customer_mapping", "event_payload_key")
            .unwrap_or("stripe_customer_id");
        let mapping_type = p.nested("customer_mapping", "type").unwrap_or("by_id");
        one_of(mapping_type, &["by_id"], "customer_mapping[type]")?;
        let value_key = p
            .nested("value_settings", "event_payload_key")
            .unwrap_or("value");
        let window = p.str("event_time_window");
        if let Some(window) = window {
            one_of(window, &["day", "hour"], "event_time_window")?;
        }
        if self
            .meters
            .iter()
            .any(|m| m["event_name"] == event_name && m["status"] == "active")
        {
            return Err(ApiError::invalid(format!(
                "A meter with event_name `{event_name}` already exists."
            ))
            .param("event_name"));
        }
        let meter = json!({
            "id": self.new_id("mtr_test"),
            "object": "billing.meter",
            "created": now,
            "customer_mapping": { "event_payload_key": customer_key, "type": mapping_type },
            "default_aggregation": { "formula": formula },
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": window,
            "livemode": false,
            "status": "active",
            "status_transitions": { "deactivated_at": null },
            "updated": now,
            "value_settings": { "event_payload_key": value_key },
        });
        self.meters.push(meter.clone());
        Ok(meter)
    }

    fn list_meters(&self, p: Params) -> Result<Value, ApiError> {
        p.allow(&["ending_before", "limit", "starting_after", "status"])?;
        let status = p.str("status");
        if let Some(status) = status {
            one_of(status, &["active", "inactive"], "status")?;
        }
        let meters = newest_first(&self.meters)
            .filter(|m| status.is_none_or(|s| m["status"] == s))
            .cloned()
            .collect();
        list_page(meters, &p, "/v1/billing/meters")
    }

    fn create_meter_event(&mut self, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&["event_name", "identifier", "payload", "timestamp"])?;
        let event_name = p.require("event_name")?.to_owned();
        let payload = match p.get("payload") {
            Some(Value::Object(fields)) if !fields.is_empty() => fields
                .iter()
                .map(|(key, value)| match value {
                    Value::String(value) => Ok((key.clone(), value.clone())),
                    _ => Err(ApiError::rejected_param(
                        format!("Invalid string: payload[{key}] must be a string"),
                        &format!("payload[{key}]"),
                    )),
                })
                .collect::<Result<BTreeMap<_, _>, _>>()?,
            _ => return Err(ApiError::missing("payload")),
        };
        let identifier = match p.str("identifier") {
            Some(identifier) if !identifier.is_empty() => identifier.to_owned(),
            _ => self.new_id("idmp"),
        };
        let timestamp = p.int("timestamp")?.unwrap_or(now);
        if timestamp < now - MAX_EVENT_AGE {
            return Err(ApiError::rejected_param(
                format!(
                    "The event timestamp cannot be more than 35 days in past. Expected a timestamp greater than or equal to {}.",
                    now - MAX_EVENT_AGE
                ),
                "timestamp",
            ));
        }
        if timestamp > now + MAX_EVENT_LEAD {
            return Err(ApiError::rejected_param(
                format!(
                    "The event timestamp cannot be more than 5 minutes in the future. Expected a timestamp less than or equal to {}.",
                    now + MAX_EVENT_LEAD
                ),
                "timestamp",
            ));
        }
        if self
            .identifiers
            .get(&identifier)
            .is_some_and(|&accepted| now - accepted < IDENTIFIER_WINDOW)
        {
            return Err(ApiError::invalid(format!(
                "An event already exists with identifier {identifier}."
            )));
        }
        self.identifiers.insert(identifier.clone(), now);
        self.meter_events.push(RecordedMeterEvent {
            identifier: identifier.clone(),
            event_name: event_name.clone(),
            payload: payload.clone(),
            timestamp,
            created: now,
        });
        Ok(json!({
            "object": "billing.meter_event",
            "created": now,
            "event_name": event_name,
            "identifier": identifier,
            "livemode": false,
            "payload": payload,
            "timestamp": timestamp,
        }))
    }

    fn event_summaries(&self, meter_id: &str, p: Params) -> Result<Value, ApiError> {
        p.allow(&[
            "customer",
            "end_time",
            "ending_before",
            "limit",
            "start_time",
            "starting_after",
            "value_grouping_window",
        ])?;
        let meter = self.meter(meter_id)?;
        let customer = p.require("customer")?;
        let start = p
            .int("start_time")?
            .ok_or_else(|| ApiError::missing("start_time"))?;
        let end = p
            .int("end_time")?
            .ok_or_else(|| ApiError::missing("end_time"))?;
        for (name, time) in [("start_time", start), ("end_time", end)] {
            if time % 60 != 0 {
                return Err(ApiError::rejected_param(
                    format!("{name} must be aligned with minute boundaries."),
                    name,
                ));
            }
        }
        if end <= start {
            return Err(ApiError::rejected_param(
                "end_time must be after start_time.",
                "end_time",
            ));
        }
        let window = match p.str("value_grouping_window") {
            None => None,
            Some("hour") => Some(3600),
            Some("day") => Some(86_400),
            Some(other) => {
                return Err(ApiError::rejected_param(
                    format!(
                        "Invalid value_grouping_window: must be one of day or hour (got {other})"
                    ),
                    "value_grouping_window",
                ));
            }
        };
        let customer_key = meter["customer_mapping"]["event_payload_key"]
            .as_str()
            .unwrap_or("stripe_customer_id");
        let value_key = meter["value_settings"]["event_payload_key"]
            .as_str()
            .unwrap_or("value");
        let formula = meter["default_aggregation"]["formula"]
            .as_str()
            .unwrap_or("sum");
        // window start → events in it, by (timestamp, arrival)
        let mut windows: BTreeMap<i64, Vec<(i64, f64)>> = BTreeMap::new();
        if window.is_none() {
            windows.insert(start, Vec::new());
        }
        for event in &self.meter_events {
            let matches = meter["event_name"] == event.event_name
                && event.payload.get(customer_key).map(String::as_str) == Some(customer)
                && (start..end).contains(&event.timestamp);
            let value = event
                .payload
                .get(value_key)
                .and_then(|v| v.parse::<f64>().ok());
            if let (true, Some(value)) = (matches, value) {
                let from = window.map_or(start, |w| {
                    (event.timestamp - event.timestamp.rem_euclid(w)).max(start)
                });
                windows
                    .entry(from)
                    .or_default()
                    .push((event.timestamp, value));
            }
        }
        let meter_id = meter["id"].as_str().unwrap_or(meter_id);
        let summaries = windows
            .into_iter()
            .rev()
            .map(|(from, mut events)| {
                events.sort_by_key(|&(timestamp, _)| timestamp);
                let aggregated = match formula {
                    "count" => events.len() as f64,
                    "last" => events.last().map_or(0.0, |&(_, value)| value),
                    _ => events.iter().map(|&(_, value)| value).sum(),
                };
                let to = window.map_or(end, |w| (from - from.rem_euclid(w) + w).min(end));
                json!({
                    "id": summary_id(meter_id, customer, from),
                    "object": "billing.meter_event_summary",
                    "aggregated_value": aggregated,
                    "end_time": to,
                    "livemode": false,
                    "meter": meter_id,
                    "start_time": from,
                })
            })
            .collect();
        list_page(
            summaries,
            &p,
            &format!("/v1/billing/meters/{meter_id}/event_summaries"),
        )
    }

    // ---- Products and prices ------------------------------------------

    fn create_product(&mut self, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&[
            "active",
            "description",
            "id",
            "images",
            "metadata",
            "name",
            "shippable",
            "statement_descriptor",
            "tax_code",
            "unit_label",
            "url",
        ])?;
        let name = p.require("name")?.to_owned();
        let id = match p.str("id") {
            Some(id) if find(&self.products, id).is_some() => {
                return Err(ApiError {
                    code: Some("resource_already_exists"),
                    ..ApiError::invalid("Product already exists.").param("id")
                });
            }
            Some(id) => id.to_owned(),
            None => self.new_id("prod"),
        };
        let product = self.product(id, name, &p, now)?;
        self.products.push(product.clone());
        Ok(product)
    }

    fn product(&self, id: String, name: String, p: &Params, now: i64) -> Result<Value, ApiError> {
        Ok(json!({
            "id": id,
            "object": "product",
            "active": p.boolean("active")?.unwrap_or(true),
            "attributes": [],
            "created": now,
            "default_price": null,
            "description": p.str("description"),
            "images": p.strings("images"),
            "livemode": false,
            "marketing_features": [],
            "metadata": p.metadata(),
            "name": name,
            "package_dimensions": null,
            "shippable": null,
            "statement_descriptor": p.str("statement_descriptor"),
            "tax_code": p.str("tax_code"),
            "type": "service",
            "unit_label": p.str("unit_label"),
            "updated": now,
            "url": p.str("url"),
        }))
    }

    fn list_products(&self, p: Params) -> Result<Value, ApiError> {
        p.allow(&["active", "ending_before", "ids", "limit", "starting_after"])?;
        let active = p.boolean("active")?;
        let ids = p.strings("ids");
        let products = newest_first(&self.products)
            .filter(|product| active.is_none_or(|a| product["active"] == a))
            .filter(|product| ids.is_empty() || ids.iter().any(|id| product["id"] == *id))
            .cloned()
            .collect();
        list_page(products, &p, "/v1/products")
    }

    /// Changes the fields given; metadata keys merge (an empty value unsets
    /// one), as on Stripe's update endpoints.
    fn update_product(&mut self, id: &str, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&[
            "active",
            "description",
            "metadata",
            "name",
            "unit_label",
            "url",
        ])?;
        let active = p.boolean("active")?;
        let product = self
            .products
            .iter_mut()
            .find(|product| product["id"] == id)
            .ok_or_else(|| ApiError::no_such("product", id, "id", StatusCode::NOT_FOUND))?;
        if let Some(name) = p.str("name").filter(|name| !name.is_empty()) {
            product["name"] = name.into();
        }
        for field in ["description", "unit_label", "url"] {
            if let Some(value) = p.str(field) {
                product[field] = Some(value).filter(|v| !v.is_empty()).into();
            }
        }
        if let Some(active) = active {
            product["active"] = active.into();
        }
        merge_metadata(&mut product["metadata"], &p);
        product["updated"] = now.into();
        Ok(product.clone())
    }

    /// A price's amounts cannot change; its `active` flag, nickname,
    /// metadata and lookup key can (the key taken from another price only
    /// with `transfer_lookup_key`, as on create).
    fn update_price(&mut self, id: &str, p: Params) -> Result<Value, ApiError> {
        p.allow(&[
            "active",
            "lookup_key",
            "metadata",
            "nickname",
            "transfer_lookup_key",
        ])?;
        let index = self
            .prices
            .iter()
            .position(|price| price["id"] == id)
            .ok_or_else(|| ApiError::no_such("price", id, "price", StatusCode::NOT_FOUND))?;
        let active = p.boolean("active")?;
        let transfer = p.boolean("transfer_lookup_key")?.unwrap_or(false);
        let lookup_key = p.str("lookup_key");
        let holder = lookup_key.filter(|key| !key.is_empty()).and_then(|key| {
            self.prices
                .iter()
                .position(|price| price["lookup_key"] == key)
                .filter(|&holder| holder != index)
        });
        if let Some(holder) = holder {
            if !transfer {
                let holder_id = self.prices[holder]["id"].as_str().unwrap_or_default();
                return Err(ApiError::invalid(format!(
                    "A price (`{holder_id}`) already uses that lookup key."
                ))
                .param("lookup_key"));
            }
            self.prices[holder]["lookup_key"] = Value::Null;
        }
        let price = &mut self.prices[index];
        if let Some(key) = lookup_key {
            price["lookup_key"] = Some(key).filter(|k| !k.is_empty()).into();
        }
        if let Some(nickname) = p.str("nickname") {
            price["nickname"] = Some(nickname).filter(|n| !n.is_empty()).into();
        }
        if let Some(active) = active {
            price["active"] = active.into();
        }
        merge_metadata(&mut price["metadata"], &p);
        let price = price.clone();
        Ok(self.render_price(&price, false, false))
    }

    fn create_price(&mut self, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&[
            "active",
            "billing_scheme",
            "currency",
            "lookup_key",
            "metadata",
            "nickname",
            "product",
            "product_data",
            "recurring",
            "tax_behavior",
            "tiers",
            "tiers_mode",
            "transfer_lookup_key",
            "unit_amount",
            "unit_amount_decimal",
        ])?;
        let currency = p.require("currency")?.to_ascii_lowercase();
        let billing_scheme = p.str("billing_scheme").unwrap_or("per_unit");
        one_of(billing_scheme, &["per_unit", "tiered"], "billing_scheme")?;
        let (unit_amount, unit_amount_decimal) = amount(
            p.get("unit_amount"),
            p.get("unit_amount_decimal"),
            "unit_amount",
            "unit_amount_decimal",
        )?;
        let (tiers_mode, tiers) = if billing_scheme == "tiered" {
            let mode = p.require("tiers_mode")?;
            one_of(mode, &["graduated", "volume"], "tiers_mode")?;
            (Value::from(mode), parse_tiers(p.get("tiers"))?)
        } else {
            if unit_amount.is_null() {
                return Err(ApiError::missing("unit_amount"));
            }
            (Value::Null, Value::Null)
        };
        let recurring = self.recurring(&p)?;
        let lookup_key = p.str("lookup_key").filter(|key| !key.is_empty());
        let transfer = p.boolean("transfer_lookup_key")?.unwrap_or(false);
        let holder = lookup_key.and_then(|key| {
            self.prices
                .iter()
                .position(|price| price["lookup_key"] == key)
        });
        if let Some(holder) = holder
            && !transfer
        {
            let id = self.prices[holder]["id"].as_str().unwrap_or_default();
            return Err(ApiError::invalid(format!(
                "A price (`{id}`) already uses that lookup key."
            ))
            .param("lookup_key"));
        }
        let product = match (p.str("product"), p.get("product_data")) {
            (Some(id), _) => {
                find(&self.products, id).ok_or_else(|| {
                    ApiError::no_such("product", id, "product", StatusCode::BAD_REQUEST)
                })?;
                id.to_owned()
            }
            (None, Some(data)) => {
                let data = Params(data);
                let name = data
                    .str("name")
                    .ok_or_else(|| ApiError::missing("product_data[name]"))?;
                let id = self.new_id("prod");
                let product = self.product(id.clone(), name.to_owned(), &data, now)?;
                self.products.push(product);
                id
            }
            (None, None) => return Err(ApiError::missing("product")),
        };
        if let Some(holder) = holder {
            self.prices[holder]["lookup_key"] = Value::Null;
        }
        let price = json!({
            "id": self.new_id("price"),
            "object": "price",
            "active": p.boolean("active")?.unwrap_or(true),
            "billing_scheme": billing_scheme,
            "created": now,
            "currency": currency,
            "custom_unit_amount": null,
            "livemode": false,
            "lookup_key": lookup_key,
            "metadata": p.metadata(),
            "nickname": p.str("nickname"),
            "product": product,
            "type": if recurring.is_null() { "one_time" } else { "recurring" },
            "recurring": recurring,
            "tax_behavior": p.str("tax_behavior").unwrap_or("unspecified"),
            "tiers": tiers,
            "tiers_mode": tiers_mode,
            "transform_quantity": null,
            "unit_amount": unit_amount,
            "unit_amount_decimal": unit_amount_decimal,
        });
        self.prices.push(price.clone());
        Ok(self.render_price(&price, false, false))
    }

    fn recurring(&self, p: &Params) -> Result<Value, ApiError> {
        let Some(recurring) = p.get("recurring") else {
            return Ok(Value::Null);
        };
        let r = Params(recurring);
        let interval = r
            .str("interval")
            .ok_or_else(|| ApiError::missing("recurring[interval]"))?;
        one_of(
            interval,
            &["day", "week", "month", "year"],
            "recurring[interval]",
        )?;
        let interval_count =
            int(r.get("interval_count"), "recurring[interval_count]")?.unwrap_or(1);
        let usage_type = r.str("usage_type").unwrap_or("licensed");
        one_of(
            usage_type,
            &["licensed", "metered"],
            "recurring[usage_type]",
        )?;
        let meter = r.str("meter");
        match (usage_type, meter) {
            ("metered", None) => return Err(ApiError::missing("recurring[meter]")),
            (_, Some(meter)) if find(&self.meters, meter).is_none() => {
                return Err(ApiError::no_such(
                    "billing.meter",
                    meter,
                    "recurring[meter]",
                    StatusCode::BAD_REQUEST,
                ));
            }
            _ => {}
        }
        Ok(json!({
            "interval": interval,
            "interval_count": interval_count,
            "meter": meter,
            "trial_period_days": null,
            "usage_type": usage_type,
        }))
    }

    /// `tiers` is includable: returned only when expanded.
    fn render_price(&self, price: &Value, expand_product: bool, include_tiers: bool) -> Value {
        let mut price = price.clone();
        if let Some(fields) = price.as_object_mut() {
            if !include_tiers {
                fields.remove("tiers");
            }
            if expand_product {
                let product = fields
                    .get("product")
                    .and_then(Value::as_str)
                    .and_then(|id| find(&self.products, id))
                    .cloned();
                if let Some(product) = product {
                    fields.insert("product".into(), product);
                }
            }
        }
        price
    }

    fn retrieve_price(&self, id: &str, p: Params) -> Result<Value, ApiError> {
        p.allow(&[])?;
        let expand = p.expansions(&["product", "tiers"])?;
        let price = find(&self.prices, id)
            .ok_or_else(|| ApiError::no_such("price", id, "price", StatusCode::NOT_FOUND))?;
        Ok(self.render_price(
            price,
            expand.iter().any(|e| e == "product"),
            expand.iter().any(|e| e == "tiers"),
        ))
    }

    fn list_prices(&self, p: Params) -> Result<Value, ApiError> {
        p.allow(&[
            "active",
            "currency",
            "ending_before",
            "limit",
            "lookup_keys",
            "product",
            "starting_after",
            "type",
        ])?;
        let expand = p.expansions(&["data.product", "data.tiers"])?;
        let active = p.boolean("active")?;
        let lookup_keys = p.strings("lookup_keys");
        if lookup_keys.len() > 10 {
            return Err(ApiError::rejected_param(
                "You may only specify up to 10 lookup_keys.",
                "lookup_keys",
            ));
        }
        let (product, currency, kind) = (p.str("product"), p.str("currency"), p.str("type"));
        let prices = newest_first(&self.prices)
            .filter(|price| active.is_none_or(|a| price["active"] == a))
            .filter(|price| {
                lookup_keys.is_empty() || lookup_keys.iter().any(|key| price["lookup_key"] == *key)
            })
            .filter(|price| product.is_none_or(|id| price["product"] == id))
            .filter(|price| currency.is_none_or(|c| price["currency"] == c))
            .filter(|price| kind.is_none_or(|k| price["type"] == k))
            .map(|price| {
                self.render_price(
                    price,
                    expand.iter().any(|e| e == "data.product"),
                    expand.iter().any(|e| e == "data.tiers"),
                )
            })
            .collect();
        list_page(prices, &p, "/v1/prices")
    }

    // ---- Customers, Checkout, portal, subscriptions -------------------

    fn create_customer(&mut self, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&[
            "description",
            "email",
            "metadata",
            "name",
            "phone",
            "preferred_locales",
        ])?;
        let customer = self.customer(&p, now);
        self.customers.push(customer.clone());
        Ok(customer)
    }

    fn customer(&mut self, p: &Params, now: i64) -> Value {
        let id = self.new_id("cus");
        let invoice_prefix: String = id[4..12].to_ascii_uppercase();
        json!({
            "id": id,
            "object": "customer",
            "address": null,
            "balance": 0,
            "created": now,
            "currency": null,
            "default_source": null,
            "delinquent": false,
            "description": p.str("description"),
            "discount": null,
            "email": p.str("email"),
            "invoice_prefix": invoice_prefix,
            "invoice_settings": {
                "custom_fields": null,
                "default_payment_method": null,
                "footer": null,
                "rendering_options": null,
            },
            "livemode": false,
            "metadata": p.metadata(),
            "name": p.str("name"),
            "next_invoice_sequence": 1,
            "phone": p.str("phone"),
            "preferred_locales": p.strings("preferred_locales"),
            "shipping": null,
            "tax_exempt": "none",
            "test_clock": null,
        })
    }

    fn create_checkout_session(&mut self, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&[
            "allow_promotion_codes",
            "billing_address_collection",
            "cancel_url",
            "client_reference_id",
            "currency",
            "customer",
            "customer_email",
            "line_items",
            "locale",
            "metadata",
            "mode",
            "payment_method_types",
            "subscription_data",
            "success_url",
        ])?;
        let mode = p.require("mode")?;
        one_of(mode, &["payment", "setup", "subscription"], "mode")?;
        let customer = p.str("customer");
        if customer.is_some() && p.str("customer_email").is_some() {
            return Err(ApiError::rejected_param(
                "You may only specify one of these parameters: customer, customer_email.",
                "customer",
            ));
        }
        if let Some(id) = customer {
            find(&self.customers, id).ok_or_else(|| {
                ApiError::no_such("customer", id, "customer", StatusCode::BAD_REQUEST)
            })?;
        }
        let mut line_items = Vec::new();
        let mut currency = p.str("currency").map(str::to_owned);
        let items: &[Value] = match p.get("line_items") {
            Some(Value::Array(items)) => items.as_slice(),
            _ if mode == "setup" => &[],
            _ => return Err(ApiError::missing("line_items")),
        };
        for (index, item) in items.iter().enumerate() {
            let item = Params(item);
            let param = |name: &str| format!("line_items[{index}][{name}]");
            let price_id = item
                .str("price")
                .ok_or_else(|| ApiError::missing(&param("price")))?;
            let price = find(&self.prices, price_id).ok_or_else(|| {
                ApiError::no_such("price", price_id, &param("price"), StatusCode::BAD_REQUEST)
            })?;
            let quantity = int(item.get("quantity"), &param("quantity"))?;
            let metered = price["recurring"]["usage_type"] == "metered";
            if metered && quantity.is_some() {
                return Err(ApiError::rejected_param(
                    format!(
                        "Quantity should not be specified where usage_type is `metered`. Remove quantity from `line_items[{index}]`"
                    ),
                    &param("quantity"),
                ));
            }
            if !metered && quantity.is_none() {
                return Err(ApiError::missing(&param("quantity")));
            }
            if mode == "subscription" && price["type"] != "recurring" {
                return Err(ApiError::invalid(
                    "You must provide at least one recurring price in `subscription` mode when using prices.",
                )
                .param(&param("price")));
            }
            currency.get_or_insert_with(|| price["currency"].as_str().unwrap_or("usd").to_owned());
            line_items.push((price_id.to_owned(), quantity));
        }
        let id = self.new_id("cs_test_a1");
        let session = json!({
            "id": id,
            "object": "checkout.session",
            "allow_promotion_codes": p.boolean("allow_promotion_codes")?,
            "amount_subtotal": null,
            "amount_total": null,
            "automatic_tax": { "enabled": false, "liability": null, "provider": null, "status": null },
            "billing_address_collection": p.str("billing_address_collection"),
            "cancel_url": p.str("cancel_url"),
            "client_reference_id": p.str("client_reference_id"),
            "client_secret": null,
            "created": now,
            "currency": currency,
            "custom_fields": [],
            "custom_text": {
                "after_submit": null,
                "shipping_address": null,
                "submit": null,
                "terms_of_service_acceptance": null,
            },
            "customer": customer,
            "customer_creation": if customer.is_none() && mode != "subscription" { Value::from("if_required") } else { Value::Null },
            "customer_details": null,
            "customer_email": p.str("customer_email"),
            "expires_at": now + CHECKOUT_EXPIRY,
            "invoice": null,
            "livemode": false,
            "locale": p.str("locale"),
            "metadata": p.metadata(),
            "mode": mode,
            "payment_intent": null,
            "payment_link": null,
            "payment_method_collection": if mode == "subscription" { Value::from("always") } else { Value::Null },
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "recovered_from": null,
            "setup_intent": null,
            "shipping_address_collection": null,
            "shipping_cost": null,
            "shipping_options": [],
            "status": "open",
            "submit_type": null,
            "subscription": null,
            "success_url": p.str("success_url"),
            "total_details": null,
            "ui_mode": "hosted",
            "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        });
        let subscription_metadata = p
            .get("subscription_data")
            .map_or(json!({}), |data| Params(data).metadata());
        self.checkout_orders.insert(
            id,
            CheckoutOrder {
                line_items,
                subscription_metadata,
            },
        );
        self.checkout_sessions.push(session.clone());
        Ok(session)
    }

    fn list_checkout_sessions(&self, p: Params) -> Result<Value, ApiError> {
        p.allow(&[
            "customer",
            "ending_before",
            "limit",
            "starting_after",
            "status",
            "subscription",
        ])?;
        let customer = p.str("customer");
        let status = p.str("status");
        if let Some(status) = status {
            one_of(status, &["complete", "expired", "open"], "status")?;
        }
        let sessions = newest_first(&self.checkout_sessions)
            .filter(|s| customer.is_none_or(|c| s["customer"] == c))
            .filter(|s| status.is_none_or(|wanted| s["status"] == wanted))
            .cloned()
            .collect();
        list_page(sessions, &p, "/v1/checkout/sessions")
    }

    /// Stripe: "A Checkout Session can be expired when it is in one of these
    /// statuses: open"; otherwise 400.
    fn expire_checkout_session(&mut self, id: &str, p: Params) -> Result<Value, ApiError> {
        p.allow(&["expand"])?;
        let session = self
            .checkout_sessions
            .iter_mut()
            .find(|s| s["id"] == id)
            .ok_or_else(|| {
                ApiError::no_such("checkout.session", id, "session", StatusCode::NOT_FOUND)
            })?;
        if session["status"] != "open" {
            return Err(ApiError::invalid(format!(
                "Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of \"{}\".",
                session["status"].as_str().unwrap_or_default()
            )));
        }
        session["status"] = "expired".into();
        session["url"] = Value::Null;
        Ok(session.clone())
    }

    fn complete_checkout(&mut self, id: &str) -> anyhow::Result<Value> {
        let now = self.now();
        let index = self
            .checkout_sessions
            .iter()
            .position(|s| s["id"] == id)
            .ok_or_else(|| anyhow::anyhow!("no checkout session {id}"))?;
        let session = self.checkout_sessions[index].clone();
        anyhow::ensure!(
            session["status"] == "open",
            "checkout session {id} is {}, not open",
            session["status"]
        );
        let customer = match session["customer"].as_str() {
            Some(customer) => customer.to_owned(),
            None => {
                let email = json!({ "email": session["customer_email"] });
                let customer = self.customer(&Params(&email), now);
                let id = customer["id"].as_str().unwrap_or_default().to_owned();
                self.customers.push(customer);
                id
            }
        };
        let subscription = if session["mode"] == "subscription" {
            let (items, metadata) = self
                .checkout_orders
                .get(id)
                .map(|order| {
                    (
                        order.line_items.clone(),
                        order.subscription_metadata.clone(),
                    )
                })
                .unwrap_or_default();
            Value::from(self.create_subscription(&customer, &items, metadata, now)?)
        } else {
            Value::Null
        };
        let session = &mut self.checkout_sessions[index];
        session["status"] = "complete".into();
        session["payment_status"] = "paid".into();
        session["customer"] = customer.into();
        session["subscription"] = subscription;
        Ok(session.clone())
    }

    fn create_subscription(
        &mut self,
        customer: &str,
        line_items: &[(String, Option<i64>)],
        metadata: Value,
        now: i64,
    ) -> anyhow::Result<String> {
        let id = self.new_id("sub");
        let mut items = Vec::new();
        let mut currency = Value::Null;
        for (price_id, quantity) in line_items {
            let price = find(&self.prices, price_id)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no price {price_id}"))?;
            let recurring = &price["recurring"];
            let days = match recurring["interval"].as_str() {
                Some("day") => 1,
                Some("week") => 7,
                Some("year") => 365,
                _ => 30,
            };
            let count = recurring["interval_count"].as_i64().unwrap_or(1);
            let period_end = now + days * count * 86_400;
            currency = price["currency"].clone();
            let item_id = self.new_id("si");
            items.push(json!({
                "id": item_id,
                "object": "subscription_item",
                "billing_thresholds": null,
                "created": now,
                "current_period_end": period_end,
                "current_period_start": now,
                "discounts": [],
                "metadata": {},
                "plan": plan(&price),
                "price": self.render_price(&price, false, false),
                "quantity": quantity,
                "subscription": id,
                "tax_rates": [],
            }));
        }
        let item_count = items.len();
        let subscription = json!({
            "id": id,
            "object": "subscription",
            "automatic_tax": { "disabled_reason": null, "enabled": false, "liability": null },
            "billing_cycle_anchor": now,
            "billing_mode": { "type": "classic" },
            "billing_schedules": [],
            "cancel_at_period_end": false,
            "cancellation_details": { "comment": null, "feedback": null, "reason": null },
            "collection_method": "charge_automatically",
            "created": now,
            "currency": currency,
            "customer": customer,
            "default_tax_rates": [],
            "discounts": [],
            "invoice_settings": { "account_tax_ids": null, "issuer": { "type": "self" } },
            "items": {
                "object": "list",
                "data": items,
                "has_more": false,
                "total_count": item_count,
                "url": format!("/v1/subscription_items?subscription={id}"),
            },
            "livemode": false,
            "metadata": metadata,
            "start_date": now,
            "status": "active",
        });
        self.subscriptions.push(with_nulls(
            subscription,
            &[
                "application",
                "application_fee_percent",
                "billing_cycle_anchor_config",
                "billing_thresholds",
                "cancel_at",
                "canceled_at",
                "days_until_due",
                "default_payment_method",
                "default_source",
                "description",
                "ended_at",
                "latest_invoice",
                "next_pending_invoice_item_invoice",
                "on_behalf_of",
                "pause_collection",
                "pending_invoice_item_interval",
                "pending_setup_intent",
                "pending_update",
                "schedule",
                "test_clock",
                "transfer_data",
                "trial_end",
                "trial_start",
            ],
        ));
        Ok(id)
    }

    fn create_portal_session(&mut self, p: Params, now: i64) -> Result<Value, ApiError> {
        p.allow(&[
            "configuration",
            "customer",
            "locale",
            "on_behalf_of",
            "return_url",
        ])?;
        let customer = p.require("customer")?;
        find(&self.customers, customer).ok_or_else(|| {
            ApiError::no_such("customer", customer, "customer", StatusCode::BAD_REQUEST)
        })?;
        let id = self.new_id("bps");
        let token = self.new_id("test");
        let session = json!({
            "id": id,
            "object": "billing_portal.session",
            "configuration": p.str("configuration").unwrap_or(&self.portal_configuration),
            "created": now,
            "customer": customer,
            "flow": null,
            "livemode": false,
            "locale": p.str("locale"),
            "on_behalf_of": p.str("on_behalf_of"),
            "return_url": p.str("return_url"),
            "url": format!("https://billing.stripe.com/p/session/{token}"),
        });
        self.portal_sessions.push(session.clone());
        Ok(session)
    }

    fn list_subscriptions(&self, p: Params) -> Result<Value, ApiError> {
        p.allow(&[
            "customer",
            "ending_before",
            "limit",
            "price",
            "starting_after",
            "status",
        ])?;
        let customer = p.str("customer");
        let status = p.str("status");
        let subscriptions = newest_first(&self.subscriptions)
            .filter(|s| customer.is_none_or(|c| s["customer"] == c))
            .filter(|s| match status {
                None => s["status"] != "canceled",
                Some("all") => true,
                Some(status) => s["status"] == status,
            })
            .cloned()
            .collect();
        list_page(subscriptions, &p, "/v1/subscriptions")
    }
}

/// `object` with each of `fields` set to null, as Stripe returns the fields
/// an object does not use.
fn with_nulls(mut object: Value, fields: &[&str]) -> Value {
    if let Some(object) = object.as_object_mut() {
        for field in fields {
            object.insert((*field).to_owned(), Value::Null);
        }
    }
    object
}

/// The legacy `plan` view of a price, which subscription items still carry.
fn plan(price: &Value) -> Value {
    let recurring = &price["recurring"];
    json!({
        "id": price["id"],
        "object": "plan",
        "active": price["active"],
        "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"],
        "billing_scheme": price["billing_scheme"],
        "created": price["created"],
        "currency": price["currency"],
        "interval": recurring["interval"],
        "interval_count": recurring["interval_count"],
        "livemode": false,
        "metadata": price["metadata"],
        "meter": recurring["meter"],
        "nickname": price["nickname"],
        "product": price["product"],
        "tiers_mode": price["tiers_mode"],
        "transform_usage": null,
        "trial_period_days": null,
        "usage_type": recurring["usage_type"],
    })
}

fn authenticate(headers: &HeaderMap, secret_key: &str) -> Result<(), ApiError> {
    let header = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let provided = if let Some(token) = header.strip_prefix("Bearer ") {
        token.trim().to_owned()
    } else if let Some(basic) = header.strip_prefix("Basic ") {
        // `curl -u sk_test_...:` sends the key as a user with no password.
        base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|decoded| String::from_utf8(decoded).ok())
            .map(|user| user.split(':').next().unwrap_or_default().to_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    if provided.is_empty() {
        return Err(ApiError::unauthorized(
            "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.".to_owned(),
        ));
    }
    if provided != secret_key {
        return Err(ApiError::unauthorized(format!(
            "Invalid API Key provided: {}",
            mask_key(&provided)
        )));
    }
    Ok(())
}

/// Stripe's rendering of a refused key: the `sk_test_` prefix, then
/// asterisks, then the last four characters.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let head = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"]
        .iter()
        .find(|prefix| key.starts_with(*prefix))
        .map_or(0, |prefix| prefix.len());
    let tail = chars.len().saturating_sub(head).min(4);
    let stars = chars.len() - head - tail;
    let mut masked: String = chars[..head].iter().collect();
    masked.push_str(&"*".repeat(stars));
    masked.extend(&chars[chars.len() - tail..]);
    masked
}

fn random_id(rng: &mut StdRng, prefix: &str) -> String {
    let body: String = (0..24)
        .map(|_| char::from(rng.sample(Alphanumeric)))
        .collect();
    format!("{prefix}_{body}")
}

fn summary_id(meter: &str, customer: &str, start: i64) -> String {
    let mut hasher = DefaultHasher::new();
    (meter, customer).hash(&mut hasher);
    format!("mtrusg_test_{:016x}{start:x}", hasher.finish())
}

fn find<'a>(items: &'a [Value], id: &str) -> Option<&'a Value> {
    items.iter().find(|item| item["id"] == id)
}

/// Stripe lists newest first.
fn newest_first(items: &[Value]) -> impl Iterator<Item = &Value> {
    items.iter().rev()
}

/// One page of a list object (docs.stripe.com/api/pagination): `limit`
/// (1–100, default 10), `starting_after` or `ending_before` an id.
fn list_page(items: Vec<Value>, p: &Params, url: &str) -> Result<Value, ApiError> {
    let limit = p.int("limit")?.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::rejected_param(
            "Invalid limit: must be between 1 and 100.",
            "limit",
        ));
    }
    let limit = limit as usize;
    let position = |cursor: &str, param: &str| {
        items
            .iter()
            .position(|item| item["id"] == cursor)
            .ok_or_else(|| ApiError::no_such("object", cursor, param, StatusCode::BAD_REQUEST))
    };
    let (data, has_more) = if let Some(cursor) = p.str("ending_before") {
        let end = position(cursor, "ending_before")?;
        let start = end.saturating_sub(limit);
        (items[start..end].to_vec(), start > 0)
    } else {
        let start = match p.str("starting_after") {
            Some(cursor) => position(cursor, "starting_after")? + 1,
            None => 0,
        };
        let end = (start + limit).min(items.len());
        (items[start..end].to_vec(), end < items.len())
    };
    Ok(json!({ "object": "list", "data": data, "has_more": has_more, "url": url }))
}

fn one_of(value: &str, allowed: &[&str], param: &str) -> Result<(), ApiError> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(ApiError::rejected_param(
        format!("Invalid {param}: must be one of {}", allowed.join(", ")),
        param,
    ))
}

fn int(value: Option<&Value>, param: &str) -> Result<Option<i64>, ApiError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| ApiError {
            code: Some("parameter_invalid_integer"),
            ..ApiError::rejected_param(format!("Invalid integer: {s}"), param)
        }),
        Some(_) => Err(ApiError {
            code: Some("parameter_invalid_integer"),
            ..ApiError::rejected_param("Invalid integer", param)
        }),
    }
}

/// An amount given as an integer (`unit_amount`) or a decimal string
/// (`unit_amount_decimal`), as Stripe returns it: the integer is null when
/// the decimal is not whole.
fn amount(
    integer: Option<&Value>,
    decimal: Option<&Value>,
    param: &str,
    decimal_param: &str,
) -> Result<(Value, Value), ApiError> {
    if let Some(integer) = int(integer, param)? {
        return Ok((integer.into(), integer.to_string().into()));
    }
    match decimal.and_then(Value::as_str).filter(|d| !d.is_empty()) {
        None => Ok((Value::Null, Value::Null)),
        Some(decimal) => {
            let parsed: f64 = decimal.parse().map_err(|_| {
                ApiError::rejected_param(format!("Invalid decimal: {decimal}"), decimal_param)
            })?;
            let integer = if parsed.fract() == 0.0 {
                Value::from(parsed as i64)
            } else {
                Value::Null
            };
            Ok((integer, decimal.into()))
        }
    }
}

/// `metadata[key]=value` merged into an object's metadata: an empty value
/// unsets the key.
fn merge_metadata(metadata: &mut Value, p: &Params) {
    let (Some(fields), Some(Value::Object(updates))) =
        (metadata.as_object_mut(), p.get("metadata"))
    else {
        return;
    };
    for (key, value) in updates {
        match value.as_str().filter(|v| !v.is_empty()) {
            Some(value) => {
                fields.insert(key.clone(), value.into());
            }
            None => {
                fields.remove(key);
            }
        }
    }
}

fn parse_tiers(tiers: Option<&Value>) -> Result<Value, ApiError> {
    let Some(Value::Array(tiers)) = tiers else {
        return Err(ApiError::missing("tiers"));
    };
    let mut out = Vec::new();
    let mut previous = 0;
    for (index, tier) in tiers.iter().enumerate() {
        let t = Params(tier);
        let param = |name: &str| format!("tiers[{index}][{name}]");
        let last = index + 1 == tiers.len();
        let up_to = match t.str("up_to") {
            None => return Err(ApiError::missing(&param("up_to"))),
            Some("inf") if last => Value::Null,
            Some("inf") => {
                return Err(ApiError::rejected_param(
                    "Only the last tier may have `up_to=inf`.",
                    &param("up_to"),
                ));
            }
            Some(_) => {
                let up_to = int(t.get("up_to"), &param("up_to"))?.unwrap_or_default();
                if up_to <= previous {
                    return Err(ApiError::rejected_param(
                        "Tiers must be given in increasing order of `up_to`.",
                        &param("up_to"),
                    ));
                }
                previous = up_to;
                Value::from(up_to)
            }
        };
        if last && !up_to.is_null() {
            return Err(ApiError::rejected_param(
                "The last tier must have `up_to=inf`.",
                &param("up_to"),
            ));
        }
        let (unit_amount, unit_amount_decimal) = amount(
            t.get("unit_amount"),
            t.get("unit_amount_decimal"),
            &param("unit_amount"),
            &param("unit_amount_decimal"),
        )?;
        let (flat_amount, flat_amount_decimal) = amount(
            t.get("flat_amount"),
            t.get("flat_amount_decimal"),
            &param("flat_amount"),
            &param("flat_amount_decimal"),
        )?;
        out.push(json!({
            "flat_amount": flat_amount,
            "flat_amount_decimal": flat_amount_decimal,
            "unit_amount": unit_amount,
            "unit_amount_decimal": unit_amount_decimal,
            "up_to": up_to,
        }));
    }
    Ok(out.into())
}

/// Parsed request parameters (a JSON object of strings, objects, arrays).
#[derive(Clone, Copy)]
struct Params<'a>(&'a Value);

impl<'a> Params<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(Value::as_str)
    }

    fn nested(&self, outer: &str, inner: &str) -> Option<&'a str> {
        self.get(outer)?.get(inner)?.as_str()
    }

    fn require(&self, key: &str) -> Result<&'a str, ApiError> {
        self.str(key)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| ApiError::missing(key))
    }

    fn require_in(&self, outer: &str, inner: &str) -> Result<&'a str, ApiError> {
        self.nested(outer, inner)
            .filter(|value| !value.is_empty())
            .ok_or_else(|| ApiError::missing(&format!("{outer}[{inner}]")))
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        int(self.get(key), key)
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.str(key) {
            None | Some("") => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(ApiError {
                code: Some("parameter_invalid_boolean"),
                ..ApiError::rejected_param(format!("Invalid boolean: {other}"), key)
            }),
        }
    }

    /// `key[]=a&key[]=b`, `key[0]=a&key[1]=b` or `key=a`.
    fn strings(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect(),
            Some(Value::String(item)) if !item.is_empty() => vec![item.clone()],
            _ => Vec::new(),
        }
    }

    /// `metadata[key]=value`; an empty value unsets the key.
    fn metadata(&self) -> Value {
        let mut metadata = Map::new();
        if let Some(Value::Object(fields)) = self.get("metadata") {
            for (key, value) in fields {
                if let Some(value) = value.as_str().filter(|v| !v.is_empty()) {
                    metadata.insert(key.clone(), value.into());
                }
            }
        }
        metadata.into()
    }

    /// `expand[]` entries, each of which must be in `supported`.
    fn expansions(&self, supported: &[&str]) -> Result<Vec<String>, ApiError> {
        let expand = self.strings("expand");
        if let Some(unsupported) = expand.iter().find(|e| !supported.contains(&e.as_str())) {
            return Err(ApiError::rejected_param(
                format!("This property cannot be expanded ({unsupported})."),
                "expand",
            ));
        }
        Ok(expand)
    }

    /// Refuses top-level parameters the endpoint does not take (`expand` is
    /// taken everywhere).
    fn allow(&self, known: &[&str]) -> Result<(), ApiError> {
        if let Some(fields) = self.0.as_object()
            && let Some(unknown) = fields
                .keys()
                .find(|key| *key != "expand" && !known.contains(&key.as_str()))
        {
            return Err(ApiError::unknown_param(unknown));
        }
        Ok(())
    }
}

/// Parses a form (or query string) in Stripe's bracket notation into JSON:
/// `a[b]=1` → `{"a":{"b":"1"}}`, `a[]=x&a[]=y` and `a[0]=x&a[1]=y` →
/// `{"a":["x","y"]}`, `t[0][up_to]=5` → `{"t":[{"up_to":"5"}]}`.
fn parse_form(input: &str) -> Value {
    let mut root = FormNode::Map(BTreeMap::new());
    for (key, value) in form_urlencoded::parse(input.as_bytes()) {
        root.insert(&split_key(&key), value.into_owned());
    }
    root.into_json()
}

fn split_key(key: &str) -> Vec<String> {
    let Some(open) = key.find('[') else {
        return vec![key.to_owned()];
    };
    let mut segments = vec![key[..open].to_owned()];
    let mut rest = &key[open..];
    while let Some(inner) = rest.strip_prefix('[') {
        let Some(close) = inner.find(']') else { break };
        segments.push(inner[..close].to_owned());
        rest = &inner[close + 1..];
    }
    segments
}

enum FormNode {
    Leaf(String),
    Map(BTreeMap<String, FormNode>),
    List(Vec<FormNode>),
}

impl FormNode {
    fn insert(&mut self, segments: &[String], value: String) {
        let Some((first, rest)) = segments.split_first() else {
            *self = FormNode::Leaf(value);
            return;
        };
        if first.is_empty() {
            if !matches!(self, FormNode::List(_)) {
                *self = FormNode::List(Vec::new());
            }
            if let FormNode::List(items) = self {
                let mut item = FormNode::Map(BTreeMap::new());
                item.insert(rest, value);
                items.push(item);
            }
        } else {
            if !matches!(self, FormNode::Map(_)) {
                *self = FormNode::Map(BTreeMap::new());
            }
            if let FormNode::Map(entries) = self {
                entries
                    .entry(first.clone())
                    .or_insert_with(|| FormNode::Map(BTreeMap::new()))
                    .insert(rest, value);
            }
        }
    }

    fn into_json(self) -> Value {
        match self {
            FormNode::Leaf(value) => value.into(),
            FormNode::List(items) => items.into_iter().map(FormNode::into_json).collect(),
            // `a[0]`, `a[1]`, … is an array, in index order.
            FormNode::Map(entries)
                if !entries.is_empty() && entries.keys().all(|k| k.parse::<usize>().is_ok()) =>
            {
                let mut items: Vec<(usize, FormNode)> = entries
                    .into_iter()
                    .map(|(key, node)| (key.parse().unwrap_or_default(), node))
                    .collect();
                items.sort_by_key(|(index, _)| *index);
                items
                    .into_iter()
                    .map(|(_, node)| node.into_json())
                    .collect()
            }
            FormNode::Map(entries) => Value::Object(
                entries
                    .into_iter()
                    .map(|(key, node)| (key, node.into_json()))
                    .collect(),
            ),
        }
    }
}
