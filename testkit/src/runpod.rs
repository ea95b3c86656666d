//! A stand-in for RunPod's pods API (REST v1) on loopback, with state, so the
//! provider's tests (backends) and the gateway's fleet tests (proxy) rent,
//! stop, resume and delete "pods" over the same requests and answers as
//! production, without an account or a GPU. Point a pod's inference port at a local `gpu-sim` with
//! [`FakeOptions::map_port`] and the whole path is real but the GPU.
//!
//! Answers are written out as JSON here, not built from the client's types:
//! a field the client misspells then fails a test instead of being agreed on
//! by both sides.
//!
//! Like RunPod it
//! - answers 401 unless `Authorization: Bearer <api_key>`;
//! - answers 400 (`{"error": …, "status": 400}`) to a create whose body is not
//!   a JSON object (sent as `application/json`) of `PodCreateInput` fields with
//!   the documented types, lacks `imageName`, or, for a GPU pod, `gpuTypeIds`;
//!   stricter than RunPod, it also refuses fields `PodCreateInput` does not
//!   have, so a misspelt field cannot pass unnoticed;
//! - creates pods RUNNING, with `publicIp` and a `portMappings` entry for each
//!   `/tcp` port (none for `/http` ones);
//! - stops them to EXITED (`publicIp` "", `portMappings` {});
//! - resumes them on their host, or answers 500 with RunPod's "not enough free
//!   GPUs on the host machine" while [`FakeRunPod::set_resume_capacity`] is off;
//! - answers 500 "no instances currently available" to creates while
//!   [`FakeRunPod::set_create_capacity`] is off;
//! - lists the pods not deleted, in creation order, at `GET /pods`, those of
//!   one name with `?name=`; stricter than RunPod, it refuses the filters it
//!   does not implement rather than ignore them;
//! - forgets deleted pods: 404 for anything about them afterwards.
//!
//! One fault RunPod cannot be asked for but a network delivers: while
//! [`FakeRunPod::set_lose_create_answers`] is on, a create is carried out
//! (the pod exists, RUNNING, and bills) and its answer lost, the connection
//! reset or the answer never sent ([`LostAnswer`]).
//!
//! Every request is recorded ([`FakeRunPod::requests`]), refused ones too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The answer to a resume whose host has no free GPU, as RunPod words it.
pub const NO_FREE_GPU_ON_HOST: &str =
    "start pod: There are not enough free GPUs on the host machine to start this pod.";
/// The answer to a create that finds no machine, as RunPod words it.
pub const NO_INSTANCES_AVAILABLE: &str = "create pod: There are no instances currently available";

/// The API lives under this path, as RunPod's does (`https://rest.runpod.io/v1`).
const API_PREFIX: &str = "/v1";
/// The one host every fake pod runs on; a resume goes back to it, as on RunPod.
const MACHINE_ID: &str = "fakehost0001";

const RUNNING: &str = "RUNNING";
const EXITED: &str = "EXITED";
const TERMINATED: &str = "TERMINATED";

/// How the fake behaves; change capacity and ports later through the handle.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// The key requests must carry as `Authorization: Bearer KEY`.
    pub api_key: String,
    /// `publicIp` of running pods.
    pub public_ip: String,
    /// Container port to public port, for `/tcp` ports; a port not listed
    /// here is mapped to `30000 + port % 30000`.
    pub port_mappings: BTreeMap<u16, u16>,
    /// Whether creates find a machine.
    pub create_capacity: bool,
    /// Whether a stopped pod's host has a free GPU to resume it with.
    pub resume_capacity: bool,
    /// How many `GET /pods/{id}` after a create or a resume still show the
    /// pod RUNNING but without `publicIp` and ports, as while its container
    /// starts (counted, not timed, so tests need no sleeps).
    pub boot_polls: u32,
    /// `costPerHr` of every pod.
    pub cost_per_hr: f64,
    /// Carry out creates but lose their answers, this way.
    pub lose_create_answers: Option<LostAnswer>,
}

