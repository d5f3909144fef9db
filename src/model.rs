//! The domain vocabulary shared by every module: order numbers, normalized payment
//! statuses, exact amounts, normalized pay details and observation rows.
//!
//! - [`OrderNo`]: a validated order number (what may be sent to a provider).
//! - [`PayStatus`]: the normalized status set of the output schema.
//! - [`Tracking`]: whether paysync still polls an order.
//! - [`Amount`]: an exact decimal string; never a float.
//! - [`PayDetail`]: one provider answer, normalized.
//! - [`InputColumns`]: the input row's columns, passed through to the output;
//!   [`InputJson`]: the same as the JSON object stored with an order.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Longest order number accepted, in bytes.
pub const MAX_ORDER_NO_LEN: usize = 128;

/// A validated order number: non-empty, at most [`MAX_ORDER_NO_LEN`] bytes, no
/// whitespace or control characters. Surrounding whitespace is trimmed on parse.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrderNo(String);

/// Why a string is not a usable order number (the text goes into the rejects file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOrderNo {
    #[error("order number is empty")]
    Empty,
    #[error("order number is longer than {MAX_ORDER_NO_LEN} bytes ({0} bytes)")]
    TooLong(usize),
    #[error("order number contains whitespace")]
    Whitespace,
    #[error("order number contains a control or invisible character")]
    Control,
}

