//! Hardening (issue 7): the fault matrix on both providers, bad input and config,
//! local faults (unwritable or full output, newer state schema), secrets, TLS and
//! file modes. Each test drives the real binary against the real mock server.

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
    let timeout = if kind == FaultKind::Slow { "3s" } else { "10s" };
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
        // Apart from the 429s, one request per order and one setup call (the
        // currency list or the token).
        assert_eq!(
            c.total_requests - c.throttled,
            orders.len() as u64 + 1,
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

// ---------------------------------------------------------------------------
// 2. Bad input and config
// ---------------------------------------------------------------------------

/// Order numbers with characters that mean something in a URL (`../`, `&`, `=`,
/// `?`, `#`, `%`, `+`, `/`, `;`, quotes, `<>`, non-ASCII): the server receives
/// exactly these numbers (it decodes the query and counts one poll each), the
/// PayProtocol signature over the encoded target verifies (no 401), and the rows
/// carry the numbers unchanged. Both providers, CSV and queue input.
#[tokio::test(flavor = "multi_thread")]
async fn url_special_order_numbers_are_encoded_and_signed() {
    let orders: Vec<String> = [
        "T-PAID-../../etc/passwd",
        "T-PAID-a&outTradeNo=evil",
        "T-PAID-a=b",
        "T-PAID-what?x#frag",
        "T-PAID-100%25%",
        "T-PAID-a+b",
        "T-PAID-a/b;c",
        "T-PAID-\"quoted\"",
        "T-PAID-<x>",
        "T-PAID-订单-ü",
        "T-PAID-%2e%2e%2f",
    ]
    .map(String::from)
    .to_vec();
    for prov in BOTH {
        for queue in [false, true] {
            let server = mock(MockOptions::default()).await;
            let ws = Workspace::new();
            let input = if queue {
                ws.write("orders.txt", &(orders.join("\n") + "\n"));
                "orders.txt"
            } else {
                let mut w = csv::Writer::from_writer(Vec::new());
                w.write_record(["order_no", "customer"]).unwrap();
                for o in &orders {
                    w.write_record([o.as_str(), "c"]).unwrap();
                }
                ws.write(
                    "orders.csv",
                    &String::from_utf8(w.into_inner().unwrap()).unwrap(),
                );
                "orders.csv"
            };
            prov.config(&ws, &server, "");
            let out = ws.run(&["--input", input]).await;
            assert_eq!(
                out.status.code(),
                Some(0),
                "{prov:?} {input}: {}",
                stderr(&out)
            );
            let latest = latest(&ws.rows());
            let mut want = orders.clone();
            want.sort();
            assert_eq!(latest.keys().cloned().collect::<Vec<_>>(), want, "{prov:?}");
            for o in &orders {
                assert_eq!(latest[o]["status"], "paid", "{prov:?} {o}");
                assert_eq!(server.polls_of(o), 1, "{prov:?} {input}: server saw {o:?}");
            }
            let c = server.counters().snapshot();
            assert_eq!(c.unauthorized, 0, "{prov:?} {c:?}");
            assert_eq!(prov.detail_requests(&c), orders.len() as u64, "{prov:?}");
        }
    }
}

/// Bytes that are not UTF-8, a 10 KB field, a 10 KB order number, a header-only
/// CSV, an empty file and a file of blank lines: good rows are fetched (the 10 KB
/// field passes through intact), bad ones go to the rejects file with their line
/// and reason, empty files are a warning naming the file, and nothing panics.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_csv_bytes_are_rejected_per_row() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let big_field = "x".repeat(10 * 1024);
    let big_order = format!("T-PAID-{}", "9".repeat(10 * 1024));
    let mut csv: Vec<u8> = b"\xef\xbb\xbforder_no,note\r\n".to_vec();
    csv.extend_from_slice(format!("T-PAID-1,{big_field}\r\n").as_bytes()); // line 2
    csv.extend_from_slice(b"T-PAID-\xff\xfe2,latin\r\n"); // line 3
    csv.extend_from_slice(format!("{big_order},big\r\n").as_bytes()); // line 4
    csv.extend_from_slice(b"T-PAID-3,caf\xe9\r\n"); // line 5
    csv.extend_from_slice(b"\r\n\r\n"); // lines 6, 7
    csv.extend_from_slice(b"T-PAID-4,\"multi\nline\"\n"); // lines 8-9
    csv.extend_from_slice(b"T-PAID-5,last-without-newline");
    std::fs::write(ws.path("orders.csv"), &csv).unwrap();
    ws.write("header-only.csv", "order_no,note\n");
    ws.write("empty.csv", "");
    ws.write("blank.txt", "\n\n   \n");
    Prov::PayProtocol.config(&ws, &server, "");
    let out = ws
        .run(&[
            "--input",
            "orders.csv",
            "--input",
            "header-only.csv",
            "--input",
            "empty.csv",
            "--input",
            "blank.txt",
        ])
        .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("empty.csv"), "the empty file is named: {err}");
    let latest = latest(&ws.rows());
    assert_eq!(
        latest.keys().collect::<Vec<_>>(),
        ["T-PAID-1", "T-PAID-4", "T-PAID-5"],
        "{latest:?}"
    );
    assert_eq!(latest["T-PAID-1"]["input"]["note"], big_field.as_str());
    assert_eq!(latest["T-PAID-4"]["input"]["note"], "multi\nline");
    assert_eq!(server.counters().snapshot().payprotocol_detail_requests, 3);

    let rejects = read_rejects(&ws);
    let lines: Vec<u64> = rejects.iter().map(|r| r.1).collect();
    assert_eq!(lines, [3, 4, 5], "{rejects:?}");
    assert!(
        rejects.iter().all(|r| r.0.ends_with("orders.csv")),
        "{rejects:?}"
    );
    assert!(rejects[0].2.contains("UTF-8"), "{rejects:?}");
    assert!(rejects[1].2.contains("128"), "{rejects:?}");
    assert!(rejects[2].2.contains("UTF-8"), "{rejects:?}");
}

