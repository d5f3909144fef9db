//! `paysync run` for PayProtocol: clean runs, faults, bad input, auth, rate limits.

use std::time::Duration;

use paysync::mock::{FaultKind, MockOptions, RetryAfterMode};
use serde_json::Value;

use crate::util::*;

const SECRET: &str = paysync::mock::DEFAULT_API_SECRET;

/// Output into a pipe whose reader is gone (`paysync status | head -1` after
/// `head` exits): each command that prints ends as it would have, without a panic.
#[tokio::test(flavor = "multi_thread")]
async fn output_into_a_closed_pipe_is_not_a_crash() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 2)));
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    for args in [
        RUN_ORDERS_CSV,
        &["status", "--config", "config.toml"],
        &["status", "--config", "config.toml", "--json"],
        &["validate", "--config", "config.toml"],
        &["schema", "--format", "bigquery"],
    ] {
        // Not `output()`, which would pipe stdout anew.
        let child = ws
            .command(args)
            .stdout(closed())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().await.unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A clean run: every order ends in its expected final row, amounts are exact,
/// input columns pass through, the manifest matches the file, and the server saw
/// exactly the requests the rows account for.
/// Starts `paysync mock-server --listen 127.0.0.1:0` plus `args` in `ws` and
/// returns it with the URL its first line gives (`scheme://ADDR`).
async fn spawn_mock_server(
    ws: &Workspace,
    args: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    String,
) {
    use tokio::io::AsyncBufReadExt;
    let mut server = ws
        .command(&[&["mock-server", "--listen", "127.0.0.1:0"], args].concat())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the listening line comes")
        .unwrap()
        .expect("a line, not end of output");
    let url = first
        .strip_prefix("mock server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    (server, lines, url)
}

/// `paysync mock-server --listen 127.0.0.1:0` prints the address it bound (the
/// real port, on stdout), a run against that address exports every order, and a
/// SIGTERM stops the server with exit 0. With `--tls-cert`/`--tls-key` it serves
/// https, and a run that trusts the certificate's CA (`fetch.ca_file`) exports
/// every order the same way.
#[tokio::test(flavor = "multi_thread")]
async fn mock_server_command_serves_a_run_and_stops_on_sigterm() {
    for tls in [false, true] {
        let ws = Workspace::new();
        ws.write("cert.pem", include_str!("fixtures/localhost-cert.pem"));
        ws.write("key.pem", include_str!("fixtures/localhost-key.pem"));
        ws.write("ca.pem", include_str!("fixtures/test-ca.pem"));
        let flags: &[&str] = if tls {
            &["--tls-cert", "cert.pem", "--tls-key", "key.pem"]
        } else {
            &[]
        };
        let (server, mut lines, url) = spawn_mock_server(&ws, flags).await;
        let scheme = if tls { "https://" } else { "http://" };
        let addr: std::net::SocketAddr = url
            .strip_prefix(scheme)
            .unwrap_or_else(|| panic!("{url} does not start with {scheme}"))
            .parse()
            .expect("a socket address");
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

        ws.write("orders.csv", &orders_csv(&numbered("PAID", 3)));
        let trust = if tls {
            "[fetch]\nca_file = \"ca.pem\"\n"
        } else {
            ""
        };
        ws.config(&format!("{url}/api/mer"), SECRET, trust);
        let out = ws.run(&["--input", "orders.csv"]).await;
        assert_eq!(out.status.code(), Some(0), "tls {tls}: {}", stderr(&out));
        let rows = ws.rows();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r["status"] == "paid"), "{rows:?}");

        stop_by_sigterm(server).await;
        assert_eq!(
            lines.next_line().await.unwrap(),
            None,
            "nothing else on stdout"
        );
    }
}