impl OrderNo {
    /// Validates `raw` (after trimming surrounding whitespace).
    pub fn parse(raw: &str) -> Result<Self, InvalidOrderNo> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(InvalidOrderNo::Empty);
        }
        if s.len() > MAX_ORDER_NO_LEN {
            return Err(InvalidOrderNo::TooLong(s.len()));
        }
        if s.chars().any(|c| c.is_control() || is_invisible(c)) {
            return Err(InvalidOrderNo::Control);
        }
        if s.chars().any(char::is_whitespace) {
            return Err(InvalidOrderNo::Whitespace);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Invisible format characters (zero-width spaces and joiners, direction marks,
/// word joiners, the BOM) that would make two order numbers look alike.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{00AD}')
}

impl TryFrom<String> for OrderNo {
    type Error = InvalidOrderNo;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<OrderNo> for String {
    fn from(o: OrderNo) -> String {
        o.0
    }
}

impl fmt::Display for OrderNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The normalized status of the output schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayStatus {
    Pending,
    Confirming,
    PartiallyPaid,
    Paid,
    Failed,
    Cancelled,
    Expired,
    Refunded,
    NotFound,
    Error,
    Unknown,
}

impl PayStatus {
    /// Every status, in schema order (used for reports and config validation).
    pub const ALL: [PayStatus; 11] = [
        PayStatus::Pending,
        PayStatus::Confirming,
        PayStatus::PartiallyPaid,
        PayStatus::Paid,
        PayStatus::Failed,
        PayStatus::Cancelled,
        PayStatus::Expired,
        PayStatus::Refunded,
        PayStatus::NotFound,
        PayStatus::Error,
        PayStatus::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PayStatus::Pending => "pending",
            PayStatus::Confirming => "confirming",
            PayStatus::PartiallyPaid => "partially_paid",
            PayStatus::Paid => "paid",
            PayStatus::Failed => "failed",
            PayStatus::Cancelled => "cancelled",
            PayStatus::Expired => "expired",
            PayStatus::Refunded => "refunded",
            PayStatus::NotFound => "not_found",
            PayStatus::Error => "error",
            PayStatus::Unknown => "unknown",
        }
    }

    /// Parses the schema name (`"partially_paid"`), as used in config files.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for PayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether paysync still tracks an order (the `tracking` output column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tracking {
    /// A final status was reached.
    Settled,
    /// paysync will poll the order again (also after an `error`).
    Polling,
    /// Tracking stopped because `settle.max_wait` passed while unsettled.
    Deadline,
}

impl Tracking {
    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::Settled => "settled",
            Tracking::Polling => "polling",
            Tracking::Deadline => "deadline",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        [Tracking::Settled, Tracking::Polling, Tracking::Deadline]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

impl fmt::Display for Tracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exact decimal amount kept as its canonical decimal string (`"1.000000"`,
/// `"7.9"`, `"-0.5"`). Arithmetic is never needed, so no float or fixed-width
/// integer ever limits size or precision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Amount(String);

/// Most decimals an amount is scaled by: token decimals are a `uint8` (ERC-20), and
/// a larger count (a garbled currency list or config) must not allocate gigabytes.
pub const MAX_DECIMALS: u32 = 255;

/// Why a provider's amount string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAmount {
    #[error("amount {0:?} is not a decimal number")]
    NotDecimal(String),
    #[error("base-unit amount {0:?} is not an integer")]
    NotInteger(String),
    #[error("{0} decimals is more than {MAX_DECIMALS}")]
    TooManyDecimals(u32),
}

impl Amount {
    /// Accepts a plain decimal (`"7.9"`, `"-1"`, `"0.000000000000000001"`) exactly as
    /// given, after trimming whitespace. Exponents, `+`, and empty parts are refused.
    pub fn parse_decimal(raw: &str) -> Result<Self, InvalidAmount> {
        let s = raw.trim();
        let digits = s.strip_prefix('-').unwrap_or(s);
        let (int, frac) = match digits.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (digits, None),
        };
        let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
            return Err(InvalidAmount::NotDecimal(raw.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// Scales an integer amount in base units by `10^-decimals`, exactly:
    /// `("1000000", 6)` gives `"1.000000"`, `("5", 18)` gives `"0.000000000000000005"`.
    /// Leading zeros of the integer part are dropped; all `decimals` digits are kept.
    /// More than [`MAX_DECIMALS`] decimals are refused.
    pub fn from_base_units(units: &str, decimals: u32) -> Result<Self, InvalidAmount> {
        if decimals > MAX_DECIMALS {
            return Err(InvalidAmount::TooManyDecimals(decimals));
        }
        let s = units.trim();
        let (neg, digits) = match s.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, s),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidAmount::NotInteger(units.to_owned()));
        }
        // Without leading zeros; empty for zero, which is written without a sign.
        let digits = digits.trim_start_matches('0');
        let d = decimals as usize;
        let mut text = String::with_capacity(digits.len().max(d + 1) + 2);
        if neg && !digits.is_empty() {
            text.push('-');
        }
        if digits.len() <= d {
            text.push('0');
            if d > 0 {
                text.push('.');
                text.extend(std::iter::repeat_n('0', d - digits.len()));
                text.push_str(digits);
            }
        } else {
            let (int, frac) = digits.split_at(digits.len() - d);
            text.push_str(int);
            if d > 0 {
                text.push('.');
                text.push_str(frac);
            }
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Formats paysync's own times (`observed_at`, `first_seen_at`) as RFC 3339 UTC with
/// exactly three fraction digits, so that they also sort correctly as strings.
pub fn rfc3339_millis(t: DateTime<Utc>) -> String {
    let mut out = String::with_capacity(RFC3339_LEN);
    push_rfc3339_millis(&mut out, t);
    out
}

/// Formats a UTC time as RFC 3339 with `Z`, keeping sub-second digits only when present.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    let mut out = String::with_capacity(RFC3339_LEN);
    push_rfc3339(&mut out, t);
    out
}

/// The longest time [`push_rfc3339`] writes itself: nine fraction digits.
const RFC3339_LEN: usize = "0000-00-00T00:00:00.000000000Z".len();

/// Appends [`rfc3339`]`(t)` to `out` without a `String` of its own (observation
/// rows carry four times each).
pub fn push_rfc3339(out: &mut String, t: DateTime<Utc>) {
    push_time(out, t, SecondsFormat::AutoSi);
}

/// Appends [`rfc3339_millis`]`(t)` to `out`.
pub fn push_rfc3339_millis(out: &mut String, t: DateTime<Utc>) {
    push_time(out, t, SecondsFormat::Millis);
}

/// Appends `t` as chrono's `to_rfc3339_opts(format, true)` writes it, for `format`
/// `AutoSi` or `Millis`. Years outside 0–9999 and leap seconds, which need a sign
/// or a 60th second, are left to chrono.
fn push_time(out: &mut String, t: DateTime<Utc>, format: SecondsFormat) {
    use chrono::{Datelike, Timelike};

    let (date, time) = (t.date_naive(), t.time());
    let nanos = time.nanosecond();
    let year = date.year();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        out.push_str(&t.to_rfc3339_opts(format, true));
        return;
    }
    let mut text = *b"0000-00-00T00:00:00.000000000";
    digits(&mut text[0..4], year.unsigned_abs());
    digits(&mut text[5..7], date.month());
    digits(&mut text[8..10], date.day());
    digits(&mut text[11..13], time.hour());
    digits(&mut text[14..16], time.minute());
    digits(&mut text[17..19], time.second());
    let fraction = match format {
        SecondsFormat::Millis => 3,
        SecondsFormat::AutoSi if nanos == 0 => 0,
        SecondsFormat::AutoSi if nanos % 1_000_000 == 0 => 3,
        SecondsFormat::AutoSi if nanos % 1_000 == 0 => 6,
        SecondsFormat::AutoSi => 9,
        other => unreachable!("push_time is only called with AutoSi or Millis, not {other:?}"),
    };
    let len = if fraction == 0 {
        19
    } else {
        digits(
            &mut text[20..20 + fraction],
            nanos / 10u32.pow(9 - fraction as u32),
        );
        20 + fraction
    };
    out.push_str(std::str::from_utf8(&text[..len]).expect("digits and separators are ASCII"));
    out.push('Z');
}

/// Writes `value` into `buf` in decimal, right-aligned and zero-padded (the
/// leading digits are dropped if it does not fit).
fn digits(buf: &mut [u8], mut value: u32) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// One provider answer for one order, normalized to the output schema. Fields the
/// provider did not give are `None` (empty in CSV, `null` in JSONL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayDetail {
    /// The provider's raw status code, as a string.
    pub provider_status: String,
    /// The normalized status (`Unknown` for a code paysync has no mapping for).
    pub status: PayStatus,
    pub amount: Option<Amount>,
    pub currency: Option<String>,
    pub quote_amount: Option<Amount>,
    pub quote_currency: Option<String>,
    pub expected_amount: Option<Amount>,
    pub payment_no: Option<String>,
    pub payment_method: Option<String>,
    pub tx_hash: Option<String>,
    pub from_address: Option<String>,
    pub to_address: Option<String>,
    pub chain_id: Option<String>,
    pub paid_account: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub paid_at: Option<DateTime<Utc>>,
}

impl PayDetail {
    /// A detail with only the status fields set; providers fill in the rest.
    pub fn new(provider_status: impl Into<String>, status: PayStatus) -> Self {
        Self {
            provider_status: provider_status.into(),
            status,
            amount: None,
            currency: None,
            quote_amount: None,
            quote_currency: None,
            expected_amount: None,
            payment_no: None,
            payment_method: None,
            tx_hash: None,
            from_address: None,
            to_address: None,
            chain_id: None,
            paid_account: None,
            created_at: None,
            paid_at: None,
        }
    }
}

/// The input row's columns in input order (name, value), passed through as `input.*`.
pub type InputColumns = Vec<(String, String)>;

/// One output row: one observation of one order (see the interface's output schema).
/// Field order is the schema's column order; `input` comes last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub provider: String,
    pub order_no: String,
    pub status: PayStatus,
    pub provider_status: String,
    pub settled: bool,
    pub tracking: Tracking,
    pub amount: Option<Amount>,
    pub currency: Option<String>,
    pub quote_amount: Option<Amount>,
    pub quote_currency: Option<String>,
    pub expected_amount: Option<Amount>,
    pub payment_no: Option<String>,
    pub payment_method: Option<String>,
    pub tx_hash: Option<String>,
    pub from_address: Option<String>,
    pub to_address: Option<String>,
    pub chain_id: Option<String>,
    pub paid_account: Option<String>,
    #[serde(with = "rfc3339_opt")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(with = "rfc3339_opt")]
    pub paid_at: Option<DateTime<Utc>>,
    #[serde(with = "rfc3339_req")]
    pub observed_at: DateTime<Utc>,
    #[serde(with = "rfc3339_req")]
    pub first_seen_at: DateTime<Utc>,
    pub polls: u32,
    pub error: Option<String>,
    /// Input columns (JSONL: an object `input`; CSV: `input.<name>` columns).
    #[serde(with = "input_object")]
    pub input: InputColumns,
}