/// How the answer to a create that was carried out gets lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostAnswer {
    /// The connection is closed before the answer is complete: the client
    /// sees a transport error at once.
    Reset,
    /// Nothing is ever sent back: the client's timeout ends the call.
    Silence,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            api_key: "fake-runpod-key".to_owned(),
            public_ip: "127.0.0.1".to_owned(),
            port_mappings: BTreeMap::new(),
            create_capacity: true,
            resume_capacity: true,
            boot_polls: 0,
            cost_per_hr: 0.69,
            lose_create_answers: None,
        }
    }
}

impl FakeOptions {
    /// Maps container port `container` of every pod to `public`, e.g. the
    /// port a local gpu-sim listens on.
    pub fn map_port(mut self, container: u16, public: u16) -> Self {
        self.port_mappings.insert(container, public);
        self
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Below the API prefix (`/pods/{id}/stop`); the full path when the
    /// request missed the prefix.
    pub path: String,
    /// The query string's pairs, decoded.
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    /// JSON; `Null` when empty, a string when not JSON.
    pub body: Value,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A pod as the fake holds it, deleted ones included.
#[derive(Debug, Clone, PartialEq)]
pub struct FakePod {
    pub id: String,
    /// `name` of the create request, if it had one.
    pub name: Option<String>,
    /// `RUNNING`, `EXITED` or `TERMINATED`.
    pub desired_status: &'static str,
    /// The create request's body.
    pub create_body: Value,
}

/// The running fake; it stops when dropped (or at [`FakeRunPod::shutdown`]).
#[derive(Debug)]
pub struct FakeRunPod {
    url: String,
    api_key: String,
    state: Arc<Mutex<Fake>>,
    stop: Option<oneshot::Sender<()>>,
    /// Set when the fake stops: releases the requests kept unanswered
    /// ([`LostAnswer::Silence`]), which a graceful stop would wait for.
    release_silenced: watch::Sender<bool>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl FakeRunPod {
    /// Serves on a free port of 127.0.0.1.
    pub async fn start(options: FakeOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake RunPod API")?;
        let address = listener.local_addr()?;
        let api_key = options.api_key.clone();
        let (release_silenced, silenced) = watch::channel(false);
        let state = Arc::new(Mutex::new(Fake {
            options,
            pods: Vec::new(),
            requests: Vec::new(),
            silenced,
        }));
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            url: format!("http://{address}{API_PREFIX}"),
            api_key,
            state,
            stop: Some(stop),
            release_silenced,
            server: Some(server),
        })
    }

    /// The API's base URL, for `RunPodConfig::api_url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Every pod so far, in creation order.
    pub fn pods(&self) -> Vec<FakePod> {
        self.lock()
            .pods
            .iter()
            .map(|pod| FakePod {
                id: pod.id.clone(),
                name: pod
                    .body
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                desired_status: pod.status,
                create_body: Value::Object(pod.body.clone()),
            })
            .collect()
    }

    /// Off: creates answer RunPod's 500 "no instances currently available".
    pub fn set_create_capacity(&self, available: bool) {
        self.lock().options.create_capacity = available;
    }

    /// Off: resumes answer RunPod's 500 "not enough free GPUs on the host".
    pub fn set_resume_capacity(&self, available: bool) {
        self.lock().options.resume_capacity = available;
    }

    /// `Some`: creates are carried out and their answers lost that way (a
    /// create refused anyway, say for capacity, is answered as usual).
    pub fn set_lose_create_answers(&self, lost: Option<LostAnswer>) {
        self.lock().options.lose_create_answers = lost;
    }

    /// Maps container port `container` to `public` from now on (a resumed
    /// pod may come back on another port).
    pub fn set_port_mapping(&self, container: u16, public: u16) {
        self.lock().options.port_mappings.insert(container, public);
    }

    /// Stops serving and waits for the server to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.release_silenced.send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.context("fake RunPod server task")??;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        // Poisoned only if a handler panicked; the state is still coherent
        // (each request changes it in one step).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FakeRunPod {
    fn drop(&mut self) {
        self.release_silenced.send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

#[derive(Debug)]
struct Fake {
    options: FakeOptions,
    pods: Vec<PodState>,
    requests: Vec<RecordedRequest>,
    /// Turns true when the fake stops.
    silenced: watch::Receiver<bool>,
}

/// What becomes of a request's answer.
enum Reply {
    Send(Response),
    Lose(LostAnswer),
}

#[derive(Debug)]
struct PodState {
    id: String,
    status: &'static str,
    /// The validated create body.
    body: Map<String, Value>,
    /// GETs left that show no network (see [`FakeOptions::boot_polls`]).
    booting: u32,
}

/// Every request: the work is synchronous, under a std mutex never held
/// across an await.
async fn handle(
    State(state): State<Arc<Mutex<Fake>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (reply, mut silenced) = {
        let mut fake = state.lock().unwrap_or_else(PoisonError::into_inner);
        (
            fake.answer(method, &uri, headers, &body),
            fake.silenced.clone(),
        )
    };
    match reply {
        Reply::Send(response) => response,
        Reply::Lose(LostAnswer::Reset) => closed_before_the_answer(),
        Reply::Lose(LostAnswer::Silence) => {
            // Until the fake stops; an error means it is gone already.
            let _ = silenced.wait_for(|stopped| *stopped).await;
            error(StatusCode::SERVICE_UNAVAILABLE, "the fake RunPod stopped")
        }
    }
}

/// A 201 whose body fails before its first byte: hyper drops the
/// connection instead of answering, and the client has no answer.
fn closed_before_the_answer() -> Response {
    let lost = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the create's answer is lost (fake RunPod fault)",
        ))
    });
    (StatusCode::CREATED, Body::from_stream(lost)).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": message, "status": status.as_u16() })),
    )
        .into_response()
}

