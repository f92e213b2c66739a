//! Everything the API and the workers share: configuration, the job domain,
//! storage, queue payloads, the slot limiter and the Ray client.

pub mod artifact;
pub mod config;
pub mod domain;
pub mod jobenv;
pub mod limiter;
pub mod local_runner;
pub mod logs;
pub mod queue;
pub mod ray;
pub mod secrets;
pub mod storage;
pub mod telemetry;

/// Installs the one rustls crypto provider of the process (ring), which
/// reqwest's `rustls-no-provider` feature leaves to us. Safe to call twice.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Resolves on Ctrl-C or SIGTERM: the processes' graceful-stop trigger.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// The start of every binary: the crypto provider, the configuration from
/// the environment (one clear line and exit code 2 when it is wrong), and
/// tracing.
pub fn process_start(binary: &str) -> Result<config::Config, std::process::ExitCode> {
    init_crypto();
    match config::Config::from_env() {
        Ok(config) => {
            telemetry::init(config.log_json, config.debug);
            Ok(config)
        }
        Err(e) => {
            eprintln!("{binary}: configuration error: {e}");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// One line for an error and its causes, without the repetition of causes
/// whose text their wrapper already quotes (sqlx and redis errors do).
pub fn describe_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod describe_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("database \"x\" does not exist")]
    struct Inner;

    #[test]
    fn repeated_causes_are_said_once() {
        assert_eq!(
            super::describe_error(&Outer(Inner)),
            "outer: database \"x\" does not exist"
        );
    }
}