/// The fixed output columns, in order; CSV adds `input.<name>` columns after these.
pub const OUTPUT_COLUMNS: [&str; 24] = [
    "provider",
    "order_no",
    "status",
    "provider_status",
    "settled",
    "tracking",
    "amount",
    "currency",
    "quote_amount",
    "quote_currency",
    "expected_amount",
    "payment_no",
    "payment_method",
    "tx_hash",
    "from_address",
    "to_address",
    "chain_id",
    "paid_account",
    "created_at",
    "paid_at",
    "observed_at",
    "first_seen_at",
    "polls",
    "error",
];

/// Version of the output schema, written into every manifest.
pub const SCHEMA_VERSION: u32 = 1;

impl Observation {
    /// The fixed columns' values as strings, in [`OUTPUT_COLUMNS`] order (empty for
    /// `None`), as written to CSV before formula escaping.
    pub fn fixed_values(&self) -> [String; 24] {
        fn opt<T: ToString>(v: &Option<T>) -> String {
            v.as_ref().map(ToString::to_string).unwrap_or_default()
        }
        [
            self.provider.clone(),
            self.order_no.clone(),
            self.status.to_string(),
            self.provider_status.clone(),
            self.settled.to_string(),
            self.tracking.to_string(),
            opt(&self.amount),
            opt(&self.currency),
            opt(&self.quote_amount),
            opt(&self.quote_currency),
            opt(&self.expected_amount),
            opt(&self.payment_no),
            opt(&self.payment_method),
            opt(&self.tx_hash),
            opt(&self.from_address),
            opt(&self.to_address),
            opt(&self.chain_id),
            opt(&self.paid_account),
            self.created_at.map(rfc3339).unwrap_or_default(),
            self.paid_at.map(rfc3339).unwrap_or_default(),
            rfc3339_millis(self.observed_at),
            rfc3339_millis(self.first_seen_at),
            self.polls.to_string(),
            opt(&self.error),
        ]
    }
}

