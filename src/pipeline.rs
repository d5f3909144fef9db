//! `paysync run`: ingest input files into the state store, poll due orders
//! concurrently under the limiter until they settle or the wait ends, and export the
//! staged observation rows as one committed file with its manifest.
//!
//! - [`Engine`]: the parts a run or the daemon shares (store, provider, limiter,
//!   schedule, clock) and the three steps: [`Engine::ingest_files`], [`Engine::poll`],
//!   [`Engine::export`].
//! - [`run`]: the one-off backfill built from those steps.
//! - [`RunReport`]: what happened, for the summary and the exit code.
//!
//! Exactly-once export protocol (see README): rows are staged in the state store
//! with a batch id; the data file is written to a temp name, fsynced, renamed and
//! the directory fsynced; then the manifest the same way; then the batch is marked
//! committed. At start, a batch left staged is finished (its manifest verifies) or
//! rewritten from the state store under the same name.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, ProviderSettings, Settings};
use crate::fetch::{self, Limiter, Stats, Transport};
use crate::input::{self, InputError, InputSpec, Recovered, RejectsWriter};
use crate::model::{PayStatus, Tracking};
use crate::output::layout::{self, BatchKey};
use crate::output::{self, Encoding, Format, Manifest, ManifestExtra, OutputError};
use crate::provider::{
    FetchError, OrderRef, PayProvider, Provider, ProviderKind, genauth::GenAuth,
    payprotocol::PayProtocol,
};
use crate::state::{
    Admission, Batch, DueOrder, NewOrder, OrderKey, PollOutcome, PollRecord, SqliteStore,
    StateError, StateStore,
};
use crate::tracker::{self, Schedule};

/// Orders registered per state transaction while ingesting.
const INGEST_BATCH: usize = 1000;
/// Poll results recorded per state transaction at most.
const RECORD_BATCH: usize = 512;
/// How long a poll record may wait for others to share its state transaction.
/// Short against any poll interval; long enough that an unthrottled run writes
/// hundreds of records per transaction instead of a few.
const RECORD_LINGER: Duration = Duration::from_millis(50);
/// The dispatcher waits for `concurrency / this` free permits at a time.
const PERMITS_PER_WAKE_DIVISOR: usize = 16;
/// Due orders claimed per state call at most (the dispatcher's local queue).
const CLAIM_PAGE: usize = 1024;
/// A claimed page holds about this long of work at the configured rate, so that a
/// slow rate does not hold orders (due earlier than later ones) in the queue.
const CLAIM_SPAN: Duration = Duration::from_secs(2);
/// How long a claimed order is leased before another claimer may take it.
const LEASE: Duration = Duration::from_secs(600);
/// After shutdown is requested, in-flight requests get this long to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a run could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("authentication rejected by the provider: {0}")]
    Auth(String),
    #[error("cannot set up the provider client: {0}")]
    Setup(String),
    #[error("internal task failed: {0}")]
    Task(String),
}

impl RunError {
    /// The documented exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Input(_) | RunError::Setup(_) => 2,
            RunError::Auth(_) => 3,
            RunError::State(_) | RunError::Output(_) | RunError::Task(_) => 4,
        }
    }
}

fn task_error(e: tokio::task::JoinError) -> RunError {
    RunError::Task(e.to_string())
}

/// Wall-clock time derived from tokio's clock, so that paused-time tests move both
/// together and a run never sees time go backwards.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: DateTime<Utc>,
    mono: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            wall: Utc::now(),
            mono: Instant::now(),
        }
    }

    /// The current time, to the millisecond (the precision paysync writes).
    pub fn now(&self) -> DateTime<Utc> {
        use chrono::SubsecRound;
        (self.wall + chrono::TimeDelta::from_std(self.mono.elapsed()).unwrap_or_default())
            .trunc_subsecs(3)
    }

    /// The tokio instant at which wall time `t` is reached.
    pub fn instant_at(&self, t: DateTime<Utc>) -> Instant {
        let ahead = (t - self.now()).to_std().unwrap_or(Duration::ZERO);
        Instant::now() + ahead
    }
}

/// Options of one `paysync run`, after flags were applied over the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub inputs: Vec<PathBuf>,
    /// How long to keep polling unsettled orders after the input was fetched.
    pub wait: Duration,
    /// Show a progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
}

/// Counts from registering input.
#[derive(Debug, Default, Clone)]
pub struct IngestSummary {
    pub rows: u64,
    pub new: u64,
    pub duplicates: u64,
    pub known: u64,
    pub rejected: u64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: String,
    pub ingest: IngestSummary,
    /// Orders polled in this run, by their status at the end.
    pub statuses: BTreeMap<PayStatus, u64>,
    /// Orders still tracked (polling) after the run, all runs included.
    pub still_tracking: u64,
    pub requests: u64,
    pub retries: u64,
    pub throttled: u64,
    pub elapsed: Duration,
    pub manifest: Option<(PathBuf, Manifest)>,
    pub rejects: Option<PathBuf>,
    /// Shutdown was requested before the run finished.
    pub interrupted: bool,
    /// The provider rejected the credentials (the run stopped early).
    pub auth_error: Option<String>,
}

