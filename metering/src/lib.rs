//! Usage metering for Tollgate.
//!
//! Today this crate holds exact token counting ([`tokens`]): the encodings,
//! the model → encoding map and OpenAI's chat-prompt accounting. Both the proxy
//! (to meter requests) and the `gpu-sim` backend (to report true `usage`)
//! count through it, so the two can never disagree about what a token is.

pub mod tokens;