mod rfc3339_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<DateTime<Utc>>::deserialize(d)
    }
}

mod rfc3339_req {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }
}

/// An input row's columns as the JSON object stored with its order and copied into
/// each of its output rows as `input` (keys in column order): written once, when
/// the row is read, straight from its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputJson(Cow<'static, str>);

impl InputJson {
    /// No columns: queue lines, and CSV rows whose fields cannot be read.
    pub const EMPTY: InputJson = InputJson(Cow::Borrowed("{}"));

    /// The object of `(name, value)` columns, in order.
    pub fn from_columns<'a>(columns: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut out = Vec::with_capacity(128);
        input_object::serialize_pairs(columns, &mut serde_json::Serializer::new(&mut out))
            .expect("strings always encode");
        Self(Cow::Owned(
            String::from_utf8(out).expect("serde_json writes UTF-8"),
        ))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether there are no columns.
    pub fn is_empty(&self) -> bool {
        self.0 == "{}"
    }

    /// The columns, in order.
    pub fn columns(&self) -> InputColumns {
        let mut de = serde_json::Deserializer::from_str(&self.0);
        input_object::deserialize(&mut de).expect("written by from_columns")
    }
}

/// `input` as a JSON object whose keys keep the input's column order.
mod input_object {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(cols: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        serialize_pairs(cols.iter().map(|(k, v)| (k.as_str(), v.as_str())), s)
    }

    /// `(name, value)` pairs as one JSON object, in order.
    pub fn serialize_pairs<'a, S: Serializer>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (k, v) in pairs {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of string columns")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Times across chrono's whole range, most of them in years 0–9999 (the ones
    /// [`push_rfc3339`] writes itself), with every kind of fraction.
    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
        let secs = prop_oneof![
            3 => -62_167_219_200i64..253_402_300_800,
            1 => DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp(),
        ];
        let nanos = prop_oneof![
            Just(0u32),
            (0u32..1_000).prop_map(|ms| ms * 1_000_000),
            (0u32..1_000_000).prop_map(|us| us * 1_000),
            0u32..1_000_000_000,
        ];
        (secs, nanos).prop_filter_map("in chrono's range", |(s, n)| DateTime::from_timestamp(s, n))
    }

