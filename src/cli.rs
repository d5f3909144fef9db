//! Command-line arguments (clap derive). Flags override the config file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::mock::MockArgs;
use crate::output::Format;
use crate::provider::ProviderKind;
use crate::schema::SchemaFormat;
use crate::telemetry::LogFormat;

/// paysync: fetch payment details for order numbers, track them until they settle,
/// and write them to your warehouse as CSV or JSONL.
#[derive(Debug, Parser)]
#[command(name = "paysync", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// Log level or filter (e.g. "debug", "paysync=trace"); default from RUST_LOG, else info.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One-off backfill: fetch the input orders, poll unsettled ones, write output.
    Run(RunArgs),
    /// Scheduled operation (under systemd): ingest, poll and export on cron schedules.
    Daemon(ConfigArg),
    /// Check the config file and that secrets are present (exit 0 or 2).
    Validate(ConfigArg),
    /// Orders by status, the oldest unsettled order, the last runs.
    Status(StatusArgs),
    /// Serve the bundled mock provider(s) on a loopback address.
    MockServer(Box<MockArgs>),
    /// Start the mock server, write sample orders and run a real backfill against it.
    Demo(DemoArgs),
    /// Print the output schema (column names, types, descriptions) for a loader.
    Schema(SchemaArgs),
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// How to print it: JSON, a BigQuery schema file, or SQL DDL.
    #[arg(long, value_enum, default_value = "json")]
    pub format: SchemaFormat,
    /// An input CSV column to include as a typed field (repeat, or comma-separate);
    /// without any, `input` is one JSON value.
    #[arg(long = "input-column", value_name = "NAME", value_delimiter = ',')]
    pub input_columns: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The TOML config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Input file; repeat for several. `.csv` is read as CSV, anything else as a queue
    /// file. Default: `input.files` of the config.
    #[arg(long, short = 'i', value_name = "PATH")]
    pub input: Vec<PathBuf>,
    /// Output directory (overrides `output.dir`).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Output format: jsonl, csv or parquet (overrides `output.format`).
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// How long to keep polling unsettled orders (overrides `settle.wait`); `0s`
    /// fetches once and does not wait.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_wait: Option<Duration>,
    /// Never draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Which provider to demonstrate.
    #[arg(long, default_value = "payprotocol", value_parser = parse_provider)]
    pub provider: ProviderKind,
    /// How many sample orders to write.
    #[arg(long, default_value_t = 300)]
    pub orders: usize,
    /// Working directory for the sample input, state and output.
    #[arg(long, default_value = "paysync-demo")]
    pub dir: PathBuf,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like \"30s\" ({e})"))
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse::<Format>()
        .map_err(|_| format!("{s:?} is not \"jsonl\", \"csv\" or \"parquet\""))
}

fn parse_provider(s: &str) -> Result<ProviderKind, String> {
    ProviderKind::from_name(s).ok_or_else(|| format!("{s:?} is not \"payprotocol\" or \"genauth\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The clap definition is consistent (no conflicting names or defaults).
    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    /// Flags parse into the documented values.
    #[test]
    fn run_flags() {
        let cli = Cli::parse_from([
            "paysync",
            "run",
            "--config",
            "c.toml",
            "--input",
            "a.csv",
            "--input",
            "q.txt",
            "--format",
            "csv",
            "--max-wait",
            "0s",
        ]);
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert_eq!(r.input.len(), 2);
        assert_eq!(r.format, Some(Format::Csv));
        assert_eq!(r.max_wait, Some(Duration::ZERO));
    }
}
