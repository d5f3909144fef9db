//! The embedded SQLite [`StateStore`]: one state file per paysync installation,
//! owned by one process at a time.
//!
//! - [`SqliteStore`]: the store. [`SqliteStore::open`] locks, creates or migrates the
//!   file; every trait method is one transaction on one connection behind a mutex.
//!
//! # Files
//! `<path>` is the database, `<path>-wal` / `<path>-shm` are SQLite's WAL files and
//! `<path>.lock` is an advisory lock (`flock`, via `File::try_lock`) held for the
//! store's lifetime, so a second paysync on the same state fails fast with
//! [`StateError::Locked`] instead of waiting on SQLite locks. New files are created
//! mode `0600` (SQLite gives the WAL files the database's mode).
//!
//! # Leases
//! Because the lock is exclusive, this process is the only claimer, so leases live
//! in memory (order rowid -> lease end) instead of in the file: claiming due orders
//! is a read, not a write of every claimed row, and a crash drops every lease with
//! the process. The `lease_until` column stays in the schema (a shared backend keeps
//! its leases in its rows) and is cleared at open for files an older build wrote.
//! Rowids of `orders` are stable while the store is open: paysync never runs
//! `VACUUM`, and the lock keeps other paysync processes out.
//!
//! A lease also keeps what recording the order's poll reads of its row (API calls,
//! observed pairs, input columns), as the claim read it, so that recording does not
//! read the row again. Only [`StateStore::record_polls`] changes those columns, and
//! it takes a lease's copy (under the connection's lock, in the transaction that
//! writes the row) before writing, so a copy in the map is never older than its row.
//! A record without a copy (the order was claimed again after its lease ran out,
//! or an earlier record failed) reads the row.
//!
//! # Schema (version [`super::SCHEMA_VERSION`], in `PRAGMA user_version`)
//! - `orders`: one row per (provider, order_no): the input row (`input`, the JSON
//!   object an observation's `input` is written as, keys in input order), where it
//!   was first read (`source`, `line`, `first_run`, `first_seen_at`), the last poll
//!   (`status`, `provider_status`, `last_error`, `last_run`, `last_observed_at`),
//!   the schedule (`tracking`, `next_poll_at`, `lease_until`: unused, see Leases),
//!   counters (`polls`: poll cycles, for backoff; `api_calls`: HTTP attempts, the
//!   output `polls` column) and `observed`: the (status, tracking) pairs already
//!   written as observation rows (`"pending/polling paid/settled"`). The partial
//!   index `orders_due` on (provider, next_poll_at) holds the tracked orders
//!   (`tracking = 'polling'`), for claiming due orders.
//! - `observations`: the output rows, append-only, as the JSON of [`Observation`]
//!   (which holds the full pay detail) with its `status`, numbered by `seq`. Rows
//!   are never deleted, so SQLite numbers each new row one above the largest and a
//!   `seq` is never reused (without AUTOINCREMENT's `sqlite_sequence` write per
//!   row; a future pruning step must keep the newest row). A row is inserted only
//!   when its pair is not yet in the order's `observed`, which is updated in the
//!   same statement sequence and transaction: that is the "never twice per
//!   (provider, order_no, status, tracking)" rule. It lives in the order's row,
//!   which every poll rewrites anyway, rather than in a UNIQUE index whose random
//!   inserts would cost a page write per row.
//! - `batches`: one per output file, covering the consecutive range
//!   `first_seq..=last_seq` of observations (the rows after the previous batch):
//!   `staged` until its file and manifest are durable, then `committed`. Staging
//!   writes one row, whatever the batch size.
//! - `runs`: start, end and summary of each run, for `paysync status`.
//! - `queue_positions`: how far each queue file has been read.
//! - `order_counts` (orders per (status, tracking), `''` for not polled yet) and
//!   `run_counts` (orders per (last_run, status)), so that status reports and run
//!   summaries read a few rows instead of scanning every order. The two writes
//!   that change those columns of `orders` (`add_orders`, `record_polls`) tally
//!   their changes (`Counts`) and apply them in the same transaction, a few upserts
//!   per call: any new write to those columns must do the same. (SQLite triggers
//!   would keep them without that rule, but measured at 41k instructions per
//!   order, a third more than everything else the store does.) A count that falls
//!   to 0 stays as a row and is skipped by the readers.
//!
//! All times are unix milliseconds (`INTEGER`). Migrations are the steps of
//! `MIGRATIONS`, step `i` taking `user_version` from `i` to `i + 1`; a file with a
//! newer version than this build knows is refused ([`StateError::NewerSchema`]).
//!
//! # Durability
//! WAL mode with `synchronous = NORMAL` and a large auto-checkpoint (see
//! `WAL_AUTOCHECKPOINT_PAGES`): every transaction is atomic and survives a
//! process crash; a power loss may roll back the last few transactions (never half
//! of one, never out of order). That is safe for polling state: an order's queue
//! position is saved with its admission, and a lost poll is simply polled again.
//! The two export steps, [`StateStore::stage_batch`] and
//! [`StateStore::commit_batch`], run with `synchronous = FULL`, so once a batch's
//! rows are handed to the output writer, the staging (and everything before it) is
//! on disk: a row never lands in two files.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use super::{
    Admission, Batch, DueOrder, NewOrder, OldestUnsettled, OrderKey, PollOutcome, PollRecord,
    QueuePosition, RunRecord, SCHEMA_VERSION, StateError, StateStore, StatusCount, StatusReport,
    row,
};
use crate::model::{Observation, OrderNo, PayDetail, PayStatus, Tracking};
use crate::provider::ProviderKind;

/// How long a statement waits for a SQLite lock held by another connection (only
/// `sqlite3` shells and backups can hold one: paysync itself holds the file lock).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page cache per connection, in KiB (SQLite's negative `cache_size`). Kept small:
/// the OS page cache holds the file anyway, a larger cache grows memory with the
/// number of orders, and SQLite scans the whole cache at every commit (measured:
/// 64 MiB cost 16 % more CPU and 3x the peak RSS at 100k orders than 8 MiB).
const CACHE_KIB: i64 = 8 * 1024;

/// Page size of new state files (existing files keep theirs). Orders are recorded
/// in batches of consecutive rows, so larger pages mean fewer pages, WAL frames and
/// write calls per batch: measured against 4 KiB, 16 KiB made 70 % fewer WAL write
/// calls per order (5,000 orders: 4,337 -> 1,314) for the same instructions.
const PAGE_SIZE: i64 = 16 * 1024;

/// WAL pages written before SQLite checkpoints them into the database (64 MiB at
/// 16 KiB pages). One call of 1000 orders with random order numbers dirties about as
/// many index pages, so SQLite's default (1000) would checkpoint, and fsync, after
/// nearly every call.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 64 * 1024 * 1024 / PAGE_SIZE;

/// The WAL file is truncated to this size after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Prepared statements kept per connection (every statement of this module fits).
const STATEMENT_CACHE: usize = 64;

/// Schema migrations: step `i` takes `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE orders (
        provider         TEXT NOT NULL,
        order_no         TEXT NOT NULL,
        payment_no       TEXT,
        input            TEXT NOT NULL,
        source           TEXT NOT NULL,
        line             INTEGER NOT NULL,
        first_run        TEXT NOT NULL,
        first_seen_at    INTEGER NOT NULL,
        status           TEXT,
        provider_status  TEXT,
        tracking         TEXT NOT NULL DEFAULT 'polling',
        polls            INTEGER NOT NULL DEFAULT 0,
        api_calls        INTEGER NOT NULL DEFAULT 0,
        next_poll_at     INTEGER,
        lease_until      INTEGER,
        last_error       TEXT,
        last_run         TEXT,
        last_observed_at INTEGER,
        observed         TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (provider, order_no)
    );
    CREATE INDEX orders_due ON orders (provider, tracking, next_poll_at);
    CREATE INDEX orders_leased ON orders (lease_until) WHERE lease_until IS NOT NULL;

    CREATE TABLE batches (
        id           INTEGER PRIMARY KEY,
        name         TEXT NOT NULL UNIQUE,
        state        TEXT NOT NULL CHECK (state IN ('staged', 'committed')),
        first_seq    INTEGER NOT NULL,
        last_seq     INTEGER NOT NULL,
        rows         INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        committed_at INTEGER
    );

    CREATE TABLE observations (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        provider TEXT NOT NULL,
        order_no TEXT NOT NULL,
        status   TEXT NOT NULL,
        tracking TEXT NOT NULL,
        row      TEXT NOT NULL
    );

    CREATE TABLE runs (
        run_id      TEXT PRIMARY KEY,
        command     TEXT NOT NULL,
        started_at  INTEGER NOT NULL,
        finished_at INTEGER,
        summary     TEXT
    );

    CREATE TABLE queue_positions (
        path     TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        offset   INTEGER NOT NULL
    );
    ",
    // 2: leaner hot paths. `orders_due` holds only tracked orders, keyed by
    // (provider, next_poll_at): a settled order leaves the index instead of moving
    // within it. `observations` drops AUTOINCREMENT (rows are never deleted, so
    // rowids only grow anyway, without a `sqlite_sequence` write per row) and the
    // columns nothing reads (the row's JSON holds provider, order_no and tracking).
    // `orders.input` becomes the JSON object (from an array of [name, value]
    // pairs), which observation rows take as it is.
    "
    DROP INDEX orders_due;
    CREATE INDEX orders_due ON orders (provider, next_poll_at) WHERE tracking = 'polling';

    CREATE TABLE observations_v2 (
        seq    INTEGER PRIMARY KEY,
        status TEXT NOT NULL,
        row    TEXT NOT NULL
    );
    INSERT INTO observations_v2 (seq, status, row) SELECT seq, status, row FROM observations;
    DROP TABLE observations;
    ALTER TABLE observations_v2 RENAME TO observations;

    UPDATE orders SET input = (
        SELECT json_group_object(value ->> 0, value ->> 1 ORDER BY key)
        FROM json_each(orders.input)
    );
    ",
    // 3: orders counted by (status, tracking) and by (last_run, status), kept up
    // to date by the transactions that change those columns (see `Counts`), so
    // that a status report (each metrics scrape) and a run's summary read a few
    // rows instead of scanning every order. ('' stands for "not polled yet".)
    "
    CREATE TABLE order_counts (
        status   TEXT NOT NULL,
        tracking TEXT NOT NULL,
        n        INTEGER NOT NULL,
        PRIMARY KEY (status, tracking)
    ) WITHOUT ROWID;
    CREATE TABLE run_counts (
        run    TEXT NOT NULL,
        status TEXT NOT NULL,
        n      INTEGER NOT NULL,
        PRIMARY KEY (run, status)
    ) WITHOUT ROWID;
    INSERT INTO order_counts (status, tracking, n)
        SELECT COALESCE(status, ''), tracking, COUNT(*) FROM orders GROUP BY 1, 2;
    INSERT INTO run_counts (run, status, n)
        SELECT last_run, status, COUNT(*) FROM orders
        WHERE last_run IS NOT NULL AND status IS NOT NULL GROUP BY 1, 2;
    ",
];