    proptest! {
        /// The hand-written formatting is chrono's, byte for byte, and appends.
        #[test]
        fn rfc3339_is_chronos(t in any_time(), prefix in "[a-z\"]{0,3}") {
            prop_assert_eq!(rfc3339(t), t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
            prop_assert_eq!(rfc3339_millis(t), t.to_rfc3339_opts(SecondsFormat::Millis, true));
            let mut out = prefix.clone();
            push_rfc3339(&mut out, t);
            push_rfc3339_millis(&mut out, t);
            prop_assert_eq!(
                out,
                format!("{prefix}{}{}", rfc3339(t), rfc3339_millis(t))
            );
        }
    }

    #[test]
    fn rfc3339_edges() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        for (given, auto, millis) in [
            (
                "2026-12-07T15:39:04Z",
                "2026-12-07T15:39:04Z",
                "2026-12-07T15:39:04.000Z",
            ),
            (
                "2026-12-07T15:39:04.5Z",
                "2026-12-07T15:39:04.500Z",
                "2026-12-07T15:39:04.500Z",
            ),
            (
                "2026-12-07T15:39:04.000250Z",
                "2026-12-07T15:39:04.000250Z",
                "2026-12-07T15:39:04.000Z",
            ),
            (
                "2026-12-07T15:39:04.999999999Z",
                "2026-12-07T15:39:04.999999999Z",
                "2026-12-07T15:39:04.999Z",
            ),
            (
                "0000-01-01T00:00:00Z",
                "0000-01-01T00:00:00Z",
                "0000-01-01T00:00:00.000Z",
            ),
            (
                "9999-12-31T23:59:59.001+00:00",
                "9999-12-31T23:59:59.001Z",
                "9999-12-31T23:59:59.001Z",
            ),
            (
                "2026-01-01T08:00:00+08:00",
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:00:00.000Z",
            ),
        ] {
            assert_eq!(rfc3339(t(given)), auto, "{given}");
            assert_eq!(rfc3339_millis(t(given)), millis, "{given}");
        }
        // Leap seconds and years past 9999 go to chrono.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_250_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(rfc3339(leap), "2016-12-31T23:59:60.250Z");
        assert_eq!(rfc3339_millis(leap), "2016-12-31T23:59:60.250Z");
        let far = DateTime::from_timestamp(253_402_300_800, 0).unwrap();
        assert_eq!(rfc3339(far), "+10000-01-01T00:00:00Z");
        let before = DateTime::from_timestamp(-62_167_219_201, 0).unwrap();
        assert_eq!(rfc3339(before), "-0001-12-31T23:59:59Z");
    }

    /// Order numbers: trimmed, and refused when empty, too long, or with inner
    /// whitespace or control characters.
    #[test]
    fn order_no_validation() {
        assert_eq!(OrderNo::parse("  ORD-1 ").unwrap().as_str(), "ORD-1");
        assert_eq!(OrderNo::parse(""), Err(InvalidOrderNo::Empty));
        assert_eq!(OrderNo::parse("   "), Err(InvalidOrderNo::Empty));
        assert_eq!(OrderNo::parse("A B"), Err(InvalidOrderNo::Whitespace));
        assert_eq!(OrderNo::parse("A\u{7}B"), Err(InvalidOrderNo::Control));
        assert_eq!(OrderNo::parse("A\tB"), Err(InvalidOrderNo::Control));
        assert_eq!(OrderNo::parse("A\u{FEFF}B"), Err(InvalidOrderNo::Control));
        assert_eq!(OrderNo::parse("A\u{200B}B"), Err(InvalidOrderNo::Control));
        assert_eq!(
            OrderNo::parse(&"x".repeat(128)).unwrap().as_str().len(),
            128
        );
        assert_eq!(
            OrderNo::parse(&"x".repeat(129)),
            Err(InvalidOrderNo::TooLong(129))
        );
        // URL-special characters are allowed; the provider clients encode them.
        assert!(OrderNo::parse("../a?b=c&d#e%20").is_ok());
    }

