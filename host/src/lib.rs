//! The Tessera host: `tesserad` (daemon and worker modes) and the pieces the `tessera`
//! command-line client shares with it.

pub mod buffers;
pub mod client;
pub mod daemon;
pub mod devices;
pub mod doctor;
pub mod icc;
pub mod image_io;
pub mod install;
pub mod ipc;
pub mod models;
pub mod ora;
pub mod paths;
pub mod worker;

/// Logs to stderr; `TESSERA_LOG` takes an env-filter spec (default `info`).
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
