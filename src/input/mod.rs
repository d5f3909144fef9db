//! Reading order numbers from input files: CSV files and queue files (one order
//! number per line), streamed row by row, plus the rejects file for rows that
//! cannot be used.
//!
//! - [`InputKind`] / [`InputSpec`]: which file to read and how (CSV column names).
//! - [`open`]: a streaming iterator of [`InputRecord`]s over one file ([`Records`]);
//!   memory does not grow with the number of rows.
//! - [`InputRecord`]: one row with its source, line, raw text, CSV columns, and
//!   either a validated order number or the [`RejectReason`].
//! - [`InputError`]: fatal errors (the file cannot be read at all); a bad row is
//!   never fatal, it is rejected.
//! - [`read_queue_from`] / [`QueueChunk`]: tailing a queue file from a durable
//!   byte offset (daemon mode); [`match_identity`] tells whether a saved offset
//!   still belongs to the file found (see `identity`).
//! - [`is_empty_file`]: whether a file holds nothing but a BOM and whitespace.
//! - [`RejectsWriter`]: writes `rejects-<run id>.csv`, created only when needed;
//!   [`recover_rejects`] publishes what a crashed writer left.

mod csv;
mod identity;
mod queue;
mod rejects;

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::{InputJson, InvalidOrderNo, OrderNo};

pub use self::csv::CsvRecords;
pub use self::identity::{
    HEAD_BYTES, IdentityMatch, QueueBacklog, QueueFileState, match_identity, queue_backlog,
    queue_identity, same_head, same_head_in,
};
pub use self::queue::{
    MAX_QUEUE_LINE, QueueChunk, QueueRecords, compressed_queue_from, decompressed, read_open_queue,
    read_queue_from, read_queue_from_line,
};
pub use self::rejects::{
    REJECTS_HEADER, Recovered, RejectsWriter, recover as recover_rejects, rejects_file_name,
};

/// The CSV column holding the order number when the config does not say.
pub const DEFAULT_ORDER_COLUMN: &str = "order_no";

/// How an input file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A CSV file with a header row.
    Csv,
    /// One order number per line; `#` comments and blank lines are skipped.
    Queue,
}

impl InputKind {
    /// A path ending in `.csv` (any case) is CSV; anything else is a queue file.
    pub fn of(path: &Path) -> Self {
        let name = path.as_os_str().as_encoded_bytes();
        let is_csv = name.len() >= 4 && name[name.len() - 4..].eq_ignore_ascii_case(b".csv");
        if is_csv {
            InputKind::Csv
        } else {
            InputKind::Queue
        }
    }
}

/// One input file to read, with the CSV column names from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub path: PathBuf,
    /// CSV column holding the order number (`input.column`).
    pub column: String,
    /// CSV column holding the payment order number (`input.payment_no_column`).
    /// When the file has no such column, every row's payment number is `None`.
    pub payment_no_column: Option<String>,
}

impl InputSpec {
    /// A spec with the default order column and no payment number column.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            column: DEFAULT_ORDER_COLUMN.to_owned(),
            payment_no_column: None,
        }
    }

    pub fn kind(&self) -> InputKind {
        InputKind::of(&self.path)
    }
}

/// A validated order number and its payment number (`None` when absent or empty).
pub type ParsedOrder = (OrderNo, Option<String>);

/// One input row: where it came from, its raw text, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    /// The input path as given (display form), shared by every row of the file.
    pub source: Arc<str>,
    /// 1-based line number where the row starts (CSV: the header is line 1).
    pub line: u64,
    /// The row's raw text without its line terminator (lossy UTF-8).
    pub raw: String,
    /// Every CSV column (name, value) in header order, as the JSON object stored
    /// with the order; empty for queue lines and for CSV rows that are not valid
    /// UTF-8 or have the wrong number of fields.
    pub input: InputJson,
    /// The order (and payment) number, or why the row cannot be used.
    pub parsed: Result<ParsedOrder, RejectReason>,
}

/// Why an input row cannot be used; the text goes into the rejects file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("row is not valid UTF-8")]
    NotUtf8,
    #[error("row has {found} fields, header has {expected}")]
    FieldCount { found: usize, expected: usize },
    #[error("malformed CSV row: {0}")]
    Malformed(String),
    #[error("line is longer than {max} bytes")]
    LineTooLong { max: usize },
    #[error("{0}")]
    OrderNo(#[from] InvalidOrderNo),
}

/// Fatal input errors: the file as a whole cannot be read. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot open input file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("input path {path} is a directory, not a file")]
    NotAFile { path: PathBuf },
    #[error("column {column:?} not found in {path} (columns: {})", available.join(", "))]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: Vec<String>,
    },
    #[error("column {column:?} appears more than once in the header of {path}")]
    DuplicateHeader { path: PathBuf, column: String },
    #[error("cannot read input file {path} at line {line}")]
    Read {
        path: PathBuf,
        line: u64,
        #[source]
        source: io::Error,
    },
}

/// The rows of one input file, streamed. Built by [`open`].
#[derive(Debug)]
pub enum Records {
    Csv(CsvRecords),
    Queue(QueueRecords),
    /// The file holds no rows at all (empty, or only a BOM and whitespace).
    Empty,
}

impl Records {
    /// The CSV header's column names (trimmed, in file order); empty for queue
    /// files and empty files.
    pub fn header(&self) -> &[String] {
        match self {
            Records::Csv(r) => r.header(),
            Records::Queue(_) | Records::Empty => &[],
        }
    }
}