impl RunReport {
    /// Orders that ended the run in `error`.
    pub fn errors(&self) -> u64 {
        self.statuses.get(&PayStatus::Error).copied().unwrap_or(0)
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "paysync run {}", self.run_id)?;
        let i = &self.ingest;
        writeln!(
            f,
            "  input:     {} rows, {} new orders, {} already known, {} duplicates, {} rejected",
            i.rows, i.new, i.known, i.duplicates, i.rejected
        )?;
        let polled: u64 = self.statuses.values().sum();
        let by: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        writeln!(
            f,
            "  polled:    {polled} orders ({})",
            if by.is_empty() {
                "none".into()
            } else {
                by.join(", ")
            }
        )?;
        writeln!(
            f,
            "  tracking:  {} orders still unsettled",
            self.still_tracking
        )?;
        writeln!(
            f,
            "  requests:  {} ({} retries, {} throttled)",
            self.requests, self.retries, self.throttled
        )?;
        writeln!(f, "  elapsed:   {:.1?}", self.elapsed)?;
        match &self.manifest {
            Some((path, m)) => {
                writeln!(f, "  output:    {} ({} rows)", m.data_file, m.rows)?;
                writeln!(f, "  manifest:  {}", path.display())?;
            }
            None => writeln!(f, "  output:    no new rows")?,
        }
        if let Some(r) = &self.rejects {
            writeln!(f, "  rejects:   {}", r.display())?;
        }
        if self.interrupted {
            writeln!(f, "  interrupted: state saved; run again to continue")?;
        }
        if let Some(e) = &self.auth_error {
            writeln!(f, "  stopped:   authentication rejected ({e})")?;
        }
        Ok(())
    }
}

/// A new run id: UTC time to the millisecond plus a random suffix, so file names
/// sort by time and stay unique across hosts.
pub fn new_run_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{:04x}",
        now.format("%Y%m%dT%H%M%S%.3fZ"),
        rand::random::<u16>()
    )
}

/// Builds the configured provider over a transport (secrets resolved here).
pub fn build_provider(settings: &Settings, transport: Transport) -> Result<Provider, RunError> {
    Ok(match settings.provider_settings()? {
        ProviderSettings::PayProtocol(p) => {
            Provider::PayProtocol(PayProtocol::new(p, transport).map_err(RunError::Setup)?)
        }
        ProviderSettings::GenAuth(g) => Provider::GenAuth(GenAuth::new(g, transport)),
    })
}

/// The parts shared by `run` and the daemon.
pub struct Engine {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn StateStore>,
    pub provider: Arc<Provider>,
    pub limiter: Arc<Limiter>,
    pub stats: Arc<Stats>,
    pub schedule: Schedule,
    pub clock: Clock,
    pub kind: ProviderKind,
}

