//! End-to-end tests of the mock server: each starts it on `127.0.0.1:0` and talks
//! to it over real HTTP with reqwest. None depends on wall-clock speed: token expiry
//! uses the server's advanceable clock, the rate limit uses rates so slow that no
//! refill can happen during a test.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::*;
use crate::provider::payprotocol::sign;

/// `Response::json` without reqwest's `json` feature (an inherent method, should
/// the feature be enabled, takes precedence and behaves the same).
trait ReadJson {
    fn json<T: serde::de::DeserializeOwned>(self)
    -> impl Future<Output = Result<T, String>> + Send;
}

impl ReadJson for reqwest::Response {
    async fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        let body = self.bytes().await.map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }
}

async fn start(opts: MockOptions) -> MockServer {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    MockServer::start(listen, opts)
        .await
        .expect("mock server starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A PayProtocol GET of `target` (path + query as sent), signed with `secret` at `ts`.
async fn pp_get_with(
    s: &MockServer,
    target: &str,
    key: &str,
    secret: &str,
    ts: i64,
) -> reqwest::Response {
    let ts = ts.to_string();
    let sig = sign(secret.as_bytes(), &ts, "GET", target, b"");
    client()
        .get(format!("http://{}{target}", s.addr()))
        .header("X-PAY-KEY", key)
        .header("X-PAY-TIMESTAMP", ts)
        .header("X-PAY-SIGN", sig)
        .send()
        .await
        .expect("request sent")
}

/// A correctly signed PayProtocol GET.
async fn pp_get(s: &MockServer, target: &str) -> reqwest::Response {
    pp_get_with(s, target, DEFAULT_API_KEY, DEFAULT_API_SECRET, now_secs()).await
}

async fn pp_detail(s: &MockServer, order: &str) -> (u16, Value) {
    let r = pp_get(s, &format!("/api/mer/payment/detail?outTradeNo={order}")).await;
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

async fn pp_status(s: &MockServer, order: &str) -> i64 {
    let (http, body) = pp_detail(s, order).await;
    assert_eq!(http, 200, "{body}");
    body["data"]["paymentStatus"]
        .as_i64()
        .expect("paymentStatus")
}

async fn ga_token_with(s: &MockServer, id: &str, secret: &str) -> Value {
    client()
        .post(format!(
            "{}/api/v3/get-management-token",
            s.genauth_base_url()
        ))
        .header("content-type", "application/json")
        .body(serde_json::json!({"accessKeyId": id, "accessKeySecret": secret}).to_string())
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("JSON body")
}

async fn ga_token(s: &MockServer) -> String {
    let body = ga_token_with(s, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET).await;
    assert_eq!(body["statusCode"], 200, "{body}");
    body["data"]["access_token"]
        .as_str()
        .expect("token")
        .to_owned()
}

async fn ga_get(s: &MockServer, order: &str, token: &str, pool_header: &str) -> reqwest::Response {
    client()
        .get(format!(
            "{}/api/v3/get-order-pay-detail?orderNo={order}",
            s.genauth_base_url()
        ))
        .header("authorization", format!("Bearer {token}"))
        .header(pool_header, DEFAULT_USERPOOL_ID)
        .send()
        .await
        .expect("request sent")
}

async fn ga_detail(s: &MockServer, order: &str, token: &str) -> Value {
    let r = ga_get(s, order, token, "x-genauth-userpool-id").await;
    assert_eq!(r.status(), 200);
    r.json().await.expect("JSON body")
}

/// PayProtocol: the right key, secret and a fresh timestamp pass; a wrong secret,
/// a wrong key, a stale timestamp or a missing header get HTTP 401 with `{code:401}`.
#[tokio::test]
async fn payprotocol_checks_signature_key_and_timestamp() {
    let s = start(MockOptions::default()).await;
    let target = "/api/mer/payment/detail?outTradeNo=PAID-1";
    let ok = pp_get(&s, target).await;
    assert_eq!(ok.status(), 200);

    let now = now_secs();
    for (key, secret, ts) in [
        (DEFAULT_API_KEY, "wrong-secret", now),
        ("wrong-key", DEFAULT_API_SECRET, now),
        (DEFAULT_API_KEY, DEFAULT_API_SECRET, now - 3600),
        (DEFAULT_API_KEY, DEFAULT_API_SECRET, now + 120),
    ] {
        let r = pp_get_with(&s, target, key, secret, ts).await;
        assert_eq!(r.status(), 401, "{key} {secret} {ts}");
        let body: Value = r.json().await.expect("JSON body");
        assert_eq!(body["code"], 401);
        assert!(body["msg"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let bare = client()
        .get(format!("http://{}{target}", s.addr()))
        .send()
        .await
        .expect("request sent");
    assert_eq!(bare.status(), 401);

    let c = s.counters().snapshot();
    assert_eq!(c.unauthorized, 5);
    assert_eq!(c.payprotocol_detail_requests, 6);
    // Only the accepted request advanced the order.
    assert_eq!(s.counters().answered_of("PAID-1"), 1);
    assert_eq!(s.polls_of("PAID-1"), 6);
    s.shutdown().await;
}

/// The signature covers the query exactly as sent: percent-encoding is not
/// normalized, and the order number is decoded for the answer.
#[tokio::test]
async fn payprotocol_signs_the_raw_query() {
    let s = start(MockOptions::default()).await;
    let r = pp_get(
        &s,
        "/api/mer/payment/detail?outTradeNo=PAID%2B1%2Fx&outPaymentNo=202404031340061798686",
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(body["data"]["outTradeNo"], "PAID+1/x");
    assert_eq!(body["data"]["outPaymentNo"], "202404031340061798686");
    s.shutdown().await;
}

/// Without clock-skew checks, old timestamps pass as long as the signature is right.
#[tokio::test]
async fn payprotocol_clock_skew_check_can_be_disabled() {
    let s = start(MockOptions {
        clock_skew_rejects: false,
        ..MockOptions::default()
    })
    .await;
    let target = "/api/mer/payment/detail?outTradeNo=PAID-1";
    let r = pp_get_with(
        &s,
        target,
        DEFAULT_API_KEY,
        DEFAULT_API_SECRET,
        1_723_971_200,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = pp_get_with(&s, target, DEFAULT_API_KEY, "nope", 1_723_971_200).await;
    assert_eq!(r.status(), 401);
    s.shutdown().await;
}

/// A PENDING order reads 1, 1 (pending_polls = 2), 2 (confirm_polls = 1), then 0
/// forever; CONFIRM reads 2 then 0; PAID is 0 at once; NEVER stays 1.
#[tokio::test]
async fn payprotocol_lifecycles() {
    let s = start(MockOptions::default()).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(pp_status(&s, "ORD-PENDING-1").await);
    }
    assert_eq!(seen, [1, 1, 2, 0, 0]);
    assert_eq!(pp_status(&s, "ord-confirm-1").await, 2);
    assert_eq!(pp_status(&s, "ord-confirm-1").await, 0);
    assert_eq!(pp_status(&s, "PAID-9").await, 0);
    for _ in 0..4 {
        assert_eq!(pp_status(&s, "NEVER-1").await, 1);
    }
    assert_eq!(pp_status(&s, "PARTIAL-1").await, 3);
    assert_eq!(pp_status(&s, "FAILED-1").await, 4);
    assert_eq!(pp_status(&s, "REFUND-1").await, 5);
    assert_eq!(pp_status(&s, "UNKNOWN-1").await, 7);
    assert_eq!(s.polls_of("ORD-PENDING-1"), 5);
    s.shutdown().await;
}

/// Lifecycle lengths follow the options.
#[tokio::test]
async fn payprotocol_lifecycle_lengths_are_configurable() {
    let s = start(MockOptions {
        pending_polls: 1,
        confirm_polls: 3,
        ..MockOptions::default()
    })
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(pp_status(&s, "PENDING-2").await);
    }
    assert_eq!(seen, [1, 2, 2, 2, 0, 0]);
    s.shutdown().await;
}

/// NOTFOUND is HTTP 404, NODATA is code 200 with null data, BADREQ is HTTP 400,
/// a missing outTradeNo is HTTP 400.
#[tokio::test]
async fn payprotocol_not_found_and_empty_answers() {
    let s = start(MockOptions::default()).await;
    let (http, body) = pp_detail(&s, "X-NOTFOUND-1").await;
    assert_eq!((http, body["code"].as_i64()), (404, Some(404)));
    let (http, body) = pp_detail(&s, "X-NODATA-1").await;
    assert_eq!((http, body["code"].as_i64()), (200, Some(200)));
    assert!(body["data"].is_null());
    let (http, _) = pp_detail(&s, "BADREQ-1").await;
    assert_eq!(http, 400);
    let r = pp_get(&s, "/api/mer/payment/detail").await;
    assert_eq!(r.status(), 400);
    s.shutdown().await;
}

/// Paid answers carry every documented field; pending ones omit the paid fields and
/// failed ones send them as null; BIG settles more than 2^64 base units of ETH.
#[tokio::test]
async fn payprotocol_detail_fields() {
    let s = start(MockOptions::default()).await;
    let (_, paid) = pp_detail(&s, "PAID-42").await;
    let d = &paid["data"];
    for k in [
        "chainId",
        "orgId",
        "outTradeNo",
        "outPaymentNo",
        "description",
        "isLegalTender",
        "quoteCurrencySymbol",
        "quoteAmount",
        "paymentStatus",
        "paymentType",
        "expectedAmount",
        "settlementAmount",
        "settlementCurrencySymbol",
        "transferHash",
        "userWalletAddress",
        "fromAddress",
        "createTime",
        "blockTime",
    ] {
        assert!(!d[k].is_null(), "{k} missing in {d}");
    }
    assert_eq!(paid["msg"], "success");
    assert!(
        d["settlementAmount"]
            .as_str()
            .is_some_and(|a| a.bytes().all(|b| b.is_ascii_digit()))
    );
    let created = d["createTime"].as_str().expect("createTime");
    assert!(chrono::NaiveDateTime::parse_from_str(created, "%Y-%m-%d %H:%M:%S").is_ok());
    // The same order answers the same facts again.
    let (_, again) = pp_detail(&s, "PAID-42").await;
    assert_eq!(paid, again);

    let (_, pending) = pp_detail(&s, "NEVER-42").await;
    let obj = pending["data"].as_object().expect("data object");
    assert!(!obj.contains_key("settlementAmount") && !obj.contains_key("transferHash"));
    let (_, failed) = pp_detail(&s, "FAILED-42").await;
    let obj = failed["data"].as_object().expect("data object");
    assert!(obj.get("settlementAmount").is_some_and(Value::is_null));

    let (_, big) = pp_detail(&s, "BIG-1").await;
    let amount = big["data"]["settlementAmount"].as_str().expect("amount");
    assert!(amount.parse::<u64>().is_err() && amount.parse::<u128>().is_ok());
    assert_eq!(big["data"]["settlementCurrencySymbol"], "ETH");
    assert_eq!(big["data"]["chainId"], 2);
    s.shutdown().await;
}

/// The currency list has TRON USDT/TRX (6 decimals), ETH (18) and USDC (6) on chain
/// 2, and a third chain; `chainId` filters it; every row has the documented keys.
#[tokio::test]
async fn payprotocol_currency_list() {
    let s = start(MockOptions::default()).await;
    let body: Value = pp_get(&s, "/api/mer/conf/list/currency")
        .await
        .json()
        .await
        .expect("JSON body");
    assert_eq!(body["code"], 200);
    let rows = body["data"].as_array().expect("data array");
    let find = |chain: i64, sym: &str| {
        rows.iter()
            .find(|r| r["chainId"] == chain && r["symbol"] == sym)
            .and_then(|r| r["decimals"].as_i64())
    };
    assert_eq!(find(1, "USDT"), Some(6));
    assert_eq!(find(1, "TRX"), Some(6));
    assert_eq!(find(2, "ETH"), Some(18));
    assert_eq!(find(2, "USDC"), Some(6));
    assert!(rows.iter().any(|r| r["chainId"] == 3));
    for r in rows {
        for k in [
            "currencyId",
            "name",
            "address",
            "createTime",
            "icon",
            "exchangeRate",
        ] {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
        assert!(r["icon"].as_str().is_some_and(|i| i.len() > 200));
    }
    let tron: Value = pp_get(&s, "/api/mer/conf/list/currency?chainId=1")
        .await
        .json()
        .await
        .expect("JSON body");
    let tron = tron["data"].as_array().expect("data array");
    assert_eq!(tron.len(), 2);
    assert!(tron.iter().all(|r| r["chainId"] == 1));
    assert_eq!(s.counters().snapshot().payprotocol_currency_requests, 2);
    s.shutdown().await;
}

/// GenAuth: a token from the right credentials opens the detail endpoint with
/// either brand's user-pool header; wrong credentials get statusCode 401 in an HTTP
/// 200; a token is refused once the server clock passes its expiry.
#[tokio::test]
async fn genauth_token_detail_and_expiry() {
    let s = start(MockOptions::default()).await;
    let bad = ga_token_with(&s, DEFAULT_ACCESS_KEY_ID, "wrong").await;
    assert_eq!(bad["statusCode"], 401);
    assert!(bad["apiCode"].is_number() && bad["requestId"].is_string());

    let body = ga_token_with(&s, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET).await;
    assert_eq!(body["data"]["expires_in"], DEFAULT_EXPIRES_IN);
    let token = body["data"]["access_token"].as_str().expect("token");
    assert_eq!(token.split('.').count(), 3);

    let ok = ga_detail(&s, "PAID-7", token).await;
    assert_eq!(ok["statusCode"], 200, "{ok}");
    let authing: Value = ga_get(&s, "PAID-7", token, "x-authing-userpool-id")
        .await
        .json()
        .await
        .expect("JSON body");
    assert_eq!(authing["statusCode"], 200);

    // A wrong user pool, no token, or a token this server never issued.
    let wrong_pool: Value = client()
        .get(format!(
            "{}/api/v3/get-order-pay-detail?orderNo=PAID-7",
            s.genauth_base_url()
        ))
        .header("authorization", format!("Bearer {token}"))
        .header("x-genauth-userpool-id", "other-pool")
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("JSON body");
    assert_eq!(wrong_pool["statusCode"], 401);
    let forged = ga_detail(&s, "PAID-7", "eyJ.eyJ.sig").await;
    assert_eq!(forged["statusCode"], 401);

    s.advance_clock(Duration::from_secs(DEFAULT_EXPIRES_IN + 1));
    let expired = ga_detail(&s, "PAID-7", token).await;
    assert_eq!(expired["statusCode"], 401, "{expired}");
    // A fresh token works again.
    let fresh = ga_token(&s).await;
    assert_ne!(fresh, token);
    assert_eq!(ga_detail(&s, "PAID-7", &fresh).await["statusCode"], 200);

    let c = s.counters().snapshot();
    assert_eq!(c.genauth_token_requests, 3);
    assert_eq!(c.unauthorized, 4);
    s.shutdown().await;
}

/// GenAuth lifecycles and errors: PENDING is "1" for two polls then "3"; FAILED is
/// "4", EXPIRED "5", UNKNOWN "9"; NOTFOUND is statusCode 404 with apiCode and
/// requestId; BADREQ is statusCode 400 with a string apiCode; paid answers carry
/// every documented field.
#[tokio::test]
async fn genauth_lifecycles_and_errors() {
    let s = start(MockOptions::default()).await;
    let token = ga_token(&s).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let b = ga_detail(&s, "PENDING-5", &token).await;
        seen.push(b["data"]["payStatus"].as_str().unwrap_or("?").to_owned());
    }
    assert_eq!(seen, ["1", "1", "3", "3"]);
    for (order, code) in [("FAILED-5", "4"), ("EXPIRED-5", "5"), ("UNKNOWN-5", "9")] {
        assert_eq!(
            ga_detail(&s, order, &token).await["data"]["payStatus"],
            code
        );
    }
    let paid = ga_detail(&s, "PAID-5", &token).await;
    let d = &paid["data"];
    assert!(d["payStatus"] == "3" || d["payStatus"] == "2");
    for k in [
        "orderNo",
        "channelOrderNo",
        "paidAmount",
        "paidTime",
        "paidAccountNo",
        "createTime",
        "payType",
    ] {
        assert!(d[k].is_string(), "{k} missing in {d}");
    }
    assert_eq!(paid["message"], "Operation successful");

    let nf = ga_detail(&s, "NOTFOUND-5", &token).await;
    assert_eq!(nf["statusCode"], 404);
    assert!(nf["apiCode"].is_number() && nf["requestId"].is_string());
    let bad = ga_detail(&s, "BADREQ-5", &token).await;
    assert_eq!(bad["statusCode"], 400);
    assert!(bad["apiCode"].is_string());
    let nodata = ga_detail(&s, "NODATA-5", &token).await;
    assert_eq!(nodata["statusCode"], 200);
    assert!(nodata["data"].is_null());
    let big = ga_detail(&s, "BIG-5", &token).await;
    assert_eq!(big["data"]["paidAmount"], "123456789012345678.9");
    s.shutdown().await;
}

/// The JWT payload is base64url without padding, contains both `-` and `_` with the
/// default user pool (so a standard-alphabet decoder fails), and carries the claim.
#[tokio::test]
async fn jwt_payload_needs_the_url_safe_alphabet() {
    let s = start(MockOptions::default()).await;
    for _ in 0..3 {
        let token = ga_token(&s).await;
        let payload = token.split('.').nth(1).expect("payload part");
        assert!(payload.contains('-') && payload.contains('_'), "{payload}");
        assert!(!payload.contains('='));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url");
        let claims: Value = serde_json::from_slice(&raw).expect("JSON claims");
        assert_eq!(claims["scoped_userpool_id"], DEFAULT_USERPOOL_ID);
        assert!(claims["exp"].as_i64() > claims["iat"].as_i64());
        assert!(claims["jti"].is_string());
    }
    s.shutdown().await;
}

/// Over the server-side limit, PayProtocol answers HTTP 429 with `Retry-After` in
/// each mode, and GenAuth answers HTTP 200 with statusCode 429. The rate is so low
/// that no token refills during the test.
#[tokio::test]
async fn rate_limit_answers_429_in_each_retry_after_mode() {
    for mode in [
        RetryAfterMode::Seconds,
        RetryAfterMode::HttpDate,
        RetryAfterMode::Zero,
        RetryAfterMode::Absent,
    ] {
        let s = start(MockOptions {
            rate_limit: Some(0.01),
            retry_after: mode,
            ..MockOptions::default()
        })
        .await;
        let first = pp_get(&s, "/api/mer/payment/detail?outTradeNo=PAID-1").await;
        assert_eq!(first.status(), 200);
        let r = pp_get(&s, "/api/mer/payment/detail?outTradeNo=PAID-1").await;
        assert_eq!(r.status(), 429);
        let ra = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body: Value = r.json().await.expect("JSON body");
        assert_eq!(body["code"], 429);
        match mode {
            RetryAfterMode::Seconds => {
                let secs: u64 = ra.as_deref().and_then(|v| v.parse().ok()).expect("seconds");
                assert!((1..=100).contains(&secs), "{secs}");
                assert!(secs > 50, "about 100 s to wait at 0.01 req/s: {secs}");
            }
            RetryAfterMode::HttpDate => {
                let at =
                    httpdate::parse_http_date(ra.as_deref().expect("date")).expect("HTTP date");
                assert!(at > SystemTime::now() + Duration::from_secs(50));
            }
            RetryAfterMode::Zero => assert_eq!(ra.as_deref(), Some("0")),
            RetryAfterMode::Absent => assert_eq!(ra, None),
        }
        // GenAuth is throttled the GenAuth way.
        let ga = ga_token_with(&s, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET).await;
        assert_eq!(ga["statusCode"], 429, "{ga}");
        let c = s.counters().snapshot();
        assert_eq!((c.throttled, c.total_requests), (2, 3));
        // Throttled requests do not advance the order.
        assert_eq!(s.counters().answered_of("PAID-1"), 1);
        s.shutdown().await;
    }
}

/// How one fault looked to the client.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Ok,
    Http(u16),
    Html502,
    Malformed,
    BodyError,
    Large,
    BodyCode(i64),
}

async fn observe(r: reqwest::Response, family: &str) -> Seen {
    let status = r.status().as_u16();
    let html = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    let Ok(body) = r.bytes().await else {
        return Seen::BodyError;
    };
    if html && status == 502 {
        return Seen::Html502;
    }
    if status != 200 {
        return Seen::Http(status);
    }
    if body.len() >= faults::LARGE_BODY_BYTES {
        return Seen::Large;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return Seen::Malformed;
    };
    let code = if family == "pp" {
        &v["code"]
    } else {
        &v["statusCode"]
    };
    match code.as_i64() {
        Some(200) => Seen::Ok,
        Some(c) => Seen::BodyCode(c),
        None => Seen::Malformed,
    }
}

/// Every fault kind, on both providers: a faulted order fails exactly
/// `max_consecutive_faults` attempts with the kind's symptom, then succeeds, and
/// its lifecycle starts only at the first answered poll.
#[tokio::test]
async fn order_faults_fail_exactly_max_consecutive_then_succeed() {
    let expect_pp = |k| match k {
        FaultKind::Status500 => Seen::Http(500),
        FaultKind::Status502 => Seen::Http(502),
        FaultKind::Status503 => Seen::Http(503),
        FaultKind::Html502 => Seen::Html502,
        FaultKind::Malformed => Seen::Malformed,
        FaultKind::Reset => Seen::BodyError,
        FaultKind::Slow => Seen::Http(504),
        FaultKind::TooLarge | FaultKind::LargeChunked => Seen::Large,
        FaultKind::Throttle429 => Seen::Http(429),
    };
    let expect_ga = |k| match k {
        FaultKind::Status500 => Seen::BodyCode(500),
        FaultKind::Throttle429 => Seen::BodyCode(429),
        other => expect_pp(other),
    };
    for kind in FaultKind::ALL {
        let s = start(MockOptions {
            fault_share: 1.0,
            fault_kinds: vec![kind],
            max_consecutive_faults: 2,
            slow_delay: Duration::from_millis(1),
            ..MockOptions::default()
        })
        .await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let r = pp_get(&s, "/api/mer/payment/detail?outTradeNo=PENDING-F").await;
            seen.push(observe(r, "pp").await);
        }
        let want = expect_pp(kind);
        assert_eq!(seen, [want, expect_pp(kind), Seen::Ok, Seen::Ok], "{kind}");
        // The lifecycle began at the first answered poll: 1, 1.
        assert_eq!(pp_status(&s, "PENDING-F").await, 2, "{kind}");

        let token = ga_token(&s).await;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = ga_get(&s, "PAID-F", &token, "x-genauth-userpool-id").await;
            seen.push(observe(r, "ga").await);
        }
        assert_eq!(seen, [expect_ga(kind), expect_ga(kind), Seen::Ok], "{kind}");

        let c = s.counters().snapshot();
        assert_eq!(c.faults_injected, 4, "{kind}");
        assert_eq!(s.polls_of("PENDING-F"), 5);
        assert_eq!(s.counters().answered_of("PENDING-F"), 3);
        s.shutdown().await;
    }
}

/// With a fault share, which orders fail depends only on the seed and the order
/// number, the same in every run; the share is roughly honoured.
#[tokio::test]
async fn fault_share_is_seeded_and_stable() {
    let opts = MockOptions {
        fault_share: 0.3,
        fault_kinds: vec![FaultKind::Status503],
        max_consecutive_faults: 1,
        seed: 42,
        ..MockOptions::default()
    };
    let a = start(opts.clone()).await;
    let b = start(opts).await;
    let mut faulted = 0;
    for i in 0..60 {
        let order = format!("PAID-{i}");
        let (sa, _) = pp_detail_raw(&a, &order).await;
        let (sb, _) = pp_detail_raw(&b, &order).await;
        assert_eq!(sa, sb, "{order}");
        if sa == 503 {
            faulted += 1;
        }
    }
    assert!((5..=35).contains(&faulted), "{faulted} of 60");
    a.shutdown().await;
    b.shutdown().await;
}

async fn pp_detail_raw(s: &MockServer, order: &str) -> (u16, bytes::Bytes) {
    let r = pp_get(s, &format!("/api/mer/payment/detail?outTradeNo={order}")).await;
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap_or_default())
}

/// A random fault rate of 1 faults every request, token and currency calls included.
#[tokio::test]
async fn random_faults_hit_every_endpoint() {
    let s = start(MockOptions {
        random_fault_rate: 1.0,
        fault_kinds: vec![FaultKind::Status503],
        ..MockOptions::default()
    })
    .await;
    let r = pp_get(&s, "/api/mer/conf/list/currency").await;
    assert_eq!(r.status(), 503);
    let r = client()
        .post(format!(
            "{}/api/v3/get-management-token",
            s.genauth_base_url()
        ))
        .body("{}")
        .send()
        .await
        .expect("request sent");
    assert_eq!(r.status(), 503);
    let (status, _) = pp_detail_raw(&s, "PAID-1").await;
    assert_eq!(status, 503);
    assert_eq!(s.counters().snapshot().faults_injected, 3);
    s.shutdown().await;
}

/// `GET /__mock/stats` serves the counters snapshot (and is not counted itself);
/// the busiest-second counter saw the requests.
#[tokio::test]
async fn stats_endpoint_serves_the_snapshot() {
    let s = start(MockOptions::default()).await;
    for i in 0..5 {
        pp_detail(&s, &format!("PAID-{i}")).await;
    }
    let snap: CountersSnapshot = client()
        .get(format!("http://{}/__mock/stats", s.addr()))
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("snapshot JSON");
    assert_eq!(snap, s.counters().snapshot());
    assert_eq!(snap.total_requests, 5);
    assert_eq!(snap.payprotocol_detail_requests, 5);
    assert_eq!(snap.answered, 5);
    assert!((1..=5).contains(&snap.max_requests_in_any_1s_window));
    s.shutdown().await;
}

/// Shutdown does not wait for a `Slow` answer: the sleeping handler is cut short.
#[tokio::test]
async fn shutdown_cuts_slow_answers_short() {
    let s = start(MockOptions {
        fault_share: 1.0,
        fault_kinds: vec![FaultKind::Slow],
        slow_delay: Duration::from_secs(3600),
        ..MockOptions::default()
    })
    .await;
    let url = format!(
        "http://{}/api/mer/payment/detail?outTradeNo=PAID-1",
        s.addr()
    );
    let ts = now_secs().to_string();
    let sig = sign(
        DEFAULT_API_SECRET.as_bytes(),
        &ts,
        "GET",
        "/api/mer/payment/detail?outTradeNo=PAID-1",
        b"",
    );
    let pending = tokio::spawn(
        client()
            .get(url)
            .header("X-PAY-KEY", DEFAULT_API_KEY)
            .header("X-PAY-TIMESTAMP", ts)
            .header("X-PAY-SIGN", sig)
            .send(),
    );
    let counters = s.counters();
    while counters.snapshot().faults_injected == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The safety timeout only guards against a hang; it is far above the real time.
    tokio::time::timeout(Duration::from_secs(30), s.shutdown())
        .await
        .expect("shutdown does not wait for the slow answer");
    let answer = pending.await.expect("request task");
    assert!(answer.is_err() || answer.is_ok_and(|r| r.status() == 504));
}

/// `serve_until` binds, reports the bound port, serves, and returns once its
/// shutdown future completes.
#[tokio::test]
async fn serve_until_returns_on_shutdown() {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let server = tokio::spawn(serve_until(
        listen,
        MockOptions::default(),
        None,
        move |addr| {
            let _ = bound_tx.send(addr);
        },
        async {
            let _ = rx.await;
        },
    ));
    let addr = bound_rx.await.expect("bound address reported");
    assert_ne!(addr.port(), 0);
    let snap: CountersSnapshot = client()
        .get(format!("http://{addr}/__mock/stats"))
        .send()
        .await
        .expect("the reported address serves")
        .json()
        .await
        .expect("snapshot JSON");
    assert_eq!(snap.total_requests, 0);
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("returns")
        .expect("task")
        .expect("serves");
}

/// The `large-chunked` fault sends no `Content-Length` (the client learns the size
/// only while reading) and a complete JSON body of `CHUNKED_BODY_BYTES`.
#[tokio::test]
async fn large_chunked_fault_has_no_length_and_valid_json() {
    let s = start(MockOptions {
        fault_share: 1.0,
        fault_kinds: vec![FaultKind::LargeChunked],
        max_consecutive_faults: 1,
        ..MockOptions::default()
    })
    .await;
    let r = pp_get(&s, "/api/mer/payment/detail?outTradeNo=PAID-C").await;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.content_length().is_none(), "{:?}", r.headers());
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), faults::CHUNKED_BODY_BYTES);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
    s.shutdown().await;
}
