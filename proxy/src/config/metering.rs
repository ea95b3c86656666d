//! `[metering]`: token counting (encodings, unit sizes, image tokens), what
//! a generated image costs, and the usage writer (channel, batches, journal,
//! rollup retention).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tollgate_metering::tokens::Encoding;
use tollgate_metering::writer::WriterConfig;

use super::{ConfigError, Env, HumanDuration, defaults, invalid, positive};

/// For models neither in `encodings` nor known to tiktoken.
const DEFAULT_ENCODING: Encoding = Encoding::Cl100k;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetering {
    count_tokens: Option<bool>,
    default_encoding: Option<Encoding>,
    #[serde(default)]
    encodings: HashMap<String, Encoding>,
    #[serde(default)]
    tokens_per_unit: BTreeMap<String, u64>,
    image_tokens: Option<usize>,
    request_stream_usage: Option<bool>,
    usage_mismatch_tolerance: Option<f64>,
    blocking_count_bytes: Option<usize>,
    spool_dir: Option<PathBuf>,
    channel_capacity: Option<usize>,
    batch_size: Option<usize>,
    flush_interval: Option<HumanDuration>,
    write_timeout: Option<HumanDuration>,
    journal_sync_interval: Option<HumanDuration>,
    rollup_retention: Option<HumanDuration>,
    minute_rollup_retention: Option<HumanDuration>,
    #[serde(default)]
    image_weights: RawImageWeights,
    unmeasured_audio_reserve: Option<HumanDuration>,
}

/// `[metering.image_weights]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImageWeights {
    #[serde(default)]
    size: HashMap<String, u64>,
    #[serde(default)]
    quality: HashMap<String, u64>,
}

/// What one image costs in `images` units: its size's weight times its
/// quality's (the price book's "a 1792x1024 image is two"); 1 for a size or
/// quality not listed, or not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageWeights {
    pub size: HashMap<String, u64>,
    pub quality: HashMap<String, u64>,
}

impl ImageWeights {
    pub fn units_per_image(&self, size: Option<&str>, quality: Option<&str>) -> u64 {
        let weight = |table: &HashMap<String, u64>, key: Option<&str>| {
            key.and_then(|k| table.get(k)).copied().unwrap_or(1)
        };
        weight(&self.size, size).saturating_mul(weight(&self.quality, quality))
    }
}

/// `[metering]`: token counting and the usage writer.
#[derive(Debug, Clone)]
pub struct MeteringConfig {
    /// Count tokens locally (env `COUNT_TOKENS`): before forwarding when a
    /// limit needs the count, else in the usage writer; off: trust backends'
    /// usage, counting only answers that report none.
    pub count_tokens: bool,
    /// Encoding for models neither in `encodings` nor known to tiktoken.
    pub default_encoding: Encoding,
    /// Per-model encodings (self-hosted models whose names tiktoken does not know).
    pub encodings: HashMap<String, Encoding>,
    /// Per-model unit size in tokens, ahead of the tier's `tokens_per_unit`.
    pub tokens_per_unit: HashMap<String, u64>,
    /// Prompt tokens charged per image part.
    pub image_tokens: usize,
    /// Ask streaming backends for a final usage chunk (`stream_options.include_usage`).
    pub request_stream_usage: bool,
    /// Relative difference between the backend's and our prompt count beyond
    /// which a mismatch is logged and counted.
    pub usage_mismatch_tolerance: f64,
    /// Inputs longer than this are counted on the blocking pool.
    pub blocking_count_bytes: usize,
    pub spool_dir: PathBuf,
    pub writer: WriterConfig,
    /// How long day rollups are kept.
    pub rollup_retention: Duration,
    /// How long minute rollups are kept (minute precision at a period's edges).
    pub minute_rollup_retention: Duration,
    /// Units per image by size and quality.
    pub image_weights: ImageWeights,
    /// Audio seconds an upload reserves when its header does not declare
    /// its length (an OGG, an MP4 whose index comes last).
    pub unmeasured_audio_reserve: Duration,
}