impl Engine {
    /// Opens the state store (taking its lock), finishes any export a crash left
    /// half done, and builds the provider client.
    pub async fn open(settings: Arc<Settings>) -> Result<Engine, RunError> {
        let path = settings.state.path.clone();
        let store: Arc<dyn StateStore> = Arc::new(
            tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .map_err(task_error)??,
        );
        let limiter = Arc::new(Limiter::new(
            settings.fetch.rate_limit,
            settings.fetch.burst,
        ));
        let stats = Arc::new(Stats::default());
        let transport = Transport::new(
            limiter.clone(),
            settings.fetch.timeout,
            settings.fetch.max_body,
            stats.clone(),
            &settings.fetch.client,
        )
        .map_err(|e| RunError::Setup(e.to_string()))?;
        let provider = build_provider(&settings, transport)?;
        let s = &settings.settle;
        let schedule = Schedule {
            poll_interval: s.poll_interval,
            backoff_factor: s.backoff_factor,
            max_poll_interval: s.max_poll_interval,
            confirming_interval: s.confirming_interval,
            max_wait: s.max_wait,
            unsettled: s.unsettled.clone(),
        };
        let engine = Engine {
            kind: provider.kind(),
            settings,
            store,
            provider: Arc::new(provider),
            limiter,
            stats,
            schedule,
            clock: Clock::start(),
        };
        engine.recover().await?;
        Ok(engine)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, RunError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(task_error)??)
    }

    /// Finishes what a crash interrupted: the rejects files of a run or an ingest
    /// are published (their complete rows); a batch whose manifest verifies is
    /// marked committed, any other is rewritten under the same name.
    async fn recover(&self) -> Result<(), RunError> {
        let dir = self.settings.output.dir.clone();
        let recovered = tokio::task::spawn_blocking(move || input::recover_rejects(&dir))
            .await
            .map_err(task_error)?
            .map_err(|source| OutputError::Write {
                path: self.settings.output.dir.clone(),
                source,
            })?;
        for r in recovered {
            match r {
                Recovered::Published { path, rows } => {
                    tracing::warn!(file = %path.display(), rows, "published the rejects of a run or ingest interrupted by a crash")
                }
                Recovered::Removed { temp } => {
                    tracing::info!(file = %temp.display(), "removed an empty rejects file left by a crash")
                }
                Recovered::InUse { temp } => {
                    tracing::warn!(file = %temp.display(), "rejects file is being written by another process; left alone")
                }
                Recovered::Conflict { temp, path } => {
                    tracing::warn!(file = %temp.display(), existing = %path.display(), "rejects file left by a crash has a published namesake; left alone")
                }
                Recovered::Failed { temp, error } => {
                    tracing::warn!(file = %temp.display(), error, "cannot publish a rejects file left by a crash; left alone, tried again at the next start")
                }
            }
        }
        let open = self.blocking(|s| s.open_batches()).await?;
        for batch in open {
            tracing::warn!(batch = %batch.name, rows = batch.rows, "finishing an export interrupted by a crash");
            let started_at = batch.created_at;
            self.export_batch(batch, started_at).await?;
        }
        Ok(())
    }

    /// Calls the provider's one-time setup (currency list, first token).
    pub async fn prepare(&self) -> Result<(), RunError> {
        match self.provider.prepare().await {
            Ok(()) => Ok(()),
            Err(FetchError::Auth(m)) => Err(RunError::Auth(m)),
            Err(e) => {
                tracing::warn!(error = %e, "provider setup failed; continuing");
                Ok(())
            }
        }
    }

    /// Reads input files and registers their orders (blocking; run it on a blocking
    /// thread). `notify` is woken after each batch so polling can start at once.
    pub fn ingest_files(
        &self,
        run_id: &str,
        specs: &[InputSpec],
        rejects: &mut RejectsWriter,
        notify: &Notify,
        admitted: &AtomicU64,
        stop: &CancellationToken,
    ) -> Result<IngestSummary, RunError> {
        let mut sum = IngestSummary::default();
        let mut batch: Vec<NewOrder> = Vec::with_capacity(INGEST_BATCH);
        for spec in specs {
            if stop.is_cancelled() {
                break;
            }
            if input::is_empty_file(&spec.path).unwrap_or(false) {
                tracing::warn!(file = %spec.path.display(), "input file is empty");
            }
            for rec in input::open(spec)? {
                let rec = rec?;
                sum.rows += 1;
                match rec.parsed {
                    Err(reason) => {
                        sum.rejected += 1;
                        rejects
                            .write(&rec.source, rec.line, &reason, &rec.raw)
                            .map_err(|e| OutputError::Write {
                                path: rejects.path().to_path_buf(),
                                source: e,
                            })?;
                    }
                    Ok((order_no, payment_no)) => {
                        batch.push(NewOrder {
                            provider: self.kind,
                            order_no,
                            payment_no,
                            input: rec.input,
                            source: rec.source,
                            line: rec.line,
                        });
                        if batch.len() >= INGEST_BATCH {
                            self.add_batch(
                                run_id, &mut batch, &mut sum, rejects, notify, admitted,
                            )?;
                            if stop.is_cancelled() {
                                return Ok(sum);
                            }
                        }
                    }
                }
            }
        }
        self.add_batch(run_id, &mut batch, &mut sum, rejects, notify, admitted)?;
        Ok(sum)
    }

    fn add_batch(
        &self,
        run_id: &str,
        batch: &mut Vec<NewOrder>,
        sum: &mut IngestSummary,
        rejects: &mut RejectsWriter,
        notify: &Notify,
        admitted: &AtomicU64,
    ) -> Result<(), RunError> {
        if batch.is_empty() {
            return Ok(());
        }
        let admissions = self
            .store
            .add_orders(run_id, batch, self.clock.now(), None)?;
        for (order, adm) in batch.iter().zip(admissions) {
            match adm {
                Admission::New => sum.new += 1,
                Admission::Known => sum.known += 1,
                Admission::Duplicate { source, line } => {
                    sum.duplicates += 1;
                    let reason = format!(
                        "duplicate order number {} (first at {source} line {line})",
                        order.order_no
                    );
                    rejects
                        .write(&order.source, order.line, &reason, order.order_no.as_str())
                        .map_err(|e| OutputError::Write {
                            path: rejects.path().to_path_buf(),
                            source: e,
                        })?;
                }
            }
        }
        admitted.store(sum.new, Ordering::Relaxed);
        batch.clear();
        notify.notify_one();
        Ok(())
    }

    /// Polls due orders until nothing is due before `until` says stop, or `stop` is
    /// cancelled. Returns the authentication error message if the provider
    /// rejected our credentials (polling then stops early).
    pub async fn poll(
        self: &Arc<Self>,
        run_id: &str,
        until: PollUntil,
        mut ingest_done: watch::Receiver<bool>,
        new_work: Arc<Notify>,
        stop: CancellationToken,
        progress: Option<indicatif::ProgressBar>,
    ) -> Result<Option<String>, RunError> {
        let concurrency = self.settings.fetch.concurrency;
        let sem = Arc::new(Semaphore::new(concurrency));
        let inflight = Arc::new(AtomicUsize::new(0));
        let recorded = Arc::new(Notify::new());
        let auth_error: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let abort = stop.child_token();
        let (tx, rx) = mpsc::channel::<PollRecord>(concurrency.max(RECORD_BATCH));
        let recorder = tokio::spawn(record_loop(
            self.store.clone(),
            run_id.to_owned(),
            rx,
            inflight.clone(),
            recorded.clone(),
            progress,
        ));
        // The end of the run's wait (wall time): set once the input is read, so
        // the wait overlaps finishing the first pass. Nothing due after it is
        // claimed, which ends the run even when polls are slower than the schedule.
        let mut wait_until: Option<DateTime<Utc>> = None;
        let mut tasks = tokio::task::JoinSet::new();
        let kind = self.kind;
        let page = claim_page(self.settings.fetch.rate_limit, concurrency);
        // Claimed orders not yet started, earliest due first, and when they were
        // claimed (their leases run from then).
        let mut ready: VecDeque<DueOrder> = VecDeque::with_capacity(page);
        let mut claimed_at = Instant::now();
        let result: Result<(), RunError> = async {
            loop {
                if abort.is_cancelled() {
                    break;
                }
                while tasks.try_join_next().is_some() {}
                if let (PollUntil::IdleFor(wait), None, true) =
                    (until, wait_until, *ingest_done.borrow())
                {
                    let wait = chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::MAX);
                    wait_until = Some(self.clock.now() + wait);
                }
                if !ready.is_empty() && claimed_at.elapsed() >= LEASE / 2 {
                    // Dispatch stalled (a long throttling pause): hand the page back
                    // before its leases could run out, and claim afresh.
                    let stale: Vec<OrderKey> = ready.drain(..).map(|d| d.key).collect();
                    self.blocking(move |s| s.release(&stale)).await?;
                }
                if ready.is_empty() {
                    let now = match wait_until {
                        Some(limit) => self.clock.now().min(limit),
                        None => self.clock.now(),
                    };
                    let claimed = self
                        .blocking(move |s| s.claim_due(kind, now, page, LEASE))
                        .await?;
                    claimed_at = Instant::now();
                    ready.extend(claimed);
                }
                if !ready.is_empty() {
                    // Waiting here is waiting for polls to finish. Permits are taken
                    // a few at a time, so the dispatcher wakes once per few finished
                    // polls rather than once per poll.
                    let want = ready.len().min(permit_batch(concurrency));
                    let mut permits = Some(tokio::select! {
                        p = sem.clone().acquire_many_owned(u32::try_from(want).unwrap_or(1)) => {
                            p.expect("semaphore open")
                        }
                        _ = abort.cancelled() => break,
                    });
                    // `want <= ready.len()`: every permit gets an order.
                    while let Some(mut held) = permits.take() {
                        let Some(due) = ready.pop_front() else { break };
                        let permit = if held.num_permits() > 1 {
                            let one = held.split(1).expect("more than one permit held");
                            permits = Some(held);
                            one
                        } else {
                            held
                        };
                        inflight.fetch_add(1, Ordering::SeqCst);
                        let engine = self.clone();
                        let tx = tx.clone();
                        let auth_error = auth_error.clone();
                        let abort = abort.clone();
                        let inflight = inflight.clone();
                        tasks.spawn(async move {
                            // Boxed: the poll's future is large (hyper's, the retry
                            // loop's), and tokio copies a task's future into place
                            // when spawning and finishing it.
                            let rec = Box::pin(engine.poll_one(due)).await;
                            drop(permit);
                            match rec {
                                Ok(rec) => {
                                    if tx.send(rec).await.is_err() {
                                        inflight.fetch_sub(1, Ordering::SeqCst);
                                    }
                                }
                                Err(msg) => {
                                    inflight.fetch_sub(1, Ordering::SeqCst);
                                    let mut g =
                                        auth_error.lock().unwrap_or_else(|e| e.into_inner());
                                    g.get_or_insert(msg);
                                    abort.cancel();
                                }
                            }
                        });
                    }
                    continue;
                }
                if !*ingest_done.borrow() || inflight.load(Ordering::SeqCst) > 0 {
                    // Wake for new input, a recorded batch (leases released), or the
                    // next unleased order falling due, which nothing else signals
                    // while records wait for their batch.
                    let next = self
                        .blocking(move |s| s.next_due_at(kind))
                        .await?
                        .filter(|next| wait_until.is_none_or(|limit| *next <= limit));
                    let due = async {
                        match next {
                            Some(t) => tokio::time::sleep_until(self.clock.instant_at(t)).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = new_work.notified() => {}
                        _ = recorded.notified() => {}
                        _ = ingest_done.changed() => {}
                        _ = abort.cancelled() => {}
                        () = due => {}
                    }
                    continue;
                }
                // Idle: input read, nothing in flight, nothing due now.
                let Some(next) = self.blocking(move |s| s.next_due_at(kind)).await? else {
                    match until {
                        PollUntil::IdleFor(_) => break,
                        // The daemon waits for the next ingest.
                        PollUntil::Forever => {
                            tokio::select! {
                                _ = new_work.notified() => {}
                                _ = abort.cancelled() => {}
                            }
                            continue;
                        }
                    }
                };
                if wait_until.is_some_and(|limit| next > limit) {
                    break;
                }
                let at = self.clock.instant_at(next);
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = new_work.notified() => {}
                    _ = abort.cancelled() => {}
                }
            }
            Ok(())
        }
        .await;
        // Orders claimed but never started stay due: give their leases back.
        let unstarted: Vec<OrderKey> = ready.drain(..).map(|d| d.key).collect();
        let released = if unstarted.is_empty() {
            Ok(())
        } else {
            self.blocking(move |s| s.release(&unstarted)).await
        };
        // Let in-flight polls finish (bounded), then flush the recorder.
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!("in-flight requests did not finish in time; their orders stay due");
            tasks.abort_all();
        }
        drop(tx);
        recorder.await.map_err(task_error)??;
        result?;
        released?;
        let auth = auth_error.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(auth)
    }

    /// Polls one order: fetch with retries, then the tracker's decision. `Err` carries
    /// an authentication failure (the run stops).
    async fn poll_one(&self, due: DueOrder) -> Result<PollRecord, String> {
        let DueOrder {
            key,
            order_no,
            payment_no,
            first_seen_at,
            polls,
            status: _,
        } = due;
        let order = OrderRef {
            order_no,
            payment_no,
        };
        let polled = fetch::fetch_order(
            &self.provider,
            &self.limiter,
            &self.settings.fetch.retry,
            &self.stats,
            &order,
        )
        .await;
        let outcome = match polled.result {
            Ok(detail) => PollOutcome::Detail(detail),
            Err(FetchError::NotFound) => PollOutcome::Failed {
                status: PayStatus::NotFound,
                reason: FetchError::NotFound.to_string(),
            },
            Err(FetchError::Auth(m)) => return Err(m),
            Err(e) => {
                tracing::warn!(order = %order.order_no, attempts = polled.attempts, error = %e, "order fetch failed");
                PollOutcome::Failed {
                    status: PayStatus::Error,
                    reason: format!("{e} (after {} attempts)", polled.attempts),
                }
            }
        };
        let now = self.clock.now();
        let (tracking, next_poll_at) = tracker::decide(
            &self.schedule,
            outcome.status(),
            first_seen_at,
            now,
            polls + 1,
        );
        if tracking == Tracking::Deadline {
            tracing::info!(order = %order.order_no, status = %outcome.status(), "deadline passed unsettled; tracking stops");
        }
        Ok(PollRecord {
            key,
            provider: self.kind,
            order_no: order.order_no,
            observed_at: now,
            attempts: polled.attempts,
            outcome,
            tracking,
            next_poll_at,
        })
    }

    /// Stages every unexported row under the path `output.path_template` gives
    /// for `run_id` now, and commits it as a file with its manifest and the
    /// directory's `_SUCCESS` marker. `None` when there was nothing to export.
    /// `started_at` goes into the manifest (the run's or export's start).
    pub async fn export(
        &self,
        run_id: &str,
        started_at: DateTime<Utc>,
    ) -> Result<Option<(PathBuf, Manifest)>, RunError> {
        let now = self.clock.now();
        let output = &self.settings.output;
        let key = BatchKey {
            run_id: run_id.to_owned(),
            path: output
                .path_template
                .render(self.kind.as_str(), run_id, now, output.format),
        };
        let name = key.encode();
        let Some(batch) = self.blocking(move |s| s.stage_batch(&name, now)).await? else {
            return Ok(None);
        };
        self.export_batch(batch, started_at).await.map(Some)
    }

    /// Writes (or verifies) one staged batch and marks it committed.
    async fn export_batch(
        &self,
        batch: Batch,
        started_at: DateTime<Utc>,
    ) -> Result<(PathBuf, Manifest), RunError> {
        let store = self.store.clone();
        let root = self.settings.output.dir.clone();
        let encoding = self.settings.output.encoding().map_err(RunError::Setup)?;
        let provider = self.kind.as_str().to_owned();
        let now = self.clock.now();
        tokio::task::spawn_blocking(move || {
            let meta = BatchMeta {
                provider,
                started_at,
                now,
            };
            write_batch(store.as_ref(), &root, encoding, &batch, meta)
        })
        .await
        .map_err(task_error)?
    }
}

