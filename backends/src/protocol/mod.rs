//! The wire protocols Tollgate speaks to a backend.
//!
//! Clients always speak OpenAI's API to Tollgate. What reaches the backend
//! depends on its configured [`Protocol`]:
//!
//! - [`Protocol::OpenAi`] (the default): the request and the answer pass
//!   through unchanged, apart from the gateway's header and body rewrites.
//!   This is for servers with an OpenAI-compatible frontend: trtllm-serve,
//!   vLLM, SGLang and Triton's own OpenAI frontend. They count usage and
//!   format answers themselves.
//! - [`Protocol::Triton`]: Triton Inference Server's `generate` /
//!   `generate_stream` extension, as TensorRT-LLM's ensemble model serves
//!   it. Triton knows nothing of OpenAI's shapes, so [`triton`] translates
//!   both ways: the request into a text prompt and generate body, the answer
//!   (whole or streamed) into OpenAI's objects and events, counting the
//!   completion tokens locally because Triton reports none.
//! - [`Protocol::ComfyUi`]: ComfyUI's queue of workflow graphs, for image
//!   generation: [`comfyui`] fills the backend's workflow template from an
//!   OpenAI images request and reads the images back; the gateway makes
//!   the calls (queue, history, view).
//!
//! Everything here is pure: no I/O, no clock, no awaits. The gateway calls it
//! from its request and response phases and keeps the per-request state.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

pub mod comfyui;
pub mod triton;

/// How Tollgate talks to one backend; see the module docs. Config spells it
/// as [`Protocol::name`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    /// OpenAI's API, passed through.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// Triton's generate extension, translated by [`triton`].
    #[serde(rename = "triton")]
    Triton,
    /// ComfyUI's workflow queue, for `/v1/images/generations` ([`comfyui`]).
    #[serde(rename = "comfyui")]
    ComfyUi,
}

impl Protocol {
    /// The name used in config and metric labels: "openai", "triton" or "comfyui".
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Triton => "triton",
            Self::ComfyUi => "comfyui",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A protocol name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend protocol `{0}` (expected openai, triton or comfyui)")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    /// Exactly the names [`Protocol::name`] gives: config typos should fail
    /// loudly rather than pick a protocol.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" => Ok(Self::OpenAi),
            "triton" => Ok(Self::Triton),
            "comfyui" => Ok(Self::ComfyUi),
            other => Err(UnknownProtocol(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for protocol in [Protocol::OpenAi, Protocol::Triton, Protocol::ComfyUi] {
            assert_eq!(protocol.name().parse::<Protocol>().unwrap(), protocol);
            assert_eq!(protocol.to_string(), protocol.name());
        }
        assert_eq!(Protocol::default(), Protocol::OpenAi);
        for wrong in ["OpenAI", "open_ai", "Triton", "", " triton", "vllm"] {
            let error = wrong.parse::<Protocol>().unwrap_err();
            assert_eq!(error, UnknownProtocol(wrong.to_owned()));
            assert!(serde_json::from_value::<Protocol>(wrong.into()).is_err());
        }
        for protocol in [Protocol::OpenAi, Protocol::Triton, Protocol::ComfyUi] {
            let from_config: Protocol = serde_json::from_value(protocol.name().into()).unwrap();
            assert_eq!(from_config, protocol);
        }
    }
}

/// Why an answer ended, in OpenAI's `finish_reason` vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended the answer (or hit a stop sequence).
    Stop,
    /// The answer reached `max_tokens`.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}
