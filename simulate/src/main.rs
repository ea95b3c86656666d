//! `tollgate-simulate`: the fleet's economics in simulated time. The logic
//! lives in the library (`lib.rs`); this file reads the command line and runs it.

use std::process::ExitCode;

use clap::Parser;
use tollgate::config::{Config, ProcessEnv};
use tollgate_simulate::cli::SimulateArgs;

fn main() -> ExitCode {
    let args = SimulateArgs::parse();
    // A month of simulated fleet transitions would drown the report.
    if let Err(e) = tollgate_backends::logs::init("error") {
        eprintln!("tollgate-simulate: {e}");
        return ExitCode::FAILURE;
    }
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
