//! `gpu-sim`: a simulated GPU inference server.
//!
//! A real HTTP server that behaves like trtllm-serve / vLLM (OpenAI API) and
//! Triton (KServe v2) without a GPU, so every test, demo and benchmark of
//! Tollgate has a backend with a realistic timing model, batch slots, a cold
//! start and injected faults.
//!
//! - [`options`]: the command line (the timing and fault model).
//! - [`engine`]: readiness, batch slots, fault draws, token schedule.
//! - [`generate`]: deterministic answers, tool-call arguments and log
//!   probabilities, whose token counts are exact.
//! - [`openai`], [`triton`]: the two protocol front ends; `openai` behaves as
//!   vLLM's server does (prompt lists, `n`, `best_of`, limits, tools).
//! - [`stream`]: paced server-sent events shared by both.
//! - [`work`]: a slow job that speaks no OpenAI, for custom routes.
//! - [`metrics`]: `/metrics` under vLLM's and Triton's names.

pub mod engine;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod openai;
pub mod options;
pub mod stream;
pub mod triton;
pub mod work;

use std::future::Future;
use std::io;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

pub use engine::Engine;
pub use error::SimError;
pub use options::SimOptions;

/// Request bodies up to this size are accepted: far above any real prompt, so
/// the simulator never truncates what a proxy forwards to it.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The simulator's routes.
pub fn router(engine: Arc<Engine>) -> Router {
    let openai = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(openai::responses))
        .route("/v1/images/generations", post(openai::images_generations))
        .route("/v1/images/edits", post(openai::images_edits))
        .route("/v1/audio/speech", post(openai::speech))
        .route("/v1/audio/transcriptions", post(openai::transcriptions))
        .route("/v1/audio/translations", post(openai::translations))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&engine),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/sim/fail", post(fail))
        .route("/sim/recover", post(recover))
        .route("/sim/images/{name}", get(openai::image_file))
        .route("/sim/work", post(work::work))
        .merge(openai)
        .route("/v2/health/live", get(triton::live))
        .route("/v2/health/ready", get(triton::ready))
        .route("/v2/models/{model}/ready", get(triton::model_ready))
        .route("/v2/models/{model}/generate", post(triton::generate))
        .route(
            "/v2/models/{model}/generate_stream",
            post(triton::generate_stream),
        )
        .fallback(|uri: Uri| async move { SimError::NoRoute(uri.path().to_owned()) })
        .method_not_allowed_fallback(|| async { SimError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(engine)
}

/// Serves on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // Streams end with small writes; without TCP_NODELAY, Nagle's algorithm
    // and delayed ACKs hold them back ~40 ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `--api-key`: the OpenAI routes need `Authorization: Bearer KEY`.
async fn require_api_key(
    State(engine): State<Arc<Engine>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &engine.options.api_key {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(key.as_str()) {
            return SimError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

async fn health(State(engine): State<Arc<Engine>>) -> StatusCode {
    match engine.check_ready() {
        Ok(()) => StatusCode::OK,
        Err(e) => e.status(),
    }
}

async fn metrics(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        engine.metrics.render(engine.busy_fraction()),
    )
}

/// Injects an engine failure: health checks and inference answer 503 until recovered.
async fn fail(State(engine): State<Arc<Engine>>) -> StatusCode {
    engine.set_failed(true);
    StatusCode::NO_CONTENT
}

async fn recover(State(engine): State<Arc<Engine>>) -> StatusCode {
    engine.set_failed(false);
    StatusCode::NO_CONTENT
}
