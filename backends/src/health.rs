//! Active health checking: probing a backend over HTTP and turning probe
//! results into a healthy/unhealthy verdict.
//!
//! The two halves are kept apart so each can be tested alone:
//!
//! - [`Health`] is the I/O-free verdict for one backend. The request path
//!   only reads an atomic flag; the prober feeds it results with explicit
//!   [`Instant`]s, so the state machine is tested without clocks or sockets.
//!   Hysteresis ([`ProbeConfig::unhealthy_after`], [`ProbeConfig::healthy_after`])
//!   keeps one lost probe from pulling a backend out of rotation, and a grace
//!   period keeps a backend that is still loading its model from being
//!   declared dead.
//! - [`probe`] asks a backend once, per its protocol ([`Probe`]), through a
//!   reusable [`ProbeClient`].
//!
//! Only plain `http://` backends can be probed: the client has no TLS. The
//! caller skips probing for TLS backends (they stay at their presumed-healthy
//! verdict and rely on the passive circuit breaker).
//!
//! Nothing here logs: the caller owns the backend's name and logs the flips
//! [`Health::record`] reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::ACCEPT;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// What a probe asks, per protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// An OpenAI-style server: `GET {path}` answers 200 when ready —
    /// `/health` for trtllm-serve, vLLM and SGLang, `/health/ready` for
    /// Triton's OpenAI frontend.
    OpenAi { path: String },
    /// Triton: `GET /v2/health/ready` and `GET /v2/models/{model}/ready` both 200.
    ///
    /// The server being ready is not enough: Triton answers ready while one
    /// of its models is still loading or has failed to load.
    Triton { model: String },
}

/// Where OpenAI-style servers answer their health check by default.
pub const DEFAULT_HEALTH_PATH: &str = "/health";

impl Probe {
    /// The probe of a backend speaking `protocol` and serving `models`: a
    /// Triton server must also have the first of them loaded; an OpenAI-style
    /// one answers at `health_path`.
    pub fn for_protocol(
        protocol: crate::protocol::Protocol,
        models: &[String],
        health_path: &str,
    ) -> Self {
        match (protocol, models.first()) {
            (crate::protocol::Protocol::Triton, Some(model)) => Probe::Triton {
                model: model.clone(),
            },
            _ => Probe::OpenAi {
                path: health_path.to_owned(),
            },
        }
    }

    /// `GET /health`: trtllm-serve, vLLM, SGLang.
    pub fn openai() -> Self {
        Probe::OpenAi {
            path: DEFAULT_HEALTH_PATH.to_owned(),
        }
    }
}

/// How often and how strictly backends are probed.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy again.
    pub healthy_after: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_after: u32,
    /// After start (or `reset`), failures do not count for this long: a
    /// loading model is not declared dead.
    pub grace: Duration,
}

