//! `paysync daemon`: scheduled operation under systemd. Cron jobs (tokio-cron-scheduler)
//! ingest the configured sources and export accumulated rows; between them, due
//! re-polls run continuously under the same limiter. Shutdown is graceful and
//! systemd is told about readiness, progress, watchdog liveness and stopping.
//!
//! - [`run_daemon`]: the daemon's life: start, schedule, serve, shut down.
//! - [`Sources`]: the ingest step: queue files tailed from a durable offset, and
//!   CSV files dropped into the inbox directory.
//! - [`missed_export`]: whether an export fell due while the daemon was down.
//!
//! Queue files: the read position (byte offset and the file's identity: device,
//! inode and a hash of its first bytes, see `input::queue_identity`) is saved in
//! the same state transaction as the orders read, so a crash neither loses nor
//! re-reads a line. When the file at the queue path is not the one the position
//! was saved for (rotated, or truncated or rewritten in place), the old file is
//! looked for in the same directory, renamed (logrotate's `queue.1` or
//! `queue-20261123`), copied (`copytruncate`) or compressed (gzip or zstd); its
//! lines after the saved offset are read, and then the current file from its
//! start. If it is gone, a warning says so and the current file is read from its
//! start. A trailing line without `\n` waits until it is complete.
//!
//! Inbox: each `*.csv` in `input.inbox_dir` is ingested once, then moved to
//! `done/` inside it. A crash mid-file ingests it again at the next run: orders
//! already registered are recognised, none is fetched twice.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, Notify, watch};
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::input::{self, IdentityMatch, InputRecord, InputSpec, QueueRecords, RejectsWriter};
use crate::model::PayStatus;
use crate::output::OutputError;
use crate::pipeline::{Engine, PollUntil, RunError, input_specs, new_run_id};
use crate::state::{NewOrder, QueuePosition};

/// Queue lines registered per state transaction.
const QUEUE_BATCH: usize = 1000;
/// How often the STATUS= line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// What the daemon did before it stopped.
#[derive(Debug, Clone, Default)]
pub struct DaemonReport {
    pub run_id: String,
    pub exports: u64,
    pub rows_exported: u64,
    /// The provider rejected the credentials: the daemon stopped (exit 3).
    pub auth_error: Option<String>,
}

/// Tells systemd (when `NOTIFY_SOCKET` is set; otherwise nothing happens).
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Whether an export scheduled by `cron` fell due after `last` and by `now`.
pub fn missed_export(cron: &croner::Cron, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    let Some(last) = last else {
        return false;
    };
    cron.find_next_occurrence(&last, false)
        .is_ok_and(|next| next <= now)
}

/// The file beside queue file `path` that a position saved under `identity` at
/// `offset` belongs to, open: the file itself renamed away (same inode and head),
/// else a copy of it (same head, as `copytruncate` leaves), at least `offset`
/// bytes long.
fn rotated_file(
    path: &Path,
    rotated_dir: Option<&Path>,
    identity: &str,
    offset: u64,
) -> Option<(PathBuf, File)> {
    let candidates: Vec<(PathBuf, File, std::fs::Metadata)> = siblings(path, rotated_dir)
        .into_iter()
        .filter_map(|p| {
            let file = File::open(&p).ok()?;
            let meta = file.metadata().ok()?;
            (meta.is_file() && meta.len() >= offset).then_some((p, file, meta))
        })
        .collect();
    let renamed = candidates.iter().position(|(_, file, meta)| {
        input::match_identity(identity, file, meta).is_ok_and(|m| m == IdentityMatch::Same)
    });
    let found = renamed.or_else(|| {
        candidates
            .iter()
            .position(|(_, file, _)| input::same_head(identity, file).unwrap_or(false))
    })?;
    candidates
        .into_iter()
        .nth(found)
        .map(|(path, file, _)| (path, file))
}

/// The regular files in the directory of `path`, other than `path` itself, named
/// as `path` is (relative when it is), then those in `rotated_dir` (logrotate's
/// `olddir`: relative to the directory of `path` unless absolute).
fn siblings(path: &Path, rotated_dir: Option<&Path>) -> Vec<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(rotated_dir.map(|r| dir.join(r)));
    let mut files = Vec::new();
    for dir in dirs {
        let listed = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &dir
        };
        let Ok(entries) = std::fs::read_dir(listed) else {
            continue;
        };
        files.extend(
            entries
                .filter_map(Result::ok)
                .map(|e| dir.join(e.file_name()))
                .filter(|p| p != path && std::fs::metadata(p).is_ok_and(|m| m.is_file())),
        );
    }
    files
}

