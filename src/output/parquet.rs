//! The Parquet encoding of observation rows (cargo feature `parquet`).
//!
//! Column types (see [`crate::schema`] for the descriptions):
//! - text columns and **amounts** are `BYTE_ARRAY (STRING)`: amounts stay the
//!   exact decimal strings of the JSONL/CSV output, because no fixed DECIMAL
//!   precision holds every amount a chain may report (18-decimal tokens above
//!   10^20 whole units, 24-decimal tokens), and readers disagree on DECIMAL wider
//!   than 38 digits; loaders cast them (`CAST(amount AS DECIMAL(38, 18))`,
//!   BigQuery `BIGNUMERIC`);
//! - `settled` is `BOOLEAN`, `polls` is `INT64`;
//! - times are `INT64 TIMESTAMP(MICROS, isAdjustedToUTC = true)`;
//! - the input row is a group `input` with one optional `STRING` field per input
//!   column (read back as a struct: `input.note`); absent for queue input.
//!
//! Rows are buffered column by column (string bytes back to back, no per-value
//! allocation) up to [`ROW_GROUP_ROWS`] rows or [`ROW_GROUP_BYTES`] of text and
//! written as one row group, so memory stays flat however large the file.
//! The footer is written by `finish`; until then the file lives under its
//! temporary name, so a killed writer never leaves a readable-looking file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use parquet::basic::{LogicalType, Repetition, TimeUnit, Type as PhysicalType};
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnPath, Type, TypePtr};

use crate::model::{Amount, Observation};
use crate::schema::{COLUMNS, Column, ColumnType};

use super::Compression;
use super::atomic::HashingWriter;

/// Rows per row group at most. With [`ROW_GROUP_BYTES`], this is what bounds
/// memory: 32,768 rows and 8 MiB gave a peak RSS of 58-79 MiB that grew with the
/// file (mimalloc keeps some of each row group's encoder buffers); 16,384 rows
/// and 4 MiB give 52-59 MiB at 25,000 and at 200,000 orders and 64 MiB at
/// 1,000,000 (`bench/results-1m-parquet.md`), for a file about 2 % larger.
pub const ROW_GROUP_ROWS: usize = 16 * 1024;
/// Buffered string bytes that close a row group early (large input columns).
pub const ROW_GROUP_BYTES: usize = 4 * 1024 * 1024;
/// Columns whose values (nearly) never repeat: a dictionary would only be built
/// and thrown away for them (the writer falls back to plain encoding once it
/// grows), so they are written plain from the start. Smaller files, less work.
const NO_DICTIONARY: [&str; 5] = [
    "order_no",
    "payment_no",
    "tx_hash",
    "observed_at",
    "first_seen_at",
];

/// One output column, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Required string.
    Str,
    /// Optional string.
    OptStr,
    Bool,
    Int64,
    /// Optional UTC timestamp in microseconds.
    OptTime,
    /// Required UTC timestamp in microseconds.
    Time,
}

/// How fixed column `c` of [`crate::schema::COLUMNS`] (the one table of
/// column names, types and nullability) is stored.
fn kind(c: &Column) -> Kind {
    match (c.ty, c.nullable) {
        (ColumnType::String | ColumnType::Decimal, false) => Kind::Str,
        (ColumnType::String | ColumnType::Decimal, true) => Kind::OptStr,
        (ColumnType::Boolean, _) => Kind::Bool,
        (ColumnType::Int64, _) => Kind::Int64,
        (ColumnType::Timestamp, false) => Kind::Time,
        (ColumnType::Timestamp, true) => Kind::OptTime,
    }
}

fn pq_err(e: parquet::errors::ParquetError) -> io::Error {
    match e {
        parquet::errors::ParquetError::External(inner) => match inner.downcast::<io::Error>() {
            Ok(io) => *io,
            Err(other) => io::Error::other(other),
        },
        other => io::Error::other(other),
    }
}