    /// Base-unit scaling is exact for any size and keeps every decimal digit.
    #[test]
    fn base_unit_scaling() {
        let cases = [
            ("1000000", 6, "1.000000"),
            ("999746", 6, "0.999746"),
            ("0", 6, "0.000000"),
            ("5", 18, "0.000000000000000005"),
            ("007", 2, "0.07"),
            ("12345", 0, "12345"),
            ("-150", 2, "-1.50"),
            ("-0", 2, "0.00"),
            // 2^64 * 10 base units with 18 decimals: far beyond u64.
            ("184467440737095516160", 18, "184.467440737095516160"),
            (
                "123456789012345678901234567890123456789",
                18,
                "123456789012345678901.234567890123456789",
            ),
        ];
        for (units, dec, want) in cases {
            assert_eq!(
                Amount::from_base_units(units, dec).unwrap().as_str(),
                want,
                "{units} / 10^{dec}"
            );
        }
        for bad in ["", "1.5", "1e6", "abc", "-", " "] {
            assert!(Amount::from_base_units(bad, 6).is_err(), "{bad:?}");
        }
    }

    /// More than [`MAX_DECIMALS`] decimals are refused instead of allocating a
    /// string of that many zeros (a currency list saying `"decimals": 4294967295`
    /// used to make `from_base_units` allocate 4 GiB).
    #[test]
    fn absurd_decimals_are_refused() {
        assert_eq!(
            Amount::from_base_units("5", u32::MAX),
            Err(InvalidAmount::TooManyDecimals(u32::MAX))
        );
        assert_eq!(
            Amount::from_base_units("5", MAX_DECIMALS + 1),
            Err(InvalidAmount::TooManyDecimals(MAX_DECIMALS + 1))
        );
        let a = Amount::from_base_units("5", MAX_DECIMALS).unwrap();
        assert_eq!(a.as_str().len(), 2 + MAX_DECIMALS as usize);
        assert!(a.as_str().ends_with("05"));
    }

