//! A stateful fake of ComfyUI's HTTP API, as an image server behind
//! Tollgate speaks it: `POST /prompt` queues a workflow graph (API format)
//! and answers its `prompt_id`; `GET /history/{prompt_id}` answers `{}`
//! until the prompt has run, then its outputs; `GET /view?filename=…&
//! subfolder=…&type=output` serves an image; `GET /system_stats` is the
//! health check. A prompt "runs" for `ms_per_step` times its sampler's
//! `steps`, one at a time, and leaves `batch_size` PNGs of the latent's
//! size whose colour comes from the seed ([`FakeComfyUi::image`]).
//! A graph without a `KSampler` and an `EmptyLatentImage` node is refused
//! as ComfyUI refuses an invalid prompt (400, `error` and `node_errors`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub struct FakeComfyUi {
    url: String,
    state: Arc<Mutex<Fake>>,
    server: tokio::task::AbortHandle,
}

#[derive(Default)]
struct Fake {
    ms_per_step: u64,
    /// Prompts in submission order.
    prompts: Vec<Prompt>,
    /// When the last queued prompt finishes: prompts run one at a time.
    busy_until: Option<Instant>,
    images: HashMap<String, Vec<u8>>,
}

struct Prompt {
    id: String,
    graph: Value,
    done_at: Instant,
    /// Output file names, once it has run.
    outputs: Vec<String>,
}

impl FakeComfyUi {
    pub async fn start(ms_per_step: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(Fake {
            ms_per_step,
            ..Fake::default()
        }));
        let router = Router::new()
            .route("/prompt", post(queue_prompt))
            .route("/history/{id}", get(history))
            .route("/view", get(view))
            .route("/system_stats", get(system_stats))
            .with_state(Arc::clone(&state));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        })
        .abort_handle();
        Self {
            url: format!("http://{address}"),
            state,
            server,
        }
    }

    /// `http://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The address, for a backend's `url`.
    pub fn address(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Every graph queued so far, in order.
    pub fn graphs(&self) -> Vec<Value> {
        let fake = self.state.lock().unwrap();
        fake.prompts.iter().map(|p| p.graph.clone()).collect()
    }

    /// The PNG the fake renders for `seed` at `width`×`height`, the
    /// `index`-th of its batch.
    pub fn image(seed: u64, width: u32, height: u32, index: u32) -> Vec<u8> {
        let colour = seed
            .wrapping_mul(2_654_435_761)
            .wrapping_add(u64::from(index) * 97);
        let pixel = [colour as u8, (colour >> 8) as u8, (colour >> 16) as u8];
        let mut png = Vec::new();
        let mut encoder = png::Encoder::new(&mut png, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        let data: Vec<u8> = pixel.repeat((width * height) as usize);
        writer.write_image_data(&data).unwrap();
        writer.finish().unwrap();
        png
    }
}

impl Drop for FakeComfyUi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The inputs of the graph's first node of `class`.
fn inputs<'a>(graph: &'a Value, class: &str) -> Option<&'a Value> {
    graph
        .as_object()?
        .values()
        .find(|node| node["class_type"] == class)
        .map(|node| &node["inputs"])
}

async fn queue_prompt(State(state): State<Arc<Mutex<Fake>>>, Json(body): Json<Value>) -> Response {
    let graph = body["prompt"].clone();
    let (Some(sampler), Some(latent)) = (
        inputs(&graph, "KSampler"),
        inputs(&graph, "EmptyLatentImage"),
    ) else {
        let error = json!({
            "error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                      "details": "", "extra_info": {}},
            "node_errors": {},
        });
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    };
    let number = |value: &Value| value.as_u64();
    let (Some(steps), Some(seed), Some(width), Some(height), Some(batch)) = (
        number(&sampler["steps"]),
        number(&sampler["seed"]),
        number(&latent["width"]),
        number(&latent["height"]),
        number(&latent["batch_size"]),
    ) else {
        let error = json!({
            "error": {"type": "prompt_outputs_failed_validation",
                      "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {"KSampler": {"errors": [{"type": "value_not_valid"}]}},
        });
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    };
    let mut fake = state.lock().unwrap();
    let now = Instant::now();
    let start = fake.busy_until.filter(|at| *at > now).unwrap_or(now);
    let done_at = start + Duration::from_millis(fake.ms_per_step * steps);
    fake.busy_until = Some(done_at);
    let number = fake.prompts.len();
    let id = format!("{:08x}-fake-{number:04}", seed as u32);
    let mut outputs = Vec::new();
    for index in 0..batch as u32 {
        let filename = format!("ComfyUI_{number:05}_{index}_.png");
        let png = FakeComfyUi::image(seed, width as u32, height as u32, index);
        fake.images.insert(filename.clone(), png);
        outputs.push(filename);
    }
    fake.prompts.push(Prompt {
        id: id.clone(),
        graph,
        done_at,
        outputs,
    });
    Json(json!({"prompt_id": id, "number": number, "node_errors": {}})).into_response()
}

async fn history(State(state): State<Arc<Mutex<Fake>>>, Path(id): Path<String>) -> Json<Value> {
    let fake = state.lock().unwrap();
    let Some(prompt) = fake.prompts.iter().find(|p| p.id == id) else {
        return Json(json!({}));
    };
    if Instant::now() < prompt.done_at {
        return Json(json!({}));
    }
    let images: Vec<Value> = prompt
        .outputs
        .iter()
        .map(|name| json!({"filename": name, "subfolder": "", "type": "output"}))
        .collect();
    Json(json!({
        id.clone(): {
            "prompt": [0, id, prompt.graph, {}, ["9"]],
            "outputs": {"9": {"images": images}},
            "status": {"status_str": "success", "completed": true, "messages": []},
            "meta": {"9": {"node_id": "9", "display_node": "9"}},
        }
    }))
}

async fn view(
    State(state): State<Arc<Mutex<Fake>>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let fake = state.lock().unwrap();
    match query.get("filename").and_then(|name| fake.images.get(name)) {
        Some(png) if query.get("type").is_none_or(|t| t == "output") => {
            ([("content-type", "image/png")], png.clone()).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn system_stats() -> Json<Value> {
    Json(json!({
        "system": {"os": "posix", "comfyui_version": "0.3.40", "python_version": "3.11"},
        "devices": [{"name": "cuda:0 fake", "type": "cuda", "index": 0}],
    }))
}