/// Bad TLS flags of `paysync mock-server` end it at once with exit 2 and a
/// message naming the flag (and its file), never the key's bytes.
#[tokio::test(flavor = "multi_thread")]
async fn mock_server_tls_flags_are_checked() {
    let ws = Workspace::new();
    ws.write("cert.pem", include_str!("fixtures/localhost-cert.pem"));
    let other_key = include_str!("fixtures/self-signed-key.pem");
    ws.write("other-key.pem", other_key);
    ws.write("empty.pem", "");
    for (args, names) in [
        (&["--tls-cert", "cert.pem"][..], "--tls-key"),
        (
            &["--tls-cert", "cert.pem", "--tls-key", "other-key.pem"][..],
            "--tls-key other-key.pem",
        ),
        (
            &["--tls-cert", "empty.pem", "--tls-key", "other-key.pem"][..],
            "--tls-cert empty.pem",
        ),
        (
            &["--tls-cert", "cert.pem", "--tls-key", "missing.pem"][..],
            "--tls-key missing.pem",
        ),
    ] {
        let out = ws
            .paysync(&[&["mock-server", "--listen", "127.0.0.1:0"], args].concat())
            .await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
        assert!(stdout(&out).is_empty(), "{args:?}: nothing served");
        let key_body = other_key.lines().nth(1).unwrap();
        assert!(!err.contains(key_body), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clean_run_writes_every_order_with_manifest() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let mut orders: Vec<String> = Vec::new();
    let expect = [
        ("PAID", "paid"),
        ("FAILED", "failed"),
        ("REFUND", "refunded"),
        ("NOTFOUND", "not_found"),
        ("NODATA", "not_found"),
        ("BIG", "paid"),
        ("PENDING", "paid"),
        ("CONFIRM", "paid"),
        ("UNKNOWN", "unknown"),
    ];
    for (marker, _) in expect {
        orders.extend(numbered(marker, 3));
    }
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        "[settle]\nwait = \"20s\"\n",
    );
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let rows = ws.rows();
    assert_no_duplicates(&rows);
    let latest = latest(&rows);
    assert_eq!(latest.len(), orders.len());
    for (marker, status) in expect {
        for o in numbered(marker, 3) {
            let r = &latest[&o];
            assert_eq!(r["status"], status, "{o}: {r}");
            assert_eq!(r["provider"], "payprotocol");
            assert_eq!(r["input"]["order_no"], o.as_str());
            assert!(
                r["input"]["customer"]
                    .as_str()
                    .unwrap()
                    .starts_with("customer-")
            );
            // `polls` is the number of API calls the server answered for the order.
            assert_eq!(
                r["polls"].as_u64().unwrap(),
                u64::from(server.polls_of(&o)),
                "{o}"
            );
            let settled = status != "unknown" || r["tracking"] == "settled";
            assert_eq!(r["settled"], Value::Bool(settled));
        }
    }
    let big = &latest["T-BIG-0000"];
    assert_eq!(big["amount"], "123456.789012345678901234");
    assert_eq!(big["currency"], "ETH");
    let paid = &latest["T-PAID-0000"];
    assert!(paid["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(paid["paid_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(latest["T-NOTFOUND-0000"]["error"], "order not found");
    // Pending orders are observed once per status change.
    let pending_rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["order_no"] == "T-PENDING-0000")
        .collect();
    let statuses: Vec<&str> = pending_rows
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["pending", "confirming", "paid"]);

    let c = server.counters().snapshot();
    let polls: u64 = latest.values().map(|r| r["polls"].as_u64().unwrap()).sum();
    assert_eq!(c.payprotocol_detail_requests, polls);
    assert_eq!(c.unauthorized, 0);
    assert!(stdout(&out).contains("paysync run"), "{}", stdout(&out));
}

/// CSV output: columns in schema order, `input.*` after them, formula escaping.
#[tokio::test(flavor = "multi_thread")]
async fn csv_output_is_escaped_and_ordered() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write(
        "orders.csv",
        "order_no,customer,note\nT-PAID-1,=HYPERLINK(\"x\"),+1\nT-PAID-2,@home,plain\n",
    );
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "orders.csv", "--format", "csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let file = ws
        .out_files()
        .into_iter()
        .find(|f| f.ends_with(".csv") && f.starts_with("paysync-"))
        .expect("a csv data file");
    let text = std::fs::read_to_string(ws.path("out").join(&file)).unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = rdr.headers().unwrap().iter().map(str::to_owned).collect();
    let mut want: Vec<String> = paysync::model::OUTPUT_COLUMNS
        .iter()
        .map(|s| s.to_string())
        .collect();
    want.extend(["input.order_no", "input.customer", "input.note"].map(String::from));
    assert_eq!(header, want);
    let mut recs: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(recs.len(), 2);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    // Rows come in the order polls finished; look them up by order number.
    recs.sort_by(|a, b| a[col("order_no")].cmp(&b[col("order_no")]));
    assert_eq!(&recs[0][col("input.customer")], "'=HYPERLINK(\"x\")");
    assert_eq!(&recs[0][col("input.note")], "'+1");
    assert_eq!(&recs[1][col("input.customer")], "'@home");
    assert_eq!(&recs[1][col("status")], "paid");
    let manifest = file.replace(".csv", ".manifest.json");
    assert!(ws.out_files().contains(&manifest));
}