/// What the manifest of a batch records besides its rows.
struct BatchMeta {
    provider: String,
    started_at: DateTime<Utc>,
    now: DateTime<Utc>,
}

/// The blocking half of an export: verify-or-rewrite, the `_SUCCESS` marker,
/// then mark committed. Returns the manifest's path.
fn write_batch(
    store: &dyn StateStore,
    root: &Path,
    encoding: Encoding,
    batch: &Batch,
    meta: BatchMeta,
) -> Result<(PathBuf, Manifest), RunError> {
    let BatchMeta {
        provider,
        started_at,
        now,
    } = meta;
    let key = BatchKey::decode(&batch.name);
    let name = key.path.stem.as_str();
    let dir = root.join(&key.path.dir);
    layout::create_dirs(&dir)?;
    let manifest = match committed_manifest(&dir, name)? {
        Some(m) => m,
        None => write_file(
            store,
            &dir,
            name,
            encoding,
            batch,
            &key.run_id,
            &provider,
            started_at,
        )?,
    };
    let rel = |file: &str| key.path.dir.join(file).to_string_lossy().into_owned();
    layout::SuccessMarker {
        run_id: key.run_id.clone(),
        provider,
        schema_version: manifest.schema_version,
        finished_at: crate::model::rfc3339_millis(manifest.finished_at),
        files: vec![layout::SuccessFile {
            data_file: rel(&manifest.data_file),
            manifest: rel(&format!("{name}.manifest.json")),
            rows: manifest.rows,
            sha256: manifest.sha256.clone(),
        }],
    }
    .write(&dir)?;
    crate::failpoint::hit("before-batch-commit");
    store.commit_batch(batch.id, now)?;
    Ok((output::manifest_path(&dir, name), manifest))
}

