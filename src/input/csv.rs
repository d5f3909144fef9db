//! Streaming reader for CSV input files: header row, BOM, CRLF, quoted fields with
//! embedded newlines, blank lines; each row keeps its starting line number and its
//! raw text for the rejects file.
//!
//! - [`CsvRecords`]: an iterator of [`InputRecord`]s over one CSV file.
//!
//! The `csv` crate parses; a tee under it keeps the bytes of the record being read
//! (and the parser's read-ahead, at most one buffer), so the raw row and its real
//! starting line are known without holding more than one row in memory.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use ::csv::{ByteRecord, Reader, ReaderBuilder};

use super::{InputError, InputRecord, InputSpec, RejectReason, parse_order, strip_line_end};
use crate::model::InputJson;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// A reader that keeps a copy of every byte it hands out until told to drop them.
#[derive(Debug)]
struct Tee<R> {
    inner: R,
    /// Bytes read but not yet assigned to a finished record.
    kept: Vec<u8>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.kept.extend_from_slice(&out[..n]);
        Ok(n)
    }
}

/// One physical record as parsed, before it is turned into an [`InputRecord`].
struct RawRow {
    /// Line where the record's text starts.
    line: u64,
    /// The record's text, without leading blank lines and its terminator.
    raw: String,
    /// A parse error for this record that the reader could continue after.
    malformed: Option<String>,
}

/// The rows of one CSV file, streamed. The header row is read on construction.
#[derive(Debug)]
pub struct CsvRecords {
    path: PathBuf,
    source: Arc<str>,
    reader: Reader<Tee<File>>,
    record: ByteRecord,
    /// Header names (trimmed), in file order.
    header: Vec<String>,
    order_idx: usize,
    payment_idx: Option<usize>,
    /// File offset of `Tee::kept[0]`.
    base: u64,
    /// Line number at `base`.
    line: u64,
    /// The byte before `base` was `\r` (a `\n` right after it ends no new line).
    after_cr: bool,
    /// Set after the end of the file or a fatal error.
    done: bool,
}

impl CsvRecords {
    /// Reads the header of `file`. `Ok(None)` when the file holds no rows at all.
    pub(super) fn new(spec: &InputSpec, file: File) -> Result<Option<Self>, InputError> {
        let reader = ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(Tee {
                inner: file,
                kept: Vec::new(),
            });
        let mut this = Self {
            path: spec.path.clone(),
            source: Arc::from(spec.path.display().to_string()),
            reader,
            record: ByteRecord::new(),
            header: Vec::new(),
            order_idx: 0,
            payment_idx: None,
            base: 0,
            line: 1,
            after_cr: false,
            done: false,
        };
        if this.next_raw().transpose()?.is_none() {
            return Ok(None);
        }
        let header: Vec<String> = this
            .record
            .iter()
            .map(|f| String::from_utf8_lossy(f).trim().to_owned())
            .collect();
        let mut seen = HashSet::with_capacity(header.len());
        for name in &header {
            if !seen.insert(name.as_str()) {
                return Err(InputError::DuplicateHeader {
                    path: spec.path.clone(),
                    column: name.clone(),
                });
            }
        }
        let Some(order_idx) = header.iter().position(|h| *h == spec.column) else {
            return Err(InputError::MissingColumn {
                path: spec.path.clone(),
                column: spec.column.clone(),
                available: header,
            });
        };
        this.payment_idx = spec
            .payment_no_column
            .as_ref()
            .and_then(|c| header.iter().position(|h| h == c));
        this.order_idx = order_idx;
        this.header = header;
        Ok(Some(this))
    }

    /// The header's column names, trimmed, in file order.
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// Whether the configured payment number column is present in the header.
    pub fn has_payment_column(&self) -> bool {
        self.payment_idx.is_some()
    }

    /// Reads the next non-blank record into `self.record`; `None` at the end.
    fn next_raw(&mut self) -> Option<Result<RawRow, InputError>> {
        loop {
            if self.done {
                return None;
            }
            let malformed = match self.reader.read_byte_record(&mut self.record) {
                Ok(true) => None,
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(e) if e.is_io_error() => {
                    self.done = true;
                    let source = match e.into_kind() {
                        ::csv::ErrorKind::Io(io) => io,
                        other => io::Error::other(format!("{other:?}")),
                    };
                    return Some(Err(InputError::Read {
                        path: self.path.clone(),
                        line: self.line,
                        source,
                    }));
                }
                Err(e) => Some(e.to_string()),
            };
            let row = self.take_span(malformed);
            // A blank line: one unquoted field of whitespace. A quoted empty value
            // (`""`, how a one-column file writes an empty order number) is a row.
            let blank = self.record.len() == 1
                && self.record[0].iter().all(u8::is_ascii_whitespace)
                && !row.raw.contains('"')
                && row.malformed.is_none();
            if !blank {
                return Some(Ok(row));
            }
        }
    }

