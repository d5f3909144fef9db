//! Entry points for the cargo-fuzz targets in `fuzz/` and for the test that replays
//! their seed corpus: each takes arbitrary bytes, runs one parser on them, and asserts
//! what must hold for any input (not only "does not panic"). Not a supported API.
//!
//! - [`csv_reader`]: the streaming CSV reader, checked against the `csv` crate
//!   reading the same bytes from memory (same rows, lines, reasons).
//! - [`queue_reader`]: the queue reader, whole file and tailed in chunks, checked
//!   against a line-splitting model.
//! - [`payprotocol_response`]: the currency-list and detail classifiers.
//! - [`genauth_response`]: the detail and token classifiers, the JWT claim reader.
//! - [`decimal`]: amount parsing, base-unit scaling, provider times.
//!
//! Byte layout of the provider targets: byte 0 picks the HTTP status from
//! [`HTTP_STATUSES`], byte 1 is `Retry-After` in seconds (0: none), the rest is the
//! body. The readers write their input to a scratch file, since they read files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::FixedOffset;
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::fetch::RawResponse;
use crate::fetch::retry::{Action, RetryPolicy, classify};
use crate::input::{self, InputError, InputRecord, InputSpec, RejectReason};
use crate::model::{Amount, InvalidAmount, MAX_DECIMALS, MAX_ORDER_NO_LEN, OrderNo, PayDetail};
use crate::provider::payprotocol::{self, Currencies};
use crate::provider::{FetchError, genauth, parse_provider_time};

/// HTTP statuses the provider targets choose from (byte 0 modulo the length).
pub const HTTP_STATUSES: [u16; 16] = [
    200, 200, 200, 200, 201, 204, 400, 401, 403, 404, 408, 429, 500, 502, 503, 302,
];

/// A file holding one input, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(ext: &str, data: &[u8]) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir();
        let path = dir.join(format!("paysync-fuzz-{}-{n}.{ext}", std::process::id()));
        std::fs::write(&path, data).expect("write the scratch input file");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What every accepted order number must be.
fn check_order_no(no: &OrderNo) {
    let s = no.as_str();
    assert!(!s.is_empty() && s.len() <= MAX_ORDER_NO_LEN, "{s:?}");
    assert!(
        !s.chars().any(|c| c.is_whitespace() || c.is_control()),
        "{s:?}"
    );
    assert_eq!(OrderNo::parse(s).as_ref(), Ok(no), "parsing is idempotent");
}

fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Lines ended in `bytes` when `\n`, `\r\n` and a lone `\r` each end one.
fn count_line_ends(bytes: &[u8]) -> u64 {
    let crlf = bytes.windows(2).filter(|w| w == b"\r\n").count() as u64;
    count_newlines(bytes) + bytes.iter().filter(|&&b| b == b'\r').count() as u64 - crlf
}

/// One row as the in-memory reference sees it.
struct RefRow {
    line: u64,
    fields: Vec<Vec<u8>>,
}

/// The rows of `data` (header first) read by the `csv` crate from memory: a row
/// is blank, and skipped, when it is one unquoted field of whitespace; its line is
/// where its first byte that is not a line break (or the BOM) sits.
fn reference_csv(data: &[u8]) -> Vec<RefRow> {
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(data);
    let mut rec = ::csv::ByteRecord::new();
    let mut rows = Vec::new();
    let mut start = 0usize;
    loop {
        match reader.read_byte_record(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => panic!("the csv crate failed on bytes in memory: {e}"),
        }
        let end = usize::try_from(reader.position().byte()).unwrap();
        let mut span = &data[start..end];
        if start == 0 {
            span = span.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(span);
        }
        let lead = span
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let line = 1 + count_line_ends(&data[..end - span.len() + lead]);
        start = end;
        let blank =
            rec.len() == 1 && rec[0].iter().all(u8::is_ascii_whitespace) && !span.contains(&b'"');
        if !blank {
            rows.push(RefRow {
                line,
                fields: rec.iter().map(<[u8]>::to_vec).collect(),
            });
        }
    }
    rows
}

