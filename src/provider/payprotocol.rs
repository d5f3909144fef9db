//! The PayProtocol merchant API: request signing, `GET /payment/detail`, the
//! currency-decimals table (`GET /conf/list/currency`), and the mapping of its
//! answers to [`PayDetail`].
//!
//! - [`sign`]: the `X-PAY-SIGN` rule (HMAC-SHA256 over timestamp, method, target, body).
//! - [`Signer`]: the same rule with the HMAC keyed once (what each request uses).
//! - [`PayProtocol`]: the provider; every call is signed and sent through the transport.
//! - [`classify_detail`]: a pure function from an HTTP answer to a detail or a
//!   [`FetchError`] class.
//! - [`Currencies`]: decimals per (chain id, symbol), from the API or the config.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use chrono::{DateTime, FixedOffset, Utc};
use hmac::{Hmac, Mac};
use http::Uri;
use http::header::{HOST, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;

use super::{FetchError, OrderRef, PayProvider, ProviderKind, parse_provider_time};
use crate::fetch::{Endpoint, RawResponse, Request, Transport};
use crate::model::{Amount, PayDetail, PayStatus};

/// Default naive-time zone of PayProtocol timestamps (UTC+8, an assumption).
pub const DEFAULT_TIME_ZONE: &str = "+08:00";

const X_PAY_KEY: HeaderName = HeaderName::from_static("x-pay-key");
const X_PAY_TIMESTAMP: HeaderName = HeaderName::from_static("x-pay-timestamp");
const X_PAY_SIGN: HeaderName = HeaderName::from_static("x-pay-sign");

/// `X-PAY-SIGN` for one request: standard Base64 of HMAC-SHA256 over
/// `timestamp + METHOD + request_target + body`, where `request_target` is the path
/// with the `/api/mer` prefix and, for GET, `?` and the query exactly as sent.
pub fn sign(
    secret: &[u8],
    timestamp: &str,
    method: &str,
    request_target: &str,
    body: &[u8],
) -> String {
    Signer::new(secret).sign(timestamp, method, request_target, body)
}

/// The [`sign`] rule with the HMAC keyed once: each signature starts from a copy of
/// the keyed state, so the key is not hashed again per request. `Debug` shows
/// nothing of the key.
#[derive(Clone)]
pub struct Signer(Hmac<Sha256>);

impl Signer {
    pub fn new(secret: &[u8]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC accepts any key length"))
    }

    /// `X-PAY-SIGN` for one request (see [`sign`]).
    pub fn sign(&self, timestamp: &str, method: &str, request_target: &str, body: &[u8]) -> String {
        let method = if method.bytes().any(|b| b.is_ascii_lowercase()) {
            Cow::Owned(method.to_ascii_uppercase())
        } else {
            Cow::Borrowed(method)
        };
        let mut mac = self.0.clone();
        mac.update(timestamp.as_bytes());
        mac.update(method.as_bytes());
        mac.update(request_target.as_bytes());
        mac.update(body);
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer([REDACTED])")
    }
}

/// Everything the PayProtocol client needs from the config.
#[derive(Debug, Clone)]
pub struct PayProtocolSettings {
    /// Whole API base, `/api/mer` prefix included.
    pub base_url: String,
    pub api_key: String,
    pub api_secret: SecretString,
    /// Zone of naive provider times (`createTime`).
    pub naive_zone: FixedOffset,
    /// Decimals per (chain id, symbol) that override or stand in for the API's list.
    pub decimals: HashMap<(i64, String), u32>,
}

/// Decimals per chain id, then per upper-case symbol. Nested so that a lookup, made
/// twice for every order, borrows the symbol instead of allocating a key; it
/// upper-cases into a new string only when the symbol has lower-case letters.
#[derive(Debug, Default)]
pub struct Currencies(HashMap<i64, HashMap<String, u32>>);

impl Currencies {
    pub fn decimals(&self, chain_id: i64, symbol: &str) -> Option<u32> {
        let chain = self.0.get(&chain_id)?;
        if symbol.bytes().any(|b| b.is_ascii_lowercase()) {
            chain.get(&symbol.to_ascii_uppercase()).copied()
        } else {
            chain.get(symbol).copied()
        }
    }

    pub(crate) fn insert(&mut self, chain_id: i64, symbol: &str, decimals: u32) {
        self.0
            .entry(chain_id)
            .or_default()
            .insert(symbol.to_ascii_uppercase(), decimals);
    }
}

/// The PayProtocol provider.
pub struct PayProtocol {
    settings: PayProtocolSettings,
    transport: Transport,
    base: Endpoint,
    /// `X-PAY-KEY`.
    api_key: HeaderValue,
    /// Keyed with the API secret.
    signer: Signer,
    currencies: RwLock<Currencies>,
}

impl PayProtocol {
    pub fn new(settings: PayProtocolSettings, transport: Transport) -> Result<Self, String> {
        let trimmed = settings.base_url.trim_end_matches('/');
        let base = Endpoint::parse(trimmed).map_err(|e| format!("invalid base_url: {e}"))?;
        let api_key = HeaderValue::from_str(&settings.api_key)
            .map_err(|_| "api_key is not a valid HTTP header value".to_owned())?;
        let signer = Signer::new(settings.api_secret.expose_secret().as_bytes());
        let mut currencies = Currencies::default();
        for ((chain, symbol), d) in &settings.decimals {
            currencies.insert(*chain, symbol, *d);
        }
        Ok(Self {
            settings,
            transport,
            base,
            api_key,
            signer,
            currencies: RwLock::new(currencies),
        })
    }

    /// Builds the URI for `path` with `query` pairs, encoded once; the request
    /// target that is signed is read back from that same URI.
    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Uri, FetchError> {
        self.base
            .uri(path, query)
            .map_err(|e| FetchError::Transport(format!("cannot build the request target: {e}")))
    }

    /// Sends a signed GET. The timestamp is taken after the limiter admits the
    /// request, so a long wait (or a pause after a 429) never sends a stale signature.
    async fn get(&self, uri: Uri) -> Result<RawResponse, FetchError> {
        self.transport.admit().await;
        // Exactly the request target the client writes on the wire.
        let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let sig = self.signer.sign(&ts, "GET", target, b"");
        // Digits and Base64 are always valid header values.
        let (Ok(ts), Ok(sig)) = (HeaderValue::try_from(ts), HeaderValue::try_from(sig)) else {
            return Err(FetchError::Transport(
                "cannot encode the signature headers".to_owned(),
            ));
        };
        let req = Request::get(uri)
            .header(HOST, self.base.host())
            .header(X_PAY_KEY, self.api_key.clone())
            .header(X_PAY_TIMESTAMP, ts)
            .header(X_PAY_SIGN, sig);
        self.transport.send_admitted(req).await
    }

    async fn load_currencies(&self) -> Result<usize, FetchError> {
        let raw = self.get(self.url("/conf/list/currency", &[])?).await?;
        let list = classify_currencies(&raw)?;
        let mut table = self.currencies.write().unwrap_or_else(|e| e.into_inner());
        let mut added = 0;
        for c in list {
            // Config overrides win over the API's list.
            let key = (c.chain_id, c.symbol.to_ascii_uppercase());
            if !self.settings.decimals.contains_key(&key) {
                table.insert(c.chain_id, &c.symbol, c.decimals);
                added += 1;
            }
        }
        Ok(added)
    }
}

impl PayProvider for PayProtocol {
    fn kind(&self) -> ProviderKind {
        ProviderKind::PayProtocol
    }

    /// Loads the currency table (a few tries). Rejected credentials stop the run;
    /// other failures leave only the configured overrides, with a warning.
    async fn prepare(&self) -> Result<(), FetchError> {
        let mut last = None;
        for attempt in 1..=3u32 {
            match self.load_currencies().await {
                Ok(n) => {
                    tracing::debug!(currencies = n, "loaded currency decimals");
                    return Ok(());
                }
                Err(e @ FetchError::Auth(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "currency list failed");
                    last = Some(e);
                    tokio::time::sleep(std::time::Duration::from_millis(250 * u64::from(attempt)))
                        .await;
                }
            }
        }
        if let Some(e) = last {
            tracing::warn!(error = %e, "cannot load the currency list; only [provider.decimals] overrides are known");
        }
        Ok(())
    }

    async fn fetch_detail(&self, order: &OrderRef) -> Result<PayDetail, FetchError> {
        let payment = order.payment_no.as_deref().filter(|p| !p.is_empty());
        let pairs = [
            ("outTradeNo", order.order_no.as_str()),
            ("outPaymentNo", payment.unwrap_or_default()),
        ];
        let query = if payment.is_some() {
            &pairs[..]
        } else {
            &pairs[..1]
        };
        let raw = self.get(self.url("/payment/detail", query)?).await?;
        let currencies = self.currencies.read().unwrap_or_else(|e| e.into_inner());
        classify_detail(&raw, &currencies, self.settings.naive_zone)
    }
}

/// A `T` read from a JSON object only. serde's derived `Deserialize` for a struct
/// also takes an array of its fields in declaration order, which no PayProtocol
/// answer is: `[200, "ok", null, {...}]` would otherwise pass for an envelope.
#[derive(Debug)]
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectVisitor(std::marker::PhantomData))
            .map(Object)
    }
}

