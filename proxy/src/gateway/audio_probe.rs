//! An upload's audio length, read by the demuxers in a child process
//! (`tollgate probe-audio`) that limits its own memory.
//!
//! symphonia allocates what a file's headers declare before it reads the
//! bytes: a hundred-byte WebM whose header claims a petabyte element asks
//! for a petabyte, an MP4's sample tables or a WAV's `LIST` chunk for
//! gigabytes, and some readers panic on hostile input. In the gateway a
//! failed allocation aborts the process, and every client's requests with
//! it; in the child it ends one probe. The child reads only a file's first
//! bytes (at most the upload head's 256 KiB), so its limit is generous.
//!
//! The child lives on between probes (starting one costs ~4 ms, see
//! BENCHMARKS.md) and answers them one at a time; one that dies, or takes
//! too long, is replaced at the next probe.

use std::io::{Read, Write};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Mutex;
use tollgate_metering::audio::{AudioLength, audio_length};

/// The hidden subcommand that runs the child.
const SUBCOMMAND: &str = "probe-audio";
/// The child's heap and mappings (RLIMIT_DATA): the demuxers need a few MiB
/// for 256 KiB of input.
const CHILD_DATA_LIMIT: u64 = 128 << 20;
/// The most bytes one probe may send: above the upload head's 256 KiB.
const MAX_PROBE_BYTES: usize = 1 << 20;
/// A probe of 256 KiB takes a millisecond; a child still busy after this
/// is killed and the file taken as unreadable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// What the container declares, in seconds.
    Seconds(f64),
    /// A format whose length the bytes given do not tell.
    Unknown,
    /// Not audio the demuxers read (or the child died on it): why.
    Unreadable(String),
}

/// The gateway's side: one child, started on first use, replaced when it
/// dies. The lock is a tokio one: it is held while the child answers.
#[derive(Default)]
pub struct AudioProber {
    child: Mutex<Option<ProbeChild>>,
}

struct ProbeChild {
    _process: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl AudioProber {
    /// The length of `file` (its first bytes, or the whole of it when `whole`).
    pub async fn probe(&self, file: &[u8], whole: bool) -> Probe {
        let mut slot = self.child.lock().await;
        let child = match slot.as_mut() {
            Some(child) => child,
            None => match spawn() {
                Ok(child) => slot.insert(child),
                Err(error) => {
                    // Our own failure (the binary cannot be run): the upload
                    // is not at fault, and reserves as of unknown length.
                    tracing::error!("the audio probe could not start: {error}");
                    return Probe::Unknown;
                }
            },
        };
        match tokio::time::timeout(PROBE_TIMEOUT, child.ask(file, whole)).await {
            Ok(Ok(probe)) => probe,
            Ok(Err(error)) => {
                // The child died on this file (its memory limit, a panic).
                *slot = None;
                Probe::Unreadable(format!("its demuxer failed ({error})"))
            }
            Err(_) => {
                *slot = None;
                Probe::Unreadable("reading its length took too long".into())
            }
        }
    }
}

fn spawn() -> std::io::Result<ProbeChild> {
    let mut process = tokio::process::Command::new(std::env::current_exe()?)
        .arg(SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
        return Err(std::io::Error::other("the probe's pipes are missing"));
    };
    Ok(ProbeChild {
        _process: process,
        stdin,
        stdout: BufReader::new(stdout),
    })
}

impl ProbeChild {
    /// One exchange: `[whole: u8][length: u32 LE][bytes]` out, one line back.
    async fn ask(&mut self, file: &[u8], whole: bool) -> std::io::Result<Probe> {
        let file = &file[..file.len().min(MAX_PROBE_BYTES)];
        let mut header = [u8::from(whole), 0, 0, 0, 0];
        header[1..].copy_from_slice(&(file.len() as u32).to_le_bytes());
        self.stdin.write_all(&header).await?;
        self.stdin.write_all(file).await?;
        self.stdin.flush().await?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer).await? == 0 {
            return Err(std::io::Error::other("it exited"));
        }
        Ok(match answer.trim().split_once(' ') {
            Some(("seconds", seconds)) => seconds.parse().map_or(Probe::Unknown, Probe::Seconds),
            Some(("unreadable", why)) => Probe::Unreadable(why.to_owned()),
            _ => Probe::Unknown,
        })
    }
}

/// `tollgate probe-audio`: limits this process's memory, then answers
/// probes from stdin (see [`ProbeChild::ask`]) with one line each:
/// `seconds S`, `unknown` or `unreadable WHY`, until stdin closes.
pub fn run_child() -> ExitCode {
    use nix::sys::resource::{Resource, setrlimit};
    if setrlimit(Resource::RLIMIT_DATA, CHILD_DATA_LIMIT, CHILD_DATA_LIMIT).is_err() {
        return ExitCode::FAILURE;
    }
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    loop {
        let mut header = [0u8; 5];
        if input.read_exact(&mut header).is_err() {
            // The gateway closed the pipe: done.
            return ExitCode::SUCCESS;
        }
        let [whole, length @ ..] = header;
        let length = u32::from_le_bytes(length) as usize;
        if length > MAX_PROBE_BYTES {
            return ExitCode::FAILURE;
        }
        let mut file = vec![0u8; length];
        if input.read_exact(&mut file).is_err() {
            return ExitCode::FAILURE;
        }
        let answer = match audio_length(Bytes::from(file), whole == 1) {
            Ok(AudioLength::Seconds(seconds)) => format!("seconds {seconds}"),
            Ok(AudioLength::Unknown) => "unknown".to_owned(),
            Err(why) => format!("unreadable {}", why.to_string().replace('\n', " ")),
        };
        if writeln!(output, "{answer}")
            .and_then(|()| output.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
    }
}