impl ProbeConfig {
    pub const DEFAULT: ProbeConfig = ProbeConfig {
        // Often enough that a dead backend leaves rotation within a few
        // seconds (3 failures × 2 s), rare enough to be noise next to
        // inference traffic.
        interval: Duration::from_secs(2),
        // A health endpoint answers from memory in milliseconds; a backend
        // that needs a full second is too overloaded to be handed more work.
        // Kept below `interval` so probes never overlap.
        timeout: Duration::from_secs(1),
        // Two in a row, so a backend flapping between up and down is not
        // put back on the strength of one lucky answer.
        healthy_after: 2,
        // Three in a row, so one dropped packet or GC pause does not pull a
        // backend out of rotation.
        unhealthy_after: 3,
        // Loading weights into GPU memory takes tens of seconds for mid-sized
        // models; the health endpoints answer 503 meanwhile.
        grace: Duration::from_secs(60),
    };
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One backend's health verdict, shared (lock-free reads on the request path).
#[derive(Debug)]
pub struct Health {
    /// The verdict. Written only while `counters` is locked, so writes are
    /// ordered; read without the lock.
    healthy: AtomicBool,
    /// std `Mutex`: held for a few instructions, never across an `.await`,
    /// and only by the prober, never by the request path.
    counters: Mutex<Counters>,
}

#[derive(Debug)]
struct Counters {
    /// Start of the grace period.
    started: Instant,
    /// Consecutive failures counted while healthy.
    failures: u32,
    /// Consecutive successes counted while unhealthy.
    successes: u32,
}

impl Health {
    /// A healthy verdict whose grace period starts at `now`: a configured
    /// static backend is presumed up until probes say otherwise.
    pub fn new(now: Instant) -> Self {
        Self {
            healthy: AtomicBool::new(true),
            counters: Mutex::new(Counters {
                started: now,
                failures: 0,
                successes: 0,
            }),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records one probe result at `now`; returns `Some(new verdict)` when it
    /// flipped.
    pub fn record(&self, ok: bool, now: Instant, config: &ProbeConfig) -> Option<bool> {
        let mut counters = self.lock();
        if self.healthy.load(Ordering::Acquire) {
            if ok {
                counters.failures = 0;
                return None;
            }
            if now.saturating_duration_since(counters.started) < config.grace {
                return None;
            }
            counters.failures = counters.failures.saturating_add(1);
            if counters.failures < config.unhealthy_after {
                return None;
            }
            counters.failures = 0;
            self.healthy.store(false, Ordering::Release);
            Some(false)
        } else {
            if !ok {
                counters.successes = 0;
                return None;
            }
            counters.successes = counters.successes.saturating_add(1);
            if counters.successes < config.healthy_after {
                return None;
            }
            counters.successes = 0;
            self.healthy.store(true, Ordering::Release);
            Some(true)
        }
    }

    /// Restarts the grace period at `now` and forgets counted results, e.g.
    /// when an instance was just started. The verdict itself is kept: an
    /// unhealthy backend still needs successes to come back.
    pub fn reset(&self, now: Instant) {
        let mut counters = self.lock();
        counters.started = now;
        counters.failures = 0;
        counters.successes = 0;
    }

    /// Declares the backend healthy now, with counts forgotten: the fleet
    /// controller has just seen a woken instance pass its probe.
    pub fn mark_healthy(&self) {
        let mut counters = self.lock();
        counters.failures = 0;
        counters.successes = 0;
        self.healthy.store(true, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        // Counters are plain integers updated in single steps: a panic while
        // holding the lock cannot leave them inconsistent, so poisoning is
        // ignored.
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A small reusable HTTP/1 client for probes and metric scrapes. Plain
/// `http://` only (no TLS); connections are pooled, so a probe every few
/// seconds does not open a new connection each time.
#[derive(Debug, Clone)]
pub struct ProbeClient {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl ProbeClient {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the pool never expires idle connections.
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { client }
    }

    /// Sends one bodiless request and reads the whole answer (so the
    /// connection can go back to the pool); true when it answered 2xx.
    async fn succeeds(&self, method: Method, address: &str, path: &str) -> bool {
        let Ok(uri) = format!("http://{address}{path}").parse::<Uri>() else {
            return false;
        };
        let Ok(request) = Request::builder()
            .method(method)
            .uri(uri)
            .body(Empty::new())
        else {
            return false;
        };
        let Ok(response) = self.client.request(request).await else {
            return false;
        };
        let success = response.status().is_success();
        success && response.into_body().collect().await.is_ok()
    }

    /// `GET http://{address}{path}` with `accept`; the body when it answered
    /// 200 within `limit` bytes. Read whole, so the connection can go back to
    /// the pool.
    pub async fn get_text(
        &self,
        address: &str,
        path: &str,
        accept: &str,
        limit: usize,
    ) -> Option<String> {
        let uri = format!("http://{address}{path}").parse::<Uri>().ok()?;
        let request = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(ACCEPT, accept)
            .body(Empty::new())
            .ok()?;
        let response = self.client.request(request).await.ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    }
}

impl Default for ProbeClient {
    fn default() -> Self {
        Self::new()
    }
}

/// One probe over HTTP/1 to `address` (`host:port`), bounded by `timeout`.
/// True when every request of the protocol answered 2xx.
///
/// A model name that cannot form a URI path (e.g. with spaces) fails the
/// probe, so the misconfiguration shows up as an unhealthy backend.
pub async fn probe(client: &ProbeClient, address: &str, probe: &Probe, timeout: Duration) -> bool {
    let asks = async {
        match probe {
            Probe::OpenAi { path } => client.succeeds(Method::GET, address, path).await,
            Probe::Triton { model } => {
                client
                    .succeeds(Method::GET, address, "/v2/health/ready")
                    .await
                    && client
                        .succeeds(Method::GET, address, &format!("/v2/models/{model}/ready"))
                        .await
            }
        }
    };
    tokio::time::timeout(timeout, asks).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: ProbeConfig = ProbeConfig::DEFAULT;

    /// `t0` plus `secs` seconds.
    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn flips_unhealthy_after_three_failures_past_grace() {
        let t0 = Instant::now();
        let health = Health::new(t0);
        assert!(health.is_healthy());
        assert_eq!(health.record(false, at(t0, 61), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 63), &CONFIG), None);
        assert!(health.is_healthy());
        assert_eq!(health.record(false, at(t0, 65), &CONFIG), Some(false));
        assert!(!health.is_healthy());
        // Further failures do not flip again.
        assert_eq!(health.record(false, at(t0, 67), &CONFIG), None);
    }

    #[test]
    fn failures_inside_grace_are_ignored() {
        let t0 = Instant::now();
        let health = Health::new(t0);
        for secs in (0..60).step_by(2) {
            assert_eq!(health.record(false, at(t0, secs), &CONFIG), None);
        }
        assert!(health.is_healthy());
        // None of the failures inside grace counted: three more are needed.
        assert_eq!(health.record(false, at(t0, 60), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 62), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 64), &CONFIG), Some(false));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let health = Health::new(t0);
        assert_eq!(health.record(false, at(t0, 61), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 63), &CONFIG), None);
        assert_eq!(health.record(true, at(t0, 65), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 67), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 69), &CONFIG), None);
        assert!(health.is_healthy());
        assert_eq!(health.record(false, at(t0, 71), &CONFIG), Some(false));
    }

