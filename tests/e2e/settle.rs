//! Settlement tracking with durable state: re-polling until settled, deadlines,
//! reruns, resuming in a later run, and exactly-once rows across SIGKILLs.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use paysync::mock::MockOptions;

use crate::util::*;

const SECRET: &str = paysync::mock::DEFAULT_API_SECRET;

/// An order's (status, tracking) rows in the order they were observed.
fn statuses_of(rows: &[serde_json::Value], order: &str) -> Vec<(String, String)> {
    let mut mine: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r["order_no"] == order).collect();
    mine.sort_by_key(|r| r["observed_at"].as_str().unwrap().to_owned());
    mine.into_iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap().to_owned(),
                r["tracking"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Orders going pending -> block confirmation -> paid over successive polls end
/// `paid`, with exactly one row per status change.
#[tokio::test(flavor = "multi_thread")]
async fn pending_orders_settle_with_one_row_per_status() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let orders = numbered("PENDING", 10);
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws
        .run(&["--input", "orders.csv", "--max-wait", "30s"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    for o in &orders {
        let s = statuses_of(&rows, o);
        let want = [
            ("pending", "polling"),
            ("confirming", "polling"),
            ("paid", "settled"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()));
        assert_eq!(s, want, "{o}");
        // pending twice (P = 2), confirming once, paid once.
        assert_eq!(server.polls_of(o), 4, "{o}");
    }
}

/// An order that never settles gets a final `deadline` row once `settle.max_wait`
/// has passed since it was first seen, and is not polled after that.
#[tokio::test(flavor = "multi_thread")]
async fn never_settling_order_gets_deadline_row() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("NEVER", 3)));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        "[settle]\nmax_wait = \"1s\"\npoll_interval = \"300ms\"\n",
    );
    let out = ws
        .run(&["--input", "orders.csv", "--max-wait", "30s"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    for (o, r) in latest(&rows) {
        assert_eq!(r["tracking"], "deadline", "{o}");
        assert_eq!(r["status"], "pending");
        assert_eq!(r["settled"], false);
        let s = statuses_of(&rows, &o);
        assert_eq!(s.first().unwrap().1, "polling");
    }
    let polls = server.counters().snapshot().payprotocol_detail_requests;
    // A later run polls nothing: tracking has stopped.
    let out = ws.run(&["--max-wait", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        server.counters().snapshot().payprotocol_detail_requests,
        polls
    );
}

/// Re-running the same input when everything is settled makes no provider
/// requests and writes no new rows.
#[tokio::test(flavor = "multi_thread")]
async fn rerun_of_settled_input_makes_no_requests() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let mut orders = numbered("PAID", 20);
    orders.extend(numbered("FAILED", 5));
    orders.extend(numbered("NOTFOUND", 5));
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let before = server.counters().snapshot();
    let files = ws.out_files();
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let after = server.counters().snapshot();
    assert_eq!(
        after.payprotocol_detail_requests,
        before.payprotocol_detail_requests
    );
    let new_files: BTreeSet<String> = ws.out_files().difference(&files).cloned().collect();
    assert!(new_files.is_empty(), "{new_files:?}");
    assert!(
        stdout(&out).contains("30 already known"),
        "{}",
        stdout(&out)
    );
    assert_eq!(ws.rows().len(), 30);
}

/// Orders left unsettled by a run without waiting are polled by a later run that
/// has no input at all, and their changes are exported then.
#[tokio::test(flavor = "multi_thread")]
async fn later_run_resumes_unsettled_orders() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let orders = numbered("PENDING", 5);
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "orders.csv", "--max-wait", "0s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        latest(&ws.rows())
            .values()
            .all(|r| r["status"] == "pending")
    );
    assert!(
        stdout(&out).contains("5 orders still unsettled"),
        "{}",
        stdout(&out)
    );

    let out = ws.run(&["--max-wait", "30s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    for o in &orders {
        let s: Vec<String> = statuses_of(&rows, o).into_iter().map(|(s, _)| s).collect();
        assert_eq!(s, ["pending", "confirming", "paid"], "{o}");
    }
}

