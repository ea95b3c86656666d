//! `tollgate-simulate`: the fleet's economics in simulated time. The logic
//! lives in the library (`lib.rs`); this file reads the command line and runs it.

use std::process::ExitCode;

use clap::Parser;
use tollgate::config::{Config, ProcessEnv};
use tollgate_simulate::cli::SimulateArgs;

fn main() -> ExitCode {
    let args = SimulateArgs::parse();
    // A month of simulated fleet transitions would drown the report.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Runs its own runtimes, on a paused clock.
    let result = Config::load(args.config.as_deref(), &ProcessEnv)
        .map_err(anyhow::Error::from)
        .and_then(|config| tollgate_simulate::run(&config, &args));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-simulate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
