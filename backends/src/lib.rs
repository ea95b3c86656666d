//! GPU inference backends for Tollgate.
//!
//! Today this crate holds [`sim`], the simulated GPU inference server behind
//! the `gpu-sim` binary, which every test, demo and benchmark runs against.
//! The backend pool, protocol adapters, health checks and the instance
//! lifecycle controller will live beside it.

pub mod sim;
