//! The GenAuth (formerly Authing) management API as a [`PayProvider`]: the cached,
//! single-flight management token, `GET /api/v3/get-order-pay-detail`, the
//! classification of its answers (the API answers HTTP 200 even on failure, so the
//! body's `statusCode` decides), and the mapping of its data to [`PayDetail`].
//!
//! - [`Brand`]: GenAuth or the older Authing name; picks `x-genauth-*` or `x-authing-*`.
//! - [`GenAuthSettings`]: what one client needs (host, access key, status map, zone).
//! - [`GenAuth`]: the provider; owns the token cache and its single refresh in flight.
//! - [`classify_response`]: one detail answer to a [`PayDetail`] or a [`FetchError`] (pure).
//! - [`classify_status_code`]: the body `statusCode` table (pure).
//! - [`refresh_margin`], [`refresh_at`], [`is_fresh`]: token lifetime arithmetic (pure).
//! - [`userpool_claim`]: the `scoped_userpool_id` claim of a management token (pure).
//!
//! Secrets: the access key secret and the access token never appear in `Debug`
//! output, error messages or logs; debug logs name `statusCode` and `requestId` only.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use chrono::FixedOffset;
use http::Uri;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::{FetchError, OrderRef, PayProvider, ProviderKind, parse_provider_time};
use crate::fetch::{Endpoint, InvalidEndpoint, RawResponse, Request, Transport};
use crate::model::{Amount, PayDetail, PayStatus};

/// Default host of the GenAuth management API (`provider.base_url`).
pub const DEFAULT_BASE_URL: &str = "https://api.genauth.ai";
/// Default zone of the provider's naive times (`paidTime`, `createTime`): UTC+8, in seconds.
pub const DEFAULT_NAIVE_ZONE_SECS: i32 = 8 * 3600;
/// The largest margin by which a token is refreshed before it expires.
pub const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Longest token lifetime believed; a larger `expires_in` is clamped to this.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

const TOKEN_PATH: &str = "/api/v3/get-management-token";
const DETAIL_PATH: &str = "/api/v3/get-order-pay-detail";
const SDK_VERSION: &str = concat!("paysync:", env!("CARGO_PKG_VERSION"));
/// Provider messages are cut to this many characters before they go into errors.
const MAX_MESSAGE_CHARS: usize = 300;

/// The product name the API is reached under; it decides the header prefix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Brand {
    /// `x-genauth-*` headers (the current name).
    #[default]
    GenAuth,
    /// `x-authing-*` headers (the older brand, e.g. `https://api.authing.cn`).
    Authing,
}

/// A brand name other than `genauth` or `authing`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown brand {0:?} (expected \"genauth\" or \"authing\")")]
pub struct UnknownBrand(pub String);

impl Brand {
    /// The config name: `"genauth"` or `"authing"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Brand::GenAuth => "genauth",
            Brand::Authing => "authing",
        }
    }

    /// `x-<brand>-userpool-id`.
    pub fn userpool_header(self) -> HeaderName {
        HeaderName::from_static(match self {
            Brand::GenAuth => "x-genauth-userpool-id",
            Brand::Authing => "x-authing-userpool-id",
        })
    }

    /// `x-<brand>-sdk-version`.
    pub fn sdk_version_header(self) -> HeaderName {
        HeaderName::from_static(match self {
            Brand::GenAuth => "x-genauth-sdk-version",
            Brand::Authing => "x-authing-sdk-version",
        })
    }

    /// `x-<brand>-lang`.
    pub fn lang_header(self) -> HeaderName {
        HeaderName::from_static(match self {
            Brand::GenAuth => "x-genauth-lang",
            Brand::Authing => "x-authing-lang",
        })
    }
}

impl FromStr for Brand {
    type Err = UnknownBrand;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "genauth" => Ok(Brand::GenAuth),
            "authing" => Ok(Brand::Authing),
            other => Err(UnknownBrand(other.to_owned())),
        }
    }
}

impl fmt::Display for Brand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The payStatus mapping used unless the config overrides it. payStatus is
/// undocumented; the codes are assumed to be those of the order `status` of the same
/// API family: 1 unpaid (keep polling), 2 paid, 3 completed, 4 cancelled, 5 expired.
pub fn default_status_map() -> BTreeMap<String, PayStatus> {
    [
        ("1", PayStatus::Pending),
        ("2", PayStatus::Paid),
        ("3", PayStatus::Paid),
        ("4", PayStatus::Cancelled),
        ("5", PayStatus::Expired),
    ]
    .into_iter()
    .map(|(code, status)| (code.to_owned(), status))
    .collect()
}

/// The default zone of naive provider times: UTC+8 (an assumption, see the spec).
pub fn default_naive_zone() -> FixedOffset {
    FixedOffset::east_opt(DEFAULT_NAIVE_ZONE_SECS).expect("UTC+8 is a valid offset")
}

/// Everything one GenAuth client needs, validated by the config module.
/// `Debug` prints the secret as `[REDACTED]`.
#[derive(Debug, Clone)]
pub struct GenAuthSettings {
    /// The API host, e.g. `https://api.genauth.ai`; a trailing `/` is ignored.
    pub base_url: String,
    pub access_key_id: String,
    pub access_key_secret: SecretString,
    /// Decides the header prefix (`x-genauth-` or `x-authing-`).
    pub brand: Brand,
    /// `x-<brand>-lang` (`zh-CN`, `en-US`); not sent when `None`.
    pub lang: Option<String>,
    /// payStatus code to normalized status; a code not listed is reported as `unknown`.
    pub status_map: BTreeMap<String, PayStatus>,
    /// Zone of the provider's naive times.
    pub naive_zone: FixedOffset,
}

impl GenAuthSettings {
    /// Settings with the defaults: GenAuth brand, no lang, [`default_status_map`],
    /// [`default_naive_zone`].
    pub fn new(
        base_url: impl Into<String>,
        access_key_id: impl Into<String>,
        access_key_secret: SecretString,
    ) -> Self {
        Self {
            base_url: base_url.into(),
            access_key_id: access_key_id.into(),
            access_key_secret,
            brand: Brand::default(),
            lang: None,
            status_map: default_status_map(),
            naive_zone: default_naive_zone(),
        }
    }
}

/// The refresh margin for a token living `expires_in`: the smaller of
/// [`MAX_REFRESH_MARGIN`] and a tenth of the lifetime, so short-lived tokens are still
/// used for most of their life.
pub fn refresh_margin(expires_in: Duration) -> Duration {
    MAX_REFRESH_MARGIN.min(expires_in / 10)
}

/// When a token obtained at `obtained_at` (taken before the request was sent) and
/// living `expires_in` must be replaced.
pub fn refresh_at(obtained_at: Instant, expires_in: Duration) -> Instant {
    let life = expires_in.min(MAX_TOKEN_LIFETIME);
    obtained_at + (life - refresh_margin(life))
}

/// Whether a token due for refresh at `refresh_at` may still be used at `now`.
pub fn is_fresh(refresh_at: Instant, now: Instant) -> bool {
    now < refresh_at
}

/// Reads the `scoped_userpool_id` claim from a JWT's payload (second segment,
/// base64url without padding; padding is tolerated). The signature is not verified:
/// the token is only ever sent back to the API that issued it. Errors never contain
/// the token.
pub fn userpool_claim(jwt: &str) -> Result<String, String> {
    let mut parts = jwt.split('.');
    let payload = match (parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(p), Some(_)) => p,
        _ => return Err("access token is not a JWT (expected three segments)".to_owned()),
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("access token payload is not base64url: {e}"))?;
    let claims: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("access token payload is not JSON: {e}"))?;
    match claims.get("scoped_userpool_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err("access token has no scoped_userpool_id claim".to_owned()),
    }
}

