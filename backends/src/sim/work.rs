//! `POST /sim/work`: a slow GPU job that speaks no OpenAI (an avatar
//! renderer, a diffusion server's own API), for Tollgate's custom routes:
//! it holds a batch slot for `--work-ms` and answers a small JSON, with
//! the seconds it took in `x-sim-work-seconds` and at `/usage/seconds`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::engine::Engine;
use super::error::SimError;

/// The header a job's seconds are reported in.
pub const WORK_SECONDS: &str = "x-sim-work-seconds";

pub async fn work(State(engine): State<Arc<Engine>>) -> Result<Response, SimError> {
    engine.check_ready()?;
    // The first model's slot: a custom job names no model.
    let model = engine.options.models.first().cloned().unwrap_or_default();
    let slot = engine.hold_slot(&model).await?;
    let held = Duration::from_millis(engine.options.work_ms);
    if !held.is_zero() {
        tokio::time::sleep(held).await;
    }
    drop(slot);
    // What the job cost, as a render server reports it: in a header and in
    // its answer (custom routes can bill either).
    let seconds = held.as_secs_f64();
    Ok((
        [(WORK_SECONDS, seconds.to_string())],
        Json(json!({"status": "done", "usage": {"seconds": seconds}})),
    )
        .into_response())
}
