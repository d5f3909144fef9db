//! Payment providers behind one seam: each provider turns an order reference into a
//! normalized [`PayDetail`] using the shared [`crate::fetch::Transport`], and classifies every
//! failure into a [`FetchError`] that the retry policy understands.
//!
//! - [`PayProvider`]: the trait every provider implements.
//! - [`Provider`]: enum dispatch over the configured provider (no boxing on the hot path).
//! - [`OrderRef`]: what a provider needs to look an order up.
//! - [`FetchError`]: the failure classes shared by all providers.
//!
//! Adding a provider: one file here, one arm in [`Provider`] and [`ProviderKind`], one
//! config variant, and its mock under `crate::mock`.

pub mod genauth;
pub mod payprotocol;

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::format::{Item, Parsed, StrftimeItems};
use serde::{Deserialize, Serialize};

use crate::model::{OrderNo, PayDetail};

/// Which provider an order belongs to (the `provider` output column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    PayProtocol,
    GenAuth,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::PayProtocol => "payprotocol",
            ProviderKind::GenAuth => "genauth",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "payprotocol" => Some(ProviderKind::PayProtocol),
            "genauth" => Some(ProviderKind::GenAuth),
            _ => None,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a provider needs to look one order up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRef {
    pub order_no: OrderNo,
    /// PayProtocol's optional payment order number (`outPaymentNo`).
    pub payment_no: Option<String>,
}

/// Why one provider call did not produce a [`PayDetail`]. The variants are classes the
/// retry policy decides on (`crate::fetch::retry::classify`); messages never contain
/// secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No answer within `fetch.timeout`.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// Connecting, sending, or reading the body failed (reset, refused, DNS).
    #[error("transport error: {0}")]
    Transport(String),
    /// The provider throttled us (HTTP 429, or a 429 code inside the body).
    #[error("throttled by provider (code {code})")]
    Throttled {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// A server-side failure worth retrying (HTTP 5xx or a 5xx code in the body).
    #[error("server error {status}: {detail}")]
    Server {
        status: u16,
        retry_after: Option<Duration>,
        detail: String,
    },
    /// The body could not be understood (not JSON, truncated, wrong shape).
    #[error("malformed response (HTTP {status}): {detail}")]
    Malformed { status: u16, detail: String },
    /// The body exceeded the configured cap and was not read further.
    #[error("response body larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Credentials were rejected: the run stops, retrying would only burn quota.
    #[error("authentication rejected by provider: {0}")]
    Auth(String),
    /// The provider does not know the order.
    #[error("order not found")]
    NotFound,
    /// The provider refused the request for a reason retrying will not fix
    /// (a 4xx, or a business error code inside a 200 body).
    #[error("provider refused the request: {0}")]
    Rejected(String),
}

/// The provider seam. Implementations send every HTTP request through the
/// [`crate::fetch::Transport`] they were built with, so rate limiting, pausing, timeouts and body
/// caps apply to all calls (token and currency-list calls included).
pub trait PayProvider {
    /// Which provider this is.
    fn kind(&self) -> ProviderKind;

    /// One-time work before details are fetched (PayProtocol: the currency table).
    fn prepare(&self) -> impl Future<Output = Result<(), FetchError>> + Send;

    /// One attempt to fetch one order's pay detail. Retrying is the caller's job;
    /// a provider only retries internally where its protocol requires it (GenAuth
    /// refreshes an expired token once on a 401).
    fn fetch_detail(
        &self,
        order: &OrderRef,
    ) -> impl Future<Output = Result<PayDetail, FetchError>> + Send;
}

/// The configured provider.
pub enum Provider {
    PayProtocol(payprotocol::PayProtocol),
    GenAuth(genauth::GenAuth),
}

impl PayProvider for Provider {
    fn kind(&self) -> ProviderKind {
        match self {
            Provider::PayProtocol(p) => p.kind(),
            Provider::GenAuth(p) => p.kind(),
        }
    }

    async fn prepare(&self) -> Result<(), FetchError> {
        match self {
            Provider::PayProtocol(p) => p.prepare().await,
            Provider::GenAuth(p) => p.prepare().await,
        }
    }

