//! Deterministic behaviour per order number: which [`Scenario`] an order follows
//! (by marker or by a stable hash), the status it shows at its n-th answered poll,
//! and the stable pseudo-random facts (amounts, times, addresses) of its answers.
//!
//! - [`Scenario`]: the lifecycle an order number follows; see the table in `mock`.
//! - [`fnv1a`], [`mix`]: tiny stable hashes (identical across processes and builds).
//! - [`Facts`]: amounts, times, hashes and addresses derived from the order number.

use chrono::{DateTime, NaiveDateTime};

/// The lifecycle an order number follows on both providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Paid at once.
    Paid,
    /// Pending for `pending_polls` polls, then confirming, then paid.
    Pending,
    /// In block confirmation for `confirm_polls` polls, then paid.
    Confirm,
    /// Partially paid, forever.
    Partial,
    /// Payment failed (GenAuth: cancelled).
    Failed,
    /// Refunded (GenAuth: cancelled).
    Refund,
    /// Expired (PayProtocol: failed, 4; GenAuth: expired, 5).
    Expired,
    /// The provider does not know the order (PayProtocol HTTP 404, GenAuth statusCode 404).
    NotFound,
    /// PayProtocol: code 200 with `"data": null`; GenAuth: statusCode 200 with `"data": null`.
    NoData,
    /// Pending forever.
    Never,
    /// Paid in ETH with an amount above 2^64 base units.
    Big,
    /// A status code paysync does not know (PayProtocol 7, GenAuth "9").
    Unknown,
    /// The provider rejects the request as invalid (PayProtocol HTTP 400, GenAuth
    /// statusCode 400 with a string apiCode).
    BadReq,
}

/// Markers checked in this order (case-insensitive substring of the order number);
/// longer or more specific markers come first so e.g. `NOTFOUND` never reads as another.
const MARKERS: &[(&str, Scenario)] = &[
    ("NOTFOUND", Scenario::NotFound),
    ("NODATA", Scenario::NoData),
    ("BADREQ", Scenario::BadReq),
    ("UNKNOWN", Scenario::Unknown),
    ("NEVER", Scenario::Never),
    ("PENDING", Scenario::Pending),
    ("CONFIRM", Scenario::Confirm),
    ("PARTIAL", Scenario::Partial),
    ("FAILED", Scenario::Failed),
    ("REFUND", Scenario::Refund),
    ("EXPIRED", Scenario::Expired),
    ("BIG", Scenario::Big),
    ("PAID", Scenario::Paid),
];

/// The share (in percent, by `fnv1a(order) % 100`) of each scenario for order
/// numbers without a marker: a realistic mix for demo files.
const MIX: &[(u64, Scenario)] = &[
    (60, Scenario::Paid),
    (75, Scenario::Pending),
    (82, Scenario::Confirm),
    (86, Scenario::Failed),
    (89, Scenario::Refund),
    (92, Scenario::Partial),
    (95, Scenario::NotFound),
    (97, Scenario::Expired),
    (100, Scenario::Paid),
];

impl Scenario {
    /// The scenario of an order number: its marker if it has one, else by hash.
    pub fn of(order_no: &str) -> Scenario {
        let upper = order_no.to_ascii_uppercase();
        if let Some((_, s)) = MARKERS.iter().find(|(m, _)| upper.contains(m)) {
            return *s;
        }
        let bucket = fnv1a(order_no.as_bytes()) % 100;
        MIX.iter()
            .find(|(limit, _)| bucket < *limit)
            .map_or(Scenario::Paid, |(_, s)| *s)
    }

