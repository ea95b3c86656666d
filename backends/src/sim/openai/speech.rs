//! `/v1/audio/speech`: WAV audio whose length follows the input's (one
//! `--speech-secs-per-char` of tone per character), the same bytes for the
//! same seed, model, voice and input, streamed in chunks as a TTS server
//! streams what it synthesises, while the request holds a batch slot.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;

use super::request::parse_body;
use crate::sim::engine::{Engine, Slot};
use crate::sim::error::SimError;
use crate::sim::generate::{mix, stable_hash};

/// 16 kHz mono 16-bit: what speech models commonly produce.
const SAMPLE_RATE: u32 = 16_000;
/// OpenAI's bound on `input`.
const MAX_INPUT_CHARS: usize = 4096;
/// Bytes of audio per streamed chunk: a quarter second.
const CHUNK_BYTES: usize = SAMPLE_RATE as usize / 2;

#[derive(Deserialize)]
struct SpeechRequest {
    model: String,
    input: String,
    voice: Option<String>,
    response_format: Option<String>,
}

pub async fn speech(
    State(engine): State<Arc<Engine>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let request: SpeechRequest = parse_body(&body?)?;
    if !engine.serves(&request.model) {
        return Err(SimError::UnknownModel(request.model));
    }
    let chars = request.input.chars().count();
    if chars == 0 || chars > MAX_INPUT_CHARS {
        return Err(SimError::bad_request(
            format!("`input` must be 1 to {MAX_INPUT_CHARS} characters."),
            Some("input"),
        ));
    }
    let content_type = match request.response_format.as_deref() {
        None | Some("wav") => "audio/wav",
        Some("pcm") => "audio/pcm",
        Some(other) => {
            return Err(SimError::bad_request(
                format!("gpu-sim speaks `wav` and `pcm`, not {other:?}."),
                Some("response_format"),
            ));
        }
    };
    let voice = request.voice.as_deref().unwrap_or("alloy");
    let key = stable_hash(
        engine.options.seed,
        &[
            request.model.as_bytes(),
            voice.as_bytes(),
            request.input.as_bytes(),
        ],
    );
    let seconds = chars as f64 * engine.options.speech_secs_per_char;
    let samples = (seconds * f64::from(SAMPLE_RATE)).ceil() as usize;
    let audio = if content_type == "audio/wav" {
        wav(key, samples)
    } else {
        pcm(key, samples)
    };
    let slot = engine.hold_slot(&request.model).await?;
    slot.metrics
        .speech_seconds
        .inc_by(samples as f64 / f64::from(SAMPLE_RATE));
    // Each chunk is due when real time (scaled) reaches the audio it ends.
    let pace = (engine.options.speech_realtime_factor > 0.0).then(|| {
        Duration::from_secs_f64(
            CHUNK_BYTES as f64
                / 2.0
                / f64::from(SAMPLE_RATE)
                / engine.options.speech_realtime_factor,
        )
    });
    let chunks = stream::unfold(
        (Bytes::from(audio), pace, Some(slot)),
        |(mut rest, pace, slot): (Bytes, Option<Duration>, Option<Slot>)| async move {
            if rest.is_empty() {
                // The last chunk is written: the slot goes back.
                drop(slot);
                return None;
            }
            if let Some(pace) = pace {
                tokio::time::sleep(pace).await;
            }
            let chunk = rest.split_to(rest.len().min(CHUNK_BYTES));
            Some((Ok::<_, std::io::Error>(chunk), (rest, pace, slot)))
        },
    );
    let mut response = Body::from_stream(chunks).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

/// A tone whose pitch comes from `key`, `samples` long.
fn samples(key: u64, count: usize) -> impl Iterator<Item = i16> {
    let period = 20 + (mix(key) % 60) as usize;
    (0..count).map(move |i| {
        let phase = (i % period) as f64 / period as f64;
        ((phase * std::f64::consts::TAU).sin() * 8000.0) as i16
    })
}

/// Raw 16-bit little-endian samples (`pcm`, as OpenAI's).
fn pcm(key: u64, count: usize) -> Vec<u8> {
    samples(key, count).flat_map(i16::to_le_bytes).collect()
}

/// The same samples in a WAV file.
pub fn wav(key: u64, count: usize) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut file = Cursor::new(Vec::with_capacity(44 + count * 2));
    // Writing to memory fails only on a sample count WAV cannot hold, far
    // above MAX_INPUT_CHARS' worth.
    if let Ok(mut writer) = hound::WavWriter::new(&mut file, spec) {
        for sample in samples(key, count) {
            if writer.write_sample(sample).is_err() {
                break;
            }
        }
        let _ = writer.finalize();
    }
    file.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wav_lasts_its_samples_and_depends_on_its_key() {
        let file = wav(3, 16_000);
        assert_eq!(file, wav(3, 16_000));
        assert_ne!(file, wav(4, 16_000));
        let reader = hound::WavReader::new(Cursor::new(file)).unwrap();
        assert_eq!(reader.duration(), 16_000);
        assert_eq!(reader.spec().sample_rate, SAMPLE_RATE);
    }
}