const _: () = assert!(MIGRATIONS.len() as i64 == SCHEMA_VERSION);

/// Due orders of a provider, earliest first (walks `orders_due`).
const CLAIM_DUE: &str = "SELECT rowid, order_no, payment_no, first_seen_at, polls, status,
            api_calls, observed, input, last_run
     FROM orders
     WHERE provider = ?1 AND tracking = 'polling' AND next_poll_at <= ?2
     ORDER BY next_poll_at";

/// Tracked orders of a provider by next poll time (walks `orders_due`).
const NEXT_DUE: &str = "SELECT rowid, next_poll_at FROM orders
     WHERE provider = ?1 AND tracking = 'polling' AND next_poll_at IS NOT NULL
     ORDER BY next_poll_at";

/// The `status` shown by [`StateStore::status_report`] for orders not polled yet.
const NOT_POLLED: &str = "not_polled";

/// A claimed order (see Leases in the module documentation).
#[derive(Debug)]
struct Lease {
    /// Lease end, unix ms.
    until: i64,
    /// The row as the claim read it, until a record takes it.
    row: Option<ClaimedRow>,
}

/// What recording a poll reads of an order's row.
#[derive(Debug)]
struct ClaimedRow {
    provider: ProviderKind,
    order_no: String,
    api_calls: i64,
    observed: String,
    input: String,
    first_seen_at: i64,
    /// The counted columns (see [`Counts`]).
    counted: Counted,
}

/// An order's columns that `order_counts` and `run_counts` count it by.
#[derive(Debug)]
struct Counted {
    status: Option<PayStatus>,
    tracking: Tracking,
    last_run: Option<String>,
}

/// Changes to `order_counts` and `run_counts` tallied by one write transaction
/// and applied at its end: a few upserts, however many orders it wrote.
#[derive(Default)]
struct Counts {
    orders: Vec<((Option<PayStatus>, Tracking), i64)>,
    runs: Vec<((String, PayStatus), i64)>,
}

impl Counts {
    fn add_order(&mut self, status: Option<PayStatus>, tracking: Tracking, by: i64) {
        match self
            .orders
            .iter_mut()
            .find(|(k, _)| *k == (status, tracking))
        {
            Some((_, n)) => *n += by,
            None => self.orders.push(((status, tracking), by)),
        }
    }

    fn add_run(&mut self, run: &str, status: PayStatus, by: i64) {
        match self
            .runs
            .iter_mut()
            .find(|((r, s), _)| r == run && *s == status)
        {
            Some((_, n)) => *n += by,
            None => self.runs.push(((run.to_owned(), status), by)),
        }
    }

    /// An order counted as `old` is now (`status`, `tracking`), last polled in `run`.
    fn moved(&mut self, old: &Counted, status: PayStatus, tracking: Tracking, run: &str) {
        if (old.status, old.tracking) != (Some(status), tracking) {
            self.add_order(old.status, old.tracking, -1);
            self.add_order(Some(status), tracking, 1);
        }
        if old.status != Some(status) || old.last_run.as_deref() != Some(run) {
            if let (Some(old_run), Some(old_status)) = (&old.last_run, old.status) {
                self.add_run(old_run, old_status, -1);
            }
            self.add_run(run, status, 1);
        }
    }

    fn apply(&self, tx: &Transaction<'_>) -> Result<(), StateError> {
        if self.orders.iter().any(|(_, n)| *n != 0) {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO order_counts (status, tracking, n) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO UPDATE SET n = n + excluded.n",
            )?;
            for ((status, tracking), n) in self.orders.iter().filter(|(_, n)| *n != 0) {
                upsert.execute(params![
                    status.map_or("", PayStatus::as_str),
                    tracking.as_str(),
                    n
                ])?;
            }
        }
        if self.runs.iter().any(|(_, n)| *n != 0) {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO run_counts (run, status, n) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO UPDATE SET n = n + excluded.n",
            )?;
            for ((run, status), n) in self.runs.iter().filter(|(_, n)| *n != 0) {
                upsert.execute(params![run, status.as_str(), n])?;
            }
        }
        Ok(())
    }
}

/// The SQLite state store. See the module documentation for files, schema and
/// durability.
pub struct SqliteStore {
    // Field order is drop order: the connections close before the lock is released.
    /// Every write, and the short reads.
    conn: Mutex<Connection>,
    /// Long reads (exporting a batch, the status report) on their own WAL snapshot,
    /// so that polling goes on while a batch is written out.
    reader: Mutex<Connection>,
    /// Orders claimed and not yet recorded or released, by rowid. Locked only
    /// after `conn` when both are needed.
    leases: Mutex<HashMap<i64, Lease>>,
    path: PathBuf,
    /// The exclusive lock; `None` for a read-only store ([`SqliteStore::open_read_only`]).
    _lock: Option<File>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the state file at `path`: takes the lock file
    /// `<path>.lock`, applies pending migrations and clears leases left by a previous
    /// process.
    pub fn open(path: &Path) -> Result<SqliteStore, StateError> {
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StateError::Open {
            path: path.to_owned(),
            source: e,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| open_err(e.into()))?;
        }

        let lock_path = lock_path(path);
        let lock = owner_only(OpenOptions::new().read(true).write(true).create(true))
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| open_err(e.into()))?;
        set_owner_only(&lock_path).map_err(|e| open_err(e.into()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    path: path.to_owned(),
                    lock: lock_path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(open_err(e.into())),
        }

        // Create the database ourselves so that it is born 0600; SQLite then opens it.
        match owner_only(OpenOptions::new().write(true).create_new(true)).open(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(open_err(e.into())),
        }

        let mut conn = Connection::open(path).map_err(|e| open_err(e.into()))?;
        configure(&conn).map_err(|e| open_err(e.into()))?;
        migrate(&mut conn, path)?;
        conn.execute(
            "UPDATE orders SET lease_until = NULL WHERE lease_until IS NOT NULL",
            [],
        )?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_err(e.into()))?;
        reader
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| open_err(e.into()))?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
            leases: Mutex::default(),
            path: path.to_owned(),
            _lock: Some(lock),
        })
    }

    /// Opens an existing state file for reading only, without taking the lock, so
    /// that `paysync status` works while a run or the daemon owns the state. Writes
    /// through this store fail.
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, StateError> {
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StateError::Open {
            path: path.to_owned(),
            source: e,
        };
        if !path.exists() {
            return Err(open_err(
                "the state file does not exist (nothing has run with this config yet)".into(),
            ));
        }
        let open = || -> Result<Connection, StateError> {
            let c = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| open_err(e.into()))?;
            c.busy_timeout(BUSY_TIMEOUT)
                .map_err(|e| open_err(e.into()))?;
            Ok(c)
        };
        let conn = open()?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StateError::NewerSchema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            return Err(open_err(
                format!("schema version {version} needs migrating: run paysync once").into(),
            ));
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            reader: Mutex::new(open()?),
            leases: Mutex::default(),
            path: path.to_owned(),
            _lock: None,
        })
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection. A panic in another thread cannot leave it mid-transaction
    /// (an unfinished [`Transaction`] rolls back on drop), so poisoning is ignored.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The in-memory leases (see the module documentation).
    fn leases(&self) -> MutexGuard<'_, HashMap<i64, Lease>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in one write transaction (`BEGIN IMMEDIATE`) and commits it.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Like [`Self::write`], but the commit is fsynced (`synchronous = FULL`).
    fn write_synced<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn();
        conn.pragma_update(None, "synchronous", "FULL")?;
        let out = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        out
    }

    /// Runs `f` in one read transaction.
    fn read<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        read_on(&mut self.conn(), f)
    }

    /// Runs `f` in one read transaction on the reader connection: a consistent
    /// snapshot that does not block writes.
    fn read_snapshot<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        read_on(&mut reader, f)
    }
}

fn read_on<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Transaction<'_>) -> Result<T, StateError>,
) -> Result<T, StateError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let out = f(&tx)?;
    tx.commit()?;
    Ok(out)
}

/// `<path>.lock`.
fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Makes files created through `opts` readable by their owner only.
fn owner_only(opts: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// Sets an existing file's mode to 0600.
fn set_owner_only(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Connection settings (see the module documentation for the durability choice).
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Before WAL mode: only an empty file takes it.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            journal_mode = %mode,
            "state file cannot use WAL mode; writes will be slower"
        );
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// Applies the migrations the file lacks, each in its own transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StateError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StateError::NewerSchema {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let done = usize::try_from(found)
        .map_err(|_| StateError::Corrupt(format!("schema version {found} is negative")))?;
    for (from, step) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(ms: i64) -> Result<DateTime<Utc>, StateError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StateError::Corrupt(format!("time {ms} ms is out of range")))
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn parse_status(s: &str) -> Result<PayStatus, StateError> {
    PayStatus::from_name(s).ok_or_else(|| StateError::Corrupt(format!("unknown status {s:?}")))
}

fn parse_tracking(s: &str) -> Result<Tracking, StateError> {
    Tracking::from_name(s).ok_or_else(|| StateError::Corrupt(format!("unknown tracking {s:?}")))
}

fn parse_u32(what: &str, v: i64) -> Result<u32, StateError> {
    u32::try_from(v).map_err(|_| StateError::Corrupt(format!("{what} {v} is out of range")))
}

fn parse_u64(what: &str, v: i64) -> Result<u64, StateError> {
    u64::try_from(v).map_err(|_| StateError::Corrupt(format!("{what} {v} is out of range")))
}

fn to_i64(what: &str, v: u64) -> Result<i64, StateError> {
    i64::try_from(v).map_err(|_| StateError::Corrupt(format!("{what} {v} is too large to store")))
}

/// The text of a column that must hold text.
fn text<'a>(v: ValueRef<'a>, what: &str) -> Result<&'a str, StateError> {
    v.as_str()
        .map_err(|e| StateError::Corrupt(format!("{what}: {e}")))
}

