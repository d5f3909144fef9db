//! Durable state: which orders paysync knows, where each stands, when it is next
//! due, and which observation rows have been exported. The pipeline only sees the
//! [`StateStore`] trait; `sqlite` is the embedded default. A shared backend
//! (PostgreSQL, several instances) implements the same trait: `claim_due` leases
//! orders so that two claimers never poll the same order at once. Where the leases
//! live is the backend's business: a shared database keeps them in its rows, the
//! SQLite store (one process, holding an exclusive lock) keeps them in memory.
//!
//! Types:
//! - [`NewOrder`] / [`Admission`]: registering input orders (deduplicated).
//! - [`DueOrder`]: an order leased for polling.
//! - [`PollRecord`]: the outcome of one poll, with the tracker's decision.
//! - [`Batch`]: observation rows staged for one output file (exactly-once export).
//! - [`RunRecord`] / [`StatusReport`]: what `paysync status` shows.

pub mod row;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{InputJson, Observation, OrderNo, PayDetail, PayStatus, Tracking};
use crate::provider::ProviderKind;

pub use sqlite::SqliteStore;

/// The schema version this build writes; a state file with a higher version is refused.
pub const SCHEMA_VERSION: i64 = 3;

/// Errors of the state store. Messages name the state file where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open state file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "state file {path} is in use by another paysync process (lock {lock} is held); stop it or point state.path elsewhere"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error(
        "state file {path} has schema version {found}, newer than this paysync supports ({supported}); upgrade paysync"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("state database error")]
    Db(#[from] rusqlite::Error),
    #[error("state file holds an unreadable value: {0}")]
    Corrupt(String),
}

/// An order read from input, to be registered.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub provider: ProviderKind,
    pub order_no: OrderNo,
    pub payment_no: Option<String>,
    /// The input row's columns (see [`InputJson`]).
    pub input: InputJson,
    /// Where the order was read (file path, shared by the file's orders) and its
    /// line number there.
    pub source: Arc<str>,
    pub line: u64,
}

/// What registering one [`NewOrder`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// First time paysync sees this order: it is due now.
    New,
    /// Already registered earlier in the same run (a duplicate in the input).
    Duplicate { source: String, line: u64 },
    /// Known from an earlier run; its schedule is left as it was.
    Known,
}

/// The store's handle of a registered order (the SQLite store's row id), handed out
/// by [`StateStore::claim_due`] and given back to
/// [`record_polls`](StateStore::record_polls) and [`release`](StateStore::release),
/// so those find the order without looking up its number again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrderKey(pub i64);

/// An order leased for one poll.
#[derive(Debug, Clone)]
pub struct DueOrder {
    pub key: OrderKey,
    pub order_no: OrderNo,
    pub payment_no: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    /// Polls (fetch cycles) done so far, for the backoff schedule.
    pub polls: u32,
    /// The last normalized status, if the order was ever polled.
    pub status: Option<PayStatus>,
}

/// The outcome of one poll of one order, with the tracker's decision.
#[derive(Debug, Clone)]
pub struct PollRecord {
    /// The order's [`DueOrder::key`]; its provider and number must match.
    pub key: OrderKey,
    pub provider: ProviderKind,
    pub order_no: OrderNo,
    pub observed_at: DateTime<Utc>,
    /// HTTP attempts this poll made (added to the order's API-call count).
    pub attempts: u32,
    /// The detail fetched, or for `error` / `not_found`: the status and the reason.
    pub outcome: PollOutcome,
    pub tracking: Tracking,
    /// When to poll next (`Some` only while `tracking == Polling`).
    pub next_poll_at: Option<DateTime<Utc>>,
}

/// What a poll found.
// Detail is the common case; boxing it would add an allocation per poll for the
// sake of the rare failure variant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum PollOutcome {
    Detail(PayDetail),
    /// `status` is `Error` or `NotFound`; `reason` says what went wrong (no secrets).
    Failed {
        status: PayStatus,
        reason: String,
    },
}

impl PollOutcome {
    pub fn status(&self) -> PayStatus {
        match self {
            PollOutcome::Detail(d) => d.status,
            PollOutcome::Failed { status, .. } => *status,
        }
    }
}

/// How far a queue file has been read: `identity` tells the file apart from a
/// rotated successor or a file rewritten in its place (device, inode and a hash of
/// its first bytes; see `crate::input::queue_identity`), `offset` is the byte after
/// the last line taken. The store keeps `identity` as opaque text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePosition {
    pub path: String,
    pub identity: String,
    pub offset: u64,
}

/// Observation rows staged for one output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: i64,
    /// File stem in the output directory (`paysync-<run id>` and so on).
    pub name: String,
    pub rows: u64,
    pub created_at: DateTime<Utc>,
}

/// One run as `paysync status` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub command: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Orders per final status in that run, rows exported, requests and exit code,
    /// as the pipeline summarized them (JSON object).
    pub summary: serde_json::Value,
}

