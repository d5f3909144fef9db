//! Hardening (issue 7): the fault matrix on both providers, bad input and config,
//! local faults (unwritable or full output, newer state schema), secrets, TLS and
//! file modes. Each test drives the real binary against the real mock server.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use paysync::mock::{CountersSnapshot, FaultKind, MockOptions, MockServer, RetryAfterMode};
use serde_json::Value;

use crate::util::*;

const PP_SECRET: &str = paysync::mock::DEFAULT_API_SECRET;
const GA_SECRET: &str = paysync::mock::DEFAULT_ACCESS_KEY_SECRET;

/// The two providers, so one test body covers both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prov {
    PayProtocol,
    GenAuth,
}

const BOTH: [Prov; 2] = [Prov::PayProtocol, Prov::GenAuth];

impl Prov {
    /// Writes the workspace config for this provider against `server`.
    fn config(self, ws: &Workspace, server: &MockServer, overrides: &str) {
        match self {
            Prov::PayProtocol => ws.config(&server.payprotocol_base_url(), PP_SECRET, overrides),
            Prov::GenAuth => ws.genauth_config(&server.genauth_base_url(), GA_SECRET, overrides),
        };
    }

    /// Detail requests the server received for this provider.
    fn detail_requests(self, c: &CountersSnapshot) -> u64 {
        match self {
            Prov::PayProtocol => c.payprotocol_detail_requests,
            Prov::GenAuth => c.genauth_detail_requests,
        }
    }
}

/// A mock whose every order fails its first `faults` detail attempts with `kind`.
async fn faulty_mock(kind: FaultKind, faults: u32, retry_after: RetryAfterMode) -> MockServer {
    mock(MockOptions {
        fault_share: 1.0,
        fault_kinds: vec![kind],
        max_consecutive_faults: faults,
        retry_after,
        // Far longer than the client timeout below: only a timeout ends the wait.
        slow_delay: Duration::from_secs(60),
        ..MockOptions::default()
    })
    .await
}

/// Client settings for the fault matrix: the `slow` kind needs a short timeout, the
/// others keep the generous default so a loaded machine never adds a timeout.
fn fault_overrides(kind: FaultKind, max_attempts: u32) -> String {
    let timeout = if kind == FaultKind::Slow {
        "1500ms"
    } else {
        "10s"
    };
    format!("[fetch]\nmax_attempts = {max_attempts}\ntimeout = \"{timeout}\"\nmax_body = 1048576\n")
}

/// Every fault kind, on both providers, failing each order's first two attempts:
/// every order ends `paid` with `polls` = 3, and the server saw exactly three
/// detail requests per order (the retry budget, no storm). The two oversized kinds
/// (with and without `Content-Length`) are cut off at `fetch.max_body`.
#[tokio::test(flavor = "multi_thread")]
async fn every_fault_kind_is_retried_within_budget_on_both_providers() {
    let orders = numbered("PAID", 4);
    for prov in BOTH {
        for kind in FaultKind::ALL {
            let server = faulty_mock(kind, 2, RetryAfterMode::Seconds).await;
            let ws = Workspace::new();
            ws.write("orders.csv", &orders_csv(&orders));
            prov.config(&ws, &server, &fault_overrides(kind, 4));
            let out = ws.run(&["--input", "orders.csv"]).await;
            assert_eq!(
                out.status.code(),
                Some(0),
                "{prov:?} {kind}: {}",
                stderr(&out)
            );
            let rows = ws.rows();
            assert_no_duplicates(&rows);
            let latest = latest(&rows);
            assert_eq!(latest.len(), orders.len(), "{prov:?} {kind}");
            for (o, r) in &latest {
                assert_eq!(r["status"], "paid", "{prov:?} {kind} {o}: {r}");
                assert_eq!(r["polls"], 3, "{prov:?} {kind} {o}: {r}");
            }
            let c = server.counters().snapshot();
            assert_eq!(
                c.faults_injected,
                2 * orders.len() as u64,
                "{prov:?} {kind} {c:?}"
            );
            assert_eq!(
                prov.detail_requests(&c),
                3 * orders.len() as u64,
                "{prov:?} {kind} {c:?}"
            );
            if prov == Prov::GenAuth {
                assert_eq!(c.genauth_token_requests, 1, "{kind} {c:?}");
            }
        }
    }
}

/// The substring an `error` row's reason must hold for each fault kind.
fn reason_of(kind: FaultKind) -> &'static [&'static str] {
    match kind {
        FaultKind::Status500 => &["500"],
        FaultKind::Status502 => &["502"],
        FaultKind::Status503 => &["503"],
        FaultKind::Html502 => &["502"],
        FaultKind::Malformed => &["malformed"],
        FaultKind::Reset => &["transport error"],
        FaultKind::Slow => &["timed out"],
        FaultKind::TooLarge | FaultKind::LargeChunked => &["larger than 1048576 bytes"],
        FaultKind::Throttle429 => &["throttled", "429"],
    }
}