    /// PayProtocol `paymentStatus` at the answered poll number `n` (0-based), for
    /// the scenarios that answer with data.
    pub fn payprotocol_status(self, n: u32, pending_polls: u32, confirm_polls: u32) -> i64 {
        match self {
            Scenario::Paid | Scenario::Big => 0,
            Scenario::Pending if n < pending_polls => 1,
            Scenario::Pending if n < pending_polls.saturating_add(confirm_polls) => 2,
            Scenario::Pending => 0,
            Scenario::Confirm if n < confirm_polls => 2,
            Scenario::Confirm => 0,
            Scenario::Partial => 3,
            Scenario::Failed | Scenario::Expired => 4,
            Scenario::Refund => 5,
            Scenario::Never => 1,
            Scenario::Unknown => 7,
            // Answered before a status is needed; kept total for safety.
            Scenario::NotFound | Scenario::NoData | Scenario::BadReq => 1,
        }
    }

    /// GenAuth `payStatus` at the answered poll number `n` (0-based).
    pub fn genauth_status(
        self,
        n: u32,
        pending_polls: u32,
        confirm_polls: u32,
        h: u64,
    ) -> &'static str {
        match self {
            Scenario::Paid => {
                if h & 1 == 0 {
                    "3"
                } else {
                    "2"
                }
            }
            Scenario::Big | Scenario::Partial => "3",
            Scenario::Pending if n < pending_polls => "1",
            Scenario::Pending => "3",
            Scenario::Confirm if n < confirm_polls => "1",
            Scenario::Confirm => "3",
            Scenario::Failed | Scenario::Refund => "4",
            Scenario::Expired => "5",
            Scenario::Never => "1",
            Scenario::Unknown => "9",
            Scenario::NotFound | Scenario::NoData | Scenario::BadReq => "1",
        }
    }
}

/// 64-bit FNV-1a: a stable hash (std's hashers are randomly keyed or unspecified).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finalizer of `a` combined with `b`: derives independent stable values.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform value in `[0, 1)` from a hash.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// 2024-01-01 00:00:00 UTC: order creation times are spread over the following 300 days.
const EPOCH_2024: i64 = 1_704_067_200;
const BASE58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const HEX: &[u8] = b"0123456789abcdef";

/// Stable facts of one order, derived from its number.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `fnv1a` of the order number; the seed of every other fact.
    pub h: u64,
    /// Quote amount in cents (PayProtocol USD quote, GenAuth paid amount).
    pub cents: u64,
    /// Creation time, Unix seconds (UTC).
    pub created: i64,
    /// Arrival on chain / payment time, Unix seconds (UTC).
    pub paid: i64,
}

impl Facts {
    pub fn of(order_no: &str) -> Facts {
        let h = fnv1a(order_no.as_bytes());
        let cents = 100 + mix(h, 1) % 49_900;
        let created = EPOCH_2024 + (mix(h, 2) % (300 * 86_400)) as i64;
        let paid = created + 30 + (mix(h, 3) % 900) as i64;
        Facts {
            h,
            cents,
            created,
            paid,
        }
    }

    /// A stream of values for field number `k`.
    pub fn value(&self, k: u64) -> u64 {
        mix(self.h, k)
    }

    /// `len` characters drawn from `alphabet`, stable for field `k`.
    pub fn chars(&self, k: u64, alphabet: &[u8], len: usize) -> String {
        (0..len as u64)
            .map(|i| {
                let v = mix(self.h ^ k.rotate_left(17), i);
                char::from(alphabet[(v % alphabet.len() as u64) as usize])
            })
            .collect()
    }

    pub fn hex(&self, k: u64, len: usize) -> String {
        self.chars(k, HEX, len)
    }

    /// A TRON-style base58 address (`T` + 33 characters).
    pub fn tron_address(&self, k: u64) -> String {
        format!("T{}", self.chars(k, BASE58, 33))
    }

    /// An EVM-style address (`0x` + 40 hex digits).
    pub fn evm_address(&self, k: u64) -> String {
        format!("0x{}", self.hex(k, 40))
    }

    /// `len` decimal digits, stable for field `k`.
    pub fn digits(&self, k: u64, len: usize) -> String {
        self.chars(k, b"0123456789", len)
    }
}

