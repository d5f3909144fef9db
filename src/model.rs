//! The domain vocabulary shared by every module: order numbers, normalized payment
//! statuses, exact amounts, normalized pay details and observation rows.
//!
//! - [`OrderNo`]: a validated order number (what may be sent to a provider).
//! - [`PayStatus`]: the normalized status set of the output schema.
//! - [`Tracking`]: whether paysync still polls an order.
//! - [`Amount`]: an exact decimal string; never a float.
//! - [`PayDetail`]: one provider answer, normalized.
//! - [`InputColumns`]: the input row's columns, passed through to the output.

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

/// Why a provider's amount string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAmount {
    #[error("amount {0:?} is not a decimal number")]
    NotDecimal(String),
    #[error("base-unit amount {0:?} is not an integer")]
    NotInteger(String),
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
    pub fn from_base_units(units: &str, decimals: u32) -> Result<Self, InvalidAmount> {
        let s = units.trim();
        let (neg, digits) = match s.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, s),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidAmount::NotInteger(units.to_owned()));
        }
        let digits = digits.trim_start_matches('0');
        let d = decimals as usize;
        let padded = if digits.len() <= d {
            format!("{}{}", "0".repeat(d + 1 - digits.len()), digits)
        } else {
            digits.to_owned()
        };
        let (int, frac) = padded.split_at(padded.len() - d);
        let is_zero = int.bytes().all(|b| b == b'0') && frac.bytes().all(|b| b == b'0');
        let sign = if neg && !is_zero { "-" } else { "" };
        let text = if d == 0 {
            format!("{sign}{int}")
        } else {
            format!("{sign}{int}.{frac}")
        };
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
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Formats a UTC time as RFC 3339 with `Z`, keeping sub-second digits only when present.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
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

/// `input` as a JSON object whose keys keep the input's column order.
mod input_object {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(cols: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(cols.len()))?;
        for (k, v) in cols {
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
}