/// The manifest of output `<dir>/<name>` when it is committed and intact.
fn committed_manifest(dir: &Path, name: &str) -> Result<Option<Manifest>, OutputError> {
    if output::verify(dir, name)? {
        return output::read_manifest(dir, name);
    }
    Ok(None)
}

/// Writes a batch's rows to `<dir>/<name>.<ext>` and commits it with its
/// manifest, after removing what a crashed attempt left.
#[allow(clippy::too_many_arguments)]
fn write_file(
    store: &dyn StateStore,
    dir: &Path,
    name: &str,
    encoding: Encoding,
    batch: &Batch,
    run_id: &str,
    provider: &str,
    started_at: DateTime<Utc>,
) -> Result<Manifest, RunError> {
    output::remove_uncommitted(dir, name)?;
    let mut columns: Vec<String> = Vec::new();
    if encoding.format != Format::Jsonl {
        let mut seen = std::collections::HashSet::new();
        store.visit_batch(batch.id, &mut |row| {
            for (k, _) in &row.input {
                if !seen.contains(k) {
                    seen.insert(k.clone());
                    columns.push(k.clone());
                }
            }
            Ok(())
        })?;
    }
    let mut writer = output::FileWriter::create_with(dir, name, encoding, columns, started_at)?;
    let mut write_err: Option<OutputError> = None;
    let crash_mid_write = crate::failpoint::armed("mid-write").then_some(batch.rows / 2);
    let mut written = 0u64;
    // After a write error the remaining rows are skipped, and the error returned.
    let mut step = |write: &mut dyn FnMut() -> Result<(), OutputError>| {
        if write_err.is_none()
            && let Err(e) = write()
        {
            write_err = Some(e);
        }
        written += 1;
        if crash_mid_write == Some(written) {
            crate::failpoint::kill_self();
        }
        Ok(())
    };
    let w = &mut writer;
    if encoding.format == Format::Jsonl {
        // The store keeps rows as their JSONL text: copy it through.
        store.visit_batch_json(batch.id, &mut |json, status| {
            step(&mut || w.write_json_line(json, status))
        })?;
    } else {
        store.visit_batch(batch.id, &mut |row| step(&mut || w.write(&row)))?;
    }
    if let Some(e) = write_err {
        return Err(e.into());
    }
    Ok(writer.commit(ManifestExtra {
        run_id: run_id.to_owned(),
        provider: provider.to_owned(),
    })?)
}