/// The detail URI for one order; the order number is form-urlencoded, so `&`, `/`,
/// `../` and spaces cannot change the request.
pub fn detail_uri(base: &Endpoint, order_no: &str) -> Result<Uri, http::Error> {
    base.uri(DETAIL_PATH, &[("orderNo", order_no)])
}

/// A request URI that could not be built (unreachable: the base URL was checked and
/// the query is form-urlencoded).
fn target_error(e: http::Error) -> FetchError {
    FetchError::Transport(format!("cannot build the request target: {e}"))
}

/// What the body `statusCode` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    /// 200: `data` holds the answer.
    Success,
    /// 429.
    Throttled,
    /// 5xx: retry.
    Server,
    /// 404: the order does not exist.
    NotFound,
    /// 401: the token was rejected; refresh it once.
    Unauthorized,
    /// 403: the key may not do this; stop the run.
    Forbidden,
    /// Any other code (400, 402, 409, 413, 422, 499, ...): retrying will not help.
    Refused,
}

/// The body `statusCode` table.
pub fn classify_status_code(code: i64) -> CodeClass {
    match code {
        200 => CodeClass::Success,
        429 => CodeClass::Throttled,
        500..=599 => CodeClass::Server,
        404 => CodeClass::NotFound,
        401 => CodeClass::Unauthorized,
        403 => CodeClass::Forbidden,
        _ => CodeClass::Refused,
    }
}

/// The parsed response envelope (`statusCode`, `message`, `apiCode`, `requestId`, `data`).
#[derive(Debug)]
struct Envelope {
    status_code: i64,
    message: String,
    /// A number or a string on the wire; kept as text.
    api_code: Option<String>,
    request_id: Option<String>,
    /// `None` when absent or `null`.
    data: Option<Value>,
}

impl Envelope {
    /// `"statusCode 400, apiCode 2001, requestId r-1: message"`, naming only what is present.
    fn describe(&self) -> String {
        let mut s = format!("statusCode {}", self.status_code);
        if let Some(code) = &self.api_code {
            s.push_str(", apiCode ");
            s.push_str(code);
        }
        if let Some(id) = &self.request_id {
            s.push_str(", requestId ");
            s.push_str(id);
        }
        if !self.message.is_empty() {
            s.push_str(": ");
            s.push_str(&self.message);
        }
        s
    }
}

/// Collapses control characters and cuts a provider message to a row-friendly length.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// An answer paysync could not read an envelope from, judged by the HTTP status:
/// 5xx is a server error, 429 throttling, anything else a malformed answer.
fn http_fallback(raw: &RawResponse, detail: String) -> FetchError {
    match raw.status {
        500..=599 => FetchError::Server {
            status: raw.status,
            retry_after: raw.retry_after,
            detail,
        },
        429 => FetchError::Throttled {
            code: 429,
            retry_after: raw.retry_after,
        },
        status => FetchError::Malformed { status, detail },
    }
}

/// Reads the envelope, whatever the HTTP status; bodies that are not an envelope go
/// through [`http_fallback`].
fn parse_envelope(raw: &RawResponse) -> Result<Envelope, FetchError> {
    let value: Value = match serde_json::from_slice(&raw.body) {
        Ok(v) => v,
        Err(e) => {
            let detail = if raw.status == 200 {
                format!("invalid JSON: {e}")
            } else {
                "non-JSON body".to_owned()
            };
            return Err(http_fallback(raw, detail));
        }
    };
    let status_code = match value.get("statusCode") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let Some(status_code) = status_code else {
        return Err(http_fallback(
            raw,
            "JSON body without statusCode".to_owned(),
        ));
    };
    let text = |v: &Value| match v {
        Value::Null => None,
        Value::String(s) => Some(sanitize(s)).filter(|s| !s.is_empty()),
        other => Some(sanitize(&other.to_string())),
    };
    Ok(Envelope {
        status_code,
        message: value.get("message").and_then(text).unwrap_or_default(),
        api_code: value.get("apiCode").and_then(text),
        request_id: value.get("requestId").and_then(text),
        data: value.get("data").filter(|d| !d.is_null()).cloned(),
    })
}

/// Why a detail answer did not produce a [`PayDetail`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// statusCode 401: the token was rejected (text: the envelope described).
    TokenRejected(String),
    /// Any other failure, already classified.
    Error(FetchError),
}

impl Failure {
    fn into_error(self) -> FetchError {
        match self {
            Failure::TokenRejected(desc) => {
                FetchError::Auth(format!("access token rejected: {desc}"))
            }
            Failure::Error(e) => e,
        }
    }
}

/// Classifies one answer of the detail call. The body's envelope decides, whatever
/// the HTTP status:
///
/// | answer | result |
/// |---|---|
/// | statusCode 200 with `data` | the mapped [`PayDetail`] (unreadable fields: `Malformed`) |
/// | statusCode 200, `data` missing or `null` | `NotFound` |
/// | statusCode 429 | `Throttled` (with the HTTP `Retry-After`) |
/// | statusCode 5xx | `Server` |
/// | statusCode 404 | `NotFound` |
/// | statusCode 401, 403 | `Auth` (the provider refreshes the token once on a 401 first) |
/// | any other statusCode (400, 402, 409, 413, 422, 499, ...) | `Rejected` |
/// | not an envelope (HTML, truncated), HTTP 5xx | `Server` |
/// | not an envelope, HTTP 429 | `Throttled` |
/// | not an envelope, any other HTTP status | `Malformed` |
pub fn classify_response(
    raw: &RawResponse,
    status_map: &BTreeMap<String, PayStatus>,
    naive_zone: FixedOffset,
) -> Result<PayDetail, FetchError> {
    judge_detail(raw, status_map, naive_zone).map_err(Failure::into_error)
}

/// [`classify_response`], keeping a 401 apart so the caller can refresh the token.
fn judge_detail(
    raw: &RawResponse,
    status_map: &BTreeMap<String, PayStatus>,
    naive_zone: FixedOffset,
) -> Result<PayDetail, Failure> {
    let env = parse_envelope(raw).map_err(Failure::Error)?;
    let class = classify_status_code(env.status_code);
    if class != CodeClass::Success {
        tracing::debug!(
            status_code = env.status_code,
            request_id = env.request_id.as_deref().unwrap_or(""),
            "genauth detail call failed"
        );
    }
    let err = |e| Err(Failure::Error(e));
    match class {
        CodeClass::Success => match &env.data {
            None => err(FetchError::NotFound),
            Some(data) => {
                map_detail(data, raw.status, status_map, naive_zone).map_err(Failure::Error)
            }
        },
        CodeClass::Throttled => err(FetchError::Throttled {
            code: 429,
            retry_after: raw.retry_after,
        }),
        CodeClass::Server => err(FetchError::Server {
            status: u16::try_from(env.status_code).unwrap_or(500),
            retry_after: raw.retry_after,
            detail: env.describe(),
        }),
        CodeClass::NotFound => err(FetchError::NotFound),
        CodeClass::Unauthorized => Err(Failure::TokenRejected(env.describe())),
        CodeClass::Forbidden => err(FetchError::Auth(env.describe())),
        CodeClass::Refused => err(FetchError::Rejected(env.describe())),
    }
}

