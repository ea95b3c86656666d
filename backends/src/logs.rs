//! Logging for every Tollgate binary (`tollgate`, `gpu-sim`,
//! `tollgate-simulate`): events on stderr, one line each, for people or for
//! machines.
//!
//! `LOG_LEVEL` filters (tracing's env-filter syntax: `info`,
//! `warn,tollgate=debug`); each binary passes its own default. `LOG_FORMAT`
//! picks `text` (the default) or `json`: one JSON object per line, for a log
//! collector. Text is coloured only when stderr is a terminal (and `NO_COLOR`
//! is unset): escape codes in a pipe, a file or journald are noise to whoever
//! reads them next.
//!
//! It lives in this crate because it is the lowest one with a binary of its
//! own (`gpu-sim`) and every other binary depends on it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (tracing-subscriber's JSON formatter).
    Json,
}

/// `LOG_FORMAT` holds neither `text` nor `json`.
#[derive(Debug, thiserror::Error)]
#[error("LOG_FORMAT={0:?}: expected `text` or `json`")]
pub struct LogFormatError(String);

impl LogFormat {
    /// From `LOG_FORMAT`'s value; unset or empty is text, as with every
    /// other variable.
    pub fn from_env_value(value: Option<&str>) -> Result<Self, LogFormatError> {
        match value.map(str::trim) {
            None | Some("") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("text") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(Self::Json),
            Some(other) => Err(LogFormatError(other.to_owned())),
        }
    }
}

/// Installs the process's subscriber: `LOG_LEVEL` (else `default_level`)
/// filters, `LOG_FORMAT` formats, stderr receives. Call it once, first thing
/// in `main`.
pub fn init(default_level: &str) -> Result<(), LogFormatError> {
    let format = LogFormat::from_env_value(std::env::var("LOG_FORMAT").ok().as_deref())?;
    let filter =
        EnvFilter::try_from_env("LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new(default_level));
    // The audio demuxers log what they find wrong in a client's upload at
    // error level; the client is answered 400, and nothing of ours failed.
    let filter = match "symphonia=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A line that cannot be written (stderr is a pipe whose reader is
        // gone) is dropped. Left on, the subscriber would report it with
        // `eprintln!` to that same stderr, which panics the task that logged.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => subscriber.with_ansi(colour_on_stderr()).init(),
        LogFormat::Json => subscriber.json().with_ansi(false).init(),
    }
    Ok(())
}

/// Whether escape codes reach a person: stderr is a terminal and the
/// `NO_COLOR` convention (no-color.org) does not ask otherwise.
fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn log_format_is_text_unless_json_is_asked_for() {
        assert_eq!(LogFormat::from_env_value(None).unwrap(), LogFormat::Text);
        assert_eq!(
            LogFormat::from_env_value(Some("")).unwrap(),
            LogFormat::Text
        );
        assert_eq!(
            LogFormat::from_env_value(Some("text")).unwrap(),
            LogFormat::Text
        );
        assert_eq!(
            LogFormat::from_env_value(Some("JSON")).unwrap(),
            LogFormat::Json
        );
        let error = LogFormat::from_env_value(Some("xml")).unwrap_err();
        assert!(error.to_string().contains("`text` or `json`"), "{error}");
    }
}
