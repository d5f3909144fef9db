//! Warehouse outputs through the real binary: Parquet read back with the
//! parquet crate's reader and compared with JSONL of the same orders,
//! compressed text, partitioned paths with `_SUCCESS`, the `schema` command,
//! a crash while a Parquet file is written, and (when DuckDB is installed)
//! DuckDB reading every format.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use paysync::mock::MockOptions;
use paysync::model::OUTPUT_COLUMNS;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::util::*;

const SECRET: &str = paysync::mock::DEFAULT_API_SECRET;
const PARTITIONED: &str = "{provider}/dt={date}/paysync-{run_id}.{format}";
const TIME_COLUMNS: [&str; 4] = ["created_at", "paid_at", "observed_at", "first_seen_at"];

/// Orders with every final status kind, exact big amounts, and input columns
/// that need quoting, escaping and UTF-8 care.
fn input_csv() -> (String, Vec<String>) {
    let mut orders = Vec::new();
    for (m, n) in [
        ("PAID", 6),
        ("BIG", 3),
        ("NOTFOUND", 2),
        ("FAILED", 2),
        ("REFUND", 2),
    ] {
        orders.extend(numbered(m, n));
    }
    let mut s = String::from("order_no,note,formula\n");
    for (i, o) in orders.iter().enumerate() {
        s.push_str(&format!(
            "{o},\"line {i}\nsecond, \"\"quoted\"\" é\",=SUM(A{i})\n"
        ));
    }
    (s, orders)
}