/// 5xx, HTML error pages, malformed bodies and 429s are retried: every order
/// still ends correct, and each faulted order cost at most its faults in extra
/// requests (no storm).
#[tokio::test(flavor = "multi_thread")]
async fn faults_are_retried_until_every_order_is_correct() {
    let server = mock(MockOptions {
        fault_share: 0.5,
        fault_kinds: vec![
            FaultKind::Status500,
            FaultKind::Status502,
            FaultKind::Status503,
            FaultKind::Html502,
            FaultKind::Malformed,
            FaultKind::Throttle429,
        ],
        max_consecutive_faults: 2,
        retry_after: RetryAfterMode::Zero,
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    let orders = numbered("PAID", 40);
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let latest = latest(&ws.rows());
    assert_eq!(latest.len(), 40);
    assert!(latest.values().all(|r| r["status"] == "paid"), "{latest:?}");
    let c = server.counters().snapshot();
    assert!(c.faults_injected > 0, "{c:?}");
    assert_eq!(
        c.payprotocol_detail_requests,
        40 + c.faults_injected,
        "{c:?}"
    );
    assert!(c.faults_injected <= 40, "{c:?}");
}

/// When faults outlast `fetch.max_attempts`, the order gets an `error` row naming
/// the failure, the run exits 1, and exactly `max_attempts` requests were spent.
#[tokio::test(flavor = "multi_thread")]
async fn exhausted_retries_give_error_rows_and_exit_1() {
    let server = mock(MockOptions {
        fault_share: 1.0,
        fault_kinds: vec![FaultKind::Status503],
        max_consecutive_faults: 100,
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    let orders = numbered("PAID", 10);
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        "[fetch]\nmax_attempts = 3\n",
    );
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let latest = latest(&ws.rows());
    for r in latest.values() {
        assert_eq!(r["status"], "error");
        assert_eq!(r["tracking"], "polling");
        assert_eq!(r["settled"], false);
        let e = r["error"].as_str().unwrap();
        assert!(e.contains("503") && e.contains("after 3 attempts"), "{e}");
        assert_eq!(r["polls"], 3);
    }
    assert_eq!(server.counters().snapshot().payprotocol_detail_requests, 30);
}

/// Bad rows go to the rejects file with their line numbers and reasons; the good
/// rows (BOM, CRLF, quoted newlines around them) are fetched once each.
#[tokio::test(flavor = "multi_thread")]
async fn bad_rows_go_to_rejects_and_the_run_goes_on() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let csv = "\u{feff}order_no,note\r\n\
               T-PAID-1,\"two\r\nlines\"\r\n\
               \r\n\
               ,empty order\r\n\
               T PAID 2,spaces\r\n\
               T-PAID-3,\"ragged\",extra\r\n\
               T-PAID-1,duplicate\r\n\
               T-PAID-\u{7}4,control\r\n\
               T-PAID-5,ok\r\n";
    ws.write("orders.csv", csv);
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let latest = latest(&ws.rows());
    assert_eq!(latest.keys().collect::<Vec<_>>(), ["T-PAID-1", "T-PAID-5"]);
    assert_eq!(server.counters().snapshot().payprotocol_detail_requests, 2);
    let rejects = ws
        .out_files()
        .into_iter()
        .find(|f| f.starts_with("rejects-"))
        .expect("a rejects file");
    let text = std::fs::read_to_string(ws.path("out").join(rejects)).unwrap();
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let recs: Vec<(u64, String)> = rdr
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[1].parse().unwrap(), r[2].to_owned())
        })
        .collect();
    // Duplicates are found when a batch is registered, so they may come later.
    let mut recs = recs;
    recs.sort();
    let lines: Vec<u64> = recs.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [5, 6, 7, 8, 9], "{recs:?}");
    assert!(recs[0].1.contains("empty"), "{recs:?}");
    assert!(recs[1].1.contains("whitespace"), "{recs:?}");
    assert!(recs[2].1.contains("fields"), "{recs:?}");
    assert!(
        recs[3].1.contains("duplicate") && recs[3].1.contains("line 2"),
        "{recs:?}"
    );
    assert!(recs[4].1.contains("control"), "{recs:?}");
}

/// A queue file: comments and blank lines skipped, every order fetched.
#[tokio::test(flavor = "multi_thread")]
async fn queue_file_input() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write(
        "queue.txt",
        "# today\nT-PAID-1\n\n  T-PAID-2  \r\n#T-PAID-3\nT-FAILED-4\n",
    );
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "queue.txt"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let latest = latest(&ws.rows());
    assert_eq!(
        latest.keys().collect::<Vec<_>>(),
        ["T-FAILED-4", "T-PAID-1", "T-PAID-2"]
    );
    assert_eq!(latest["T-PAID-2"]["input"], serde_json::json!({}));
}

/// A missing input file or a missing column is a usage error (exit 2) naming it,
/// before any request is made.
#[tokio::test(flavor = "multi_thread")]
async fn missing_file_or_column_is_exit_2_without_requests() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "nope.csv"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope.csv"), "{}", stderr(&out));
    ws.write("orders.csv", "id,customer\n1,a\n");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("order_no") && err.contains("orders.csv"),
        "{err}"
    );
    assert_eq!(server.counters().snapshot().total_requests, 0);
}