impl Fake {
    fn answer(&mut self, method: Method, uri: &Uri, headers: HeaderMap, body: &[u8]) -> Reply {
        let response = self.respond(method, uri, headers, body);
        let created = response.status() == StatusCode::CREATED;
        match self.options.lose_create_answers {
            // Only a create answers 201.
            Some(lost) if created => Reply::Lose(lost),
            _ => Reply::Send(response),
        }
    }

    fn respond(&mut self, method: Method, uri: &Uri, headers: HeaderMap, body: &[u8]) -> Response {
        let full_path = uri.path();
        let query = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map(|Query(pairs)| pairs)
            .unwrap_or_default();
        let json_body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        let api_path = full_path
            .strip_prefix(API_PREFIX)
            .filter(|p| p.starts_with('/'))
            .map(str::to_owned);
        let bearer = format!("Bearer {}", self.options.api_key);
        let authorized = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(bearer.as_str());
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        self.requests.push(RecordedRequest {
            method: method.clone(),
            path: api_path.clone().unwrap_or_else(|| full_path.to_owned()),
            query: query.clone(),
            headers,
            body: json_body.clone(),
        });

        if !authorized {
            return error(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        let Some(api_path) = api_path else {
            return error(StatusCode::NOT_FOUND, "not found");
        };
        let segments: Vec<&str> = api_path[1..].split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("POST", ["pods"]) if !is_json => error(
                StatusCode::BAD_REQUEST,
                "request body must be application/json",
            ),
            ("POST", ["pods"]) => self.create(&json_body),
            ("GET", ["pods"]) => self.list(&query),
            ("GET", ["pods", id]) => self.get(id),
            ("DELETE", ["pods", id]) => self.delete(id),
            ("POST", ["pods", id, "start"]) => self.start(id),
            ("POST", ["pods", id, "stop"]) => self.stop(id),
            _ => error(
                StatusCode::NOT_FOUND,
                &format!("no route for {method} {api_path}"),
            ),
        }
    }

    fn create(&mut self, body: &Value) -> Response {
        let body = match validate_create(body) {
            Ok(body) => body,
            Err(problem) => return error(StatusCode::BAD_REQUEST, &problem),
        };
        if !self.options.create_capacity {
            return error(StatusCode::INTERNAL_SERVER_ERROR, NO_INSTANCES_AVAILABLE);
        }
        let pod = PodState {
            id: format!("fakepod{:07}", self.pods.len() + 1),
            status: RUNNING,
            body,
            booting: self.options.boot_polls,
        };
        let answer = self.pod_json(&pod);
        self.pods.push(pod);
        (StatusCode::CREATED, Json(answer)).into_response()
    }

    /// `ListPods` with the one filter Tollgate uses, `name`.
    fn list(&self, query: &[(String, String)]) -> Response {
        let mut name = None;
        for (key, value) in query {
            match key.as_str() {
                "name" => name = Some(value.as_str()),
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("the fake implements no ListPods filter `{other}`"),
                    );
                }
            }
        }
        let pods: Vec<Value> = self
            .pods
            .iter()
            .filter(|pod| pod.status != TERMINATED)
            .filter(|pod| {
                name.is_none_or(|name| pod.body.get("name").and_then(Value::as_str) == Some(name))
            })
            .map(|pod| self.pod_json(pod))
            .collect();
        Json(pods).into_response()
    }

    fn get(&mut self, id: &str) -> Response {
        let Some(index) = self.live(id) else {
            return error(StatusCode::NOT_FOUND, "pod not found");
        };
        let answer = self.pod_json(&self.pods[index]);
        let pod = &mut self.pods[index];
        pod.booting = pod.booting.saturating_sub(1);
        Json(answer).into_response()
    }

    fn start(&mut self, id: &str) -> Response {
        let Some(index) = self.live(id) else {
            return error(StatusCode::NOT_FOUND, "pod not found");
        };
        let boot_polls = self.options.boot_polls;
        if self.pods[index].status == EXITED {
            if !self.options.resume_capacity {
                return error(StatusCode::INTERNAL_SERVER_ERROR, NO_FREE_GPU_ON_HOST);
            }
            let pod = &mut self.pods[index];
            pod.status = RUNNING;
            pod.booting = boot_polls;
        }
        Json(self.pod_json(&self.pods[index])).into_response()
    }

    fn stop(&mut self, id: &str) -> Response {
        let Some(index) = self.live(id) else {
            return error(StatusCode::NOT_FOUND, "pod not found");
        };
        let pod = &mut self.pods[index];
        pod.status = EXITED;
        pod.booting = 0;
        Json(self.pod_json(&self.pods[index])).into_response()
    }

    fn delete(&mut self, id: &str) -> Response {
        let Some(index) = self.live(id) else {
            return error(StatusCode::NOT_FOUND, "pod not found");
        };
        self.pods[index].status = TERMINATED;
        StatusCode::NO_CONTENT.into_response()
    }

    /// The index of pod `id`, unless unknown or deleted.
    fn live(&self, id: &str) -> Option<usize> {
        self.pods
            .iter()
            .position(|pod| pod.id == id && pod.status != TERMINATED)
    }

    /// The pod as RunPod's `Pod` object.
    fn pod_json(&self, pod: &PodState) -> Value {
        let body = &pod.body;
        let field = |key: &str, default: Value| body.get(key).cloned().unwrap_or(default);
        let ports: Vec<String> = body
            .get("ports")
            .and_then(Value::as_array)
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let networked = pod.status == RUNNING && pod.booting == 0;
        let mut mappings = Map::new();
        if networked {
            for port in &ports {
                let Some(container) = port
                    .strip_suffix("/tcp")
                    .and_then(|p| p.parse::<u16>().ok())
                else {
                    continue;
                };
                let public = self
                    .options
                    .port_mappings
                    .get(&container)
                    .copied()
                    .unwrap_or(30000 + container % 30000);
                mappings.insert(container.to_string(), json!(public));
            }
        }
        let public_ip = if networked {
            self.options.public_ip.as_str()
        } else {
            ""
        };
        json!({
            "id": pod.id,
            "name": field("name", json!("my pod")),
            "image": field("imageName", Value::Null),
            "desiredStatus": pod.status,
            "costPerHr": self.options.cost_per_hr,
            "adjustedCostPerHr": self.options.cost_per_hr,
            "gpuCount": field("gpuCount", json!(1)),
            "machineId": MACHINE_ID,
            "containerDiskInGb": field("containerDiskInGb", json!(50)),
            "volumeInGb": field("volumeInGb", json!(20)),
            "volumeMountPath": field("volumeMountPath", json!("/workspace")),
            "ports": ports,
            "env": field("env", json!({})),
            "interruptible": field("interruptible", json!(false)),
            "locked": field("locked", json!(false)),
            "publicIp": public_ip,
            "portMappings": mappings,
        })
    }
}

