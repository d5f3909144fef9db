//! The paysync binary: parses arguments, sets up logging, runs a command from the
//! library, and maps the outcome to the documented exit codes.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::Context;
use clap::Parser;
use paysync::cli::{Cli, Command, RunArgs, StatusArgs};
use paysync::config::Settings;
use paysync::pipeline::{self, RunError, RunOptions, RunReport};
use paysync::state::{SqliteStore, StateStore};
use paysync::{demo, mock, telemetry};

/// mimalloc instead of glibc malloc: the hot path allocates per order (HTTP
/// buffers, JSON, SQLite), and glibc's bins cost 6 % more instructions there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code of a usage or config error.
const EXIT_USAGE: u8 = 2;

/// The signal that asked us to stop: its exit code (130 SIGINT, 143 SIGTERM), 0 if none.
static SIGNALLED: AtomicU8 = AtomicU8::new(0);

/// Installs the SIGINT and SIGTERM handlers now, and returns a future that resolves
/// on the first of them; a second one exits at once (state is safe: every state
/// write is a transaction, output files are renamed into place). The handlers are
/// installed when this is called, not when the future is first polled: a command
/// may start work (the daemon's first ingest and polls) before it waits on the
/// future, and a signal in that window must not kill the process unhandled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = tokio_util::sync::CancellationToken::new();
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            let first = stop.clone();
            tokio::spawn(async move {
                let code = tokio::select! {
                    _ = int.recv() => 130,
                    _ = term.recv() => 143,
                };
                SIGNALLED.store(code, Ordering::SeqCst);
                tracing::info!(
                    signal = if code == 130 { "SIGINT" } else { "SIGTERM" },
                    "shutting down; a second signal exits at once"
                );
                first.cancel();
                tokio::select! {
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
                eprintln!("paysync: second signal, exiting now");
                std::process::exit(i32::from(code));
            });
        }
        _ => tracing::warn!("cannot install signal handlers; stop with SIGKILL"),
    }
    stop.cancelled_owned()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, cli.log_level.as_deref());
    // One thread runs every async task; SQLite, file reads and writes run on the
    // blocking pool. Network work per order is small, so one thread carries far more
    // than any provider's quota (about 20,000 orders/s in the benchmark), and it
    // avoids the cross-thread wake-ups a work-stealing runtime pays per request
    // (about a quarter of paysync's CPU per order when measured; see README).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paysync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(dispatch(cli.command));
    ExitCode::from(code)
}

/// `println!`, except that a reader that went away (`paysync status | head -3`)
/// only cuts the output short, as it asked, instead of panicking; any other write
/// error is reported on stderr.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!("{}\n", format_args!($($arg)*)))
    };
}

fn emit(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("paysync: cannot write to stdout: {e}");
        }
        _ => {}
    }
}

/// Prints an error with its causes, the way every command reports failure.
fn report_error(e: &anyhow::Error) {
    eprintln!("paysync: error: {e:#}");
}

