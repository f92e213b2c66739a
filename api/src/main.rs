use std::process::ExitCode;

use shared::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    shared::init_crypto();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway-api: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    shared::telemetry::init(config.log_json, config.debug);
    let app = match api::startup::Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("gateway-api: cannot start: {e:#}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(addr = %app.addr(), "gateway API listening");
    println!("gateway-api listening on http://{}", app.addr());
    match app.run_until(shared::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-api: server error: {e}");
            ExitCode::from(1)
        }
    }
}