/// Maps the `data` object of a successful detail answer. GenAuth gives no currency
/// (the amount's currency is not documented), so `currency` stays `None`; payStatus
/// is looked up in `status_map` and an unlisted code is `Unknown`, never guessed.
fn map_detail(
    data: &Value,
    http_status: u16,
    status_map: &BTreeMap<String, PayStatus>,
    naive_zone: FixedOffset,
) -> Result<PayDetail, FetchError> {
    let malformed = |detail: String| FetchError::Malformed {
        status: http_status,
        detail,
    };
    let Some(obj) = data.as_object() else {
        return Err(malformed("data is not an object".to_owned()));
    };
    // A string field; numbers are accepted as their text, empty strings are absent.
    let field = |name: &str| -> Result<Option<String>, FetchError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(malformed(format!("data.{name} is not a string"))),
        }
    };
    let time = |name: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>, FetchError> {
        match field(name)? {
            None => Ok(None),
            Some(s) => parse_provider_time(&s, naive_zone)
                .map_err(|e| malformed(format!("data.{name}: {e}"))),
        }
    };
    let Some(code) = field("payStatus")? else {
        return Err(malformed("data without payStatus".to_owned()));
    };
    let status = status_map.get(&code).copied().unwrap_or(PayStatus::Unknown);
    let mut detail = PayDetail::new(code, status);
    detail.amount = field("paidAmount")?
        .map(|a| Amount::parse_decimal(&a))
        .transpose()
        .map_err(|e| malformed(format!("data.paidAmount: {e}")))?;
    detail.payment_no = field("channelOrderNo")?;
    detail.payment_method = field("payType")?;
    detail.paid_account = field("paidAccountNo")?;
    detail.created_at = time("createTime")?;
    detail.paid_at = time("paidTime")?;
    Ok(detail)
}

/// A successful token answer, before the claim is read.
pub(crate) struct TokenGrant {
    pub(crate) access_token: SecretString,
    pub(crate) expires_in: Duration,
}

/// Classifies the token call's answer. Throttling, 5xx and unreadable answers keep
/// their retryable classes; every other refusal is [`FetchError::Auth`] with the
/// envelope described and `secret` scrubbed from the provider's text.
pub(crate) fn classify_token_response(
    raw: &RawResponse,
    secret: &str,
) -> Result<TokenGrant, FetchError> {
    let env = parse_envelope(raw)?;
    let scrub = |text: String| {
        if secret.is_empty() {
            text
        } else {
            text.replace(secret, "[REDACTED]")
        }
    };
    match classify_status_code(env.status_code) {
        CodeClass::Success => {}
        CodeClass::Throttled => {
            return Err(FetchError::Throttled {
                code: 429,
                retry_after: raw.retry_after,
            });
        }
        CodeClass::Server => {
            return Err(FetchError::Server {
                status: u16::try_from(env.status_code).unwrap_or(500),
                retry_after: raw.retry_after,
                detail: scrub(env.describe()),
            });
        }
        _ => {
            tracing::debug!(
                status_code = env.status_code,
                request_id = env.request_id.as_deref().unwrap_or(""),
                "genauth management token refused"
            );
            return Err(FetchError::Auth(format!(
                "management token refused: {}",
                scrub(env.describe())
            )));
        }
    }
    let data = env.data.as_ref();
    let token = data
        .and_then(|d| d.get("access_token"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty());
    let expires_in = data
        .and_then(|d| d.get("expires_in"))
        .and_then(|v| match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        });
    match (token, expires_in) {
        (Some(t), Some(secs)) => Ok(TokenGrant {
            access_token: SecretString::from(t),
            expires_in: Duration::from_secs(secs),
        }),
        _ => Err(FetchError::Auth(format!(
            "management token answer without access_token/expires_in ({})",
            scrub(env.describe())
        ))),
    }
}

/// A management token ready to send. No `Debug`: it is a credential.
struct Token {
    /// `Bearer <jwt>`, marked sensitive.
    authorization: HeaderValue,
    /// The `scoped_userpool_id` claim.
    userpool_id: HeaderValue,
    /// When to fetch a new one (see [`refresh_at`]).
    refresh_at: Instant,
}

impl Token {
    fn from_grant(grant: &TokenGrant, obtained_at: Instant) -> Result<Self, FetchError> {
        let jwt = grant.access_token.expose_secret();
        let claim = userpool_claim(jwt).map_err(FetchError::Auth)?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {jwt}"))
            .map_err(|_| FetchError::Auth("access token is not a valid header value".to_owned()))?;
        authorization.set_sensitive(true);
        let userpool_id = HeaderValue::from_str(&claim).map_err(|_| {
            FetchError::Auth("scoped_userpool_id is not a valid header value".to_owned())
        })?;
        Ok(Self {
            authorization,
            userpool_id,
            refresh_at: refresh_at(obtained_at, grant.expires_in),
        })
    }
}

/// The body of the token call. No `Debug`: it holds the secret.
#[derive(Serialize)]
struct TokenRequest<'a> {
    #[serde(rename = "accessKeyId")]
    access_key_id: &'a str,
    #[serde(rename = "accessKeySecret")]
    access_key_secret: &'a str,
}

/// The GenAuth provider. Share one per run: it caches the management token and
/// refreshes it with one request in flight however many fetches wait on it.
pub struct GenAuth {
    base_url: String,
    /// `base_url` parsed (config validation already refused a bad one).
    endpoint: Result<Endpoint, InvalidEndpoint>,
    access_key_id: String,
    access_key_secret: SecretString,
    brand: Brand,
    lang: Option<HeaderValue>,
    status_map: BTreeMap<String, PayStatus>,
    naive_zone: FixedOffset,
    transport: Transport,
    /// The token in use; read and replaced without awaiting (the fast path).
    current: Mutex<Option<Arc<Token>>>,
    /// Held while a token is requested, so at most one token request is in flight.
    /// Holds the error of the last failed request, handed to those who waited on it.
    refresh: tokio::sync::Mutex<Option<FetchError>>,
    /// Token requests completed (changed only while `refresh` is held): a caller that
    /// sees it change while waiting for `refresh` shares that request's outcome.
    token_requests: AtomicU64,
}

impl fmt::Debug for GenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenAuth")
            .field("base_url", &self.base_url)
            .field("access_key_id", &self.access_key_id)
            .field("brand", &self.brand)
            .finish_non_exhaustive()
    }
}

impl GenAuth {
    /// A client for `settings` that sends every request through `transport`. An
    /// unusable `lang` (not a valid header value) is dropped with a warning.
    pub fn new(settings: GenAuthSettings, transport: Transport) -> Self {
        let lang = settings
            .lang
            .as_deref()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .and_then(|l| match HeaderValue::from_str(l) {
                Ok(v) => Some(v),
                Err(_) => {
                    tracing::warn!(
                        lang = l,
                        "genauth lang is not a valid header value; not sending it"
                    );
                    None
                }
            });
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        Self {
            endpoint: Endpoint::parse(&base_url),
            base_url,
            access_key_id: settings.access_key_id,
            access_key_secret: settings.access_key_secret,
            brand: settings.brand,
            lang,
            status_map: settings.status_map,
            naive_zone: settings.naive_zone,
            transport,
            current: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(None),
            token_requests: AtomicU64::new(0),
        }
    }

