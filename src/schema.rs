//! The output schema as data: every column's name, type, nullability and
//! description, printed by `paysync schema` as JSON, as a BigQuery schema file,
//! or as SQL DDL, so that a loader can create its table.
//!
//! - [`COLUMNS`]: the fixed columns, in file order ([`crate::model::OUTPUT_COLUMNS`]).
//! - [`SchemaFormat`] and [`render`].
//!
//! How each type is written: JSONL and CSV carry text (`settled` as
//! `true`/`false`, `polls` as digits, times as RFC 3339 UTC strings, amounts as
//! exact decimal strings); Parquet uses BOOLEAN, INT64,
//! TIMESTAMP(MICROS, UTC) and STRING (amounts stay decimal strings there too: see
//! src/output/parquet.rs).

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::model::{OUTPUT_COLUMNS, SCHEMA_VERSION};

/// A column's logical type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    String,
    /// An exact decimal number written as a string (`"1234.567890123456789"`).
    Decimal,
    Boolean,
    Int64,
    /// A UTC instant (RFC 3339 text, Parquet TIMESTAMP(MICROS, UTC)).
    Timestamp,
}

impl ColumnType {
    fn name(self) -> &'static str {
        match self {
            ColumnType::String => "string",
            ColumnType::Decimal => "decimal_string",
            ColumnType::Boolean => "boolean",
            ColumnType::Int64 => "int64",
            ColumnType::Timestamp => "timestamp",
        }
    }

    fn parquet(self) -> &'static str {
        match self {
            ColumnType::String | ColumnType::Decimal => "BYTE_ARRAY (STRING)",
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Int64 => "INT64",
            ColumnType::Timestamp => "INT64 (TIMESTAMP(MICROS, isAdjustedToUTC=true))",
        }
    }

    /// BigQuery: amounts load as STRING (exact); cast to BIGNUMERIC in a view.
    fn bigquery(self) -> &'static str {
        match self {
            ColumnType::String | ColumnType::Decimal => "STRING",
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Int64 => "INTEGER",
            ColumnType::Timestamp => "TIMESTAMP",
        }
    }

    /// Standard SQL (DuckDB, PostgreSQL): amounts as VARCHAR, cast on read.
    fn sql(self) -> &'static str {
        match self {
            ColumnType::String | ColumnType::Decimal => "VARCHAR",
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Int64 => "BIGINT",
            ColumnType::Timestamp => "TIMESTAMP WITH TIME ZONE",
        }
    }
}

/// One fixed output column.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    pub nullable: bool,
    pub description: &'static str,
}

const fn col(
    name: &'static str,
    ty: ColumnType,
    nullable: bool,
    description: &'static str,
) -> Column {
    Column {
        name,
        ty,
        nullable,
        description,
    }
}

use ColumnType::{Boolean, Decimal, Int64, String as Str, Timestamp};

