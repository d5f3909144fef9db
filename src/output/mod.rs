//! Output files: observation rows written as JSONL or CSV, committed atomically
//! (temporary name, fsync, rename, fsync directory) and then described by a
//! manifest, so a reader that only picks up files with a manifest never sees a
//! partial file.
//!
//! - [`Format`]: `jsonl` or `csv`.
//! - [`FileWriter`]: streams rows into one data file, hashing as it writes, and
//!   commits it with its [`Manifest`].
//! - [`Manifest`] / [`ManifestExtra`]: `<name>.manifest.json`; [`read_manifest`],
//!   [`verify`] (hash and row count match), [`manifest_path`].
//! - [`remove_uncommitted`]: crash recovery for a file that never got its manifest.
//! - [`write_atomic`] / [`fsync_dir`]: the durable-write primitives.
//! - [`escape_formula`]: the CSV formula escaping shared with the rejects file.

mod atomic;
mod csv;
mod encode;
mod jsonl;
pub mod layout;
mod manifest;
#[cfg(feature = "parquet")]
mod parquet;

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Observation, PayStatus};

pub(crate) use self::atomic::{FILE_MODE, create_private_file, fsync_dir_io, temp_path};
pub use self::atomic::{fsync_dir, remove_uncommitted, write_atomic};
pub use self::csv::{csv_header, escape_formula};
pub(crate) use self::csv::{csv_to_io, escape_formula_into};
pub use self::encode::decoder;
pub use self::manifest::{Manifest, ManifestExtra, manifest_path, read_manifest, verify};

use self::atomic::HashingWriter;
use self::csv::CsvSink;
use self::encode::TextEncoder;
use self::jsonl::JsonlSink;

/// Buffer size of data file writers: large writes, few syscalls.
pub const WRITE_BUFFER: usize = 256 * 1024;

/// The data file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
    /// Typed columnar file (the `parquet` cargo feature, on by default).
    Parquet,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Jsonl, Format::Csv, Format::Parquet];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        }
    }

    /// The data file's extension, without the dot and without a compression suffix.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }

    /// Whether this build can write the format.
    pub fn is_supported(self) -> bool {
        self != Format::Parquet || cfg!(feature = "parquet")
    }

    /// The compression used when the config names none: `zstd` inside Parquet
    /// files, none for text.
    pub fn default_compression(self) -> Compression {
        match self {
            Format::Parquet => Compression::Zstd,
            Format::Jsonl | Format::Csv => Compression::None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name other than `jsonl`, `csv` or `parquet`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown output format {0:?} (expected \"jsonl\", \"csv\" or \"parquet\")")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            "parquet" => Ok(Format::Parquet),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

/// How a data file is compressed. Text files (JSONL, CSV) are compressed as a
/// whole stream and get a suffix (`.jsonl.gz`, `.csv.zst`); Parquet compresses
/// its pages inside the file and keeps the `.parquet` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// Parquet only.
    Snappy,
}

impl Compression {
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Snappy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Snappy => "snappy",
        }
    }

    /// The file name suffix of a compressed text file, without the dot.
    fn text_suffix(self) -> Option<&'static str> {
        match self {
            Compression::None | Compression::Snappy => None,
            Compression::Gzip => Some("gz"),
            Compression::Zstd => Some("zst"),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not \"none\", \"gzip\", \"zstd\" or \"snappy\""))
    }
}

/// A format with its compression: what a data file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encoding {
    pub format: Format,
    pub compression: Compression,
}

impl Encoding {
    /// `format` with its default compression.
    pub fn new(format: Format) -> Self {
        Self {
            format,
            compression: format.default_compression(),
        }
    }

    /// `format` with `compression`; `Err` says why the pair is not possible
    /// (snappy for text, or a format this build lacks).
    pub fn with(format: Format, compression: Compression) -> Result<Self, String> {
        if !format.is_supported() {
            return Err(format!(
                "this paysync was built without the {format} cargo feature"
            ));
        }
        Self::pair(format, compression)
    }