    /// Assigns the bytes consumed by the last record to it and forgets them.
    fn take_span(&mut self, malformed: Option<String>) -> RawRow {
        let end = self.reader.position().byte();
        let at_start = self.base == 0;
        let kept = &mut self.reader.get_mut().kept;
        let len = usize::try_from(end.saturating_sub(self.base))
            .unwrap_or(usize::MAX)
            .min(kept.len());
        let span = &kept[..len];
        let mut text = span;
        if at_start {
            text = text.strip_prefix(UTF8_BOM).unwrap_or(text);
        }
        let blank = text
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let line = self.line + count_line_breaks(&text[..blank], self.after_cr);
        let raw = String::from_utf8_lossy(strip_line_end(&text[blank..])).into_owned();
        self.line += count_line_breaks(span, self.after_cr);
        if let Some(&last) = span.last() {
            self.after_cr = last == b'\r';
        }
        self.base += len as u64;
        kept.drain(..len);
        RawRow {
            line,
            raw,
            malformed,
        }
    }

    /// Turns the record in `self.record` into an [`InputRecord`].
    fn build(&self, row: RawRow) -> InputRecord {
        let mut rec = InputRecord {
            source: Arc::clone(&self.source),
            line: row.line,
            raw: row.raw,
            input: InputJson::EMPTY,
            parsed: Err(RejectReason::NotUtf8),
        };
        if let Some(msg) = row.malformed {
            rec.parsed = Err(RejectReason::Malformed(msg));
            return rec;
        }
        let mut fields = Vec::with_capacity(self.record.len());
        for f in &self.record {
            match std::str::from_utf8(f) {
                Ok(s) => fields.push(s),
                Err(_) => return rec,
            }
        }
        if fields.len() != self.header.len() {
            rec.parsed = Err(RejectReason::FieldCount {
                found: fields.len(),
                expected: self.header.len(),
            });
            return rec;
        }
        rec.parsed = parse_order(fields[self.order_idx], self.payment_idx.map(|i| fields[i]));
        rec.input = InputJson::from_columns(
            self.header
                .iter()
                .map(String::as_str)
                .zip(fields.iter().copied()),
        );
        rec
    }
}

impl Iterator for CsvRecords {
    type Item = Result<InputRecord, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        let row = self.next_raw()?;
        Some(row.map(|row| self.build(row)))
    }
}

/// The line breaks in `bytes`, counted as editors and the csv crate see them:
/// `\n`, `\r\n` and a lone `\r` (old Mac files) each end one line. `after_cr`:
/// the byte before `bytes` was `\r`, so a `\n` first in `bytes` ends no new line
/// (a record's span can end between the two).
fn count_line_breaks(bytes: &[u8], after_cr: bool) -> u64 {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    if !after_cr && !bytes.contains(&b'\r') {
        return newlines;
    }
    let mut breaks = 0;
    let mut prev_cr = after_cr;
    for &b in bytes {
        breaks += u64::from(b == b'\r' || (b == b'\n' && !prev_cr));
        prev_cr = b == b'\r';
    }
    breaks
}

#[cfg(test)]
mod tests {
    use super::super::tests::write_file;
    use super::super::{InputSpec, Records, open};
    use super::*;
    use crate::model::{InvalidOrderNo, OrderNo};

    /// Reads every record of `bytes` as a CSV file with the default spec.
    fn read(bytes: &[u8]) -> Vec<InputRecord> {
        read_spec(bytes, |_| {})
    }

    fn read_spec(bytes: &[u8], tweak: impl FnOnce(&mut InputSpec)) -> Vec<InputRecord> {
        let (_dir, path) = write_file("orders.csv", bytes);
        let mut spec = InputSpec::new(&path);
        tweak(&mut spec);
        open(&spec).unwrap().collect::<Result<Vec<_>, _>>().unwrap()
    }

    fn order(rec: &InputRecord) -> &str {
        rec.parsed.as_ref().unwrap().0.as_str()
    }

