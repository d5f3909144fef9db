//! Queue files: one order number per line, `#` comments and blank lines skipped,
//! read whole ([`QueueRecords`]) or tailed from a byte offset ([`read_queue_from`]).
//!
//! - [`QueueRecords`]: an iterator of [`InputRecord`]s over a whole queue file.
//! - [`QueueChunk`]: the complete lines found after an offset, and where to go on.
//!
//! Line numbers count every physical line (blank and comment lines too). A line
//! longer than [`MAX_QUEUE_LINE`] bytes is rejected without being held in memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::identity::queue_identity;
use super::{InputError, InputRecord, RejectReason, open_file, parse_order, strip_line_end};
use crate::model::InputJson;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Longest queue line kept, in bytes; longer lines are rejected.
pub const MAX_QUEUE_LINE: usize = 64 * 1024;

/// What reading one physical line found.
struct LineRead {
    /// Bytes consumed, terminator included.
    consumed: u64,
    /// Whether the line ended with `\n` (otherwise the file ended first).
    complete: bool,
    /// Whether the line was longer than [`MAX_QUEUE_LINE`] (only a prefix is kept).
    too_long: bool,
}

/// Reads one physical line into `buf` (at most `MAX_QUEUE_LINE + 1` bytes of it).
/// `None` at the end of the file.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<LineRead>> {
    buf.clear();
    let n = reader
        .by_ref()
        .take(MAX_QUEUE_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.ends_with(b"\n") {
        return Ok(Some(LineRead {
            consumed: n as u64,
            complete: true,
            too_long: false,
        }));
    }
    if n <= MAX_QUEUE_LINE {
        return Ok(Some(LineRead {
            consumed: n as u64,
            complete: false,
            too_long: false,
        }));
    }
    // Too long: skip the rest of the line without keeping it.
    let mut consumed = n as u64;
    loop {
        let avail = reader.fill_buf()?;
        if avail.is_empty() {
            return Ok(Some(LineRead {
                consumed,
                complete: false,
                too_long: true,
            }));
        }
        if let Some(i) = avail.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            consumed += i as u64 + 1;
            return Ok(Some(LineRead {
                consumed,
                complete: true,
                too_long: true,
            }));
        }
        let len = avail.len();
        reader.consume(len);
        consumed += len as u64;
    }
}

/// Turns one queue line into a record; `None` for blank and comment lines.
fn queue_record(source: &Arc<str>, line: u64, bytes: &[u8], too_long: bool) -> Option<InputRecord> {
    let content = strip_line_end(bytes);
    let trimmed = content.trim_ascii();
    if trimmed.is_empty() || trimmed.starts_with(b"#") {
        return None;
    }
    let parsed = if too_long {
        Err(RejectReason::LineTooLong {
            max: MAX_QUEUE_LINE,
        })
    } else {
        match std::str::from_utf8(content) {
            Ok(s) => parse_order(s, None),
            Err(_) => Err(RejectReason::NotUtf8),
        }
    };
    Some(InputRecord {
        source: Arc::clone(source),
        line,
        raw: String::from_utf8_lossy(content).into_owned(),
        input: InputJson::EMPTY,
        parsed,
    })
}

/// The order numbers of a whole queue file (or of a compressed one's content from
/// an offset, see [`compressed_queue_from`]), streamed. A last line without `\n`
/// counts as a line.
pub struct QueueRecords {
    path: PathBuf,
    source: Arc<str>,
    reader: BufReader<Box<dyn Read + Send>>,
    buf: Vec<u8>,
    /// Number of the next line to read.
    line: u64,
    /// Byte of the content after the last line read.
    offset: u64,
    done: bool,
}

