//! An upload's audio length, read by the demuxers in a child process
//! (`tollgate probe-audio`) that limits its own memory.
//!
//! symphonia allocates what a file's headers declare before it reads the
//! bytes: a hundred-byte WebM whose header claims a petabyte element asks
//! for a petabyte, an MP4's sample tables or a WAV's `LIST` chunk for
//! gigabytes, and some readers panic on hostile input. In the gateway a
//! failed allocation aborts the process, and every client's requests with
//! it; in the child it ends one probe. The child reads only the file's first
//! bytes (at most the upload head's 256 KiB), so the limit is generous.

use std::io::{Read, Write};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_metering::audio::{AudioLength, audio_length};

/// The hidden subcommand that runs the child.
const SUBCOMMAND: &str = "probe-audio";
/// The child's heap and mappings (RLIMIT_DATA): the demuxers need a few MiB
/// for 256 KiB of input.
const CHILD_DATA_LIMIT: u64 = 128 << 20;
/// A probe of 256 KiB takes milliseconds; a child still running after this
/// is killed and its file taken as unreadable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// What the container declares, in seconds.
    Seconds(f64),
    /// A format whose length the bytes given do not tell.
    Unknown,
    /// Not audio the demuxers read (or the child failed on it): why.
    Unreadable(String),
}

/// The length of `file` (its first bytes, or the whole of it when `whole`).
pub async fn probe(file: Bytes, whole: bool) -> Probe {
    match tokio::time::timeout(PROBE_TIMEOUT, run_probe(file, whole)).await {
        Ok(Ok(probe)) => probe,
        Ok(Err(error)) => {
            // Our own failure (the binary cannot be run): the upload is not
            // at fault, and reserves as a file of unknown length.
            tracing::error!("the audio probe could not run: {error}");
            Probe::Unknown
        }
        Err(_) => Probe::Unreadable("reading its length took too long".into()),
    }
}

async fn run_probe(file: Bytes, whole: bool) -> std::io::Result<Probe> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.arg(SUBCOMMAND);
    if whole {
        command.arg("--whole");
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(std::io::Error::other("the probe's pipes are missing"));
    };
    // A child that dies early closes its stdin: that shows in its answer.
    let _ = stdin.write_all(&file).await;
    drop(stdin);
    let mut answer = String::new();
    stdout.read_to_string(&mut answer).await?;
    let status = child.wait().await?;
    Ok(match answer.trim().split_once(' ') {
        Some(("seconds", seconds)) => seconds.parse().map_or(Probe::Unknown, Probe::Seconds),
        Some(("unreadable", why)) => Probe::Unreadable(why.to_owned()),
        _ if answer.trim() == "unknown" => Probe::Unknown,
        // Killed by its memory limit or a panic: the file did it.
        _ => Probe::Unreadable(format!("its demuxer failed ({status})")),
    })
}

/// `tollgate probe-audio [--whole]`: limits this process's memory, reads
/// the file from stdin, prints `seconds S`, `unknown` or `unreadable WHY`.
pub fn run_child(whole: bool) -> ExitCode {
    use nix::sys::resource::{Resource, setrlimit};
    if setrlimit(Resource::RLIMIT_DATA, CHILD_DATA_LIMIT, CHILD_DATA_LIMIT).is_err() {
        return ExitCode::FAILURE;
    }
    let mut file = Vec::new();
    if std::io::stdin().read_to_end(&mut file).is_err() {
        return ExitCode::FAILURE;
    }
    let answer = match audio_length(Bytes::from(file), whole) {
        Ok(AudioLength::Seconds(seconds)) => format!("seconds {seconds}"),
        Ok(AudioLength::Unknown) => "unknown".to_owned(),
        Err(why) => format!("unreadable {why}"),
    };
    let mut out = std::io::stdout();
    if writeln!(out, "{answer}").is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
