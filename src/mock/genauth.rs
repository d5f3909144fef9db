//! The mock's GenAuth management API: `POST /api/v3/get-management-token` (issues
//! JWTs and remembers them until they expire on the server clock),
//! `GET /api/v3/get-order-pay-detail` (bearer token + user-pool header), and how
//! GenAuth answers throttling and faults (mostly HTTP 200 with an error statusCode).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use super::counters::{Family, bump};
use super::faults::common_fault;
use super::scenario::{Facts, Scenario, cents_decimal, cst_compact, cst_time, mix};
use super::{FaultKind, Shared, json_response, query_param};

/// Issued tokens kept before expired ones are swept out.
const TOKEN_SWEEP_AT: usize = 1024;

/// `POST /api/v3/get-management-token`.
pub(crate) async fn token(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let r = token_answer(&s, &body).await;
    s.latency().await;
    r
}

/// `GET /api/v3/get-order-pay-detail?orderNo=..`.
pub(crate) async fn detail(State(s): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    let r = detail_answer(&s, &uri, &headers).await;
    s.latency().await;
    r
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequest {
    access_key_id: String,
    access_key_secret: String,
}

/// The JWT payload. `scoped_userpool_id` comes first so its bytes sit at a fixed
/// offset (see [`super::DEFAULT_USERPOOL_ID`]).
#[derive(Serialize)]
struct Claims<'a> {
    scoped_userpool_id: &'a str,
    iss: &'static str,
    iat: i64,
    exp: i64,
    jti: String,
}

async fn token_answer(s: &Shared, body: &[u8]) -> Response {
    s.counters.arrival();
    bump(&s.counters.genauth_token_requests);
    if s.over_limit().is_some() {
        bump(&s.counters.throttled);
        return failure(s, 429, "Too many requests", json!(429));
    }
    if let Some(kind) = s.fault_for(Family::GenAuth, None) {
        return fault(s, kind).await;
    }
    let Ok(req) = serde_json::from_slice::<TokenRequest>(body) else {
        return failure(
            s,
            400,
            "accessKeyId and accessKeySecret are required",
            json!(1001),
        );
    };
    if req.access_key_id != s.opts.genauth_access_key_id
        || req.access_key_secret != s.opts.genauth_access_key_secret
    {
        bump(&s.counters.unauthorized);
        return failure(
            s,
            401,
            "Invalid accessKeyId or accessKeySecret",
            json!(2001),
        );
    }
    let token = issue_token(s);
    json_response(
        StatusCode::OK,
        &json!({
            "statusCode": 200,
            "message": "Get management token successfully",
            "data": {"access_token": token, "expires_in": s.opts.genauth_expires_in},
        }),
    )
}

/// Makes a signed JWT with a unique `jti` and remembers it until it expires.
fn issue_token(s: &Shared) -> String {
    let n = s.next_seq();
    let iat = s.clock.unix_secs();
    let lifetime = i64::try_from(s.opts.genauth_expires_in).unwrap_or(i64::MAX);
    let claims = Claims {
        scoped_userpool_id: &s.opts.genauth_userpool_id,
        iss: "https://mock.genauth.local/oidc",
        iat,
        exp: iat.saturating_add(lifetime),
        jti: format!("{:016x}{n:08x}", mix(s.opts.seed, n)),
    };
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signing_input = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(s.opts.genauth_access_key_secret.as_bytes())
        .expect("HMAC accepts any key length");
    mac.update(signing_input.as_bytes());
    let token = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    );

    let expires = s
        .clock
        .now()
        .checked_add(std::time::Duration::from_secs(s.opts.genauth_expires_in))
        .unwrap_or_else(|| s.clock.now() + std::time::Duration::from_secs(100 * 365 * 86_400));
    let mut tokens = s.tokens.write().unwrap_or_else(|e| e.into_inner());
    if tokens.len() >= TOKEN_SWEEP_AT {
        let now = s.clock.now();
        tokens.retain(|_, exp| *exp > now);
    }
    tokens.insert(token.clone(), expires);
    token
}

