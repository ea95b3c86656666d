//! The gateway's side of metering (the counting, capture, journal and writer
//! themselves live in the `tollgate-metering` crate):
//! - [`request`]: metering on the request path, from the prompt count to
//!   the one usage event each request records;
//! - [`services`]: the usage writer and the usage log's upkeep, run as
//!   Pingora background services.

pub mod request;
pub mod services;
