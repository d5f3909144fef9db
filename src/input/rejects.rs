//! The rejects file: `rejects-<run id>.csv` in the output directory, one row per
//! unusable input row (source file, line, reason, raw row).
//!
//! - [`RejectsWriter`]: creates the file only on the first reject, writes it under
//!   a hidden temporary name and publishes it atomically on [`RejectsWriter::finish`].
//!
//! Cells are formula-escaped like the CSV output; the file's mode is 0o640.

use std::fmt::Display;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::InputRecord;
use crate::output::{create_private_file, csv_to_io, escape_formula_into, fsync_dir_io, temp_path};

/// The rejects file's header row.
pub const REJECTS_HEADER: [&str; 4] = ["source", "line", "reason", "raw"];

/// `rejects-<run_id>.csv`.
pub fn rejects_file_name(run_id: &str) -> String {
    format!("rejects-{run_id}.csv")
}

/// The open temporary file, once the first reject arrived.
#[derive(Debug)]
struct Open {
    writer: ::csv::Writer<File>,
    temp: PathBuf,
}

/// Collects rejected input rows of one run into `rejects-<run id>.csv`.
/// Dropping it without [`finish`](Self::finish) deletes the temporary file.
#[derive(Debug)]
pub struct RejectsWriter {
    path: PathBuf,
    open: Option<Open>,
    rows: u64,
    cell: Vec<u8>,
}

impl RejectsWriter {
    /// Prepares `<dir>/rejects-<run_id>.csv`; nothing is created until a reject.
    pub fn new(dir: &Path, run_id: &str) -> Self {
        Self {
            path: dir.join(rejects_file_name(run_id)),
            open: None,
            rows: 0,
            cell: Vec::new(),
        }
    }

    /// The final path of the rejects file (it exists only after `finish` with rows).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rejects written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes one reject; the first creates the (temporary) file.
    pub fn write(
        &mut self,
        source: &str,
        line: u64,
        reason: impl Display,
        raw: &str,
    ) -> io::Result<()> {
        let path = &self.path;
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        if self.open.is_none() {
            self.open = Some(Self::start(path).map_err(with_path)?);
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let line = line.to_string();
        let reason = reason.to_string();
        let w = &mut open.writer;
        for value in [source, line.as_str(), reason.as_str(), raw] {
            escape_formula_into(value, &mut self.cell);
            w.write_field(&self.cell)
                .map_err(csv_to_io)
                .map_err(with_path)?;
        }
        w.write_record(None::<&[u8]>)
            .map_err(csv_to_io)
            .map_err(with_path)?;
        self.rows += 1;
        Ok(())
    }

    /// Writes `rec` if it is a reject; returns whether it was.
    pub fn write_record(&mut self, rec: &InputRecord) -> io::Result<bool> {
        match &rec.parsed {
            Ok(_) => Ok(false),
            Err(reason) => {
                self.write(&rec.source, rec.line, reason, &rec.raw)?;
                Ok(true)
            }
        }
    }

    /// Flushes, fsyncs and renames the file to its final name. Returns its path, or
    /// `None` when there were no rejects (no file is created then).
    pub fn finish(mut self) -> io::Result<Option<PathBuf>> {
        let Some(open) = self.open.take() else {
            return Ok(None);
        };
        let temp = open.temp.clone();
        let result = Self::publish(open, &self.path);
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
            .map(|()| Some(self.path.clone()))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }

    fn start(path: &Path) -> io::Result<Open> {
        let temp = temp_path(path);
        let file = create_private_file(&temp)?;
        let mut writer = ::csv::WriterBuilder::new().from_writer(file);
        let header = writer.write_record(REJECTS_HEADER).map_err(csv_to_io);
        if let Err(e) = header {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        Ok(Open { writer, temp })
    }

    fn publish(open: Open, path: &Path) -> io::Result<()> {
        let file = open.writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&open.temp, path)?;
        if let Some(dir) = path.parent() {
            fsync_dir_io(dir)?;
        }
        Ok(())
    }
}

impl Drop for RejectsWriter {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            let _ = fs::remove_file(&open.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::RejectReason;
    use super::*;
    use crate::model::InvalidOrderNo;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    /// No rejects, no file: nothing is created in the directory.
    #[test]
    fn no_rejects_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let w = RejectsWriter::new(dir.path(), "r1");
        assert_eq!(w.finish().unwrap(), None);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Rejects go to `rejects-<run>.csv` with a header, escaped cells, quoted
    /// multi-line raw rows, mode 0o640, and no temporary file left behind.
    #[test]
    fn writes_escaped_rows_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RejectsWriter::new(dir.path(), "r1");
        w.write(
            "in.csv",
            3,
            "row has 2 fields, header has 3",
            "=HYPERLINK(\"x\")",
        )
        .unwrap();
        // Until finish, only a hidden temporary file exists.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![".rejects-r1.csv.tmp"]);

        let rec = InputRecord {
            source: Arc::from("q.txt"),
            line: 7,
            raw: "a\nb".into(),
            input: crate::model::InputJson::EMPTY,
            parsed: Err(RejectReason::OrderNo(InvalidOrderNo::Whitespace)),
        };
        assert!(w.write_record(&rec).unwrap());
        assert_eq!(w.rows(), 2);
        let path = w.finish().unwrap().unwrap();
        assert_eq!(path, dir.path().join("rejects-r1.csv"));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "source,line,reason,raw\n\
             in.csv,3,\"row has 2 fields, header has 3\",\"'=HYPERLINK(\"\"x\"\")\"\n\
             q.txt,7,order number contains whitespace,\"a\nb\"\n"
        );
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Dropping the writer without finishing leaves nothing behind.
    #[test]
    fn drop_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RejectsWriter::new(dir.path(), "r2");
        w.write("a", 1, "bad", "x").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
