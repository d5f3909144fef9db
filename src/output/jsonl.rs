//! The JSONL encoding of observation rows: one JSON object per line, keys in
//! schema order, `input` as an object; values are written as they are (no
//! formula escaping).
//!
//! - `JsonlSink`: the encoder behind a JSONL [`super::FileWriter`].

use std::io::{self, BufWriter, Write};

use crate::model::{OUTPUT_COLUMNS, Observation};

use super::WRITE_BUFFER;
use super::encode::TextEncoder;

/// The keys of every JSONL object, in order (for the manifest).
pub(super) fn keys() -> Vec<String> {
    OUTPUT_COLUMNS
        .iter()
        .map(|c| (*c).to_owned())
        .chain(std::iter::once("input".to_owned()))
        .collect()
}

/// Encodes rows as JSON lines into a buffered hashing file writer.
pub(super) struct JsonlSink {
    writer: BufWriter<TextEncoder>,
}

impl JsonlSink {
    pub(super) fn new(inner: TextEncoder) -> Self {
        Self {
            writer: BufWriter::with_capacity(WRITE_BUFFER, inner),
        }
    }

    pub(super) fn write(&mut self, row: &Observation) -> io::Result<()> {
        serde_json::to_writer(&mut self.writer, row).map_err(io::Error::from)?;
        self.writer.write_all(b"\n")
    }

    /// Writes an already encoded row (one JSON object without a newline).
    pub(super) fn write_line(&mut self, json: &str) -> io::Result<()> {
        debug_assert!(!json.contains('\n'));
        self.writer.write_all(json.as_bytes())?;
        self.writer.write_all(b"\n")
    }

    /// Flushes everything and returns the hashing writer.
    pub(super) fn finish(self) -> io::Result<TextEncoder> {
        self.writer.into_inner().map_err(|e| e.into_error())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{minimal, sample};
    use super::super::{FileWriter, Format, ManifestExtra};
    use super::*;
    use crate::model::PayStatus;
    use chrono::Utc;

    /// A row written as stored JSON is byte for byte the row written from the
    /// observation, and counts toward the manifest the same way.
    #[test]
    fn json_lines_match_encoded_rows() {
        let rows = [sample(), minimal("A2", PayStatus::NotFound)];
        let mut files = Vec::new();
        for raw in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut w =
                FileWriter::create(dir.path(), "o", Format::Jsonl, vec![], Utc::now()).unwrap();
            for r in &rows {
                if raw {
                    let json = serde_json::to_string(r).unwrap();
                    w.write_json_line(&json, r.status).unwrap();
                } else {
                    w.write(r).unwrap();
                }
            }
            let m = w
                .commit(ManifestExtra {
                    run_id: "r".into(),
                    provider: "p".into(),
                })
                .unwrap();
            assert_eq!((m.counts["paid"], m.counts["not_found"]), (1, 1));
            files.push(std::fs::read(dir.path().join("o.jsonl")).unwrap());
        }
        assert_eq!(files[0], files[1]);
        let dir = tempfile::tempdir().unwrap();
        let mut w = FileWriter::create(dir.path(), "o", Format::Csv, vec![], Utc::now()).unwrap();
        assert!(w.write_json_line("{}", PayStatus::Paid).is_err());
    }

    /// JSONL rows parse back into the same observations; keys come in schema
    /// order with `input` last as an object; nothing is escaped; an 18-decimal
    /// amount stays an exact string.
    #[test]
    fn jsonl_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [sample(), minimal("A2", PayStatus::NotFound)];
        let mut w = FileWriter::create(dir.path(), "o", Format::Jsonl, vec![], Utc::now()).unwrap();
        for r in &rows {
            w.write(r).unwrap();
        }
        let m = w
            .commit(ManifestExtra {
                run_id: "r".into(),
                provider: "p".into(),
            })
            .unwrap();
        assert_eq!(m.columns, keys());
        let text = std::fs::read_to_string(dir.path().join("o.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(text.ends_with('\n'));
        for (line, want) in lines.iter().zip(&rows) {
            let back: Observation = serde_json::from_str(line).unwrap();
            assert_eq!(&back, want);
        }
        let first = lines[0];
        assert!(first.starts_with("{\"provider\":\"payprotocol\",\"order_no\":\"ORD-1\","));
        assert!(first.contains("\"amount\":\"1.234567890123456789\""));
        assert!(first.contains("\"error\":\"=cmd|' /C calc'!A0\""));
        assert!(first.ends_with(
            "\"input\":{\"order_no\":\"ORD-1\",\"note\":\"line1\\nline2, \\\"quoted\\\"\",\"formula\":\"@SUM(A1)\"}}"
        ));
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["amount"], serde_json::Value::Null);
        assert_eq!(v["input"], serde_json::json!({}));
    }
}