/// The compressed file beside queue file `path` (its rotated self, compressed by
/// logrotate) whose content starts as the file `identity` names did, as records
/// from byte `offset` of its content on, if there is one.
fn compressed_rotated(
    path: &Path,
    rotated_dir: Option<&Path>,
    identity: &str,
    offset: u64,
) -> Option<(PathBuf, QueueRecords)> {
    siblings(path, rotated_dir).into_iter().find_map(|p| {
        let content = input::decompressed(File::open(&p).ok()?).ok()??;
        if !input::same_head_in(identity, content).unwrap_or(false) {
            return None;
        }
        let records = input::compressed_queue_from(&p, offset).ok()??;
        Some((p, records))
    })
}

/// Registers input records (rejecting those without a usable order number), with
/// the queue position `pos` in the same transaction. Returns the new orders.
fn register(
    d: &Daemon,
    records: Vec<InputRecord>,
    pos: Option<&QueuePosition>,
    rejects: &mut RejectsWriter,
) -> Result<u64, RunError> {
    let mut orders = Vec::with_capacity(records.len());
    for rec in records {
        match rec.parsed {
            Ok((order_no, payment_no)) => orders.push(NewOrder {
                provider: d.engine.kind,
                order_no,
                payment_no,
                input: rec.input,
                source: rec.source,
                line: rec.line,
            }),
            Err(reason) => rejects
                .write(&rec.source, rec.line, &reason, &rec.raw)
                .map_err(|source| OutputError::Write {
                    path: rejects.path().to_path_buf(),
                    source,
                })?,
        }
    }
    if pos.is_some() {
        // The position moves past these lines: their rejects must not be lost.
        sync_rejects(rejects)?;
    }
    let admissions = d
        .engine
        .store
        .add_orders(&d.run_id, &orders, d.engine.clock.now(), pos)?;
    if pos.is_some() {
        crate::failpoint::hit("after-ingest-commit");
    }
    d.new_work.notify_one();
    Ok(admissions
        .iter()
        .filter(|a| **a == crate::state::Admission::New)
        .count() as u64)
}

/// [`RejectsWriter::sync`], before committing a step after which the rejected
/// rows would not be read again.
fn sync_rejects(rejects: &mut RejectsWriter) -> Result<(), RunError> {
    rejects.sync().map_err(|source| {
        OutputError::Write {
            path: rejects.path().to_path_buf(),
            source,
        }
        .into()
    })
}

/// Parses a 6-field cron expression (seconds first), as the config validated it.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(expr)
        .map_err(|e| format!("{expr:?}: {e}"))
}

/// The daemon's shared parts, handed to its jobs.
struct Daemon {
    engine: Arc<Engine>,
    run_id: String,
    sources: Sources,
    new_work: Arc<Notify>,
    stop: CancellationToken,
    /// Held while a job runs, so a job never overlaps itself.
    ingesting: Mutex<()>,
    exporting: Mutex<()>,
    exports: AtomicU64,
    rows_exported: AtomicU64,
    last_export: std::sync::Mutex<Option<DateTime<Utc>>>,
}

