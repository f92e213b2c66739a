use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match shared::process_start("gateway-worker") {
        Ok(config) => config,
        Err(code) => return code,
    };
    match worker::run(config, shared::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-worker: {}", shared::describe_error(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