    /// The host requests go to (without a trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn brand(&self) -> Brand {
        self.brand
    }

    /// The parsed base URL.
    fn endpoint(&self) -> Result<&Endpoint, FetchError> {
        self.endpoint
            .as_ref()
            .map_err(|e| FetchError::Transport(format!("invalid base_url: {e}")))
    }

    fn cached(&self) -> Option<Arc<Token>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets `rejected` if it is still the cached token.
    fn invalidate(&self, rejected: &Arc<Token>) {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.as_ref().is_some_and(|t| Arc::ptr_eq(t, rejected)) {
            *cur = None;
        }
    }

    /// A usable token: the cached one while fresh, else a new one. Callers arriving
    /// while a token request is in flight wait for it and share its outcome.
    async fn token(&self) -> Result<Arc<Token>, FetchError> {
        if let Some(t) = self.cached()
            && is_fresh(t.refresh_at, Instant::now())
        {
            return Ok(t);
        }
        let seen = self.token_requests.load(Ordering::Acquire);
        let mut last_error = self.refresh.lock().await;
        if self.token_requests.load(Ordering::Acquire) != seen {
            // A request finished while we waited: its outcome is ours too.
            if let Some(e) = last_error.as_ref() {
                return Err(e.clone());
            }
            if let Some(t) = self.cached() {
                return Ok(t);
            }
        }
        if let Some(t) = self.cached()
            && is_fresh(t.refresh_at, Instant::now())
        {
            return Ok(t);
        }
        let outcome = self.request_token().await;
        self.token_requests.fetch_add(1, Ordering::AcqRel);
        match outcome {
            Ok(t) => {
                let t = Arc::new(t);
                *last_error = None;
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&t));
                Ok(t)
            }
            Err(e) => {
                *last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// One token request through the transport.
    async fn request_token(&self) -> Result<Token, FetchError> {
        let obtained_at = Instant::now();
        let body = serde_json::to_vec(&TokenRequest {
            access_key_id: &self.access_key_id,
            access_key_secret: self.access_key_secret.expose_secret(),
        })
        .map_err(|_| FetchError::Transport("cannot encode the token request".to_owned()))?;
        let uri = self
            .endpoint()?
            .uri(TOKEN_PATH, &[])
            .map_err(target_error)?;
        let mut request = Request::post(uri, body)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .header(
                self.brand.sdk_version_header(),
                HeaderValue::from_static(SDK_VERSION),
            );
        if let Some(lang) = &self.lang {
            request = request.header(self.brand.lang_header(), lang.clone());
        }
        let raw = self.transport.send(request).await?;
        let grant = classify_token_response(&raw, self.access_key_secret.expose_secret())?;
        Token::from_grant(&grant, obtained_at)
    }

    /// One detail call. The limiter admits it first and only then is the current
    /// token read, so a token never ages in the queue; a token the server rejects
    /// is dropped from the cache (if still cached).
    async fn detail_once(&self, order: &OrderRef) -> Result<PayDetail, Failure> {
        self.transport.admit().await;
        let token = self.token().await.map_err(Failure::Error)?;
        let base = self.endpoint().map_err(Failure::Error)?;
        let uri = detail_uri(base, order.order_no.as_str())
            .map_err(target_error)
            .map_err(Failure::Error)?;
        let mut request = Request::get(uri)
            .header(HOST, base.host())
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .header(AUTHORIZATION, token.authorization.clone())
            .header(self.brand.userpool_header(), token.userpool_id.clone())
            .header(
                self.brand.sdk_version_header(),
                HeaderValue::from_static(SDK_VERSION),
            );
        if let Some(lang) = &self.lang {
            request = request.header(self.brand.lang_header(), lang.clone());
        }
        let raw = self
            .transport
            .send_admitted(request)
            .await
            .map_err(Failure::Error)?;
        let judged = judge_detail(&raw, &self.status_map, self.naive_zone);
        if let Err(Failure::TokenRejected(_)) = &judged {
            self.invalidate(&token);
        }
        judged
    }
}

impl PayProvider for GenAuth {
    fn kind(&self) -> ProviderKind {
        ProviderKind::GenAuth
    }

    /// Obtains the first token, so a wrong key fails ([`FetchError::Auth`]) before any
    /// order is fetched.
    async fn prepare(&self) -> Result<(), FetchError> {
        self.token().await.map(drop)
    }

