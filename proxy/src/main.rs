//! `tollgate`: the gateway binary.
//!
//! The data plane (`tollgate serve`), migrations and key management land with
//! the data-plane issue; until then the binary only identifies itself, so the
//! workspace layout, CI and packaging are in place for it.

use clap::Parser;

/// OpenAI-compatible gateway and billing sidecar for self-hosted GPU inference.
#[derive(Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!("tollgate {}: no subcommands yet", env!("CARGO_PKG_VERSION"));
}
