//! GPU inference backends for Tollgate: everything about the machines behind
//! the gateway, as plain Rust (no Pingora types).
//!
//! - [`balance`]: pure, I/O-free routing building blocks: one file per
//!   load-balancing policy behind the [`balance::Policy`] trait, the one
//!   policy factory ([`balance::RoutingPolicy`]) and the per-backend
//!   [`balance::breaker::CircuitBreaker`].
//! - [`routing`]: the backend pool the gateway forwards to and how one is
//!   chosen for a request (healthy, breaker closed, by policy), behind
//!   [`routing::UpstreamSelector`].
//! - [`health`]: active health probes and the hysteresis that turns their
//!   results into a healthy/unhealthy verdict per backend.
//! - [`signals`]: load signals read from each backend's own Prometheus
//!   endpoint (queued requests, KV cache, GPU utilisation).
//! - [`protocol`]: the wire protocols spoken to a backend: OpenAI's, and
//!   Triton's generate API with its transcoder both ways.
//! - [`fleet`]: instance lifecycle (cold, warm, hot), the scaling policy, the
//!   controller, and the providers that rent machines (a local process,
//!   RunPod).
//! - [`sim`]: the simulated GPU inference server behind the `gpu-sim`
//!   binary, which every test, demo and benchmark runs against.
//! - [`logs`]: how every Tollgate binary logs (`LOG_LEVEL`, `LOG_FORMAT`,
//!   colour only on a terminal).

pub mod balance;
pub mod fleet;
pub mod health;
pub mod logs;
pub mod protocol;
pub mod routing;
pub mod signals;
pub mod sim;