    /// One detail call; on a 401 the token is refreshed once (single flight) and the
    /// call repeated once; a second 401 is [`FetchError::Auth`].
    async fn fetch_detail(&self, order: &OrderRef) -> Result<PayDetail, FetchError> {
        match self.detail_once(order).await {
            Err(Failure::TokenRejected(_)) => {
                tracing::debug!(
                    "genauth access token rejected (statusCode 401); refreshing it once"
                );
                self.detail_once(order).await.map_err(|f| match f {
                    Failure::TokenRejected(desc) => FetchError::Auth(format!(
                        "access token rejected again after a refresh: {desc}"
                    )),
                    Failure::Error(e) => e,
                })
            }
            other => other.map_err(Failure::into_error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{HttpClient, Limiter, Stats};
    use crate::model::{OrderNo, rfc3339};
    use axum::extract::{Query, State};
    use axum::http::HeaderMap;
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use bytes::Bytes;
    use serde_json::json;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    const SECRET: &str = "s3cr3t-Access-Key-Secret";
    const POOL: &str = "pool-~~~???";

    fn raw(status: u16, body: &str) -> RawResponse {
        RawResponse {
            status,
            retry_after: None,
            body: Bytes::from(body.to_owned()),
        }
    }

    fn classify(r: &RawResponse) -> Result<PayDetail, FetchError> {
        classify_response(r, &default_status_map(), default_naive_zone())
    }

    fn sample_data() -> Value {
        json!({
            "orderNo": "2022080911591337da0aae9660",
            "channelOrderNo": "Mock22e7ecfd-745d-46ad-b563-ef4db5719bfb",
            "paidAmount": "7.9",
            "paidTime": "2022-08-09 11:59:46",
            "paidAccountNo": "62bec1591aeb41ad3f1a6503",
            "payStatus": "3",
            "createTime": "2022-08-09 11:59:20",
            "payType": "Alipay"
        })
    }

    fn jwt(claims: &Value) -> String {
        let enc =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            enc(&json!({"alg": "HS256", "typ": "JWT"})),
            enc(claims)
        )
    }

    /// The spec's sample answer maps field by field; naive times are read as UTC+8.
    #[test]
    fn sample_answer_maps_to_detail() {
        let body =
            json!({"statusCode": 200, "message": "ok", "requestId": "r-1", "data": sample_data()});
        let d = classify(&raw(200, &body.to_string())).unwrap();
        assert_eq!(d.provider_status, "3");
        assert_eq!(d.status, PayStatus::Paid);
        assert_eq!(d.amount.as_ref().map(Amount::as_str), Some("7.9"));
        assert_eq!(d.currency, None);
        assert_eq!(
            d.payment_no.as_deref(),
            Some("Mock22e7ecfd-745d-46ad-b563-ef4db5719bfb")
        );
        assert_eq!(d.payment_method.as_deref(), Some("Alipay"));
        assert_eq!(d.paid_account.as_deref(), Some("62bec1591aeb41ad3f1a6503"));
        assert_eq!(
            d.created_at.map(rfc3339).as_deref(),
            Some("2022-08-09T03:59:20Z")
        );
        assert_eq!(
            d.paid_at.map(rfc3339).as_deref(),
            Some("2022-08-09T03:59:46Z")
        );
        assert_eq!(d.quote_amount, None);
        assert_eq!(d.tx_hash, None);
    }

    /// payStatus: the default table, an unknown code reported as Unknown with the raw
    /// code kept, and a custom map from the config.
    #[test]
    fn pay_status_table() {
        let with = |code: &str, map: &BTreeMap<String, PayStatus>| {
            let mut data = sample_data();
            data["payStatus"] = json!(code);
            let body = json!({"statusCode": 200, "data": data}).to_string();
            classify_response(&raw(200, &body), map, default_naive_zone()).unwrap()
        };
        let default = default_status_map();
        for (code, want) in [
            ("1", PayStatus::Pending),
            ("2", PayStatus::Paid),
            ("3", PayStatus::Paid),
            ("4", PayStatus::Cancelled),
            ("5", PayStatus::Expired),
            ("9", PayStatus::Unknown),
            ("PAID", PayStatus::Unknown),
        ] {
            let d = with(code, &default);
            assert_eq!((d.provider_status.as_str(), d.status), (code, want));
        }
        let custom: BTreeMap<String, PayStatus> = [("9".to_owned(), PayStatus::Refunded)].into();
        assert_eq!(with("9", &custom).status, PayStatus::Refunded);
        assert_eq!(with("3", &custom).status, PayStatus::Unknown);
    }

    /// The body statusCode decides, not the HTTP status.
    #[test]
    fn status_code_table() {
        use CodeClass::*;
        for (code, want) in [
            (200, Success),
            (429, Throttled),
            (500, Server),
            (502, Server),
            (599, Server),
            (404, NotFound),
            (401, Unauthorized),
            (403, Forbidden),
            (400, Refused),
            (402, Refused),
            (409, Refused),
            (413, Refused),
            (422, Refused),
            (499, Refused),
            (201, Refused),
        ] {
            assert_eq!(classify_status_code(code), want, "statusCode {code}");
        }
    }

    /// Every kind of answer the detail call can give, and its class.
    #[test]
    fn classify_response_table() {
        let env = |code: u16, extra: Value| {
            let mut v = json!({"statusCode": code, "message": "msg", "requestId": "req-9"});
            if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
                o.extend(e);
            }
            v.to_string()
        };
        let mut throttled = raw(200, &env(429, json!({"apiCode": 4290})));
        throttled.retry_after = Some(Duration::from_secs(3));
        let server = |status: u16| FetchError::Server {
            status,
            retry_after: None,
            detail: format!("statusCode {status}, apiCode 1, requestId req-9: msg"),
        };
        let cases: Vec<(RawResponse, Result<PayDetail, FetchError>)> = vec![
            (
                raw(200, &env(200, json!({"data": null}))),
                Err(FetchError::NotFound),
            ),
            (raw(200, &env(200, json!({}))), Err(FetchError::NotFound)),
            (
                throttled,
                Err(FetchError::Throttled {
                    code: 429,
                    retry_after: Some(Duration::from_secs(3)),
                }),
            ),
            (raw(200, &env(500, json!({"apiCode": 1}))), Err(server(500))),
            (raw(200, &env(502, json!({"apiCode": 1}))), Err(server(502))),
            (
                raw(200, &env(404, json!({"apiCode": 1}))),
                Err(FetchError::NotFound),
            ),
            (
                raw(200, &env(403, json!({"apiCode": 2003}))),
                Err(FetchError::Auth(
                    "statusCode 403, apiCode 2003, requestId req-9: msg".into(),
                )),
            ),
            (
                raw(200, &env(400, json!({"apiCode": 2001}))),
                Err(FetchError::Rejected(
                    "statusCode 400, apiCode 2001, requestId req-9: msg".into(),
                )),
            ),
            (
                raw(200, &env(400, json!({"apiCode": "E_ARG"}))),
                Err(FetchError::Rejected(
                    "statusCode 400, apiCode E_ARG, requestId req-9: msg".into(),
                )),
            ),
            (
                raw(200, r#"{"statusCode":422,"message":"bad"}"#),
                Err(FetchError::Rejected("statusCode 422: bad".into())),
            ),
            (
                raw(200, &env(401, json!({"apiCode": 2000}))),
                Err(FetchError::Auth(
                    "access token rejected: statusCode 401, apiCode 2000, requestId req-9: msg"
                        .into(),
                )),
            ),
            // The envelope decides even when the HTTP status disagrees.
            (raw(400, &env(404, json!({}))), Err(FetchError::NotFound)),
            (
                raw(502, "<html><body>502 Bad Gateway</body></html>"),
                Err(FetchError::Server {
                    status: 502,
                    retry_after: None,
                    detail: "non-JSON body".into(),
                }),
            ),
            (
                raw(429, "Too Many Requests"),
                Err(FetchError::Throttled {
                    code: 429,
                    retry_after: None,
                }),
            ),
            (
                raw(403, "<html>Forbidden</html>"),
                Err(FetchError::Malformed {
                    status: 403,
                    detail: "non-JSON body".into(),
                }),
            ),
            (
                raw(200, r#"{"error":"gateway"}"#),
                Err(FetchError::Malformed {
                    status: 200,
                    detail: "JSON body without statusCode".into(),
                }),
            ),
        ];
        for (r, want) in cases {
            assert_eq!(classify(&r), want, "body {:?}", r.body);
        }
        // Truncated JSON with HTTP 200.
        let body = json!({"statusCode": 200, "data": sample_data()}).to_string();
        let got = classify(&raw(200, &body[..body.len() / 2]));
        assert!(
            matches!(&got, Err(FetchError::Malformed { status: 200, detail }) if detail.starts_with("invalid JSON")),
            "{got:?}"
        );
    }

    /// A 401 is kept apart from other auth failures so the provider can refresh.
    #[test]
    fn unauthorized_is_a_token_rejection() {
        let r = raw(
            200,
            r#"{"statusCode":401,"message":"token expired","apiCode":2000}"#,
        );
        let got = judge_detail(&r, &default_status_map(), default_naive_zone());
        assert_eq!(
            got,
            Err(Failure::TokenRejected(
                "statusCode 401, apiCode 2000: token expired".into()
            ))
        );
    }

    /// Data fields: empty strings are absent, numbers are read as text, and values
    /// that cannot be read make the answer malformed instead of being guessed.
    #[test]
    fn data_fields_edge_cases() {
        let with = |patch: Value| {
            let mut data = sample_data();
            if let (Value::Object(d), Value::Object(p)) = (&mut data, patch) {
                d.extend(p);
            }
            classify(&raw(
                200,
                &json!({"statusCode": 200, "data": data}).to_string(),
            ))
        };
        let d =
            with(json!({"paidAmount": "", "paidTime": "", "channelOrderNo": "", "payType": null}))
                .unwrap();
        assert_eq!(
            (d.amount, d.paid_at, d.payment_no, d.payment_method),
            (None, None, None, None)
        );
        let d = with(json!({"payStatus": 1, "paidAmount": 12.5})).unwrap();
        assert_eq!(
            (d.provider_status.as_str(), d.status),
            ("1", PayStatus::Pending)
        );
        assert_eq!(d.amount.map(|a| a.to_string()).as_deref(), Some("12.5"));
        let d = with(json!({"paidTime": "2022-08-09T11:59:46.071+08:00"})).unwrap();
        assert_eq!(
            d.paid_at.map(rfc3339).as_deref(),
            Some("2022-08-09T03:59:46.071Z")
        );
        for patch in [
            json!({"paidAmount": "7,9"}),
            json!({"paidAmount": "1e3"}),
            json!({"createTime": "yesterday"}),
            json!({"payStatus": ""}),
            json!({"payStatus": {"code": 3}}),
        ] {
            let got = with(patch.clone());
            assert!(
                matches!(got, Err(FetchError::Malformed { status: 200, .. })),
                "{patch}: {got:?}"
            );
        }
        let got = classify(&raw(200, r#"{"statusCode":200,"data":[1,2]}"#));
        assert!(matches!(got, Err(FetchError::Malformed { .. })), "{got:?}");
    }

    /// The claim is read from a base64url payload whose encoding uses `-` and `_`
    /// (the characters that differ from standard base64), with or without padding.
    #[test]
    fn userpool_claim_base64url() {
        let claims = json!({"scoped_userpool_id": POOL});
        let token = jwt(&claims);
        let payload = token.split('.').nth(1).unwrap();
        assert!(payload.contains('-') && payload.contains('_'), "{payload}");
        assert_eq!(userpool_claim(&token).unwrap(), POOL);

        let claims = json!({"scoped_userpool_id": "62bec1591aeb41ad3f1a6503~?>"});
        let padded = base64::engine::general_purpose::URL_SAFE.encode(claims.to_string());
        assert!(padded.ends_with('='), "{padded}");
        assert_eq!(
            userpool_claim(&format!("aGVhZA.{padded}.sig")).unwrap(),
            "62bec1591aeb41ad3f1a6503~?>"
        );
    }

    /// Tokens without the claim, or that are not JWTs, are refused without quoting them.
    #[test]
    fn userpool_claim_errors() {
        let no_claim = jwt(&json!({"sub": "x"}));
        let e = userpool_claim(&no_claim).unwrap_err();
        assert!(e.contains("scoped_userpool_id") && !e.contains(&no_claim));
        assert!(userpool_claim("opaque-token").is_err());
        assert!(userpool_claim("a.!!!.c").is_err());
        assert!(
            userpool_claim(&format!(
                "a.{}.c",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("[]")
            ))
            .is_err()
        );
    }

    /// The margin is a tenth of short lifetimes and at most a minute.
    #[test]
    fn refresh_margin_scales() {
        for (life, margin) in [(7200, 60), (600, 60), (300, 30), (10, 1), (0, 0)] {
            assert_eq!(
                refresh_margin(Duration::from_secs(life)),
                Duration::from_secs(margin),
                "expires_in {life}"
            );
        }
    }

    /// A 7200 s token is used until 60 s before it expires (paused time).
    #[tokio::test(start_paused = true)]
    async fn token_freshness_over_time() {
        let obtained = Instant::now();
        let due = refresh_at(obtained, Duration::from_secs(7200));
        assert_eq!(due - obtained, Duration::from_secs(7140));
        tokio::time::advance(Duration::from_secs(7139)).await;
        assert!(is_fresh(due, Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!is_fresh(due, Instant::now()));
        // Absurd lifetimes are clamped instead of overflowing.
        let far = refresh_at(obtained, Duration::from_secs(u64::MAX / 4));
        assert!(far - obtained <= MAX_TOKEN_LIFETIME);
    }

    /// The order number is form-urlencoded into the query.
    #[test]
    fn detail_uri_encodes_order_no() {
        let base = Endpoint::parse("https://api.genauth.ai").unwrap();
        assert_eq!(
            detail_uri(&base, "a b&c=d/../e?f#g").unwrap().to_string(),
            "https://api.genauth.ai/api/v3/get-order-pay-detail?orderNo=a+b%26c%3Dd%2F..%2Fe%3Ff%23g"
        );
    }

    /// Brand names parse and serialize as `genauth`/`authing` and pick the header prefix.
    #[test]
    fn brand_names_and_headers() {
        assert_eq!("authing".parse::<Brand>(), Ok(Brand::Authing));
        assert_eq!("genauth".parse::<Brand>(), Ok(Brand::GenAuth));
        assert!("GenAuth2".parse::<Brand>().is_err());
        assert_eq!(
            serde_json::to_string(&Brand::Authing).unwrap(),
            r#""authing""#
        );
        assert_eq!(
            serde_json::from_str::<Brand>(r#""genauth""#).unwrap(),
            Brand::GenAuth
        );
        assert_eq!(
            Brand::Authing.userpool_header().as_str(),
            "x-authing-userpool-id"
        );
        assert_eq!(
            Brand::GenAuth.sdk_version_header().as_str(),
            "x-genauth-sdk-version"
        );
        assert_eq!(Brand::GenAuth.lang_header().as_str(), "x-genauth-lang");
    }

    /// Token answers: success, refusals as Auth (with an echoed secret scrubbed), and
    /// throttling / 5xx / proxy pages keeping their retryable classes.
    #[test]
    fn token_answer_classes() {
        let ok = json!({"statusCode": 200, "data": {"access_token": jwt(&json!({"scoped_userpool_id": "p"})), "expires_in": 7200}});
        let grant = classify_token_response(&raw(200, &ok.to_string()), SECRET).unwrap();
        assert_eq!(grant.expires_in, Duration::from_secs(7200));

        let refused = json!({"statusCode": 401, "apiCode": 2001, "requestId": "r", "message": format!("bad secret {SECRET}")});
        let e = classify_token_response(&raw(200, &refused.to_string()), SECRET)
            .err()
            .unwrap();
        assert_eq!(
            e,
            FetchError::Auth("management token refused: statusCode 401, apiCode 2001, requestId r: bad secret [REDACTED]".into())
        );
        let no_token = json!({"statusCode": 200, "data": {"expires_in": 7200}});
        let e = classify_token_response(&raw(200, &no_token.to_string()), SECRET)
            .err()
            .unwrap();
        assert!(matches!(e, FetchError::Auth(_)), "{e:?}");
        let e = classify_token_response(&raw(200, r#"{"statusCode":429}"#), SECRET)
            .err()
            .unwrap();
        assert!(
            matches!(e, FetchError::Throttled { code: 429, .. }),
            "{e:?}"
        );
        let e = classify_token_response(&raw(200, r#"{"statusCode":503}"#), SECRET)
            .err()
            .unwrap();
        assert!(matches!(e, FetchError::Server { status: 503, .. }), "{e:?}");
        let e = classify_token_response(&raw(502, "<html>bad gateway</html>"), SECRET)
            .err()
            .unwrap();
        assert!(matches!(e, FetchError::Server { status: 502, .. }), "{e:?}");
        let e = classify_token_response(&raw(200, r#"{"statusCode":200,"da"#), SECRET)
            .err()
            .unwrap();
        assert!(
            matches!(e, FetchError::Malformed { status: 200, .. }),
            "{e:?}"
        );
    }

    /// Debug output of the settings and the provider never shows the secret.
    #[test]
    fn debug_hides_secret() {
        let s = GenAuthSettings::new("http://h/", "key-id", SecretString::from(SECRET));
        assert!(!format!("{s:?}").contains(SECRET));
        let p = GenAuth::new(s, transport());
        assert!(!format!("{p:?}").contains(SECRET));
        assert_eq!(p.base_url(), "http://h");
    }

    // ---- a tiny GenAuth server for the end-to-end tests ----

    /// Which detail calls the mock answers with statusCode 401.
    #[derive(Clone, Copy, PartialEq)]
    enum Reject {
        Never,
        /// Calls made with the first token issued.
        FirstToken,
        Always,
    }

    struct Mock {
        prefix: &'static str,
        expires_in: u64,
        reject: Reject,
        token_requests: AtomicUsize,
        detail_requests: AtomicUsize,
        issued: Mutex<Vec<String>>,
        /// Detail calls whose headers were not as the spec says.
        bad_headers: AtomicUsize,
        last_lang: Mutex<Option<String>>,
    }

    impl Mock {
        fn new(prefix: &'static str, expires_in: u64, reject: Reject) -> Arc<Self> {
            Arc::new(Self {
                prefix,
                expires_in,
                reject,
                token_requests: AtomicUsize::new(0),
                detail_requests: AtomicUsize::new(0),
                issued: Mutex::new(Vec::new()),
                bad_headers: AtomicUsize::new(0),
                last_lang: Mutex::new(None),
            })
        }
        fn tokens(&self) -> usize {
            self.token_requests.load(Ordering::SeqCst)
        }
    }

    async fn token_handler(State(m): State<Arc<Mock>>, Json(body): Json<Value>) -> Json<Value> {
        m.token_requests.fetch_add(1, Ordering::SeqCst);
        // Long enough for concurrent callers to pile up behind the request.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let given = body["accessKeySecret"].as_str().unwrap_or_default();
        if body["accessKeyId"] != "key-id" || given != SECRET {
            return Json(json!({
                "statusCode": 401, "apiCode": 2001, "requestId": "tok-1",
                "message": format!("invalid accessKeySecret {given}")
            }));
        }
        let mut issued = m.issued.lock().unwrap();
        let token = jwt(&json!({"scoped_userpool_id": POOL, "n": issued.len() + 1}));
        issued.push(token.clone());
        Json(
            json!({"statusCode": 200, "message": "ok", "data": {"access_token": token, "expires_in": m.expires_in}}),
        )
    }

    async fn detail_handler(
        State(m): State<Arc<Mock>>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> Json<Value> {
        m.detail_requests.fetch_add(1, Ordering::SeqCst);
        let header = |name: &str| {
            headers
                .get(format!("{}{name}", m.prefix))
                .and_then(|v| v.to_str().ok())
        };
        *m.last_lang.lock().unwrap() = header("lang").map(str::to_owned);
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let n = m
            .issued
            .lock()
            .unwrap()
            .iter()
            .position(|t| t == bearer)
            .map(|i| i + 1);
        let rejected = match (n, m.reject) {
            (None, _) | (_, Reject::Always) => true,
            (Some(n), Reject::FirstToken) => n == 1,
            (Some(_), Reject::Never) => false,
        };
        if rejected {
            return Json(
                json!({"statusCode": 401, "apiCode": 2000, "requestId": "det-1", "message": "token invalid"}),
            );
        }
        let sdk_ok = header("sdk-version").is_some_and(|v| v == SDK_VERSION);
        if header("userpool-id") != Some(POOL) || !sdk_ok {
            m.bad_headers.fetch_add(1, Ordering::SeqCst);
            return Json(json!({"statusCode": 400, "apiCode": 1, "message": "bad headers"}));
        }
        let mut data = sample_data();
        data["orderNo"] = json!(q.get("orderNo").cloned().unwrap_or_default());
        Json(json!({"statusCode": 200, "message": "ok", "data": data}))
    }

    /// Starts the mock on 127.0.0.1:0; returns its base URL (with a trailing `/`).
    async fn serve(mock: Arc<Mock>) -> String {
        let app = Router::new()
            .route(TOKEN_PATH, post(token_handler))
            .route(DETAIL_PATH, get(detail_handler))
            .with_state(mock);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/")
    }

    /// A transport to the local test server (direct, whatever proxy the machine names).
    fn transport() -> Transport {
        Transport::with_client(
            HttpClient::with_proxies(None, &Default::default()).unwrap(),
            Arc::new(Limiter::new(1000.0, 100)),
            Duration::from_secs(5),
            1 << 20,
            Arc::new(Stats::default()),
        )
    }

    async fn client(mock: &Arc<Mock>, secret: &str) -> GenAuth {
        let base = serve(Arc::clone(mock)).await;
        GenAuth::new(
            GenAuthSettings::new(base, "key-id", SecretString::from(secret)),
            transport(),
        )
    }

    fn order(no: &str) -> OrderRef {
        OrderRef {
            order_no: OrderNo::parse(no).unwrap(),
            payment_no: None,
        }
    }

    /// 50 concurrent fetches that all find no token cause exactly one token request,
    /// and every call carries the spec's headers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn single_flight_token() {
        let mock = Mock::new("x-genauth-", 7200, Reject::Never);
        let p = Arc::new(client(&mock, SECRET).await);
        let calls = (0..50).map(|i| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.fetch_detail(&order(&format!("ord-{i}"))).await })
        });
        for r in futures::future::join_all(calls).await {
            assert_eq!(r.unwrap().unwrap().status, PayStatus::Paid);
        }
        assert_eq!(mock.tokens(), 1);
        assert_eq!(mock.detail_requests.load(Ordering::SeqCst), 50);
        assert_eq!(mock.bad_headers.load(Ordering::SeqCst), 0);
    }

    /// A 401 on the old token causes exactly one more token request, and the call
    /// then succeeds.
    #[tokio::test]
    async fn unauthorized_refreshes_once() {
        let mock = Mock::new("x-genauth-", 7200, Reject::FirstToken);
        let p = client(&mock, SECRET).await;
        p.prepare().await.unwrap();
        assert_eq!(mock.tokens(), 1);
        let d = p.fetch_detail(&order("ord-1")).await.unwrap();
        assert_eq!(d.status, PayStatus::Paid);
        assert_eq!(mock.tokens(), 2);
        assert_eq!(mock.detail_requests.load(Ordering::SeqCst), 2);
        // The new token is cached: no further token requests.
        p.fetch_detail(&order("ord-2")).await.unwrap();
        assert_eq!(mock.tokens(), 2);
    }

    /// Concurrent 401s on the same old token share one refresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_unauthorized_share_one_refresh() {
        let mock = Mock::new("x-genauth-", 7200, Reject::FirstToken);
        let p = Arc::new(client(&mock, SECRET).await);
        p.prepare().await.unwrap();
        let calls = (0..20).map(|i| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.fetch_detail(&order(&format!("ord-{i}"))).await })
        });
        for r in futures::future::join_all(calls).await {
            r.unwrap().unwrap();
        }
        assert_eq!(mock.tokens(), 2);
    }

    /// A second 401 after the refresh is an authentication failure, after exactly one
    /// refresh.
    #[tokio::test]
    async fn second_unauthorized_is_auth_error() {
        let mock = Mock::new("x-genauth-", 7200, Reject::Always);
        let p = client(&mock, SECRET).await;
        let e = p.fetch_detail(&order("ord-1")).await.unwrap_err();
        assert!(
            matches!(&e, FetchError::Auth(m) if m.contains("statusCode 401")),
            "{e:?}"
        );
        assert_eq!(mock.tokens(), 2);
        assert_eq!(mock.detail_requests.load(Ordering::SeqCst), 2);
    }

    /// A wrong secret fails in prepare() as Auth, and the text does not contain the
    /// secret even though the server echoed it back.
    #[tokio::test]
    async fn wrong_secret_fails_prepare() {
        let mock = Mock::new("x-genauth-", 7200, Reject::Never);
        let wrong = "wrong-Secret-42";
        let p = client(&mock, wrong).await;
        let e = p.prepare().await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, FetchError::Auth(_)), "{e:?}");
        assert!(
            text.contains("statusCode 401") && text.contains("apiCode 2001"),
            "{text}"
        );
        assert!(!text.contains(wrong) && !text.contains(SECRET), "{text}");
        assert_eq!(mock.detail_requests.load(Ordering::SeqCst), 0);
    }

    /// Callers waiting on a failed token request share its error instead of each
    /// asking again. (Single-threaded runtime: every caller is waiting before the
    /// server can answer, whatever the machine's speed.)
    #[tokio::test]
    async fn failed_token_request_is_shared() {
        let mock = Mock::new("x-genauth-", 7200, Reject::Never);
        let p = Arc::new(client(&mock, "wrong").await);
        let calls = (0..20).map(|i| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.fetch_detail(&order(&format!("ord-{i}"))).await })
        });
        for r in futures::future::join_all(calls).await {
            assert!(matches!(r.unwrap(), Err(FetchError::Auth(_))));
        }
        assert_eq!(mock.tokens(), 1);
    }

    /// A token whose lifetime is over is replaced before the next call (a zero
    /// lifetime makes this independent of the clock).
    #[tokio::test]
    async fn expired_token_is_replaced() {
        let mock = Mock::new("x-genauth-", 0, Reject::Never);
        let p = client(&mock, SECRET).await;
        p.fetch_detail(&order("ord-1")).await.unwrap();
        p.fetch_detail(&order("ord-2")).await.unwrap();
        assert_eq!(mock.tokens(), 2);
    }

    /// The Authing brand sends `x-authing-*` headers, including the optional lang, and
    /// order numbers with `&`, `/` and `../` arrive intact.
    #[tokio::test]
    async fn authing_brand_headers_and_encoding() {
        let mock = Mock::new("x-authing-", 7200, Reject::Never);
        let base = serve(Arc::clone(&mock)).await;
        let mut s = GenAuthSettings::new(base, "key-id", SecretString::from(SECRET));
        s.brand = Brand::Authing;
        s.lang = Some("en-US".into());
        let p = GenAuth::new(s, transport());
        let d = p.fetch_detail(&order("a&b=c/../d?e#f")).await;
        assert_eq!(d.unwrap().status, PayStatus::Paid);
        assert_eq!(mock.bad_headers.load(Ordering::SeqCst), 0);
        assert_eq!(mock.last_lang.lock().unwrap().as_deref(), Some("en-US"));
    }

    mod properties {
        use super::*;
        use crate::fetch::retry::{Action, RetryPolicy, classify as decide};
        use proptest::prelude::*;

        fn answer(status: u16, body: Vec<u8>) -> RawResponse {
            RawResponse {
                status,
                retry_after: None,
                body: Bytes::from(body),
            }
        }

        proptest! {
            /// Any HTTP status and body: a class, never a panic; a body that is not
            /// JSON is judged by the HTTP status alone (5xx and 429 retried, the
            /// rest malformed).
            #[test]
            fn any_answer_is_classified(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..80)) {
                let json = serde_json::from_slice::<Value>(&body).is_ok();
                let result = classify(&answer(status, body));
                let action = decide(&result, 1, &RetryPolicy::default(), 0.5);
                if !json {
                    match status {
                        500..=599 => prop_assert!(matches!(result, Err(FetchError::Server { status: s, .. }) if s == status), "{:?}", result),
                        429 => prop_assert!(matches!(action, Action::Retry { pause_all: true, .. }), "{:?}", action),
                        _ => prop_assert!(matches!(result, Err(FetchError::Malformed { status: s, .. }) if s == status), "{:?}", result),
                    }
                }
            }

            /// The envelope's `statusCode` (a number or a numeric string) decides,
            /// whatever the HTTP status: 5xx is always retried, 429 retried pausing
            /// every worker, 401/403 stop the run, 404 is not found, any other
            /// non-200 code gives an error row naming it.
            #[test]
            fn status_code_decides(
                http in 100u16..600,
                code in prop_oneof![Just(200i64), Just(401), Just(403), Just(404), Just(429), 500i64..600, -1000i64..1000],
                as_string in any::<bool>(),
                message in "\\PC{0,20}",
            ) {
                let sc = if as_string { json!(code.to_string()) } else { json!(code) };
                let body = json!({"statusCode": sc, "message": message, "apiCode": 7, "data": null});
                let result = classify(&answer(http, body.to_string().into_bytes()));
                let action = decide(&result, 1, &RetryPolicy::default(), 0.5);
                match code {
                    200 | 404 => prop_assert_eq!(result, Err(FetchError::NotFound)),
                    429 => prop_assert!(matches!(action, Action::Retry { pause_all: true, .. }), "{:?}", action),
                    500..=599 => prop_assert!(matches!(action, Action::Retry { pause_all: false, .. }), "{:?}", action),
                    401 | 403 => prop_assert_eq!(action, Action::Abort),
                    _ => {
                        prop_assert_eq!(action, Action::GiveUp);
                        let text = result.unwrap_err().to_string();
                        prop_assert!(text.contains(&format!("statusCode {code}")), "{}", text);
                    }
                }
            }

            /// statusCode 200 with well-formed data maps to a detail (never a
            /// retry): payStatus through the status map, the amount kept exactly,
            /// naive times shifted from UTC+8.
            #[test]
            fn success_answers_map_exactly(
                pay_status in "[0-9]{1,2}",
                amount in proptest::option::of("-?[0-9]{1,12}(\\.[0-9]{1,8})?"),
                paid in proptest::option::of(0i64..4_000_000_000),
                channel in proptest::option::of("\\PC{1,20}"),
            ) {
                let naive = |t: i64| {
                    chrono::DateTime::from_timestamp(t, 0).unwrap().naive_utc()
                        .format("%Y-%m-%d %H:%M:%S").to_string()
                };
                let body = json!({"statusCode": 200, "message": "ok", "data": {
                    "orderNo": "O-1", "payStatus": pay_status, "paidAmount": amount,
                    "paidTime": paid.map(naive), "channelOrderNo": channel, "payType": "Alipay",
                }});
                let result = classify(&raw(200, &body.to_string()));
                prop_assert_eq!(decide(&result, 1, &RetryPolicy::default(), 0.5), Action::Done);
                let d = result.unwrap();
                let map = default_status_map();
                prop_assert_eq!(d.status, map.get(&pay_status).copied().unwrap_or(PayStatus::Unknown));
                prop_assert_eq!(d.provider_status, pay_status);
                prop_assert_eq!(d.amount.map(|a| a.to_string()), amount);
                prop_assert_eq!(d.paid_at, paid.and_then(|t| chrono::DateTime::from_timestamp(t - 8 * 3600, 0)));
                prop_assert_eq!(d.payment_no, channel.map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()));
            }

            /// Token answers: whatever the provider echoes back, no error message
            /// carries the access key secret.
            #[test]
            fn token_errors_never_carry_the_secret(
                code in prop_oneof![Just(200i64), Just(400), Just(401), Just(403), Just(429), Just(500)],
                before in "\\PC{0,10}",
                after in "\\PC{0,10}",
                http in prop_oneof![Just(200u16), Just(400), Just(500)],
            ) {
                let echo = format!("{before}{SECRET}{after}");
                let body = json!({"statusCode": code, "message": echo, "apiCode": echo, "requestId": echo});
                if let Err(e) = classify_token_response(&raw(http, &body.to_string()), SECRET) {
                    prop_assert!(!e.to_string().contains(SECRET), "{}", e);
                    prop_assert!(!format!("{:?}", e).contains(SECRET), "{:?}", e);
                }
            }
        }
    }
}