/// The JSON type a `PodCreateInput` field must have.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    NullableStr,
    Int,
    NullableInt,
    Number,
    Bool,
    StrList,
    StrMap,
    OneOf(&'static [&'static str]),
}

impl Kind {
    fn accepts(self, value: &Value) -> bool {
        let int = |v: &Value| v.is_i64() || v.is_u64();
        match self {
            Kind::Str => value.is_string(),
            Kind::NullableStr => value.is_string() || value.is_null(),
            Kind::Int => int(value),
            Kind::NullableInt => int(value) || value.is_null(),
            Kind::Number => value.is_number(),
            Kind::Bool => value.is_boolean(),
            Kind::StrList => value
                .as_array()
                .is_some_and(|items| items.iter().all(Value::is_string)),
            Kind::StrMap => value
                .as_object()
                .is_some_and(|map| map.values().all(Value::is_string)),
            Kind::OneOf(choices) => value.as_str().is_some_and(|v| choices.contains(&v)),
        }
    }

    fn describe(self) -> String {
        match self {
            Kind::Str => "a string".to_owned(),
            Kind::NullableStr => "a string or null".to_owned(),
            Kind::Int => "an integer".to_owned(),
            Kind::NullableInt => "an integer or null".to_owned(),
            Kind::Number => "a number".to_owned(),
            Kind::Bool => "a boolean".to_owned(),
            Kind::StrList => "an array of strings".to_owned(),
            Kind::StrMap => "an object of strings".to_owned(),
            Kind::OneOf(choices) => format!("one of {}", choices.join(", ")),
        }
    }
}

