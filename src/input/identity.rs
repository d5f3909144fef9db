//! Which queue file a saved read position belongs to.
//!
//! A position is saved with the file's identity: its device and inode, which
//! survive a rename (so a rotated file is found again beside the new one), and a
//! SHA-256 of its first bytes already read, up to [`HEAD_BYTES`], which an
//! append-only file never changes. The hash tells the old file apart from a file
//! that took its place under the same inode: rewritten in place (`copytruncate`,
//! `> queue.txt` and new lines), or a new file given a deleted file's inode.
//!
//! Text form (stored in the state file): `<dev>:<ino>` when nothing was read yet,
//! else `<dev>:<ino>:<n>:<hex sha256 of the first n bytes>`. Positions saved by
//! older versions have only `<dev>:<ino>`, and are matched by it alone.
//!
//! - [`queue_identity`]: the identity of an open file read up to an offset.
//! - [`match_identity`] / [`IdentityMatch`]: whether an open file is the one a
//!   saved identity names.
//! - [`same_head`] / [`same_head_in`]: whether a file, or a compressed file's
//!   content, starts as the named one did (a copy of it).
//! - [`queue_backlog`] / [`QueueBacklog`]: how far a queue file on disk is ahead of
//!   its saved position (`paysync status`, metrics).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};

use sha2::{Digest, Sha256};

/// How many leading bytes of a queue file its identity hashes.
pub const HEAD_BYTES: u64 = 256;

/// Device and inode: `"<device>:<inode>"`.
fn device_inode(meta: &Metadata) -> String {
    format!("{}:{}", meta.dev(), meta.ino())
}

/// SHA-256 (hex) of the first `n` bytes of `file`; `None` when it is shorter.
fn head_hash(file: &File, n: u64) -> io::Result<Option<String>> {
    let mut head = vec![0; usize::try_from(n).unwrap_or(usize::MAX)];
    match file.read_exact_at(&mut head, 0) {
        Ok(()) => Ok(Some(hex::encode(Sha256::digest(&head)))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The identity to save with a read position: `file` (described by `meta`) has
/// been read up to byte `offset`, so its first `min(offset, HEAD_BYTES)` bytes
/// exist and are hashed.
pub fn queue_identity(file: &File, meta: &Metadata, offset: u64) -> io::Result<String> {
    let n = offset.min(HEAD_BYTES);
    if n == 0 {
        return Ok(device_inode(meta));
    }
    match head_hash(file, n)? {
        Some(hash) => Ok(format!("{}:{n}:{hash}", device_inode(meta))),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the file is shorter than the {n} bytes already read from it"),
        )),
    }
}

/// How an open file relates to a saved identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMatch {
    /// The same file (it may have grown, or been truncated past its head).
    Same,
    /// The same device and inode, but its first bytes changed (or are gone): the
    /// file was rewritten in place, or the inode was reused by a new file.
    Rewritten,
    /// Another file.
    Other,
}

/// Whether `file` (described by `meta`) is the file `saved` names.
pub fn match_identity(saved: &str, file: &File, meta: &Metadata) -> io::Result<IdentityMatch> {
    let (dev_ino, head) = split(saved);
    if dev_ino != device_inode(meta) {
        return Ok(IdentityMatch::Other);
    }
    let Some((n, hash)) = head else {
        return Ok(IdentityMatch::Same);
    };
    Ok(match head_hash(file, n)? {
        Some(h) if h == hash => IdentityMatch::Same,
        _ => IdentityMatch::Rewritten,
    })
}

/// Whether `file` starts with the bytes `saved` hashed, whatever its inode: a copy
/// of the file `saved` names (logrotate's `copytruncate`). False for an identity
/// without a head hash, which says nothing of the content.
pub fn same_head(saved: &str, file: &File) -> io::Result<bool> {
    let (_, head) = split(saved);
    let Some((n, hash)) = head else {
        return Ok(false);
    };
    Ok(head_hash(file, n)?.is_some_and(|h| h == hash))
}

