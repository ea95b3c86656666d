//! The ComfyUI bridge: a server on a loopback port of this process that
//! speaks OpenAI's images API on one side and ComfyUI's workflow queue on
//! the other. The gateway routes an images request chosen for a comfyui
//! backend here (the backend's id in [`BACKEND_HEADER`]), so admission,
//! the queue, the breaker and metering treat it as any request; the bridge
//! fills the backend's workflow template
//! ([`tollgate_backends::protocol::comfyui`]), queues it (`POST /prompt`),
//! polls its history, downloads its images (`GET /view`) and answers them
//! as `b64_json`. A request given up (its client, or its job, gone) is
//! taken off ComfyUI's queue, and interrupted if it was running.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{Value, json};
use tollgate_backends::protocol::comfyui::{History, ImageAsk, fill, images_answer, read_history};
use tollgate_backends::routing::UpstreamSelector;

/// The comfyui backend a request is for (its id), set by the gateway.
pub const BACKEND_HEADER: &str = "x-tollgate-comfyui-backend";
/// An images request's body is small; anything bigger is not one.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// How often a queued prompt's history is read.
const POLL: Duration = Duration::from_millis(100);

pub struct ComfyBridge {
    /// Bound before the server starts, so the gateway knows the address.
    listener: Mutex<Option<std::net::TcpListener>>,
    pub address: SocketAddr,
    state: Arc<Bridge>,
}

struct Bridge {
    selector: Arc<dyn UpstreamSelector>,
    /// Each backend's workflow template, by backend id (`None`: not comfyui).
    workflows: Vec<Option<Arc<Value>>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ComfyBridge {
    /// A bridge on a free loopback port for these backends' workflows.
    pub fn bind(
        selector: Arc<dyn UpstreamSelector>,
        workflows: Vec<Option<Arc<Value>>>,
    ) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            address: listener.local_addr()?,
            listener: Mutex::new(Some(listener)),
            state: Arc::new(Bridge {
                selector,
                workflows,
                client: Client::builder(TokioExecutor::new()).build_http(),
            }),
        })
    }
}

#[async_trait]
impl BackgroundService for ComfyBridge {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let taken = self.listener.lock().ok().and_then(|mut l| l.take());
        let Some(listener) = taken.and_then(|l| tokio::net::TcpListener::from_std(l).ok()) else {
            tracing::error!("comfyui bridge: its listener could not be opened");
            return;
        };
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!("comfyui bridge: accept failed: {error}");
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let state = Arc::clone(&self.state);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(state.handle(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

/// An OpenAI-shaped error answer.
fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn bad_gateway(message: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "comfyui_failed",
        message,
    )
}

/// Takes a prompt off ComfyUI's queue (and interrupts it if it is the one
/// running) when its request is dropped before it finished.
struct Queued {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    prompt_id: Option<String>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let Some(prompt_id) = self.prompt_id.take() else {
            return;
        };
        let (client, base) = (self.client.clone(), self.base.clone());
        tokio::spawn(async move {
            let delete = json!({"delete": [prompt_id]}).to_string();
            let _ = client.request(post(&format!("{base}/queue"), delete)).await;
            // `/interrupt` stops whatever runs: only when that is this prompt
            // (`queue_running` holds `[number, prompt_id, …]` entries).
            let Ok(queue) = client.request(get(&format!("{base}/queue"))).await else {
                return;
            };
            let Ok(queue) = queue.into_body().collect().await else {
                return;
            };
            let queue: Value = serde_json::from_slice(&queue.to_bytes()).unwrap_or_default();
            let running = queue["queue_running"]
                .as_array()
                .is_some_and(|running| running.iter().any(|entry| entry[1] == prompt_id));
            if running {
                let _ = client
                    .request(post(&format!("{base}/interrupt"), "{}".into()))
                    .await;
            }
        });
    }
}

fn post(url: &str, body: String) -> Request<Full<Bytes>> {
    Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap_or_default()
}

impl Bridge {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let id = request
            .headers()
            .get(BACKEND_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let found =
            id.and_then(|id| Some((self.selector.backend(id)?, self.workflows.get(id)?.clone()?)));
        let Some((backend, workflow)) = found else {
            return error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
                "Not a comfyui backend.",
            );
        };
        let body = match Limited::new(request.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "request_too_large",
                    "Request body too large.",
                );
            }
        };
        let ask = serde_json::from_slice::<Value>(&body)
            .map_err(|e| e.to_string())
            .and_then(|body| ImageAsk::from_request(&body, rand::random::<u32>().into()));
        let ask = match ask {
            Ok(ask) => ask,
            Err(why) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_request",
                    &why,
                );
            }
        };
        let base = format!("http://{}", backend.address);
        let graph = fill(&workflow, &ask);
        let client_id = uuid::Uuid::now_v7().to_string();
        let queued = json!({"prompt": graph, "client_id": client_id}).to_string();
        let (status, answer) = match self.call(post(&format!("{base}/prompt"), queued)).await {
            Ok(answered) => answered,
            Err(why) => return bad_gateway(&format!("ComfyUI did not take the workflow: {why}")),
        };
        if status == StatusCode::BAD_REQUEST {
            let why = answer["error"]["message"]
                .as_str()
                .unwrap_or("invalid workflow");
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "workflow_invalid",
                &format!("ComfyUI refused the workflow: {why}"),
            );
        }
        let Some(prompt_id) = answer["prompt_id"]
            .as_str()
            .map(str::to_owned)
            .filter(|_| status.is_success())
        else {
            return bad_gateway(&format!("ComfyUI answered {status} to the workflow"));
        };
        let mut queued = Queued {
            client: self.client.clone(),
            base: base.clone(),
            prompt_id: Some(prompt_id.clone()),
        };
        let images = loop {
            match self.call(get(&format!("{base}/history/{prompt_id}"))).await {
                Ok((status, history)) if status.is_success() => {
                    match read_history(&prompt_id, &history) {
                        History::Pending => tokio::time::sleep(POLL).await,
                        History::Done(images) => break images,
                        History::Failed(why) => {
                            queued.prompt_id = None;
                            return error(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "server_error",
                                "workflow_failed",
                                &format!("The workflow failed: {why}"),
                            );
                        }
                    }
                }
                Ok((status, _)) => {
                    return bad_gateway(&format!("ComfyUI answered {status} to its history"));
                }
                Err(why) => return bad_gateway(&format!("ComfyUI's history: {why}")),
            }
        };
        queued.prompt_id = None;
        let mut pngs = Vec::with_capacity(images.len());
        for image in &images {
            let url = format!("{base}/view?{}", image.view_query());
            match self.client.request(get(&url)).await {
                Ok(response) if response.status().is_success() => match response
                    .into_body()
                    .collect()
                    .await
                {
                    Ok(body) => pngs.push(body.to_bytes().to_vec()),
                    Err(why) => {
                        return bad_gateway(&format!("ComfyUI's image {}: {why}", image.filename));
                    }
                },
                Ok(response) => {
                    return bad_gateway(&format!(
                        "ComfyUI answered {} to image {}",
                        response.status(),
                        image.filename
                    ));
                }
                Err(why) => {
                    return bad_gateway(&format!("ComfyUI's image {}: {why}", image.filename));
                }
            }
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut response = Response::new(Full::new(Bytes::from(
            images_answer(created, &pngs).to_string(),
        )));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }

    /// A call to ComfyUI answering JSON: its status and body.
    async fn call(&self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Value), String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }
}
