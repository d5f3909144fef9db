//! The rejects file: `rejects-<run id>.csv` in the output directory, one row per
//! unusable input row (source file, line, reason, raw row).
//!
//! - [`RejectsWriter`]: creates the file only on the first reject, writes it under
//!   a hidden temporary name and publishes it atomically on [`RejectsWriter::finish`].
//!   [`RejectsWriter::sync`] makes the rows written so far durable before a caller
//!   commits something that stops them from being read again (a queue offset, an
//!   inbox file moved to `done/`).
//! - [`recover`]: at start, publishes what a crashed writer had written (its
//!   complete rows), so a rejected row is never lost with its temporary file.
//!
//! Cells are formula-escaped like the CSV output; the file's mode is 0o640. A
//! writer holds an exclusive `flock` on its temporary file, so recovery never
//! touches a file another process is still writing.

use std::fmt::Display;
use std::fs::{self, File, OpenOptions, Permissions, TryLockError};
use std::io::{self, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::InputRecord;
use crate::output::{FILE_MODE, csv_to_io, escape_formula_into, fsync_dir_io, temp_path};

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
    /// Whether the directory entry of `temp` has been made durable.
    dir_synced: bool,
}

/// Collects rejected input rows of one run into `rejects-<run id>.csv`.
/// Dropping it without [`finish`](Self::finish) (an error ended the run) deletes
/// the temporary file, unless rows were [`sync`](Self::sync)ed: something was
/// committed past those, so the file is left for [`recover`] at the next start.
#[derive(Debug)]
pub struct RejectsWriter {
    path: PathBuf,
    open: Option<Open>,
    rows: u64,
    /// Rows made durable by [`sync`](Self::sync).
    synced: u64,
    cell: Vec<u8>,
}

impl RejectsWriter {
    /// Prepares `<dir>/rejects-<run_id>.csv`; nothing is created until a reject.
    pub fn new(dir: &Path, run_id: &str) -> Self {
        Self {
            path: dir.join(rejects_file_name(run_id)),
            open: None,
            rows: 0,
            synced: 0,
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

    /// Makes the rows written so far durable: flushes the temporary file and
    /// fsyncs it (and, the first time, its directory). Call it before committing
    /// anything after which the rejected rows would not be read again; after a
    /// crash, [`recover`] publishes them. Does nothing when no row was written
    /// since the last call.
    pub fn sync(&mut self) -> io::Result<()> {
        let Some(open) = self.open.as_mut().filter(|_| self.synced < self.rows) else {
            return Ok(());
        };
        let path = &self.path;
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        open.writer.flush().map_err(with_path)?;
        open.writer.get_ref().sync_data().map_err(with_path)?;
        if !open.dir_synced {
            if let Some(dir) = path.parent() {
                fsync_dir_io(dir).map_err(with_path)?;
            }
            open.dir_synced = true;
        }
        self.synced = self.rows;
        Ok(())
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
        let file = create_locked(&temp)?;
        let mut writer = ::csv::WriterBuilder::new().from_writer(file);
        let header = writer.write_record(REJECTS_HEADER).map_err(csv_to_io);
        if let Err(e) = header {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        Ok(Open {
            writer,
            temp,
            dir_synced: false,
        })
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

/// Creates (or empties) `temp`, mode exactly 0o640, holding an exclusive `flock`
/// on it for as long as the file is open. The lock is taken before the file is
/// emptied, so a file another process is writing is left alone.
fn create_locked(temp: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(temp)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("{} is being written by another process", temp.display()),
            ));
        }
        Err(TryLockError::Error(e)) => return Err(e),
    }
    file.set_len(0)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// What [`recover`] did with a temporary rejects file a crash left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Its complete rows were published under the final name.
    Published { path: PathBuf, rows: u64 },
    /// It held no complete row and was deleted.
    Removed { temp: PathBuf },
    /// Another process holds its lock: left alone.
    InUse { temp: PathBuf },
    /// The final name already exists: left alone, so nothing is overwritten.
    Conflict { temp: PathBuf, path: PathBuf },
    /// It could not be read, cut or renamed: left alone, to be tried again at the
    /// next start (a leftover must not stop the run).
    Failed { temp: PathBuf, error: String },
}

/// Publishes the temporary rejects files (`.rejects-<id>.csv.tmp`) in `dir` that
/// no process is writing any more: those of a run or an ingest that crashed. The
/// file is cut after its last complete row (a row torn by the crash is dropped:
/// its input is read again, since nothing after the last [`RejectsWriter::sync`]
/// was committed), fsynced and renamed to `rejects-<id>.csv`. A missing `dir` is
/// not an error; a file that cannot be recovered is reported and left as it is.
pub fn recover(dir: &Path) -> io::Result<Vec<Recovered>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    let mut done = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(final_name) = name.to_str().and_then(recovered_name) else {
            continue;
        };
        let temp = entry.path();
        let path = dir.join(final_name);
        done.push(
            recover_one(&temp, &path).unwrap_or_else(|e| Recovered::Failed {
                temp,
                error: e.to_string(),
            }),
        );
    }
    if !done.is_empty() {
        fsync_dir_io(dir)?;
    }
    Ok(done)
}

