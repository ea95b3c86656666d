//! What the crate's integration tests share: a real gpu-sim process on a
//! free port. Each test binary uses part of it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running gpu-sim process, killed when dropped.
pub struct Sim {
    pub child: Child,
    /// `http://host:port`.
    pub base: String,
}

impl Sim {
    /// Starts gpu-sim with `args` on a free port and waits for the
    /// "listening" line it prints once it accepts connections.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-sim"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn gpu-sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches('/')
            .to_owned();
        Self { child, base }
    }

    /// Unpaced: every answer in one write.
    pub fn fast(extra: &[&str]) -> Self {
        let mut args = vec!["--ttft-ms", "0", "--tokens-per-sec", "0"];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// `http://host:port{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port`.
    pub fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    pub fn port(&self) -> u16 {
        self.address()
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