async fn dispatch(command: Command) -> u8 {
    match command {
        Command::Run(args) => match run(args).await {
            Ok(report) => {
                out!("{report}");
                if let Some(e) = &report.auth_error {
                    eprintln!("paysync: error: authentication rejected by the provider: {e}");
                }
                run_exit_code(&report)
            }
            Err(e) => {
                let code = e.exit_code();
                report_error(&anyhow::Error::new(e));
                code
            }
        },
        Command::Daemon(args) => match daemon(&args.config).await {
            Ok(report) if report.auth_error.is_some() => {
                eprintln!(
                    "paysync: error: authentication rejected by the provider: {}",
                    report.auth_error.unwrap_or_default()
                );
                3
            }
            Ok(_) => 0,
            Err(e) => {
                let code = e.exit_code();
                report_error(&anyhow::Error::new(e));
                code
            }
        },
        Command::Validate(args) => match validate(&args.config) {
            Ok(msg) => {
                out!("{msg}");
                0
            }
            Err(e) => {
                report_error(&e);
                EXIT_USAGE
            }
        },
        Command::Status(args) => match status(args).await {
            Ok(()) => 0,
            Err(e) => {
                report_error(&e);
                if e.downcast_ref::<paysync::config::ConfigError>().is_some() {
                    EXIT_USAGE
                } else {
                    4
                }
            }
        },
        Command::MockServer(args) => {
            let opts = args.options();
            let tls = match args.tls() {
                Ok(tls) => tls,
                Err(e) => {
                    eprintln!("paysync: error: {e}");
                    return 2;
                }
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            let listening = |addr| out!("mock server listening on {scheme}://{addr}");
            match mock::serve_until(args.listen, opts, tls, listening, shutdown_signal()).await {
                Ok(()) => 0,
                Err(e) => {
                    report_error(
                        &anyhow::Error::new(e).context(format!("cannot serve on {}", args.listen)),
                    );
                    1
                }
            }
        }
        Command::Schema(args) => {
            emit(format_args!(
                "{}",
                paysync::schema::render(args.format, &args.input_columns)
            ));
            0
        }
        Command::Demo(args) => {
            match demo::run_demo(args.provider, args.orders, &args.dir, shutdown_signal()).await {
                Ok(out) => {
                    out!("{}", out.report);
                    out!(
                        "demo: mock {} server was at {}",
                        args.provider,
                        out.mock_url
                    );
                    out!(
                        "demo: input {} (config {})",
                        out.input.display(),
                        out.config.display()
                    );
                    if let Some((_, m)) = &out.report.manifest {
                        out!(
                            "demo: look at the rows with: head -n 3 {}",
                            args.dir.join("out").join(&m.data_file).display()
                        );
                    }
                    run_exit_code(&out.report)
                }
                Err(demo::DemoError::Run(e)) => {
                    let code = e.exit_code();
                    report_error(&anyhow::Error::new(e));
                    code
                }
                Err(e) => {
                    report_error(&anyhow::Error::new(e));
                    1
                }
            }
        }
    }
}

/// Exit code of a finished run: 3 auth, 130/143 interrupted, 1 errors, else 0.
fn run_exit_code(report: &RunReport) -> u8 {
    if report.auth_error.is_some() {
        3
    } else if report.interrupted {
        match SIGNALLED.load(Ordering::SeqCst) {
            0 => 130,
            c => c,
        }
    } else if report.errors() > 0 {
        1
    } else {
        0
    }
}

async fn run(args: RunArgs) -> Result<RunReport, RunError> {
    let mut settings = Settings::load(&args.config.config)?;
    if let Some(dir) = args.output {
        settings.output.dir = dir;
    }
    if let Some(f) = args.format {
        settings.output.format = f;
        settings.output.encoding().map_err(|m| {
            RunError::Setup(format!(
                "--format {f}: {m} (output.compression in {})",
                settings.source.display()
            ))
        })?;
    }
    // No input at all is fine: the run then polls the orders that are due.
    let inputs = if args.input.is_empty() {
        settings.input.files.clone()
    } else {
        args.input
    };
    let wait = args.max_wait.unwrap_or(settings.settle.wait);
    let opts = RunOptions {
        inputs,
        wait,
        progress: !args.no_progress,
    };
    pipeline::run(Arc::new(settings), opts, shutdown_signal()).await
}

/// `paysync daemon`: the engine, the optional metrics endpoint, the schedules.
async fn daemon(config: &std::path::Path) -> Result<paysync::daemon::DaemonReport, RunError> {
    // Before the state is opened: from then on a signal is handled, never fatal.
    let shutdown = shutdown_signal();
    let settings = Arc::new(Settings::load(config)?);
    let metrics_token = settings.metrics.bearer_token(&settings.source)?;
    let metrics_tls = settings.metrics.tls_config(&settings.source)?;
    let engine = Arc::new(pipeline::Engine::open(settings.clone()).await?);
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = settings.metrics.listen {
        let sources = paysync::metrics::Sources {
            stats: engine.stats.clone(),
            store: engine.store.clone(),
        };
        let stop = stop_metrics.clone();
        let listener =
            paysync::metrics::serve(addr, sources, metrics_token, metrics_tls, async move {
                stop.cancelled().await
            });
        tokio::spawn(async move {
            if let Err(e) = listener.await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }
    let report = paysync::daemon::run_daemon(engine, shutdown).await;
    stop_metrics.cancel();
    report
}

fn validate(config: &std::path::Path) -> anyhow::Result<String> {
    let settings = Settings::load(config)?;
    settings.provider_settings()?;
    settings.metrics.bearer_token(&settings.source)?;
    settings.metrics.tls_config(&settings.source)?;
    Ok(format!(
        "{}: OK (provider {}, state {}, output {} as {})",
        config.display(),
        settings.provider.kind(),
        settings.state.path.display(),
        settings.output.dir.display(),
        settings.output.format.as_str(),
    ))
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&args.config.config)?;
    let path = settings.state.path.clone();
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let store = SqliteStore::open_read_only(&path)
            .with_context(|| format!("cannot read state {}", path.display()))?;
        Ok(store.status_report(10)?)
    })
    .await??;
    use paysync::input::QueueFileState;
    let queue_files: Vec<paysync::input::QueueBacklog> = report
        .queue_positions
        .iter()
        .map(|q| paysync::input::queue_backlog(&q.path, &q.identity, q.offset))
        .collect();
    if args.json {
        #[derive(serde::Serialize)]
        struct Status<'a> {
            #[serde(flatten)]
            report: &'a paysync::state::StatusReport,
            queue_files: &'a [paysync::input::QueueBacklog],
        }
        let status = Status {
            report: &report,
            queue_files: &queue_files,
        };
        out!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    out!("orders by status:");
    if report.by_status.is_empty() {
        out!("  (none)");
    }
    for c in &report.by_status {
        out!("  {:<15} {:<9} {:>10}", c.status, c.tracking, c.orders);
    }
    match &report.oldest_unsettled {
        Some(o) => out!(
            "oldest unsettled: {} ({}), first seen {}, next poll {}",
            o.order_no,
            o.status,
            paysync::model::rfc3339(o.first_seen_at),
            o.next_poll_at
                .map(paysync::model::rfc3339)
                .unwrap_or_else(|| "-".into())
        ),
        None => out!("oldest unsettled: none"),
    }
    out!("rows not yet exported: {}", report.unexported_rows);
    if !queue_files.is_empty() {
        out!("queue files:");
    }
    for q in &queue_files {
        match q.file {
            QueueFileState::Current => out!(
                "  {}: read to byte {} of {}, {} bytes unread",
                q.path,
                q.offset,
                q.size.unwrap_or_default(),
                q.unread_bytes
            ),
            QueueFileState::Replaced => out!(
                "  {}: replaced since the last ingest (rotated or rewritten); the next ingest finishes the old file if it is found, then reads {} bytes",
                q.path,
                q.unread_bytes
            ),
            QueueFileState::Missing => out!(
                "  {}: missing (read to byte {} of the file that was there)",
                q.path,
                q.offset
            ),
        }
    }
    out!("last runs:");
    for r in &report.last_runs {
        out!(
            "  {} {:<7} started {} finished {}  {}",
            r.run_id,
            r.command,
            paysync::model::rfc3339(r.started_at),
            r.finished_at
                .map(paysync::model::rfc3339)
                .unwrap_or_else(|| "-".into()),
            r.summary
        );
    }
    Ok(())
}