/// The CSV reader on `data` as a whole file (order column `order_no`, payment
/// column `payment_no`): every row the `csv` crate sees is yielded once, at the
/// right line, with the right columns and the right reject reason.
pub fn csv_reader(data: &[u8]) {
    let file = Scratch::new("csv", data);
    let mut spec = InputSpec::new(file.path());
    spec.payment_no_column = Some("payment_no".to_owned());
    let reference = reference_csv(data);
    let records = match input::open(&spec) {
        Ok(r) => r,
        Err(InputError::MissingColumn { available, .. }) => {
            assert!(!available.iter().any(|c| c == "order_no"));
            return;
        }
        Err(InputError::DuplicateHeader { column, .. }) => {
            let header = &reference[0].fields;
            let n = header
                .iter()
                .filter(|f| String::from_utf8_lossy(f).trim() == column)
                .count();
            assert!(n > 1, "{column:?} is not repeated");
            return;
        }
        Err(e) => panic!("unexpected fatal error: {e}"),
    };
    let header = records.header().to_vec();
    let recs: Vec<InputRecord> = records
        .collect::<Result<_, _>>()
        .expect("a readable file never fails mid-way");
    if header.is_empty() {
        assert!(reference.is_empty() && recs.is_empty());
        return;
    }
    assert_eq!(reference.len(), recs.len() + 1, "rows lost or invented");
    let lossy = |f: &[u8]| String::from_utf8_lossy(f).trim().to_owned();
    let want_header: Vec<String> = reference[0].fields.iter().map(|f| lossy(f)).collect();
    assert_eq!(header, want_header);
    let order_idx = header.iter().position(|h| h == "order_no").unwrap();
    let pay_idx = header.iter().position(|h| h == "payment_no");
    for (rec, want) in recs.iter().zip(&reference[1..]) {
        // (The raw text may end in `\n`: a quote left open runs to the end of the file.)
        assert_eq!(rec.line, want.line, "line of {:?}", rec.raw);
        let fields: Option<Vec<&str>> = want
            .fields
            .iter()
            .map(|f| std::str::from_utf8(f).ok())
            .collect();
        let Some(fields) = fields else {
            assert_eq!(rec.parsed, Err(RejectReason::NotUtf8));
            assert!(rec.input.is_empty());
            continue;
        };
        if fields.len() != header.len() {
            let want_err = RejectReason::FieldCount {
                found: fields.len(),
                expected: header.len(),
            };
            assert_eq!(rec.parsed, Err(want_err));
            assert!(rec.input.is_empty());
            continue;
        }
        let cols = rec.input.columns();
        let cols: Vec<(&str, &str)> = cols.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let want_cols: Vec<(&str, &str)> = header
            .iter()
            .map(String::as_str)
            .zip(fields.iter().copied())
            .collect();
        assert_eq!(cols, want_cols);
        match (&rec.parsed, OrderNo::parse(fields[order_idx])) {
            (Ok((no, pay)), Ok(want_no)) => {
                check_order_no(no);
                assert_eq!(no, &want_no);
                let want_pay = pay_idx.map(|i| fields[i].trim()).filter(|p| !p.is_empty());
                assert_eq!(pay.as_deref(), want_pay);
            }
            (Err(RejectReason::OrderNo(got)), Err(want_err)) => assert_eq!(got, &want_err),
            (got, want) => panic!("row {:?}: got {got:?}, want {want:?}", rec.raw),
        }
    }
}

/// One queue record as the line-splitting model expects it.
#[derive(Debug, PartialEq)]
struct QueueLine {
    line: u64,
    raw: String,
    parsed: Result<OrderNo, RejectReason>,
}

fn queue_lines(recs: &[InputRecord]) -> Vec<QueueLine> {
    recs.iter()
        .map(|r| {
            assert!(r.input.is_empty());
            if let Ok((no, pay)) = &r.parsed {
                check_order_no(no);
                assert_eq!(*pay, None);
            }
            QueueLine {
                line: r.line,
                raw: r.raw.clone(),
                parsed: r.parsed.clone().map(|(no, _)| no),
            }
        })
        .collect()
}