/// The rejects file's records as (source, line, reason), sorted by line.
fn read_rejects(ws: &Workspace) -> Vec<(String, u64, String)> {
    let name = ws
        .out_files()
        .into_iter()
        .find(|f| f.starts_with("rejects-"))
        .expect("a rejects file");
    let mut rdr = csv::Reader::from_path(ws.path("out").join(name)).unwrap();
    let mut recs: Vec<(String, u64, String)> = rdr
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].to_owned(), r[1].parse().unwrap(), r[2].to_owned())
        })
        .collect();
    recs.sort_by_key(|r| r.1);
    recs
}

/// Asserts a usage error: exit 2, every `needles` in stderr, no panic.
fn assert_usage_error(out: &Output, needles: &[&str], what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: {n:?} not in {err}");
    }
}

/// A directory given as input, as CSV or queue file, is exit 2 naming it, before
/// any request; the results of an earlier run stay as they were.
#[tokio::test(flavor = "multi_thread")]
async fn directory_as_input_is_a_usage_error_and_loses_nothing() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 5)));
    Prov::PayProtocol.config(&ws, &server, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let before = ws.rows();
    let requests = server.counters().snapshot().total_requests;

    std::fs::create_dir(ws.path("indir.csv")).unwrap();
    std::fs::create_dir(ws.path("queue-dir")).unwrap();
    for bad in ["indir.csv", "queue-dir"] {
        let out = ws.run(&["--input", "orders.csv", "--input", bad]).await;
        assert_usage_error(&out, &[bad], bad);
    }
    assert_eq!(server.counters().snapshot().total_requests, requests);
    assert_eq!(ws.rows(), before);
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(ws.rows(), before, "nothing refetched, nothing lost");
}

/// Config mistakes, each refused by `validate` and by `run` with exit 2 and a
/// message naming the file and the key, before any request and without touching
/// what an earlier run fetched.
#[tokio::test(flavor = "multi_thread")]
async fn config_mistakes_name_the_file_and_key() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 5)));
    let base = server.payprotocol_base_url();
    ws.config(&base, PP_SECRET, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let before = ws.rows();
    let requests = server.counters().snapshot().total_requests;

    // (overrides merged over a good config, keys the message must name)
    let merged: &[(&str, &[&str])] = &[
        ("[fetch]\nconcurrency = \"many\"\n", &["concurrency"]),
        ("[fetch]\nconcurrency = 0\n", &["fetch.concurrency"]),
        ("[fetch]\nrate_limit = 0.0\n", &["fetch.rate_limit"]),
        ("[fetch]\nrate_limit = -0.5\n", &["fetch.rate_limit"]),
        ("[fetch]\nburst = 0\n", &["fetch.burst"]),
        ("[fetch]\nmax_attempts = 0\n", &["fetch.max_attempts"]),
        ("[fetch]\ntimeout = \"soon\"\n", &["timeout", "soon"]),
        ("[fetch]\ntimeout = 10\n", &["timeout"]),
        ("[settle]\npoll_interval = \"-5s\"\n", &["poll_interval"]),
        (
            "[settle]\nbackoff_factor = -1.0\n",
            &["settle.backoff_factor"],
        ),
        ("[provider]\nkind = \"stripe\"\n", &["kind", "stripe"]),
        ("[output]\nformat = \"xml\"\n", &["format", "xml"]),
        ("[outptu]\ndir = \"x\"\n", &["outptu"]),
        ("[fetch]\nretries = 3\n", &["retries"]),
        (
            "[schedule]\ningest = \"every minute\"\n",
            &["schedule.ingest"],
        ),
    ];
    for (overrides, keys) in merged {
        ws.config(&base, PP_SECRET, overrides);
        let mut needles = vec!["config.toml"];
        needles.extend_from_slice(keys);
        let out = ws.paysync(&["validate", "--config", "config.toml"]).await;
        assert_usage_error(&out, &needles, overrides);
        let out = ws.run(&["--input", "orders.csv"]).await;
        assert_usage_error(&out, &needles, overrides);
    }

    // Whole files: syntax errors, missing secrets, missing required keys.
    let provider = |extra: &str| {
        format!(
            "[provider]\nkind = \"payprotocol\"\nbase_url = \"{base}\"\napi_key = \"k\"\n{extra}[state]\npath = \"state.db\"\n[output]\ndir = \"out\"\n"
        )
    };
    let raw: Vec<(String, Vec<&str>)> = vec![
        ("[fetch\nconcurrency = 3\n".into(), vec!["line 1"]),
        (
            provider("api_secret_env = \"PAYSYNC_HARDENING_UNSET_VAR\"\n"),
            vec!["provider.api_secret_env", "PAYSYNC_HARDENING_UNSET_VAR"],
        ),
        (
            provider("api_secret_file = \"no-such-secret\"\n"),
            vec!["provider.api_secret_file", "no-such-secret"],
        ),
        (provider(""), vec!["api_secret"]),
        (
            format!(
                "[provider]\nkind = \"genauth\"\nbase_url = \"{base}\"\naccess_key_secret_file = \"secret\"\n"
            ),
            vec!["provider.access_key_id"],
        ),
        (
            provider("api_secret_file = \"secret\"\n").replace(&base, "not a url"),
            vec!["provider.base_url"],
        ),
    ];
    for (text, keys) in &raw {
        ws.write("config.toml", text);
        let mut needles = vec!["config.toml"];
        needles.extend_from_slice(keys);
        let out = ws
            .command(&["validate", "--config", "config.toml"])
            .env_remove("PAYSYNC_HARDENING_UNSET_VAR")
            .output()
            .await
            .unwrap();
        assert_usage_error(&out, &needles, text);
        let out = ws
            .run_command(&["--input", "orders.csv"])
            .env_remove("PAYSYNC_HARDENING_UNSET_VAR")
            .output()
            .await
            .unwrap();
        assert_usage_error(&out, &needles, text);
    }
    assert_eq!(server.counters().snapshot().total_requests, requests);
    assert_eq!(ws.rows(), before);
}