/// A wrong secret stops the run with exit 3 after very few requests, and the
/// secret appears nowhere in the output.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_secret_exits_3_after_few_requests() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 100)));
    let wrong = "wrong-secret-0123456789";
    ws.config(&server.payprotocol_base_url(), wrong, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let c = server.counters().snapshot();
    assert!(c.total_requests < 20, "{c:?}");
    assert!(c.unauthorized >= 1);
    // The reason is on stderr too (where logs and alerting look), not only in the summary.
    assert!(
        stderr(&out).contains("paysync: error: authentication rejected by the provider: HTTP 401"),
        "{}",
        stderr(&out)
    );
    for text in [stdout(&out), stderr(&out)] {
        assert!(!text.contains(wrong));
        assert!(!text.contains(SECRET));
    }
}

/// The client-side limiter keeps the server's busiest 1-second window within
/// `rate_limit + burst`, with many workers.
#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_is_respected() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 50)));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        "[fetch]\nrate_limit = 20.0\nburst = 1\nconcurrency = 32\n",
    );
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let c = server.counters().snapshot();
    assert_eq!(c.payprotocol_detail_requests, 50);
    assert!(c.max_requests_in_any_1s_window <= 21, "{c:?}");
}

/// A server enforcing its own limit answers 429 with Retry-After: the run pauses
/// every worker, every order still ends paid, and throttling stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn server_throttling_pauses_all_workers() {
    for mode in [
        RetryAfterMode::Seconds,
        RetryAfterMode::HttpDate,
        RetryAfterMode::Absent,
    ] {
        let server = mock(MockOptions {
            rate_limit: Some(20.0),
            retry_after: mode,
            ..MockOptions::default()
        })
        .await;
        let ws = Workspace::new();
        ws.write("orders.csv", &orders_csv(&numbered("PAID", 40)));
        ws.config(
            &server.payprotocol_base_url(),
            SECRET,
            "[fetch]\nrate_limit = 100.0\nburst = 20\nconcurrency = 16\nmax_attempts = 10\nbackoff_base = \"200ms\"\nbackoff_max = \"2s\"\n",
        );
        let out = ws.run(&["--input", "orders.csv"]).await;
        assert_eq!(out.status.code(), Some(0), "{mode:?}: {}", stderr(&out));
        let latest = latest(&ws.rows());
        assert!(latest.values().all(|r| r["status"] == "paid"), "{mode:?}");
        let c = server.counters().snapshot();
        assert!(c.throttled > 0, "{mode:?} {c:?}");
        assert!(c.throttled < 80, "{mode:?}: too many 429s {c:?}");
    }
}

/// `validate` accepts a good config and names the key of a bad one (exit 2).
#[tokio::test(flavor = "multi_thread")]
async fn validate_checks_config_and_secrets() {
    let ws = Workspace::new();
    ws.config("http://127.0.0.1:9/api/mer", SECRET, "");
    let out = ws.paysync(&["validate", "--config", "config.toml"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stdout(&out).contains(SECRET));

    std::fs::remove_file(ws.path("secret")).unwrap();
    let out = ws.paysync(&["validate", "--config", "config.toml"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("provider.api_secret_file"),
        "{}",
        stderr(&out)
    );

    // A bare secret file name is found in $CREDENTIALS_DIRECTORY (LoadCredential=).
    std::fs::create_dir(ws.path("creds")).unwrap();
    ws.write("creds/secret", SECRET);
    let out = ws
        .command(&["validate", "--config", "config.toml"])
        .env("CREDENTIALS_DIRECTORY", ws.path("creds"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    ws.config(
        "http://127.0.0.1:9/api/mer",
        SECRET,
        "[fetch]\nrate_limit = -2.0\n",
    );
    let out = ws.paysync(&["validate", "--config", "config.toml"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("fetch.rate_limit") && err.contains("config.toml"),
        "{err}"
    );

    ws.config(
        "http://127.0.0.1:9/api/mer",
        SECRET,
        "[fetch]\nconcurency = 3\n",
    );
    let out = ws.paysync(&["run", "--config", "config.toml"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("concurency"), "{}", stderr(&out));
}

/// `paysync demo` works with no config and no credentials.
#[tokio::test(flavor = "multi_thread")]
async fn demo_runs_without_configuration() {
    let ws = Workspace::new();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        ws.paysync(&["demo", "--orders", "40", "--dir", "demo"]),
    )
    .await
    .expect("demo finishes");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = committed_rows(&ws.path("demo/out"));
    assert!(latest(&rows).len() >= 40);
    assert!(stdout(&out).contains("demo: look at the rows"));
}