impl StateStore for SqliteStore {
    fn add_orders(
        &self,
        run_id: &str,
        orders: &[NewOrder],
        now: DateTime<Utc>,
        queue: Option<&QueuePosition>,
    ) -> Result<Vec<Admission>, StateError> {
        let now = to_ms(now);
        self.write(|tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO orders (provider, order_no, payment_no, input, source, line,
                                     first_run, first_seen_at, next_poll_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
                 ON CONFLICT (provider, order_no) DO NOTHING",
            )?;
            let mut existing = tx.prepare_cached(
                "SELECT first_run, source, line FROM orders WHERE provider = ?1 AND order_no = ?2",
            )?;
            let mut out = Vec::with_capacity(orders.len());
            let mut counts = Counts::default();
            for o in orders {
                let inserted = insert.execute(params![
                    o.provider.as_str(),
                    o.order_no.as_str(),
                    o.payment_no,
                    o.input.as_str(),
                    &*o.source,
                    to_i64("line", o.line)?,
                    run_id,
                    now,
                ])?;
                if inserted == 1 {
                    out.push(Admission::New);
                    counts.add_order(None, Tracking::Polling, 1);
                    continue;
                }
                let mut rows = existing.query(params![o.provider.as_str(), o.order_no.as_str()])?;
                let row = rows.next()?.ok_or_else(|| {
                    StateError::Corrupt(format!("order {} vanished during insert", o.order_no))
                })?;
                if text(row.get_ref(0)?, "first_run")? == run_id {
                    out.push(Admission::Duplicate {
                        source: text(row.get_ref(1)?, "source")?.to_owned(),
                        line: parse_u64("line", row.get(2)?)?,
                    });
                } else {
                    out.push(Admission::Known);
                }
            }
            counts.apply(tx)?;
            if let Some(q) = queue {
                save_queue_position(tx, q)?;
            }
            Ok(out)
        })
    }

    /// A read, not a write: the leases are kept in memory (see the module
    /// documentation). Leased orders are skipped by rowid before their row is read.
    fn claim_due(
        &self,
        provider: ProviderKind,
        now: DateTime<Utc>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<DueOrder>, StateError> {
        let now = to_ms(now);
        let until = now.saturating_add(duration_ms(lease));
        let mut out = Vec::with_capacity(limit.min(4096));
        if limit == 0 {
            return Ok(out);
        }
        let mut claimed = Vec::with_capacity(limit.min(4096));
        // The connection stays locked until the leases are in the map: a record
        // cannot write a claimed row between its read and its lease.
        let mut conn = self.conn();
        read_on(&mut conn, |tx| {
            // No LIMIT: leased orders are skipped here, and rows are only produced as
            // they are stepped through (the `orders_due` index gives the order).
            let mut due = tx.prepare_cached(CLAIM_DUE)?;
            let leases = self.leases();
            let mut rows = due.query(params![provider.as_str(), now])?;
            while let Some(row) = rows.next()? {
                let rowid: i64 = row.get(0)?;
                if leases.get(&rowid).is_some_and(|l| l.until > now) {
                    continue;
                }
                let order_no = text(row.get_ref(1)?, "order_no")?;
                let order_no = OrderNo::parse(order_no).map_err(|e| {
                    StateError::Corrupt(format!("stored order number {order_no:?}: {e}"))
                })?;
                let status = match row.get_ref(5)? {
                    ValueRef::Null => None,
                    v => Some(parse_status(text(v, "status")?)?),
                };
                let first_seen_at = row.get(3)?;
                claimed.push((
                    rowid,
                    ClaimedRow {
                        provider,
                        order_no: order_no.as_str().to_owned(),
                        api_calls: row.get(6)?,
                        observed: text(row.get_ref(7)?, "observed pairs")?.to_owned(),
                        input: text(row.get_ref(8)?, "input columns")?.to_owned(),
                        first_seen_at,
                        counted: Counted {
                            status,
                            // `CLAIM_DUE` reads tracked orders only.
                            tracking: Tracking::Polling,
                            last_run: row.get(9)?,
                        },
                    },
                ));
                out.push(DueOrder {
                    key: OrderKey(rowid),
                    order_no,
                    payment_no: row.get(2)?,
                    first_seen_at: from_ms(first_seen_at)?,
                    polls: parse_u32("polls", row.get(4)?)?,
                    status,
                });
                if out.len() == limit {
                    break;
                }
            }
            Ok(())
        })?;
        let mut leases = self.leases();
        leases.extend(claimed.into_iter().map(|(rowid, row)| {
            let lease = Lease {
                until,
                row: Some(row),
            };
            (rowid, lease)
        }));
        Ok(out)
    }

    fn next_due_at(&self, provider: ProviderKind) -> Result<Option<DateTime<Utc>>, StateError> {
        self.read(|tx| {
            // Not MIN(): leased orders are skipped, so this walks `orders_due` from the
            // front, past leased orders only.
            let mut stmt = tx.prepare_cached(NEXT_DUE)?;
            let leases = self.leases();
            let mut rows = stmt.query([provider.as_str()])?;
            while let Some(row) = rows.next()? {
                if !leases.contains_key(&row.get::<_, i64>(0)?) {
                    return from_ms(row.get(1)?).map(Some);
                }
            }
            Ok(None)
        })
    }

    fn record_polls(&self, run_id: &str, polls: &[PollRecord]) -> Result<(), StateError> {
        let mut recorded = Vec::with_capacity(polls.len());
        self.write(|tx| {
            let mut load = tx.prepare_cached(
                "SELECT provider, order_no, api_calls, observed, input, first_seen_at,
                        status, tracking, last_run
                 FROM orders WHERE rowid = ?1",
            )?;
            let mut update = tx.prepare_cached(
                "UPDATE orders SET status = ?2, provider_status = ?3, last_error = ?4,
                    polls = polls + 1, api_calls = ?5, tracking = ?6, next_poll_at = ?7,
                    last_run = ?8, last_observed_at = ?9,
                    observed = COALESCE(?10, observed)
                 WHERE rowid = ?1",
            )?;
            let mut observe =
                tx.prepare_cached("INSERT INTO observations (status, row) VALUES (?1, ?2)")?;
            let mut leases = self.leases();
            let mut counts = Counts::default();
            for p in polls {
                let provider = p.provider.as_str();
                let order_no = p.order_no.as_str();
                let status = p.outcome.status();

                // The row as its claim read it (taken: a second record of the order
                // in this call reads what the first wrote), else as it is now.
                let rowid = p.key.0;
                let claimed = leases
                    .get_mut(&rowid)
                    .and_then(|l| l.row.take())
                    .filter(|c| c.provider == p.provider && c.order_no == order_no);
                let stored = match claimed {
                    Some(c) => c,
                    None => {
                        let mut rows = load.query([rowid])?;
                        let row = rows.next()?.filter(|row| {
                            row.get_ref(0).is_ok_and(|v| v.as_str() == Ok(provider))
                                && row.get_ref(1).is_ok_and(|v| v.as_str() == Ok(order_no))
                        });
                        let row = row.ok_or_else(|| {
                            StateError::Corrupt(format!(
                                "poll recorded for order {provider}/{order_no}, which is not registered under key {rowid}"
                            ))
                        })?;
                        ClaimedRow {
                            provider: p.provider,
                            order_no: order_no.to_owned(),
                            api_calls: row.get(2)?,
                            observed: text(row.get_ref(3)?, "observed pairs")?.to_owned(),
                            input: text(row.get_ref(4)?, "input columns")?.to_owned(),
                            first_seen_at: row.get(5)?,
                            counted: Counted {
                                status: match row.get_ref(6)? {
                                    ValueRef::Null => None,
                                    v => Some(parse_status(text(v, "status")?)?),
                                },
                                tracking: parse_tracking(text(row.get_ref(7)?, "tracking")?)?,
                                last_run: row.get(8)?,
                            },
                        }
                    }
                };
                counts.moved(&stored.counted, status, p.tracking, run_id);
                let api_calls = parse_u32("api_calls", stored.api_calls)?.saturating_add(p.attempts);
                // `fresh`: the order's input and first-seen time, when this poll
                // observes a (status, tracking) pair for the first time.
                let fresh = if has_observed(&stored.observed, status, p.tracking) {
                    None
                } else {
                    let mut observed = stored.observed;
                    push_observed_pair(&mut observed, status, p.tracking);
                    Some((stored.input, stored.first_seen_at, observed))
                };

                recorded.push(rowid);

                let (provider_status, error) = match &p.outcome {
                    PollOutcome::Detail(d) => (Some(d.provider_status.as_str()), None),
                    PollOutcome::Failed { reason, .. } => (None, Some(reason.as_str())),
                };
                // A tracked order always has a next poll time: without one it is due
                // at once rather than never.
                let next_poll_at = match p.tracking {
                    Tracking::Polling => Some(to_ms(p.next_poll_at.unwrap_or(p.observed_at))),
                    Tracking::Settled | Tracking::Deadline => None,
                };
                update.execute(params![
                    rowid,
                    status.as_str(),
                    provider_status,
                    error,
                    api_calls,
                    p.tracking.as_str(),
                    next_poll_at,
                    run_id,
                    to_ms(p.observed_at),
                    fresh.as_ref().map(|(_, _, observed)| observed),
                ])?;

                let Some((input, first_seen_at, _)) = fresh else {
                    continue;
                };
                let mut failed = None;
                let row = row::observation_row(
                    &row_fields(p, api_calls, from_ms(first_seen_at)?, &mut failed),
                    &input,
                )
                    .map_err(|e| StateError::Corrupt(format!("observation of {order_no}: {e}")))?;
                observe.execute(params![status.as_str(), row])?;
            }
            counts.apply(tx)
        })?;
        // Released once the records are durable (a failed call keeps its leases).
        let mut leases = self.leases();
        for rowid in recorded {
            leases.remove(&rowid);
        }
        Ok(())
    }

    fn release(&self, orders: &[OrderKey]) -> Result<(), StateError> {
        let mut leases = self.leases();
        for key in orders {
            leases.remove(&key.0);
        }
        Ok(())
    }

    fn stage_batch(&self, name: &str, now: DateTime<Utc>) -> Result<Option<Batch>, StateError> {
        self.write_synced(|tx| {
            let first = next_unstaged_seq(tx)?;
            let (last, rows): (Option<i64>, i64) = tx.query_row(
                "SELECT MAX(seq), COUNT(*) FROM observations WHERE seq >= ?1",
                [first],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let Some(last) = last else {
                return Ok(None);
            };
            tx.execute(
                "INSERT INTO batches (name, state, first_seq, last_seq, rows, created_at)
                 VALUES (?1, 'staged', ?2, ?3, ?4, ?5)",
                params![name, first, last, rows, to_ms(now)],
            )?;
            Ok(Some(Batch {
                id: tx.last_insert_rowid(),
                name: name.to_owned(),
                rows: parse_u64("batch rows", rows)?,
                created_at: from_ms(to_ms(now))?,
            }))
        })
    }

    fn open_batches(&self) -> Result<Vec<Batch>, StateError> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT id, name, rows, created_at FROM batches WHERE state = 'staged' ORDER BY id",
            )?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push(Batch {
                    id: r.get(0)?,
                    name: text(r.get_ref(1)?, "batch name")?.to_owned(),
                    rows: parse_u64("batch rows", r.get(2)?)?,
                    created_at: from_ms(r.get(3)?)?,
                });
            }
            Ok(out)
        })
    }

    /// Streams the rows in `seq` order, on the reader connection: the store's other
    /// methods keep working meanwhile, but `visit` must not call `visit_batch` or
    /// `status_report` (they wait for the reader).
    fn visit_batch(
        &self,
        batch_id: i64,
        visit: &mut dyn FnMut(Observation) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        self.visit_batch_json(batch_id, &mut |json, _| {
            let obs = serde_json::from_str(json)
                .map_err(|e| StateError::Corrupt(format!("observation row: {e}: {json}")))?;
            visit(obs)
        })
    }

    /// The stored row text is the JSON of the observation as serde_json writes
    /// it, which is the JSONL encoding.
    fn visit_batch_json(
        &self,
        batch_id: i64,
        visit: &mut dyn FnMut(&str, PayStatus) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        self.read_snapshot(|tx| {
            let (first, last): (i64, i64) = tx
                .query_row(
                    "SELECT first_seq, last_seq FROM batches WHERE id = ?1",
                    [batch_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .ok_or_else(|| StateError::Corrupt(format!("batch {batch_id} does not exist")))?;
            let mut stmt = tx.prepare_cached(
                "SELECT seq, status, row FROM observations WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
            )?;
            let mut rows = stmt.query([first, last])?;
            while let Some(r) = rows.next()? {
                let seq: i64 = r.get(0)?;
                let status = text(r.get_ref(1)?, "observation status")?;
                let status = PayStatus::from_name(status).ok_or_else(|| {
                    StateError::Corrupt(format!("observation {seq}: unknown status {status:?}"))
                })?;
                visit(text(r.get_ref(2)?, "observation row")?, status)?;
            }
            Ok(())
        })
    }

    fn commit_batch(&self, batch_id: i64, now: DateTime<Utc>) -> Result<(), StateError> {
        self.write_synced(|tx| {
            let changed = tx.execute(
                "UPDATE batches SET state = 'committed', committed_at = ?2 WHERE id = ?1",
                params![batch_id, to_ms(now)],
            )?;
            if changed == 0 {
                return Err(StateError::Corrupt(format!(
                    "batch {batch_id} to commit does not exist"
                )));
            }
            Ok(())
        })
    }

    fn last_commit_at(&self) -> Result<Option<DateTime<Utc>>, StateError> {
        self.read(|tx| {
            let ms: Option<i64> = tx.query_row(
                "SELECT MAX(committed_at) FROM batches WHERE state = 'committed'",
                [],
                |r| r.get(0),
            )?;
            ms.map(from_ms).transpose()
        })
    }

    fn start_run(&self, run_id: &str, command: &str, now: DateTime<Utc>) -> Result<(), StateError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO runs (run_id, command, started_at) VALUES (?1, ?2, ?3)",
                params![run_id, command, to_ms(now)],
            )?;
            Ok(())
        })
    }

    fn finish_run(
        &self,
        run_id: &str,
        now: DateTime<Utc>,
        summary: &serde_json::Value,
    ) -> Result<(), StateError> {
        let summary = summary.to_string();
        self.write(|tx| {
            // A run that was never started is recorded as started when it finished.
            tx.execute(
                "INSERT INTO runs (run_id, command, started_at, finished_at, summary)
                 VALUES (?1, '', ?2, ?2, ?3)
                 ON CONFLICT (run_id) DO UPDATE
                 SET finished_at = excluded.finished_at, summary = excluded.summary",
                params![run_id, to_ms(now), summary],
            )?;
            Ok(())
        })
    }

    fn run_status_counts(&self, run_id: &str) -> Result<Vec<(PayStatus, u64)>, StateError> {
        self.read(|tx| {
            let mut stmt =
                tx.prepare_cached("SELECT status, n FROM run_counts WHERE run = ?1 AND n > 0")?;
            let mut rows = stmt.query([run_id])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push((
                    parse_status(text(r.get_ref(0)?, "status")?)?,
                    parse_u64("count", r.get(1)?)?,
                ));
            }
            out.sort_by_key(|(status, _)| *status);
            Ok(out)
        })
    }

    fn tracked_count(&self, provider: ProviderKind) -> Result<u64, StateError> {
        self.read(|tx| {
            let n: i64 = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM orders WHERE provider = ?1 AND tracking = 'polling'",
                )?
                .query_row([provider.as_str()], |r| r.get(0))?;
            parse_u64("count", n)
        })
    }

    fn status_report(&self, last_runs: usize) -> Result<StatusReport, StateError> {
        self.read_snapshot(|tx| {
            // The first and the last provider of the primary key: two seeks.
            let (first, last): (Option<String>, Option<String>) = tx.query_row(
                "SELECT (SELECT provider FROM orders ORDER BY provider LIMIT 1),
                        (SELECT provider FROM orders ORDER BY provider DESC LIMIT 1)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let provider = first.filter(|f| last.as_ref() == Some(f));

            let mut by_status = Vec::new();
            let mut stmt = tx.prepare(
                "SELECT CASE status WHEN '' THEN ?1 ELSE status END, tracking, n
                 FROM order_counts WHERE n > 0 ORDER BY 1, 2",
            )?;
            let mut rows = stmt.query([NOT_POLLED])?;
            while let Some(r) = rows.next()? {
                by_status.push(StatusCount {
                    status: text(r.get_ref(0)?, "status")?.to_owned(),
                    tracking: text(r.get_ref(1)?, "tracking")?.to_owned(),
                    orders: parse_u64("count", r.get(2)?)?,
                });
            }

            let oldest = tx
                .query_row(
                    "SELECT order_no, COALESCE(status, ?1), first_seen_at, next_poll_at
                     FROM orders WHERE tracking = 'polling'
                     ORDER BY first_seen_at, rowid LIMIT 1",
                    [NOT_POLLED],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                        ))
                    },
                )
                .optional()?;
            let oldest_unsettled = oldest
                .map(|(order_no, status, first_seen_at, next_poll_at)| {
                    Ok::<_, StateError>(OldestUnsettled {
                        order_no,
                        status,
                        first_seen_at: from_ms(first_seen_at)?,
                        next_poll_at: next_poll_at.map(from_ms).transpose()?,
                    })
                })
                .transpose()?;

            // Not exported: rows not staged yet, and rows of staged batches whose
            // file is not committed (an export that failed, e.g. a full disk).
            let unexported: i64 = tx.query_row(
                "SELECT (SELECT COUNT(*) FROM observations WHERE seq >= ?1)
                      + (SELECT COALESCE(SUM(rows), 0) FROM batches WHERE state = 'staged')",
                [next_unstaged_seq(tx)?],
                |r| r.get(0),
            )?;

            let mut runs = Vec::new();
            let mut stmt = tx.prepare(
                "SELECT run_id, command, started_at, finished_at, summary FROM runs
                 ORDER BY started_at DESC, rowid DESC LIMIT ?1",
            )?;
            let mut rows = stmt.query([i64::try_from(last_runs).unwrap_or(i64::MAX)])?;
            while let Some(r) = rows.next()? {
                let run_id: String = r.get(0)?;
                let summary = match r.get_ref(4)? {
                    ValueRef::Null => serde_json::Value::Null,
                    v => serde_json::from_str(text(v, "run summary")?).map_err(|e| {
                        StateError::Corrupt(format!("summary of run {run_id}: {e}"))
                    })?,
                };
                runs.push(RunRecord {
                    command: r.get(1)?,
                    started_at: from_ms(r.get(2)?)?,
                    finished_at: r.get::<_, Option<i64>>(3)?.map(from_ms).transpose()?,
                    summary,
                    run_id,
                });
            }

            let mut queue_positions = Vec::new();
            let mut stmt = tx.prepare_cached(
                "SELECT path, identity, offset FROM queue_positions ORDER BY path",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                queue_positions.push(QueuePosition {
                    path: r.get(0)?,
                    identity: r.get(1)?,
                    offset: parse_u64("queue offset", r.get(2)?)?,
                });
            }

            Ok(StatusReport {
                provider,
                by_status,
                oldest_unsettled,
                unexported_rows: parse_u64("count", unexported)?,
                last_runs: runs,
                queue_positions,
            })
        })
    }

    fn queue_position(&self, path: &str) -> Result<Option<QueuePosition>, StateError> {
        self.read(|tx| {
            let found = tx
                .prepare_cached("SELECT identity, offset FROM queue_positions WHERE path = ?1")?
                .query_row([path], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()?;
            found
                .map(|(identity, offset)| {
                    Ok(QueuePosition {
                        path: path.to_owned(),
                        identity,
                        offset: parse_u64("queue offset", offset)?,
                    })
                })
                .transpose()
        })
    }
}