/// The queue reader on `data` as a whole file, and tailed in chunks of
/// `1 + data[0] % 4` lines: both agree with splitting the bytes at `\n` (blank and
/// `#` lines skipped but counted, a BOM dropped), except that tailing leaves a last
/// line without `\n` unread.
pub fn queue_reader(data: &[u8]) {
    let file = Scratch::new("txt", data);
    let whole: Vec<InputRecord> = input::open(&InputSpec::new(file.path()))
        .expect("open a queue file")
        .collect::<Result<_, _>>()
        .expect("a readable file never fails mid-way");
    let whole = queue_lines(&whole);

    if data.len() <= input::MAX_QUEUE_LINE {
        let mut model = Vec::new();
        let mut rest = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
        let mut line = 1;
        while !rest.is_empty() {
            let (text, next) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let trimmed = text.trim_ascii();
            if !trimmed.is_empty() && !trimmed.starts_with(b"#") {
                model.push(QueueLine {
                    line,
                    raw: String::from_utf8_lossy(text).into_owned(),
                    parsed: match std::str::from_utf8(text) {
                        Ok(s) => OrderNo::parse(s).map_err(RejectReason::from),
                        Err(_) => Err(RejectReason::NotUtf8),
                    },
                });
            }
            line += 1;
            rest = next;
        }
        assert_eq!(whole, model);
    }

    // Tail the same file from offset 0, chunk by chunk.
    let max_lines = 1 + usize::from(data.first().copied().unwrap_or(0) % 4);
    let complete_len = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let (mut offset, mut line) = (0u64, 1u64);
    let mut tailed = Vec::new();
    loop {
        let chunk = input::read_queue_from(file.path(), offset, max_lines).expect("tail");
        let known = input::read_queue_from_line(file.path(), offset, line, max_lines)
            .expect("tail from a known line");
        assert_eq!(chunk, known, "counting lines agrees with the line given");
        assert!(!chunk.truncated);
        assert_eq!(chunk.first_line, line);
        assert!(chunk.records.len() <= max_lines);
        assert!(chunk.next_offset >= offset && chunk.next_offset <= complete_len as u64);
        let consumed = &data[offset as usize..chunk.next_offset as usize];
        assert_eq!(chunk.next_line, line + count_newlines(consumed));
        tailed.extend(queue_lines(&chunk.records));
        let progressed = chunk.next_offset > offset;
        offset = chunk.next_offset;
        line = chunk.next_line;
        if chunk.at_end {
            break;
        }
        assert!(
            progressed,
            "a chunk that is not at the end consumed nothing"
        );
    }
    assert_eq!(offset, complete_len as u64, "every complete line consumed");
    let complete_lines = count_newlines(data);
    let want: Vec<&QueueLine> = whole.iter().filter(|r| r.line <= complete_lines).collect();
    assert_eq!(tailed.iter().collect::<Vec<_>>(), want);
}

/// Splits a provider target's input into the HTTP answer it describes.
fn raw_response(data: &[u8]) -> RawResponse {
    let status =
        HTTP_STATUSES[usize::from(data.first().copied().unwrap_or(0)) % HTTP_STATUSES.len()];
    let retry_after = match data.get(1).copied().unwrap_or(0) {
        0 => None,
        s => Some(Duration::from_secs(u64::from(s))),
    };
    RawResponse {
        status,
        retry_after,
        body: Bytes::copy_from_slice(data.get(2..).unwrap_or_default()),
    }
}

fn utc8() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8")
}