/// `"YYYY-MM-DD HH:MM:SS"` in UTC+8, no zone (how both providers write times).
pub fn cst_time(unix: i64) -> String {
    naive_cst(unix).format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `"YYYYMMDDHHMMSS"` in UTC+8 (prefix of generated payment numbers).
pub fn cst_compact(unix: i64) -> String {
    naive_cst(unix).format("%Y%m%d%H%M%S").to_string()
}

fn naive_cst(unix: i64) -> NaiveDateTime {
    DateTime::from_timestamp(unix + 8 * 3600, 0)
        .unwrap_or_default()
        .naive_utc()
}

/// Cents as a trimmed decimal string: 790 -> `"7.9"`, 100 -> `"1"`, 1234 -> `"12.34"`.
pub fn cents_decimal(cents: u64) -> String {
    let s = format!("{}.{:02}", cents / 100, cents % 100);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a matches the published 64-bit test vectors, so scenarios are stable.
    #[test]
    fn fnv1a_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Markers win over the hash, case-insensitively, and specific markers beat
    /// the ones they contain.
    #[test]
    fn markers() {
        assert_eq!(Scenario::of("ord-paid-1"), Scenario::Paid);
        assert_eq!(Scenario::of("X-NOTFOUND"), Scenario::NotFound);
        assert_eq!(Scenario::of("pending-7"), Scenario::Pending);
        assert_eq!(Scenario::of("Confirm9"), Scenario::Confirm);
        assert_eq!(Scenario::of("BIG-1"), Scenario::Big);
        assert_eq!(Scenario::of("unknown"), Scenario::Unknown);
        assert_eq!(Scenario::of("badreq"), Scenario::BadReq);
        assert_eq!(Scenario::of("NODATA"), Scenario::NoData);
        assert_eq!(Scenario::of("never"), Scenario::Never);
    }

    /// Unmarked numbers get a realistic mix: mostly paid, some pending, a few of
    /// every other outcome.
    #[test]
    fn unmarked_mix() {
        let mut counts = std::collections::HashMap::new();
        for i in 0..10_000u32 {
            *counts
                .entry(Scenario::of(&format!("{}", 900_000_000 + i * 7919)))
                .or_insert(0u32) += 1;
        }
        let share = |s| f64::from(counts.get(&s).copied().unwrap_or(0)) / 10_000.0;
        assert!((0.58..0.67).contains(&share(Scenario::Paid)), "{counts:?}");
        assert!(
            (0.12..0.18).contains(&share(Scenario::Pending)),
            "{counts:?}"
        );
        for s in [
            Scenario::Confirm,
            Scenario::Failed,
            Scenario::Refund,
            Scenario::Partial,
            Scenario::NotFound,
            Scenario::Expired,
        ] {
            assert!((0.01..0.1).contains(&share(s)), "{s:?}: {counts:?}");
        }
    }

    /// The PENDING lifecycle is 1 x pending_polls, 2 x confirm_polls, then 0.
    #[test]
    fn pending_lifecycle() {
        let st: Vec<i64> = (0..5)
            .map(|n| Scenario::Pending.payprotocol_status(n, 2, 1))
            .collect();
        assert_eq!(st, [1, 1, 2, 0, 0]);
        let ga: Vec<&str> = (0..4)
            .map(|n| Scenario::Pending.genauth_status(n, 2, 1, 0))
            .collect();
        assert_eq!(ga, ["1", "1", "3", "3"]);
    }

    /// Decimal formatting and UTC+8 times.
    #[test]
    fn formats() {
        assert_eq!(cents_decimal(790), "7.9");
        assert_eq!(cents_decimal(100), "1");
        assert_eq!(cents_decimal(1234), "12.34");
        assert_eq!(cents_decimal(5), "0.05");
        assert_eq!(cst_time(1_712_122_806), "2024-04-03 13:40:06");
        assert_eq!(cst_compact(1_712_122_806), "20240403134006");
    }
}