/// Whether the stream `content` (a compressed copy's content) starts with the
/// bytes `saved` hashed. Reads at most those bytes.
pub fn same_head_in(saved: &str, content: impl Read) -> io::Result<bool> {
    let (_, head) = split(saved);
    let Some((n, hash)) = head else {
        return Ok(false);
    };
    let mut bytes = Vec::new();
    content.take(n).read_to_end(&mut bytes)?;
    Ok(bytes.len() as u64 == n && hex::encode(Sha256::digest(&bytes)) == hash)
}

/// How a queue file on disk stands against its saved read position.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueBacklog {
    pub path: String,
    /// Bytes read (the saved offset).
    pub offset: u64,
    pub file: QueueFileState,
    /// The file's size now, if it exists.
    pub size: Option<u64>,
    /// Bytes the next ingest will read from the file at the path (complete lines
    /// and a trailing partial one); for a replaced file, all of it. The unread
    /// tail of a rotated file is not counted.
    pub unread_bytes: u64,
}

/// Whether the file at a queue path is the one its saved position belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueFileState {
    /// The position is this file's.
    Current,
    /// The file at the path is another one now (rotated, truncated or rewritten):
    /// the next ingest reads it from its start.
    Replaced,
    /// Nothing at the path.
    Missing,
}

impl QueueFileState {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueFileState::Current => "current",
            QueueFileState::Replaced => "replaced",
            QueueFileState::Missing => "missing",
        }
    }
}

/// Where the queue file at `path` stands against a position saved at `offset`
/// under `identity`.
pub fn queue_backlog(path: &str, identity: &str, offset: u64) -> QueueBacklog {
    let mut b = QueueBacklog {
        path: path.to_owned(),
        offset,
        file: QueueFileState::Missing,
        size: None,
        unread_bytes: 0,
    };
    let Ok(file) = File::open(path) else {
        return b;
    };
    let Ok(meta) = file.metadata() else {
        return b;
    };
    let size = meta.len();
    b.size = Some(size);
    let same = match_identity(identity, &file, &meta).is_ok_and(|m| m == IdentityMatch::Same);
    if same && offset <= size {
        b.file = QueueFileState::Current;
        b.unread_bytes = size - offset;
    } else {
        b.file = QueueFileState::Replaced;
        b.unread_bytes = size;
    }
    b
}