/// `rejects-<id>.csv` for a temporary rejects file's name.
fn recovered_name(temp_name: &str) -> Option<&str> {
    let name = temp_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    (name.starts_with("rejects-") && name.ends_with(".csv")).then_some(name)
}

fn recover_one(temp: &Path, path: &Path) -> io::Result<Recovered> {
    let file = OpenOptions::new().read(true).write(true).open(temp)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Ok(Recovered::InUse {
                temp: temp.to_owned(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(e),
    }
    if path.exists() {
        return Ok(Recovered::Conflict {
            temp: temp.to_owned(),
            path: path.to_owned(),
        });
    }
    let (len, rows) = complete_prefix(&file)?;
    if rows == 0 {
        fs::remove_file(temp)?;
        return Ok(Recovered::Removed {
            temp: temp.to_owned(),
        });
    }
    file.set_len(len)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    file.sync_all()?;
    fs::rename(temp, path)?;
    Ok(Recovered::Published {
        path: path.to_owned(),
        rows,
    })
}

/// The length of the longest prefix of a rejects file that is its header and
/// whole rows, and the number of those rows. A record is whole when writing its
/// fields again gives exactly its bytes: a row torn by a crash lacks its line end,
/// a closing quote or fields, so it never does.
fn complete_prefix(file: &File) -> io::Result<(u64, u64)> {
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(BufReader::new(file.try_clone()?));
    let mut record = ::csv::ByteRecord::new();
    let mut bytes = Vec::new();
    let (mut len, mut records) = (0u64, 0u64);
    while reader.read_byte_record(&mut record).map_err(csv_to_io)? {
        let end = reader.position().byte();
        let header = records == 0;
        if record.len() != REJECTS_HEADER.len()
            || (header
                && record
                    .iter()
                    .ne(REJECTS_HEADER.iter().map(|h| h.as_bytes())))
        {
            break;
        }
        let mut expected = ::csv::Writer::from_writer(Vec::new());
        expected.write_byte_record(&record).map_err(csv_to_io)?;
        let expected = expected.into_inner().map_err(|e| e.into_error())?;
        bytes.resize(usize::try_from(end - len).unwrap_or(usize::MAX), 0);
        file.read_exact_at(&mut bytes, len)?;
        if bytes != expected {
            break;
        }
        len = end;
        records += 1;
    }
    Ok((len, records.saturating_sub(1)))
}

impl Drop for RejectsWriter {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            if self.synced == 0 {
                let _ = fs::remove_file(&open.temp);
            } else {
                tracing::warn!(file = %open.temp.display(), rows = self.synced, "rejects file left unfinished; it is published at the next start");
            }
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

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A header and three rows as the writer writes them: quoted cells, an
    /// escaped quote, a line break inside a cell.
    const HEADER: &str = "source,line,reason,raw\n";
    const ROWS: [&str; 3] = [
        "in.csv,3,\"two, fields\",\"'=HYPERLINK(\"\"x\"\")\"\n",
        "q.txt,7,bad,\"a\nb\"\n",
        "q.txt,8,bad,plain\n",
    ];

    fn write_rows(w: &mut RejectsWriter) {
        w.write("in.csv", 3, "two, fields", "=HYPERLINK(\"x\")")
            .unwrap();
        w.write("q.txt", 7, "bad", "a\nb").unwrap();
        w.write("q.txt", 8, "bad", "plain").unwrap();
    }

    /// `sync` puts the rows written so far in the temporary file; until then they
    /// may sit in the writer's buffer.
    #[test]
    fn sync_writes_the_rows_through() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join(".rejects-s.csv.tmp");
        let mut w = RejectsWriter::new(dir.path(), "s");
        w.sync().unwrap();
        assert!(names(dir.path()).is_empty(), "no reject, no file");
        write_rows(&mut w);
        assert_eq!(fs::read_to_string(&temp).unwrap(), "");
        w.sync().unwrap();
        assert_eq!(
            fs::read_to_string(&temp).unwrap(),
            HEADER.to_owned() + &ROWS.concat()
        );
        w.sync().unwrap();
        let path = w.finish().unwrap().unwrap();
        assert_eq!(
            fs::read_to_string(path).unwrap(),
            HEADER.to_owned() + &ROWS.concat()
        );
    }

    /// Whatever prefix of the file a crash left, recovery publishes exactly its
    /// header and whole rows, and deletes a file without a whole row.
    #[test]
    fn recover_keeps_the_whole_rows_of_any_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RejectsWriter::new(dir.path(), "full");
        write_rows(&mut w);
        let full = fs::read_to_string(w.finish().unwrap().unwrap()).unwrap();
        assert_eq!(full, HEADER.to_owned() + &ROWS.concat());
        let ends: Vec<usize> = ROWS
            .iter()
            .scan(HEADER.len(), |end, row| {
                *end += row.len();
                Some(*end)
            })
            .collect();

        for cut in 0..=full.len() {
            let dir = tempfile::tempdir().unwrap();
            let temp = dir.path().join(".rejects-c.csv.tmp");
            fs::write(&temp, &full.as_bytes()[..cut]).unwrap();
            let done = recover(dir.path()).unwrap();
            let rows = ends.iter().filter(|&&end| end <= cut).count();
            if rows == 0 {
                assert_eq!(done, vec![Recovered::Removed { temp }], "cut {cut}");
                assert!(names(dir.path()).is_empty(), "cut {cut}");
                continue;
            }
            let path = dir.path().join("rejects-c.csv");
            assert_eq!(
                done,
                vec![Recovered::Published {
                    path: path.clone(),
                    rows: rows as u64
                }],
                "cut {cut}"
            );
            assert_eq!(names(dir.path()), vec!["rejects-c.csv"], "cut {cut}");
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                full[..ends[rows - 1]],
                "cut {cut}"
            );
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o640);
        }
    }

    /// A file another writer holds is left alone, and a second writer cannot take
    /// it over; the first one still publishes it.
    #[test]
    fn recover_leaves_a_file_in_use_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RejectsWriter::new(dir.path(), "live");
        w.write("a", 1, "bad", "x").unwrap();
        w.sync().unwrap();
        let temp = dir.path().join(".rejects-live.csv.tmp");
        assert_eq!(
            recover(dir.path()).unwrap(),
            vec![Recovered::InUse { temp: temp.clone() }]
        );
        let mut other = RejectsWriter::new(dir.path(), "live");
        let err = other.write("b", 2, "bad", "y").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        drop(other);
        assert!(temp.exists());
        let path = w.finish().unwrap().unwrap();
        assert_eq!(
            fs::read_to_string(path).unwrap(),
            "source,line,reason,raw\na,1,bad,x\n"
        );
    }

    /// Other files are not touched, a published rejects file is never
    /// overwritten, one that cannot be read is reported and left, and a missing
    /// directory is not an error.
    #[test]
    fn recover_touches_only_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join(".paysync-r.jsonl.tmp"), "{").unwrap();
        fs::write(d.join(".rejects-r.txt.tmp"), "x").unwrap();
        fs::write(d.join("rejects-p.csv"), "published").unwrap();
        fs::write(d.join(".rejects-p.csv.tmp"), HEADER.to_owned() + ROWS[2]).unwrap();
        assert_eq!(
            recover(d).unwrap(),
            vec![Recovered::Conflict {
                temp: d.join(".rejects-p.csv.tmp"),
                path: d.join("rejects-p.csv"),
            }]
        );
        assert_eq!(
            names(d),
            vec![
                ".paysync-r.jsonl.tmp",
                ".rejects-p.csv.tmp",
                ".rejects-r.txt.tmp",
                "rejects-p.csv"
            ]
        );
        assert_eq!(
            fs::read_to_string(d.join("rejects-p.csv")).unwrap(),
            "published"
        );
        assert_eq!(recover(&d.join("missing")).unwrap(), vec![]);

        fs::remove_file(d.join(".rejects-p.csv.tmp")).unwrap();
        fs::create_dir(d.join(".rejects-dir.csv.tmp")).unwrap();
        let done = recover(d).unwrap();
        assert!(
            matches!(&done[..], [Recovered::Failed { temp, .. }] if *temp == d.join(".rejects-dir.csv.tmp")),
            "{done:?}"
        );
        assert!(d.join(".rejects-dir.csv.tmp").is_dir());
    }

    /// Dropped after a sync (an error ended an ingest that had committed past
    /// those rows), the file stays for recovery, which publishes its rows.
    #[test]
    fn drop_after_sync_leaves_the_file_for_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RejectsWriter::new(dir.path(), "e");
        write_rows(&mut w);
        w.sync().unwrap();
        w.write("late", 9, "bad", "y").unwrap();
        drop(w);
        assert_eq!(names(dir.path()), vec![".rejects-e.csv.tmp"]);
        let path = dir.path().join("rejects-e.csv");
        assert_eq!(
            recover(dir.path()).unwrap(),
            vec![Recovered::Published {
                path: path.clone(),
                rows: 4
            }]
        );
        assert_eq!(
            fs::read_to_string(path).unwrap(),
            HEADER.to_owned() + &ROWS.concat() + "late,9,bad,y\n"
        );
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