    /// A BOM is stripped, CRLF is accepted, columns pass through in header order,
    /// and the header is line 1.
    #[test]
    fn bom_crlf_and_columns() {
        let recs = read(b"\xEF\xBB\xBForder_no,note\r\nA1,hello\r\nA2,world\r\n");
        assert_eq!(recs.len(), 2);
        assert_eq!(order(&recs[0]), "A1");
        assert_eq!(recs[0].line, 2);
        assert_eq!(recs[0].raw, "A1,hello");
        assert_eq!(
            recs[0].input.columns(),
            vec![
                ("order_no".to_owned(), "A1".to_owned()),
                ("note".to_owned(), "hello".to_owned())
            ]
        );
        assert_eq!(recs[1].line, 3);
        assert_eq!(&*recs[1].source, recs[0].source.as_ref());
        assert!(recs[0].source.ends_with("orders.csv"));
    }

    /// A quoted field may span lines; the row's line is where it starts, and the
    /// following rows keep counting physical lines. Blank lines are skipped.
    #[test]
    fn quoted_newlines_and_blank_lines() {
        let data = b"\n\norder_no,note\n\nA1,\"multi\r\nline\nnote\"\n   \n\r\nA2,x\nA3,y";
        let recs = read(data);
        let got: Vec<_> = recs.iter().map(|r| (order(r), r.line)).collect();
        assert_eq!(got, vec![("A1", 5), ("A2", 10), ("A3", 11)]);
        assert_eq!(recs[0].input.columns()[1].1, "multi\r\nline\nnote");
        assert_eq!(recs[0].raw, "A1,\"multi\r\nline\nnote\"");
        assert_eq!(recs[2].raw, "A3,y");
    }

    /// A lone `\r` ends a line, as in files saved by old Mac programs ("CSV
    /// (Macintosh)"), and `\r\n` ends one line, also when a record's span ends
    /// between the two: each row keeps the line an editor shows it on.
    #[test]
    fn lone_cr_ends_a_line() {
        let lines = |data: &[u8]| -> Vec<(String, u64)> {
            read(data).iter().map(|r| (r.raw.clone(), r.line)).collect()
        };
        let want = |rows: &[(&str, u64)]| -> Vec<(String, u64)> {
            rows.iter().map(|(r, l)| ((*r).to_owned(), *l)).collect()
        };
        assert_eq!(
            lines(b"order_no,note\rA1,x\r,empty\r\rA2,\"two\rlines\"\r bad,z\r"),
            want(&[
                ("A1,x", 2),
                (",empty", 3),
                ("A2,\"two\rlines\"", 5),
                (" bad,z", 7)
            ])
        );
        assert_eq!(
            lines(b"order_no\r\nA1\r\r\nA2\n\rA3\r\n\r\nA4"),
            want(&[("A1", 2), ("A2", 4), ("A3", 6), ("A4", 8)])
        );
        assert_eq!(count_line_breaks(b"\nA\r", true), 1);
        assert_eq!(count_line_breaks(b"\nA\r", false), 2);
        assert_eq!(count_line_breaks(b"\n\n", false), 2);
    }

    /// Rows with the wrong number of fields are rejected with both counts; the
    /// reader goes on with the next row.
    #[test]
    fn ragged_rows_are_rejected() {
        let recs = read(b"order_no,a,b\nA1,1,2\nA2,1\nA3,1,2,3\nA4,1,2\n");
        assert_eq!(recs.len(), 4);
        assert_eq!(
            recs[1].parsed,
            Err(RejectReason::FieldCount {
                found: 2,
                expected: 3
            })
        );
        assert_eq!(
            recs[1].parsed.as_ref().unwrap_err().to_string(),
            "row has 2 fields, header has 3"
        );
        assert!(recs[1].input.is_empty());
        assert_eq!(recs[1].raw, "A2,1");
        assert!(matches!(
            recs[2].parsed,
            Err(RejectReason::FieldCount { found: 4, .. })
        ));
        assert_eq!(order(&recs[3]), "A4");
        assert_eq!(recs[3].line, 5);
    }

    /// A row with bytes that are not UTF-8 is rejected; its raw text is kept
    /// (lossily) and the next row is read normally.
    #[test]
    fn non_utf8_row_is_rejected() {
        let recs = read(b"order_no,name\nA1,caf\xE9\nA2,ok\n");
        assert_eq!(recs[0].parsed, Err(RejectReason::NotUtf8));
        assert_eq!(
            recs[0].parsed.as_ref().unwrap_err().to_string(),
            "row is not valid UTF-8"
        );
        assert_eq!(recs[0].raw, "A1,caf\u{FFFD}");
        assert_eq!(order(&recs[1]), "A2");
    }

