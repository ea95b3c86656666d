//! `/v1/audio/transcriptions` and `/v1/audio/translations`: a multipart
//! upload (`file`, `model`, `response_format`, …) answered with a text that
//! names the audio's real length, read from the file by the same demuxers
//! Tollgate meters with, and reported as OpenAI reports it (`usage` of type
//! `duration`; `duration` in `verbose_json`). The request holds a batch
//! slot for `--ms-per-audio-second` per second of audio.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_metering::audio::{AudioLength, audio_length};
use tollgate_metering::endpoint::Endpoint;

use super::request::Form;
use crate::sim::engine::Engine;
use crate::sim::error::SimError;

pub async fn transcriptions(
    State(engine): State<Arc<Engine>>,
    request: Request,
) -> Result<Response, SimError> {
    transcribe(engine, request, Endpoint::Transcription).await
}

pub async fn translations(
    State(engine): State<Arc<Engine>>,
    request: Request,
) -> Result<Response, SimError> {
    transcribe(engine, request, Endpoint::Translation).await
}

async fn transcribe(
    engine: Arc<Engine>,
    request: Request,
    endpoint: Endpoint,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let mut form = Form::read(request, &["file"]).await?;
    let model = form
        .text
        .remove("model")
        .ok_or_else(|| SimError::bad_request("`model` is required.", Some("model")))?;
    if !engine.serves(&model) {
        return Err(SimError::UnknownModel(model));
    }
    let file = form
        .files
        .pop()
        .map(|(_, file)| file)
        .ok_or_else(|| SimError::bad_request("`file` is required.", Some("file")))?;
    let seconds = match audio_length(file, true) {
        Ok(AudioLength::Seconds(seconds)) => seconds,
        Ok(AudioLength::Unknown) | Err(_) => {
            return Err(SimError::bad_request(
                "`file` is not audio gpu-sim can read.",
                Some("file"),
            ));
        }
    };
    let format = form
        .text
        .get("response_format")
        .map_or("json", String::as_str);
    if !["json", "verbose_json", "text", "srt", "vtt"].contains(&format) {
        return Err(SimError::bad_request(
            format!("Unknown `response_format` {format:?}."),
            Some("response_format"),
        ));
    }
    let slot = engine.hold_slot(&model).await?;
    let held = Duration::from_secs_f64(seconds * engine.options.ms_per_audio_second / 1000.0);
    if !held.is_zero() {
        tokio::time::sleep(held).await;
    }
    slot.metrics.transcribed_seconds.inc_by(seconds);
    drop(slot);
    let text = format!("{seconds:.2} seconds of audio, heard by {model}.");
    let usage = json!({"type": "duration", "seconds": seconds.ceil()});
    Ok(match format {
        "text" => text.into_response(),
        "srt" => {
            format!("1\n00:00:00,000 --> {}\n{text}\n", timestamp(seconds, ',')).into_response()
        }
        "vtt" => (
            [(header::CONTENT_TYPE, "text/vtt")],
            format!(
                "WEBVTT\n\n00:00:00.000 --> {}\n{text}\n",
                timestamp(seconds, '.')
            ),
        )
            .into_response(),
        "verbose_json" => {
            let mut answer = json!({
                "task": if endpoint == Endpoint::Translation { "translate" } else { "transcribe" },
                "language": "english",
                "duration": seconds,
                "text": text,
                "segments": [{"id": 0, "start": 0.0, "end": seconds, "text": text}],
            });
            if !engine.options.no_usage {
                answer["usage"] = usage;
            }
            Json(answer).into_response()
        }
        _ if engine.options.no_usage => Json(json!({"text": text})).into_response(),
        _ => Json(json!({"text": text, "usage": usage})).into_response(),
    })
}

/// `HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (VTT).
fn timestamp(seconds: f64, separator: char) -> String {
    let millis = (seconds * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{separator}{:03}",
        millis / 3_600_000,
        millis / 60_000 % 60,
        millis / 1000 % 60,
        millis % 1000
    )
}