/// The first observation `seq` not in any batch: batches are consecutive `seq`
/// ranges, and `seq` only grows (rows are never deleted, so SQLite gives each new
/// row the largest rowid plus one).
fn next_unstaged_seq(tx: &Transaction<'_>) -> Result<i64, StateError> {
    let last: Option<i64> = tx
        .prepare_cached("SELECT last_seq FROM batches ORDER BY id DESC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(last.map_or(1, |l| l + 1))
}

fn save_queue_position(tx: &Transaction<'_>, q: &QueuePosition) -> Result<(), StateError> {
    tx.prepare_cached(
        "INSERT INTO queue_positions (path, identity, offset) VALUES (?1, ?2, ?3)
         ON CONFLICT (path) DO UPDATE SET identity = excluded.identity, offset = excluded.offset",
    )?
    .execute(params![
        q.path,
        q.identity,
        to_i64("queue offset", q.offset)?
    ])?;
    Ok(())
}

/// Adds a (status, tracking) pair to an `orders.observed` value: `status/tracking`,
/// space-separated from the pairs before it (neither name contains a space).
fn push_observed_pair(observed: &mut String, status: PayStatus, tracking: Tracking) {
    let (status, tracking) = (status.as_str(), tracking.as_str());
    observed.reserve(status.len() + tracking.len() + 2);
    if !observed.is_empty() {
        observed.push(' ');
    }
    observed.push_str(status);
    observed.push('/');
    observed.push_str(tracking);
}

/// Whether `observed` (an `orders.observed` value) lists the pair, without
/// building its text.
fn has_observed(observed: &str, status: PayStatus, tracking: Tracking) -> bool {
    let pair = (status.as_str(), tracking.as_str());
    observed
        .split(' ')
        .any(|seen| seen.split_once('/') == Some(pair))
}

/// The output row fields of poll `p` of an order with `api_calls` calls so far,
/// borrowed from `p`. A failed poll has no detail: its empty one is put in
/// `failed`, which the fields then borrow.
fn row_fields<'a>(
    p: &'a PollRecord,
    api_calls: u32,
    first_seen_at: DateTime<Utc>,
    failed: &'a mut Option<PayDetail>,
) -> row::RowFields<'a> {
    let status = p.outcome.status();
    let (detail, error) = match &p.outcome {
        PollOutcome::Detail(d) => (d, None),
        PollOutcome::Failed { reason, .. } => (
            &*failed.insert(PayDetail::new("", status)),
            Some(reason.as_str()),
        ),
    };
    row::RowFields {
        provider: p.provider.as_str(),
        order_no: p.order_no.as_str(),
        status,
        settled: p.tracking == Tracking::Settled,
        tracking: p.tracking,
        detail,
        observed_at: p.observed_at,
        first_seen_at,
        polls: api_calls,
        error,
    }
}