/// Checks a workspace after crashes and a final clean rerun: every order has a
/// final row, no (order, status, tracking) repeats across manifested files, and
/// every visible data file has its manifest.
fn assert_consistent(ws: &Workspace, orders: &[String]) {
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    let latest = latest(&rows);
    for o in orders {
        let r = latest.get(o).unwrap_or_else(|| panic!("{o} missing"));
        assert_eq!(r["tracking"], "settled", "{o}: {r}");
    }
    let files = ws.out_files();
    for f in &files {
        if f.starts_with('.')
            || f.starts_with('_')
            || f.ends_with(".manifest.json")
            || f.starts_with("rejects-")
        {
            continue;
        }
        let stem = f.rsplit_once('.').unwrap().0;
        assert!(
            files.contains(&format!("{stem}.manifest.json")),
            "{f} has no manifest: {files:?}"
        );
    }
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with(".tmp") && !f.starts_with('.')),
        "{files:?}"
    );
}

/// SIGKILL at several moments (while fetching, half way through writing the data
/// file, right after its rename, after the manifest but before the state knows),
/// then a rerun: every order present, no duplicate rows, no partial files.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_any_moment_loses_and_duplicates_nothing() {
    for point in [
        "after-first-record",
        "mid-write",
        "after-data-rename",
        "before-batch-commit",
    ] {
        let server = mock(MockOptions::default()).await;
        let ws = Workspace::new();
        let mut orders = numbered("PAID", 30);
        orders.extend(numbered("PENDING", 10));
        ws.write("orders.csv", &orders_csv(&orders));
        ws.config(
            &server.payprotocol_base_url(),
            SECRET,
            "[fetch]\nconcurrency = 2\nrate_limit = 200.0\nburst = 1\n",
        );
        let crashed = ws
            .run_command(&["--input", "orders.csv", "--max-wait", "30s"])
            .env(paysync::failpoint::ENV, point)
            .output()
            .await
            .unwrap();
        assert_eq!(
            crashed.status.signal(),
            Some(9),
            "{point}: {}",
            stderr(&crashed)
        );
        let out = ws
            .run(&["--input", "orders.csv", "--max-wait", "30s"])
            .await;
        assert_eq!(out.status.code(), Some(0), "{point}: {}", stderr(&out));
        assert_consistent(&ws, &orders);
    }
}

/// A SIGKILL from outside while requests are in flight, then a rerun.
#[tokio::test(flavor = "multi_thread")]
async fn external_sigkill_while_fetching() {
    let server = mock(MockOptions {
        latency: Duration::from_millis(20),
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    let orders = numbered("PAID", 200);
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        "[fetch]\nconcurrency = 4\n",
    );
    let mut child = ws.run_command(&["--input", "orders.csv"]).spawn().unwrap();
    let counters = server.counters();
    wait_for("requests in flight", || {
        counters.snapshot().payprotocol_detail_requests >= 40
    })
    .await;
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(9));
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_consistent(&ws, &orders);
    // Orders recorded before the kill were not fetched again.
    assert!(server.counters().snapshot().payprotocol_detail_requests < 200 + 40);
}

/// A second paysync on the same state file is refused with a clear error while
/// the first runs; the first finishes normally.
#[tokio::test(flavor = "multi_thread")]
async fn second_process_on_same_state_is_refused() {
    let server = mock(MockOptions {
        latency: Duration::from_millis(50),
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("PAID", 40)));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        "[fetch]\nconcurrency = 1\n",
    );
    let first = ws.run_command(&["--input", "orders.csv"]).spawn().unwrap();
    let counters = server.counters();
    wait_for("first run fetching", || {
        counters.snapshot().payprotocol_detail_requests >= 1
    })
    .await;
    let second = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(second.status.code(), Some(4), "{}", stderr(&second));
    let err = stderr(&second);
    assert!(
        err.contains("in use by another paysync") && err.contains("state.db"),
        "{err}"
    );
    let first = first.wait_with_output().await.unwrap();
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(latest(&ws.rows()).len(), 40);
}

