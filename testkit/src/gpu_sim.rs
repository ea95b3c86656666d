//! The real `gpu-sim` binary as a child process of the test, on a port it
//! picks itself, killed when dropped.
//!
//! gpu-sim prints one line once it accepts connections,
//! `gpu-sim listening on http://ADDR …`; [`GpuSim::start_on`] waits for that
//! line, so there is no port race and no sleep.
//!
//! `env!("CARGO_BIN_EXE_gpu-sim")` exists only in the crate that defines the
//! binary (backends), so the binary is found beside the test executable
//! instead ([`binary`]): cargo puts every binary of the workspace in
//! `<target>/<profile>/` and test executables in its `deps/`. Tests of other
//! crates need it built first, which `cargo nextest run --workspace` does
//! (backends' integration tests need it) and `cargo build --workspace --bins`
//! does for one crate's tests.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long gpu-sim may take to print its address: generous, because a cold
/// debug build loading its tokenizer tables on a busy 2-core machine can be
/// slow. Only reached when something is broken.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// `<target>/<profile>/gpu-sim`, found from the running test executable,
/// `<target>/<profile>/deps/<test>-<hash>`.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in <target>/<profile>/deps");
    let path = profile_dir.join(format!("gpu-sim{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "gpu-sim not found at {}: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A running gpu-sim, killed when dropped (also when the test panics).
pub struct GpuSim {
    pub child: Child,
    /// `http://host:port`.
    base: String,
}

impl GpuSim {
    /// gpu-sim with `args` on a free port of 127.0.0.1.
    pub fn start(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", args)
    }

    /// Unpaced (no time to first token, unlimited tokens per second): every
    /// answer in one write.
    pub fn fast(extra: &[&str]) -> Self {
        let mut args = vec!["--ttft-ms", "0", "--tokens-per-sec", "0"];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// gpu-sim with `args` listening on `listen` (`host:port`), for a test
    /// that restarts one in the same place; returns once it accepts
    /// connections.
    pub fn start_on(listen: &str, args: &[&str]) -> Self {
        let mut child = Command::new(binary())
            .args(["--listen", listen])
            .args(args)
            // Quiet unless the person running the tests asks for more.
            .env(
                "LOG_LEVEL",
                std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning gpu-sim");
        let stdout = child.stdout.take().expect("gpu-sim stdout is piped");
        let (first_line, receive) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = first_line.send(lines.next());
            // Keep draining so gpu-sim never blocks on a full pipe.
            lines.for_each(drop);
        });
        // Built before the wait so that a panic below kills the child too.
        let mut sim = Self {
            child,
            base: String::new(),
        };
        let line = match receive.recv_timeout(STARTUP_LIMIT) {
            Ok(Some(Ok(line))) => line,
            other => panic!("gpu-sim did not print its address (got {other:?})"),
        };
        sim.base = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in gpu-sim's first line {line:?}"))
            .trim_end_matches('/')
            .to_owned();
        sim
    }

    /// `http://host:port`.
    pub fn base(&self) -> &str {
        &self.base
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

impl Drop for GpuSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