    /// The pair, whatever this build supports: only snappy is refused for text.
    fn pair(format: Format, compression: Compression) -> Result<Self, String> {
        if compression == Compression::Snappy && format != Format::Parquet {
            return Err(format!(
                "snappy is only available for parquet; {format} takes \"none\", \"gzip\" or \"zstd\""
            ));
        }
        Ok(Self {
            format,
            compression,
        })
    }

    /// The data file's full extension, without the leading dot: `jsonl`,
    /// `csv.gz`, `jsonl.zst`, `parquet`.
    pub fn extension(self) -> String {
        match (self.format, self.compression.text_suffix()) {
            (Format::Jsonl | Format::Csv, Some(suffix)) => {
                format!("{}.{suffix}", self.format.extension())
            }
            _ => self.format.extension().to_owned(),
        }
    }

    /// Every extension paysync may have written for any encoding (crash recovery
    /// removes uncommitted files of all of them).
    fn all_extensions() -> Vec<String> {
        let mut v = Vec::new();
        for format in Format::ALL {
            for compression in Compression::ALL {
                if let Ok(e) = Encoding::pair(format, compression) {
                    let ext = e.extension();
                    if !v.contains(&ext) {
                        v.push(ext);
                    }
                }
            }
        }
        v
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.format, self.compression)
    }
}

/// Errors writing, committing or checking output files. Every variant names the
/// file; the `io::Error` source says why ("No space left on device", "Permission
/// denied").
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create output file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create output directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write output file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync {path} to disk")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("manifest {path} is not valid")]
    InvalidManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl OutputError {
    /// The underlying I/O error, if any (to tell ENOSPC from other failures).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            OutputError::Create { source, .. }
            | OutputError::CreateDir { source, .. }
            | OutputError::Write { source, .. }
            | OutputError::Sync { source, .. }
            | OutputError::Rename { source, .. }
            | OutputError::Read { source, .. }
            | OutputError::Remove { source, .. } => Some(source),
            OutputError::InvalidManifest { .. } => None,
        }
    }
}

/// The encoder behind a [`FileWriter`].
enum Sink {
    /// Boxed: the encoders carry buffers and compressor state.
    Csv(Box<CsvSink>),
    Jsonl(Box<JsonlSink>),
    #[cfg(feature = "parquet")]
    Parquet(Box<self::parquet::ParquetSink>),
}

/// Writes one data file `<dir>/<name>.<ext>`: rows stream into the hidden
/// temporary `.<name>.<ext>.tmp` (mode 0o640) and [`commit`](Self::commit) makes
/// it visible with its manifest. Dropping it uncommitted deletes the temporary file.
pub struct FileWriter {
    dir: PathBuf,
    /// The file stem: `<name>.<ext>` and `<name>.manifest.json`.
    name: String,
    data_file: String,
    encoding: Encoding,
    temp: PathBuf,
    sink: Option<Sink>,
    /// CSV header or JSONL keys, for the manifest.
    columns: Vec<String>,
    rows: u64,
    /// Rows per status, indexed like [`PayStatus::ALL`].
    counts: [u64; PayStatus::ALL.len()],
    started_at: DateTime<Utc>,
}

