//! The manifest that commits a data file: `<name>.manifest.json`, written after
//! the data file is durable under its final name. A reader that only picks up
//! files with a manifest never sees a partial file.
//!
//! - [`Manifest`]: what the file holds (rows, sha256, format, schema version,
//!   times, counts per status, run, provider, columns).
//! - [`ManifestExtra`]: the run's identity, given at commit.
//! - [`read_manifest`] / [`verify`] / [`manifest_path`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Compression, OutputError, write_atomic};

/// What the caller adds to a manifest at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestExtra {
    pub run_id: String,
    pub provider: String,
}

/// The content of `<name>.manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The data file's name, in the same directory (`<name>.<ext>`).
    pub data_file: String,
    /// `jsonl`, `csv` or `parquet`.
    pub format: String,
    /// `none`, `gzip` or `zstd` for text files (the whole file is compressed);
    /// for Parquet, the codec of its pages.
    #[serde(default = "no_compression")]
    pub compression: Compression,
    /// Data rows (CSV: not counting the header).
    pub rows: u64,
    /// Size of the data file in bytes.
    #[serde(default)]
    pub bytes: u64,
    /// Lowercase hex sha256 of the data file.
    pub sha256: String,
    pub schema_version: u32,
    #[serde(with = "rfc3339_utc")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "rfc3339_utc")]
    pub finished_at: DateTime<Utc>,
    /// Rows per normalized status (every status, zeros included).
    pub counts: BTreeMap<String, u64>,
    pub run_id: String,
    pub provider: String,
    /// The CSV header, or the JSONL keys, in order.
    pub columns: Vec<String>,
}

fn no_compression() -> Compression {
    Compression::None
}

impl Manifest {
    /// Writes the manifest for output `<name>` atomically.
    pub(super) fn write(&self, dir: &Path, name: &str) -> Result<(), OutputError> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| OutputError::Write {
            path: manifest_path(dir, name),
            source: io::Error::other(e),
        })?;
        json.push(b'\n');
        write_atomic(dir, &manifest_file_name(name), &json)
    }
}

fn manifest_file_name(name: &str) -> String {
    format!("{name}.manifest.json")
}

/// `<dir>/<name>.manifest.json`.
pub fn manifest_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(manifest_file_name(name))
}

/// Reads output `<name>`'s manifest; `None` when there is none.
pub fn read_manifest(dir: &Path, name: &str) -> Result<Option<Manifest>, OutputError> {
    let path = manifest_path(dir, name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(OutputError::Read { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| OutputError::InvalidManifest { path, source })
}

/// Whether output `<name>` is committed and intact: the manifest exists, and its
/// data file exists with the sha256, size and row count the manifest states.
pub fn verify(dir: &Path, name: &str) -> Result<bool, OutputError> {
    let Some(m) = read_manifest(dir, name)? else {
        return Ok(false);
    };
    // The data file must be a plain name in the same directory.
    if m.data_file.is_empty() || m.data_file.contains('/') || m.data_file.starts_with('.') {
        return Ok(false);
    }
    let path = dir.join(&m.data_file);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(OutputError::Read { path, source }),
    };
    let read_err = |source| OutputError::Read {
        path: path.clone(),
        source,
    };
    let mut hashing = HashingReader {
        inner: file,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let rows = match m.format.as_str() {
        "csv" | "jsonl" => {
            let counted = super::decoder(&mut hashing, m.compression).and_then(|mut text| {
                if m.format == "csv" {
                    count_csv_rows(&mut text)
                } else {
                    count_lines(&mut text)
                }
            });
            match counted {
                Ok(n) => n,
                // A compressed stream that does not decode is a damaged file.
                Err(_) if m.compression != Compression::None => return Ok(false),
                Err(e) => return Err(read_err(e)),
            }
        }
        #[cfg(feature = "parquet")]
        "parquet" => {
            // The footer is at the end: hash everything first, then read it.
            io::copy(&mut hashing, &mut io::sink()).map_err(read_err)?;
            let file = File::open(&path).map_err(read_err)?;
            match super::parquet::count_rows(file) {
                Ok(n) => n,
                Err(_) => return Ok(false),
            }
        }
        _ => return Ok(false),
    };
    // Hash whatever the counter did not read (nothing, normally).
    io::copy(&mut hashing, &mut io::sink()).map_err(read_err)?;
    let sha256 = hex::encode(hashing.hasher.finalize());
    Ok(sha256 == m.sha256 && rows == m.rows && (m.bytes == 0 || hashing.bytes == m.bytes))
}

/// Records after the header.
fn count_csv_rows(reader: &mut impl Read) -> io::Result<u64> {
    let mut rdr = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(reader);
    let mut record = ::csv::ByteRecord::new();
    let mut rows = 0;
    loop {
        match rdr.read_byte_record(&mut record) {
            Ok(true) => rows += 1,
            Ok(false) => return Ok(rows),
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

fn count_lines(reader: &mut impl Read) -> io::Result<u64> {
    let mut reader = BufReader::with_capacity(super::WRITE_BUFFER, reader);
    let mut lines = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(lines);
        }
        lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buf.len();
        reader.consume(n);
    }
}

/// Hashes and counts the bytes read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// RFC 3339 in UTC with `Z`, keeping sub-second digits only when present.
mod rfc3339_utc {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::model::rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::super::{FileWriter, Format};
    use super::*;
    use std::fs;

    fn commit(dir: &Path, format: Format) -> Manifest {
        let mut w = FileWriter::create(dir, "o", format, vec!["note".into()], Utc::now()).unwrap();
        for _ in 0..3 {
            w.write(&sample()).unwrap();
        }
        w.commit(ManifestExtra {
            run_id: "r".into(),
            provider: "p".into(),
        })
        .unwrap()
    }

    /// `verify` accepts a committed file and refuses a changed or truncated
    /// one, a missing data file, and a missing manifest.
    #[test]
    fn verify_detects_tampering() {
        for format in [Format::Csv, Format::Jsonl] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            assert!(!verify(d, "o").unwrap());
            commit(d, format);
            assert!(verify(d, "o").unwrap());
            let data = d.join(format!("o.{format}"));
            let mut bytes = fs::read(&data).unwrap();
            // Rows with embedded newlines (quoted in CSV) still count once.
            bytes.truncate(bytes.len() - 1);
            fs::write(&data, &bytes).unwrap();
            assert!(!verify(d, "o").unwrap(), "{format}");
            fs::remove_file(&data).unwrap();
            assert!(!verify(d, "o").unwrap());
        }
    }

    /// A manifest that is not valid JSON is an error naming it.
    #[test]
    fn invalid_manifest_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(manifest_path(dir.path(), "o"), b"{not json").unwrap();
        let err = read_manifest(dir.path(), "o").unwrap_err();
        assert!(err.to_string().contains("o.manifest.json"), "{err}");
        assert_eq!(read_manifest(dir.path(), "none").unwrap(), None);
    }

    /// A committed file's manifest lists the CSV header, and its sha256 is the
    /// sha256 of the file's bytes.
    #[test]
    fn manifest_matches_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = commit(dir.path(), Format::Csv);
        let bytes = fs::read(dir.path().join("o.csv")).unwrap();
        assert_eq!(m.sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(m.rows, 3);
        assert_eq!(m.columns.last().unwrap(), "input.note");
        let header = bytes.split(|&b| b == b'\n').next().unwrap();
        assert_eq!(String::from_utf8_lossy(header), m.columns.join(","));
    }
}