/// The response envelope `{code, msg, description?, data}`. The texts, read only
/// for errors, borrow from the body.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "'de: 'a, T: Deserialize<'de>"))]
struct Envelope<'a, T> {
    code: Option<i64>,
    #[serde(default)]
    msg: Option<Text<'a>>,
    #[serde(default)]
    description: Option<Text<'a>>,
    data: Option<T>,
}

/// `data` of `GET /payment/detail`. Everything but `outTradeNo` may be absent.
/// Text borrows from the body when it has no escapes, so only what the detail
/// keeps is copied.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default, bound(deserialize = "'de: 'a"))]
struct DetailDto<'a> {
    chain_id: Option<i64>,
    out_trade_no: Option<Text<'a>>,
    out_payment_no: Option<Text<'a>>,
    quote_currency_symbol: Option<Text<'a>>,
    quote_amount: Option<AmountText<'a>>,
    payment_status: Option<i64>,
    payment_type: Option<i64>,
    expected_amount: Option<AmountText<'a>>,
    settlement_amount: Option<AmountText<'a>>,
    settlement_currency_symbol: Option<Text<'a>>,
    transfer_hash: Option<Text<'a>>,
    user_wallet_address: Option<Text<'a>>,
    from_address: Option<Text<'a>>,
    create_time: Option<Text<'a>>,
    block_time: Option<i64>,
}

/// One entry of `GET /conf/list/currency` (`pub(crate)` for `crate::fuzzing`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CurrencyDto {
    pub(crate) chain_id: i64,
    pub(crate) symbol: String,
    pub(crate) decimals: u32,
}