impl std::fmt::Debug for QueueRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRecords")
            .field("path", &self.path)
            .field("line", &self.line)
            .field("offset", &self.offset)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl QueueRecords {
    pub(super) fn new(path: &Path, file: File) -> Self {
        Self::from_content(path, Box::new(file), 1, 0)
    }

    /// Records of `content`, whose first line is line `first_line` of `path` and
    /// starts at byte `first_offset` of it.
    fn from_content(
        path: &Path,
        content: Box<dyn Read + Send>,
        first_line: u64,
        first_offset: u64,
    ) -> Self {
        Self {
            path: path.to_owned(),
            source: Arc::from(path.display().to_string()),
            reader: BufReader::with_capacity(64 * 1024, content),
            buf: Vec::new(),
            line: first_line,
            offset: first_offset,
            done: false,
        }
    }

    /// The byte of the (decompressed) content after the last line read: where
    /// reading on from the record last returned would start.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// The content of a gzip or zstd file (known by its first bytes, whatever its
/// name), decompressed as it is read; `None` for a file in neither format.
pub fn decompressed(file: File) -> io::Result<Option<Box<dyn Read + Send>>> {
    let mut magic = [0u8; 4];
    let n = file.read_at(&mut magic, 0)?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Some(Box::new(flate2::read::MultiGzDecoder::new(file))),
        [0x28, 0xb5, 0x2f, 0xfd] => Some(Box::new(zstd::stream::read::Decoder::new(file)?)),
        _ => None,
    })
}

/// The lines of compressed queue file `path` (a rotated queue file compressed by
/// logrotate) after byte `offset` of its content, numbered on from the lines
/// before it. The file is complete, so a last line without `\n` is read too.
/// `None` when the file is not compressed or its content is shorter than `offset`.
pub fn compressed_queue_from(path: &Path, offset: u64) -> Result<Option<QueueRecords>, InputError> {
    let read_err = |line, source| InputError::Read {
        path: path.to_owned(),
        line,
        source,
    };
    let Some(mut content) = decompressed(open_file(path)?).map_err(|e| read_err(1, e))? else {
        return Ok(None);
    };
    let mut before = LineCounter::default();
    let skipped =
        io::copy(&mut content.by_ref().take(offset), &mut before).map_err(|e| read_err(1, e))?;
    if skipped < offset {
        return Ok(None);
    }
    Ok(Some(QueueRecords::from_content(
        path,
        content,
        1 + before.0,
        offset,
    )))
}

/// A sink that counts the `\n` bytes written to it.
#[derive(Default)]
struct LineCounter(u64);

impl io::Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Iterator for QueueRecords {
    type Item = Result<InputRecord, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let read = match read_line(&mut self.reader, &mut self.buf) {
                Ok(Some(read)) => read,
                Ok(None) => break,
                Err(source) => {
                    self.done = true;
                    return Some(Err(InputError::Read {
                        path: self.path.clone(),
                        line: self.line,
                        source,
                    }));
                }
            };
            let line = self.line;
            self.line += 1;
            self.offset += read.consumed;
            if line == 1 && self.buf.starts_with(UTF8_BOM) {
                self.buf.drain(..UTF8_BOM.len());
            }
            if let Some(rec) = queue_record(&self.source, line, &self.buf, read.too_long) {
                return Some(Ok(rec));
            }
        }
        self.done = true;
        None
    }
}

/// The complete lines of a queue file found after a byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueChunk {
    /// Order lines read (blank and comment lines are consumed but not listed).
    pub records: Vec<InputRecord>,
    /// The byte after the last complete line consumed; a trailing line without
    /// `\n` is not consumed (it may still be being written).
    pub next_offset: u64,
    /// Line number of the line at the offset actually read from.
    pub first_line: u64,
    /// Line number of the line at `next_offset`.
    pub next_line: u64,
    /// The file was shorter than the offset asked for (truncated or replaced), so
    /// it was read from the start instead.
    pub truncated: bool,
    /// Everything complete up to the end of the file was consumed (fewer than
    /// `max_lines` records were found).
    pub at_end: bool,
    /// The identity to save with `next_offset` (see [`queue_identity`]), taken
    /// from the file actually read.
    pub identity: String,
}

/// Reads up to `max_lines` order lines from `path`, starting at byte `offset`
/// (which should be the `next_offset` of an earlier chunk, or 0). Line numbers are
/// absolute: the lines before `offset` are counted first. When the file is
/// shorter than `offset` it is read from the start and `truncated` is set.
pub fn read_queue_from(
    path: &Path,
    offset: u64,
    max_lines: usize,
) -> Result<QueueChunk, InputError> {
    read_chunk(&open_file(path)?, path, offset, None, max_lines)
}

/// Like [`read_queue_from`], when the caller knows the line number at `offset`
/// (the `next_line` of an earlier chunk), which saves counting the lines before it.
pub fn read_queue_from_line(
    path: &Path,
    offset: u64,
    start_line: u64,
    max_lines: usize,
) -> Result<QueueChunk, InputError> {
    read_chunk(&open_file(path)?, path, offset, Some(start_line), max_lines)
}