/// `<dev>:<ino>` and, when present and well-formed, the hashed head's length and
/// hash. A malformed head is ignored: the identity is then matched as an old one.
fn split(saved: &str) -> (&str, Option<(u64, &str)>) {
    let mut colons = saved.match_indices(':').map(|(i, _)| i);
    let (Some(_), Some(end)) = (colons.next(), colons.next()) else {
        return (saved, None);
    };
    // A length past HEAD_BYTES was never written: a damaged state file must not
    // make paysync allocate and read that much.
    let head = saved[end + 1..]
        .split_once(':')
        .and_then(|(n, hash)| Some((n.parse().ok()?, hash)))
        .filter(|(n, _)| *n <= HEAD_BYTES);
    (&saved[..end], head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> (File, Metadata) {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let f = File::open(&path).unwrap();
        let m = f.metadata().unwrap();
        (f, m)
    }

    #[test]
    fn identity_hashes_the_head_already_read() {
        let dir = tempfile::tempdir().unwrap();
        let (f, m) = file_with(&dir, "q", b"A1\nA2\n");
        let dev_ino = device_inode(&m);
        assert_eq!(queue_identity(&f, &m, 0).unwrap(), dev_ino);
        let id = queue_identity(&f, &m, 3).unwrap();
        assert_eq!(
            id,
            format!("{dev_ino}:3:{}", hex::encode(Sha256::digest(b"A1\n")))
        );
        // Past the file's end: an error, not an identity of fewer bytes.
        assert!(queue_identity(&f, &m, 7).is_err());
        // Only the first HEAD_BYTES count.
        let long = vec![b'x'; 1000];
        let (f, m) = file_with(&dir, "long", &long);
        let id = queue_identity(&f, &m, 900).unwrap();
        assert!(id.contains(&format!(":{HEAD_BYTES}:")), "{id}");
    }

    #[test]
    fn appended_renamed_rewritten_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let (f, m) = file_with(&dir, "q", b"A1\nA2\n");
        let saved = queue_identity(&f, &m, 6).unwrap();
        let path = dir.path().join("q");

        // Appended to, then renamed: the same file.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"A3\n")
            .unwrap();
        let moved = dir.path().join("q.1");
        std::fs::rename(&path, &moved).unwrap();
        let f = File::open(&moved).unwrap();
        let m = f.metadata().unwrap();
        assert_eq!(match_identity(&saved, &f, &m).unwrap(), IdentityMatch::Same);

        // Rewritten in place (same inode), longer than before: not the same file.
        std::fs::write(&moved, b"B1\nB2\nB3\n").unwrap();
        let f = File::open(&moved).unwrap();
        let m = f.metadata().unwrap();
        assert_eq!(
            match_identity(&saved, &f, &m).unwrap(),
            IdentityMatch::Rewritten
        );
        // Truncated below the hashed head: rewritten too.
        std::fs::write(&moved, b"A1").unwrap();
        let f = File::open(&moved).unwrap();
        let m = f.metadata().unwrap();
        assert_eq!(
            match_identity(&saved, &f, &m).unwrap(),
            IdentityMatch::Rewritten
        );

        // Another inode: another file, though a copy has the same head.
        let (f, m) = file_with(&dir, "copy", b"A1\nA2\nA3\n");
        assert_eq!(
            match_identity(&saved, &f, &m).unwrap(),
            IdentityMatch::Other
        );
        assert!(same_head(&saved, &f).unwrap());
        let (f, _) = file_with(&dir, "other", b"A1\nA9\n");
        assert!(!same_head(&saved, &f).unwrap());
        let (f, _) = file_with(&dir, "short", b"A1\n");
        assert!(!same_head(&saved, &f).unwrap());
        // The same test on a stream (a compressed copy's content).
        assert!(same_head_in(&saved, &b"A1\nA2\nA3\n"[..]).unwrap());
        assert!(!same_head_in(&saved, &b"A1\nA9\n"[..]).unwrap());
        assert!(!same_head_in(&saved, &b"A1\n"[..]).unwrap());
    }

    #[test]
    fn backlog_of_current_replaced_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let (f, m) = file_with(&dir, "q", b"A1\nA2\n");
        let path = dir.path().join("q");
        let p = path.to_str().unwrap();
        let saved = queue_identity(&f, &m, 3).unwrap();
        let b = queue_backlog(p, &saved, 3);
        assert_eq!(
            (b.file, b.size, b.unread_bytes),
            (QueueFileState::Current, Some(6), 3)
        );
        std::fs::write(&path, b"B1\nB2\nB3\n").unwrap();
        let b = queue_backlog(p, &saved, 3);
        assert_eq!(
            (b.file, b.size, b.unread_bytes),
            (QueueFileState::Replaced, Some(9), 9)
        );
        std::fs::remove_file(&path).unwrap();
        let b = queue_backlog(p, &saved, 3);
        assert_eq!(
            (b.file, b.size, b.unread_bytes),
            (QueueFileState::Missing, None, 0)
        );
        assert_eq!(b.offset, 3);
    }

    /// Positions saved before the head hash existed match by device and inode.
    #[test]
    fn old_identities_match_by_inode_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (f, m) = file_with(&dir, "q", b"A1\n");
        let old = device_inode(&m);
        assert_eq!(match_identity(&old, &f, &m).unwrap(), IdentityMatch::Same);
        assert_eq!(
            match_identity(&format!("{old}:garbage"), &f, &m).unwrap(),
            IdentityMatch::Same
        );
        assert_eq!(match_identity("1:2", &f, &m).unwrap(), IdentityMatch::Other);
        // An absurd head length (a damaged state file) is ignored, not allocated.
        assert_eq!(
            match_identity(&format!("{old}:99999999999999:ab"), &f, &m).unwrap(),
            IdentityMatch::Same
        );
        // Without a head hash, no file is taken for a copy.
        assert!(!same_head(&old, &f).unwrap());
    }
}