/// When polling ends.
#[derive(Debug, Clone, Copy)]
pub enum PollUntil {
    /// Once nothing is due within this long of becoming idle (the run's wait).
    IdleFor(Duration),
    /// Only when stopped (daemon).
    Forever,
}

/// How many due orders the dispatcher claims per state call: [`CLAIM_SPAN`] of work
/// at `rate_limit` requests per second, at least one per concurrency permit, at most
/// [`CLAIM_PAGE`] (or `concurrency` if that is larger).
fn claim_page(rate_limit: f64, concurrency: usize) -> usize {
    let span = rate_limit * CLAIM_SPAN.as_secs_f64();
    let span = if span.is_finite() && span >= 1.0 {
        // Truncation is intended; the cap keeps the value small.
        span.min(CLAIM_PAGE as f64) as usize
    } else if span.is_finite() {
        1
    } else {
        CLAIM_PAGE
    };
    span.max(concurrency).clamp(1, CLAIM_PAGE.max(concurrency))
}

/// How many concurrency permits the dispatcher takes at once: one per
/// [`PERMITS_PER_WAKE_DIVISOR`]th of `concurrency`, at least one. The few permits
/// a batch waits for are idle meanwhile, a small share of `concurrency`.
fn permit_batch(concurrency: usize) -> usize {
    (concurrency / PERMITS_PER_WAKE_DIVISOR).max(1)
}

/// Collects poll records into batched state transactions: a batch is written once
/// it holds [`RECORD_BATCH`] records or its first record is [`RECORD_LINGER`] old,
/// and records keep arriving while the previous batch is written.
async fn record_loop(
    store: Arc<dyn StateStore>,
    run_id: String,
    mut rx: mpsc::Receiver<PollRecord>,
    inflight: Arc<AtomicUsize>,
    recorded: Arc<Notify>,
    progress: Option<indicatif::ProgressBar>,
) -> Result<(), RunError> {
    let mut buf = Vec::with_capacity(RECORD_BATCH);
    while next_record_batch(&mut rx, &mut buf).await > 0 {
        let n = buf.len();
        let store2 = store.clone();
        let run = run_id.clone();
        let batch = std::mem::take(&mut buf);
        let back =
            tokio::task::spawn_blocking(move || store2.record_polls(&run, &batch).map(|()| batch))
                .await
                .map_err(task_error)??;
        buf = back;
        buf.clear();
        crate::failpoint::hit("after-first-record");
        inflight.fetch_sub(n, Ordering::SeqCst);
        if let Some(p) = &progress {
            p.inc(n as u64);
        }
        recorded.notify_one();
    }
    Ok(())
}