/// The file's Parquet schema: the fixed columns, then a group `input` with the
/// given input columns (omitted when there are none).
fn schema(input_columns: &[String]) -> Result<TypePtr, parquet::errors::ParquetError> {
    let mut fields: Vec<TypePtr> = Vec::with_capacity(COLUMNS.len() + 1);
    for c in &COLUMNS {
        let (name, kind) = (c.name, kind(c));
        let (physical, logical, repetition) = match kind {
            Kind::Str => (
                PhysicalType::BYTE_ARRAY,
                Some(LogicalType::String),
                Repetition::REQUIRED,
            ),
            Kind::OptStr => (
                PhysicalType::BYTE_ARRAY,
                Some(LogicalType::String),
                Repetition::OPTIONAL,
            ),
            Kind::Bool => (PhysicalType::BOOLEAN, None, Repetition::REQUIRED),
            Kind::Int64 => (
                PhysicalType::INT64,
                Some(LogicalType::integer(64, true)),
                Repetition::REQUIRED,
            ),
            Kind::OptTime | Kind::Time => (
                PhysicalType::INT64,
                Some(LogicalType::timestamp(true, TimeUnit::MICROS)),
                if kind == Kind::Time {
                    Repetition::REQUIRED
                } else {
                    Repetition::OPTIONAL
                },
            ),
        };
        fields.push(Arc::new(
            Type::primitive_type_builder(name, physical)
                .with_logical_type(logical)
                .with_repetition(repetition)
                .build()?,
        ));
    }
    if !input_columns.is_empty() {
        let inputs = input_columns
            .iter()
            .map(|c| {
                Type::primitive_type_builder(c, PhysicalType::BYTE_ARRAY)
                    .with_logical_type(Some(LogicalType::String))
                    .with_repetition(Repetition::OPTIONAL)
                    .build()
                    .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        fields.push(Arc::new(
            Type::group_type_builder("input")
                .with_repetition(Repetition::REQUIRED)
                .with_fields(inputs)
                .build()?,
        ));
    }
    Ok(Arc::new(
        Type::group_type_builder("paysync_observation")
            .with_fields(fields)
            .build()?,
    ))
}

fn codec(c: Compression) -> io::Result<parquet::basic::Compression> {
    use parquet::basic::{Compression as C, GzipLevel, ZstdLevel};
    Ok(match c {
        Compression::None => C::UNCOMPRESSED,
        Compression::Snappy => C::SNAPPY,
        Compression::Gzip => C::GZIP(GzipLevel::default()),
        Compression::Zstd => C::ZSTD(ZstdLevel::try_new(3).map_err(pq_err)?),
    })
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// One column's values for the current row group, stored compactly: string
/// bytes back to back in one buffer (sliced without copying at flush), numbers
/// in plain vectors, definition levels only where the column is optional.
#[derive(Debug, Default)]
struct ColumnBuf {
    /// String bytes of the present values, back to back.
    data: Vec<u8>,
    /// End offset in `data` of each present string value.
    ends: Vec<usize>,
    /// INT64 values (polls, times) or booleans as 0/1.
    numbers: Vec<i64>,
    /// Definition levels (1 present, 0 null), for optional columns.
    defs: Vec<i16>,
}

impl ColumnBuf {
    fn push_str(&mut self, v: Option<&str>, optional: bool) {
        if let Some(s) = v {
            self.data.extend_from_slice(s.as_bytes());
            self.ends.push(self.data.len());
        }
        if optional {
            self.defs.push(i16::from(v.is_some()));
        }
    }

    fn push_number(&mut self, v: Option<i64>, optional: bool) {
        if let Some(n) = v {
            self.numbers.push(n);
        }
        if optional {
            self.defs.push(i16::from(v.is_some()));
        }
    }

    /// The buffered strings as parquet values sharing one allocation.
    fn take_strings(&mut self) -> Vec<ByteArray> {
        let buf = Bytes::from(std::mem::take(&mut self.data));
        let mut start = 0;
        let values = self
            .ends
            .iter()
            .map(|&end| {
                let v = ByteArray::from(buf.slice(start..end));
                start = end;
                v
            })
            .collect();
        self.ends.clear();
        values
    }

    fn defs(&self, optional: bool) -> Option<&[i16]> {
        optional.then_some(self.defs.as_slice())
    }

    fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
        self.numbers.clear();
        self.defs.clear();
    }
}

/// Encodes rows into a Parquet file through the hashing file writer.
pub(super) struct ParquetSink {
    writer: SerializedFileWriter<HashingWriter<File>>,
    /// The file's input columns, and each one's position.
    input_columns: Vec<String>,
    index: HashMap<String, usize>,
    /// One buffer per fixed column, then one per input column.
    columns: Vec<ColumnBuf>,
    /// Per input column: the index into the current row's `input`, or `usize::MAX`.
    slots: Vec<usize>,
    /// Rows in the current row group.
    rows: usize,
}

impl ParquetSink {
    pub(super) fn new(
        inner: HashingWriter<File>,
        input_columns: Vec<String>,
        compression: Compression,
    ) -> io::Result<Self> {
        let props = NO_DICTIONARY
            .iter()
            .fold(WriterProperties::builder(), |b, c| {
                b.set_column_dictionary_enabled(ColumnPath::from(*c), false)
            });
        let props = props
            .set_compression(codec(compression)?)
            .set_created_by(format!("paysync {}", env!("CARGO_PKG_VERSION")))
            .set_key_value_metadata(Some(vec![KeyValue::new(
                "paysync.schema_version".to_owned(),
                crate::model::SCHEMA_VERSION.to_string(),
            )]))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let writer = SerializedFileWriter::new(
            inner,
            schema(&input_columns).map_err(pq_err)?,
            Arc::new(props),
        )
        .map_err(pq_err)?;
        let index = input_columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        let mut columns = Vec::new();
        columns.resize_with(COLUMNS.len() + input_columns.len(), ColumnBuf::default);
        Ok(Self {
            writer,
            slots: vec![usize::MAX; input_columns.len()],
            input_columns,
            index,
            columns,
            rows: 0,
        })
    }

    pub(super) fn write(&mut self, row: &Observation) -> io::Result<()> {
        for (i, kind) in COLUMNS.iter().map(kind).enumerate() {
            let col = &mut self.columns[i];
            match kind {
                Kind::Str => col.push_str(text(row, i), false),
                Kind::OptStr => col.push_str(text(row, i), true),
                Kind::Bool => col.push_number(Some(i64::from(row.settled)), false),
                Kind::Int64 => col.push_number(Some(i64::from(row.polls)), false),
                Kind::Time => col.push_number(time(row, i), false),
                Kind::OptTime => col.push_number(time(row, i), true),
            }
        }
        self.buffer_inputs(&row.input);
        self.rows += 1;
        let buffered: usize = self.columns.iter().map(|c| c.data.len()).sum();
        if self.rows >= ROW_GROUP_ROWS || buffered >= ROW_GROUP_BYTES {
            self.flush_group()?;
        }
        Ok(())
    }

    /// Buffers the row's input values under this file's input columns: in order
    /// when the row has exactly these columns (the usual case), else by name.
    fn buffer_inputs(&mut self, input: &[(String, String)]) {
        let first = COLUMNS.len();
        let same_order = input.len() == self.input_columns.len()
            && input
                .iter()
                .zip(&self.input_columns)
                .all(|((name, _), col)| name == col);
        if same_order {
            for (j, (_, value)) in input.iter().enumerate() {
                self.columns[first + j].push_str(Some(value), true);
            }
            return;
        }
        self.slots.fill(usize::MAX);
        for (i, (name, _)) in input.iter().enumerate() {
            if let Some(&slot) = self.index.get(name.as_str())
                && self.slots[slot] == usize::MAX
            {
                self.slots[slot] = i;
            }
        }
        for (j, &i) in self.slots.iter().enumerate() {
            let value = input.get(i).map(|(_, v)| v.as_str());
            self.columns[first + j].push_str(value, true);
        }
    }

    /// Writes the buffered rows as one row group.
    fn flush_group(&mut self) -> io::Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let mut group = self.writer.next_row_group().map_err(pq_err)?;
        let kinds = COLUMNS
            .iter()
            .map(kind)
            .chain(std::iter::repeat(Kind::OptStr));
        for (buf, kind) in self.columns.iter_mut().zip(kinds) {
            let mut col = group
                .next_column()
                .map_err(pq_err)?
                .ok_or_else(|| io::Error::other("parquet schema has fewer columns than rows"))?;
            write_column(col.untyped(), kind, buf)?;
            col.close().map_err(pq_err)?;
            buf.clear();
        }
        group.close().map_err(pq_err)?;
        self.rows = 0;
        Ok(())
    }

    /// Writes the last row group and the footer; returns the hashing writer.
    pub(super) fn finish(mut self) -> io::Result<HashingWriter<File>> {
        self.flush_group()?;
        self.writer.into_inner().map_err(pq_err)
    }
}

/// The string value of fixed column `i` of `row` (`None`: null).
fn text(row: &Observation, i: usize) -> Option<&str> {
    match i {
        0 => Some(&row.provider),
        1 => Some(row.order_no.as_str()),
        2 => Some(row.status.as_str()),
        3 => Some(&row.provider_status),
        5 => Some(row.tracking.as_str()),
        6 => row.amount.as_ref().map(Amount::as_str),
        7 => row.currency.as_deref(),
        8 => row.quote_amount.as_ref().map(Amount::as_str),
        9 => row.quote_currency.as_deref(),
        10 => row.expected_amount.as_ref().map(Amount::as_str),
        11 => row.payment_no.as_deref(),
        12 => row.payment_method.as_deref(),
        13 => row.tx_hash.as_deref(),
        14 => row.from_address.as_deref(),
        15 => row.to_address.as_deref(),
        16 => row.chain_id.as_deref(),
        17 => row.paid_account.as_deref(),
        23 => row.error.as_deref(),
        _ => None,
    }
}

/// The time of fixed column `i` of `row`, in microseconds since the epoch.
fn time(row: &Observation, i: usize) -> Option<i64> {
    match i {
        18 => row.created_at.map(micros),
        19 => row.paid_at.map(micros),
        20 => Some(micros(row.observed_at)),
        21 => Some(micros(row.first_seen_at)),
        _ => None,
    }
}

fn write_column(col: &mut ColumnWriter<'_>, kind: Kind, buf: &mut ColumnBuf) -> io::Result<()> {
    let optional = matches!(kind, Kind::OptStr | Kind::OptTime);
    match (kind, col) {
        (Kind::Str | Kind::OptStr, ColumnWriter::ByteArrayColumnWriter(w)) => {
            let values = buf.take_strings();
            w.write_batch(&values, buf.defs(optional), None)
                .map_err(pq_err)?;
        }
        (Kind::Bool, ColumnWriter::BoolColumnWriter(w)) => {
            let values: Vec<bool> = buf.numbers.iter().map(|&n| n != 0).collect();
            w.write_batch(&values, None, None).map_err(pq_err)?;
        }
        (Kind::Int64 | Kind::Time | Kind::OptTime, ColumnWriter::Int64ColumnWriter(w)) => {
            w.write_batch(&buf.numbers, buf.defs(optional), None)
                .map_err(pq_err)?;
        }
        (kind, _) => {
            return Err(io::Error::other(format!(
                "parquet column of kind {kind:?} has an unexpected physical type"
            )));
        }
    }
    Ok(())
}

/// Rows in a Parquet file, from its footer (`verify`).
pub(super) fn count_rows(file: File) -> io::Result<u64> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(file).map_err(pq_err)?;
    u64::try_from(reader.metadata().file_metadata().num_rows())
        .map_err(|_| io::Error::other("negative row count in parquet footer"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{minimal, sample, t};
    use super::super::{Encoding, FileWriter, Format, ManifestExtra, verify};
    use super::*;
    use crate::model::PayStatus;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    fn write(dir: &std::path::Path, rows: &[Observation], cols: &[&str], c: Compression) {
        let mut w = FileWriter::create_with(
            dir,
            "o",
            Encoding::with(Format::Parquet, c).unwrap(),
            cols.iter().map(|s| (*s).to_owned()).collect(),
            Utc::now(),
        )
        .unwrap();
        for r in rows {
            w.write(r).unwrap();
        }
        let m = w
            .commit(ManifestExtra {
                run_id: "r".into(),
                provider: "p".into(),
            })
            .unwrap();
        assert_eq!(m.rows, rows.len() as u64);
        assert_eq!(m.format, "parquet");
        assert_eq!(m.compression, c);
        assert!(verify(dir, "o").unwrap());
    }

    /// The parquet crate's reader gets every value back with its type: exact
    /// amount strings, UTC microsecond timestamps, nulls for absent values, the
    /// input group by column name (a row lacking a column reads null).
    #[test]
    fn values_read_back_typed() {
        let dir = tempfile::tempdir().unwrap();
        let mut no_note = minimal("A2", PayStatus::Pending);
        no_note.input = vec![("formula".into(), "x".into())];
        let rows = [sample(), no_note];
        write(dir.path(), &rows, &["note", "formula"], Compression::Zstd);
        let file = std::fs::File::open(dir.path().join("o.parquet")).unwrap();
        let reader = SerializedFileReader::new(file).unwrap();
        let read: Vec<_> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(read.len(), 2);
        let get = |i: usize, name: &str| -> Field {
            read[i]
                .get_column_iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, f)| f.clone())
                .unwrap_or_else(|| panic!("no column {name}"))
        };
        assert_eq!(get(0, "amount"), Field::Str("1.234567890123456789".into()));
        assert_eq!(get(0, "quote_amount"), Field::Str("-7.9".into()));
        assert_eq!(get(0, "settled"), Field::Bool(true));
        assert_eq!(get(0, "polls"), Field::Long(2));
        assert_eq!(
            get(0, "created_at"),
            Field::TimestampMicros(t("2024-04-03T05:40:06.120Z").timestamp_micros())
        );
        assert_eq!(
            get(0, "observed_at"),
            Field::TimestampMicros(t("2024-04-03T06:00:00.5Z").timestamp_micros())
        );
        assert_eq!(get(0, "error"), Field::Str("=cmd|' /C calc'!A0".into()));
        assert_eq!(get(1, "amount"), Field::Null);
        assert_eq!(get(1, "paid_at"), Field::Null);
        let Field::Group(input) = get(0, "input") else {
            panic!("input is not a group")
        };
        let input: Vec<_> = input
            .get_column_iter()
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        assert_eq!(
            input,
            vec![
                ("note".into(), Field::Str("line1\nline2, \"quoted\"".into())),
                ("formula".into(), Field::Str("@SUM(A1)".into())),
            ]
        );
        let Field::Group(input) = get(1, "input") else {
            panic!("input is not a group")
        };
        assert_eq!(input.get_column_iter().next().unwrap().1, &Field::Null);
        let kv = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap();
        assert!(kv.iter().any(|k| k.key == "paysync.schema_version"));
    }

    /// Large files are split into row groups of at most ROW_GROUP_ROWS rows
    /// (memory stays bounded), every codec reads back, and no input columns
    /// means no input group.
    #[test]
    fn row_groups_and_codecs() {
        for c in [
            Compression::Zstd,
            Compression::Snappy,
            Compression::Gzip,
            Compression::None,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let n = if c == Compression::Zstd {
                ROW_GROUP_ROWS * 2 + 7
            } else {
                10
            };
            let rows: Vec<_> = (0..n)
                .map(|i| minimal(&format!("O{i}"), PayStatus::Paid))
                .collect();
            write(dir.path(), &rows, &[], c);
            let file = std::fs::File::open(dir.path().join("o.parquet")).unwrap();
            let reader = SerializedFileReader::new(file).unwrap();
            let md = reader.metadata();
            assert_eq!(md.file_metadata().num_rows(), n as i64);
            assert!(
                md.row_groups()
                    .iter()
                    .all(|g| g.num_rows() as usize <= ROW_GROUP_ROWS)
            );
            if c == Compression::Zstd {
                assert_eq!(md.num_row_groups(), 3);
            }
            let schema = md.file_metadata().schema_descr();
            assert_eq!(schema.num_columns(), COLUMNS.len(), "{c}");
            let last: Vec<_> = reader
                .get_row_iter(None)
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(
                last[n - 1].get_column_iter().nth(1).unwrap().1,
                &Field::Str(format!("O{}", n - 1))
            );
        }
    }

    /// Across row-group boundaries, with nulls, empty strings and lengths that
    /// vary, every string value reads back in its own row.
    #[test]
    fn strings_read_back_in_place_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let n = ROW_GROUP_ROWS + 1003;
        let hash = |i: usize| (!i.is_multiple_of(3)).then(|| "h".repeat(i % 7) + &i.to_string());
        let note = |i: usize| match i % 5 {
            0 => None,
            1 => Some(String::new()),
            _ => Some(format!("note {i} {}", "n".repeat(i % 11))),
        };
        let rows: Vec<_> = (0..n)
            .map(|i| {
                let mut r = minimal(&format!("O{i}"), PayStatus::Paid);
                r.tx_hash = hash(i);
                r.input = note(i)
                    .map(|v| vec![("note".to_owned(), v)])
                    .unwrap_or_default();
                r
            })
            .collect();
        write(dir.path(), &rows, &["note"], Compression::Snappy);
        let file = std::fs::File::open(dir.path().join("o.parquet")).unwrap();
        let reader = SerializedFileReader::new(file).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 2);
        let text = |v: Option<String>| v.map_or(Field::Null, Field::Str);
        let mut read = 0;
        for (i, row) in reader.get_row_iter(None).unwrap().enumerate() {
            let row = row.unwrap();
            let get = |name: &str| {
                row.get_column_iter()
                    .find(|(n, _)| n.as_str() == name)
                    .map(|(_, f)| f.clone())
                    .unwrap()
            };
            assert_eq!(get("order_no"), Field::Str(format!("O{i}")), "row {i}");
            assert_eq!(get("tx_hash"), text(hash(i)), "row {i}");
            let Field::Group(input) = get("input") else {
                panic!("input is not a group")
            };
            assert_eq!(input.get_column_iter().next().unwrap().1, &text(note(i)));
            read += 1;
        }
        assert_eq!(read, n);
    }

    /// The columns named in NO_DICTIONARY (all real columns) are written without
    /// a dictionary page; columns of repeating values keep theirs.
    #[test]
    fn unique_columns_have_no_dictionary() {
        for c in NO_DICTIONARY {
            assert!(COLUMNS.iter().any(|col| col.name == c), "{c} is no column");
        }
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<_> = (0..500)
            .map(|i| {
                let mut r = sample();
                r.order_no = format!("O{i}").parse().unwrap();
                r.tx_hash = Some(format!("0x{i:064x}"));
                r.payment_no = Some(format!("P{i}"));
                r.observed_at += chrono::Duration::microseconds(i);
                r.first_seen_at += chrono::Duration::microseconds(i);
                r
            })
            .collect();
        write(dir.path(), &rows, &[], Compression::Zstd);
        let file = std::fs::File::open(dir.path().join("o.parquet")).unwrap();
        let reader = SerializedFileReader::new(file).unwrap();
        let group = reader.metadata().row_group(0);
        let has_dictionary = |name: &str| {
            group
                .columns()
                .iter()
                .find(|c| c.column_path().string() == name)
                .unwrap_or_else(|| panic!("no column {name}"))
                .dictionary_page_offset()
                .is_some()
        };
        for c in NO_DICTIONARY {
            assert!(!has_dictionary(c), "{c} has a dictionary");
        }
        for c in ["provider", "status", "currency", "chain_id", "polls"] {
            assert!(has_dictionary(c), "{c} has no dictionary");
        }
    }

    /// Large text closes a row group early: buffered bytes stay bounded even
    /// when the row count limit is far away.
    #[test]
    fn large_values_close_row_groups_early() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(10 * 1024);
        let rows: Vec<_> = (0..1200)
            .map(|i| {
                let mut r = minimal(&format!("O{i}"), PayStatus::Paid);
                r.input = vec![("blob".into(), big.clone())];
                r
            })
            .collect();
        write(dir.path(), &rows, &["blob"], Compression::Zstd);
        let file = std::fs::File::open(dir.path().join("o.parquet")).unwrap();
        let reader = SerializedFileReader::new(file).unwrap();
        let groups = reader.metadata().num_row_groups();
        assert!(groups >= 2, "{groups} row groups");
        let n = reader.get_row_iter(None).unwrap().count();
        assert_eq!(n, 1200);
    }

    /// The per-index accessors agree with the schema table: on a row with every
    /// field set, string columns give text, time columns a time, and no column
    /// gives both.
    #[test]
    fn accessors_follow_the_schema_table() {
        let mut row = sample();
        row.paid_account = Some("acct".into());
        for (i, c) in COLUMNS.iter().enumerate() {
            let (t, tm) = (text(&row, i), time(&row, i));
            match kind(c) {
                Kind::Str | Kind::OptStr => assert!(t.is_some() && tm.is_none(), "{}", c.name),
                Kind::Time | Kind::OptTime => assert!(t.is_none() && tm.is_some(), "{}", c.name),
                Kind::Bool | Kind::Int64 => assert!(t.is_none() && tm.is_none(), "{}", c.name),
            }
        }
        assert_eq!(text(&row, 1), Some("ORD-1"));
        assert_eq!(COLUMNS[1].name, "order_no");
    }

    /// A truncated file (no footer) does not verify.
    #[test]
    fn truncated_file_fails_verify() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[sample()], &["note"], Compression::Zstd);
        let path = dir.path().join("o.parquet");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(!verify(dir.path(), "o").unwrap());
    }
}