// ---------------------------------------------------------------------------
// 3. Local faults
// ---------------------------------------------------------------------------

/// `paysync status --json` of the workspace.
async fn status_json(ws: &Workspace) -> Value {
    let out = ws
        .paysync(&["status", "--config", "config.toml", "--json"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Data files in `out` that have no manifest, and temporary files.
fn unmanifested(ws: &Workspace) -> Vec<String> {
    let files = ws.out_files();
    files
        .iter()
        .filter(|f| {
            f.ends_with(".tmp")
                || (f.starts_with("paysync-")
                    && !f.ends_with(".manifest.json")
                    && !files.iter().any(|m| {
                        m.ends_with(".manifest.json")
                            && f.starts_with(m.trim_end_matches(".manifest.json"))
                    }))
        })
        .cloned()
        .collect()
}

/// After a failed export and a repaired rerun: every order exactly once, no new
/// provider requests, nothing unexported, no stray files.
async fn assert_rerun_writes_everything(
    ws: &Workspace,
    server: &MockServer,
    orders: &[String],
    requests_before: u64,
) {
    let out = ws.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    assert_eq!(rows.len(), orders.len(), "one row per order, exactly once");
    let latest = latest(&rows);
    assert!(orders.iter().all(|o| latest[o]["status"] == "paid"));
    assert_eq!(
        server.counters().snapshot().payprotocol_detail_requests,
        requests_before,
        "the rerun only wrote; it fetched nothing again"
    );
    assert_eq!(status_json(ws).await["unexported_rows"], 0);
    assert!(unmanifested(ws).is_empty(), "{:?}", ws.out_files());
}

/// The output directory cannot be written (its path is a regular file; tests run
/// as root, which ignores permission bits, so a mode-0 directory would prove
/// nothing). At start: exit 4 naming the path before any request. After fetching
/// (the directory is replaced by a file while orders are polled): exit 4, the
/// state keeps every row as not exported, and a rerun once the directory is usable
/// writes each row exactly once without fetching again.
#[tokio::test(flavor = "multi_thread")]
async fn unwritable_output_fails_clearly_and_a_rerun_writes_the_rows() {
    let server = mock(MockOptions {
        pending_polls: 10,
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    let orders = numbered("PENDING", 20);
    ws.write("orders.csv", &orders_csv(&orders));
    Prov::PayProtocol.config(
        &ws,
        &server,
        "[settle]\npoll_interval = \"300ms\"\nconfirming_interval = \"300ms\"\n",
    );

    ws.write("out", "not a directory\n");
    let out = ws
        .run(&["--input", "orders.csv", "--max-wait", "60s"])
        .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    // Paths in messages are as configured (relative to the config file here).
    assert!(err.contains("cannot create output directory out"), "{err}");
    assert!(err.contains("exists and is not a directory"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(server.counters().snapshot().total_requests, 0);
    std::fs::remove_file(ws.path("out")).unwrap();

    let child = ws
        .run_command(&[])
        .args(["--input", "orders.csv", "--max-wait", "60s"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let counters = server.counters();
    wait_for("every order's first poll", || {
        counters.snapshot().payprotocol_detail_requests >= orders.len() as u64
    })
    .await;
    // The orders need 10 more polls 300 ms apart before the export: time enough.
    std::fs::remove_dir(ws.path("out")).unwrap();
    ws.write("out", "not a directory\n");
    let out = child.wait_with_output().await.unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("output directory out"), "{err}");
    let requests = counters.snapshot().payprotocol_detail_requests;
    // pending, confirming, paid: three rows per order, none exported.
    assert_eq!(status_json(&ws).await["unexported_rows"], 3 * orders.len());

    std::fs::remove_file(ws.path("out")).unwrap();
    let out = ws.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    assert_eq!(rows.len(), 3 * orders.len(), "every row exactly once");
    assert!(latest(&rows).values().all(|r| r["status"] == "paid"));
    assert_eq!(counters.snapshot().payprotocol_detail_requests, requests);
    assert_eq!(status_json(&ws).await["unexported_rows"], 0);
    assert!(unmanifested(&ws).is_empty(), "{:?}", ws.out_files());
}

/// A tmpfs mounted over a workspace directory; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`, or says why it cannot.
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A full disk (ENOSPC from a 64 KiB tmpfs as the output directory, with about
/// 500 KB of rows to write): the run exits 4 with "No space left on device" and
/// the file it was writing, leaves no partial file visible, keeps the rows
/// unexported in the state, and a rerun with room writes each exactly once.
/// Mounting needs CAP_SYS_ADMIN; without it this test prints why and returns
/// (`unwritable_output_fails_clearly_and_a_rerun_writes_the_rows` still runs).
#[tokio::test(flavor = "multi_thread")]
async fn full_disk_fails_clearly_and_a_rerun_writes_the_rows() {
    let ws = Workspace::new();
    let fs = match Tmpfs::mount(&ws.path("out"), "64k") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED full_disk_fails_clearly...: cannot mount a tmpfs: {why}");
            return;
        }
    };
    let server = mock(MockOptions::default()).await;
    let orders = numbered("PAID", 300);
    let mut csv = String::from("order_no,blob\n");
    for o in &orders {
        csv.push_str(&format!("{o},{}\n", "b".repeat(1000)));
    }
    ws.write("orders.csv", &csv);
    Prov::PayProtocol.config(&ws, &server, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("cannot write output file out/.paysync-") && err.contains(".jsonl.tmp"),
        "{err}"
    );
    assert!(unmanifested(&ws).is_empty(), "{:?}", ws.out_files());
    assert!(ws.rows().is_empty());
    let requests = server.counters().snapshot().payprotocol_detail_requests;
    assert_eq!(requests, 300);
    assert_eq!(status_json(&ws).await["unexported_rows"], 300);

    fs.resize("16m");
    assert_rerun_writes_everything(&ws, &server, &orders, requests).await;
}

/// A state file from a newer paysync (a higher schema version) is refused by
/// `run`, `daemon` and `status` with a message naming the file and the versions
/// (exit 4), and is left exactly as it was.
#[tokio::test(flavor = "multi_thread")]
async fn newer_state_schema_is_refused_clearly() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 3)));
    Prov::PayProtocol.config(&ws, &server, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let newer = paysync::state::SCHEMA_VERSION + 1;
    let db = ws.path("state.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", newer).unwrap();
    }
    let requests = server.counters().snapshot().total_requests;
    for args in [
        RUN_ORDERS_CSV,
        &["daemon", "--config", "config.toml"],
        &["status", "--config", "config.toml"],
    ] {
        let out = tokio::time::timeout(Duration::from_secs(60), ws.paysync(args))
            .await
            .expect("refused at once");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
        assert!(
            err.contains("state file state.db")
                && err.contains(&format!("schema version {newer}"))
                && err.contains("newer"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(server.counters().snapshot().total_requests, requests);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, newer);
}

// ---------------------------------------------------------------------------
// 4. Secrets, TLS, file modes
// ---------------------------------------------------------------------------

const PP_TEST_SECRET: &str = "pp-sEcReT-4b1d7e0c9a2f";
const GA_TEST_SECRET: &str = "ga-sEcReT-93fa27d1c6e0";
const WRONG_SECRET: &str = "wrong-sEcReT-5e8c17b2d4";

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.extend(files_under(&p));
        } else {
            all.push(p);
        }
    }
    all
}

/// Where each needle occurs in `haystack` (by name), for the failure message.
fn hits(name: &str, haystack: &[u8], needles: &[String], found: &mut Vec<String>) {
    for n in needles {
        if haystack.windows(n.len()).any(|w| w == n.as_bytes()) {
            found.push(format!("{n:?} in {name}"));
        }
    }
}

/// Every command at the most verbose log level (`--log-level trace`, also
/// `RUST_LOG=trace`, text and JSON lines), both providers, success and error paths
/// (faults, business errors, rejects, a wrong secret, an expired token refreshed):
/// the API secret, the access key secret, the wrong secret and every GenAuth token
/// the server issued appear in no stdout, no stderr, and no file paysync wrote
/// (output, manifests, rejects, state database and its WAL). Only the secret files
/// themselves hold them.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_or_token_appears_anywhere_at_trace_level() {
    let opts = MockOptions {
        payprotocol_api_secret: PP_TEST_SECRET.into(),
        genauth_access_key_secret: GA_TEST_SECRET.into(),
        fault_share: 0.3,
        fault_kinds: vec![
            FaultKind::Status500,
            FaultKind::Malformed,
            FaultKind::Html502,
            FaultKind::Throttle429,
        ],
        retry_after: RetryAfterMode::Zero,
        ..MockOptions::default()
    };
    let mut tokens = Vec::new();
    let mut orders = Vec::new();
    for m in ["PAID", "PENDING", "NOTFOUND", "BADREQ", "FAILED"] {
        orders.extend(numbered(m, 3));
    }
    let mut csv = orders_csv(&orders);
    csv.push_str("T PAID bad,rejected\n");

    let mut streams: Vec<(String, Vec<u8>)> = Vec::new();
    let mut workspaces = Vec::new();
    let trace = ["--log-level", "trace"];
    for prov in BOTH {
        let server = mock(opts.clone()).await;
        for json in [false, true] {
            let ws = Workspace::new();
            ws.write("orders.csv", &csv);
            let daemon = "[input]\nqueue_files = [\"queue.txt\"]\n[schedule]\ningest = \"* * * * * *\"\nexport = \"* * * * * *\"\n";
            ws.write("queue.txt", "T-PAID-q1\nT-NEVER-q2\n");
            match prov {
                Prov::PayProtocol => {
                    ws.config(&server.payprotocol_base_url(), PP_TEST_SECRET, daemon)
                }
                Prov::GenAuth => {
                    ws.genauth_config(&server.genauth_base_url(), GA_TEST_SECRET, daemon)
                }
            };
            let format = if json { "json" } else { "text" };
            let mut record = |what: &str, out: &Output| {
                streams.push((
                    format!("{prov:?}/{format} {what} stdout"),
                    out.stdout.clone(),
                ));
                streams.push((
                    format!("{prov:?}/{format} {what} stderr"),
                    out.stderr.clone(),
                ));
            };
            let cmd = |args: &[&str]| {
                let mut c = ws.command(args);
                c.args(trace)
                    .args(["--log-format", format])
                    .env("RUST_LOG", "trace");
                c
            };

            let out = cmd(&["validate", "--config", "config.toml"])
                .output()
                .await
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            record("validate", &out);
            let out = cmd(&["run", "--config", "config.toml", "--no-progress"])
                .args(["--input", "orders.csv", "--max-wait", "3s"])
                .output()
                .await
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(1),
                "BADREQ errors: {}",
                stderr(&out)
            );
            record("run", &out);
            for args in [
                &["status", "--config", "config.toml"][..],
                &["status", "--config", "config.toml", "--json"],
            ] {
                let out = cmd(args).output().await.unwrap();
                assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
                record(args.join(" ").as_str(), &out);
            }
            let child = cmd(&["daemon", "--config", "config.toml"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            wait_for("the daemon to poll the queue", || {
                server.polls_of("T-PAID-q1") > 0
            })
            .await;
            if prov == Prov::GenAuth {
                // The daemon's token expires: it is refused, then refreshed.
                server.advance_clock(Duration::from_secs(3 * 3600));
            }
            let polls = server.polls_of("T-NEVER-q2");
            wait_for("more polls", || server.polls_of("T-NEVER-q2") > polls + 1).await;
            sigterm(&child);
            let out = child.wait_with_output().await.unwrap();
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            record("daemon", &out);

            // A wrong secret: refused, exit 3, at trace level too.
            ws.write("secret", &format!("{WRONG_SECRET}\n"));
            let out = cmd(&["run", "--config", "config.toml", "--no-progress"])
                .args(["--input", "orders.csv"])
                .output()
                .await
                .unwrap();
            assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
            record("run with wrong secret", &out);
            assert!(!ws.rows().is_empty());
            workspaces.push(ws);
        }
        tokens.extend(server.issued_tokens());
    }
    // The demo, which runs its own mock with the default demo secrets.
    let demo_ws = Workspace::new();
    let out = demo_ws
        .command(&["demo", "--orders", "30", "--dir", "demo"])
        .args(trace)
        .env("RUST_LOG", "trace")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    streams.push(("demo stdout".into(), out.stdout.clone()));
    streams.push(("demo stderr".into(), out.stderr.clone()));

    assert!(
        tokens.len() >= 4,
        "tokens were issued and refreshed: {tokens:?}"
    );
    let mut needles: Vec<String> = [PP_TEST_SECRET, GA_TEST_SECRET, WRONG_SECRET, PP_SECRET]
        .map(String::from)
        .to_vec();
    needles.extend(tokens);
    let mut found = Vec::new();
    let mut scanned = 0;
    for (name, bytes) in &streams {
        // Runs and daemons really logged at trace level.
        if name.ends_with("run stderr") || name.ends_with("daemon stderr") {
            assert!(
                String::from_utf8_lossy(bytes).contains("TRACE"),
                "{name} is not trace-level output"
            );
        }
        hits(name, bytes, &needles, &mut found);
    }
    for ws in workspaces.iter().chain([&demo_ws]) {
        for f in files_under(&ws.path(".")) {
            let name = f.file_name().unwrap().to_string_lossy();
            if name == "secret" {
                continue;
            }
            scanned += 1;
            hits(
                &f.display().to_string(),
                &std::fs::read(&f).unwrap(),
                &needles,
                &mut found,
            );
        }
    }
    assert!(scanned > 20, "{scanned} files scanned");
    assert!(found.is_empty(), "secrets leaked: {found:#?}");
}

/// A rustls server configuration (ring) for a DER certificate and PKCS#8 key.
fn tls_server_config(cert: &[u8], key: &[u8]) -> tokio_rustls::rustls::ServerConfig {
    use tokio_rustls::rustls;
    let cert = rustls::pki_types::CertificateDer::from(cert.to_vec());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.to_vec().into());
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap()
}

/// A TLS server with a self-signed certificate, counting completed handshakes.
async fn self_signed_tls_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let config = tls_server_config(
        include_bytes!("fixtures/self-signed-cert.der"),
        include_bytes!("fixtures/self-signed-key.der"),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, handshakes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (c, h) = (connections.clone(), handshakes.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, h) = (acceptor.clone(), h.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    h.fetch_add(1, Ordering::SeqCst);
                    use tokio::io::AsyncWriteExt;
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                        .await;
                }
            });
        }
    });
    (addr, connections, handshakes)
}

