//! Tollgate's test kit: what the workspace's tests share, kept out of the
//! serving crates so that no library ships a fake. Every crate takes it as a
//! `[dev-dependencies]` entry only; it is never published.
//!
//! - [`stripe`]: a stateful fake of the part of Stripe's API Tollgate uses,
//!   speaking Stripe's wire format (billing's tests, the gateway's billing tests);
//! - [`comfyui`]: a stateful fake of ComfyUI's HTTP API (queue a workflow,
//!   its history, its images), for the ComfyUI protocol's tests;
//! - [`runpod`]: a stateful fake of RunPod's pods API (REST v1), for the
//!   provider's tests and the gateway's fleet tests;
//! - [`db`]: [`TestDb`], a Postgres database of each test's own, migrated
//!   from `sql/` as `tollgate migrate` does, dropped with the test;
//! - [`gpu_sim`]: [`GpuSim`], the real `gpu-sim` binary on a free port;
//! - [`poll`]: [`eventually`], waiting for a condition without sleeping a guess;
//! - [`multipart`]: hand-made upload forms, broken ones included.
//!
//! The kit depends on no tollgate crate: the fakes speak HTTP and JSON, not
//! the crates' types, so backends' tests (say) use it without a second copy
//! of backends being built for it, and a fake cannot agree with a client on
//! a misspelt field by sharing its struct.
//!
//! A helper here fails the test that calls it by panicking, as test code
//! does, hence the crate-wide allowance below.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test kit reports a broken fixture by failing the test that uses it"
)]

pub mod comfyui;
pub mod db;
pub mod gpu_sim;
pub mod multipart;
pub mod poll;
pub mod runpod;
pub mod stripe;

pub use db::TestDb;
pub use gpu_sim::GpuSim;
pub use poll::eventually;
