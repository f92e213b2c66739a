//! Process-wide tracing set-up: human-readable lines, or JSON with
//! `LOG_FORMAT=json`. `RUST_LOG` refines the level.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool, debug: bool) {
    let default = if debug {
        "debug,sqlx=warn,hyper=info,h2=info"
    } else {
        "info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_redis=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only for a terminal, not for files and log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    // A second init (tests start several apps in one process) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// For test binaries: warnings and errors only (`RUST_LOG` refines), written
/// through the test harness so passing tests stay quiet.
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,apalis=error,apalis_core=error,apalis_redis=error")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_test_writer()
        .try_init();
}