impl Daemon {
    /// The ingest job: skipped when the previous one still runs.
    async fn ingest(self: Arc<Self>) {
        let Ok(_guard) = self.ingesting.try_lock() else {
            tracing::info!("ingest still running; skipping this turn");
            return;
        };
        let me = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            crate::failpoint::delay("slow-ingest");
            me.sources.ingest(&me)
        })
        .await;
        match result {
            Ok(Ok(n)) if n > 0 => tracing::info!(orders = n, "ingested"),
            Ok(Ok(_)) => tracing::debug!("ingest found nothing new"),
            Ok(Err(e)) => tracing::error!(error = %error_chain(&e), "ingest failed"),
            Err(e) => tracing::error!(error = %e, "ingest task failed"),
        }
    }

    /// The export job: skipped when the previous one still runs.
    async fn export(&self) {
        let Ok(_guard) = self.exporting.try_lock() else {
            tracing::info!("export still running; skipping this turn");
            return;
        };
        let started = self.engine.clock.now();
        let export_id = new_run_id(started);
        match self.engine.export(&export_id, started).await {
            Ok(Some((path, m))) => {
                self.exports.fetch_add(1, Ordering::Relaxed);
                self.rows_exported.fetch_add(m.rows, Ordering::Relaxed);
                tracing::info!(rows = m.rows, manifest = %path.display(), "exported");
            }
            Ok(None) => tracing::debug!("export: no new rows"),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "export failed; rows stay staged");
                return;
            }
        }
        *self.last_export.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.engine.clock.now());
    }

    /// A one-line summary for systemd's STATUS=.
    async fn status_line(&self) -> String {
        let kind = self.engine.kind;
        let store = self.engine.store.clone();
        let tracked = tokio::task::spawn_blocking(move || store.tracked_count(kind))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        let last = self
            .last_export
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(crate::model::rfc3339)
            .unwrap_or_else(|| "never".into());
        format!(
            "tracking {tracked} unsettled orders; {} rows exported in {} files; last export {last}",
            self.rows_exported.load(Ordering::Relaxed),
            self.exports.load(Ordering::Relaxed)
        )
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The input sources the ingest job reads.
pub struct Sources {
    pub queue_files: Vec<PathBuf>,
    /// Where rotated queue files may also be (`input.rotated_dir`).
    pub rotated_dir: Option<PathBuf>,
    pub inbox_dir: Option<PathBuf>,
    pub out_dir: PathBuf,
}

impl Sources {
    /// Reads every source once; returns how many new orders were registered.
    fn ingest(&self, d: &Daemon) -> Result<u64, RunError> {
        let job_id = new_run_id(d.engine.clock.now());
        let mut rejects = RejectsWriter::new(&self.out_dir, &format!("ingest-{job_id}"));
        let mut new = 0;
        for q in &self.queue_files {
            if d.stop.is_cancelled() {
                break;
            }
            new += self.tail_queue(d, q, &mut rejects)?;
        }
        if let Some(inbox) = &self.inbox_dir
            && !d.stop.is_cancelled()
        {
            new += self.drain_inbox(d, inbox, &mut rejects)?;
        }
        rejects.finish().map_err(|source| OutputError::Write {
            path: self.out_dir.clone(),
            source,
        })?;
        Ok(new)
    }

    /// Reads the lines appended to a queue file since the saved position.
    fn tail_queue(
        &self,
        d: &Daemon,
        path: &Path,
        rejects: &mut RejectsWriter,
    ) -> Result<u64, RunError> {
        let open_err = |source| input::InputError::Open {
            path: path.to_owned(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(queue = %path.display(), "queue file does not exist yet");
                return Ok(0);
            }
            Err(source) => return Err(open_err(source).into()),
        };
        let meta = file.metadata().map_err(open_err)?;
        let key = path.display().to_string();
        let store = &d.engine.store;
        let mut new = 0;
        let offset = match store.queue_position(&key)? {
            None => 0,
            Some(p) => {
                let found = input::match_identity(&p.identity, &file, &meta).map_err(open_err)?;
                if found == IdentityMatch::Same && p.offset <= meta.len() {
                    p.offset
                } else {
                    // Not the file the offset was saved for (rotated, or truncated
                    // or rewritten in place): finish that file first if it is still
                    // beside this one, renamed, copied or compressed, then read this
                    // one from its start.
                    let rotated_dir = self.rotated_dir.as_deref();
                    match rotated_file(path, rotated_dir, &p.identity, p.offset) {
                        Some((old_path, old)) => {
                            tracing::info!(queue = %key, rotated = %old_path.display(), offset = p.offset, "queue file was rotated; reading the rest of the old file, then the new one");
                            let (n, done) =
                                self.read_queue(d, &old, &old_path, &key, p.offset, rejects)?;
                            new += n;
                            if !done {
                                return Ok(new);
                            }
                        }
                        None => {
                            match compressed_rotated(path, rotated_dir, &p.identity, p.offset) {
                                Some((old_path, records)) => {
                                    tracing::info!(queue = %key, rotated = %old_path.display(), offset = p.offset, "queue file was rotated and compressed; reading the rest of the old file from the compressed copy, then the new one");
                                    let saved = QueuePosition {
                                        path: key.clone(),
                                        identity: p.identity.clone(),
                                        offset: p.offset,
                                    };
                                    match self.read_compressed(d, records, saved, rejects)? {
                                        (n, true) => new += n,
                                        (n, false) => return Ok(new + n),
                                    }
                                }
                                None if found == IdentityMatch::Other => {
                                    tracing::warn!(queue = %key, offset = p.offset, "queue file was rotated and the old file is not in its directory any more (nor in input.rotated_dir, if set); lines appended to it after the last ingest were not read")
                                }
                                None => {
                                    tracing::warn!(queue = %key, offset = p.offset, size = meta.len(), "queue file was truncated or rewritten in place; reading it from the start")
                                }
                            }
                        }
                    }
                    // The old file is done with: the position is this file's now,
                    // even before it has a line (so the above is said once).
                    let start = QueuePosition {
                        path: key.clone(),
                        identity: input::queue_identity(&file, &meta, 0).map_err(open_err)?,
                        offset: 0,
                    };
                    sync_rejects(rejects)?;
                    store.add_orders(&d.run_id, &[], d.engine.clock.now(), Some(&start))?;
                    0
                }
            }
        };
        let (n, _) = self.read_queue(d, &file, path, &key, offset, rejects)?;
        Ok(new + n)
    }

    /// Registers the records of a compressed rotated queue file, in batches. The
    /// saved position stays the old file's (`saved`, its identity) until all of it
    /// is read, and moves on within its content with each batch: the compressed
    /// copy holds the same bytes, so a crash or a stop resumes after the last batch
    /// registered, from the compressed copy again. Returns the new orders and
    /// whether the end was reached (false when stopping).
    fn read_compressed(
        &self,
        d: &Daemon,
        mut records: QueueRecords,
        mut saved: QueuePosition,
        rejects: &mut RejectsWriter,
    ) -> Result<(u64, bool), RunError> {
        let mut new = 0;
        loop {
            let batch = records
                .by_ref()
                .take(QUEUE_BATCH)
                .collect::<Result<Vec<_>, _>>()?;
            if batch.is_empty() {
                return Ok((new, true));
            }
            saved.offset = records.offset();
            new += register(d, batch, Some(&saved), rejects)?;
            if d.stop.is_cancelled() {
                return Ok((new, false));
            }
        }
    }

    /// Registers the complete lines of queue file `file` (open from `path`) from
    /// `offset` to its end, saving the position under `key`, with the file's
    /// identity, with each batch. Returns the new orders and whether the end was
    /// reached (false when stopping).
    fn read_queue(
        &self,
        d: &Daemon,
        file: &File,
        path: &Path,
        key: &str,
        mut offset: u64,
        rejects: &mut RejectsWriter,
    ) -> Result<(u64, bool), RunError> {
        let mut line = None;
        let mut new = 0;
        loop {
            let chunk = input::read_open_queue(file, path, offset, line, QUEUE_BATCH)?;
            if chunk.next_offset == offset && chunk.records.is_empty() {
                return Ok((new, true));
            }
            let pos = QueuePosition {
                path: key.to_owned(),
                identity: chunk.identity,
                offset: chunk.next_offset,
            };
            new += register(d, chunk.records, Some(&pos), rejects)?;
            offset = chunk.next_offset;
            line = Some(chunk.next_line);
            if chunk.at_end {
                return Ok((new, true));
            }
            if d.stop.is_cancelled() {
                return Ok((new, false));
            }
        }
    }

    /// Ingests each CSV in the inbox once, then moves it to `done/`.
    fn drain_inbox(
        &self,
        d: &Daemon,
        inbox: &Path,
        rejects: &mut RejectsWriter,
    ) -> Result<u64, RunError> {
        let done = inbox.join("done");
        std::fs::create_dir_all(&done).map_err(|source| OutputError::Create {
            path: done.clone(),
            source,
        })?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(inbox)
            .map_err(|source| input::InputError::Open {
                path: inbox.to_owned(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    && input::InputKind::of(p) == input::InputKind::Csv
            })
            .collect();
        files.sort();
        let mut new = 0;
        for file in files {
            let specs: Vec<InputSpec> =
                input_specs(&d.engine.settings, std::slice::from_ref(&file));
            let admitted = AtomicU64::new(0);
            let sum = match d.engine.ingest_files(
                &d.run_id,
                &specs,
                rejects,
                &d.new_work,
                &admitted,
                &d.stop,
            ) {
                Ok(sum) => sum,
                Err(RunError::Input(e)) => {
                    // A file that cannot be used (no order column, ...) is moved
                    // aside so it is not retried forever; the error says why.
                    tracing::error!(file = %file.display(), error = %error_chain(&e), "inbox file refused; moved to done/ unprocessed");
                    move_to_done(&file, &done, "refused")?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if d.stop.is_cancelled() {
                // Not finished: it is read again (idempotently) at the next start.
                break;
            }
            new += sum.new;
            tracing::info!(file = %file.display(), rows = sum.rows, new = sum.new, rejected = sum.rejected + sum.duplicates, "inbox file ingested");
            sync_rejects(rejects)?;
            move_to_done(&file, &done, "")?;
            crate::failpoint::hit("after-ingest-commit");
        }
        Ok(new)
    }
}

/// Moves an inbox file into `done/`, never overwriting an earlier one of the same name.
fn move_to_done(file: &Path, done: &Path, tag: &str) -> Result<(), RunError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut target = done.join(if tag.is_empty() {
        name.clone()
    } else {
        format!("{name}.{tag}")
    });
    if target.exists() {
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        target = done.join(format!("{name}.{stamp}"));
    }
    std::fs::rename(file, &target).map_err(|source| OutputError::Rename {
        from: file.to_owned(),
        to: target,
        source,
    })?;
    Ok(())
}

/// Runs the daemon until `shutdown` resolves: then stops taking work, lets
/// in-flight requests finish (bounded), commits what is ready and saves state.
pub async fn run_daemon(
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<DaemonReport, RunError> {
    let settings = engine.settings.clone();
    let started = engine.clock.now();
    let run_id = new_run_id(started);
    {
        let (id, store) = (run_id.clone(), engine.store.clone());
        tokio::task::spawn_blocking(move || store.start_run(&id, "daemon", started))
            .await
            .map_err(|e| RunError::Task(e.to_string()))??;
    }
    crate::output::layout::create_dirs(&settings.output.dir)?;
    engine.prepare().await?;
    let last_commit = {
        let store = engine.store.clone();
        tokio::task::spawn_blocking(move || store.last_commit_at())
            .await
            .map_err(|e| RunError::Task(e.to_string()))??
    };
    let d = Arc::new(Daemon {
        engine: engine.clone(),
        run_id: run_id.clone(),
        sources: Sources {
            queue_files: settings.input.queue_files.clone(),
            rotated_dir: settings.input.rotated_dir.clone(),
            inbox_dir: settings.input.inbox_dir.clone(),
            out_dir: settings.output.dir.clone(),
        },
        new_work: Arc::new(Notify::new()),
        stop: CancellationToken::new(),
        ingesting: Mutex::new(()),
        exporting: Mutex::new(()),
        exports: AtomicU64::new(0),
        rows_exported: AtomicU64::new(0),
        last_export: std::sync::Mutex::new(last_commit),
    });

    // Due re-polls run continuously between the scheduled jobs.
    let (_ingest_done_tx, ingest_done) = watch::channel(true);
    let poller = {
        let d = d.clone();
        tokio::spawn(async move {
            d.engine
                .poll(
                    &d.run_id,
                    PollUntil::Forever,
                    ingest_done,
                    d.new_work.clone(),
                    d.stop.clone(),
                    None,
                )
                .await
        })
    };

    let mut sched = JobScheduler::new()
        .await
        .map_err(|e| RunError::Setup(format!("cannot start the scheduler: {e}")))?;
    if let Some(expr) = &settings.schedule.ingest {
        let dj = d.clone();
        let job = Job::new_async(expr.as_str(), move |_id, _lock| {
            let d = dj.clone();
            Box::pin(async move { d.ingest().await })
        })
        .map_err(|e| RunError::Setup(format!("schedule.ingest {expr:?}: {e}")))?;
        sched
            .add(job)
            .await
            .map_err(|e| RunError::Setup(e.to_string()))?;
    }
    if let Some(expr) = &settings.schedule.export {
        let dj = d.clone();
        let job = Job::new_async(expr.as_str(), move |_id, _lock| {
            let d = dj.clone();
            Box::pin(async move { d.export().await })
        })
        .map_err(|e| RunError::Setup(format!("schedule.export {expr:?}: {e}")))?;
        sched
            .add(job)
            .await
            .map_err(|e| RunError::Setup(e.to_string()))?;
        // Like a systemd timer with Persistent=true: an export that fell due while
        // the daemon was down runs once now.
        if let Ok(cron) = parse_cron(expr)
            && missed_export(&cron, last_commit, engine.clock.now())
        {
            tracing::info!("an export fell due while paysync was down; exporting now");
            d.export().await;
        }
    }
    // Read the sources once at start, then on schedule.
    if settings.schedule.ingest.is_some() {
        d.clone().ingest().await;
    }
    sched
        .start()
        .await
        .map_err(|e| RunError::Setup(format!("cannot start the scheduler: {e}")))?;

    notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(run = %run_id, provider = %engine.kind, "daemon ready");
    let watchdog = sd_notify::watchdog_enabled().map(|every| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
        })
    });
    let status = {
        let d = d.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_EVERY);
            loop {
                tick.tick().await;
                let line = d.status_line().await;
                notify(&[sd_notify::NotifyState::Status(&line)]);
            }
        })
    };

    // Serve until asked to stop, or until polling stops by itself (auth rejected).
    tokio::pin!(poller);
    let polled = tokio::select! {
        () = shutdown => None,
        r = &mut poller => Some(r),
    };
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("shutting down: finishing in-flight requests"),
    ]);
    tracing::info!("daemon stopping");
    d.stop.cancel();
    let _ = sched.shutdown().await;
    status.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    let polled = match polled {
        Some(r) => r,
        None => poller.await,
    };
    let auth_error = polled.map_err(|e| RunError::Task(e.to_string()))??;
    // Wait for a running ingest, then commit what is ready.
    let _ingest = d.ingesting.lock().await;
    d.export().await;
    let report = DaemonReport {
        run_id: run_id.clone(),
        exports: d.exports.load(Ordering::Relaxed),
        rows_exported: d.rows_exported.load(Ordering::Relaxed),
        auth_error,
    };
    let errors_now = {
        let store = engine.store.clone();
        let id = run_id.clone();
        tokio::task::spawn_blocking(move || store.run_status_counts(&id))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|c| {
                c.into_iter()
                    .find(|(s, _)| *s == PayStatus::Error)
                    .map(|(_, n)| n)
            })
            .unwrap_or(0)
    };
    let summary = serde_json::json!({
        "exports": report.exports,
        "rows_exported": report.rows_exported,
        "requests": crate::fetch::Stats::get(&engine.stats.requests),
        "auth_error": report.auth_error.is_some(),
        "orders_in_error": errors_now,
    });
    let now = engine.clock.now();
    let store = engine.store.clone();
    tokio::task::spawn_blocking(move || store.finish_run(&run_id, now, &summary))
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
    tracing::info!(
        exports = report.exports,
        rows = report.rows_exported,
        "daemon stopped"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    /// A nightly export at 02:00 is missed when the last export was the night before
    /// and the daemon starts after 02:00; not when it starts before.
    #[test]
    fn missed_export_detection() {
        let cron = parse_cron("0 0 2 * * *").unwrap();
        let last = Some(t("2026-01-01T02:00:05Z"));
        assert!(missed_export(&cron, last, t("2026-01-02T02:00:00Z")));
        assert!(missed_export(&cron, last, t("2026-01-03T09:00:00Z")));
        assert!(!missed_export(&cron, last, t("2026-01-02T01:59:59Z")));
        assert!(!missed_export(&cron, None, t("2026-01-03T09:00:00Z")));
    }

    #[test]
    fn cron_needs_seconds() {
        assert!(parse_cron("*/5 * * * * *").is_ok());
        assert!(parse_cron("0 0 2 * * *").is_ok());
        assert!(parse_cron("not cron").is_err());
    }
}