/// Every fault kind, on both providers, outlasting `fetch.max_attempts = 3`: each
/// order gets an `error` row (still `polling`) whose reason names the failure and
/// the attempts, the run exits 1, and exactly three requests per order were spent.
#[tokio::test(flavor = "multi_thread")]
async fn every_fault_kind_ends_in_a_clear_error_row_after_max_attempts() {
    let orders = numbered("PAID", 3);
    for prov in BOTH {
        for kind in FaultKind::ALL {
            let server = faulty_mock(kind, 1000, RetryAfterMode::Zero).await;
            let ws = Workspace::new();
            ws.write("orders.csv", &orders_csv(&orders));
            prov.config(&ws, &server, &fault_overrides(kind, 3));
            let out = ws.run(&["--input", "orders.csv"]).await;
            assert_eq!(
                out.status.code(),
                Some(1),
                "{prov:?} {kind}: {}",
                stderr(&out)
            );
            let latest = latest(&ws.rows());
            assert_eq!(latest.len(), orders.len(), "{prov:?} {kind}");
            for (o, r) in &latest {
                assert_eq!(r["status"], "error", "{prov:?} {kind} {o}: {r}");
                assert_eq!(r["tracking"], "polling", "{prov:?} {kind} {o}: {r}");
                assert_eq!(r["polls"], 3, "{prov:?} {kind} {o}: {r}");
                let e = r["error"].as_str().unwrap();
                assert!(e.contains("after 3 attempts"), "{prov:?} {kind}: {e}");
                assert!(
                    reason_of(kind).iter().all(|s| e.contains(s)),
                    "{prov:?} {kind}: {e}"
                );
            }
            let c = server.counters().snapshot();
            assert_eq!(
                prov.detail_requests(&c),
                3 * orders.len() as u64,
                "{prov:?} {kind} {c:?}"
            );
        }
    }
}

/// A throttling fault with `Retry-After` in seconds, as an HTTP date, as `0` and
/// absent, on both providers (GenAuth throttles inside a 200 body): every order
/// ends paid, with exactly one extra request per throttled answer.
#[tokio::test(flavor = "multi_thread")]
async fn throttling_in_every_retry_after_form_is_retried_once_per_answer() {
    let orders = numbered("PAID", 6);
    for prov in BOTH {
        for mode in [
            RetryAfterMode::Seconds,
            RetryAfterMode::HttpDate,
            RetryAfterMode::Zero,
            RetryAfterMode::Absent,
        ] {
            let server = faulty_mock(FaultKind::Throttle429, 1, mode).await;
            let ws = Workspace::new();
            ws.write("orders.csv", &orders_csv(&orders));
            prov.config(
                &ws,
                &server,
                "[fetch]\nbackoff_base = \"100ms\"\nbackoff_max = \"1s\"\n",
            );
            let out = ws.run(&["--input", "orders.csv"]).await;
            assert_eq!(
                out.status.code(),
                Some(0),
                "{prov:?} {mode:?}: {}",
                stderr(&out)
            );
            let latest = latest(&ws.rows());
            assert!(
                latest
                    .values()
                    .all(|r| r["status"] == "paid" && r["polls"] == 2),
                "{prov:?} {mode:?}: {latest:?}"
            );
            let c = server.counters().snapshot();
            assert_eq!(c.throttled, orders.len() as u64, "{prov:?} {mode:?} {c:?}");
            assert_eq!(
                prov.detail_requests(&c),
                2 * orders.len() as u64,
                "{prov:?} {mode:?} {c:?}"
            );
        }
    }
}

/// A server enforcing its own rate limit with `Retry-After: 0` (core.rs covers the
/// other forms for PayProtocol), on both providers: the client still waits at least
/// `backoff_base` after each 429, so throttling stays bounded and every order ends
/// paid.
#[tokio::test(flavor = "multi_thread")]
async fn server_rate_limit_with_retry_after_zero_causes_no_storm() {
    let orders = numbered("PAID", 40);
    for prov in BOTH {
        let server = mock(MockOptions {
            rate_limit: Some(20.0),
            retry_after: RetryAfterMode::Zero,
            ..MockOptions::default()
        })
        .await;
        let ws = Workspace::new();
        ws.write("orders.csv", &orders_csv(&orders));
        prov.config(
            &ws,
            &server,
            "[fetch]\nrate_limit = 100.0\nburst = 20\nconcurrency = 16\nmax_attempts = 10\nbackoff_base = \"200ms\"\nbackoff_max = \"2s\"\n",
        );
        let out = ws.run(&["--input", "orders.csv"]).await;
        assert_eq!(out.status.code(), Some(0), "{prov:?}: {}", stderr(&out));
        let latest = latest(&ws.rows());
        assert_eq!(latest.len(), orders.len());
        assert!(latest.values().all(|r| r["status"] == "paid"), "{prov:?}");
        let c = server.counters().snapshot();
        assert!(c.throttled > 0, "{prov:?} {c:?}");
        assert!(
            c.throttled < 2 * orders.len() as u64,
            "{prov:?}: storm {c:?}"
        );
        // Every request beyond one per order was answered 429.
        assert_eq!(
            prov.detail_requests(&c),
            orders.len() as u64 + c.throttled - c.genauth_token_requests.saturating_sub(1),
            "{prov:?} {c:?}"
        );
    }
}

/// PayProtocol refuses requests whose timestamp is more than 60 s from its clock.
/// Within that skew runs work; beyond it the run stops at once with exit 3 and a
/// message that says the timestamp was refused (no retry storm: the currency list
/// is the only call made).
#[tokio::test(flavor = "multi_thread")]
async fn payprotocol_clock_skew_is_tolerated_then_reported_clearly() {
    let orders = numbered("PAID", 5);

    let server = mock(MockOptions::default()).await;
    server.advance_clock(Duration::from_secs(45));
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&orders));
    Prov::PayProtocol.config(&ws, &server, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(latest(&ws.rows()).len(), orders.len());

    let server = mock(MockOptions::default()).await;
    server.advance_clock(Duration::from_secs(600));
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&orders));
    Prov::PayProtocol.config(&ws, &server, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // The summary names the refusal and the server's reason.
    let summary = stdout(&out);
    assert!(
        summary.contains("authentication rejected") && summary.contains("timestamp expired"),
        "{summary}"
    );
    let c = server.counters().snapshot();
    assert!(c.total_requests <= 2, "{c:?}");
    assert_eq!(c.payprotocol_detail_requests, 0, "{c:?}");
}