async fn detail_answer(s: &Shared, uri: &Uri, headers: &HeaderMap) -> Response {
    s.counters.arrival();
    bump(&s.counters.genauth_detail_requests);
    let order = query_param(uri.query(), "orderNo");
    if let Some(o) = order.as_deref() {
        s.counters
            .orders
            .update(Family::GenAuth, o, |st| st.received += 1);
    }
    if s.over_limit().is_some() {
        bump(&s.counters.throttled);
        return failure(s, 429, "Too many requests", json!(429));
    }
    if let Err(why) = check_auth(s, headers) {
        bump(&s.counters.unauthorized);
        return failure(s, 401, why, json!(2206));
    }
    let Some(order) = order.filter(|o| !o.is_empty()) else {
        return failure(s, 400, "orderNo is required", json!(1001));
    };
    if let Some(kind) = s.fault_for(Family::GenAuth, Some(&order)) {
        return fault(s, kind).await;
    }
    let n = s.counters.orders.update(Family::GenAuth, &order, |st| {
        st.answered += 1;
        st.answered - 1
    });
    bump(&s.counters.answered);
    let scenario = Scenario::of(&order);
    match scenario {
        Scenario::NotFound => failure(s, 404, "Order not found", json!(2004)),
        Scenario::BadReq => failure(s, 400, "Invalid orderNo", json!("INVALID_ORDER_NO")),
        Scenario::NoData => json_response(
            StatusCode::OK,
            &json!({"statusCode": 200, "message": "Operation successful", "data": null}),
        ),
        _ => {
            let f = Facts::of(&order);
            let status =
                scenario.genauth_status(n, s.opts.pending_polls, s.opts.confirm_polls, f.h);
            json_response(
                StatusCode::OK,
                &json!({
                    "statusCode": 200,
                    "message": "Operation successful",
                    "data": detail_data(&order, scenario, status, &f),
                }),
            )
        }
    }
}

/// A bearer token this server issued and that has not expired, and the user-pool
/// header (GenAuth or Authing brand) equal to its claim.
fn check_auth(s: &Shared, headers: &HeaderMap) -> Result<(), &'static str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let auth = header("authorization").ok_or("Missing authorization header")?;
    let token = auth
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or("Authorization is not a bearer token")?;
    let expires = s
        .tokens
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(token)
        .copied()
        .ok_or("Invalid access token")?;
    if s.clock.now() >= expires {
        return Err("Access token expired");
    }
    let pool = header("x-genauth-userpool-id")
        .or_else(|| header("x-authing-userpool-id"))
        .ok_or("Missing userpool id header")?;
    if pool != s.opts.genauth_userpool_id {
        return Err("Userpool id does not match the token");
    }
    Ok(())
}

/// GenAuth's failure envelope: HTTP 200 with the error in `statusCode`.
fn failure(s: &Shared, status_code: u16, message: &str, api_code: Value) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "statusCode": status_code,
            "message": message,
            "apiCode": api_code,
            "requestId": s.request_id(),
        }),
    )
}

/// GenAuth's answer to an injected fault.
async fn fault(s: &Shared, kind: FaultKind) -> Response {
    if let Some(r) = common_fault(s, kind).await {
        return r;
    }
    match kind {
        FaultKind::Status500 => failure(s, 500, "Internal server error", json!(500)),
        FaultKind::Status502 => (
            StatusCode::BAD_GATEWAY,
            [(CONTENT_TYPE, "text/plain")],
            "Bad Gateway",
        )
            .into_response(),
        FaultKind::Throttle429 => failure(s, 429, "Too many requests", json!(429)),
        _ => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"statusCode": 503, "message": "Service unavailable", "requestId": s.request_id()}),
        ),
    }
}

/// The amount of `BIG` orders: more digits than a u64 or an f64 holds exactly.
const BIG_PAID_AMOUNT: &str = "123456789012345678.9";
const PAY_TYPES: [&str; 3] = ["Alipay", "WechatPay", "UnionPay"];

/// The `data` of a detail answer; unpaid orders have null paid fields.
fn detail_data(order: &str, scenario: Scenario, status: &str, f: &Facts) -> Value {
    let paid = matches!(status, "2" | "3");
    let amount = if scenario == Scenario::Big {
        BIG_PAID_AMOUNT.to_owned()
    } else {
        cents_decimal(f.cents)
    };
    let or_null = |v: Value| if paid { v } else { Value::Null };
    json!({
        "orderNo": order,
        "channelOrderNo": format!("{}22{}", &cst_compact(f.created)[..8], f.digits(20, 18)),
        "paidAmount": or_null(json!(amount)),
        "paidTime": or_null(json!(cst_time(f.paid))),
        "paidAccountNo": or_null(json!(format!("138****{}", f.digits(21, 4)))),
        "payStatus": status,
        "createTime": cst_time(f.created),
        "payType": PAY_TYPES[(f.value(22) % 3) as usize],
    })
}