/// Orders by status and tracking, the oldest unsettled order, the last runs.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub provider: Option<String>,
    pub by_status: Vec<StatusCount>,
    pub oldest_unsettled: Option<OldestUnsettled>,
    /// Rows in no committed file: not staged yet, or staged by an export that has
    /// not committed (it failed, or runs right now).
    pub unexported_rows: u64,
    pub last_runs: Vec<RunRecord>,
    /// The saved read positions of queue files, by path. Not serialized: what a
    /// reader wants is how far behind the file on disk they are (see
    /// `crate::input::queue_backlog`).
    #[serde(skip)]
    pub queue_positions: Vec<QueuePosition>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusCount {
    pub status: String,
    pub tracking: String,
    pub orders: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OldestUnsettled {
    pub order_no: String,
    pub status: String,
    pub first_seen_at: DateTime<Utc>,
    pub next_poll_at: Option<DateTime<Utc>>,
}

/// The narrow interface between the pipeline and durable state. Every method is one
/// transaction; callers batch (one call per many orders), so a backend never pays one
/// fsync per order. Methods block: async callers use `spawn_blocking`.
pub trait StateStore: Send + Sync {
    /// Registers orders read from input in `run_id`. New orders are due at `now`.
    /// Returns one [`Admission`] per input, in order. When `queue` is given, the
    /// queue file's new read position is saved in the same transaction, so a crash
    /// neither loses nor re-reads a line.
    fn add_orders(
        &self,
        run_id: &str,
        orders: &[NewOrder],
        now: DateTime<Utc>,
        queue: Option<&QueuePosition>,
    ) -> Result<Vec<Admission>, StateError>;

    /// Leases up to `limit` orders of `provider` that are being tracked, due at
    /// `now` and not leased, earliest due first, for `lease`. A lease ends when the
    /// order's poll is recorded, when it is released, or after `lease`; callers
    /// claim pages of orders and keep the ones not yet dispatched well within it.
    fn claim_due(
        &self,
        provider: ProviderKind,
        now: DateTime<Utc>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<DueOrder>, StateError>;

    /// The earliest `next_poll_at` among tracked, unleased orders of `provider`.
    fn next_due_at(&self, provider: ProviderKind) -> Result<Option<DateTime<Utc>>, StateError>;

    /// Records polls made in `run_id`: updates each order (status, counts, schedule,
    /// lease released) and stages an observation row for each whose
    /// (status, tracking) pair was never recorded for that order before. A record
    /// whose key names no order, or another order, fails the whole call.
    fn record_polls(&self, run_id: &str, polls: &[PollRecord]) -> Result<(), StateError>;

    /// Releases leases of orders that were claimed but not polled (shutdown).
    fn release(&self, orders: &[OrderKey]) -> Result<(), StateError>;

    /// Puts every unexported observation row into a new batch named `name`.
    /// `None` when there is nothing to export.
    fn stage_batch(&self, name: &str, now: DateTime<Utc>) -> Result<Option<Batch>, StateError>;

    /// Batches staged but never committed (a crash between staging and commit).
    fn open_batches(&self) -> Result<Vec<Batch>, StateError>;

    /// Visits a batch's rows in a stable order (the same order every time).
    fn visit_batch(
        &self,
        batch_id: i64,
        visit: &mut dyn FnMut(Observation) -> Result<(), StateError>,
    ) -> Result<(), StateError>;

    /// Visits a batch's rows as JSON text (exactly the JSONL encoding of the
    /// [`Observation`], without the newline) with their status, in the order of
    /// [`visit_batch`](Self::visit_batch): the JSONL export copies it through
    /// without decoding and re-encoding every row.
    fn visit_batch_json(
        &self,
        batch_id: i64,
        visit: &mut dyn FnMut(&str, PayStatus) -> Result<(), StateError>,
    ) -> Result<(), StateError>;

    /// Marks a batch as committed: its file and manifest are durable.
    fn commit_batch(&self, batch_id: i64, now: DateTime<Utc>) -> Result<(), StateError>;

    /// When the last batch was committed (the last export), if ever.
    fn last_commit_at(&self) -> Result<Option<DateTime<Utc>>, StateError>;

    /// Records the start of a run (`command` is `run`, `daemon`, ...).
    fn start_run(&self, run_id: &str, command: &str, now: DateTime<Utc>) -> Result<(), StateError>;

    /// Records a run's end and summary.
    fn finish_run(
        &self,
        run_id: &str,
        now: DateTime<Utc>,
        summary: &serde_json::Value,
    ) -> Result<(), StateError>;

    /// Orders last polled in `run_id`, counted by their current status.
    fn run_status_counts(&self, run_id: &str) -> Result<Vec<(PayStatus, u64)>, StateError>;

    /// Orders tracked (polling) for `provider`, counted.
    fn tracked_count(&self, provider: ProviderKind) -> Result<u64, StateError>;

    /// The report behind `paysync status`, with the `last_runs` most recent runs.
    fn status_report(&self, last_runs: usize) -> Result<StatusReport, StateError>;

    /// The durable read position of a queue file.
    fn queue_position(&self, path: &str) -> Result<Option<QueuePosition>, StateError>;
}