/// The fixed columns, in file order.
pub const COLUMNS: [Column; 24] = [
    col("provider", Str, false, "payprotocol or genauth"),
    col("order_no", Str, false, "the order number from the input"),
    col(
        "status",
        Str,
        false,
        "normalized status: pending, confirming, partially_paid, paid, failed, cancelled, expired, refunded, not_found, error, unknown",
    ),
    col(
        "provider_status",
        Str,
        false,
        "the provider's raw status code, as a string",
    ),
    col(
        "settled",
        Boolean,
        false,
        "true when paysync stopped tracking the order because its status is final",
    ),
    col(
        "tracking",
        Str,
        false,
        "settled (final status reached), polling (will be polled again), deadline (stopped: settle.max_wait passed unsettled)",
    ),
    col(
        "amount",
        Decimal,
        true,
        "exact decimal string: the amount paid (PayProtocol: settlement amount scaled by decimals; GenAuth: paidAmount)",
    ),
    col("currency", Str, true, "currency of amount"),
    col(
        "quote_amount",
        Decimal,
        true,
        "PayProtocol quote amount, exact decimal string",
    ),
    col("quote_currency", Str, true, "PayProtocol quote currency"),
    col(
        "expected_amount",
        Decimal,
        true,
        "PayProtocol expected amount, exact decimal string",
    ),
    col(
        "payment_no",
        Str,
        true,
        "PayProtocol outPaymentNo, GenAuth channelOrderNo",
    ),
    col(
        "payment_method",
        Str,
        true,
        "PayProtocol contract/wallet_transfer, GenAuth payType",
    ),
    col("tx_hash", Str, true, "PayProtocol transaction hash"),
    col("from_address", Str, true, "PayProtocol payer address"),
    col("to_address", Str, true, "PayProtocol receiving address"),
    col("chain_id", Str, true, "PayProtocol chain id"),
    col("paid_account", Str, true, "GenAuth paidAccountNo"),
    col(
        "created_at",
        Timestamp,
        true,
        "when the order was created (UTC)",
    ),
    col("paid_at", Timestamp, true, "when the order was paid (UTC)"),
    col(
        "observed_at",
        Timestamp,
        false,
        "when paysync fetched this state (UTC); keep the latest row per (provider, order_no) by this",
    ),
    col(
        "first_seen_at",
        Timestamp,
        false,
        "when paysync first saw the order number (UTC)",
    ),
    col(
        "polls",
        Int64,
        false,
        "API calls made for this order so far",
    ),
    col(
        "error",
        Str,
        true,
        "for error and not_found rows: what went wrong (never a secret)",
    ),
];

const INPUT_DESCRIPTION: &str = "the input CSV row, passed through (JSONL: object `input`; CSV: columns `input.<name>`; Parquet: group `input`)";

/// What `paysync schema --format` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaFormat {
    /// Columns with logical and Parquet types, nullability and descriptions.
    Json,
    /// A BigQuery schema file (`bq load --schema=FILE`).
    Bigquery,
    /// `CREATE TABLE` for DuckDB / PostgreSQL.
    Sql,
}

/// The schema in `format`. `input_columns`: the input CSV's columns, when the
/// table should have them as typed fields (else `input` is one JSON value).
pub fn render(format: SchemaFormat, input_columns: &[String]) -> String {
    debug_assert!(COLUMNS.iter().map(|c| c.name).eq(OUTPUT_COLUMNS));
    match format {
        SchemaFormat::Json => json_schema(input_columns),
        SchemaFormat::Bigquery => bigquery(input_columns),
        SchemaFormat::Sql => sql(input_columns),
    }
}

fn json_schema(input_columns: &[String]) -> String {
    let mut columns: Vec<Value> = COLUMNS
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.ty.name(),
                "nullable": c.nullable,
                "parquet_type": c.ty.parquet(),
                "description": c.description,
            })
        })
        .collect();
    columns.push(json!({
        "name": "input",
        "type": "record",
        "nullable": false,
        "fields": input_columns.iter().map(|n| json!({
            "name": n, "type": "string", "nullable": true,
            "parquet_type": "BYTE_ARRAY (STRING)",
        })).collect::<Vec<_>>(),
        "description": INPUT_DESCRIPTION,
    }));
    let doc = json!({
        "schema_version": SCHEMA_VERSION,
        "table": "paysync_observations",
        "key": ["provider", "order_no", "status", "tracking"],
        "latest_by": "observed_at",
        "columns": columns,
    });
    let mut s = serde_json::to_string_pretty(&doc).expect("a JSON value serializes");
    s.push('\n');
    s
}

fn bigquery(input_columns: &[String]) -> String {
    let mut fields: Vec<Value> = COLUMNS
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "type": c.ty.bigquery(),
                "mode": if c.nullable { "NULLABLE" } else { "REQUIRED" },
                "description": c.description,
            })
        })
        .collect();
    fields.push(if input_columns.is_empty() {
        json!({"name": "input", "type": "JSON", "mode": "NULLABLE", "description": INPUT_DESCRIPTION})
    } else {
        json!({
            "name": "input", "type": "RECORD", "mode": "NULLABLE", "description": INPUT_DESCRIPTION,
            "fields": input_columns.iter().map(|n| json!({
                "name": n, "type": "STRING", "mode": "NULLABLE",
            })).collect::<Vec<_>>(),
        })
    });
    let mut s = serde_json::to_string_pretty(&fields).expect("a JSON value serializes");
    s.push('\n');
    s
}