/// An https base URL whose server shows a self-signed certificate is refused by
/// both providers: no TLS session is ever completed, and the error rows and the
/// summary say the certificate is the problem. There is no way to turn
/// verification off.
#[tokio::test(flavor = "multi_thread")]
async fn https_with_a_self_signed_certificate_is_refused() {
    use std::sync::atomic::Ordering;
    for prov in BOTH {
        let (addr, connections, handshakes) = self_signed_tls_server().await;
        let ws = Workspace::new();
        ws.write("orders.csv", &orders_csv(&numbered("PAID", 2)));
        let overrides = "[fetch]\nmax_attempts = 2\n";
        match prov {
            Prov::PayProtocol => {
                ws.config(&format!("https://{addr}/api/mer"), PP_SECRET, overrides)
            }
            Prov::GenAuth => ws.genauth_config(&format!("https://{addr}"), GA_SECRET, overrides),
        };
        let out = ws.run(&["--input", "orders.csv"]).await;
        let text = format!("{}\n{}", stdout(&out), stderr(&out));
        assert!(matches!(out.status.code(), Some(1..=4)), "{prov:?}: {text}");
        assert!(connections.load(Ordering::SeqCst) > 0, "{prov:?}: {text}");
        assert_eq!(handshakes.load(Ordering::SeqCst), 0, "{prov:?}: {text}");
        let errors: Vec<String> = ws
            .rows()
            .iter()
            .map(|r| r["error"].as_str().unwrap_or_default().to_owned())
            .collect();
        let all = format!("{text}\n{errors:?}");
        assert!(
            all.to_lowercase().contains("certificate"),
            "{prov:?}: {all}"
        );
        assert!(
            errors
                .iter()
                .all(|e| e.to_lowercase().contains("certificate")),
            "{prov:?}: {all}"
        );
    }
}