/// The output row for poll `p` of an order with `api_calls` calls so far, without
/// its input columns: what [`row_fields`] borrows, as an owned [`Observation`].
#[cfg(test)]
fn observation(p: &PollRecord, api_calls: u32, first_seen_at: DateTime<Utc>) -> Observation {
    let status = p.outcome.status();
    let (d, error) = match &p.outcome {
        PollOutcome::Detail(d) => (d.clone(), None),
        PollOutcome::Failed { reason, .. } => (PayDetail::new("", status), Some(reason.clone())),
    };
    Observation {
        provider: p.provider.as_str().to_owned(),
        order_no: p.order_no.as_str().to_owned(),
        status,
        provider_status: d.provider_status,
        settled: p.tracking == Tracking::Settled,
        tracking: p.tracking,
        amount: d.amount,
        currency: d.currency,
        quote_amount: d.quote_amount,
        quote_currency: d.quote_currency,
        expected_amount: d.expected_amount,
        payment_no: d.payment_no,
        payment_method: d.payment_method,
        tx_hash: d.tx_hash,
        from_address: d.from_address,
        to_address: d.to_address,
        chain_id: d.chain_id,
        paid_account: d.paid_account,
        created_at: d.created_at,
        paid_at: d.paid_at,
        observed_at: p.observed_at,
        first_seen_at,
        polls: api_calls,
        error,
        input: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rusqlite::params_from_iter;
    use tempfile::TempDir;

    const PP: ProviderKind = ProviderKind::PayProtocol;

    /// A fresh store in a temporary directory (kept alive by the returned `TempDir`).
    /// The status report's (status, tracking, orders) rows.
    fn report_counts(s: &SqliteStore) -> Vec<(String, String, u64)> {
        s.status_report(0)
            .unwrap()
            .by_status
            .into_iter()
            .map(|c| (c.status, c.tracking, c.orders))
            .collect()
    }

    fn store() -> (TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state/paysync.db")).unwrap();
        (dir, store)
    }

    /// A fixed instant plus `secs` seconds.
    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn no(s: &str) -> OrderNo {
        OrderNo::parse(s).unwrap()
    }

    fn new_order(order_no: &str, line: u64) -> NewOrder {
        NewOrder {
            provider: PP,
            order_no: no(order_no),
            payment_no: Some(format!("pay-{order_no}")),
            input: crate::model::InputJson::from_columns([
                ("order_no", order_no),
                ("customer", "ACME"),
                ("amount", "=1+1"),
            ]),
            source: "in.csv".into(),
            line,
        }
    }

    fn add(store: &SqliteStore, run: &str, nos: &[&str], now: DateTime<Utc>) -> Vec<Admission> {
        let orders: Vec<_> = nos
            .iter()
            .enumerate()
            .map(|(i, n)| new_order(n, i as u64 + 2))
            .collect();
        store.add_orders(run, &orders, now, None).unwrap()
    }

    /// The key of a registered order (a key no order has for an unknown one).
    fn key(s: &SqliteStore, order_no: &str) -> OrderKey {
        let rowid = s
            .conn()
            .query_row(
                "SELECT rowid FROM orders WHERE provider = ?1 AND order_no = ?2",
                params![PP.as_str(), order_no],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        OrderKey(rowid.unwrap_or(-1))
    }

    /// A successful poll of the registered `order_no` that found `status`.
    fn poll(
        s: &SqliteStore,
        order_no: &str,
        status: PayStatus,
        tracking: Tracking,
        observed: DateTime<Utc>,
    ) -> PollRecord {
        poll_keyed(key(s, order_no), order_no, status, tracking, observed)
    }

    fn poll_keyed(
        key: OrderKey,
        order_no: &str,
        status: PayStatus,
        tracking: Tracking,
        observed: DateTime<Utc>,
    ) -> PollRecord {
        let mut d = PayDetail::new(format!("raw-{}", status.as_str()), status);
        d.amount = Some(crate::model::Amount::parse_decimal("1.000000").unwrap());
        d.currency = Some("USDT".into());
        d.payment_no = Some("P-1".into());
        PollRecord {
            key,
            provider: PP,
            order_no: no(order_no),
            observed_at: observed,
            attempts: 1,
            outcome: PollOutcome::Detail(d),
            tracking,
            next_poll_at: (tracking == Tracking::Polling)
                .then(|| observed + chrono::Duration::seconds(60)),
        }
    }

    fn batch_rows(store: &SqliteStore, id: i64) -> Vec<Observation> {
        let mut rows = Vec::new();
        store
            .visit_batch(id, &mut |o| {
                rows.push(o);
                Ok(())
            })
            .unwrap();
        rows
    }

    /// The lock file makes a second open of the same state fail with `Locked`, even
    /// inside one process (flock locks belong to the open file description); once the
    /// first store is dropped the state opens again.
    #[test]
    fn second_open_is_locked_until_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paysync.db");
        let first = SqliteStore::open(&path).unwrap();
        match SqliteStore::open(&path) {
            Err(StateError::Locked { path: p, lock }) => {
                assert_eq!(p, path);
                assert_eq!(lock, dir.path().join("paysync.db.lock"));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        SqliteStore::open(&path).unwrap();
    }

    /// A state file written by a newer paysync (higher `user_version`) is refused.
    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paysync.db");
        drop(SqliteStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        match SqliteStore::open(&path) {
            Err(StateError::NewerSchema {
                found, supported, ..
            }) => {
                assert_eq!(found, SCHEMA_VERSION + 1);
                assert_eq!(supported, SCHEMA_VERSION);
            }
            other => panic!("expected NewerSchema, got {other:?}"),
        }
    }

    /// `orders.input` as version 1 wrote it: an array of [name, value] pairs.
    const V1_INPUT: &str = r#"[["z","1"],["a","say \"hi\"\\ \u0001\n€"],["",""]]"#;

    /// A version-1 state file, as an older build wrote it, is migrated on open: the
    /// committed and staged observations keep their `seq`, status and JSON, a new
    /// observation is numbered after the last old one, and tracked orders stay due.
    #[test]
    fn version_1_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paysync.db");
        let v1_row = |order: &str, seq: u32| {
            let p = poll_keyed(
                OrderKey(0),
                order,
                PayStatus::Pending,
                Tracking::Polling,
                at(1),
            );
            let mut o = observation(&p, seq, at(0));
            o.input = vec![("order_no".to_owned(), "x".to_owned())];
            serde_json::to_string(&o).unwrap()
        };
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            for (order, tracking, next) in [
                ("A-1", "polling", Some(to_ms(at(10)))),
                ("A-2", "settled", None),
            ] {
                conn.execute(
                    "INSERT INTO orders (provider, order_no, input, source, line, first_run,
                                         first_seen_at, status, tracking, polls, api_calls,
                                         next_poll_at, observed)
                     VALUES ('payprotocol', ?1, ?5, 'in.csv', 2, 'r0',
                             ?2, 'pending', ?3, 1, 1, ?4, 'pending/polling')",
                    params![order, to_ms(at(0)), tracking, next, V1_INPUT],
                )
                .unwrap();
            }
            for (seq, order) in [(1, "A-1"), (2, "A-2"), (3, "A-2")] {
                conn.execute(
                    "INSERT INTO observations (seq, provider, order_no, status, tracking, row)
                     VALUES (?1, 'payprotocol', ?2, 'pending', 'polling', ?3)",
                    params![seq, order, v1_row(order, seq)],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO batches (name, state, first_seq, last_seq, rows, created_at)
                 VALUES ('old', 'staged', 1, 3, 3, 0)",
                [],
            )
            .unwrap();
        }

        let s = SqliteStore::open(&path).unwrap();
        let version: i64 = s
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(
            report_counts(&s),
            [
                ("pending".to_owned(), "polling".to_owned(), 1),
                ("pending".to_owned(), "settled".to_owned(), 1)
            ]
        );
        let old = s.open_batches().unwrap();
        assert_eq!(old.len(), 1);
        let rows = batch_rows(&s, old[0].id);
        let seqs: Vec<_> = rows
            .iter()
            .map(|o| (o.order_no.as_str(), o.polls))
            .collect();
        assert_eq!(seqs, [("A-1", 1), ("A-2", 2), ("A-2", 3)]);
        s.commit_batch(old[0].id, at(20)).unwrap();

        // Only the tracked order is due, through the new partial index.
        let due = s
            .claim_due(PP, at(20), 10, Duration::from_secs(60))
            .unwrap();
        let due: Vec<_> = due.iter().map(|d| d.order_no.as_str()).collect();
        assert_eq!(due, ["A-1"]);
        s.record_polls(
            "r1",
            &[poll(&s, "A-1", PayStatus::Paid, Tracking::Settled, at(21))],
        )
        .unwrap();
        let b = s.stage_batch("new", at(22)).unwrap().unwrap();
        assert_eq!(b.rows, 1);
        let (first, last): (i64, i64) = s
            .conn()
            .query_row(
                "SELECT first_seq, last_seq FROM batches WHERE id = ?1",
                [b.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((first, last), (4, 4));
        let rows = batch_rows(&s, b.id);
        assert_eq!(rows[0].order_no, "A-1");
        assert_eq!(rows[0].status, PayStatus::Paid);
        // The input columns, converted from pairs to an object, keep their order
        // and their text.
        let input: Vec<(&str, &str)> = rows[0]
            .input
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            input,
            [("z", "1"), ("a", "say \"hi\"\\ \u{1}\n€"), ("", "")]
        );
        assert_eq!(s.next_due_at(PP).unwrap(), None);
    }

    /// Claiming walks the partial `orders_due` index in order: no table scan, no
    /// sort (a plan without it would read every order at every claim).
    #[test]
    fn due_queries_walk_the_due_index() {
        let (_dir, s) = store();
        for (sql, plan) in [
            (
                CLAIM_DUE,
                "INDEX orders_due (provider=? AND next_poll_at<?)",
            ),
            (
                NEXT_DUE,
                "COVERING INDEX orders_due (provider=? AND next_poll_at>?)",
            ),
        ] {
            let conn = s.conn();
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let args = ["payprotocol", "0"];
            let found: Vec<String> = stmt
                .query_map(params_from_iter(&args[..stmt.parameter_count()]), |r| {
                    r.get(3)
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(found, [format!("SEARCH orders USING {plan}")], "{sql}");
        }
    }

    /// Reopening a current state file keeps its data and does not re-run migrations.
    #[test]
    fn reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paysync.db");
        let s = SqliteStore::open(&path).unwrap();
        add(&s, "r1", &["A"], at(0));
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.tracked_count(PP).unwrap(), 1);
        assert_eq!(s.path(), path);
    }

    /// The database, its WAL and the lock file are readable by their owner only.
    #[cfg(unix)]
    #[test]
    fn files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, s) = store();
        add(&s, "r1", &["A"], at(0));
        for name in ["paysync.db", "paysync.db.lock", "paysync.db-wal"] {
            let mode = fs::metadata(dir.path().join("state").join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    /// Admission: new orders are `New`; a repeat in the same run is a `Duplicate`
    /// naming where it was first read (also within one call); in a later run, `Known`.
    #[test]
    fn admissions_new_duplicate_known() {
        let (_dir, s) = store();
        assert_eq!(
            add(&s, "r1", &["A", "B", "A"], at(0)),
            vec![
                Admission::New,
                Admission::New,
                Admission::Duplicate {
                    source: "in.csv".into(),
                    line: 2
                }
            ]
        );
        assert_eq!(
            add(&s, "r1", &["B", "C"], at(1)),
            vec![
                Admission::Duplicate {
                    source: "in.csv".into(),
                    line: 3
                },
                Admission::New
            ]
        );
        assert_eq!(
            add(&s, "r2", &["A", "D"], at(2)),
            vec![Admission::Known, Admission::New]
        );
        // The same order number under another provider is another order.
        let mut other = new_order("A", 9);
        other.provider = ProviderKind::GenAuth;
        assert_eq!(
            s.add_orders("r2", &[other], at(3), None).unwrap(),
            vec![Admission::New]
        );
        assert_eq!(s.tracked_count(PP).unwrap(), 4);
        assert_eq!(s.tracked_count(ProviderKind::GenAuth).unwrap(), 1);
    }

    /// A queue file's read position is saved in the same transaction as the orders
    /// read from it, and a later save replaces it.
    #[test]
    fn queue_position_saved_with_orders() {
        let (_dir, s) = store();
        assert_eq!(s.queue_position("queue.txt").unwrap(), None);
        let pos = QueuePosition {
            path: "queue.txt".into(),
            identity: "2049:1234".into(),
            offset: 42,
        };
        s.add_orders("r1", &[new_order("A", 1)], at(0), Some(&pos))
            .unwrap();
        assert_eq!(s.queue_position("queue.txt").unwrap(), Some(pos.clone()));

        let moved = QueuePosition {
            offset: 84,
            ..pos.clone()
        };
        s.add_orders("r1", &[new_order("B", 2)], at(1), Some(&moved))
            .unwrap();
        assert_eq!(s.queue_position("queue.txt").unwrap(), Some(moved.clone()));

        // A failing add (a line number SQLite cannot store) saves neither orders nor
        // the position.
        let bad = NewOrder {
            line: u64::MAX,
            ..new_order("C", 0)
        };
        let further = QueuePosition { offset: 126, ..pos };
        assert!(
            s.add_orders("r1", &[new_order("D", 3), bad], at(2), Some(&further))
                .is_err()
        );
        assert_eq!(s.queue_position("queue.txt").unwrap(), Some(moved));
        assert_eq!(s.tracked_count(PP).unwrap(), 2);
    }

    /// Claiming: due orders come earliest first, up to `limit`; a claimed order is not
    /// claimed again until its lease ends, its poll is recorded or it is released;
    /// `next_due_at` ignores leased orders.
    #[test]
    fn claim_due_leases_orders() {
        let (_dir, s) = store();
        let lease = Duration::from_secs(300);
        add(&s, "r1", &["late"], at(10));
        add(&s, "r1", &["early"], at(0));
        add(&s, "r1", &["mid"], at(5));
        assert_eq!(s.next_due_at(PP).unwrap(), Some(at(0)));
        assert!(s.claim_due(PP, at(-1), 10, lease).unwrap().is_empty());

        let claimed = s.claim_due(PP, at(20), 2, lease).unwrap();
        let names: Vec<_> = claimed.iter().map(|d| d.order_no.as_str()).collect();
        assert_eq!(names, ["early", "mid"]);
        assert_eq!(claimed[0].payment_no.as_deref(), Some("pay-early"));
        assert_eq!(claimed[0].first_seen_at, at(0));
        assert_eq!(claimed[0].polls, 0);
        assert_eq!(claimed[0].status, None);
        assert_eq!(s.next_due_at(PP).unwrap(), Some(at(10)));

        // Leased orders are skipped; the rest is claimed.
        let rest = s.claim_due(PP, at(21), 10, lease).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].order_no.as_str(), "late");
        assert!(s.claim_due(PP, at(22), 10, lease).unwrap().is_empty());
        assert_eq!(s.next_due_at(PP).unwrap(), None);

        // Released: claimable again. Recorded: due at its next poll time.
        s.release(&[key(&s, "late")]).unwrap();
        s.record_polls(
            "r1",
            &[poll(
                &s,
                "early",
                PayStatus::Pending,
                Tracking::Polling,
                at(30),
            )],
        )
        .unwrap();
        assert_eq!(s.next_due_at(PP).unwrap(), Some(at(10)));
        let again = s.claim_due(PP, at(100), 10, lease).unwrap();
        let names: Vec<_> = again.iter().map(|d| d.order_no.as_str()).collect();
        assert_eq!(names, ["late", "early"]);
        assert_eq!(again[1].polls, 1);
        assert_eq!(again[1].status, Some(PayStatus::Pending));

        // "mid" is still leased until at(320); after that it is claimable again.
        assert!(s.claim_due(PP, at(319), 10, lease).unwrap().is_empty());
        let expired = s.claim_due(PP, at(320), 10, lease).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].order_no.as_str(), "mid");
    }

    /// Claiming in pages: each call leases at most `limit` orders, earliest due
    /// first; the next call goes on with the rest (leased orders are skipped, not
    /// counted); no order is handed out twice while leased, and a page released
    /// whole comes back in the same order.
    #[test]
    fn claim_due_pages_without_repeats() {
        let (_dir, s) = store();
        let lease = Duration::from_secs(600);
        let names: Vec<String> = (0..7).map(|i| format!("O{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            add(&s, "r1", &[n.as_str()], at(i as i64));
        }
        let mut pages = Vec::new();
        loop {
            let page = s.claim_due(PP, at(100), 3, lease).unwrap();
            if page.is_empty() {
                break;
            }
            pages.push(
                page.iter()
                    .map(|d| d.order_no.as_str().to_owned())
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(
            pages,
            [vec!["O0", "O1", "O2"], vec!["O3", "O4", "O5"], vec!["O6"]]
        );
        assert_eq!(s.next_due_at(PP).unwrap(), None);
        assert!(s.claim_due(PP, at(100), 0, lease).unwrap().is_empty());

        // The middle page is released unpolled; the others are recorded.
        s.release(&[
            key(&s, "O3"),
            key(&s, "O4"),
            key(&s, "O5"),
            key(&s, "never-added"),
        ])
        .unwrap();
        let done: Vec<_> = ["O0", "O1", "O2", "O6"]
            .iter()
            .map(|n| poll(&s, n, PayStatus::Paid, Tracking::Settled, at(101)))
            .collect();
        s.record_polls("r1", &done).unwrap();
        assert_eq!(s.next_due_at(PP).unwrap(), Some(at(3)));
        let again: Vec<_> = s
            .claim_due(PP, at(102), 10, lease)
            .unwrap()
            .into_iter()
            .map(|d| d.order_no.as_str().to_owned())
            .collect();
        assert_eq!(again, ["O3", "O4", "O5"]);
    }

    /// Leases left by a crashed process are cleared when the state is opened again.
    #[test]
    fn open_clears_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paysync.db");
        let s = SqliteStore::open(&path).unwrap();
        add(&s, "r1", &["A"], at(0));
        assert_eq!(
            s.claim_due(PP, at(1), 10, Duration::from_secs(3600))
                .unwrap()
                .len(),
            1
        );
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.claim_due(PP, at(2), 10, Duration::from_secs(1))
                .unwrap()
                .len(),
            1
        );
    }

    /// One observation row per (status, tracking) pair, ever: polling `pending` twice
    /// gives one row, `confirming` a second, `pending` again none (the pair was
    /// written before), `paid`/`settled` a third; `polls` counts API calls; rows
    /// carry the detail, the input columns in order and the first-seen time.
    #[test]
    fn record_polls_observes_each_pair_once() {
        let (_dir, s) = store();
        add(&s, "r1", &["A"], at(0));
        s.record_polls(
            "r1",
            &[poll(&s, "A", PayStatus::Pending, Tracking::Polling, at(1))],
        )
        .unwrap();
        let mut second = poll(&s, "A", PayStatus::Pending, Tracking::Polling, at(61));
        second.attempts = 3;
        s.record_polls("r1", &[second]).unwrap();
        s.record_polls(
            "r1",
            &[poll(
                &s,
                "A",
                PayStatus::Confirming,
                Tracking::Polling,
                at(91),
            )],
        )
        .unwrap();
        s.record_polls(
            "r1",
            &[poll(
                &s,
                "A",
                PayStatus::Pending,
                Tracking::Polling,
                at(101),
            )],
        )
        .unwrap();
        s.record_polls(
            "r2",
            &[poll(&s, "A", PayStatus::Paid, Tracking::Settled, at(121))],
        )
        .unwrap();
        // A settled order is no longer tracked nor due.
        assert_eq!(s.tracked_count(PP).unwrap(), 0);
        assert_eq!(s.next_due_at(PP).unwrap(), None);

        let batch = s.stage_batch("b1", at(200)).unwrap().unwrap();
        assert_eq!(batch.rows, 3);
        let rows = batch_rows(&s, batch.id);
        let pairs: Vec<_> = rows.iter().map(|o| (o.status, o.tracking)).collect();
        assert_eq!(
            pairs,
            [
                (PayStatus::Pending, Tracking::Polling),
                (PayStatus::Confirming, Tracking::Polling),
                (PayStatus::Paid, Tracking::Settled)
            ]
        );
        let (pending, paid) = (&rows[0], &rows[2]);
        assert_eq!(pending.status, PayStatus::Pending);
        assert_eq!(pending.tracking, Tracking::Polling);
        assert!(!pending.settled);
        assert_eq!(pending.polls, 1);
        assert_eq!(pending.observed_at, at(1));
        assert_eq!(paid.status, PayStatus::Paid);
        assert_eq!(paid.tracking, Tracking::Settled);
        assert!(paid.settled);
        assert_eq!(rows[1].polls, 5, "1 + 3 + 1 API calls");
        assert_eq!(paid.polls, 7, "1 + 3 + 1 + 1 + 1 API calls");
        assert_eq!(paid.provider, "payprotocol");
        assert_eq!(paid.order_no, "A");
        assert_eq!(paid.provider_status, "raw-paid");
        assert_eq!(paid.amount.as_ref().unwrap().as_str(), "1.000000");
        assert_eq!(paid.payment_no.as_deref(), Some("P-1"));
        assert_eq!(paid.first_seen_at, at(0));
        assert_eq!(paid.error, None);
        assert_eq!(paid.input, new_order("A", 0).input.columns());

        // The same pair in a later run (say, a re-poll) writes nothing new.
        s.record_polls(
            "r3",
            &[poll(&s, "A", PayStatus::Paid, Tracking::Settled, at(300))],
        )
        .unwrap();
        assert_eq!(s.stage_batch("b2", at(301)).unwrap(), None);
        assert_eq!(
            s.run_status_counts("r3").unwrap(),
            vec![(PayStatus::Paid, 1)]
        );
        assert!(s.run_status_counts("r1").unwrap().is_empty());
    }

    /// The row written from a poll's borrowed fields is the JSON of the
    /// observation made from it, for a detail, a failure and each tracking state.
    #[test]
    fn rows_are_the_observations_of_their_polls() {
        let detail = poll_keyed(
            OrderKey(7),
            "A-1",
            PayStatus::Paid,
            Tracking::Settled,
            at(5),
        );
        let mut failed = poll_keyed(
            OrderKey(8),
            "A-2",
            PayStatus::Error,
            Tracking::Polling,
            at(6),
        );
        failed.outcome = PollOutcome::Failed {
            status: PayStatus::Error,
            reason: "server error 503 \"quoted\"".into(),
        };
        let mut deadline = poll_keyed(
            OrderKey(9),
            "A-3",
            PayStatus::Pending,
            Tracking::Deadline,
            at(7),
        );
        deadline.next_poll_at = None;
        for p in [detail, failed, deadline] {
            let mut empty = None;
            let row = row::observation_row(&row_fields(&p, 3, at(1), &mut empty), "{}").unwrap();
            assert_eq!(
                row,
                serde_json::to_string(&observation(&p, 3, at(1))).unwrap()
            );
        }
    }

    /// A failed poll is observed as its status with the reason in `error`, no
    /// provider fields, and stays tracked; a deadline is its own observation.
    #[test]
    fn failed_polls_and_deadlines_are_observed() {
        let (_dir, s) = store();
        add(&s, "r1", &["A"], at(0));
        let failed = PollRecord {
            key: key(&s, "A"),
            provider: PP,
            order_no: no("A"),
            observed_at: at(1),
            attempts: 6,
            outcome: PollOutcome::Failed {
                status: PayStatus::Error,
                reason: "server error 503".into(),
            },
            tracking: Tracking::Polling,
            next_poll_at: Some(at(61)),
        };
        s.record_polls("r1", &[failed]).unwrap();
        assert_eq!(s.tracked_count(PP).unwrap(), 1);
        s.record_polls(
            "r1",
            &[poll(
                &s,
                "A",
                PayStatus::Pending,
                Tracking::Deadline,
                at(62),
            )],
        )
        .unwrap();
        assert_eq!(s.tracked_count(PP).unwrap(), 0);

        let batch = s.stage_batch("b1", at(100)).unwrap().unwrap();
        let rows = batch_rows(&s, batch.id);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].status, PayStatus::Error);
        assert_eq!(rows[0].error.as_deref(), Some("server error 503"));
        assert_eq!(rows[0].provider_status, "");
        assert_eq!(rows[0].amount, None);
        assert_eq!(rows[0].polls, 6);
        assert_eq!(rows[1].tracking, Tracking::Deadline);
        assert!(!rows[1].settled);
        assert_eq!(rows[1].polls, 7);
    }

    /// Recording a poll for an order that was never registered, or under another
    /// order's key, fails the whole call and changes nothing.
    #[test]
    fn record_polls_for_unknown_order_fails_atomically() {
        let (_dir, s) = store();
        add(&s, "r1", &["A", "B"], at(0));
        let a = poll(&s, "A", PayStatus::Paid, Tracking::Settled, at(1));
        let ghost = poll(&s, "ghost", PayStatus::Paid, Tracking::Settled, at(1));
        let b_under_a = poll_keyed(a.key, "B", PayStatus::Paid, Tracking::Settled, at(1));
        for bad in [ghost, b_under_a] {
            let err = s.record_polls("r1", &[a.clone(), bad]).unwrap_err();
            assert!(matches!(err, StateError::Corrupt(_)), "{err:?}");
            assert_eq!(s.tracked_count(PP).unwrap(), 2);
            assert_eq!(s.stage_batch("b", at(2)).unwrap(), None);
        }
    }

    /// Records of claimed orders start from the row their claim read, yet see every
    /// write since: an order claimed again after its lease ran out, two polls of one
    /// order in one call, and a call that failed and is repeated each give one
    /// observation row per pair, with every API call counted.
    #[test]
    fn records_of_claimed_orders_see_earlier_records() {
        let (_dir, s) = store();
        let short = Duration::from_secs(1);
        let claim = |now: i64, limit: usize| -> Vec<String> {
            s.claim_due(PP, at(now), limit, short)
                .unwrap()
                .into_iter()
                .map(|d| d.order_no.as_str().to_owned())
                .collect()
        };
        let pending = |n: &str, t: i64| poll(&s, n, PayStatus::Pending, Tracking::Polling, at(t));
        let paid = |n: &str, t: i64| poll(&s, n, PayStatus::Paid, Tracking::Settled, at(t));
        add(&s, "r1", &["A"], at(0));
        add(&s, "r1", &["B"], at(1));
        add(&s, "r1", &["C"], at(2));

        // A: its lease runs out and it is claimed again before either poll is recorded.
        assert_eq!(claim(10, 1), ["A"]);
        assert_eq!(claim(12, 1), ["A"]);
        s.record_polls("r1", &[pending("A", 13)]).unwrap();
        s.record_polls("r1", &[pending("A", 14)]).unwrap();

        // B: two polls recorded in one call.
        assert_eq!(claim(20, 1), ["B"]);
        s.record_polls("r1", &[pending("B", 21), pending("B", 21)])
            .unwrap();

        // C: the first call fails (and keeps the lease); the repeat is recorded once.
        assert_eq!(claim(30, 1), ["C"]);
        let ghost = poll_keyed(
            OrderKey(-1),
            "ghost",
            PayStatus::Paid,
            Tracking::Settled,
            at(31),
        );
        assert!(s.record_polls("r1", &[paid("C", 31), ghost]).is_err());
        assert!(claim(30, 10).is_empty(), "C is still leased");
        s.record_polls("r1", &[paid("C", 31)]).unwrap();

        // A and B are claimed again (their next poll is a minute later) and settle.
        assert_eq!(claim(100, 10), ["A", "B"]);
        s.record_polls("r1", &[paid("A", 101), paid("B", 101)])
            .unwrap();

        let batch = s.stage_batch("b", at(200)).unwrap().unwrap();
        let rows: Vec<_> = batch_rows(&s, batch.id)
            .into_iter()
            .map(|o| (o.order_no, o.status, o.polls))
            .collect();
        let want = [
            ("A", PayStatus::Pending, 1),
            ("B", PayStatus::Pending, 1),
            ("C", PayStatus::Paid, 1),
            ("A", PayStatus::Paid, 3),
            ("B", PayStatus::Paid, 3),
        ]
        .map(|(n, st, polls)| (n.to_owned(), st, polls));
        assert_eq!(rows, want);
        assert_eq!(s.tracked_count(PP).unwrap(), 0);
    }

    /// Export batches: staging takes every unexported row; a staged batch stays open
    /// (listed, visited in the same order every time) until committed; a later stage
    /// takes only rows recorded since; `last_commit_at` tells when the last commit was.
    #[test]
    fn batches_stage_visit_commit() {
        let (_dir, s) = store();
        assert_eq!(s.stage_batch("empty", at(0)).unwrap(), None);
        add(&s, "r1", &["A", "B", "C"], at(0));
        let polls: Vec<_> = ["A", "B", "C"]
            .iter()
            .map(|n| poll(&s, n, PayStatus::Pending, Tracking::Polling, at(1)))
            .collect();
        s.record_polls("r1", &polls).unwrap();

        let b1 = s.stage_batch("paysync-r1", at(2)).unwrap().unwrap();
        assert_eq!(b1.name, "paysync-r1");
        assert_eq!(b1.rows, 3);
        assert_eq!(b1.created_at, at(2));
        assert_eq!(s.open_batches().unwrap(), vec![b1.clone()]);
        let first = batch_rows(&s, b1.id);
        assert_eq!(
            first
                .iter()
                .map(|o| o.order_no.as_str())
                .collect::<Vec<_>>(),
            ["A", "B", "C"]
        );
        assert_eq!(batch_rows(&s, b1.id), first, "visiting is repeatable");
        // The JSON visit hands over exactly the JSONL encoding of the same rows.
        let mut json = Vec::new();
        s.visit_batch_json(b1.id, &mut |text, status| {
            json.push((text.to_owned(), status));
            Ok(())
        })
        .unwrap();
        let want: Vec<_> = first
            .iter()
            .map(|o| (serde_json::to_string(o).unwrap(), o.status))
            .collect();
        assert_eq!(json, want);
        // Staged is not exported: the rows count until their batch is committed.
        assert_eq!(s.status_report(0).unwrap().unexported_rows, 3);

        // New rows while b1 is open go to the next batch, not to b1.
        s.record_polls(
            "r2",
            &[poll(&s, "B", PayStatus::Paid, Tracking::Settled, at(3))],
        )
        .unwrap();
        assert_eq!(s.status_report(0).unwrap().unexported_rows, 4);
        assert_eq!(s.last_commit_at().unwrap(), None);
        s.commit_batch(b1.id, at(4)).unwrap();
        assert_eq!(s.status_report(0).unwrap().unexported_rows, 1);
        assert_eq!(s.last_commit_at().unwrap(), Some(at(4)));
        assert!(s.open_batches().unwrap().is_empty());

        let b2 = s.stage_batch("paysync-r2", at(5)).unwrap().unwrap();
        assert_eq!(b2.rows, 1);
        let rows = batch_rows(&s, b2.id);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].order_no.as_str(), rows[0].status),
            ("B", PayStatus::Paid)
        );
        assert_eq!(s.open_batches().unwrap(), vec![b2.clone()]);
        s.commit_batch(b2.id, at(6)).unwrap();
        assert_eq!(s.stage_batch("paysync-r3", at(7)).unwrap(), None);

        // Committing a batch that does not exist is an error, not a silent no-op.
        assert!(s.commit_batch(999, at(8)).is_err());
    }

    /// Exporting does not stop polling: while a batch is visited, orders can be
    /// added and polls recorded, and the batch's rows stay exactly what was staged.
    #[test]
    fn polling_continues_during_visit() {
        let (_dir, s) = store();
        add(&s, "r1", &["A", "B"], at(0));
        s.record_polls(
            "r1",
            &[poll(&s, "A", PayStatus::Pending, Tracking::Polling, at(1))],
        )
        .unwrap();
        let b = s.stage_batch("b", at(2)).unwrap().unwrap();
        let mut seen = Vec::new();
        s.visit_batch(b.id, &mut |o| {
            add(&s, "r1", &["C"], at(3));
            s.record_polls(
                "r1",
                &[poll(&s, "B", PayStatus::Paid, Tracking::Settled, at(3))],
            )?;
            seen.push(o.order_no);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, ["A"]);
        assert_eq!(batch_rows(&s, b.id).len(), 1);
        // A's staged row and B's new one.
        assert_eq!(s.status_report(0).unwrap().unexported_rows, 2);
    }

    /// A visitor's error stops the visit and is returned as is.
    #[test]
    fn visit_batch_stops_on_visitor_error() {
        let (_dir, s) = store();
        add(&s, "r1", &["A", "B"], at(0));
        s.record_polls(
            "r1",
            &[
                poll(&s, "A", PayStatus::Paid, Tracking::Settled, at(1)),
                poll(&s, "B", PayStatus::Paid, Tracking::Settled, at(1)),
            ],
        )
        .unwrap();
        let b = s.stage_batch("b", at(2)).unwrap().unwrap();
        let mut seen = 0;
        let err = s
            .visit_batch(b.id, &mut |_| {
                seen += 1;
                Err(StateError::Corrupt("disk full".into()))
            })
            .unwrap_err();
        assert!(matches!(err, StateError::Corrupt(m) if m == "disk full"));
        assert_eq!(seen, 1);
    }

    /// The kept counts equal a full scan of `orders` after every kind of change:
    /// new orders (and known ones read again), polls that change status, tracking
    /// or run, a poll that changes none of them, later runs polling again, and
    /// records of claimed orders (from their lease) as well as unclaimed ones.
    #[test]
    fn counts_follow_every_change() {
        /// (text, text, count) rows of `sql`.
        fn triples(conn: &Connection, sql: &str) -> Vec<(String, String, u64)> {
            conn.prepare(sql)
                .unwrap()
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
        fn check(s: &SqliteStore) {
            let conn = s.conn();
            let scan = triples(
                &conn,
                "SELECT COALESCE(status, 'not_polled'), tracking, COUNT(*) FROM orders
                 GROUP BY 1, 2 ORDER BY 1, 2",
            );
            let runs = triples(
                &conn,
                "SELECT last_run, status, COUNT(*) FROM orders
                 WHERE last_run IS NOT NULL AND status IS NOT NULL
                 GROUP BY 1, 2 ORDER BY 1, 2",
            );
            drop(conn);
            assert_eq!(report_counts(s), scan);
            let mut counted = Vec::new();
            for run in ["r1", "r2", "r3"] {
                for (status, n) in s.run_status_counts(run).unwrap() {
                    counted.push((run.to_owned(), status.as_str().to_owned(), n));
                }
            }
            counted.sort();
            assert_eq!(counted, runs);
        }
        use PayStatus::{Confirming, Failed, Paid, Pending};
        use Tracking::{Polling, Settled};
        let (_dir, s) = store();
        check(&s);
        s.start_run("r1", "run", at(0)).unwrap();
        add(&s, "r1", &["A", "B", "C", "D"], at(0));
        check(&s);
        let polls = |run: &str, polls: &[(&str, PayStatus, Tracking)], t: i64| {
            let records: Vec<_> = polls
                .iter()
                .map(|&(o, status, tracking)| poll(&s, o, status, tracking, at(t)))
                .collect();
            s.record_polls(run, &records).unwrap();
            check(&s);
        };
        polls(
            "r1",
            &[
                ("A", Paid, Settled),
                ("B", Pending, Polling),
                ("C", Pending, Polling),
            ],
            1,
        );
        polls(
            "r1",
            &[("B", Pending, Polling), ("C", Confirming, Polling)],
            2,
        );
        s.start_run("r2", "run", at(3)).unwrap();
        polls(
            "r2",
            &[
                ("B", Paid, Settled),
                ("C", Confirming, Polling),
                ("D", Failed, Settled),
            ],
            4,
        );
        assert_eq!(s.run_status_counts("r1").unwrap(), [(Paid, 1)]);
        // Claimed orders are recorded from their lease's copy of the row.
        s.start_run("r3", "run", at(5)).unwrap();
        add(&s, "r3", &["E", "A"], at(5));
        check(&s);
        let claimed = s
            .claim_due(PP, at(100), 10, Duration::from_secs(60))
            .unwrap();
        let mut claimed: Vec<_> = claimed.iter().map(|d| d.order_no.as_str()).collect();
        claimed.sort();
        assert_eq!(claimed, ["C", "E"]);
        polls("r3", &[("C", Paid, Settled), ("E", Pending, Polling)], 6);
        polls("r3", &[("E", Pending, Polling)], 7);
        assert_eq!(
            s.run_status_counts("r3").unwrap(),
            [(Pending, 1), (Paid, 1)]
        );
    }

    /// The status report: orders by status and tracking (unpolled ones as
    /// `not_polled`), the oldest tracked order, unexported rows and the last runs,
    /// newest first with their summaries.
    #[test]
    fn status_report_summarizes_state() {
        let (_dir, s) = store();
        s.start_run("r1", "run", at(0)).unwrap();
        add(&s, "r1", &["old"], at(0));
        add(&s, "r1", &["A", "B", "C"], at(10));
        s.record_polls(
            "r1",
            &[
                poll(&s, "A", PayStatus::Paid, Tracking::Settled, at(11)),
                poll(&s, "B", PayStatus::Paid, Tracking::Settled, at(11)),
                poll(&s, "C", PayStatus::Pending, Tracking::Polling, at(11)),
            ],
        )
        .unwrap();
        s.finish_run("r1", at(20), &serde_json::json!({"exit_code": 0}))
            .unwrap();
        s.start_run("r2", "daemon", at(30)).unwrap();

        let r = s.status_report(5).unwrap();
        assert_eq!(r.provider.as_deref(), Some("payprotocol"));
        let counts: Vec<_> = r
            .by_status
            .iter()
            .map(|c| (c.status.as_str(), c.tracking.as_str(), c.orders))
            .collect();
        assert_eq!(
            counts,
            [
                ("not_polled", "polling", 1),
                ("paid", "settled", 2),
                ("pending", "polling", 1)
            ]
        );
        let oldest = r.oldest_unsettled.unwrap();
        assert_eq!(oldest.order_no, "old");
        assert_eq!(oldest.status, "not_polled");
        assert_eq!(oldest.first_seen_at, at(0));
        assert_eq!(oldest.next_poll_at, Some(at(0)));
        assert_eq!(r.unexported_rows, 3);
        let runs: Vec<_> = r.last_runs.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(runs, ["r2", "r1"]);
        assert_eq!(r.last_runs[0].command, "daemon");
        assert_eq!(r.last_runs[0].finished_at, None);
        assert_eq!(r.last_runs[0].summary, serde_json::Value::Null);
        assert_eq!(r.last_runs[1].finished_at, Some(at(20)));
        assert_eq!(r.last_runs[1].summary["exit_code"], 0);

        assert_eq!(s.status_report(1).unwrap().last_runs.len(), 1);
        assert_eq!(
            s.run_status_counts("r1").unwrap(),
            vec![(PayStatus::Pending, 1), (PayStatus::Paid, 2)]
        );
    }

    /// Time spent: wall clock and this thread's time on a CPU (Linux schedstat),
    /// which stays meaningful on a loaded machine.
    #[derive(Default, Clone, Copy)]
    struct Spent {
        wall: Duration,
        cpu: Duration,
    }

    fn thread_cpu() -> Duration {
        fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    }

    fn timed<T>(spent: &mut Spent, f: impl FnOnce() -> T) -> T {
        let (wall, cpu) = (std::time::Instant::now(), thread_cpu());
        let out = f();
        spent.wall += wall.elapsed();
        spent.cpu += thread_cpu().saturating_sub(cpu);
        out
    }

    fn report(what: &str, spent: Spent, n: usize) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "{what:>32}: {:6.2} µs/order wall, {:6.2} µs/order cpu",
            per(spent.wall),
            per(spent.cpu)
        );
    }

    /// Throughput at scale: per-order cost of each call with batches of 1000 orders
    /// (random order numbers). Run with `cargo test --release --lib
    /// state::sqlite::tests::per_order_cost -- --ignored --nocapture`;
    /// `PAYSYNC_BENCH_ORDERS` sets the order count.
    #[test]
    #[ignore = "benchmark"]
    fn per_order_cost() {
        let n: usize = std::env::var("PAYSYNC_BENCH_ORDERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let chunk = 1000;
        let (_dir, s) = store();
        // 7919 is prime: a permutation of 0..n unless n is a multiple of it.
        let names: Vec<String> = (0..n)
            .map(|i| format!("ORD-{:09}", (i * 7919) % n))
            .collect();

        let mut spent = Spent::default();
        for (c, names) in names.chunks(chunk).enumerate() {
            let orders: Vec<_> = names.iter().map(|n| new_order(n, c as u64)).collect();
            timed(&mut spent, || s.add_orders("bench", &orders, at(0), None)).unwrap();
        }
        report("add_orders", spent, n);

        for (round, status, tracking) in [
            (1, PayStatus::Pending, Tracking::Polling),
            (2, PayStatus::Pending, Tracking::Polling),
            (3, PayStatus::Paid, Tracking::Settled),
        ] {
            let now = at(round * 1000);
            let (mut claim, mut record) = (Spent::default(), Spent::default());
            loop {
                let due = timed(&mut claim, || {
                    s.claim_due(PP, now, chunk, Duration::from_secs(60))
                })
                .unwrap();
                if due.is_empty() {
                    break;
                }
                let polls: Vec<_> = due
                    .iter()
                    .map(|d| poll_keyed(d.key, d.order_no.as_str(), status, tracking, now))
                    .collect();
                timed(&mut record, || s.record_polls("bench", &polls)).unwrap();
            }
            report(&format!("round {round} claim_due"), claim, n);
            report(
                &format!("round {round} record_polls {status}/{tracking}"),
                record,
                n,
            );
        }

        let mut spent = Spent::default();
        let b = timed(&mut spent, || s.stage_batch("bench", at(9999)))
            .unwrap()
            .unwrap();
        report("stage_batch", spent, n);
        assert_eq!(b.rows as usize, 2 * n);
        let mut spent = Spent::default();
        let mut rows = 0;
        timed(&mut spent, || {
            s.visit_batch(b.id, &mut |_| {
                rows += 1;
                Ok(())
            })
        })
        .unwrap();
        report("visit_batch (2 rows/order)", spent, n);
        assert_eq!(rows, 2 * n);
        let mut spent = Spent::default();
        timed(&mut spent, || {
            s.status_report(10).unwrap();
            s.run_status_counts("bench").unwrap();
        });
        report("status_report+run_status_counts", spent, n);
    }
}