/// `paysync status` reports orders by status, the oldest unsettled order with its
/// next poll, and the last runs, also while a run holds the state.
#[tokio::test(flavor = "multi_thread")]
async fn status_reports_orders_and_runs() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    let mut orders = numbered("PAID", 4);
    orders.extend(numbered("NEVER", 2));
    ws.write("orders.csv", &orders_csv(&orders));
    ws.config(&server.payprotocol_base_url(), SECRET, "");
    let out = ws.run(&["--input", "orders.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = ws
        .paysync(&["status", "--config", "config.toml", "--json"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |status: &str, tracking: &str| {
        v["by_status"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["status"] == status && c["tracking"] == tracking)
            .map(|c| c["orders"].as_u64().unwrap())
    };
    assert_eq!(count("paid", "settled"), Some(4), "{v}");
    assert_eq!(count("pending", "polling"), Some(2), "{v}");
    assert!(
        v["oldest_unsettled"]["order_no"]
            .as_str()
            .unwrap()
            .contains("NEVER")
    );
    assert!(v["oldest_unsettled"]["next_poll_at"].is_string());
    assert_eq!(v["last_runs"].as_array().unwrap().len(), 1);
    let text = ws.paysync(&["status", "--config", "config.toml"]).await;
    assert_eq!(text.status.code(), Some(0));
    assert!(
        stdout(&text).contains("oldest unsettled: T-NEVER"),
        "{}",
        stdout(&text)
    );

    // While another run owns the state (lock held), status still reads it.
    let slow = mock(MockOptions {
        latency: Duration::from_millis(300),
        ..MockOptions::default()
    })
    .await;
    ws.config(
        &slow.payprotocol_base_url(),
        SECRET,
        "[fetch]\nconcurrency = 1\n",
    );
    ws.write("more.csv", &orders_csv(&numbered("PAID-MORE", 10)));
    let running = ws.run_command(&["--input", "more.csv"]).spawn().unwrap();
    let counters = slow.counters();
    wait_for("second run fetching", || {
        counters.snapshot().payprotocol_detail_requests >= 1
    })
    .await;
    let during = ws
        .paysync(&["status", "--config", "config.toml", "--json"])
        .await;
    assert_eq!(during.status.code(), Some(0), "{}", stderr(&during));
    let v: serde_json::Value = serde_json::from_slice(&during.stdout).unwrap();
    assert!(v["last_runs"][0]["finished_at"].is_null(), "{v}");
    let done = running.wait_with_output().await.unwrap();
    assert_eq!(done.status.code(), Some(0));

    // Without a state file, status says so (exit 4).
    std::fs::remove_file(ws.path("state.db")).unwrap();
    let none = ws.paysync(&["status", "--config", "config.toml"]).await;
    assert_eq!(none.status.code(), Some(4));
    assert!(
        stderr(&none).contains("does not exist"),
        "{}",
        stderr(&none)
    );
}

/// When polls take longer than the re-poll interval, `--max-wait 0s` still ends:
/// orders that come due again after the input was read wait for a later run.
#[tokio::test(flavor = "multi_thread")]
async fn slow_polls_do_not_keep_a_no_wait_run_alive() {
    let server = mock(MockOptions {
        latency: Duration::from_millis(250),
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    ws.write("orders.csv", &orders_csv(&numbered("NEVER", 6)));
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        "[fetch]\nconcurrency = 1\n[settle]\npoll_interval = \"50ms\"\n",
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        ws.run(&["--input", "orders.csv", "--max-wait", "0s"]),
    )
    .await
    .expect("the run ends");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(latest(&ws.rows()).len(), 6);
    assert!(server.counters().snapshot().payprotocol_detail_requests < 12);
}