/// A listener for the mock server that notes, for each connection, the protocol
/// agreed through ALPN (`none` on plain TCP) and the one the client then spoke (from
/// its first bytes: HTTP/2 opens with `PRI * HTTP/2.0`), as `"<agreed> <spoken>"`.
/// With TLS, its certificate is for 127.0.0.1, issued by the test CA
/// (`fixtures/test-ca.pem`).
struct NotingListener {
    tcp: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NotingListener {
    /// TLS, offering `alpn` (in order of preference).
    async fn tls(alpn: &[&[u8]]) -> Self {
        let mut config = tls_server_config(
            include_bytes!("fixtures/localhost-cert.der"),
            include_bytes!("fixtures/localhost-key.der"),
        );
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Self {
            tls: Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))),
            ..Self::plain().await
        }
    }

    /// Plain TCP.
    async fn plain() -> Self {
        Self {
            tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tls: None,
            seen: Default::default(),
        }
    }

    /// What each connection so far agreed and spoke.
    fn seen(&self) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
        self.seen.clone()
    }
}

/// A byte stream the mock server can serve: plain TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl axum::serve::Listener for NotingListener {
    type Io = Spoken;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let (io, agreed): (Box<dyn Io>, String) = match &self.tls {
                None => (Box::new(tcp), "none".into()),
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let alpn = tls.get_ref().1.alpn_protocol().unwrap_or(b"none");
                        let agreed = String::from_utf8_lossy(alpn).into_owned();
                        (Box::new(tls), agreed)
                    }
                    // A refused handshake (a client that does not trust the CA, or
                    // no protocol in common) is no connection to serve.
                    Err(_) => continue,
                },
            };
            let io = Spoken {
                io,
                agreed,
                first: Vec::new(),
                seen: self.seen.clone(),
            };
            return (io, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A server-side stream that notes which protocol the client speaks.
struct Spoken {
    io: Box<dyn Io>,
    agreed: String,
    first: Vec<u8>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl tokio::io::AsyncRead for Spoken {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0";
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if self.first.len() < PREFACE.len() {
            let new = &buf.filled()[before..];
            let take = new.len().min(PREFACE.len() - self.first.len());
            let me = &mut *self;
            me.first.extend_from_slice(&new[..take]);
            if me.first.len() == PREFACE.len() {
                let spoken = if me.first == PREFACE {
                    "h2"
                } else {
                    "http/1.1"
                };
                let note = format!("{} {spoken}", me.agreed);
                me.seen.lock().unwrap().push(note);
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Spoken {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// `fetch.ca_file` adds a private CA to the trusted roots: with it, both providers
/// fetch every order from the mock server over https, through HTTP/2 agreed by
/// ALPN; without it, the same server's certificate is refused.
#[tokio::test(flavor = "multi_thread")]
async fn https_with_a_private_ca_and_http2() {
    let orders = numbered("PAID", 3);
    for prov in BOTH {
        let listener = NotingListener::tls(&[b"h2", b"http/1.1"]).await;
        let seen = listener.seen();
        let server = MockServer::start_on(listener, MockOptions::default()).unwrap();
        let ws = Workspace::new();
        ws.write("orders.csv", &orders_csv(&orders));
        ws.write("ca.pem", include_str!("fixtures/test-ca.pem"));
        let addr = server.addr();
        let config = |overrides: &str| match prov {
            Prov::PayProtocol => {
                ws.config(&format!("https://{addr}/api/mer"), PP_SECRET, overrides)
            }
            Prov::GenAuth => ws.genauth_config(&format!("https://{addr}"), GA_SECRET, overrides),
        };

        config("[fetch]\nmax_attempts = 1\n");
        let out = ws.run(&["--input", "orders.csv"]).await;
        let text = format!("{}\n{}", stdout(&out), stderr(&out));
        assert!(matches!(out.status.code(), Some(1..=4)), "{prov:?}: {text}");
        assert!(
            text.to_lowercase().contains("certificate"),
            "{prov:?}: {text}"
        );
        assert!(seen.lock().unwrap().is_empty(), "{prov:?}");
        assert_eq!(prov.detail_requests(&server.counters().snapshot()), 0);

        std::fs::remove_dir_all(ws.path("out")).unwrap();
        std::fs::remove_file(ws.path("state.db")).unwrap();
        config("[fetch]\nca_file = \"ca.pem\"\n");
        let out = ws.run(&["--input", "orders.csv"]).await;
        assert_eq!(out.status.code(), Some(0), "{prov:?}: {}", stderr(&out));
        let latest = latest(&ws.rows());
        assert_eq!(latest.len(), orders.len(), "{prov:?}");
        for (o, r) in &latest {
            assert_eq!(r["status"], "paid", "{prov:?} {o}: {r}");
        }
        assert_eq!(
            prov.detail_requests(&server.counters().snapshot()),
            orders.len() as u64,
            "{prov:?}"
        );
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty(), "{prov:?}");
        assert!(seen.iter().all(|p| p == "h2 h2"), "{prov:?}: {seen:?}");
    }
}

/// `fetch.http2_prior_knowledge` speaks HTTP/2 from the first byte. Over plain http,
/// both providers fetch every order on a single h2c connection (without the key the
/// same server hears HTTP/1.1). Over https only `h2` is offered through ALPN: a
/// server offering only http/1.1 refuses the handshake, one offering h2 gets it.
#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge() {
    let orders = numbered("PAID", 6);
    for prov in BOTH {
        for h2 in [false, true] {
            let listener = NotingListener::plain().await;
            let seen = listener.seen();
            let server = MockServer::start_on(listener, MockOptions::default()).unwrap();
            let ws = Workspace::new();
            ws.write("orders.csv", &orders_csv(&orders));
            let fetch = format!("[fetch]\nconcurrency = 4\nhttp2_prior_knowledge = {h2}\n");
            prov.config(&ws, &server, &fetch);
            let out = ws.run(&["--input", "orders.csv"]).await;
            assert_eq!(
                out.status.code(),
                Some(0),
                "{prov:?} {h2}: {}",
                stderr(&out)
            );
            let latest = latest(&ws.rows());
            assert_eq!(latest.len(), orders.len(), "{prov:?} {h2}");
            for (o, r) in &latest {
                assert_eq!(r["status"], "paid", "{prov:?} {h2} {o}: {r}");
            }
            let c = server.counters().snapshot();
            assert_eq!(prov.detail_requests(&c), orders.len() as u64, "{c:?}");
            // The mock's own count of HTTP/2 requests agrees (the benchmark uses it).
            let http2 = if h2 { c.total_requests } else { 0 };
            assert_eq!(c.http2_requests, http2, "{prov:?} {h2}: {c:?}");
            let seen = seen.lock().unwrap().clone();
            if h2 {
                assert_eq!(seen, ["none h2"], "{prov:?}");
            } else {
                assert!(!seen.is_empty(), "{prov:?}");
                assert!(
                    seen.iter().all(|p| p == "none http/1.1"),
                    "{prov:?}: {seen:?}"
                );
            }
        }
    }

    let offers: [&[&[u8]]; 2] = [&[b"http/1.1"], &[b"h2", b"http/1.1"]];
    for offered in offers {
        let listener = NotingListener::tls(offered).await;
        let seen = listener.seen();
        let server = MockServer::start_on(listener, MockOptions::default()).unwrap();
        let ws = Workspace::new();
        ws.write("orders.csv", &orders_csv(&orders));
        ws.write("ca.pem", include_str!("fixtures/test-ca.pem"));
        let fetch =
            "[fetch]\nca_file = \"ca.pem\"\nhttp2_prior_knowledge = true\nmax_attempts = 1\n";
        ws.config(
            &format!("https://{}/api/mer", server.addr()),
            PP_SECRET,
            fetch,
        );
        let out = ws.run(&["--input", "orders.csv"]).await;
        let seen = seen.lock().unwrap().clone();
        let c = server.counters().snapshot();
        if offered.len() == 1 {
            let text = format!("{}\n{}", stdout(&out), stderr(&out));
            assert!(matches!(out.status.code(), Some(1..=4)), "{text}");
            assert!(text.contains("NoApplicationProtocol"), "{text}");
            assert!(
                text.contains("fetch.http2_prior_knowledge is set"),
                "{text}"
            );
            assert!(seen.is_empty(), "{seen:?}");
            assert_eq!(c.payprotocol_detail_requests, 0, "{c:?}");
        } else {
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            assert_eq!(c.payprotocol_detail_requests, orders.len() as u64, "{c:?}");
            assert_eq!(seen, ["h2 h2"]);
        }
    }
}

/// `fetch.http2_prior_knowledge` against a plain-http server that speaks only
/// HTTP/1.1 (it answers anything with a 400 and closes): every order gets an
/// `error` row whose message points at the key.
#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge_against_an_http1_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let orders = numbered("PAID", 2);
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&orders));
    let fetch = "[fetch]\nhttp2_prior_knowledge = true\nmax_attempts = 1\n";
    ws.config(&format!("http://{addr}/api/mer"), PP_SECRET, fetch);
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert!(matches!(out.status.code(), Some(1..=4)), "{}", stderr(&out));
    let latest = latest(&ws.rows());
    assert_eq!(latest.len(), orders.len());
    for (o, r) in &latest {
        let e = r["error"].as_str().unwrap_or_default();
        assert!(e.contains("fetch.http2_prior_knowledge is set"), "{o}: {r}");
    }
}

/// An http base URL whose host does not resolve is reached through the proxy the
/// environment names (`HTTP_PROXY`, or `http_proxy`), here the mock server itself,
/// which routes the absolute-form requests by path: both providers finish every
/// order, and the server saw one detail request per order. With
/// `fetch.http2_prior_knowledge` the requests reach the proxy as HTTP/2 (the mock
/// speaks it too).
#[tokio::test(flavor = "multi_thread")]
async fn http_proxy_from_the_environment_is_used() {
    let orders = numbered("PAID", 3);
    for (prov, var, fetch) in [
        (Prov::PayProtocol, "HTTP_PROXY", ""),
        (Prov::GenAuth, "http_proxy", ""),
        (
            Prov::PayProtocol,
            "http_proxy",
            "[fetch]\nhttp2_prior_knowledge = true\n",
        ),
        (
            Prov::GenAuth,
            "HTTP_PROXY",
            "[fetch]\nhttp2_prior_knowledge = true\n",
        ),
    ] {
        let server = mock(MockOptions::default()).await;
        let ws = Workspace::new();
        ws.write("orders.csv", &orders_csv(&orders));
        let host = "http://paysync-proxy-test.invalid";
        match prov {
            Prov::PayProtocol => ws.config(&format!("{host}/api/mer"), PP_SECRET, fetch),
            Prov::GenAuth => ws.genauth_config(host, GA_SECRET, fetch),
        };
        let out = ws
            .run_command(&["--input", "orders.csv"])
            .env(var, format!("http://{}", server.addr()))
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{prov:?}: {}", stderr(&out));
        let latest = latest(&ws.rows());
        assert_eq!(latest.len(), orders.len(), "{prov:?}");
        for (o, r) in &latest {
            assert_eq!(r["status"], "paid", "{prov:?} {o}: {r}");
        }
        let c = server.counters().snapshot();
        assert_eq!(
            prov.detail_requests(&c),
            orders.len() as u64,
            "{prov:?} {c:?}"
        );
    }
}

/// `NO_PROXY` hosts are reached directly: with `HTTP_PROXY` naming a port nobody
/// listens on, a run against the mock on 127.0.0.1 succeeds when `NO_PROXY` lists
/// 127.0.0.1, and fails with transport errors (the dead proxy) when it does not.
#[tokio::test(flavor = "multi_thread")]
async fn no_proxy_hosts_bypass_the_proxy() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let orders = numbered("PAID", 2);
    for no_proxy in [Some("localhost,127.0.0.1"), None] {
        let server = mock(MockOptions::default()).await;
        let ws = Workspace::new();
        ws.write("orders.csv", &orders_csv(&orders));
        Prov::PayProtocol.config(&ws, &server, "[fetch]\nmax_attempts = 2\n");
        let mut cmd = ws.run_command(&["--input", "orders.csv"]);
        cmd.env("HTTP_PROXY", format!("http://{dead}"));
        if let Some(hosts) = no_proxy {
            cmd.env("NO_PROXY", hosts);
        }
        let out = cmd.output().await.unwrap();
        let c = server.counters().snapshot();
        let rows = ws.rows();
        if no_proxy.is_some() {
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            assert_eq!(c.payprotocol_detail_requests, orders.len() as u64, "{c:?}");
        } else {
            assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
            assert_eq!(c.payprotocol_detail_requests, 0, "{c:?}");
            assert!(!rows.is_empty());
            for r in &rows {
                let e = r["error"].as_str().unwrap_or_default();
                assert!(e.contains("transport error"), "{r}");
            }
        }
    }
}

