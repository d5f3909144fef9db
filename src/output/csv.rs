//! The CSV encoding of observation rows: the fixed columns in schema order, then
//! `input.<name>` columns, every cell formula-escaped.
//!
//! - [`csv_header`]: the header for a set of input columns.
//! - [`escape_formula`]: the spreadsheet-formula escaping of the interface.
//! - `CsvSink`: the encoder behind a CSV [`super::FileWriter`], built for a hot
//!   loop (no allocation per cell except time stamps).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::model::{Amount, OUTPUT_COLUMNS, Observation, rfc3339, rfc3339_millis};

use super::WRITE_BUFFER;
use super::encode::TextEncoder;

/// First characters that make a spreadsheet read a cell as a formula.
const FORMULA_STARTS: [u8; 6] = [b'=', b'+', b'-', b'@', b'\t', b'\r'];

fn needs_escape(s: &str) -> bool {
    s.as_bytes()
        .first()
        .is_some_and(|b| FORMULA_STARTS.contains(b))
}

/// Prefixes `'` to a value whose first character is `=`, `+`, `-`, `@`, tab or
/// carriage return, so spreadsheets show it as text; other values are unchanged.
pub fn escape_formula(s: &str) -> Cow<'_, str> {
    if needs_escape(s) {
        Cow::Owned(format!("'{s}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// [`escape_formula`] into a reused buffer.
pub(crate) fn escape_formula_into(s: &str, out: &mut Vec<u8>) {
    out.clear();
    if needs_escape(s) {
        out.push(b'\'');
    }
    out.extend_from_slice(s.as_bytes());
}

/// The CSV header: [`OUTPUT_COLUMNS`], then `input.<name>` per input column.
pub fn csv_header(input_columns: &[String]) -> Vec<String> {
    OUTPUT_COLUMNS
        .iter()
        .map(|c| (*c).to_owned())
        .chain(input_columns.iter().map(|c| format!("input.{c}")))
        .collect()
}

/// Encodes rows as CSV into a hashing file writer.
pub(super) struct CsvSink {
    writer: ::csv::Writer<TextEncoder>,
    /// Input column names, in output order.
    input_columns: Vec<String>,
    /// Input column name to its position in `input_columns`.
    index: HashMap<String, usize>,
    /// Per output input-column: the index into the row's `input`, or `usize::MAX`.
    slots: Vec<usize>,
    /// Reused buffer for escaped cells.
    cell: Vec<u8>,
    /// Reused buffer for formatted numbers.
    scratch: String,
}

impl CsvSink {
    /// Writes the header and returns the encoder.
    pub(super) fn new(
        inner: TextEncoder,
        input_columns: Vec<String>,
        header: &[String],
    ) -> io::Result<Self> {
        let mut writer = ::csv::WriterBuilder::new()
            .buffer_capacity(WRITE_BUFFER)
            .from_writer(inner);
        let mut cell = Vec::new();
        for h in header {
            put(&mut writer, &mut cell, h).map_err(csv_to_io)?;
        }
        writer.write_record(None::<&[u8]>).map_err(csv_to_io)?;
        let index = input_columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        Ok(Self {
            writer,
            slots: vec![usize::MAX; input_columns.len()],
            input_columns,
            index,
            cell,
            scratch: String::new(),
        })
    }

    /// Encodes one row (values as [`Observation::fixed_values`] gives them).
    pub(super) fn write(&mut self, row: &Observation) -> io::Result<()> {
        self.write_row(row).map_err(csv_to_io)
    }

    fn write_row(&mut self, row: &Observation) -> ::csv::Result<()> {
        let w = &mut self.writer;
        let c = &mut self.cell;
        put(w, c, &row.provider)?;
        put(w, c, &row.order_no)?;
        put(w, c, row.status.as_str())?;
        put(w, c, &row.provider_status)?;
        put(w, c, if row.settled { "true" } else { "false" })?;
        put(w, c, row.tracking.as_str())?;
        put(w, c, amount(&row.amount))?;
        put(w, c, opt(&row.currency))?;
        put(w, c, amount(&row.quote_amount))?;
        put(w, c, opt(&row.quote_currency))?;
        put(w, c, amount(&row.expected_amount))?;
        put(w, c, opt(&row.payment_no))?;
        put(w, c, opt(&row.payment_method))?;
        put(w, c, opt(&row.tx_hash))?;
        put(w, c, opt(&row.from_address))?;
        put(w, c, opt(&row.to_address))?;
        put(w, c, opt(&row.chain_id))?;
        put(w, c, opt(&row.paid_account))?;
        let s = &mut self.scratch;
        // Provider times keep their precision; paysync's own always show milliseconds.
        for (t, millis) in [
            (row.created_at, false),
            (row.paid_at, false),
            (Some(row.observed_at), true),
            (Some(row.first_seen_at), true),
        ] {
            s.clear();
            if let Some(t) = t {
                write_rfc3339(s, t, millis);
            }
            put(w, c, s)?;
        }
        s.clear();
        let _ = write!(s, "{}", row.polls);
        put(w, c, s)?;
        put(w, c, opt(&row.error))?;
        self.write_inputs(&row.input)?;
        self.writer.write_record(None::<&[u8]>)
    }

    /// Writes the row's input values under this file's input columns: in order
    /// when the row has exactly these columns (the usual case), else by name.
    fn write_inputs(&mut self, input: &[(String, String)]) -> ::csv::Result<()> {
        let same_order = input.len() == self.input_columns.len()
            && input
                .iter()
                .zip(&self.input_columns)
                .all(|((name, _), col)| name == col);
        if same_order {
            for (_, value) in input {
                put(&mut self.writer, &mut self.cell, value)?;
            }
            return Ok(());
        }
        self.slots.fill(usize::MAX);
        for (i, (name, _)) in input.iter().enumerate() {
            if let Some(&slot) = self.index.get(name.as_str())
                && self.slots[slot] == usize::MAX
            {
                self.slots[slot] = i;
            }
        }
        for &i in &self.slots {
            let value = input.get(i).map_or("", |(_, v)| v.as_str());
            put(&mut self.writer, &mut self.cell, value)?;
        }
        Ok(())
    }

    /// Flushes everything and returns the hashing writer.
    pub(super) fn finish(self) -> io::Result<TextEncoder> {
        self.writer.into_inner().map_err(|e| e.into_error())
    }
}

/// Appends [`rfc3339`]`(t)` to `out` without allocating: `YYYY-MM-DDTHH:MM:SS`,
/// then 3, 6 or 9 fraction digits only when needed, then `Z`. Years outside
/// 0..=9999 and leap seconds take the general (allocating) path.
/// With `millis`, whole seconds get `.000` too (as [`rfc3339_millis`]).
fn write_rfc3339(out: &mut String, t: DateTime<Utc>, millis: bool) {
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&t.year())
        || nanos >= 1_000_000_000
        || (millis && !nanos.is_multiple_of(1_000_000))
    {
        out.push_str(&if millis {
            rfc3339_millis(t)
        } else {
            rfc3339(t)
        });
        return;
    }
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if nanos == 0 && !millis {
        // Whole seconds: no fraction.
    } else if nanos.is_multiple_of(1_000_000) {
        let _ = write!(out, ".{:03}", nanos / 1_000_000);
    } else if nanos.is_multiple_of(1_000) {
        let _ = write!(out, ".{:06}", nanos / 1_000);
    } else {
        let _ = write!(out, ".{nanos:09}");
    }
    out.push('Z');
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("")
}

fn amount(v: &Option<Amount>) -> &str {
    v.as_ref().map_or("", Amount::as_str)
}

/// Writes one formula-escaped cell.
fn put<W: io::Write>(
    w: &mut ::csv::Writer<W>,
    cell: &mut Vec<u8>,
    value: &str,
) -> ::csv::Result<()> {
    if needs_escape(value) {
        escape_formula_into(value, cell);
        w.write_field(&cell[..])
    } else {
        w.write_field(value)
    }
}

/// A csv error as the io::Error it wraps (or describes); shared with the rejects file.
pub(crate) fn csv_to_io(e: ::csv::Error) -> io::Error {
    match e.into_kind() {
        ::csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{minimal, sample, t};
    use super::super::{FileWriter, Format, ManifestExtra};
    use super::*;
    use crate::model::PayStatus;

    /// The formula escaping table of the interface: `= + - @ tab CR` at the start
    /// get a `'`; anything else, including those characters later on, does not.
    #[test]
    fn formula_escaping_table() {
        let cases = [
            ("=1+1", "'=1+1"),
            ("+1", "'+1"),
            ("-1.5", "'-1.5"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("", ""),
            ("a=b", "a=b"),
            ("1-2", "1-2"),
            (" =x", " =x"),
            ("'=x", "'=x"),
            ("\nx", "\nx"),
            ("ORD-1", "ORD-1"),
        ];
        for (input, want) in cases {
            assert_eq!(escape_formula(input), want, "{input:?}");
            let mut buf = Vec::new();
            escape_formula_into(input, &mut buf);
            assert_eq!(buf, want.as_bytes(), "{input:?}");
        }
    }

    /// The allocation-free time format equals the model's `rfc3339` for whole
    /// seconds, milli-, micro- and nanoseconds, and extreme years.
    #[test]
    fn fast_time_format_matches_model() {
        use chrono::TimeZone;
        let base = Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 7).unwrap();
        let mut cases = vec![
            base,
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(12345, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-5, 1, 1, 0, 0, 0).unwrap(),
        ];
        for nanos in [
            1,
            120_000_000,
            5_000_000,
            123_456_000,
            100_000,
            999_999_999,
            10,
        ] {
            cases.push(base + chrono::Duration::nanoseconds(nanos));
        }
        for t in cases {
            let mut s = String::new();
            write_rfc3339(&mut s, t, false);
            assert_eq!(s, rfc3339(t));
            s.clear();
            write_rfc3339(&mut s, t, true);
            assert_eq!(s, rfc3339_millis(t));
        }
    }

    /// Writes rows to a CSV file and reads it back as string records.
    fn write_and_read(cols: &[&str], rows: &[Observation]) -> Vec<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let cols = cols.iter().map(|c| (*c).to_owned()).collect();
        let mut w = FileWriter::create(dir.path(), "o", Format::Csv, cols, Utc::now()).unwrap();
        for r in rows {
            w.write(r).unwrap();
        }
        let extra = ManifestExtra {
            run_id: "r".into(),
            provider: "p".into(),
        };
        w.commit(extra).unwrap();
        let mut rdr = ::csv::Reader::from_path(dir.path().join("o.csv")).unwrap();
        let mut out = vec![rdr.headers().unwrap().iter().map(str::to_owned).collect()];
        for rec in rdr.records() {
            out.push(rec.unwrap().iter().map(str::to_owned).collect());
        }
        out
    }

    /// A CSV row holds `fixed_values()` in order, escaped, then the input columns
    /// by name; an 18-decimal amount and multi-line input values survive.
    #[test]
    fn csv_round_trip() {
        let obs = sample();
        let table = write_and_read(&["order_no", "note", "formula"], std::slice::from_ref(&obs));
        let header = &table[0];
        assert_eq!(header.len(), 27);
        assert_eq!(&header[..24], &OUTPUT_COLUMNS.map(String::from)[..]);
        assert_eq!(
            &header[24..],
            ["input.order_no", "input.note", "input.formula"]
        );

        let row = &table[1];
        let want: Vec<String> = obs
            .fixed_values()
            .iter()
            .map(|v| escape_formula(v).into_owned())
            .collect();
        assert_eq!(&row[..24], &want[..]);
        assert_eq!(row[6], "1.234567890123456789");
        assert_eq!(row[8], "'-7.9");
        assert_eq!(row[18], "2024-04-03T05:40:06.120Z");
        assert_eq!(row[23], "'=cmd|' /C calc'!A0");
        assert_eq!(
            &row[24..],
            ["ORD-1", "line1\nline2, \"quoted\"", "'@SUM(A1)"]
        );
    }

    /// Rows whose input columns differ from the file's (missing, extra, other
    /// order) are written by name; absent values are empty; empty options are
    /// empty cells.
    #[test]
    fn csv_input_columns_by_name() {
        let mut a = minimal("A1", PayStatus::Pending);
        a.input = vec![("b".into(), "B1".into()), ("a".into(), "A1".into())];
        let mut b = minimal("A2", PayStatus::Paid);
        b.input = vec![("c".into(), "C2".into()), ("zzz".into(), "ignored".into())];
        let c = minimal("A3", PayStatus::Error);
        let table = write_and_read(&["a", "b", "c"], &[a.clone(), b, c]);
        assert_eq!(&table[1][24..], ["A1", "B1", ""]);
        assert_eq!(&table[2][24..], ["", "", "C2"]);
        assert_eq!(&table[3][24..], ["", "", ""]);
        let want: Vec<String> = a.fixed_values().into_iter().collect();
        assert_eq!(&table[1][..24], &want[..]);
        assert_eq!(table[1][6], "");
        assert_eq!(table[1][18], "");
    }

    /// Provider times keep their precision in CSV; paysync's own carry milliseconds.
    #[test]
    fn csv_times() {
        let mut o = minimal("A1", PayStatus::Paid);
        o.paid_at = Some(t("2024-04-03T05:40:06.123Z"));
        let table = write_and_read(&[], &[o]);
        assert_eq!(table[1][19], "2024-04-03T05:40:06.123Z");
        assert_eq!(table[1][20], "2024-04-03T06:00:00.000Z");
    }
}