pub(super) fn validate(m: RawMetering, env: &dyn Env) -> Result<MeteringConfig, ConfigError> {
    let count_tokens = match env.var("COUNT_TOKENS") {
        None => m.count_tokens.unwrap_or(true),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                return Err(invalid(
                    "env COUNT_TOKENS",
                    format!("`{v}` is not true or false"),
                ));
            }
        },
    };
    let mut tokens_per_unit = HashMap::new();
    for (model, tokens) in m.tokens_per_unit {
        if tokens == 0 {
            return Err(invalid(
                format!("metering.tokens_per_unit.\"{model}\""),
                "must be at least 1 (tokens in one billed unit)",
            ));
        }
        tokens_per_unit.insert(model, tokens);
    }
    for (table, weights) in [
        ("size", &m.image_weights.size),
        ("quality", &m.image_weights.quality),
    ] {
        if let Some(key) = weights.iter().find(|(_, w)| **w == 0).map(|(k, _)| k) {
            return Err(invalid(
                format!("metering.image_weights.{table}.\"{key}\""),
                "must be at least 1 (images units one image costs)",
            ));
        }
    }
    let tolerance = m
        .usage_mismatch_tolerance
        .unwrap_or(defaults::USAGE_MISMATCH_TOLERANCE);
    if !(0.0..=1.0).contains(&tolerance) {
        return Err(invalid(
            "metering.usage_mismatch_tolerance",
            "must be a fraction between 0 and 1 (0.02 = 2%)",
        ));
    }
    let metering = MeteringConfig {
        count_tokens,
        default_encoding: m.default_encoding.unwrap_or(DEFAULT_ENCODING),
        encodings: m.encodings,
        tokens_per_unit,
        image_tokens: m.image_tokens.unwrap_or(defaults::IMAGE_TOKENS),
        request_stream_usage: m.request_stream_usage.unwrap_or(true),
        usage_mismatch_tolerance: tolerance,
        blocking_count_bytes: m
            .blocking_count_bytes
            .unwrap_or(defaults::BLOCKING_COUNT_BYTES),
        spool_dir: m
            .spool_dir
            .unwrap_or_else(|| PathBuf::from(defaults::SPOOL_DIR)),
        writer: WriterConfig {
            channel_capacity: positive(
                "metering.channel_capacity",
                m.channel_capacity
                    .unwrap_or(defaults::USAGE_CHANNEL_CAPACITY),
            )?,
            batch_size: positive(
                "metering.batch_size",
                m.batch_size.unwrap_or(defaults::USAGE_BATCH_SIZE),
            )?,
            flush_interval: HumanDuration::or(m.flush_interval, defaults::USAGE_FLUSH_INTERVAL),
            write_timeout: HumanDuration::or(m.write_timeout, defaults::USAGE_WRITE_TIMEOUT),
            journal_sync_interval: HumanDuration::or(
                m.journal_sync_interval,
                defaults::JOURNAL_SYNC_INTERVAL,
            ),
        },
        rollup_retention: HumanDuration::or(m.rollup_retention, defaults::ROLLUP_RETENTION),
        minute_rollup_retention: HumanDuration::or(
            m.minute_rollup_retention,
            defaults::MINUTE_ROLLUP_RETENTION,
        ),
        image_weights: ImageWeights {
            size: m.image_weights.size,
            quality: m.image_weights.quality,
        },
        unmeasured_audio_reserve: HumanDuration::or(
            m.unmeasured_audio_reserve,
            defaults::UNMEASURED_AUDIO_RESERVE,
        ),
    };
    if metering.writer.flush_interval.is_zero() || metering.writer.write_timeout.is_zero() {
        return Err(invalid(
            "metering.flush_interval / metering.write_timeout",
            "must be longer than zero",
        ));
    }
    if metering.minute_rollup_retention > metering.rollup_retention {
        return Err(invalid(
            "metering.minute_rollup_retention",
            "must not exceed metering.rollup_retention (day rollups back the minute ones)",
        ));
    }
    Ok(metering)
}
