//! GPU inference backends for Tollgate.
//!
//! - [`balance`]: pure, I/O-free routing building blocks: load-balancing
//!   policies behind the [`balance::Policy`] trait and the per-backend
//!   [`balance::breaker::CircuitBreaker`].
//! - [`health`]: active health checks: HTTP probes and the hysteresis that
//!   turns their results into a per-backend healthy/unhealthy verdict.
//! - [`routing`]: the backends Tollgate forwards to and how one is chosen
//!   for a request (round-robin today, behind the [`routing::UpstreamSelector`]
//!   interface the health-checked pool will implement).
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
