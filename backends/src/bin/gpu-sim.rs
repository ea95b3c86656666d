//! `gpu-sim`: run the simulated GPU inference server. See `gpu-sim --help`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tollgate_backends::sim::{Engine, SimOptions, serve};

/// After SIGTERM, in-flight answers get this long to finish before the
/// process exits anyway (a slow stream must not hold a shutdown hostage).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let options = SimOptions::parse();
    if let Err(e) = tollgate_backends::logs::init("warn") {
        eprintln!("gpu-sim: {e}");
        return ExitCode::FAILURE;
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if options.threads > 0 {
        runtime.worker_threads(options.threads);
    }
    let result = runtime
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(options)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: SimOptions) -> anyhow::Result<()> {
    let listener = TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    let models = options.models.join(",");
    let exit_with_parent = options.exit_with_parent;
    let engine = Arc::new(Engine::new(options)?);
    // The one line scripts and tests wait for: the server accepts connections now.
    println!("gpu-sim listening on http://{address} models={models}");

    let mut terminate = signal(SignalKind::terminate())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, engine, async {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = parent_gone(exit_with_parent) => {}
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(joined) => joined??,
        Err(_) => {
            tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}; exiting")
        }
    }
    Ok(())
}

/// Resolves once the process that started this one has exited (we were
/// re-parented); never, unless `watch` is set.
async fn parent_gone(watch: bool) {
    if !watch {
        return std::future::pending().await;
    }
    let parent = nix::unistd::getppid();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while nix::unistd::getppid() == parent {
        tick.tick().await;
    }
}