/// What the retry policy does with a result must fit its class, at any attempt.
fn check_retry(result: &Result<PayDetail, FetchError>) {
    let policy = RetryPolicy::default();
    for attempt in [1, policy.max_attempts] {
        let action = classify(result, attempt, &policy, 0.5);
        let retryable = matches!(
            result,
            Err(FetchError::Throttled { .. }
                | FetchError::Server { .. }
                | FetchError::Malformed { .. }
                | FetchError::Timeout(_)
                | FetchError::Transport(_)
                | FetchError::TooLarge { .. })
        );
        let want = match result {
            Ok(_) | Err(FetchError::NotFound) => Some(Action::Done),
            Err(FetchError::Auth(_)) => Some(Action::Abort),
            Err(FetchError::Rejected(_)) => Some(Action::GiveUp),
            _ if attempt >= policy.max_attempts => Some(Action::GiveUp),
            _ => None,
        };
        match want {
            Some(w) => assert_eq!(action, w, "{result:?}"),
            None => assert!(retryable && matches!(action, Action::Retry { .. })),
        }
    }
    // Every message can be formatted.
    if let Err(e) = result {
        let _ = e.to_string();
    }
}

/// Checks an amount made by [`Amount::from_base_units`] from `units` and `decimals`.
fn check_scaled(amount: &Amount, units: &str, decimals: u32) {
    let text = amount.as_str();
    let (neg, body) = match text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, text),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    assert_eq!(
        frac.len(),
        decimals as usize,
        "{text}: every decimal digit kept"
    );
    assert!(
        !int.is_empty() && (int == "0" || !int.starts_with('0')),
        "{text}"
    );
    let units = units.trim();
    let digits = units.strip_prefix('-').unwrap_or(units);
    let strip = |s: &str| s.trim_start_matches('0').to_owned();
    assert_eq!(
        strip(&format!("{int}{frac}")),
        strip(digits),
        "{units} -> {text}"
    );
    assert_eq!(neg, units.starts_with('-') && !strip(digits).is_empty());
    assert!(Amount::parse_decimal(text).is_ok(), "{text}");
}

/// PayProtocol: the input's body is a currency-list answer when it holds a NUL
/// byte (the part before it) followed by a detail answer; otherwise only a detail
/// answer. The HTTP layer decides first; a detail that maps is consistent with the
/// body; amounts are scaled exactly.
pub fn payprotocol_response(data: &[u8]) {
    let raw = raw_response(data);
    let (list_body, detail_body) = match raw.body.iter().position(|&b| b == 0) {
        Some(i) => (Some(raw.body.slice(..i)), raw.body.slice(i + 1..)),
        None => (None, raw.body.clone()),
    };
    let mut table = Currencies::default();
    table.insert(1, "USDT", 6);
    table.insert(2, "ETH", 18);
    if let Some(body) = list_body {
        let list = RawResponse {
            body,
            ..raw.clone()
        };
        match payprotocol::classify_currencies(&list) {
            Ok(entries) => {
                assert!((200..300).contains(&raw.status));
                for c in entries {
                    table.insert(c.chain_id, &c.symbol, c.decimals);
                }
            }
            Err(e) => check_retry(&Err(e)),
        }
    }
    let raw = RawResponse {
        body: detail_body,
        ..raw
    };
    let result = payprotocol::classify_detail(&raw, &table, utc8());
    check_retry(&result);
    let status = raw.status;
    match status {
        401 | 403 => assert!(matches!(result, Err(FetchError::Auth(_)))),
        404 => assert_eq!(result, Err(FetchError::NotFound)),
        429 => assert_eq!(
            result,
            Err(FetchError::Throttled {
                code: 429,
                retry_after: raw.retry_after
            })
        ),
        408 | 500..=599 => {
            assert!(matches!(result, Err(FetchError::Server { status: s, .. }) if s == status));
        }
        200..=299 => {}
        _ => assert!(matches!(result, Err(FetchError::Rejected(_)))),
    }
    if !(200..300).contains(&status) {
        return;
    }
    // Syntax only: `Value` would also refuse nesting deeper than serde_json's
    // recursion limit, which the envelope parser skips over in ignored fields.
    if serde_json::from_slice::<serde::de::IgnoredAny>(&raw.body).is_err() {
        assert!(
            matches!(result, Err(FetchError::Malformed { .. })),
            "{result:?}"
        );
        return;
    }
    let (Ok(d), Ok(body)) = (result, serde_json::from_slice::<Value>(&raw.body)) else {
        return;
    };
    // Only JSON objects are read as envelopes and details, not their fields as arrays.
    assert!(body.is_object() && body["data"].is_object(), "{body}");
    assert_eq!(body["code"], 200);
    let data = &body["data"];
    let code = data["paymentStatus"]
        .as_i64()
        .expect("a mapped detail has a status");
    assert_eq!(d.provider_status, code.to_string());
    assert_eq!(d.status, payprotocol::map_status(code));
    let chain = data["chainId"].as_i64();
    let symbol = data["settlementCurrencySymbol"].as_str();
    for (amount, field) in [
        (&d.amount, "settlementAmount"),
        (&d.expected_amount, "expectedAmount"),
    ] {
        if let Some(a) = amount {
            let units = match &data[field] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let dec = table
                .decimals(chain.unwrap(), symbol.unwrap())
                .expect("scaled by known decimals");
            check_scaled(a, &units, dec);
        }
    }
    if let Some(q) = &d.quote_amount {
        assert!(Amount::parse_decimal(q.as_str()).is_ok());
    }
}