/// RunPod's `PodCreateInput`, field by field (OpenAPI document, REST v1).
const CREATE_FIELDS: &[(&str, Kind)] = &[
    ("allowedCudaVersions", Kind::StrList),
    ("cloudType", Kind::OneOf(&["SECURE", "COMMUNITY"])),
    ("computeType", Kind::OneOf(&["GPU", "CPU"])),
    ("containerDiskInGb", Kind::NullableInt),
    ("containerRegistryAuthId", Kind::Str),
    ("countryCodes", Kind::StrList),
    ("cpuFlavorIds", Kind::StrList),
    (
        "cpuFlavorPriority",
        Kind::OneOf(&["availability", "custom"]),
    ),
    ("dataCenterIds", Kind::StrList),
    (
        "dataCenterPriority",
        Kind::OneOf(&["availability", "custom"]),
    ),
    ("dockerEntrypoint", Kind::StrList),
    ("dockerStartCmd", Kind::StrList),
    ("env", Kind::StrMap),
    ("globalNetworking", Kind::Bool),
    ("gpuCount", Kind::Int),
    ("gpuTypeIds", Kind::StrList),
    ("gpuTypePriority", Kind::OneOf(&["availability", "custom"])),
    ("imageName", Kind::Str),
    ("interruptible", Kind::Bool),
    ("locked", Kind::Bool),
    ("minDiskBandwidthMBps", Kind::Number),
    ("minDownloadMbps", Kind::Number),
    ("minRAMPerGPU", Kind::Int),
    ("minUploadMbps", Kind::Number),
    ("minVCPUPerGPU", Kind::Int),
    ("name", Kind::Str),
    ("networkVolumeId", Kind::Str),
    ("ports", Kind::StrList),
    ("supportPublicIp", Kind::Bool),
    ("templateId", Kind::NullableStr),
    ("vcpuCount", Kind::Int),
    ("volumeInGb", Kind::NullableInt),
    ("volumeMountPath", Kind::Str),
];

