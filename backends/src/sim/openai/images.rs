//! `/v1/images/generations` and `/v1/images/edits`: real PNG files of the
//! requested size, the same bytes for the same seed, model, prompt,
//! position (and, for an edit, source images), so a test can compare an
//! answer through a proxy with one straight from here. A `url` answer
//! points at `/sim/images/{name}`, which draws the image again from its name.
//! `quality` (and any other field) is accepted and does not change the
//! picture: it changes the price book's weight, not the simulation.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::request::{Form, parse_body};
use crate::sim::engine::Engine;
use crate::sim::error::SimError;
use crate::sim::generate::{mix, stable_hash};

/// OpenAI's own bound on `n` for image generation.
const MAX_IMAGES: u32 = 10;
/// Largest side drawn: far above OpenAI's sizes (1792), small enough that a
/// request cannot make the simulator allocate without bound.
const MAX_SIDE: u32 = 2048;
const DEFAULT_SIZE: (u32, u32) = (1024, 1024);

#[derive(Deserialize)]
struct ImageRequest {
    model: String,
    prompt: String,
    n: Option<u32>,
    size: Option<String>,
    response_format: Option<String>,
}

pub async fn images_generations(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let request: ImageRequest = parse_body(&body?)?;
    draw(&engine, &headers, request, &[]).await
}

/// `/v1/images/edits`: a multipart form of `image` (or `image[]`) files,
/// `mask`, `prompt`, `model`, `n`, `size`, `response_format`; the images
/// drawn depend on the sources' bytes too.
pub async fn images_edits(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let form = Form::read(request, &["image", "image[]", "mask"]).await?;
    let sources: Vec<u8> = form
        .files
        .iter()
        .filter(|(name, _)| name != "mask")
        .flat_map(|(_, bytes)| bytes.iter().copied())
        .collect();
    let mut fields = serde_json::Map::new();
    for (name, value) in form.text {
        match name.as_str() {
            "n" => {
                let n: u32 = value.trim().parse().map_err(|_| {
                    SimError::bad_request("`n` must be a positive integer.", Some("n"))
                })?;
                fields.insert(name, json!(n));
            }
            "model" | "prompt" | "size" | "response_format" => {
                fields.insert(name, json!(value));
            }
            _ => {}
        }
    }
    if sources.is_empty() {
        return Err(SimError::bad_request("`image` is required.", Some("image")));
    }
    let request: ImageRequest = serde_json::from_value(Value::Object(fields))
        .map_err(|e| SimError::bad_request(format!("Invalid form: {e}."), None))?;
    draw(&engine, &headers, request, &sources).await
}

/// Draws `request`'s images (from `sources` too, for an edit) and answers.
async fn draw(
    engine: &Engine,
    headers: &HeaderMap,
    request: ImageRequest,
    sources: &[u8],
) -> Result<Response, SimError> {
    if !engine.serves(&request.model) {
        return Err(SimError::UnknownModel(request.model));
    }
    if request.prompt.is_empty() {
        return Err(SimError::bad_request(
            "`prompt` must not be empty.",
            Some("prompt"),
        ));
    }
    let n = request.n.unwrap_or(1);
    if !(1..=MAX_IMAGES).contains(&n) {
        return Err(SimError::bad_request(
            format!("`n` must be between 1 and {MAX_IMAGES}."),
            Some("n"),
        ));
    }
    let (width, height) = match request.size.as_deref() {
        None | Some("auto") => DEFAULT_SIZE,
        Some(size) => parse_size(size).ok_or_else(|| {
            SimError::bad_request(
                format!("`size` must be WIDTHxHEIGHT (each 16 to {MAX_SIDE}) or \"auto\"."),
                Some("size"),
            )
        })?,
    };
    let inline = match request.response_format.as_deref() {
        None | Some("url") => false,
        Some("b64_json") => true,
        Some(other) => {
            return Err(SimError::bad_request(
                format!("`response_format` must be \"url\" or \"b64_json\", not {other:?}."),
                Some("response_format"),
            ));
        }
    };
    let slot = engine.hold_slot(&request.model).await?;
    let work = Duration::from_millis(engine.options.ms_per_image.saturating_mul(u64::from(n)));
    if !work.is_zero() {
        tokio::time::sleep(work).await;
    }
    slot.metrics.images.inc_by(u64::from(n));
    drop(slot);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let data: Vec<Value> = (0..n)
        .map(|index| {
            let index = index.to_le_bytes();
            let mut parts = vec![request.model.as_bytes(), request.prompt.as_bytes(), &index];
            if !sources.is_empty() {
                parts.push(sources);
            }
            let key = stable_hash(engine.options.seed, &parts);
            let name = image_name(key, width, height);
            if inline {
                let png = draw_png(key, width, height);
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png)})
            } else {
                json!({"url": format!("http://{host}/sim/images/{name}")})
            }
        })
        .collect();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Json(json!({"created": created, "data": data})).into_response())
}

/// `GET /sim/images/{name}`: the PNG a `url` answer named.
pub async fn image_file(Path(name): Path<String>) -> Result<Response, SimError> {
    let (key, width, height) =
        parse_image_name(&name).ok_or_else(|| SimError::NoRoute(format!("/sim/images/{name}")))?;
    Ok((
        [(header::CONTENT_TYPE, "image/png")],
        draw_png(key, width, height),
    )
        .into_response())
}

fn parse_size(size: &str) -> Option<(u32, u32)> {
    let (width, height) = size.split_once('x')?;
    let side = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|v| (16..=MAX_SIDE).contains(v))
    };
    Some((side(width)?, side(height)?))
}

fn image_name(key: u64, width: u32, height: u32) -> String {
    format!("{key:016x}-{width}x{height}.png")
}

fn parse_image_name(name: &str) -> Option<(u64, u32, u32)> {
    let (key, size) = name.strip_suffix(".png")?.split_once('-')?;
    let (width, height) = parse_size(size)?;
    Some((u64::from_str_radix(key, 16).ok()?, width, height))
}

/// An RGB picture drawn from `key`: bands and a diagonal pattern, cheap to
/// draw and to compress, different for every key.
pub fn draw_png(key: u64, width: u32, height: u32) -> Vec<u8> {
    let [r0, g0, b0, step, ..] = mix(key).to_le_bytes();
    let step = u32::from(step | 1);
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            let band = ((x / 32 + y / 32) * step) as u8;
            pixels.extend_from_slice(&[
                r0.wrapping_add(band),
                g0.wrapping_add((x ^ y) as u8),
                b0.wrapping_add((y * step / 16) as u8),
            ]);
        }
    }
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    // Writing into a Vec with a buffer of the declared size cannot fail.
    if let Ok(mut writer) = encoder.write_header() {
        let _ = writer.write_image_data(&pixels);
    }
    png
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_png_has_its_size_and_depends_only_on_its_key() {
        let png = draw_png(7, 64, 32);
        assert_eq!(png, draw_png(7, 64, 32));
        assert_ne!(png, draw_png(8, 64, 32));
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (64, 32));
    }

    #[test]
    fn names_round_trip_and_bad_sizes_are_refused() {
        assert_eq!(
            parse_image_name(&image_name(0xabc, 1792, 1024)),
            Some((0xabc, 1792, 1024))
        );
        for bad in ["1024", "0x10", "4096x4096", "axb", "10x10"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