/// Like [`read_queue_from`] (or [`read_queue_from_line`] with a `start_line`), from
/// a queue file already open: a caller that keeps the handle goes on reading the
/// same file even if its path is rotated meanwhile. `path` names it in errors.
pub fn read_open_queue(
    file: &File,
    path: &Path,
    offset: u64,
    start_line: Option<u64>,
    max_lines: usize,
) -> Result<QueueChunk, InputError> {
    read_chunk(file, path, offset, start_line, max_lines)
}

fn read_chunk(
    mut file: &File,
    path: &Path,
    offset: u64,
    start_line: Option<u64>,
    max_lines: usize,
) -> Result<QueueChunk, InputError> {
    let read_err = |line, source| InputError::Read {
        path: path.to_owned(),
        line,
        source,
    };
    let meta = file.metadata().map_err(|e| read_err(1, e))?;
    let len = meta.len();
    let truncated = offset > len;
    let (offset, start_line) = if truncated {
        (0, 1)
    } else {
        match start_line {
            Some(line) => (offset, line),
            None => (
                offset,
                1 + count_lines_before(file, offset).map_err(|e| read_err(1, e))?,
            ),
        }
    };
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| read_err(start_line, e))?;

    let source: Arc<str> = Arc::from(path.display().to_string());
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut buf = Vec::new();
    let mut chunk = QueueChunk {
        records: Vec::new(),
        next_offset: offset,
        first_line: start_line,
        next_line: start_line,
        truncated,
        at_end: false,
        identity: String::new(),
    };
    while chunk.records.len() < max_lines {
        let read = match read_line(&mut reader, &mut buf) {
            Ok(Some(read)) if read.complete => read,
            Ok(_) => {
                chunk.at_end = true;
                break;
            }
            Err(e) => return Err(read_err(chunk.next_line, e)),
        };
        let line = chunk.next_line;
        if chunk.next_offset == 0 && buf.starts_with(UTF8_BOM) {
            buf.drain(..UTF8_BOM.len());
        }
        chunk.next_line += 1;
        chunk.next_offset += read.consumed;
        if let Some(rec) = queue_record(&source, line, &buf, read.too_long) {
            chunk.records.push(rec);
        }
    }
    chunk.identity =
        queue_identity(file, &meta, chunk.next_offset).map_err(|e| read_err(chunk.next_line, e))?;
    Ok(chunk)
}

