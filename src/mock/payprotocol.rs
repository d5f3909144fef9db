//! The mock's PayProtocol merchant API: signature and timestamp checks,
//! `GET /api/mer/payment/detail` and `GET /api/mer/conf/list/currency`, and how
//! PayProtocol answers throttling and faults.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use base64::Engine;
use serde_json::{Map, Value, json};

use super::counters::{Family, bump};
use super::faults::common_fault;
use super::scenario::{Facts, Scenario, cst_compact, cst_time};
use super::{FaultKind, MAX_CLOCK_SKEW_SECS, Shared, json_response, query_param};
use crate::provider::payprotocol::sign;

/// `GET /api/mer/payment/detail?outTradeNo=..[&outPaymentNo=..]`.
pub(crate) async fn detail(State(s): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    let r = detail_answer(&s, &uri, &headers).await;
    s.latency().await;
    r
}

/// `GET /api/mer/conf/list/currency[?chainId=..]`.
pub(crate) async fn currency(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let r = currency_answer(&s, &uri, &headers).await;
    s.latency().await;
    r
}

async fn detail_answer(s: &Shared, uri: &Uri, headers: &HeaderMap) -> Response {
    s.counters.arrival();
    bump(&s.counters.payprotocol_detail_requests);
    let order = query_param(uri.query(), "outTradeNo");
    if let Some(o) = order.as_deref() {
        s.counters
            .orders
            .update(Family::PayProtocol, o, |st| st.received += 1);
    }
    if let Some(r) = gate(s, uri, headers) {
        return r;
    }
    let Some(order) = order.filter(|o| !o.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "outTradeNo is required");
    };
    if let Some(kind) = s.fault_for(Family::PayProtocol, Some(&order)) {
        return fault(s, kind).await;
    }
    let n = s.counters.orders.update(Family::PayProtocol, &order, |st| {
        st.answered += 1;
        st.answered - 1
    });
    bump(&s.counters.answered);
    let scenario = Scenario::of(&order);
    match scenario {
        Scenario::NotFound => error(StatusCode::NOT_FOUND, "payment order not found"),
        Scenario::BadReq => error(StatusCode::BAD_REQUEST, "invalid outTradeNo"),
        Scenario::NoData => json_response(
            StatusCode::OK,
            &json!({"code": 200, "msg": "success", "data": null}),
        ),
        _ => {
            let status = scenario.payprotocol_status(n, s.opts.pending_polls, s.opts.confirm_polls);
            let payment_no = query_param(uri.query(), "outPaymentNo");
            let data = detail_data(&order, payment_no, scenario, status);
            json_response(
                StatusCode::OK,
                &json!({"code": 200, "msg": "success", "data": data}),
            )
        }
    }
}

async fn currency_answer(s: &Shared, uri: &Uri, headers: &HeaderMap) -> Response {
    s.counters.arrival();
    bump(&s.counters.payprotocol_currency_requests);
    if let Some(r) = gate(s, uri, headers) {
        return r;
    }
    if let Some(kind) = s.fault_for(Family::PayProtocol, None) {
        return fault(s, kind).await;
    }
    let chain = match query_param(uri.query(), "chainId").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match c.parse::<i64>() {
            Ok(c) => Some(c),
            Err(_) => return error(StatusCode::BAD_REQUEST, "invalid chainId"),
        },
    };
    let data: Vec<Value> = CURRENCIES
        .iter()
        .enumerate()
        .filter(|(_, c)| chain.is_none_or(|id| id == c.chain_id))
        .map(|(i, c)| c.to_json(i as i64 + 1))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"code": 200, "msg": "success", "data": data}),
    )
}

/// The rate limit, then auth: the answer when the request does not pass.
fn gate(s: &Shared, uri: &Uri, headers: &HeaderMap) -> Option<Response> {
    if let Some(wait) = s.over_limit() {
        bump(&s.counters.throttled);
        return Some(throttled(s, wait));
    }
    let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if let Err(why) = check_auth(s, headers, target) {
        bump(&s.counters.unauthorized);
        return Some(error(StatusCode::UNAUTHORIZED, why));
    }
    None
}