/// Every committed data file under `root` (recursively), by manifest, checked
/// against the manifest's sha256 and row count, as JSON rows in the JSONL shape.
fn committed(root: &Path) -> Vec<(PathBuf, Value, Vec<Value>)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".manifest.json") {
                let m: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                let data = dir.join(m["data_file"].as_str().unwrap());
                let bytes = std::fs::read(&data).unwrap();
                assert_eq!(
                    hex::encode(Sha256::digest(&bytes)),
                    m["sha256"].as_str().unwrap(),
                    "{}",
                    data.display()
                );
                let rows = read_rows(&data, &m);
                assert_eq!(rows.len() as u64, m["rows"].as_u64().unwrap());
                found.push((data, m, rows));
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

fn decompress(path: &Path, compression: &str) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap();
    let mut out = Vec::new();
    match compression {
        "none" => {
            let mut f = file;
            f.read_to_end(&mut out).unwrap();
        }
        "gzip" => {
            flate2::read::MultiGzDecoder::new(file)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => {
            zstd::stream::read::Decoder::new(file)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
        other => panic!("unexpected compression {other}"),
    }
    out
}

/// A data file's rows as JSON objects shaped like JSONL rows.
fn read_rows(path: &Path, manifest: &Value) -> Vec<Value> {
    let compression = manifest["compression"].as_str().unwrap();
    match manifest["format"].as_str().unwrap() {
        "jsonl" => String::from_utf8(decompress(path, compression))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        "csv" => {
            let bytes = decompress(path, compression);
            let mut rdr = csv::Reader::from_reader(bytes.as_slice());
            let header: Vec<String> = rdr.headers().unwrap().iter().map(str::to_owned).collect();
            assert_eq!(json!(header), manifest["columns"]);
            rdr.records()
                .map(|r| {
                    let r = r.unwrap();
                    let mut obj = Map::new();
                    let mut input = Map::new();
                    for (h, v) in header.iter().zip(r.iter()) {
                        match h.strip_prefix("input.") {
                            Some(k) => {
                                input.insert(k.into(), json!(v));
                            }
                            None => {
                                obj.insert(h.clone(), json!(v));
                            }
                        }
                    }
                    obj.insert("input".into(), Value::Object(input));
                    Value::Object(obj)
                })
                .collect()
        }
        "parquet" => {
            let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
            reader
                .get_row_iter(None)
                .unwrap()
                .map(|row| {
                    let mut obj = Map::new();
                    obj.insert("input".into(), json!({}));
                    for (name, field) in row.unwrap().get_column_iter() {
                        if name == "input" {
                            let Field::Group(g) = field else {
                                panic!("input is {field:?}")
                            };
                            let mut input = Map::new();
                            for (k, v) in g.get_column_iter() {
                                if let Field::Str(s) = v {
                                    input.insert(k.clone(), json!(s));
                                }
                            }
                            obj.insert("input".into(), Value::Object(input));
                        } else {
                            obj.insert(name.clone(), field_json(field));
                        }
                    }
                    Value::Object(obj)
                })
                .collect()
        }
        other => panic!("unexpected format {other}"),
    }
}

fn field_json(f: &Field) -> Value {
    match f {
        Field::Null => Value::Null,
        Field::Bool(b) => json!(b),
        Field::Long(n) => json!(n),
        Field::Str(s) => json!(s),
        Field::TimestampMicros(us) => {
            json!(
                DateTime::<Utc>::from_timestamp_micros(*us)
                    .unwrap()
                    .to_rfc3339()
            )
        }
        other => panic!("unexpected parquet value {other:?}"),
    }
}

fn instant(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()
        .map(|s| DateTime::parse_from_rfc3339(s).unwrap().to_utc())
}

/// Compares two rows column by column. Times compare as instants; paysync's
/// own times (`observed_at`, `first_seen_at`) differ between two runs, so with
/// `same_run == false` they only have to be valid times.
fn assert_same_row(a: &Value, b: &Value, same_run: bool) {
    let o = a["order_no"].as_str().unwrap();
    for col in OUTPUT_COLUMNS {
        let (x, y) = (&a[col], &b[col]);
        if TIME_COLUMNS.contains(&col) {
            let own = col == "observed_at" || col == "first_seen_at";
            if own && !same_run {
                assert!(instant(x).is_some() && instant(y).is_some(), "{o} {col}");
            } else {
                assert_eq!(instant(x), instant(y), "{o} {col}: {x} vs {y}");
            }
        } else {
            assert_eq!(x, y, "{o} {col}");
        }
    }
    assert_eq!(a["input"], b["input"], "{o} input");
}

/// By order number (each order has one final row in these runs).
fn by_order(rows: &[Value]) -> BTreeMap<String, Value> {
    assert_no_duplicates(rows);
    rows.iter()
        .map(|r| (r["order_no"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

async fn run_with(server_url: &str, output: &str) -> (Workspace, Vec<String>) {
    let ws = Workspace::new();
    let (csv, orders) = input_csv();
    ws.write("orders.csv", &csv);
    ws.config(server_url, SECRET, output);
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    (ws, orders)
}

/// Parquet in Hive-style partitions: typed columns that read back (with the
/// parquet crate) to the same values as a JSONL run of the same orders, and to
/// exactly the rows of the same run (times included) as its state file keeps
/// them for JSONL; every amount exact; the file sits at the templated path beside its manifest and
/// the run's `_SUCCESS`; nothing but those files in the output tree.
#[tokio::test(flavor = "multi_thread")]
async fn parquet_partitioned_output_matches_jsonl() {
    let server = mock(MockOptions::default()).await;
    let url = server.payprotocol_base_url();
    let today = Utc::now().format("%Y-%m-%d").to_string();
    let (jsonl_ws, orders) = run_with(&url, "").await;
    let (pq_ws, _) = run_with(
        &url,
        &format!("[output]\nformat = \"parquet\"\npath_template = \"{PARTITIONED}\"\n"),
    )
    .await;

    let jsonl = committed(&jsonl_ws.path("out"));
    let pq = committed(&pq_ws.path("out"));
    assert_eq!((jsonl.len(), pq.len()), (1, 1));
    let (path, manifest, pq_rows) = &pq[0];
    assert_eq!(manifest["format"], "parquet");
    assert_eq!(manifest["compression"], "zstd");
    let run_id = manifest["run_id"].as_str().unwrap();
    let later = Utc::now().format("%Y-%m-%d").to_string();
    let rel = path.strip_prefix(pq_ws.path("out")).unwrap();
    // `{date}` is the UTC date of the export (the test may cross midnight).
    let dir = rel.parent().unwrap().to_string_lossy().into_owned();
    assert!(
        [
            format!("payprotocol/dt={today}"),
            format!("payprotocol/dt={later}")
        ]
        .contains(&dir),
        "{dir}"
    );
    assert_eq!(
        rel.file_name().unwrap().to_string_lossy(),
        format!("paysync-{run_id}.parquet")
    );

    let a = by_order(&jsonl[0].2);
    let b = by_order(pq_rows);
    assert_eq!(a.len(), orders.len());
    assert_eq!(b.len(), orders.len());
    for o in &orders {
        assert_same_row(&a[o], &b[o], false);
    }
    // The same run, value for value, times included: the state file keeps each
    // row as exactly the JSON a JSONL export of this run would write.
    let state = rusqlite::Connection::open_with_flags(
        pq_ws.path("state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let stored: Vec<Value> = state
        .prepare("SELECT row FROM observations ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|r| serde_json::from_str(&r.unwrap()).unwrap())
        .collect();
    let same_run = by_order(&stored);
    assert_eq!(same_run.len(), orders.len());
    for o in &orders {
        assert_same_row(&same_run[o], &b[o], true);
    }
    // Exact amounts: 18 decimals and more than 2^64 base units survive.
    let big = &b[&numbered("BIG", 1)[0]];
    let amount = big["amount"].as_str().unwrap();
    assert!(
        amount.split('.').nth(1).is_some_and(|f| f.len() >= 6),
        "{amount}"
    );

    // Typed columns as a reader sees them.
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let schema = reader.metadata().file_metadata().schema_descr();
    let col = |name: &str| {
        (0..schema.num_columns())
            .map(|i| schema.column(i))
            .find(|c| c.path().string() == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    assert_eq!(
        col("settled").physical_type(),
        parquet::basic::Type::BOOLEAN
    );
    assert_eq!(col("polls").physical_type(), parquet::basic::Type::INT64);
    assert!(matches!(
        col("observed_at").logical_type_ref(),
        Some(parquet::basic::LogicalType::Timestamp(t)) if t.is_adjusted_to_u_t_c
    ));
    assert_eq!(
        col("amount").logical_type_ref(),
        Some(&parquet::basic::LogicalType::String)
    );
    assert_eq!(
        col("input.note").logical_type_ref(),
        Some(&parquet::basic::LogicalType::String)
    );

    // The run-level marker lists the file; only data, manifests, markers.
    let success: Value =
        serde_json::from_slice(&std::fs::read(path.parent().unwrap().join("_SUCCESS")).unwrap())
            .unwrap();
    assert_eq!(success["run_id"], run_id);
    assert_eq!(
        success["files"][0]["data_file"],
        rel.to_string_lossy().as_ref()
    );
    assert_eq!(success["files"][0]["rows"], orders.len());
    assert_eq!(success["files"][0]["sha256"], manifest["sha256"]);
    let mut names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "_SUCCESS".to_owned(),
            format!("paysync-{run_id}.manifest.json"),
            format!("paysync-{run_id}.parquet"),
        ]
    );
}

/// gzip CSV and zstd JSONL: the files are really compressed (magic bytes), the
/// manifest hashes the bytes on disk, and they decompress to the same values as
/// an uncompressed JSONL run (CSV cells carry the formula escape).
#[tokio::test(flavor = "multi_thread")]
async fn compressed_text_outputs_read_back() {
    let server = mock(MockOptions::default()).await;
    let url = server.payprotocol_base_url();
    let (plain_ws, orders) = run_with(&url, "").await;
    let plain = by_order(&committed(&plain_ws.path("out"))[0].2);
    for (format, compression, ext, magic) in [
        (
            "jsonl",
            "zstd",
            "jsonl.zst",
            &[0x28u8, 0xb5, 0x2f, 0xfd][..],
        ),
        ("csv", "gzip", "csv.gz", &[0x1f, 0x8b][..]),
    ] {
        let (ws, _) = run_with(
            &url,
            &format!("[output]\nformat = \"{format}\"\ncompression = \"{compression}\"\n"),
        )
        .await;
        let files = committed(&ws.path("out"));
        assert_eq!(files.len(), 1);
        let (path, manifest, rows) = &files[0];
        assert!(path.to_string_lossy().ends_with(ext), "{}", path.display());
        assert!(std::fs::read(path).unwrap().starts_with(magic));
        assert_eq!(manifest["compression"], compression);
        let got = by_order(rows);
        assert_eq!(got.len(), orders.len());
        for o in &orders {
            let mut want = plain[o].clone();
            if format == "csv" {
                // CSV is all text: booleans and numbers as written, formulas escaped.
                for col in OUTPUT_COLUMNS {
                    want[col] = match &want[col] {
                        Value::Null => json!(""),
                        Value::Bool(b) => json!(b.to_string()),
                        Value::Number(n) => json!(n.to_string()),
                        Value::String(s) => json!(paysync::output::escape_formula(s)),
                        v => v.clone(),
                    };
                }
                for (_, v) in want["input"].as_object_mut().unwrap() {
                    *v = json!(paysync::output::escape_formula(v.as_str().unwrap()));
                }
                let mut g = got[o].clone();
                for col in TIME_COLUMNS {
                    if g[col] == "" {
                        g[col] = Value::Null;
                        want[col] = Value::Null;
                    }
                }
                assert_same_row(&want, &g, false);
            } else {
                assert_same_row(&want, &got[o], false);
            }
        }
    }
}

/// Two runs into the same partition write two files whose names never collide;
/// each run replaces `_SUCCESS`, which names the latest run.
#[tokio::test(flavor = "multi_thread")]
async fn runs_never_collide_in_a_partition() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        &format!("[output]\nformat = \"jsonl\"\ncompression = \"gzip\"\npath_template = \"{PARTITIONED}\"\n"),
    );
    let mut run_ids = Vec::new();
    for batch in ["A", "B"] {
        ws.write(
            "orders.csv",
            &orders_csv(&numbered(&format!("PAID{batch}"), 5)),
        );
        let out = ws.run(&["--input", "orders.csv"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let files = committed(&ws.path("out"));
        run_ids.push(
            files.last().unwrap().1["run_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let files = committed(&ws.path("out"));
    let names: Vec<_> = files.iter().map(|f| f.0.clone()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_ne!(names[0], names[1]);
    let rows: Vec<Value> = files.iter().flat_map(|f| f.2.clone()).collect();
    assert_no_duplicates(&rows);
    assert_eq!(rows.len(), 10);
    let last_dir = files
        .iter()
        .find(|f| f.1["run_id"] == run_ids[1].as_str())
        .unwrap()
        .0
        .parent()
        .unwrap()
        .to_owned();
    let success: Value =
        serde_json::from_slice(&std::fs::read(last_dir.join("_SUCCESS")).unwrap()).unwrap();
    assert_eq!(success["run_id"], run_ids[1].as_str());
    assert!(
        success["files"][0]["data_file"]
            .as_str()
            .unwrap()
            .ends_with(".jsonl.gz")
    );
}

/// SIGKILL half way through writing a Parquet file: nothing readable-looking
/// is left (only the hidden temporary name), and the rerun finishes the export
/// with every order exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn killed_parquet_writer_leaves_no_partial_file() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let orders = numbered("PAID", 40);
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        &format!("[output]\nformat = \"parquet\"\npath_template = \"{PARTITIONED}\"\n"),
    );
    let crashed = ws
        .run_command(&["--input", "orders.csv"])
        .env(paysync::failpoint::ENV, "mid-write")
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));
    assert!(committed(&ws.path("out")).is_empty());
    let mut visible = Vec::new();
    let mut stack = vec![ws.path("out")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                stack.push(p);
            } else if !name.starts_with('.') && !name.starts_with("rejects-") {
                visible.push(name);
            }
        }
    }
    assert!(visible.is_empty(), "visible after the crash: {visible:?}");

    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let files = committed(&ws.path("out"));
    assert_eq!(files.len(), 1);
    let rows = by_order(&files[0].2);
    assert_eq!(rows.keys().cloned().collect::<Vec<_>>(), orders);
}

/// `paysync schema` in its three forms describes exactly the columns the files
/// carry: the JSON and BigQuery column lists equal the CSV header's fixed part
/// and the Parquet file's top-level fields.
#[tokio::test(flavor = "multi_thread")]
async fn schema_command_matches_the_files() {
    let server = mock(MockOptions::default()).await;
    let url = server.payprotocol_base_url();
    let (csv_ws, _) = run_with(&url, "[output]\nformat = \"csv\"\n").await;
    let (pq_ws, _) = run_with(&url, "[output]\nformat = \"parquet\"\n").await;
    let csv_cols: Vec<String> = committed(&csv_ws.path("out"))[0].1["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let pq_path = committed(&pq_ws.path("out"))[0].0.clone();
    let reader = SerializedFileReader::new(std::fs::File::open(pq_path).unwrap()).unwrap();
    let pq_fields: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();

    let ws = Workspace::new();
    let json_out = ws
        .paysync(&[
            "schema",
            "--format",
            "json",
            "--input-column",
            "note,formula",
        ])
        .await;
    assert_eq!(json_out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    let names: Vec<String> = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, pq_fields);
    let flat: Vec<String> = names[..names.len() - 1]
        .iter()
        .cloned()
        .chain(["input.order_no", "input.note", "input.formula"].map(String::from))
        .collect();
    assert_eq!(flat, csv_cols);

    let bq = ws.paysync(&["schema", "--format", "bigquery"]).await;
    let v: Value = serde_json::from_slice(&bq.stdout).unwrap();
    let bq_names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        bq_names,
        names.iter().map(String::as_str).collect::<Vec<_>>()
    );

    let sql = ws.paysync(&["schema", "--format", "sql"]).await;
    let text = stdout(&sql);
    for c in OUTPUT_COLUMNS {
        assert!(
            text.contains(&format!("\n    {c} ")),
            "{c} missing in\n{text}"
        );
    }
    let bad = ws.paysync(&["schema", "--format", "xml"]).await;
    assert_eq!(bad.status.code(), Some(2));
}

/// DuckDB (an independent reader) loads the Parquet, zstd JSONL and gzip CSV
/// outputs and finds the same values as in the plain JSONL output. Runs when
/// `PAYSYNC_TEST_PYTHON` names a Python with the duckdb module (`.ci/run` sets
/// it up); required when `PAYSYNC_REQUIRE_DUCKDB=1`.
#[tokio::test(flavor = "multi_thread")]
async fn duckdb_reads_every_format() {
    let python = std::env::var("PAYSYNC_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_duckdb = std::process::Command::new(&python)
        .args(["-c", "import duckdb"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_duckdb {
        assert!(
            std::env::var("PAYSYNC_REQUIRE_DUCKDB").is_err(),
            "PAYSYNC_REQUIRE_DUCKDB is set but {python} cannot import duckdb"
        );
        eprintln!("skipped: {python} has no duckdb module (set PAYSYNC_TEST_PYTHON)");
        return;
    }
    let server = mock(MockOptions::default()).await;
    let url = server.payprotocol_base_url();
    let mut files = BTreeMap::new();
    let mut keep = Vec::new();
    for (key, output) in [
        ("jsonl", String::new()),
        (
            "parquet",
            format!("[output]\nformat = \"parquet\"\npath_template = \"{PARTITIONED}\"\n"),
        ),
        ("jsonl_zst", "[output]\ncompression = \"zstd\"\n".to_owned()),
        (
            "csv_gz",
            "[output]\nformat = \"csv\"\ncompression = \"gzip\"\n".to_owned(),
        ),
    ] {
        let (ws, _) = run_with(&url, &output).await;
        let (path, _, _) = committed(&ws.path("out")).remove(0);
        files.insert(key, path.to_string_lossy().into_owned());
        keep.push(ws);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/duckdb_check.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .args([
            &files["jsonl"],
            &files["parquet"],
            &files["jsonl_zst"],
            &files["csv_gz"],
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "duckdb check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(report.contains("duckdb: all values match"), "{report}");
}