const SECRET: &str = "fuzz-Access-Key-Secret-9f3c";

/// GenAuth: the body's `statusCode` decides whatever the HTTP status; a body that
/// is not an envelope is judged by the HTTP status; a mapped detail follows the
/// status map; token errors never carry the access key secret or the token.
pub fn genauth_response(data: &[u8]) {
    let raw = raw_response(data);
    let map = genauth::default_status_map();
    let result = genauth::classify_response(&raw, &map, utc8());
    check_retry(&result);
    let code = serde_json::from_slice::<Value>(&raw.body).ok().map(|v| {
        match v.get("statusCode") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
            _ => None,
        }
        .map(|c| (c, v))
    });
    match code.flatten() {
        None => match raw.status {
            500..=599 => assert!(matches!(result, Err(FetchError::Server { .. }))),
            429 => assert!(matches!(result, Err(FetchError::Throttled { .. }))),
            s => assert!(
                matches!(result, Err(FetchError::Malformed { status, .. }) if status == s),
                "{result:?}"
            ),
        },
        Some((code, body)) => match code {
            200 => match &result {
                Ok(d) => {
                    let want = map.get(&d.provider_status).copied();
                    assert_eq!(d.status, want.unwrap_or(crate::model::PayStatus::Unknown));
                    if let Some(a) = &d.amount {
                        assert!(Amount::parse_decimal(a.as_str()).is_ok());
                    }
                }
                Err(FetchError::NotFound) => assert!(body.get("data").is_none_or(Value::is_null)),
                Err(e) => assert!(matches!(e, FetchError::Malformed { .. }), "{e:?}"),
            },
            429 => assert!(matches!(result, Err(FetchError::Throttled { .. }))),
            500..=599 => assert!(
                matches!(result, Err(FetchError::Server { status, .. }) if i64::from(status) == code)
            ),
            404 => assert_eq!(result, Err(FetchError::NotFound)),
            401 | 403 => assert!(matches!(result, Err(FetchError::Auth(_)))),
            _ => assert!(matches!(result, Err(FetchError::Rejected(_)))),
        },
    }

    match genauth::classify_token_response(&raw, SECRET) {
        Ok(grant) => {
            let token = grant.access_token.expose_secret();
            assert!(!token.is_empty());
            let _ = grant.expires_in;
            if let Err(e) = genauth::userpool_claim(token) {
                assert!(
                    token.len() < 24 || !e.contains(token),
                    "the token leaked: {e}"
                );
            }
        }
        Err(e) => {
            check_retry(&Err(e.clone()));
            assert!(!e.to_string().contains(SECRET), "the secret leaked: {e}");
            assert!(
                !format!("{e:?}").contains(SECRET),
                "the secret leaked: {e:?}"
            );
        }
    }
    if let Ok(text) = std::str::from_utf8(&raw.body)
        && let Ok(claim) = genauth::userpool_claim(text)
    {
        assert!(!claim.is_empty());
    }
}

