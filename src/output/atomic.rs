//! Durable, atomic file writes in the output directory: private file creation
//! (mode 0o640), temporary names, fsync of files and directories, atomic
//! replace, crash-recovery cleanup, and a writer that hashes what it writes.
//!
//! - [`write_atomic`]: small files (manifests) written whole.
//! - [`fsync_dir`]: makes renames and deletions in a directory durable.
//! - [`remove_uncommitted`]: deletes what a crashed commit left behind.
//! - [`HashingWriter`]: sha256 and byte count of everything written through it.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Encoding, OutputError, manifest_path};

/// Mode of every file paysync creates in the output directory.
pub const FILE_MODE: u32 = 0o640;

/// Creates (or truncates) `path` for writing with mode exactly 0o640, whatever
/// the umask: the mode given to `open` can only lose bits to the umask, so it is
/// set again on the open file.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// The hidden temporary name for `path`: `<dir>/.<file name>.tmp`.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// fsyncs a directory so that renames and deletions in it survive a crash.
pub(crate) fn fsync_dir_io(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs a directory so that renames and deletions in it survive a crash.
pub fn fsync_dir(dir: &Path) -> Result<(), OutputError> {
    fsync_dir_io(dir).map_err(|source| OutputError::Sync {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `bytes` to `<dir>/<file_name>` atomically: a hidden temporary file
/// (mode 0o640), fsync, rename over the final name, fsync of the directory. On
/// failure the temporary file is deleted and the final name is left untouched.
pub fn write_atomic(dir: &Path, file_name: &str, bytes: &[u8]) -> Result<(), OutputError> {
    let path = dir.join(file_name);
    let temp = temp_path(&path);
    let result = write_and_rename(&temp, &path, bytes);
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result?;
    fsync_dir(dir)
}

fn write_and_rename(temp: &Path, path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let mut file = create_private_file(temp).map_err(|source| OutputError::Create {
        path: temp.to_owned(),
        source,
    })?;
    file.write_all(bytes).map_err(|source| OutputError::Write {
        path: temp.to_owned(),
        source,
    })?;
    file.sync_all().map_err(|source| OutputError::Sync {
        path: temp.to_owned(),
        source,
    })?;
    drop(file);
    fs::rename(temp, path).map_err(|source| OutputError::Rename {
        from: temp.to_owned(),
        to: path.to_owned(),
        source,
    })
}

/// Crash recovery for output `<name>`: deletes its temporary files and every
/// data file `<name>.<ext>` (any format and compression) that its manifest does
/// not name (a commit interrupted between the two renames, or a format changed
/// between a crash and the rerun). Returns the paths deleted. A committed file
/// (named by its manifest) is kept.
pub fn remove_uncommitted(dir: &Path, name: &str) -> Result<Vec<PathBuf>, OutputError> {
    let manifest = manifest_path(dir, name);
    let committed = match super::read_manifest(dir, name) {
        Ok(Some(m)) => Some(m.data_file),
        Ok(None) | Err(OutputError::InvalidManifest { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut candidates = vec![temp_path(&manifest)];
    for ext in Encoding::all_extensions() {
        let file = format!("{name}.{ext}");
        let data = dir.join(&file);
        candidates.push(temp_path(&data));
        if committed.as_deref() != Some(file.as_str()) {
            candidates.push(data);
        }
    }
    let mut removed = Vec::new();
    for path in candidates {
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(OutputError::Remove { path, source }),
        }
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

/// Passes writes through to `inner`, hashing (sha256) and counting the bytes.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the lowercase hex sha256 and the byte count.
    pub fn into_parts(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `write_atomic` replaces the file whole, mode 0o640, no temporary left.
    #[test]
    fn write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "m.json", b"one").unwrap();
        write_atomic(dir.path(), "m.json", b"two").unwrap();
        let path = dir.path().join("m.json");
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// The mode is exactly 0o640 even for a file that existed with other bits.
    #[test]
    fn private_file_mode_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o777)).unwrap();
        drop(create_private_file(&path).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
    }

    /// Recovery deletes temporaries and an unmanifested data file, and keeps a
    /// committed one.
    #[test]
    fn remove_uncommitted_cleans_crash_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("a.jsonl"), b"{}\n").unwrap();
        fs::write(d.join(".a.jsonl.tmp"), b"{").unwrap();
        fs::write(d.join(".a.manifest.json.tmp"), b"{").unwrap();
        fs::write(d.join(".a.csv.gz.tmp"), b"x").unwrap();
        let mut removed = remove_uncommitted(d, "a").unwrap();
        removed.sort();
        assert_eq!(
            removed,
            vec![
                d.join(".a.csv.gz.tmp"),
                d.join(".a.jsonl.tmp"),
                d.join(".a.manifest.json.tmp"),
                d.join("a.jsonl")
            ]
        );
        assert_eq!(fs::read_dir(d).unwrap().count(), 0);

        // A committed file stays; a stray file of another encoding goes.
        let mut w = super::super::FileWriter::create(
            d,
            "b",
            super::super::Format::Csv,
            vec![],
            chrono::Utc::now(),
        )
        .unwrap();
        w.write(&super::super::tests::sample()).unwrap();
        w.commit(super::super::ManifestExtra {
            run_id: "r".into(),
            provider: "p".into(),
        })
        .unwrap();
        fs::write(d.join("b.jsonl.zst"), b"x").unwrap();
        assert_eq!(
            remove_uncommitted(d, "b").unwrap(),
            vec![d.join("b.jsonl.zst")]
        );
        assert!(d.join("b.csv").exists());
        assert!(d.join("b.manifest.json").exists());
    }

    /// The hash is the sha256 of exactly the bytes written.
    #[test]
    fn hashing_writer_matches_sha256() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (inner, hash, bytes) = w.into_parts();
        assert_eq!(inner, b"hello world");
        assert_eq!(bytes, 11);
        assert_eq!(hash, hex::encode(Sha256::digest(b"hello world")));
    }
}