/// RunPod's `maxLength` for `name`.
const MAX_NAME_LEN: usize = 191;

fn validate_create(body: &Value) -> Result<Map<String, Value>, String> {
    let Some(fields) = body.as_object() else {
        return Err("request body must be a JSON object (PodCreateInput)".to_owned());
    };
    for (key, value) in fields {
        let Some((_, kind)) = CREATE_FIELDS.iter().find(|(name, _)| name == key) else {
            return Err(format!("PodCreateInput has no field `{key}`"));
        };
        if !kind.accepts(value) {
            return Err(format!("`{key}` must be {}", kind.describe()));
        }
    }
    let non_empty = |key: &str| match fields.get(key) {
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(Value::Array(items)) => !items.is_empty(),
        _ => false,
    };
    if !non_empty("imageName") && !non_empty("templateId") {
        return Err("`imageName` is required (or a `templateId`)".to_owned());
    }
    let gpu = fields.get("computeType").and_then(Value::as_str) != Some("CPU");
    if gpu && !non_empty("gpuTypeIds") {
        return Err("`gpuTypeIds` is required for a GPU pod".to_owned());
    }
    if fields
        .get("gpuCount")
        .and_then(Value::as_i64)
        .is_some_and(|n| n < 1)
    {
        return Err("`gpuCount` must be at least 1".to_owned());
    }
    for key in ["containerDiskInGb", "volumeInGb"] {
        if fields
            .get(key)
            .and_then(Value::as_i64)
            .is_some_and(|n| n < 0)
        {
            return Err(format!("`{key}` must not be negative"));
        }
    }
    if fields
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|name| name.chars().count() > MAX_NAME_LEN)
    {
        return Err(format!("`name` is longer than {MAX_NAME_LEN} characters"));
    }
    let ports = fields
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for port in ports.filter_map(Value::as_str) {
        let valid = port.split_once('/').is_some_and(|(number, protocol)| {
            number.parse::<u16>().is_ok_and(|n| n > 0) && matches!(protocol, "http" | "tcp")
        });
        if !valid {
            return Err(format!(
                "`ports`: `{port}` is not [port number]/[protocol] with protocol http or tcp"
            ));
        }
    }
    Ok(fields.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Value {
        json!({ "imageName": "img", "gpuTypeIds": ["NVIDIA A40"] })
    }

    #[test]
    fn a_minimal_gpu_pod_is_accepted() {
        assert!(validate_create(&minimal()).is_ok());
        assert!(validate_create(&json!({ "imageName": "img", "computeType": "CPU" })).is_ok());
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (json!([]), "JSON object"),
            (
                json!({ "gpuTypeIds": ["NVIDIA A40"] }),
                "`imageName` is required",
            ),
            (json!({ "imageName": "img" }), "`gpuTypeIds` is required"),
            (
                json!({ "imageName": "img", "gpuTypeIds": [] }),
                "`gpuTypeIds` is required",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": "NVIDIA A40" }),
                "`gpuTypeIds` must be an array",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": ["A40"], "gpuCount": "1" }),
                "`gpuCount` must be an integer",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": ["A40"], "gpuCount": 0 }),
                "at least 1",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": ["A40"], "gpuTypeId": "A40" }),
                "no field `gpuTypeId`",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": ["A40"], "env": [{"key": "A"}] }),
                "`env` must be an object",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": ["A40"], "ports": "8000/tcp" }),
                "`ports` must be an array",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": ["A40"], "ports": ["8000"] }),
                "`8000` is not",
            ),
            (
                json!({ "imageName": "img", "gpuTypeIds": ["A40"], "cloudType": "ALL" }),
                "one of SECURE, COMMUNITY",
            ),
        ];
        for (body, expected) in cases {
            let problem = validate_create(&body).unwrap_err();
            assert!(problem.contains(expected), "{body}: {problem}");
        }
    }
}