    async fn fetch_detail(&self, order: &OrderRef) -> Result<PayDetail, FetchError> {
        match self {
            Provider::PayProtocol(p) => p.fetch_detail(order).await,
            Provider::GenAuth(p) => p.fetch_detail(order).await,
        }
    }
}

/// The naive layouts of provider times, read once (`NaiveDateTime::parse_from_str`
/// would read the format string again on every call).
static NAIVE_LAYOUTS: LazyLock<[Vec<Item<'static>>; 2]> = LazyLock::new(|| {
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .map(|layout| StrftimeItems::new(layout).parse().expect("a valid layout"))
});

/// Parses a provider time: naive `"YYYY-MM-DD HH:MM:SS[.fff]"` in the given zone,
/// or an RFC 3339 / ISO 8601 time with its own offset. Returns `None` for empty input.
///
/// The naive layouts are tried first, as they are what providers send; no text is
/// both naive and RFC 3339 (which requires an offset), so the order changes nothing.
pub fn parse_provider_time(
    raw: &str,
    naive_zone: chrono::FixedOffset,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    use chrono::{DateTime, TimeZone};
    let s = raw.trim();
    if s.is_empty() {
        return Ok(None);
    }
    for layout in NAIVE_LAYOUTS.iter() {
        let mut parsed = Parsed::new();
        let naive = chrono::format::parse(&mut parsed, s, layout.iter())
            .and_then(|()| parsed.to_naive_datetime_with_offset(0));
        if let Ok(n) = naive {
            return naive_zone
                .from_local_datetime(&n)
                .single()
                .map(|t| Some(t.to_utc()))
                .ok_or_else(|| format!("time {s:?} does not exist in zone {naive_zone}"));
        }
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.to_utc()));
    }
    Err(format!("unrecognized time {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rfc3339;
    use chrono::FixedOffset;

    /// Naive provider times are read in the configured zone (UTC+8 by default) and
    /// written as UTC; explicit offsets and milliseconds are kept.
    #[test]
    fn provider_times_to_utc() {
        let cst = FixedOffset::east_opt(8 * 3600).unwrap();
        let t = |s| parse_provider_time(s, cst).unwrap().map(rfc3339);
        assert_eq!(
            t("2024-04-03 13:40:06").as_deref(),
            Some("2024-04-03T05:40:06Z")
        );
        assert_eq!(
            t("2024-01-01 03:00:00").as_deref(),
            Some("2023-12-31T19:00:00Z")
        );
        assert_eq!(
            t("2024-07-29T15:51:28.071Z").as_deref(),
            Some("2024-07-29T15:51:28.071Z")
        );
        assert_eq!(
            t("2024-04-03 13:40:06.500").as_deref(),
            Some("2024-04-03T05:40:06.500Z")
        );
        assert_eq!(
            t("2024-04-03T13:40:06+08:00").as_deref(),
            Some("2024-04-03T05:40:06Z")
        );
        assert_eq!(t("  ").as_deref(), None);
        assert!(parse_provider_time("yesterday", cst).is_err());
        let utc = FixedOffset::east_opt(0).unwrap();
        assert_eq!(
            parse_provider_time("2024-04-03 13:40:06", utc)
                .unwrap()
                .map(rfc3339)
                .as_deref(),
            Some("2024-04-03T13:40:06Z")
        );
    }

    mod properties {
        use super::*;
        use crate::model::rfc3339;
        use chrono::{DateTime, NaiveDateTime, TimeDelta, Timelike};
        use proptest::prelude::*;

        /// A naive time from year 1000 to 9999 with milliseconds.
        fn naive() -> impl Strategy<Value = NaiveDateTime> {
            (-30_610_224_000i64..253_402_300_799, 0u32..1000).prop_map(|(secs, ms)| {
                DateTime::from_timestamp(secs, ms * 1_000_000)
                    .unwrap()
                    .naive_utc()
            })
        }

        proptest! {
            /// A naive UTC+8 time is the same wall time minus eight hours, with or
            /// without milliseconds, with a space or a `T`; its RFC 3339 UTC text
            /// parses back to the same instant and ends in `Z`.
            #[test]
            fn utc8_is_an_eight_hour_shift(t in naive(), millis in any::<bool>(), tee in any::<bool>()) {
                let t = if millis { t } else { t.with_nanosecond(0).unwrap() };
                let fmt = match (tee, millis) {
                    (false, false) => "%Y-%m-%d %H:%M:%S",
                    (false, true) => "%Y-%m-%d %H:%M:%S%.3f",
                    (true, false) => "%Y-%m-%dT%H:%M:%S",
                    (true, true) => "%Y-%m-%dT%H:%M:%S%.3f",
                };
                let text = t.format(fmt).to_string();
                let cst = FixedOffset::east_opt(8 * 3600).unwrap();
                let got = parse_provider_time(&text, cst).unwrap().unwrap();
                prop_assert_eq!(got, (t - TimeDelta::hours(8)).and_utc());
                let out = rfc3339(got);
                prop_assert!(out.ends_with('Z'), "{}", out);
                prop_assert_eq!(DateTime::parse_from_rfc3339(&out).unwrap().to_utc(), got);
                // Milliseconds are written only when the provider gave them.
                prop_assert_eq!(out.contains('.'), millis && t.nanosecond() != 0);
            }

            /// A naive time in any zone, and the same wall time written with that
            /// zone's explicit offset, are the same instant: `wall - offset`.
            #[test]
            fn naive_zone_equals_explicit_offset(t in naive(), minutes in -14 * 60i32..=14 * 60) {
                let zone = FixedOffset::east_opt(minutes * 60).unwrap();
                let naive_text = t.format("%Y-%m-%d %H:%M:%S%.f").to_string();
                let with_offset = format!("{}{zone}", t.format("%Y-%m-%dT%H:%M:%S%.f"));
                let a = parse_provider_time(&naive_text, zone).unwrap().unwrap();
                let utc = FixedOffset::east_opt(0).unwrap();
                let b = parse_provider_time(&with_offset, utc).unwrap().unwrap();
                prop_assert_eq!(a, b);
                prop_assert_eq!(a, (t - TimeDelta::minutes(i64::from(minutes))).and_utc());
            }

            /// Any text reads as the format-string reader it replaced read it:
            /// RFC 3339 first, then `NaiveDateTime::parse_from_str` per layout.
            #[test]
            fn same_as_parse_from_str(s in "\\PC{0,30}|[0-9: T.+Z-]{0,30}|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}[ T][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\\.[0-9]{0,12})?(Z|[+-][0-9]{2}:[0-9]{2})?") {
                let cst = FixedOffset::east_opt(8 * 3600).unwrap();
                let model = || -> Result<Option<DateTime<chrono::Utc>>, String> {
                    use chrono::TimeZone;
                    let s = s.trim();
                    if s.is_empty() {
                        return Ok(None);
                    }
                    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                        return Ok(Some(t.to_utc()));
                    }
                    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
                        if let Ok(n) = NaiveDateTime::parse_from_str(s, fmt) {
                            return cst
                                .from_local_datetime(&n)
                                .single()
                                .map(|t| Some(t.to_utc()))
                                .ok_or_else(|| format!("time {s:?} does not exist in zone {cst}"));
                        }
                    }
                    Err(format!("unrecognized time {s:?}"))
                };
                prop_assert_eq!(parse_provider_time(&s, cst), model());
            }

            /// Any text: a time, nothing (blank), or an error naming it; never a
            /// panic.
            #[test]
            fn any_text_is_handled(s in "\\PC{0,30}|[0-9: T.+-]{0,30}") {
                let cst = FixedOffset::east_opt(8 * 3600).unwrap();
                match parse_provider_time(&s, cst) {
                    Ok(None) => prop_assert!(s.trim().is_empty()),
                    // Past 9999 (a late time with a negative offset) chrono
                    // writes a signed year, which RFC 3339 cannot hold.
                    Ok(Some(t)) if rfc3339(t).starts_with('+') => {}
                    Ok(Some(t)) => prop_assert_eq!(
                        DateTime::parse_from_rfc3339(&rfc3339(t)).unwrap().to_utc(),
                        t
                    ),
                    Err(e) => prop_assert!(!s.trim().is_empty() && e.contains("time")),
                }
            }
        }
    }
}