    /// Decimal strings are kept exactly as given; anything else is refused.
    #[test]
    fn decimal_parsing() {
        for ok in ["7.9", "0", "-1.25", "100", "0.000000000000000001"] {
            assert_eq!(Amount::parse_decimal(ok).unwrap().as_str(), ok);
        }
        for bad in ["", ".5", "5.", "1e3", "+1", "1,5", "NaN", "1.2.3"] {
            assert!(Amount::parse_decimal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_names_round_trip() {
        for st in PayStatus::ALL {
            assert_eq!(PayStatus::from_name(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
    }

    /// paysync's own times always carry milliseconds: `...:40.000Z` must sort
    /// before `...:40.100Z` as a string too.
    #[test]
    fn own_times_always_have_milliseconds() {
        let t = DateTime::parse_from_rfc3339("2026-11-23T14:31:40Z")
            .unwrap()
            .to_utc();
        assert_eq!(rfc3339_millis(t), "2026-11-23T14:31:40.000Z");
        let later = t + chrono::TimeDelta::milliseconds(100);
        assert!(rfc3339_millis(t) < rfc3339_millis(later));
    }

    #[test]
    fn rfc3339_keeps_milliseconds_only_when_given() {
        let t = DateTime::parse_from_rfc3339("2024-04-03T05:40:06Z").unwrap();
        assert_eq!(rfc3339(t.to_utc()), "2024-04-03T05:40:06Z");
        let t = DateTime::parse_from_rfc3339("2024-04-03T05:40:06.120Z").unwrap();
        assert_eq!(rfc3339(t.to_utc()), "2024-04-03T05:40:06.120Z");
    }

    mod properties {
        use super::*;
        use crate::fuzzing::is_plain_decimal;

        /// The model: `n / 10^d` in u128 arithmetic, every fraction digit written.
        fn scaled(n: u128, neg: bool, d: u32) -> String {
            let p = 10u128.pow(d);
            let sign = if neg && n != 0 { "-" } else { "" };
            if d == 0 {
                format!("{sign}{n}")
            } else {
                let width = d as usize;
                format!("{sign}{}.{:0width$}", n / p, n % p)
            }
        }

        proptest! {
            /// Scaling agrees with u128 arithmetic for every amount that fits, with
            /// a sign, leading zeros and surrounding spaces in the input.
            #[test]
            fn base_units_match_u128_model(
                n in prop_oneof![Just(0u128), 0u128..1_000_000, any::<u128>()],
                neg in any::<bool>(),
                zeros in 0usize..4,
                d in 0u32..=38,
                pad in "[ \t]{0,2}",
            ) {
                let units = format!("{pad}{}{}{n}{pad}", if neg { "-" } else { "" }, "0".repeat(zeros));
                let got = Amount::from_base_units(&units, d).unwrap();
                prop_assert_eq!(got.as_str(), scaled(n, neg, d));
            }

            /// Beyond u128: multiplying the result back by `10^d` (moving the point)
            /// gives the input digits; the integer part has no leading zeros; all
            /// `d` fraction digits are kept.
            #[test]
            fn base_units_big_integers_round_trip(
                digits in "[0-9]{1,120}",
                d in 0u32..=MAX_DECIMALS,
            ) {
                let got = Amount::from_base_units(&digits, d).unwrap();
                let (int, frac) = got.as_str().split_once('.').unwrap_or((got.as_str(), ""));
                prop_assert_eq!(frac.len(), d as usize);
                prop_assert!(int == "0" || !int.starts_with('0'), "{}", got);
                let back = format!("{int}{frac}");
                prop_assert_eq!(back.trim_start_matches('0'), digits.trim_start_matches('0'));
                prop_assert!(Amount::parse_decimal(got.as_str()).is_ok());
            }

            /// Any text and any decimals: an amount or an error, never a panic;
            /// only (signed) digit strings with at most MAX_DECIMALS are scaled.
            #[test]
            fn base_units_never_panic(units in "\\PC{0,12}|-?[0-9]{0,12}", d in any::<u32>()) {
                let t = units.trim();
                let digits = t.strip_prefix('-').unwrap_or(t);
                let integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
                prop_assert_eq!(
                    Amount::from_base_units(&units, d).is_ok(),
                    integer && d <= MAX_DECIMALS
                );
            }

            /// `parse_decimal` accepts every plain decimal, keeping its text...
            #[test]
            fn decimals_in_the_grammar_are_kept(s in "-?[0-9]{1,40}(\\.[0-9]{1,40})?", pad in " {0,2}") {
                let a = Amount::parse_decimal(&format!("{pad}{s}{pad}")).unwrap();
                prop_assert_eq!(a.as_str(), s.as_str());
            }

            /// ...and nothing else.
            #[test]
            fn decimal_grammar_is_exact(s in "[-+.0-9eE ,]{0,8}|\\PC{0,8}") {
                prop_assert_eq!(Amount::parse_decimal(&s).is_ok(), is_plain_decimal(s.trim()));
            }

            /// Printable ASCII order numbers without spaces are kept as they are
            /// (surrounding whitespace trimmed).
            #[test]
            fn printable_order_numbers_are_kept(s in "[!-~]{1,128}", pad in "[ \t]{0,2}") {
                let no = OrderNo::parse(&format!("{pad}{s}{pad}")).unwrap();
                prop_assert_eq!(no.as_str(), s.as_str());
            }

            /// Any text: accepted exactly when it is non-empty after trimming, at
            /// most 128 bytes, and free of whitespace, control and invisible
            /// characters; the error names the first rule broken.
            #[test]
            fn order_number_rules(s in "\\PC{0,20}|[ a-z\t\u{7}\u{200B}\u{FEFF}\u{AD}]{0,6}|x{120,135}") {
                let t = s.trim();
                let want = if t.is_empty() {
                    Err(InvalidOrderNo::Empty)
                } else if t.len() > MAX_ORDER_NO_LEN {
                    Err(InvalidOrderNo::TooLong(t.len()))
                } else if t.chars().any(|c| c.is_control() || is_invisible(c)) {
                    Err(InvalidOrderNo::Control)
                } else if t.chars().any(char::is_whitespace) {
                    Err(InvalidOrderNo::Whitespace)
                } else {
                    Ok(t)
                };
                let got = OrderNo::parse(&s);
                prop_assert_eq!(got.as_ref().map(OrderNo::as_str), want.as_ref().map(|s| *s));
            }
        }
    }
}
