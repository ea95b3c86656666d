//! Durable async jobs: a request accepted at once and run when a GPU slot
//! is free, by whichever gateway claims it (issue 20; docs/jobs.md once the
//! API lands).
//!
//! - [`store`]: jobs in Postgres: submit (idempotent per account and key),
//!   read, list, cancel; and the runners' side: claim with a lease, renew
//!   it, mark the request sent, finish, each write fenced by the claim's
//!   attempt; [`store::expire`] ends the results whose time is up.
//! - [`results`]: the answers, in a blob store (`object_store`), written as
//!   they stream and read back as streams.

pub mod results;
pub mod store;
