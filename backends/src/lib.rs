//! GPU inference backends for Tollgate.
//!
//! - [`routing`]: the backends Tollgate forwards to and how one is chosen
//!   for a request (round-robin today, behind the [`routing::UpstreamSelector`]
//!   interface the health-checked pool will implement).
//! - [`sim`]: the simulated GPU inference server behind the `gpu-sim`
//!   binary, which every test, demo and benchmark runs against.

pub mod routing;
pub mod sim;