/// JSON text, borrowed from the body when it has no escapes and copied when it
/// has. (A field of type `Option<Cow<str>>` would always be copied: serde borrows
/// a bare `Cow<str>` only.)
#[derive(Debug)]
struct Text<'a>(Cow<'a, str>);

/// An amount: documented as a string; a bare integer is taken too, never a fraction.
#[derive(Debug)]
struct AmountText<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor { integers: false }).map(Text)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for AmountText<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor { integers: true })
            .map(AmountText)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for AmountText<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Reads a JSON string, or with `integers` also an integer, as text.
struct TextVisitor {
    integers: bool,
}

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.integers {
            "an amount string or integer"
        } else {
            "a string"
        })
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        if self.integers {
            Ok(Cow::Owned(v.to_string()))
        } else {
            Err(E::invalid_type(serde::de::Unexpected::Unsigned(v), &self))
        }
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        if self.integers {
            Ok(Cow::Owned(v.to_string()))
        } else {
            Err(E::invalid_type(serde::de::Unexpected::Signed(v), &self))
        }
    }
}

/// The normalized status of a `paymentStatus` code.
pub fn map_status(code: i64) -> PayStatus {
    match code {
        0 => PayStatus::Paid,
        1 => PayStatus::Pending,
        2 => PayStatus::Confirming,
        3 => PayStatus::PartiallyPaid,
        4 => PayStatus::Failed,
        5 => PayStatus::Refunded,
        _ => PayStatus::Unknown,
    }
}

/// The payment method name of a `paymentType` code.
fn payment_method(code: i64) -> String {
    match code {
        0 => "contract".into(),
        1 => "wallet_transfer".into(),
        other => other.to_string(),
    }
}

/// A short, printable excerpt of a body for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Classifies the HTTP layer and the envelope; `Ok(Some(data))` on success,
/// `Ok(None)` for a success envelope without data.
fn classify_envelope<'a, T: Deserialize<'a>>(
    raw: &'a RawResponse,
) -> Result<Option<T>, FetchError> {
    let status = raw.status;
    match status {
        // The body says why (a bad signature, an expired timestamp: clock skew).
        401 | 403 => {
            return Err(FetchError::Auth(format!(
                "HTTP {status}: {}",
                snippet(&raw.body)
            )));
        }
        404 => return Err(FetchError::NotFound),
        429 => {
            return Err(FetchError::Throttled {
                code: 429,
                retry_after: raw.retry_after,
            });
        }
        408 | 500..=599 => {
            return Err(FetchError::Server {
                status,
                retry_after: raw.retry_after,
                detail: snippet(&raw.body),
            });
        }
        200..=299 => {}
        _ => {
            return Err(FetchError::Rejected(format!(
                "HTTP {status}: {}",
                snippet(&raw.body)
            )));
        }
    }
    // UTF-8 is checked once for the whole body, so the parser need not check each
    // string it reads.
    let malformed = |detail: String| FetchError::Malformed { status, detail };
    let body = std::str::from_utf8(&raw.body)
        .map_err(|e| malformed(format!("the body is not UTF-8: {e}")))?;
    let Object(env): Object<Envelope<'a, T>> =
        serde_json::from_str(body).map_err(|e| malformed(e.to_string()))?;
    let msg = || {
        let mut m = env.msg.as_deref().unwrap_or_default().to_owned();
        if let Some(d) = env.description.as_deref().filter(|d| !d.is_empty()) {
            m = format!("{m} ({d})");
        }
        m
    };
    match env.code {
        Some(200) => Ok(env.data),
        Some(c @ (401 | 403)) => Err(FetchError::Auth(format!("code {c}: {}", msg()))),
        Some(404) => Err(FetchError::NotFound),
        Some(429) => Err(FetchError::Throttled {
            code: 429,
            retry_after: raw.retry_after,
        }),
        Some(c @ 500..=599) => Err(FetchError::Server {
            status: c as u16,
            retry_after: raw.retry_after,
            detail: msg(),
        }),
        Some(c) => Err(FetchError::Rejected(format!("code {c}: {}", msg()))),
        None => Err(FetchError::Malformed {
            status,
            detail: "envelope has no code".into(),
        }),
    }
}

pub(crate) fn classify_currencies(raw: &RawResponse) -> Result<Vec<CurrencyDto>, FetchError> {
    let list = classify_envelope::<Vec<Object<CurrencyDto>>>(raw)?.unwrap_or_default();
    Ok(list.into_iter().map(|Object(c)| c).collect())
}

/// The text, unless it is missing or blank.
fn non_empty<T: std::ops::Deref<Target = str>>(s: &Option<T>) -> Option<&str> {
    s.as_deref().filter(|v| !v.trim().is_empty())
}

/// [`non_empty`], owned.
fn non_empty_owned(s: Option<Text<'_>>) -> Option<String> {
    s.filter(|v| !v.trim().is_empty())
        .map(|Text(t)| t.into_owned())
}