impl fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWriter")
            .field("temp", &self.temp)
            .field("encoding", &self.encoding)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl FileWriter {
    /// Starts `<dir>/<name>.<ext>` as `.<name>.<ext>.tmp` in the same directory,
    /// in `format` with its default compression (see [`FileWriter::create_with`]).
    pub fn create(
        dir: &Path,
        name: &str,
        format: Format,
        input_columns: Vec<String>,
        started_at: DateTime<Utc>,
    ) -> Result<Self, OutputError> {
        Self::create_with(dir, name, Encoding::new(format), input_columns, started_at)
    }

    /// Starts `<dir>/<name>.<ext>` (the encoding's extension, e.g. `jsonl.gz`)
    /// as `.<name>.<ext>.tmp` in the same directory. `input_columns` (CSV and
    /// Parquet) are the input column names to write after the fixed columns, in
    /// this order (duplicates dropped).
    pub fn create_with(
        dir: &Path,
        name: &str,
        encoding: Encoding,
        input_columns: Vec<String>,
        started_at: DateTime<Utc>,
    ) -> Result<Self, OutputError> {
        let data_file = format!("{name}.{}", encoding.extension());
        let temp = temp_path(&dir.join(&data_file));
        let file = create_private_file(&temp).map_err(|source| OutputError::Create {
            path: temp.clone(),
            source,
        })?;
        let mut this = Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
            data_file,
            encoding,
            temp,
            sink: None,
            columns: Vec::new(),
            rows: 0,
            counts: [0; PayStatus::ALL.len()],
            started_at,
        };
        let hashing = HashingWriter::new(file);
        let mut seen = std::collections::HashSet::new();
        let input_columns: Vec<String> = input_columns
            .into_iter()
            .filter(|c| seen.insert(c.clone()))
            .collect();
        let sink = match encoding.format {
            Format::Csv => {
                this.columns = csv_header(&input_columns);
                let text = TextEncoder::new(hashing, encoding.compression)
                    .map_err(|source| this.write_error(source))?;
                let sink = CsvSink::new(text, input_columns, &this.columns);
                Sink::Csv(Box::new(sink.map_err(|source| this.write_error(source))?))
            }
            Format::Jsonl => {
                this.columns = jsonl::keys();
                let text = TextEncoder::new(hashing, encoding.compression)
                    .map_err(|source| this.write_error(source))?;
                Sink::Jsonl(Box::new(JsonlSink::new(text)))
            }
            #[cfg(feature = "parquet")]
            Format::Parquet => {
                this.columns = csv_header(&input_columns);
                let sink =
                    self::parquet::ParquetSink::new(hashing, input_columns, encoding.compression)
                        .map_err(|source| this.write_error(source))?;
                Sink::Parquet(Box::new(sink))
            }
            #[cfg(not(feature = "parquet"))]
            Format::Parquet => {
                return Err(this.write_error(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "this paysync was built without the parquet cargo feature",
                )));
            }
        };
        this.sink = Some(sink);
        Ok(this)
    }

    /// Appends one row (buffered).
    pub fn write(&mut self, row: &Observation) -> Result<(), OutputError> {
        let result = match self.sink.as_mut() {
            Some(Sink::Csv(s)) => s.write(row),
            Some(Sink::Jsonl(s)) => s.write(row),
            #[cfg(feature = "parquet")]
            Some(Sink::Parquet(s)) => s.write(row),
            None => Ok(()),
        };
        result.map_err(|source| self.write_error(source))?;
        self.rows += 1;
        if let Some(i) = PayStatus::ALL.iter().position(|s| *s == row.status) {
            self.counts[i] += 1;
        }
        Ok(())
    }

    /// Appends one JSONL row given as its JSON text (an object, no newline), as
    /// the state store keeps it; JSONL files only.
    pub fn write_json_line(&mut self, json: &str, status: PayStatus) -> Result<(), OutputError> {
        let result = match self.sink.as_mut() {
            Some(Sink::Jsonl(s)) => s.write_line(json),
            _ => Err(io::Error::other("JSON lines go to JSONL files only")),
        };
        result.map_err(|source| self.write_error(source))?;
        self.rows += 1;
        if let Some(i) = PayStatus::ALL.iter().position(|s| *s == status) {
            self.counts[i] += 1;
        }
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The final path of the data file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.data_file)
    }

    /// Flushes and fsyncs the data file, renames it to its final name, fsyncs the
    /// directory, then writes the manifest the same way. On failure nothing stays
    /// visible under the final names (what can be deleted is deleted).
    pub fn commit(mut self, extra: ManifestExtra) -> Result<Manifest, OutputError> {
        let hashing = match self.sink.take() {
            Some(Sink::Csv(s)) => s.finish().and_then(TextEncoder::finish),
            Some(Sink::Jsonl(s)) => s.finish().and_then(TextEncoder::finish),
            #[cfg(feature = "parquet")]
            Some(Sink::Parquet(s)) => s.finish(),
            None => Err(io::Error::other("writer already committed")),
        }
        .map_err(|source| self.write_error(source))?;
        let (file, sha256, bytes) = hashing.into_parts();
        file.sync_all().map_err(|source| OutputError::Sync {
            path: self.temp.clone(),
            source,
        })?;
        drop(file);

        let final_path = self.path();
        fs::rename(&self.temp, &final_path).map_err(|source| OutputError::Rename {
            from: self.temp.clone(),
            to: final_path.clone(),
            source,
        })?;
        let manifest = Manifest {
            data_file: self.data_file.clone(),
            format: self.encoding.format.as_str().to_owned(),
            compression: self.encoding.compression,
            rows: self.rows,
            bytes,
            sha256,
            schema_version: crate::model::SCHEMA_VERSION,
            started_at: self.started_at,
            finished_at: Utc::now(),
            counts: PayStatus::ALL
                .iter()
                .zip(self.counts)
                .map(|(s, n)| (s.as_str().to_owned(), n))
                .collect(),
            run_id: extra.run_id,
            provider: extra.provider,
            columns: std::mem::take(&mut self.columns),
        };
        let published = fsync_dir(&self.dir).and_then(|()| {
            crate::failpoint::hit("after-data-rename");
            manifest.write(&self.dir, &self.name)
        });
        if let Err(e) = published {
            let _ = fs::remove_file(&final_path);
            let _ = fsync_dir(&self.dir);
            return Err(e);
        }
        Ok(manifest)
    }

    fn write_error(&self, source: io::Error) -> OutputError {
        OutputError::Write {
            path: self.temp.clone(),
            source,
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // After a successful commit the temporary name no longer exists.
        let _ = fs::remove_file(&self.temp);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Amount, Tracking};
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    /// A fully populated observation: an 18-decimal amount, values that need
    /// formula escaping, and input columns.
    pub(crate) fn sample() -> Observation {
        Observation {
            provider: "payprotocol".into(),
            order_no: "ORD-1".into(),
            status: PayStatus::Paid,
            provider_status: "3".into(),
            settled: true,
            tracking: Tracking::Settled,
            amount: Some(Amount::from_base_units("1234567890123456789", 18).unwrap()),
            currency: Some("USDT".into()),
            quote_amount: Some(Amount::parse_decimal("-7.9").unwrap()),
            quote_currency: Some("USD".into()),
            expected_amount: Some(Amount::parse_decimal("1.234567890123456789").unwrap()),
            payment_no: Some("P-1".into()),
            payment_method: Some("contract".into()),
            tx_hash: Some("0xabc".into()),
            from_address: Some("0xfrom".into()),
            to_address: Some("0xto".into()),
            chain_id: Some("56".into()),
            paid_account: None,
            created_at: Some(t("2024-04-03T05:40:06.120Z")),
            paid_at: Some(t("2024-04-03T05:41:00Z")),
            observed_at: t("2024-04-03T06:00:00.5Z"),
            first_seen_at: t("2024-04-03T05:59:00Z"),
            polls: 2,
            error: Some("=cmd|' /C calc'!A0".into()),
            input: vec![
                ("order_no".into(), "ORD-1".into()),
                ("note".into(), "line1\nline2, \"quoted\"".into()),
                ("formula".into(), "@SUM(A1)".into()),
            ],
        }
    }

    /// A minimal observation: every optional field empty, no input columns.
    pub(crate) fn minimal(order_no: &str, status: PayStatus) -> Observation {
        Observation {
            provider: "genauth".into(),
            order_no: order_no.into(),
            status,
            provider_status: "0".into(),
            settled: false,
            tracking: Tracking::Polling,
            amount: None,
            currency: None,
            quote_amount: None,
            quote_currency: None,
            expected_amount: None,
            payment_no: None,
            payment_method: None,
            tx_hash: None,
            from_address: None,
            to_address: None,
            chain_id: None,
            paid_account: None,
            created_at: None,
            paid_at: None,
            observed_at: t("2024-04-03T06:00:00Z"),
            first_seen_at: t("2024-04-03T05:59:00Z"),
            polls: 1,
            error: None,
            input: Vec::new(),
        }
    }

    fn extra() -> ManifestExtra {
        ManifestExtra {
            run_id: "run-1".into(),
            provider: "payprotocol".into(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// Format names parse, print and give the extension.
    #[test]
    fn format_names() {
        assert_eq!("csv".parse::<Format>().unwrap(), Format::Csv);
        assert_eq!("jsonl".parse::<Format>().unwrap(), Format::Jsonl);
        assert!("json".parse::<Format>().is_err());
        assert_eq!(Format::Jsonl.extension(), "jsonl");
        assert_eq!(Format::Csv.to_string(), "csv");
    }

    /// Committing writes the data file and its manifest, nothing else: the
    /// manifest's sha256, byte and row counts match the file, counts are per
    /// status, and both files have mode 0o640.
    #[test]
    fn commit_writes_file_and_manifest() {
        for format in [Format::Jsonl, Format::Csv] {
            let dir = tempfile::tempdir().unwrap();
            let started = t("2024-04-03T06:00:00Z");
            let mut w = FileWriter::create(
                dir.path(),
                "paysync-r1",
                format,
                vec!["note".into()],
                started,
            )
            .unwrap();
            assert_eq!(names(dir.path()), vec![format!(".paysync-r1.{format}.tmp")]);
            w.write(&sample()).unwrap();
            w.write(&minimal("A2", PayStatus::Pending)).unwrap();
            w.write(&minimal("A3", PayStatus::Pending)).unwrap();
            let m = w.commit(extra()).unwrap();

            let data = dir.path().join(format!("paysync-r1.{format}"));
            assert_eq!(
                names(dir.path()),
                vec![
                    format!("paysync-r1.{format}"),
                    "paysync-r1.manifest.json".into()
                ]
            );
            let bytes = fs::read(&data).unwrap();
            assert_eq!(m.sha256, hex::encode(Sha256::digest(&bytes)));
            assert_eq!(m.bytes, bytes.len() as u64);
            assert_eq!(m.rows, 3);
            assert_eq!(m.counts["paid"], 1);
            assert_eq!(m.counts["pending"], 2);
            assert_eq!(m.counts["error"], 0);
            assert_eq!(m.format, format.as_str());
            assert_eq!(m.data_file, format!("paysync-r1.{format}"));
            assert_eq!(
                (m.run_id.as_str(), m.provider.as_str()),
                ("run-1", "payprotocol")
            );
            assert_eq!(m.started_at, started);
            assert!(m.finished_at >= started);

            assert_eq!(
                read_manifest(dir.path(), "paysync-r1").unwrap(),
                Some(m.clone())
            );
            assert!(verify(dir.path(), "paysync-r1").unwrap());
            for p in [data, manifest_path(dir.path(), "paysync-r1")] {
                let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o640, "{}", p.display());
            }
        }
    }

    /// The manifest JSON has the keys the interface pins, times in RFC 3339 UTC.
    #[test]
    fn manifest_json_keys() {
        let dir = tempfile::tempdir().unwrap();
        let w = FileWriter::create(
            dir.path(),
            "b",
            Format::Csv,
            vec![],
            t("2024-04-03T06:00:00Z"),
        )
        .unwrap();
        w.commit(extra()).unwrap();
        let text = fs::read_to_string(manifest_path(dir.path(), "b")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "data_file",
            "format",
            "rows",
            "sha256",
            "schema_version",
            "started_at",
            "finished_at",
            "counts",
            "run_id",
            "provider",
            "columns",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {text}");
        }
        assert_eq!(v["started_at"], "2024-04-03T06:00:00Z");
        assert!(v["finished_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["rows"], 0);
        assert_eq!(v["columns"][0], "provider");
    }

    /// Dropping an uncommitted writer deletes its temporary file.
    #[test]
    fn drop_without_commit_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = FileWriter::create(dir.path(), "x", Format::Jsonl, vec![], Utc::now()).unwrap();
        w.write(&sample()).unwrap();
        drop(w);
        assert!(names(dir.path()).is_empty());
    }

    /// A commit that cannot publish (the directory vanished) fails with an
    /// error naming the file and leaves no data file without a manifest.
    #[test]
    fn failed_commit_leaves_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let mut w = FileWriter::create(&out, "x", Format::Csv, vec![], Utc::now()).unwrap();
        w.write(&sample()).unwrap();
        fs::remove_file(out.join(".x.csv.tmp")).unwrap();
        fs::remove_dir(&out).unwrap();
        let err = w.commit(extra()).unwrap_err();
        assert!(err.to_string().contains("x.csv"), "{err}");
        assert!(!out.exists());
    }

    /// Compressed text files get their suffix, verify, and decompress to
    /// exactly the bytes of the uncompressed file of the same rows; a damaged
    /// compressed file does not verify.
    #[test]
    fn compressed_text_files() {
        use std::io::Read;
        for format in [Format::Jsonl, Format::Csv] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let write = |name: &str, c: Compression| {
                let mut w = FileWriter::create_with(
                    d,
                    name,
                    Encoding::with(format, c).unwrap(),
                    vec!["note".into()],
                    t("2024-04-03T06:00:00Z"),
                )
                .unwrap();
                for _ in 0..50 {
                    w.write(&sample()).unwrap();
                }
                w.commit(extra()).unwrap()
            };
            write("plain", Compression::None);
            let plain = fs::read(d.join(format!("plain.{format}"))).unwrap();
            for (c, suffix) in [(Compression::Gzip, "gz"), (Compression::Zstd, "zst")] {
                let name = format!("o{suffix}");
                let m = write(&name, c);
                let file = format!("{name}.{format}.{suffix}");
                assert_eq!(m.data_file, file);
                assert_eq!(m.compression, c);
                assert_eq!(m.rows, 50);
                assert!(verify(d, &name).unwrap());
                let on_disk = fs::read(d.join(&file)).unwrap();
                assert!(on_disk.len() < plain.len() / 4, "{file} is not compressed");
                let mut text = Vec::new();
                decoder(on_disk.as_slice(), c)
                    .unwrap()
                    .read_to_end(&mut text)
                    .unwrap();
                assert_eq!(text, plain, "{file}");
                let mut damaged = on_disk.clone();
                damaged.truncate(on_disk.len() / 2);
                fs::write(d.join(&file), &damaged).unwrap();
                assert!(!verify(d, &name).unwrap(), "{file}");
            }
        }
    }

    /// Encodings: extensions, defaults, and the refused pairs.
    #[test]
    fn encodings() {
        assert_eq!(Encoding::new(Format::Jsonl).extension(), "jsonl");
        assert_eq!(
            Encoding::new(Format::Parquet).compression,
            Compression::Zstd
        );
        assert_eq!(Encoding::new(Format::Parquet).extension(), "parquet");
        let e = Encoding::with(Format::Csv, Compression::Gzip).unwrap();
        assert_eq!(e.extension(), "csv.gz");
        let e = Encoding::with(Format::Jsonl, Compression::Zstd).unwrap();
        assert_eq!(e.extension(), "jsonl.zst");
        let err = Encoding::with(Format::Csv, Compression::Snappy).unwrap_err();
        assert!(err.contains("only available for parquet"), "{err}");
        assert_eq!(
            Encoding::with(Format::Parquet, Compression::Snappy)
                .unwrap()
                .extension(),
            "parquet"
        );
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd));
        assert!("lz4".parse::<Compression>().is_err());
        assert_eq!("parquet".parse::<Format>().unwrap(), Format::Parquet);
    }

    /// A data file in an unwritable place fails on create, naming the path.
    #[test]
    fn create_error_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir");
        let err = FileWriter::create(&missing, "x", Format::Csv, vec![], Utc::now()).unwrap_err();
        assert!(matches!(err, OutputError::Create { .. }));
        assert!(err.to_string().contains("no/such/dir/.x.csv.tmp"), "{err}");
        assert_eq!(err.io_error().unwrap().kind(), io::ErrorKind::NotFound);
    }
}
