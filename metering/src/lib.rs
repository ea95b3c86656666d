//! Usage metering for Tollgate: what each request used, counted exactly and
//! recorded in Postgres without slowing the request and without losing or
//! double-counting an event.
//!
//! - [`tokens`]: exact token counting (tiktoken encodings, OpenAI's prompt
//!   recipes). The `gpu-sim` backend counts through it too, so the two never
//!   disagree about what a token is.
//! - [`audio`]: how long an uploaded audio file plays (transcription's unit).
//! - [`capture`]: reads a backend's answer as it streams by (usage report,
//!   generated text), synchronously and without I/O.
//! - [`endpoint`]: the OpenAI endpoints served, one vocabulary for every crate.
//! - [`event`]: the usage event, one per admitted request; [`units`]: the
//!   kinds of unit it is billed in.
//! - [`writer`]: the request path's non-blocking sink and the batching
//!   Postgres writer; [`spool`]: its durable fallback file.
//! - [`partitions`]: month partitions of the usage log and retention;
//!   [`report`]: totals, live statistics and event listings.
//! - [`metric_names`]: the name of every Prometheus metric Tollgate exports
//!   (each is registered where its concern lives, here or in the proxy);
//!   here because every crate that registers one depends on this one.
//!
//! Nothing here knows about Pingora: the proxy calls these plain APIs.

pub mod audio;
pub mod capture;
pub mod endpoint;
pub mod event;
pub mod journal;
pub mod metric_names;
pub mod partitions;
pub mod report;
pub mod spool;
pub mod sse;
pub mod tokens;
pub mod units;
pub mod writer;