/// Checks `X-PAY-KEY`, `X-PAY-TIMESTAMP` (within 60 s unless disabled) and
/// `X-PAY-SIGN` over the request target exactly as received.
fn check_auth(s: &Shared, headers: &HeaderMap, target: &str) -> Result<(), &'static str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let key = header("x-pay-key").ok_or("missing X-PAY-KEY")?;
    if key != s.opts.payprotocol_api_key {
        return Err("invalid api key");
    }
    let ts = header("x-pay-timestamp").ok_or("missing X-PAY-TIMESTAMP")?;
    let ts_secs: i64 = ts.parse().map_err(|_| "invalid X-PAY-TIMESTAMP")?;
    if s.opts.clock_skew_rejects && (s.clock.unix_secs() - ts_secs).abs() > MAX_CLOCK_SKEW_SECS {
        return Err("request timestamp expired");
    }
    let got = header("x-pay-sign").ok_or("missing X-PAY-SIGN")?;
    let want = sign(
        s.opts.payprotocol_api_secret.as_bytes(),
        ts,
        "GET",
        target,
        b"",
    );
    if got != want {
        return Err("signature verification failed");
    }
    Ok(())
}

/// An error envelope `{code, msg}` with the same HTTP status.
fn error(status: StatusCode, msg: &str) -> Response {
    json_response(
        status,
        &json!({"code": status.as_u16(), "msg": msg, "data": null}),
    )
}

/// HTTP 429 with `Retry-After` per the configured mode.
fn throttled(s: &Shared, wait: std::time::Duration) -> Response {
    let mut r = error(StatusCode::TOO_MANY_REQUESTS, "too many requests");
    if let Some(v) = s.retry_after(wait) {
        r.headers_mut().insert(RETRY_AFTER, v);
    }
    r
}

/// PayProtocol's answer to an injected fault.
async fn fault(s: &Shared, kind: FaultKind) -> Response {
    if let Some(r) = common_fault(s, kind).await {
        return r;
    }
    match kind {
        FaultKind::Status500 => error(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"),
        FaultKind::Status502 => error(StatusCode::BAD_GATEWAY, "bad gateway"),
        FaultKind::Throttle429 => throttled(s, std::time::Duration::from_secs(1)),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "service unavailable"),
    }
}

/// The big ETH amount of `BIG` orders: above 2^64 base units.
const BIG_AMOUNT: &str = "123456789012345678901234";

