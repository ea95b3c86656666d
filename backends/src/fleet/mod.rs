//! GPU instances and their lifecycle: cold, warm, hot.
//!
//! - [`state`]: the lifecycle states.
//! - [`policy`]: when to wake and sleep, as a pure function of demand.
//! - [`providers`]: where instances come from (local processes, RunPod).
//! - [`controller`]: the loop that carries the policy out and records it.

pub mod controller;
pub mod policy;
pub mod providers;
pub mod state;