impl Iterator for Records {
    type Item = Result<InputRecord, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Records::Csv(r) => r.next(),
            Records::Queue(r) => r.next(),
            Records::Empty => None,
        }
    }
}

/// Opens an input file for streaming. Fails when the file cannot be opened, is a
/// directory, or (CSV) its header lacks the order column or repeats a column name.
/// An empty file yields no records and no error; see [`is_empty_file`] to warn.
pub fn open(spec: &InputSpec) -> Result<Records, InputError> {
    let file = open_file(&spec.path)?;
    match spec.kind() {
        InputKind::Csv => Ok(CsvRecords::new(spec, file)?.map_or(Records::Empty, Records::Csv)),
        InputKind::Queue => Ok(Records::Queue(QueueRecords::new(&spec.path, file))),
    }
}

/// Opens `path` for reading, refusing directories.
fn open_file(path: &Path) -> Result<File, InputError> {
    let open_err = |source| InputError::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    if file.metadata().map_err(open_err)?.is_dir() {
        return Err(InputError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Whether `path` holds no data: zero bytes, or only a UTF-8 BOM and whitespace.
/// Reads until the first byte that is not whitespace.
pub fn is_empty_file(path: &Path) -> io::Result<bool> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut first = true;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(true);
        }
        let mut rest = buf;
        if first {
            first = false;
            if let Some(after) = rest.strip_prefix(b"\xEF\xBB\xBF") {
                rest = after;
            }
        }
        if !rest.iter().all(u8::is_ascii_whitespace) {
            return Ok(false);
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// Builds the parsed value of a row from its order and payment cells.
fn parse_order(order: &str, payment: Option<&str>) -> Result<ParsedOrder, RejectReason> {
    let order_no = OrderNo::parse(order)?;
    let payment_no = payment
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    Ok((order_no, payment_no))
}

/// Strips one trailing `\n` or `\r\n` (and a lone trailing `\r`).
fn strip_line_end(mut bytes: &[u8]) -> &[u8] {
    if let Some(b) = bytes.strip_suffix(b"\n") {
        bytes = b;
    }
    if let Some(b) = bytes.strip_suffix(b"\r") {
        bytes = b;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes `bytes` to a file named `name` in a fresh temporary directory.
    pub(crate) fn write_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        (dir, path)
    }

    /// `.csv` in any case means CSV; everything else is a queue file.
    #[test]
    fn kind_by_extension() {
        assert_eq!(InputKind::of(Path::new("a/orders.csv")), InputKind::Csv);
        assert_eq!(InputKind::of(Path::new("ORDERS.CSV")), InputKind::Csv);
        assert_eq!(InputKind::of(Path::new("orders.Csv")), InputKind::Csv);
        assert_eq!(InputKind::of(Path::new("queue.txt")), InputKind::Queue);
        assert_eq!(InputKind::of(Path::new("queue")), InputKind::Queue);
        assert_eq!(InputKind::of(Path::new("csv")), InputKind::Queue);
        assert_eq!(InputKind::of(Path::new("orders.csv.bak")), InputKind::Queue);
    }

    /// Empty means no bytes, or only a BOM and whitespace.
    #[test]
    fn empty_file_detection() {
        for (bytes, empty) in [
            (&b""[..], true),
            (b"\xEF\xBB\xBF", true),
            (b" \r\n\n\t ", true),
            (b"\xEF\xBB\xBF\n\n", true),
            (b"\n\nx", false),
            (b"order_no\n", false),
        ] {
            let (_dir, path) = write_file("f.csv", bytes);
            assert_eq!(is_empty_file(&path).unwrap(), empty, "{bytes:?}");
        }
    }

    /// An empty CSV or queue file yields no records and no error.
    #[test]
    fn empty_files_yield_nothing() {
        for name in ["e.csv", "e.txt"] {
            for bytes in [&b""[..], b"\xEF\xBB\xBF", b"\n \r\n  \n"] {
                let (_dir, path) = write_file(name, bytes);
                let recs: Vec<_> = open(&InputSpec::new(&path)).unwrap().collect();
                assert!(recs.is_empty(), "{name} {bytes:?}: {recs:?}");
            }
        }
    }

    /// A missing file and a directory are fatal errors naming the path.
    #[test]
    fn missing_file_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.csv");
        let err = open(&InputSpec::new(&missing)).unwrap_err();
        assert!(matches!(err, InputError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.csv"));

        let err = open(&InputSpec::new(dir.path())).unwrap_err();
        assert!(matches!(err, InputError::NotAFile { .. }), "{err:?}");
    }

    /// Records can be moved to a blocking thread.
    #[test]
    fn records_are_send() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<Records>();
        assert_send::<InputRecord>();
        assert_send::<RejectsWriter>();
        assert_send::<InputError>();
    }

    /// The CSV header is available to the caller after opening.
    #[test]
    fn header_is_exposed() {
        let (_dir, path) = write_file("o.csv", b"\xEF\xBB\xBF order_no , note\nA1,x\n");
        assert_eq!(
            open(&InputSpec::new(&path)).unwrap().header(),
            ["order_no", "note"]
        );
        let (_dir, path) = write_file("q.txt", b"A1\n");
        assert!(open(&InputSpec::new(&path)).unwrap().header().is_empty());
    }
}
