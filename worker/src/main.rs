use std::process::ExitCode;

use shared::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    shared::init_crypto();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway-worker: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    shared::telemetry::init(config.log_json, config.debug);
    match worker::run(config, shared::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-worker: {e:#}");
            ExitCode::from(1)
        }
    }
}