/// Whether `s` is `-?[0-9]+(\.[0-9]+)?`, recognized one character at a time (also
/// the model of the `parse_decimal` property tests).
pub(crate) fn is_plain_decimal(s: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum At {
        Start,
        Sign,
        Int,
        Dot,
        Frac,
    }
    let mut at = At::Start;
    for c in s.chars() {
        at = match (at, c) {
            (At::Start, '-') => At::Sign,
            (At::Start | At::Sign | At::Int, '0'..='9') => At::Int,
            (At::Int, '.') => At::Dot,
            (At::Dot | At::Frac, '0'..='9') => At::Frac,
            _ => return false,
        };
    }
    matches!(at, At::Int | At::Frac)
}

/// Amounts and times: `parse_decimal` accepts exactly the plain decimal grammar
/// and keeps the text; `from_base_units` (decimals: the first 4 bytes, little
/// endian) scales exactly or refuses; provider times come out as UTC that
/// round-trips through RFC 3339.
pub fn decimal(data: &[u8]) {
    let (decimals, text) = match data.split_first_chunk::<4>() {
        Some((d, rest)) => (u32::from_le_bytes(*d), rest),
        None => (6, data),
    };
    let Ok(s) = std::str::from_utf8(text) else {
        return;
    };
    match Amount::parse_decimal(s) {
        Ok(a) => {
            assert!(is_plain_decimal(s.trim()), "{s:?} accepted");
            assert_eq!(a.as_str(), s.trim());
        }
        Err(_) => assert!(!is_plain_decimal(s.trim()), "{s:?} refused"),
    }
    let t = s.trim();
    let is_integer = {
        let d = t.strip_prefix('-').unwrap_or(t);
        !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
    };
    match Amount::from_base_units(s, decimals) {
        Ok(a) => {
            assert!(
                is_integer && decimals <= MAX_DECIMALS,
                "{s:?} / 10^{decimals}"
            );
            check_scaled(&a, s, decimals);
        }
        Err(InvalidAmount::TooManyDecimals(d)) => assert!(d == decimals && d > MAX_DECIMALS),
        Err(_) => assert!(!is_integer, "{s:?} refused"),
    }
    let zone = FixedOffset::east_opt(i32::from(decimals as u16 % 1440) * 60 - 12 * 3600)
        .expect("an offset within a day");
    match parse_provider_time(s, zone) {
        Ok(None) => assert!(t.is_empty()),
        Ok(Some(time)) => {
            let text = crate::model::rfc3339(time);
            let back = chrono::DateTime::parse_from_rfc3339(&text);
            // RFC 3339 has four-digit years; later times are written with a sign.
            if let Ok(back) = back {
                assert_eq!(back.to_utc(), time, "{text}");
            }
        }
        Err(_) => assert!(!t.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed seed of every fuzz target, run through the target's function:
    /// keeps the corpus and the targets compiling and passing on stable, without
    /// cargo-fuzz. (The 10-minute fuzz runs are separate; see the README.)
    #[test]
    fn seed_corpus_passes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 5] = [
            ("csv_reader", csv_reader),
            ("queue_reader", queue_reader),
            ("payprotocol_response", payprotocol_response),
            ("genauth_response", genauth_response),
            ("decimal", decimal),
        ];
        for (name, run) in targets {
            let dir = root.join(name);
            let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            seeds.sort();
            assert!(seeds.len() >= 3, "{name}: too few seeds");
            for seed in seeds {
                let data = std::fs::read(&seed).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{name}: seed {} fails", seed.display());
            }
        }
    }

    /// The decimal recognizer of the fuzz checks is itself right.
    #[test]
    fn plain_decimal_recognizer() {
        for ok in ["0", "-1", "1.5", "-0.000", "007"] {
            assert!(is_plain_decimal(ok), "{ok}");
        }
        for bad in [
            "", "-", ".5", "5.", "1.2.3", "+1", "1e3", "--1", "1-", " 1", "١",
        ] {
            assert!(!is_plain_decimal(bad), "{bad}");
        }
    }
}