    #[test]
    fn recovers_after_two_successes_and_a_failure_resets_them() {
        let t0 = Instant::now();
        let health = Health::new(t0);
        for secs in [61, 63, 65] {
            health.record(false, at(t0, secs), &CONFIG);
        }
        assert!(!health.is_healthy());
        assert_eq!(health.record(true, at(t0, 67), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 69), &CONFIG), None);
        assert_eq!(health.record(true, at(t0, 71), &CONFIG), None);
        assert!(!health.is_healthy());
        assert_eq!(health.record(true, at(t0, 73), &CONFIG), Some(true));
        assert!(health.is_healthy());
    }

    #[test]
    fn reset_restarts_grace() {
        let t0 = Instant::now();
        let health = Health::new(t0);
        assert_eq!(health.record(false, at(t0, 100), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 102), &CONFIG), None);
        health.reset(at(t0, 103));
        // Inside the new grace period: ignored, and the two earlier failures
        // were forgotten.
        for secs in [104, 150, 162] {
            assert_eq!(health.record(false, at(t0, secs), &CONFIG), None);
        }
        assert!(health.is_healthy());
        assert_eq!(health.record(false, at(t0, 163), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 165), &CONFIG), None);
        assert_eq!(health.record(false, at(t0, 167), &CONFIG), Some(false));
    }

    #[test]
    fn recovery_is_not_subject_to_grace() {
        let t0 = Instant::now();
        let health = Health::new(t0);
        for secs in [61, 63, 65] {
            health.record(false, at(t0, secs), &CONFIG);
        }
        health.reset(at(t0, 66));
        // Restarted but still loading: stays unhealthy until it answers.
        assert_eq!(health.record(false, at(t0, 67), &CONFIG), None);
        assert!(!health.is_healthy());
        assert_eq!(health.record(true, at(t0, 69), &CONFIG), None);
        assert_eq!(health.record(true, at(t0, 71), &CONFIG), Some(true));
    }

    const TIMEOUT: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_closed_port_fails() {
        // Bind then drop: the port is known and nothing listens on it.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let client = ProbeClient::new();
        assert!(!probe(&client, &address, &Probe::openai(), TIMEOUT).await);
    }

    #[tokio::test]
    async fn a_silent_backend_fails_at_the_timeout() {
        // Connections complete in the kernel backlog but nothing ever
        // answers: only the probe's timeout can end it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let client = ProbeClient::new();
        let timeout = Duration::from_millis(100);
        assert!(!probe(&client, &address, &Probe::openai(), timeout).await);
        drop(listener);
    }
}
