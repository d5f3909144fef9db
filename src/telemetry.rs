//! Logging setup: `tracing` events to stderr, human-readable on a terminal or JSON
//! lines for journald and log shippers. The level comes from `--log-level` or
//! `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The default filter: paysync at info; the scheduler crate's chatter only when it warns.
const DEFAULT_FILTER: &str = "info,tokio_cron_scheduler=warn";

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is journald (`JOURNAL_STREAM` set), text otherwise.
    Auto,
    Text,
    Json,
}

/// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Installs the global subscriber. `level` overrides `RUST_LOG` when given.
pub fn init(format: LogFormat, level: Option<&str>) {
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
    };
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => stderr_is_journal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // A second init (tests calling into the binary's code) is not an error.
    if json {
        let _ = builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init();
    } else {
        let _ = builder
            .with_ansi(std::io::stderr().is_terminal())
            .compact()
            .try_init();
    }
}