    /// Empty, blank, spaced or control-character order numbers are rejected with
    /// the order number's own message; surrounding spaces are trimmed.
    #[test]
    fn order_number_validation() {
        let recs = read(b"order_no,x\n,1\n\"  \",2\n A1 ,3\nA 2,4\n\"A\x073\",5\n\"A\tB\",6\n");
        let parsed: Vec<_> = recs.iter().map(|r| r.parsed.clone().map(|p| p.0)).collect();
        assert_eq!(parsed[0], Err(RejectReason::OrderNo(InvalidOrderNo::Empty)));
        assert_eq!(parsed[1], Err(RejectReason::OrderNo(InvalidOrderNo::Empty)));
        assert_eq!(parsed[2].as_ref().unwrap().as_str(), "A1");
        assert_eq!(
            parsed[3],
            Err(RejectReason::OrderNo(InvalidOrderNo::Whitespace))
        );
        assert_eq!(
            parsed[4],
            Err(RejectReason::OrderNo(InvalidOrderNo::Control))
        );
        assert_eq!(
            parsed[5],
            Err(RejectReason::OrderNo(InvalidOrderNo::Control))
        );
        assert_eq!(
            recs[0].parsed.as_ref().unwrap_err().to_string(),
            "order number is empty"
        );
        // Input columns keep the value as written.
        assert_eq!(recs[2].input.columns()[0].1, " A1 ");
    }

    /// The configured columns are used; the payment number is trimmed and empty
    /// means none; a payment column absent from the file means none for every row.
    #[test]
    fn configured_columns() {
        let data = b"id,pay\nA1, P1 \nA2,\n";
        let recs = read_spec(data, |s| {
            s.column = "id".into();
            s.payment_no_column = Some("pay".into());
        });
        assert_eq!(recs[0].parsed.as_ref().unwrap().1.as_deref(), Some("P1"));
        assert_eq!(recs[1].parsed.as_ref().unwrap().1, None);

        let recs = read_spec(data, |s| {
            s.column = "id".into();
            s.payment_no_column = Some("payment_no".into());
        });
        assert_eq!(recs[0].parsed.as_ref().unwrap().1, None);
    }

    /// A header without the order column is a fatal error listing the columns.
    #[test]
    fn missing_column_is_fatal() {
        let (_dir, path) = write_file("orders.csv", b"id, amount\nA1,1\n");
        let err = open(&InputSpec::new(&path)).unwrap_err();
        assert!(matches!(err, InputError::MissingColumn { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("column \"order_no\" not found in ")
                && msg.ends_with("orders.csv (columns: id, amount)"),
            "{msg}"
        );
    }

    /// A header naming a column twice is a fatal error.
    #[test]
    fn duplicate_header_is_fatal() {
        let (_dir, path) = write_file("orders.csv", b"order_no,x,x\nA1,1,2\n");
        let err = open(&InputSpec::new(&path)).unwrap_err();
        assert!(
            matches!(&err, InputError::DuplicateHeader { column, .. } if column == "x"),
            "{err:?}"
        );
    }

    /// A header-only file yields no rows; a file of blank lines is empty.
    #[test]
    fn header_only_and_blank() {
        assert!(read(b"order_no\r\n").is_empty());
        let (_dir, path) = write_file("orders.csv", b"\r\n\r\n");
        assert!(matches!(
            open(&InputSpec::new(&path)).unwrap(),
            Records::Empty
        ));
    }

    /// A 10 KB field and a long quoted field pass through intact.
    #[test]
    fn large_fields() {
        let big = "x".repeat(10 * 1024);
        let quoted = format!("\"a,b\"\"{}\n\"", "y".repeat(20_000));
        let data = format!("order_no,note\nA1,{big}\nA2,{quoted}\nA3,z\n");
        let recs = read(data.as_bytes());
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].input.columns()[1].1, big);
        assert_eq!(recs[0].raw.len(), 3 + big.len());
        assert_eq!(
            recs[1].input.columns()[1].1,
            format!("a,b\"{}\n", "y".repeat(20_000))
        );
        assert_eq!((order(&recs[2]), recs[2].line), ("A3", 5));
    }

    /// A quoted empty value in a one-column file is a row with an empty order
    /// number (rejected), not a blank line: the csv writer writes an empty field as
    /// `""`. An unquoted whitespace line is still blank. (Found by the round-trip
    /// property below; such rows used to vanish from both output and rejects.)
    #[test]
    fn quoted_empty_value_is_a_row() {
        let recs = read(b"order_no\n\"\"\nA1\n   \n\"  \"\n");
        let got: Vec<_> = recs
            .iter()
            .map(|r| (r.line, r.parsed.clone().map(|p| p.0.to_string())))
            .collect();
        let empty = Err(RejectReason::OrderNo(InvalidOrderNo::Empty));
        assert_eq!(
            got,
            vec![(2, empty.clone()), (3, Ok("A1".to_owned())), (5, empty)]
        );
        assert_eq!(recs[0].raw, "\"\"");
    }