/// `"name"` with inner quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn sql(input_columns: &[String]) -> String {
    let mut s = format!(
        "-- paysync output schema version {SCHEMA_VERSION}. Amounts are exact decimal strings:\n\
         -- cast them, e.g. CAST(amount AS DECIMAL(38, 18)), rather than using floats.\n\
         -- Keep the latest row per (provider, order_no) by observed_at.\n\
         CREATE TABLE IF NOT EXISTS paysync_observations (\n"
    );
    let mut lines: Vec<String> = COLUMNS
        .iter()
        .map(|c| {
            format!(
                "    {:<16} {}{}",
                c.name,
                c.ty.sql(),
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    if input_columns.is_empty() {
        lines.push(format!("    {:<16} JSON", "input"));
    } else {
        for n in input_columns {
            lines.push(format!(
                "    {} VARCHAR",
                quote_ident(&format!("input.{n}"))
            ));
        }
    }
    let _ = write!(s, "{}\n);\n", lines.join(",\n"));
    let _ = writeln!(s, "-- Column descriptions:");
    for c in COLUMNS {
        let _ = writeln!(s, "--   {}: {}", c.name, c.description);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table follows the output columns exactly.
    #[test]
    fn columns_match_output() {
        assert!(COLUMNS.iter().map(|c| c.name).eq(OUTPUT_COLUMNS));
    }

    /// JSON: every column with a type and description, input fields listed.
    #[test]
    fn json_lists_every_column() {
        let v: Value = serde_json::from_str(&render(SchemaFormat::Json, &["note".into()])).unwrap();
        let cols = v["columns"].as_array().unwrap();
        assert_eq!(cols.len(), 25);
        assert_eq!(cols[6]["name"], "amount");
        assert_eq!(cols[6]["type"], "decimal_string");
        assert_eq!(cols[20]["type"], "timestamp");
        assert_eq!(cols[24]["fields"][0]["name"], "note");
        assert!(
            cols.iter()
                .all(|c| !c["description"].as_str().unwrap().is_empty())
        );
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
    }

    /// BigQuery: valid types and modes; amounts are STRING, never FLOAT.
    #[test]
    fn bigquery_types() {
        let v: Value = serde_json::from_str(&render(SchemaFormat::Bigquery, &[])).unwrap();
        let fields = v.as_array().unwrap();
        for f in fields {
            let ty = f["type"].as_str().unwrap();
            assert!(
                ["STRING", "BOOLEAN", "INTEGER", "TIMESTAMP", "JSON"].contains(&ty),
                "{f}"
            );
            assert!(["NULLABLE", "REQUIRED"].contains(&f["mode"].as_str().unwrap()));
        }
        assert_eq!(fields[6]["type"], "STRING");
        assert_eq!(fields[0]["mode"], "REQUIRED");
        assert_eq!(fields[24]["type"], "JSON");
        let v: Value =
            serde_json::from_str(&render(SchemaFormat::Bigquery, &["a".into()])).unwrap();
        assert_eq!(v[24]["type"], "RECORD");
        assert_eq!(v[24]["fields"][0]["name"], "a");
    }

    /// SQL: one line per column, input columns quoted (names may hold anything).
    #[test]
    fn sql_ddl() {
        let s = render(SchemaFormat::Sql, &["we\"ird".into()]);
        assert!(s.contains("CREATE TABLE IF NOT EXISTS paysync_observations ("));
        assert!(s.contains("observed_at      TIMESTAMP WITH TIME ZONE NOT NULL"));
        assert!(s.contains("\"input.we\"\"ird\" VARCHAR"));
        assert!(s.contains("amount           VARCHAR,"));
        assert!(!s.contains("FLOAT") && !s.contains("DOUBLE"));
    }
}
