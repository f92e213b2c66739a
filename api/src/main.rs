use std::process::ExitCode;

use shared::config::{Backend, Config};
use tokio::sync::watch;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match shared::process_start("gateway-api") {
        Ok(config) => config,
        Err(code) => return code,
    };
    let result = match config.backend {
        Backend::Embedded => run_embedded(config).await,
        Backend::Distributed { .. } => run_distributed(config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-api: {}", shared::describe_error(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

async fn run_distributed(config: Config) -> anyhow::Result<()> {
    let app = api::startup::Application::build(config).await?;
    tracing::info!(addr = %app.addr(), "gateway API listening");
    println!("gateway-api listening on http://{}", app.addr());
    app.run_until(shared::shutdown_signal()).await?;
    Ok(())
}

/// API and worker in one process, on SQLite and in-process queue and limits.
async fn run_embedded(config: Config) -> anyhow::Result<()> {
    let embedded = api::embedded::start(config).await?;
    println!("{}", api::embedded::banner(&embedded));
    let api::embedded::Embedded {
        lock: _lock,
        app,
        worker,
        config,
        ..
    } = embedded;
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let worker = tokio::spawn(worker::run_with(config, worker, wait(stop_rx.clone())));
    let server = tokio::spawn(app.run_until(wait(stop_rx)));
    shared::shutdown_signal().await;
    let _ = stop_tx.send(true);
    server.await??;
    worker.await??;
    Ok(())
}