/// The `data` of a detail answer for an order that has one.
fn detail_data(order: &str, payment_no: Option<String>, scenario: Scenario, status: i64) -> Value {
    let f = Facts::of(order);
    let base_units = u128::from(f.cents) * 10_000; // cents -> 6-decimal base units
    let (chain_id, symbol, settled): (i64, &str, String) = if scenario == Scenario::Big {
        (2, "ETH", BIG_AMOUNT.to_owned())
    } else {
        match f.value(10) % 100 {
            0..75 => (1, "USDT", base_units.to_string()),
            // TRX at 0.12 USD.
            75..85 => (1, "TRX", (base_units * 100 / 12).to_string()),
            85..95 => (2, "USDC", base_units.to_string()),
            _ => (3, "USDT", (base_units * 1_000_000_000_000).to_string()),
        }
    };
    let expected = if scenario == Scenario::Big {
        BIG_AMOUNT.to_owned()
    } else {
        // A little under the settled amount, as in the vendor's sample.
        let s: u128 = settled.parse().unwrap_or(0);
        (s - s * u128::from(f.value(11) % 300) / 1_000_000).to_string()
    };
    let evm = chain_id != 1;
    let address = |k| {
        if evm {
            f.evm_address(k)
        } else {
            f.tron_address(k)
        }
    };
    let payment_no =
        payment_no.unwrap_or_else(|| format!("{}{}", cst_compact(f.created), f.digits(12, 7)));

    let mut d = Map::new();
    d.insert("chainId".into(), json!(chain_id));
    d.insert("orgId".into(), json!(1001));
    d.insert("outTradeNo".into(), json!(order));
    d.insert("outPaymentNo".into(), json!(payment_no));
    d.insert("description".into(), json!(format!("Mock order {order}")));
    d.insert("isLegalTender".into(), json!(1));
    d.insert("quoteCurrencySymbol".into(), json!("USD"));
    let quote = if scenario == Scenario::Big {
        "432098765.43".to_owned()
    } else {
        super::scenario::cents_decimal(f.cents)
    };
    d.insert("quoteAmount".into(), json!(quote));
    d.insert("paymentStatus".into(), json!(status));
    d.insert("paymentType".into(), json!(f.value(13) % 2));
    d.insert("expectedAmount".into(), json!(expected));
    d.insert("userWalletAddress".into(), json!(address(14)));
    d.insert("createTime".into(), json!(cst_time(f.created)));

    let tx_hash = if evm {
        format!("0x{}", f.hex(15, 64))
    } else {
        f.hex(15, 64)
    };
    let settled = if status == 3 {
        // Partially paid: about half of what was expected.
        (expected.parse::<u128>().unwrap_or(0) / 2).to_string()
    } else {
        settled
    };
    let paid_fields = [
        ("settlementAmount", json!(settled)),
        ("settlementCurrencySymbol", json!(symbol)),
        ("transferHash", json!(tx_hash)),
        ("fromAddress", json!(address(16))),
        ("blockTime", json!(f.paid)),
    ];
    match status {
        // Pending: the paid fields are absent.
        1 => {}
        // Confirming, paid, partially paid, refunded: present.
        0 | 2 | 3 | 5 => d.extend(paid_fields.map(|(k, v)| (k.to_owned(), v))),
        // Failed, unknown: present as null.
        _ => d.extend(paid_fields.map(|(k, _)| (k.to_owned(), Value::Null))),
    }
    Value::Object(d)
}

/// One row of the currency list.
struct Currency {
    chain_id: i64,
    name: &'static str,
    symbol: &'static str,
    address: &'static str,
    decimals: u32,
    exchange_rate: &'static str,
}

/// The currencies the mock knows: chain 1 is TRON, 2 is Ethereum, 3 is BSC (whose
/// USDT has 18 decimals, so joining on the symbol alone is wrong).
const CURRENCIES: [Currency; 5] = [
    Currency {
        chain_id: 1,
        name: "Tether USD",
        symbol: "USDT",
        address: "TR7NHqjeKQxGTCi8q8ZY4pL8otSzgjLj6t",
        decimals: 6,
        exchange_rate: "1.0000",
    },
    Currency {
        chain_id: 1,
        name: "TRON",
        symbol: "TRX",
        address: "",
        decimals: 6,
        exchange_rate: "0.1200",
    },
    Currency {
        chain_id: 2,
        name: "Ether",
        symbol: "ETH",
        address: "0x0000000000000000000000000000000000000000",
        decimals: 18,
        exchange_rate: "3500.0000",
    },
    Currency {
        chain_id: 2,
        name: "USD Coin",
        symbol: "USDC",
        address: "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
        decimals: 6,
        exchange_rate: "1.0000",
    },
    Currency {
        chain_id: 3,
        name: "Tether USD (BSC)",
        symbol: "USDT",
        address: "0x55d398326f99059fF775485246999027B3197955",
        decimals: 18,
        exchange_rate: "1.0000",
    },
];

impl Currency {
    fn to_json(&self, id: i64) -> Value {
        // An icon of a few hundred bytes, as the real list inlines images.
        let raw: Vec<u8> = (0..300u64)
            .map(|i| (super::scenario::mix(id as u64, i) & 0xff) as u8)
            .collect();
        let icon = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        );
        json!({
            "currencyId": id,
            "chainId": self.chain_id,
            "name": self.name,
            "symbol": self.symbol,
            "address": self.address,
            "decimals": self.decimals,
            "createTime": "2024-03-01 10:00:00",
            "icon": icon,
            "exchangeRate": self.exchange_rate,
        })
    }
}
