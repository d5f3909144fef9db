//! `paysync run` with the GenAuth provider: management-token auth, token expiry
//! mid-run, statusCode-429 bodies, a wrong secret, the payStatus mapping.

use std::time::{Duration, Instant};

use base64::Engine;
use paysync::mock::MockOptions;

use crate::util::*;

const SECRET: &str = paysync::mock::DEFAULT_ACCESS_KEY_SECRET;

/// A clean run: statuses mapped by the default payStatus table, unknown codes kept
/// raw as `unknown`, amounts exact, times converted from UTC+8, business errors in
/// 200 bodies turned into rows.
#[tokio::test(flavor = "multi_thread")]
async fn clean_genauth_run() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let mut orders = Vec::new();
    for m in [
        "PAID", "PENDING", "FAILED", "EXPIRED", "UNKNOWN", "NOTFOUND", "BIG", "BADREQ",
    ] {
        orders.extend(numbered(m, 2));
    }
    ws.write("orders.csv", &orders_csv(&orders));
    ws.genauth_config(&format!("{}/", server.genauth_base_url()), SECRET, "");
    let out = ws
        .run(&["--input", "orders.csv", "--max-wait", "30s"])
        .await;
    // BADREQ orders end in `error` rows: exit 1.
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    let latest = latest(&rows);
    let status = |o: &str| latest[o]["status"].as_str().unwrap().to_owned();
    assert_eq!(status("T-PAID-0000"), "paid");
    assert_eq!(status("T-PENDING-0000"), "paid");
    assert_eq!(status("T-FAILED-0000"), "cancelled");
    assert_eq!(status("T-EXPIRED-0000"), "expired");
    assert_eq!(status("T-UNKNOWN-0000"), "unknown");
    assert_eq!(latest["T-UNKNOWN-0000"]["provider_status"], "9");
    assert_eq!(status("T-NOTFOUND-0000"), "not_found");
    assert_eq!(status("T-BADREQ-0000"), "error");
    let e = latest["T-BADREQ-0000"]["error"].as_str().unwrap();
    assert!(e.contains("statusCode 400") && e.contains("apiCode"), "{e}");
    assert_eq!(latest["T-BIG-0000"]["amount"], "123456789012345678.9");
    let paid = &latest["T-PAID-0000"];
    assert_eq!(paid["provider"], "genauth");
    assert!(paid["payment_no"].is_string() && paid["payment_method"].is_string());
    assert!(paid["paid_account"].is_string());
    assert!(paid["paid_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(paid["quote_amount"], serde_json::Value::Null);
    let c = server.counters().snapshot();
    assert_eq!(c.genauth_token_requests, 1, "{c:?}");
    assert_eq!(c.unauthorized, 0);
}

/// The mock's user-pool claim needs base64url (its payload encodes with `-` and
/// `_`), and runs work with it: the claim is decoded and sent back correctly.
#[test]
fn mock_jwt_payload_needs_base64url() {
    let payload = format!(
        "{{\"scoped_userpool_id\":\"{}\"}}",
        paysync::mock::DEFAULT_USERPOOL_ID
    );
    let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
    assert!(enc.contains('-') || enc.contains('_'), "{enc}");
}

/// Tokens that expire every 2 seconds during a longer run: no order fails, and
/// paysync asks for at most one token per expiry.
#[tokio::test(flavor = "multi_thread")]
async fn token_expiring_mid_run_is_refreshed_once_per_expiry() {
    let server = mock(MockOptions {
        genauth_expires_in: 2,
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    let orders = numbered("PAID", 120);
    ws.write("orders.csv", &orders_csv(&orders));
    ws.genauth_config(
        &server.genauth_base_url(),
        SECRET,
        "[fetch]\nrate_limit = 20.0\nburst = 1\nconcurrency = 16\n",
    );
    let started = Instant::now();
    let out = ws.run(&["--input", "orders.csv"]).await;
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let latest = latest(&ws.rows());
    assert_eq!(latest.len(), 120);
    assert!(latest.values().all(|r| r["status"] == "paid"));
    let c = server.counters().snapshot();
    // A token lives 2 s and is renewed 0.2 s early: one request per 1.8 s at most.
    let max_tokens = (elapsed.as_secs_f64() / 1.8).ceil() as u64 + 1;
    assert!(c.genauth_token_requests >= 3, "{c:?} in {elapsed:?}");
    assert!(
        c.genauth_token_requests <= max_tokens,
        "{c:?} in {elapsed:?}"
    );
}

/// statusCode 429 inside HTTP 200 bodies pauses and retries: no order fails.
#[tokio::test(flavor = "multi_thread")]
async fn throttling_in_body_is_retried() {
    let server = mock(MockOptions {
        rate_limit: Some(20.0),
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 40)));
    ws.genauth_config(
        &server.genauth_base_url(),
        SECRET,
        "[fetch]\nrate_limit = 100.0\nburst = 20\nmax_attempts = 10\nbackoff_base = \"200ms\"\nbackoff_max = \"2s\"\n",
    );
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(latest(&ws.rows()).values().all(|r| r["status"] == "paid"));
    assert!(server.counters().snapshot().throttled > 0);
}

/// A wrong access key secret: exit 3 after a token request or two, no detail
/// requests, the secret never printed.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_genauth_secret_exits_3() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 50)));
    let wrong = "not-the-secret-987654";
    ws.genauth_config(&server.genauth_base_url(), wrong, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let c = server.counters().snapshot();
    assert!(c.total_requests < 5, "{c:?}");
    assert_eq!(c.genauth_detail_requests, 0);
    for text in [stdout(&out), stderr(&out)] {
        assert!(!text.contains(wrong));
    }
}

/// The Authing brand sends x-authing-* headers, which the mock accepts too.
#[tokio::test(flavor = "multi_thread")]
async fn authing_brand_works() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 3)));
    ws.genauth_config(
        &server.genauth_base_url(),
        SECRET,
        "[provider]\nbrand = \"authing\"\nlang = \"en-US\"\n",
    );
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(latest(&ws.rows()).len(), 3);
}

/// `paysync demo --provider genauth` works without configuration.
#[tokio::test(flavor = "multi_thread")]
async fn genauth_demo() {
    let ws = Workspace::new();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        ws.paysync(&[
            "demo",
            "--provider",
            "genauth",
            "--orders",
            "30",
            "--dir",
            "demo",
        ]),
    )
    .await
    .expect("demo finishes");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = committed_rows(&ws.path("demo/out"));
    assert!(rows.iter().all(|r| r["provider"] == "genauth"));
    assert!(latest(&rows).len() >= 30);
}