/// Fills `buf` (empty on entry) with the next batch of records: waits for the first,
/// then takes more until the batch is full, [`RECORD_LINGER`] has passed, or the
/// channel is closed. Returns the batch size; 0 once the channel is closed and empty.
async fn next_record_batch(
    rx: &mut mpsc::Receiver<PollRecord>,
    buf: &mut Vec<PollRecord>,
) -> usize {
    if rx.recv_many(buf, RECORD_BATCH).await == 0 {
        return 0;
    }
    let deadline = Instant::now() + RECORD_LINGER;
    while buf.len() < RECORD_BATCH {
        let room = RECORD_BATCH - buf.len();
        tokio::select! {
            n = rx.recv_many(buf, room) => if n == 0 { break },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    buf.len()
}

/// Input specs for paths, with the config's column settings.
pub fn input_specs(settings: &Settings, paths: &[PathBuf]) -> Vec<InputSpec> {
    paths
        .iter()
        .map(|p| InputSpec {
            path: p.clone(),
            column: settings.input.column.clone(),
            payment_no_column: settings.input.payment_no_column.clone(),
        })
        .collect()
}

/// `paysync run`: ingest, poll until settled or the wait ends, export.
/// `shutdown` resolving stops the run cleanly (state saved, ready rows committed).
pub async fn run(
    settings: Arc<Settings>,
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let specs = input_specs(&settings, &opts.inputs);
    // Check every input before any request: a missing file or column is a usage error.
    {
        let specs = specs.clone();
        tokio::task::spawn_blocking(move || -> Result<(), InputError> {
            for s in &specs {
                drop(input::open(s)?);
            }
            Ok(())
        })
        .await
        .map_err(task_error)??;
    }
    layout::create_dirs(&settings.output.dir)?;
    let engine = Arc::new(Engine::open(settings.clone()).await?);
    let run_started = engine.clock.now();
    let run_id = new_run_id(run_started);
    {
        let (id, now) = (run_id.clone(), engine.clock.now());
        engine
            .blocking(move |s| s.start_run(&id, "run", now))
            .await?;
    }
    tracing::info!(run = %run_id, provider = %engine.kind, inputs = specs.len(), "run started");

    let stop = CancellationToken::new();
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let interrupted = interrupted.clone();
        async move {
            shutdown.await;
            interrupted.store(true, Ordering::SeqCst);
            stop.cancel();
        }
    };
    let body = async {
        engine.prepare().await?;
        let progress = opts.progress.then(|| {
            let pb = indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::stderr(),
            );
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {pos}/{len} orders polled  {per_sec}  {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        });
        let new_work = Arc::new(Notify::new());
        let admitted = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = watch::channel(false);
        let ingest = {
            let engine = engine.clone();
            let run_id = run_id.clone();
            let new_work = new_work.clone();
            let admitted = admitted.clone();
            let out_dir = settings.output.dir.clone();
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                let mut rejects = RejectsWriter::new(&out_dir, &run_id);
                let r =
                    engine.ingest_files(&run_id, &specs, &mut rejects, &new_work, &admitted, &stop);
                let path = rejects.finish().map_err(|e| OutputError::Write {
                    path: out_dir.clone(),
                    source: e,
                });
                let _ = done_tx.send(true);
                (r, path)
            })
        };
        if let Some(pb) = &progress {
            let pb = pb.clone();
            let admitted = admitted.clone();
            let done = done_rx.clone();
            tokio::spawn(async move {
                loop {
                    pb.set_length(admitted.load(Ordering::Relaxed));
                    if *done.borrow() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        let auth = engine
            .poll(
                &run_id,
                PollUntil::IdleFor(opts.wait),
                done_rx,
                new_work,
                stop.clone(),
                progress.clone(),
            )
            .await?;
        // Stopping early (auth, signal) must not leave ingest running.
        let (ingest_result, rejects) = ingest.await.map_err(task_error)?;
        if let Some(pb) = progress {
            pb.finish_and_clear();
        }
        Ok((ingest_result?, rejects?, auth))
    };
    tokio::pin!(body);
    tokio::pin!(watcher);
    // A shutdown request cancels `stop`; the body then winds down and returns.
    let outcome = tokio::select! {
        r = &mut body => r,
        () = &mut watcher => body.await,
    };
    let (ingest, rejects, auth) = match outcome {
        Ok(v) => v,
        Err(RunError::Auth(m)) => (IngestSummary::default(), None, Some(m)),
        Err(e) => return Err(e),
    };
    let manifest = engine.export(&run_id, run_started).await?;
    let statuses: BTreeMap<PayStatus, u64> = {
        let id = run_id.clone();
        engine
            .blocking(move |s| s.run_status_counts(&id))
            .await?
            .into_iter()
            .collect()
    };
    let still_tracking = {
        let kind = engine.kind;
        engine.blocking(move |s| s.tracked_count(kind)).await?
    };
    let report = RunReport {
        run_id: run_id.clone(),
        ingest,
        statuses,
        still_tracking,
        requests: Stats::get(&engine.stats.requests),
        retries: Stats::get(&engine.stats.retries),
        throttled: Stats::get(&engine.stats.throttled),
        elapsed: started.elapsed(),
        manifest,
        rejects,
        interrupted: interrupted.load(Ordering::SeqCst),
        auth_error: auth,
    };
    let summary = serde_json::json!({
        "statuses": report.statuses.iter().map(|(k, v)| (k.as_str(), v)).collect::<BTreeMap<_, _>>(),
        "rows_exported": report.manifest.as_ref().map(|(_, m)| m.rows).unwrap_or(0),
        "requests": report.requests,
        "retries": report.retries,
        "throttled": report.throttled,
        "rejected": report.ingest.rejected + report.ingest.duplicates,
        "interrupted": report.interrupted,
        "auth_error": report.auth_error.is_some(),
    });
    let now = engine.clock.now();
    let finish_id = report.run_id.clone();
    engine
        .blocking(move |s| s.finish_run(&finish_id, now, &summary))
        .await?;
    tracing::info!(run = %report.run_id, errors = report.errors(), "run finished");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A claimed page is about two seconds of work at the configured rate, never
    /// less than one order per concurrency permit, never more than [`CLAIM_PAGE`]
    /// (unless concurrency is larger); odd rates still give at least one order.
    #[test]
    fn claim_page_sizes() {
        assert_eq!(claim_page(20.0, 16), 40);
        assert_eq!(claim_page(20.0, 64), 64);
        assert_eq!(claim_page(1_000_000.0, 128), CLAIM_PAGE);
        assert_eq!(claim_page(1_000_000.0, 4096), 4096);
        assert_eq!(claim_page(0.01, 1), 1);
        assert_eq!(claim_page(0.01, 0), 1);
        assert_eq!(claim_page(f64::INFINITY, 8), CLAIM_PAGE);
    }

    /// Permits are taken a sixteenth of `concurrency` at a time, at least one:
    /// small concurrency (the quota scenario's 16) is dispatched one by one.
    #[test]
    fn permit_batches() {
        assert_eq!(permit_batch(1), 1);
        assert_eq!(permit_batch(16), 1);
        assert_eq!(permit_batch(64), 4);
        assert_eq!(permit_batch(128), 8);
        assert_eq!(permit_batch(0), 1);
    }

    fn record(n: u32) -> PollRecord {
        PollRecord {
            key: crate::state::OrderKey(i64::from(n)),
            provider: ProviderKind::PayProtocol,
            order_no: crate::model::OrderNo::parse(&format!("R-{n}")).unwrap(),
            observed_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            attempts: 1,
            outcome: PollOutcome::Failed {
                status: PayStatus::Error,
                reason: "test".into(),
            },
            tracking: Tracking::Polling,
            next_poll_at: None,
        }
    }

    /// Records are batched: a batch waits up to [`RECORD_LINGER`] after its first
    /// record for more, is cut at [`RECORD_BATCH`], and the last one is flushed when
    /// the channel closes; a closed, empty channel ends the loop.
    #[tokio::test(start_paused = true)]
    async fn record_batches_linger_fill_and_flush() {
        let (tx, mut rx) = mpsc::channel(RECORD_BATCH * 2);
        let mut buf = Vec::new();

        // Two records now, one more within the linger: one batch of three, taken
        // when the linger ends.
        tx.send(record(1)).await.unwrap();
        tx.send(record(2)).await.unwrap();
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RECORD_LINGER / 2).await;
            late.send(record(3)).await.unwrap();
        });
        let start = Instant::now();
        assert_eq!(next_record_batch(&mut rx, &mut buf).await, 3);
        assert_eq!(Instant::now() - start, RECORD_LINGER);
        buf.clear();

        // A full batch is taken at once, without waiting; the rest is the next batch.
        for n in 0..RECORD_BATCH as u32 + 5 {
            tx.send(record(n)).await.unwrap();
        }
        let start = Instant::now();
        assert_eq!(next_record_batch(&mut rx, &mut buf).await, RECORD_BATCH);
        assert_eq!(Instant::now(), start);
        buf.clear();

        // Closing the channel flushes what is left at once, then ends the loop.
        drop(tx);
        assert_eq!(next_record_batch(&mut rx, &mut buf).await, 5);
        assert_eq!(Instant::now(), start);
        buf.clear();
        assert_eq!(next_record_batch(&mut rx, &mut buf).await, 0);
    }

    /// Driven by paused tokio time, the dispatcher's clock and sleeps follow the
    /// poll schedule exactly: each re-poll of a pending order falls due after the
    /// backed-off interval, confirmation polls are quick, and the last poll lands on
    /// the deadline.
    #[tokio::test(start_paused = true)]
    async fn poll_schedule_under_paused_time() {
        let schedule = Schedule {
            poll_interval: Duration::from_secs(60),
            backoff_factor: 2.0,
            max_poll_interval: Duration::from_secs(300),
            confirming_interval: Duration::from_secs(10),
            max_wait: Duration::from_secs(900),
            unsettled: BTreeSet::from([PayStatus::Pending, PayStatus::Confirming]),
        };
        let clock = Clock::start();
        let first_seen = clock.now();
        let statuses = [
            PayStatus::Pending,
            PayStatus::Pending,
            PayStatus::Pending,
            PayStatus::Confirming,
            PayStatus::Pending,
            PayStatus::Pending,
            PayStatus::Pending,
        ];
        let mut waits = Vec::new();
        for (i, status) in statuses.into_iter().enumerate() {
            let (_, next) =
                tracker::decide(&schedule, status, first_seen, clock.now(), i as u32 + 1);
            let Some(next) = next else { break };
            let before = Instant::now();
            tokio::time::sleep_until(clock.instant_at(next)).await;
            assert_eq!(clock.now(), next, "the clock reaches the due time");
            waits.push((Instant::now() - before).as_secs());
        }
        // 60, 120, 240 s backing off; 10 s while confirming; then capped at 300 s,
        // and the last wait ends on the deadline, 900 s after first seen.
        assert_eq!(waits, [60, 120, 240, 10, 300, 170]);
        assert_eq!(clock.now() - first_seen, chrono::TimeDelta::seconds(900));
        let (tracking, next) =
            tracker::decide(&schedule, PayStatus::Pending, first_seen, clock.now(), 8);
        assert_eq!((tracking, next), (Tracking::Deadline, None));
    }
}