/// Counts the `\n` bytes in the first `offset` bytes of `file` (from its start).
fn count_lines_before(mut file: &File, offset: u64) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file.take(offset));
    let mut lines = 0;
    loop {
        let avail = reader.fill_buf()?;
        if avail.is_empty() {
            return Ok(lines);
        }
        lines += avail.iter().filter(|&&b| b == b'\n').count() as u64;
        let len = avail.len();
        reader.consume(len);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::write_file;
    use super::super::{InputSpec, open};
    use super::*;
    use crate::model::InvalidOrderNo;
    use std::io::Write;

    fn orders(recs: &[InputRecord]) -> Vec<(u64, String)> {
        recs.iter()
            .map(|r| match &r.parsed {
                Ok((o, _)) => (r.line, o.to_string()),
                Err(e) => (r.line, format!("reject: {e}")),
            })
            .collect()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// A compressed rotated file (gzip or zstd, known by its magic bytes whatever
    /// its name) is read from an offset of its content, with absolute line numbers
    /// and its last line even without `\n`.
    #[test]
    fn compressed_files_are_read_from_an_offset() {
        let text = b"A1\n# note\nA2\nA 3\nA4";
        for (name, bytes) in [
            ("q.1.gz", gzip(text)),
            ("q.1.zst", zstd::encode_all(&text[..], 3).unwrap()),
            ("q.1", gzip(text)),
        ] {
            let (_dir, path) = write_file(name, &bytes);
            let recs: Vec<InputRecord> = compressed_queue_from(&path, 3)
                .unwrap()
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(
                orders(&recs),
                vec![
                    (3, "A2".into()),
                    (4, "reject: order number contains whitespace".into()),
                    (5, "A4".into())
                ],
                "{name}"
            );
            assert_eq!(&*recs[0].source, path.display().to_string(), "{name}");
            // The offset after each record is where reading on resumes: the
            // comment before A2 is consumed with it, and the end has no `\n`.
            let mut it = compressed_queue_from(&path, 3).unwrap().unwrap();
            assert_eq!(it.offset(), 3);
            let mut after = Vec::new();
            while let Some(rec) = it.next() {
                after.push((rec.unwrap().line, it.offset()));
            }
            assert_eq!(after, vec![(3, 13), (4, 17), (5, 19)], "{name}");
            let rest: Vec<u64> = compressed_queue_from(&path, 13)
                .unwrap()
                .unwrap()
                .map(|r| r.unwrap().line)
                .collect();
            assert_eq!(rest, vec![4, 5], "{name}");
            // Content shorter than the offset: not the file the offset is for.
            assert!(compressed_queue_from(&path, 100).unwrap().is_none());
            // Same head, as the identity check reads it.
            let content = decompressed(File::open(&path).unwrap()).unwrap().unwrap();
            let mut head = Vec::new();
            content.take(5).read_to_end(&mut head).unwrap();
            assert_eq!(head, b"A1\n# ");
        }
        let (_dir, plain) = write_file("q.1", text);
        assert!(compressed_queue_from(&plain, 0).unwrap().is_none());
        let (_dir, tiny) = write_file("q.1", b"\x1f");
        assert!(compressed_queue_from(&tiny, 0).unwrap().is_none());
    }

    fn read_all(bytes: &[u8]) -> Vec<InputRecord> {
        let (_dir, path) = write_file("queue.txt", bytes);
        open(&InputSpec::new(&path))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    /// Comments and blank lines are skipped but counted; CRLF and surrounding
    /// spaces are tolerated; a last line without `\n` is read.
    #[test]
    fn comments_blank_crlf_and_last_line() {
        let recs = read_all(b"# header\r\nA1\r\n\r\n  A2  \n   # indented\n\t\nA3");
        assert_eq!(
            orders(&recs),
            vec![(2, "A1".into()), (4, "A2".into()), (7, "A3".into())]
        );
        assert_eq!(recs[0].raw, "A1");
        assert!(recs[0].input.is_empty());
        assert_eq!(recs[0].parsed.as_ref().unwrap().1, None);
    }

    /// Bad lines are rejected with their reason and raw text; reading goes on.
    #[test]
    fn bad_lines_are_rejected() {
        let recs = read_all(b"A 1\nB\xFF\nC\x01\nD\n");
        assert_eq!(
            orders(&recs),
            vec![
                (1, "reject: order number contains whitespace".into()),
                (2, "reject: row is not valid UTF-8".into()),
                (
                    3,
                    "reject: order number contains a control or invisible character".into()
                ),
                (4, "D".into()),
            ]
        );
        assert_eq!(recs[1].raw, "B\u{FFFD}");
        assert_eq!(
            recs[2].parsed,
            Err(RejectReason::OrderNo(InvalidOrderNo::Control))
        );
    }

    /// A UTF-8 BOM at the start of a queue file is not part of the first line.
    #[test]
    fn bom_is_stripped() {
        let recs = read_all(b"\xEF\xBB\xBFA1\nA2\n");
        assert_eq!(orders(&recs), vec![(1, "A1".into()), (2, "A2".into())]);
        let (_dir, path) = write_file("queue.txt", b"\xEF\xBB\xBFA1\n");
        let c = read_queue_from(&path, 0, 10).unwrap();
        assert_eq!(orders(&c.records), vec![(1, "A1".into())]);
        assert_eq!(c.next_offset, 6);
    }

    /// A line longer than the limit is rejected without being kept whole.
    #[test]
    fn overlong_line_is_rejected() {
        let mut data = "x".repeat(MAX_QUEUE_LINE * 3).into_bytes();
        data.extend_from_slice(b"\nA2\n");
        let recs = read_all(&data);
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0].parsed,
            Err(RejectReason::LineTooLong {
                max: MAX_QUEUE_LINE
            })
        );
        assert!(recs[0].raw.len() <= MAX_QUEUE_LINE + 1);
        assert_eq!(orders(&recs[1..]), vec![(2, "A2".into())]);
    }

    /// Tailing: a partial last line is not consumed until its `\n` arrives;
    /// offsets chain; line numbers stay absolute; `max_lines` bounds each chunk.
    #[test]
    fn read_from_offsets() {
        let (_dir, path) = write_file("queue.txt", b"# q\nA1\r\n\nA2\nA3\nA4");
        let c = read_queue_from(&path, 0, 2).unwrap();
        assert_eq!(orders(&c.records), vec![(2, "A1".into()), (4, "A2".into())]);
        assert_eq!((c.first_line, c.next_line, c.next_offset), (1, 5, 12));
        assert!(!c.at_end && !c.truncated);

        let c2 = read_queue_from(&path, c.next_offset, 10).unwrap();
        assert_eq!(orders(&c2.records), vec![(5, "A3".into())]);
        assert_eq!((c2.first_line, c2.next_offset), (5, 15));
        assert!(c2.at_end);

        // Same chunk when the caller passes the line number it knows.
        let c3 = read_queue_from_line(&path, c.next_offset, c.next_line, 10).unwrap();
        assert_eq!(c3, c2);

        // Nothing new until the partial line is completed.
        let c4 = read_queue_from(&path, c2.next_offset, 10).unwrap();
        assert!(c4.records.is_empty());
        assert_eq!(c4.next_offset, c2.next_offset);

        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"5\nA6\n").unwrap();
        let c5 = read_queue_from(&path, c4.next_offset, 10).unwrap();
        assert_eq!(
            orders(&c5.records),
            vec![(6, "A45".into()), (7, "A6".into())]
        );
        assert_eq!(c5.next_offset, std::fs::metadata(&path).unwrap().len());
    }

    /// An offset past the end (the file was truncated) restarts from the top.
    #[test]
    fn truncated_file_restarts() {
        let (_dir, path) = write_file("queue.txt", b"B1\n");
        let c = read_queue_from(&path, 100, 10).unwrap();
        assert!(c.truncated);
        assert_eq!(orders(&c.records), vec![(1, "B1".into())]);
        assert_eq!(c.next_offset, 3);
    }

    mod properties {
        use super::*;
        use crate::model::OrderNo;
        use proptest::prelude::*;

        /// One queue line's content: order numbers, comments, blanks, bad
        /// characters, and anything else but line breaks (`\r` only comes from
        /// CRLF) and a leading BOM.
        fn content() -> impl Strategy<Value = String> {
            prop_oneof![
                "[A-Za-z0-9_-]{1,20}",
                " {0,3}#[^\r\n]{0,10}",
                "[ \t]{0,3}",
                "[ A-Z0-9\u{0}\u{7}\u{200B}é#]{0,10}",
                "[^\r\n\u{FEFF}]{0,30}",
            ]
        }

        proptest! {
            /// A queue file built line by line (LF or CRLF, optional BOM, optional
            /// final `\n`) reads back as exactly its order lines, each with its own
            /// line number and reason; tailing it in chunks of any size yields the same
            /// records except an unterminated last line, and ends at the last `\n`.
            #[test]
            fn lines_read_back_whole_and_tailed(
                lines in proptest::collection::vec((content(), any::<bool>()), 0..15),
                bom in any::<bool>(),
                last_terminated in any::<bool>(),
                max_lines in 1usize..5,
            ) {
                let mut data = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
                let mut want = Vec::new();
                let mut complete = Vec::new();
                for (i, (text, crlf)) in lines.iter().enumerate() {
                    data.extend_from_slice(text.as_bytes());
                    let terminated = i + 1 < lines.len() || last_terminated;
                    if terminated {
                        data.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
                    }
                    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
                    if !t.is_empty() && !t.starts_with('#') {
                        let parsed = OrderNo::parse(text).map_err(RejectReason::from);
                        let rec = (i as u64 + 1, text.clone(), parsed);
                        if terminated {
                            complete.push(rec.clone());
                        }
                        want.push(rec);
                    }
                }
                let (_dir, path) = write_file("queue.txt", &data);
                let view = |recs: &[InputRecord]| -> Vec<(u64, String, Result<OrderNo, RejectReason>)> {
                    recs.iter()
                        .map(|r| (r.line, r.raw.clone(), r.parsed.clone().map(|p| p.0)))
                        .collect()
                };
                prop_assert_eq!(view(&read_all(&data)), want);

                let mut tailed = Vec::new();
                let mut offset = 0;
                loop {
                    let c = read_queue_from(&path, offset, max_lines).unwrap();
                    prop_assert!(c.records.len() <= max_lines);
                    tailed.extend(view(&c.records));
                    offset = c.next_offset;
                    if c.at_end {
                        break;
                    }
                }
                prop_assert_eq!(tailed, complete);
                let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                prop_assert_eq!(offset, end as u64);
            }
        }
    }
}