/// Under `umask 000`, output files, manifests, `_SUCCESS` and rejects are created
/// 0640, output and partition directories 0750, and the state file with its WAL,
/// shared-memory and lock files 0600 (checked while the daemon holds them open,
/// and after a run).
#[tokio::test(flavor = "multi_thread")]
async fn files_have_restrictive_modes_whatever_the_umask() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let mut csv = orders_csv(&numbered("PAID", 5));
    csv.push_str("T PAID bad,rejected\n");
    ws.write("orders.csv", &csv);
    ws.write("queue.txt", "T-PAID-q1\n");
    Prov::PayProtocol.config(
        &ws,
        &server,
        "[input]\nqueue_files = [\"queue.txt\"]\n[schedule]\ningest = \"* * * * * *\"\nexport = \"* * * * * *\"\n",
    );
    // The real binary, started by a shell that set umask 000 first.
    let umask000 = |args: &[&str]| {
        let mut c = tokio::process::Command::new("sh");
        c.args([
            "-c",
            "umask 000; exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_paysync"),
        ])
        .args(args)
        .current_dir(ws.path("."))
        .env_remove("CREDENTIALS_DIRECTORY")
        .kill_on_drop(true);
        for var in PROXY_VARS {
            c.env_remove(var);
        }
        c
    };
    let mode = |rel: &str| {
        std::fs::metadata(ws.path(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    let check_state = |when: &str| {
        for f in ["state.db", "state.db-wal", "state.db-shm", "state.db.lock"] {
            assert_eq!(mode(f), 0o600, "{f} {when}: {:o}", mode(f));
        }
    };

    let out = umask000(&[
        "run",
        "--config",
        "config.toml",
        "--no-progress",
        "--input",
        "orders.csv",
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = umask000(&[
        "run",
        "--config",
        "config.toml",
        "--no-progress",
        "--format",
        "csv",
    ])
    .args(["--input", "queue.txt"])
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let mut child = umask000(&["daemon", "--config", "config.toml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The daemon has the database open (WAL and shared memory exist) once it polls.
    std::fs::write(ws.path("queue.txt"), "T-PAID-q1\nT-PAID-q2\n").unwrap();
    wait_for("the daemon to poll", || server.polls_of("T-PAID-q2") > 0).await;
    check_state("while the daemon runs");
    sigterm(&child);
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
    assert_eq!(mode("state.db"), 0o600);

    // Parquet in partitions: the directories paysync creates are 0750.
    let config = std::fs::read_to_string(ws.path("config.toml")).unwrap();
    let config = config
        .replace("dir = \"out\"", "dir = \"out2\"")
        .replace("path = \"state.db\"", "path = \"state2.db\"")
        .replace(
            "format = \"jsonl\"",
            "format = \"parquet\"\npath_template = \"{provider}/dt={date}/p-{run_id}.{format}\"",
        );
    assert!(
        config.contains("out2") && config.contains("state2.db") && config.contains("parquet"),
        "{config}"
    );
    ws.write("config2.toml", &config);
    let out = umask000(&["run", "--config", "config2.toml", "--no-progress"])
        .args(["--input", "orders.csv"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(mode("out2"), 0o750);
    assert!(
        ws.path("out2/payprotocol").is_dir(),
        "{}\n{}\n{config}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(mode("out2/payprotocol"), 0o750);
    let partition = std::fs::read_dir(ws.path("out2/payprotocol"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::metadata(&partition).unwrap().permissions().mode() & 0o777,
        0o750
    );
    let mut parquet = 0;
    for e in std::fs::read_dir(&partition).unwrap() {
        let p = e.unwrap().path();
        parquet += usize::from(p.extension().is_some_and(|x| x == "parquet"));
        let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o640, "{}: {m:o}", p.display());
    }
    assert_eq!(parquet, 1);

    assert_eq!(mode("out"), 0o750);
    let files = ws.out_files();
    let kinds = [".jsonl", ".csv", ".manifest.json", "rejects-"];
    for k in kinds {
        assert!(
            files.iter().any(|f| f.contains(k)),
            "no {k} file in {files:?}"
        );
    }
    for f in &files {
        assert_eq!(
            mode(&format!("out/{f}")),
            0o640,
            "out/{f}: {:o}",
            mode(&format!("out/{f}"))
        );
    }
}