    /// Many rows stream through without the reader keeping consumed bytes.
    #[test]
    fn streaming_keeps_little() {
        let mut data = String::from("order_no,n\n");
        for i in 0..50_000 {
            data.push_str(&format!("ORD-{i},{i}\n"));
        }
        let (_dir, path) = write_file("orders.csv", data.as_bytes());
        let Records::Csv(mut recs) = open(&InputSpec::new(&path)).unwrap() else {
            panic!("expected CSV records");
        };
        let mut n = 0;
        let mut last_line = 0;
        while let Some(rec) = recs.next() {
            let rec = rec.unwrap();
            n += 1;
            last_line = rec.line;
            assert!(recs.reader.get_ref().kept.len() <= 64 * 1024);
        }
        assert_eq!((n, last_line), (50_000, 50_001));
    }

    mod properties {
        use super::*;
        use ::csv::{Terminator, WriterBuilder};
        use proptest::prelude::*;

        /// A cell: anything, with CSV's special characters, blanks and non-ASCII
        /// made likely.
        fn cell() -> impl Strategy<Value = String> {
            prop_oneof![
                "[A-Za-z0-9_-]{1,12}",
                "[ ,\"\r\n\tA-Z0-9#é中\u{200B}]{0,8}",
                any::<String>(),
            ]
        }

        /// A file: header, then rows of exactly as many cells, the order number
        /// in column `idx`.
        fn table() -> impl Strategy<Value = (usize, Vec<Vec<String>>, bool, bool)> {
            (1usize..4).prop_flat_map(|cols| {
                (
                    0..cols,
                    proptest::collection::vec(proptest::collection::vec(cell(), cols), 0..12),
                    any::<bool>(),
                    any::<bool>(),
                )
            })
        }

        /// One record as the csv writer writes it.
        fn written(row: &[&str], crlf: bool) -> Vec<u8> {
            let term = if crlf {
                Terminator::CRLF
            } else {
                Terminator::Any(b'\n')
            };
            let mut w = WriterBuilder::new()
                .terminator(term)
                .from_writer(Vec::new());
            w.write_record(row).unwrap();
            w.into_inner().unwrap()
        }

        proptest! {
            /// Rows written by the csv writer (quotes, embedded newlines, BOM, CRLF)
            /// read back as the same cells and order numbers, each at the line where
            /// its text starts; every row is accepted or rejected, none lost. Only a
            /// one-column row written as a whitespace line is a blank line.
            #[test]
            fn csv_writer_round_trip((idx, rows, bom, crlf) in table()) {
                let cols = rows.first().map_or(1, Vec::len).max(idx + 1);
                let header: Vec<String> = (0..cols)
                    .map(|i| if i == idx { "order_no".to_owned() } else { format!("c{i}") })
                    .collect();
                let mut data = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
                data.extend(written(&header.iter().map(String::as_str).collect::<Vec<_>>(), crlf));
                let mut want = Vec::new();
                for row in &rows {
                    let bytes = written(&row.iter().map(String::as_str).collect::<Vec<_>>(), crlf);
                    let line = 1 + count_line_breaks(&data, false);
                    data.extend_from_slice(&bytes);
                    let blank_line = bytes.iter().all(u8::is_ascii_whitespace);
                    if !blank_line {
                        want.push((line, row.clone()));
                    }
                }
                let recs = read(&data);
                prop_assert_eq!(recs.len(), want.len());
                for (rec, (line, row)) in recs.iter().zip(&want) {
                    prop_assert_eq!(rec.line, *line);
                    let cells: Vec<String> = rec.input.columns().into_iter().map(|(_, v)| v).collect();
                    prop_assert_eq!(&cells, row);
                    match (&rec.parsed, OrderNo::parse(&row[idx])) {
                        (Ok((no, None)), Ok(want_no)) => prop_assert_eq!(no, &want_no),
                        (Err(RejectReason::OrderNo(got)), Err(want_err)) => {
                            prop_assert_eq!(got, &want_err)
                        }
                        (got, want) => prop_assert!(false, "got {:?}, want {:?}", got, want),
                    }
                }
            }
        }
    }
}
