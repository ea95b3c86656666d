//! `[server]`: the listeners, the worker count, the drain on SIGTERM and the
//! upstream timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Env, HumanDuration, address, defaults, override_number, positive};

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    metrics_listen: Option<String>,
    max_body_bytes: Option<usize>,
    max_upload_bytes: Option<usize>,
    workers: Option<usize>,
    drain_timeout: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    read_timeout: Option<HumanDuration>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Largest upload (`multipart/form-data`: an audio file to transcribe),
    /// streamed to the backend rather than held; 413 above it.
    pub max_upload_bytes: usize,
    /// Pingora worker threads for the public listener.
    pub workers: usize,
    /// How long in-flight requests may run on after SIGTERM.
    pub drain_timeout: Duration,
    pub timeouts: UpstreamTimeouts,
}

/// Upstream timeouts; each expiry answers 504 (or ends a stream with an error event).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// The longest silence allowed from a backend: waiting for the first byte
    /// of its answer, and between two chunks of a stream. (Pingora has one
    /// per-read timer, so the two cannot differ.)
    pub read: Duration,
}

pub(super) fn validate(s: RawServer, env: &dyn Env) -> Result<ServerConfig, ConfigError> {
    Ok(ServerConfig {
        listen: address("server.listen", s.listen.as_deref(), defaults::LISTEN)?,
        admin_listen: address(
            "server.admin_listen",
            s.admin_listen.as_deref(),
            defaults::ADMIN_LISTEN,
        )?,
        metrics_listen: address(
            "server.metrics_listen",
            s.metrics_listen.as_deref(),
            defaults::METRICS_LISTEN,
        )?,
        max_body_bytes: positive(
            "server.max_body_bytes",
            s.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES),
        )?,
        max_upload_bytes: positive(
            "server.max_upload_bytes",
            s.max_upload_bytes.unwrap_or(defaults::MAX_UPLOAD_BYTES),
        )?,
        workers: positive(
            "server.workers (env WORKERS)",
            override_number(env, "WORKERS", s.workers)?.unwrap_or(defaults::WORKERS),
        )?,
        drain_timeout: HumanDuration::or(s.drain_timeout, defaults::DRAIN_TIMEOUT),
        timeouts: UpstreamTimeouts {
            connect: HumanDuration::or(s.connect_timeout, defaults::CONNECT_TIMEOUT),
            read: HumanDuration::or(s.read_timeout, defaults::READ_TIMEOUT),
        },
    })
}