/// Turns one `GET /payment/detail` answer into a detail or a failure class.
pub fn classify_detail(
    raw: &RawResponse,
    currencies: &Currencies,
    naive_zone: FixedOffset,
) -> Result<PayDetail, FetchError> {
    let Some(Object(data)) = classify_envelope::<Option<Object<DetailDto>>>(raw)?.flatten() else {
        return Err(FetchError::NotFound);
    };
    if data.out_trade_no.as_deref().is_none_or(str::is_empty) && data.payment_status.is_none() {
        return Err(FetchError::NotFound);
    }
    let malformed = |detail: String| FetchError::Malformed {
        status: raw.status,
        detail,
    };
    let code = data
        .payment_status
        .ok_or_else(|| malformed("paymentStatus is missing".into()))?;
    let mut d = PayDetail::new(code.to_string(), map_status(code));
    d.chain_id = data.chain_id.map(|c| c.to_string());
    let currency = non_empty(&data.settlement_currency_symbol);
    let scale =
        |field: &str, units: &Option<AmountText<'_>>| -> Result<Option<Amount>, FetchError> {
            let Some(units) = non_empty(units) else {
                return Ok(None);
            };
            let (Some(chain), Some(sym)) = (data.chain_id, currency) else {
                return Err(FetchError::Rejected(format!(
                    "{field} {units} has no chain or currency to scale it by"
                )));
            };
            let dec = currencies.decimals(chain, sym).ok_or_else(|| {
                FetchError::Rejected(format!(
                    "no decimals known for {sym} on chain {chain}; add it to [provider.decimals]"
                ))
            })?;
            Amount::from_base_units(units, dec)
                .map(Some)
                .map_err(|e| malformed(format!("{field}: {e}")))
        };
    d.amount = scale("settlementAmount", &data.settlement_amount)?;
    // Unpaid orders may not name their settlement currency yet: the expected amount
    // then has no scale and is left empty rather than failing the order.
    d.expected_amount = if currency.is_some() {
        scale("expectedAmount", &data.expected_amount)?
    } else {
        None
    };
    d.currency = currency.map(str::to_owned);
    d.quote_amount = non_empty(&data.quote_amount)
        .map(Amount::parse_decimal)
        .transpose()
        .map_err(|e| malformed(format!("quoteAmount: {e}")))?;
    d.quote_currency = non_empty_owned(data.quote_currency_symbol);
    d.payment_no = non_empty_owned(data.out_payment_no);
    d.payment_method = data.payment_type.map(payment_method);
    d.tx_hash = non_empty_owned(data.transfer_hash);
    d.from_address = non_empty_owned(data.from_address);
    d.to_address = non_empty_owned(data.user_wallet_address);
    d.created_at = match data.create_time.as_deref() {
        Some(t) => parse_provider_time(t, naive_zone).map_err(malformed)?,
        None => None,
    };
    d.paid_at = data
        .block_time
        .filter(|t| *t > 0)
        .and_then(|t| DateTime::<Utc>::from_timestamp(t, 0));
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status,
            retry_after: None,
            body: Bytes::from(body.to_owned()),
        }
    }

    fn table() -> Currencies {
        let mut c = Currencies::default();
        c.insert(1, "USDT", 6);
        c.insert(2, "ETH", 18);
        c
    }

    /// Symbols match whatever their case, and only on their own chain.
    #[test]
    fn currency_lookup_ignores_case_not_chain() {
        let mut t = table();
        assert_eq!(t.decimals(1, "USDT"), Some(6));
        assert_eq!(t.decimals(1, "usdt"), Some(6));
        assert_eq!(t.decimals(1, "UsDt"), Some(6));
        assert_eq!(t.decimals(2, "USDT"), None);
        assert_eq!(t.decimals(3, "ETH"), None);
        assert_eq!(t.decimals(2, "ETH2"), None);
        t.insert(1, "usdc", 2);
        assert_eq!(t.decimals(1, "USDC"), Some(2));
        t.insert(1, "USDT", 8);
        assert_eq!(t.decimals(1, "usdt"), Some(8), "a later insert replaces");
    }

    fn cst() -> FixedOffset {
        FixedOffset::east_opt(8 * 3600).unwrap()
    }

    const SAMPLE: &str = r#"{"code":200,"msg":"success","data":{"orgId":2313,"paymentStatus":0,"chainId":1,"blockTime":1712122830,"paymentType":1,"outPaymentNo":"202404031340061798686","outTradeNo":"202404031340069012495","isLegalTender":1,"quoteCurrencySymbol":"USD","quoteAmount":"1","settlementCurrencySymbol":"USDT","settlementAmount":"1000000","expectedAmount":"999746","transferHash":"0d47","fromAddress":"TDPx","userWalletAddress":"TASh","description":"A sample order","createTime":"2024-04-03 13:40:06"}}"#;

    /// The seed's sample answer maps field by field, amounts scaled exactly.
    #[test]
    fn sample_detail_maps_to_schema() {
        let d = classify_detail(&raw(200, SAMPLE), &table(), cst()).unwrap();
        assert_eq!(d.status, PayStatus::Paid);
        assert_eq!(d.provider_status, "0");
        assert_eq!(d.amount.unwrap().as_str(), "1.000000");
        assert_eq!(d.expected_amount.unwrap().as_str(), "0.999746");
        assert_eq!(d.currency.as_deref(), Some("USDT"));
        assert_eq!(d.quote_amount.unwrap().as_str(), "1");
        assert_eq!(d.quote_currency.as_deref(), Some("USD"));
        assert_eq!(d.payment_no.as_deref(), Some("202404031340061798686"));
        assert_eq!(d.payment_method.as_deref(), Some("wallet_transfer"));
        assert_eq!(d.tx_hash.as_deref(), Some("0d47"));
        assert_eq!(d.from_address.as_deref(), Some("TDPx"));
        assert_eq!(d.to_address.as_deref(), Some("TASh"));
        assert_eq!(d.chain_id.as_deref(), Some("1"));
        assert_eq!(
            crate::model::rfc3339(d.created_at.unwrap()),
            "2024-04-03T05:40:06Z"
        );
        assert_eq!(
            crate::model::rfc3339(d.paid_at.unwrap()),
            "2024-04-03T05:40:30Z"
        );
    }

    /// An unpaid order's expected amount without a currency is left empty, not an error.
    #[test]
    fn unpaid_without_currency() {
        let body = r#"{"code":200,"data":{"outTradeNo":"X","paymentStatus":1,"chainId":1,"expectedAmount":"999746"}}"#;
        let d = classify_detail(&raw(200, body), &table(), cst()).unwrap();
        assert_eq!(d.status, PayStatus::Pending);
        assert_eq!(d.expected_amount, None);
        assert_eq!(d.amount, None);
    }

    /// Text fields are read whether or not JSON escapes are in them (the parser
    /// borrows plain text and copies escaped text); amounts may be integers, never
    /// fractions.
    #[test]
    fn escaped_text_and_integer_amounts() {
        let body = r#"{"code":200,"data":{"outTradeNo":"X\"1","paymentStatus":0,"chainId":1,
            "settlementCurrencySymbol":"US\u0044T","settlementAmount":1500000,
            "expectedAmount":"15\u00300000","quoteAmount":"1.5","quoteCurrencySymbol":"USD",
            "transferHash":"0d\\47","fromAddress":"T\/x","userWalletAddress":"TASh",
            "outPaymentNo":"P\t1","createTime":"2024-04-03 13:40:06"}}"#;
        let d = classify_detail(&raw(200, body), &table(), cst()).unwrap();
        assert_eq!(d.currency.as_deref(), Some("USDT"));
        assert_eq!(d.amount.unwrap().as_str(), "1.500000");
        assert_eq!(d.expected_amount.unwrap().as_str(), "1.500000");
        assert_eq!(d.quote_amount.unwrap().as_str(), "1.5");
        assert_eq!(d.tx_hash.as_deref(), Some(r"0d\47"));
        assert_eq!(d.from_address.as_deref(), Some("T/x"));
        assert_eq!(d.to_address.as_deref(), Some("TASh"));
        assert_eq!(d.payment_no.as_deref(), Some("P\t1"));
        // Plain text is borrowed from the body, escaped text copied.
        let Object(dto): Object<DetailDto> = serde_json::from_str(
            r#"{"transferHash":"0d47","fromAddress":"T\/x","settlementAmount":"15","quoteAmount":1}"#,
        )
        .unwrap();
        assert!(matches!(
            dto.transfer_hash,
            Some(Text(Cow::Borrowed("0d47")))
        ));
        assert!(matches!(dto.from_address, Some(Text(Cow::Owned(ref s))) if s == "T/x"));
        assert!(matches!(
            dto.settlement_amount,
            Some(AmountText(Cow::Borrowed("15")))
        ));
        assert!(matches!(dto.quote_amount, Some(AmountText(Cow::Owned(ref s))) if s == "1"));
        assert!(dto.out_trade_no.is_none());
        for amount in ["1.5", "1e6", "-1.0"] {
            let body = format!(
                r#"{{"code":200,"data":{{"outTradeNo":"X","paymentStatus":0,"chainId":1,"settlementCurrencySymbol":"USDT","settlementAmount":{amount}}}}}"#
            );
            assert!(
                matches!(classify_detail(&raw(200, &body), &table(), cst()), Err(FetchError::Malformed { status: 200, ref detail }) if detail.contains("amount string or integer")),
                "{amount}"
            );
        }
    }

    /// An 18-decimal amount above 2^64 base units stays exact.
    #[test]
    fn eighteen_decimals_beyond_u64() {
        let body = r#"{"code":200,"data":{"outTradeNo":"X","paymentStatus":0,"chainId":2,"settlementCurrencySymbol":"ETH","settlementAmount":"123456789012345678901234"}}"#;
        let d = classify_detail(&raw(200, body), &table(), cst()).unwrap();
        assert_eq!(d.amount.unwrap().as_str(), "123456.789012345678901234");
    }

    /// Every status code maps; unknown codes stay unknown with the raw code kept.
    #[test]
    fn status_table() {
        let want = [
            (0, PayStatus::Paid),
            (1, PayStatus::Pending),
            (2, PayStatus::Confirming),
            (3, PayStatus::PartiallyPaid),
            (4, PayStatus::Failed),
            (5, PayStatus::Refunded),
            (7, PayStatus::Unknown),
        ];
        for (code, st) in want {
            let body =
                format!(r#"{{"code":200,"data":{{"outTradeNo":"X","paymentStatus":{code}}}}}"#);
            let d = classify_detail(&raw(200, &body), &table(), cst()).unwrap();
            assert_eq!(
                (d.status, d.provider_status.as_str()),
                (st, code.to_string().as_str())
            );
        }
    }

    /// Envelopes, details and currency entries are JSON objects: the same fields
    /// as an array (which serde's derive would take in declaration order) are
    /// malformed, while the object forms of the same answers are read.
    #[test]
    fn arrays_are_not_objects() {
        let c = |body: &str| classify_detail(&raw(200, body), &table(), cst());
        let detail = r#"{"outTradeNo":"X","paymentStatus":3}"#;
        assert!(c(&format!(r#"{{"code":200,"data":{detail}}}"#)).is_ok());
        for body in [
            format!(r#"[200,"ok",null,{detail}]"#),
            r#"{"code":200,"data":[null,"X",null,null,null,3]}"#.to_owned(),
        ] {
            assert!(
                matches!(c(&body), Err(FetchError::Malformed { status: 200, ref detail }) if detail.contains("a JSON object")),
                "{body}: {:?}",
                c(&body)
            );
        }
        let list = |body: &str| classify_currencies(&raw(200, body));
        let ok = list(r#"{"code":200,"data":[{"chainId":1,"symbol":"USDT","decimals":6}]}"#);
        assert_eq!(ok.unwrap()[0].symbol, "USDT");
        assert!(matches!(
            list(r#"{"code":200,"data":[[1,"USDT",6]]}"#),
            Err(FetchError::Malformed { status: 200, .. })
        ));
    }

    /// HTTP statuses, envelope codes and broken bodies become the right classes.
    #[test]
    fn error_classification() {
        let c = |status, body: &str| classify_detail(&raw(status, body), &table(), cst());
        assert!(matches!(c(401, ""), Err(FetchError::Auth(_))));
        assert!(matches!(c(403, "<html>"), Err(FetchError::Auth(_))));
        // An HTTP 401 keeps the server's reason (a stale timestamp means clock skew).
        assert_eq!(
            c(401, r#"{"code":401,"msg":"request timestamp expired"}"#),
            Err(FetchError::Auth(
                r#"HTTP 401: {"code":401,"msg":"request timestamp expired"}"#.into()
            ))
        );
        assert!(matches!(
            c(200, r#"{"code":401,"msg":"bad sign"}"#),
            Err(FetchError::Auth(_))
        ));
        assert_eq!(c(404, ""), Err(FetchError::NotFound));
        assert_eq!(
            c(200, r#"{"code":200,"msg":"ok","data":null}"#),
            Err(FetchError::NotFound)
        );
        assert_eq!(
            c(200, r#"{"code":200,"msg":"ok"}"#),
            Err(FetchError::NotFound)
        );
        assert_eq!(
            c(200, r#"{"code":200,"msg":"ok","data":{}}"#),
            Err(FetchError::NotFound)
        );
        assert!(matches!(
            c(429, ""),
            Err(FetchError::Throttled { code: 429, .. })
        ));
        assert!(matches!(
            c(200, r#"{"code":429}"#),
            Err(FetchError::Throttled { .. })
        ));
        assert!(matches!(
            c(502, "<html>bad gateway</html>"),
            Err(FetchError::Server { status: 502, .. })
        ));
        assert!(matches!(
            c(200, r#"{"code":503,"msg":"busy"}"#),
            Err(FetchError::Server { status: 503, .. })
        ));
        assert!(matches!(
            c(200, r#"{"code":200,"data":{"outTr"#),
            Err(FetchError::Malformed { .. })
        ));
        assert!(matches!(
            c(200, "<html></html>"),
            Err(FetchError::Malformed { .. })
        ));
        // A body that is not UTF-8 (here inside a string value) is malformed too.
        let latin1 = RawResponse {
            status: 200,
            retry_after: None,
            body: Bytes::from_static(b"{\"code\":200,\"data\":{\"outTradeNo\":\"caf\xe9\"}}"),
        };
        assert!(matches!(
            classify_detail(&latin1, &table(), cst()),
            Err(FetchError::Malformed { status: 200, detail }) if detail.contains("not UTF-8")
        ));
        assert!(
            matches!(c(200, r#"{"code":40001,"msg":"bad order"}"#), Err(FetchError::Rejected(m)) if m.contains("40001"))
        );
        assert!(matches!(c(400, "bad"), Err(FetchError::Rejected(_))));
        // A currency the table does not know is refused clearly, not guessed.
        let body = r#"{"code":200,"data":{"outTradeNo":"X","paymentStatus":0,"chainId":9,"settlementCurrencySymbol":"DOGE","settlementAmount":"5"}}"#;
        assert!(matches!(c(200, body), Err(FetchError::Rejected(m)) if m.contains("DOGE")));
        // Amounts must be integers in base units.
        let body = r#"{"code":200,"data":{"outTradeNo":"X","paymentStatus":0,"chainId":1,"settlementCurrencySymbol":"USDT","settlementAmount":"1.5"}}"#;
        assert!(matches!(c(200, body), Err(FetchError::Malformed { .. })));
        let with_retry = RawResponse {
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
            body: Bytes::new(),
        };
        assert_eq!(
            classify_detail(&with_retry, &table(), cst()),
            Err(FetchError::Throttled {
                code: 429,
                retry_after: Some(Duration::from_secs(3))
            })
        );
    }

    /// A client for `base_url` with key `k` and secret `s`, one request per second.
    fn test_client(base_url: &str) -> PayProtocol {
        let settings = PayProtocolSettings {
            base_url: base_url.into(),
            api_key: "k".into(),
            api_secret: SecretString::from("s"),
            naive_zone: cst(),
            decimals: HashMap::new(),
        };
        let limiter = std::sync::Arc::new(crate::fetch::Limiter::new(1.0, 1));
        let t = Transport::new(
            limiter,
            Duration::from_secs(1),
            1024,
            Default::default(),
            &Default::default(),
        )
        .unwrap();
        PayProtocol::new(settings, t).unwrap()
    }

    /// The signed target is the encoded query exactly as it goes on the wire.
    #[test]
    fn url_encodes_once_and_signs_what_is_sent() {
        let p = test_client("http://127.0.0.1:1/api/mer/");
        let url = p
            .url("/payment/detail", &[("outTradeNo", "../a b&c=d#e")])
            .unwrap();
        assert_eq!(url.path(), "/api/mer/payment/detail");
        assert_eq!(url.query(), Some("outTradeNo=..%2Fa+b%26c%3Dd%23e"));
        assert_eq!(
            url.path_and_query().unwrap().as_str(),
            "/api/mer/payment/detail?outTradeNo=..%2Fa+b%26c%3Dd%23e"
        );
    }

    /// The spec's three signing vectors.
    #[test]
    fn signing_vectors() {
        let s = b"test_secret";
        let ts = "1723971200";
        assert_eq!(
            sign(s, ts, "GET", "/api/mer/conf/list/chain", b""),
            "YELJogXXgL8kqSAgyC48GjIj7XLDPKDWdatWM4lzT4I="
        );
        assert_eq!(
            sign(
                s,
                ts,
                "GET",
                "/api/mer/payment/detail?outTradeNo=ORD-1&outPaymentNo=202404031340061798686",
                b""
            ),
            "ueIb3WvfbR8EQlz7X5fVCgB6E7SjKcf7sJ+tWVMShCE="
        );
        assert_eq!(
            sign(
                s,
                ts,
                "POST",
                "/api/mer/payment/createPaymentOrder",
                br#"{"outTradeNo":"ORD-1"}"#
            ),
            "TTapR5tRnCrznCT7WzQMRXZBIyby/YdJAFR7GOoG0Eo="
        );
    }

    /// One keyed signer gives the spec's signatures again and again (each signature
    /// starts from the keyed state, none carries over), and its Debug output does not
    /// show the key.
    #[test]
    fn signer_is_reusable_and_hides_its_key() {
        let signer = Signer::new(b"test_secret");
        for _ in 0..3 {
            assert_eq!(
                signer.sign("1723971200", "get", "/api/mer/conf/list/chain", b""),
                "YELJogXXgL8kqSAgyC48GjIj7XLDPKDWdatWM4lzT4I="
            );
            assert_eq!(
                signer.sign(
                    "1723971200",
                    "POST",
                    "/api/mer/payment/createPaymentOrder",
                    br#"{"outTradeNo":"ORD-1"}"#
                ),
                "TTapR5tRnCrznCT7WzQMRXZBIyby/YdJAFR7GOoG0Eo="
            );
        }
        let debug = format!("{signer:?}");
        assert!(!debug.contains("test_secret"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }

    mod properties {
        use super::*;
        use crate::fetch::retry::{Action, RetryPolicy, classify};
        use proptest::prelude::*;
        use serde_json::json;
        use sha2::Digest;
        use std::sync::OnceLock;

        /// HMAC-SHA256 written out from RFC 2104 over plain SHA-256, as the model
        /// of `sign`.
        fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
            let mut k = if key.len() > 64 {
                Sha256::digest(key).to_vec()
            } else {
                key.to_vec()
            };
            k.resize(64, 0);
            let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
            let inner = Sha256::new()
                .chain_update(pad(0x36))
                .chain_update(message)
                .finalize();
            Sha256::new()
                .chain_update(pad(0x5c))
                .chain_update(inner)
                .finalize()
                .to_vec()
        }

        /// One client for all cases (building a transport per case is slow).
        fn client() -> &'static PayProtocol {
            static CLIENT: OnceLock<PayProtocol> = OnceLock::new();
            CLIENT.get_or_init(|| test_client("https://api-sandbox.payprotocol.network/api/mer"))
        }

        /// Query values with URL-special, reserved and non-ASCII characters.
        fn param() -> impl Strategy<Value = String> {
            prop_oneof![
                "[A-Za-z0-9-]{1,20}",
                "[ &=?#%+/.;:@'\"\\\\中é€\u{0}-]{1,12}",
                "\\PC{1,16}"
            ]
        }

        proptest! {
            /// The signature is standard Base64 of HMAC-SHA256 over exactly
            /// `timestamp + METHOD + target + body`, for any secret, method case,
            /// target and body.
            #[test]
            fn signature_is_hmac_of_the_canonical_string(
                secret in proptest::collection::vec(any::<u8>(), 0..100),
                ts in "[0-9]{10}",
                method in "(get|GET|Post|POST)",
                target in "/api/mer/[ -~]{0,40}",
                body in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let got = sign(&secret, &ts, &method, &target, &body);
                let mut message = format!("{ts}{}{target}", method.to_ascii_uppercase()).into_bytes();
                message.extend_from_slice(&body);
                let raw = base64::engine::general_purpose::STANDARD.decode(&got).unwrap();
                prop_assert_eq!(raw, hmac_sha256(&secret, &message));
                prop_assert_eq!(got.len(), 44);
            }

            /// The detail URL for any order and payment number: the query decodes
            /// back to exactly those values, is plain ASCII, reads the same after the
            /// URL is parsed again (so what is sent is what was signed), and the
            /// signature covers `path?query` as sent.
            #[test]
            fn detail_target_encodes_once_and_is_signed_as_sent(order in param(), payment in param()) {
                let p = client();
                let url = p.url("/payment/detail", &[("outTradeNo", &order), ("outPaymentNo", &payment)]).unwrap();
                let query = url.query().unwrap();
                let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                    .into_owned()
                    .collect();
                prop_assert_eq!(
                    pairs,
                    vec![("outTradeNo".to_owned(), order.clone()), ("outPaymentNo".to_owned(), payment.clone())]
                );
                prop_assert!(query.bytes().all(|b| b.is_ascii_graphic()), "{}", query);
                prop_assert!(!query.contains('#'));
                let again = url::Url::parse(&url.to_string()).unwrap();
                prop_assert_eq!(again.query(), Some(query));
                prop_assert_eq!(again.path(), "/api/mer/payment/detail");
                // The same inputs always give the same target.
                let twice = p.url("/payment/detail", &[("outTradeNo", &order), ("outPaymentNo", &payment)]).unwrap();
                prop_assert_eq!(&twice, &url);
                let target = format!("{}?{}", again.path(), query);
                prop_assert_eq!(url.path_and_query().unwrap().as_str(), target.as_str());
                let want = hmac_sha256(b"test_secret", format!("1723971200GET{target}").as_bytes());
                let got = sign(b"test_secret", "1723971200", "GET", &target, b"");
                prop_assert_eq!(base64::engine::general_purpose::STANDARD.decode(got).unwrap(), want);
            }

            /// Any HTTP status and body: a class, never a panic. The HTTP status
            /// decides before the body: 5xx and 408 are retried, 429 is retried
            /// pausing every worker, 401/403 stop the run, 404 is not found, other
            /// non-2xx are refused.
            #[test]
            fn any_answer_is_classified(
                status in 100u16..600,
                body in proptest::collection::vec(any::<u8>(), 0..80),
                retry_after in proptest::option::of(0u64..300),
            ) {
                let r = RawResponse {
                    status,
                    retry_after: retry_after.map(Duration::from_secs),
                    body: Bytes::from(body),
                };
                let result = classify_detail(&r, &table(), cst());
                let action = classify(&result, 1, &RetryPolicy::default(), 0.5);
                match status {
                    408 | 500..=599 => {
                        prop_assert!(matches!(result, Err(FetchError::Server { status: s, .. }) if s == status), "{:?}", result);
                        prop_assert!(matches!(action, Action::Retry { pause_all: false, .. }), "{:?}", action);
                    }
                    429 => prop_assert!(matches!(action, Action::Retry { pause_all: true, .. }), "{:?}", action),
                    401 | 403 => prop_assert_eq!(action, Action::Abort),
                    404 => prop_assert_eq!(result, Err(FetchError::NotFound)),
                    200..=299 => {}
                    _ => prop_assert!(matches!(result, Err(FetchError::Rejected(_))), "{:?}", result),
                }
            }

            /// A 2xx with a well-formed success body maps to a detail (never a
            /// retry): status from the code table, amounts scaled exactly by the
            /// currency's decimals, `createTime` shifted from UTC+8, `blockTime` as
            /// Unix seconds.
            #[test]
            fn success_answers_map_exactly(
                status in 200u16..300,
                code in -2i64..10,
                usdt in any::<bool>(),
                settled in proptest::option::of("[0-9]{1,40}"),
                expected in proptest::option::of(any::<u64>()),
                quote in proptest::option::of("[0-9]{1,6}(\\.[0-9]{1,6})?"),
                created in 0i64..4_000_000_000,
                block in proptest::option::of(1i64..4_000_000_000),
                order in "\\PC{1,20}",
            ) {
                let (chain, symbol, dec): (i64, &str, usize) = if usdt { (1, "usdt", 6) } else { (2, "ETH", 18) };
                let created_text = DateTime::from_timestamp(created, 0).unwrap().naive_utc()
                    .format("%Y-%m-%d %H:%M:%S").to_string();
                let body = json!({"code": 200, "msg": "success", "data": {
                    "outTradeNo": order, "paymentStatus": code, "chainId": chain,
                    "settlementCurrencySymbol": symbol, "settlementAmount": settled,
                    "expectedAmount": expected, "quoteAmount": quote, "quoteCurrencySymbol": "USD",
                    "createTime": created_text, "blockTime": block, "paymentType": 1,
                }});
                let result = classify_detail(&raw(status, &body.to_string()), &table(), cst());
                prop_assert_eq!(classify(&result, 1, &RetryPolicy::default(), 0.5), Action::Done);
                let d = result.unwrap();
                prop_assert_eq!(d.status, map_status(code));
                prop_assert_eq!(d.provider_status, code.to_string());
                let scaled = |units: &str| {
                    let n = units.trim_start_matches('0');
                    let n = format!("{}{n}", "0".repeat((dec + 1).saturating_sub(n.len())));
                    let (i, f) = n.split_at(n.len() - dec);
                    format!("{i}.{f}")
                };
                prop_assert_eq!(d.amount.map(|a| a.to_string()), settled.as_deref().map(scaled));
                prop_assert_eq!(
                    d.expected_amount.map(|a| a.to_string()),
                    expected.map(|e| scaled(&e.to_string()))
                );
                prop_assert_eq!(d.quote_amount.map(|a| a.to_string()), quote);
                prop_assert_eq!(d.created_at, DateTime::from_timestamp(created - 8 * 3600, 0));
                prop_assert_eq!(d.paid_at, block.and_then(|b| DateTime::from_timestamp(b, 0)));
                prop_assert_eq!(d.currency.as_deref(), Some(symbol));
            }
        }
    }
}
