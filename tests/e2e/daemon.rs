//! `paysync daemon`: cron schedules, queue tailing from a durable offset, the inbox,
//! settling between exports, systemd notifications, and graceful shutdown.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paysync::mock::{MockOptions, MockServer};
use tokio::net::UnixDatagram;

use crate::util::*;

const SECRET: &str = paysync::mock::DEFAULT_API_SECRET;

/// Ingest every second, export every two seconds, fast re-polls.
const DAEMON: &str = r#"
[input]
queue_files = ["queue.txt"]
inbox_dir = "inbox"

[schedule]
ingest = "* * * * * *"
export = "*/2 * * * * *"

[settle]
poll_interval = "200ms"
confirming_interval = "200ms"
"#;

/// A loopback port nothing listens on (bound, read, and released).
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn append(ws: &Workspace, rel: &str, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ws.path(rel))
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// logrotate's `compress` without `delaycompress`: `queue.txt` is gzipped to
/// `to` and removed.
fn rotate_compressed(ws: &Workspace, to: &str) {
    let old = std::fs::read(ws.path("queue.txt")).unwrap();
    std::fs::remove_file(ws.path("queue.txt")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(ws.path(to)).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(&old).unwrap();
    gz.finish().unwrap();
}

/// The rows of every published rejects file in `out/`, without their headers,
/// sorted.
fn rejected_rows(ws: &Workspace) -> Vec<String> {
    let mut rows: Vec<String> = ws
        .out_files()
        .into_iter()
        .filter(|f| f.starts_with("rejects-"))
        .flat_map(|f| {
            let text = std::fs::read_to_string(ws.path("out").join(f)).unwrap();
            text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    rows.sort();
    rows
}

/// Collects what the daemon tells systemd through `NOTIFY_SOCKET`.
struct Notifications {
    path: std::path::PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Notifications {
    fn listen(ws: &Workspace) -> Self {
        let path = ws.path("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Self { path, seen }
    }

    fn has(&self, prefix: &str) -> bool {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with(prefix)))
    }
}

/// A mock server and a workspace configured for the daemon (`DAEMON`), with its
/// `inbox` directory.
async fn daemon_workspace() -> (MockServer, Workspace) {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("inbox")).unwrap();
    ws.config(&server.payprotocol_base_url(), SECRET, DAEMON);
    (server, ws)
}

/// A mock server and a daemon workspace whose `queue.txt` held `lines`, which a
/// daemon read, exported (`rows` orders) and stopped.
async fn queue_read_then_stopped(lines: &str, rows: usize) -> (MockServer, Workspace) {
    let (server, ws) = daemon_workspace().await;
    append(&ws, "queue.txt", lines);
    let daemon = start_daemon(&ws, None);
    wait_for("first lines exported", || latest(&ws.rows()).len() == rows).await;
    stop_by_sigterm(daemon).await;
    (server, ws)
}

/// Starts the daemon on `ws`, waits until `orders` orders are exported, stops it,
/// and checks that its log says `said`, that no row is written twice and that each
/// order was fetched once.
async fn run_until_exported(server: &MockServer, ws: &Workspace, orders: usize, said: &str) {
    let daemon = start_daemon(ws, None);
    wait_for(&format!("{orders} orders exported"), || {
        latest(&ws.rows()).len() == orders
    })
    .await;
    let err = stop_by_sigterm(daemon).await;
    assert!(err.contains(said), "{said:?} not in:\n{err}");
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    assert_eq!(rows.len(), orders);
    assert_eq!(
        server.counters().snapshot().payprotocol_detail_requests,
        orders as u64
    );
}

/// `paysync status --json`'s `queue_files`.
async fn queue_files(ws: &Workspace) -> Vec<serde_json::Value> {
    let out = ws
        .command(&["status", "--config", "config.toml", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["queue_files"].as_array().unwrap().clone()
}

fn start_daemon(ws: &Workspace, notify: Option<&Notifications>) -> tokio::process::Child {
    start_daemon_with(ws, notify, &[])
}

/// [`start_daemon`] with extra environment variables.
fn start_daemon_with(
    ws: &Workspace,
    notify: Option<&Notifications>,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    let mut cmd = ws.command(&["daemon", "--config", "config.toml", "--log-format", "json"]);
    cmd.envs(env.iter().copied());
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", &n.path)
            .env("WATCHDOG_USEC", "200000");
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// The daemon ingests a queue file the test keeps appending to and a CSV dropped
/// into the inbox, settles pending orders between exports, reports to systemd, and
/// exits 0 on SIGTERM with every order's rows committed exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn daemon_ingests_settles_exports_and_stops_cleanly() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("inbox")).unwrap();
    let metrics_port = unused_port();
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        &format!("{DAEMON}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    append(&ws, "queue.txt", "Q-PAID-1\nQ-PENDING-2\n");
    let notes = Notifications::listen(&ws);
    let mut daemon = start_daemon(&ws, Some(&notes));
    wait_for("READY=1", || notes.has("READY=1")).await;
    // WATCHDOG_USEC is set (200 ms): pings come at half of it.
    wait_for("WATCHDOG=1", || notes.has("WATCHDOG=1")).await;

    let counters = server.counters();
    wait_for("first queue lines fetched", || {
        counters.snapshot().payprotocol_detail_requests >= 2
    })
    .await;
    append(&ws, "queue.txt", "Q-PAID-3\nQ-FAILED-4\n# a comment\n");
    // A line still being written (no newline yet) waits until it is complete.
    append(&ws, "queue.txt", "Q-PAID-");
    ws.write("inbox/.partial.csv", "order_no\nI-PAID-0\n");
    ws.write(
        "inbox/drop.csv",
        "order_no,customer\nI-PAID-1,a\nI-PENDING-2,b\n",
    );
    wait_for("inbox file moved to done/", || {
        ws.path("inbox/done/drop.csv").exists()
    })
    .await;
    append(&ws, "queue.txt", "5\n");

    let expected = [
        "Q-PAID-1",
        "Q-PENDING-2",
        "Q-PAID-3",
        "Q-FAILED-4",
        "Q-PAID-5",
        "I-PAID-1",
        "I-PENDING-2",
    ];
    wait_for("all orders settled and exported", || {
        let latest = latest(&ws.rows());
        expected
            .iter()
            .all(|o| latest.get(*o).is_some_and(|r| r["tracking"] == "settled"))
    })
    .await;
    assert!(
        notes.has("STATUS=tracking"),
        "{:?}",
        notes.seen.lock().unwrap()
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "paysync_requests_total ",
        "paysync_throttled_total 0",
        "paysync_orders{status=\"paid\",tracking=\"settled\"}",
        "paysync_oldest_unsettled_age_seconds",
        "paysync_last_export_timestamp_seconds",
        // Every complete line was read (the file ends with one).
        "paysync_queue_unread_bytes{path=\"queue.txt\",file=\"current\"} 0",
    ] {
        assert!(metrics.contains(name), "{name} missing in:\n{metrics}");
    }
    sigterm(&daemon);
    let out = tokio::time::timeout(Duration::from_secs(30), daemon.wait())
        .await
        .expect("daemon stops after SIGTERM")
        .unwrap();
    assert_eq!(out.code(), Some(0));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    let latest = latest(&rows);
    assert_eq!(latest.len(), expected.len(), "{:?}", latest.keys());
    assert_eq!(latest["Q-PENDING-2"]["status"], "paid");
    assert_eq!(latest["I-PENDING-2"]["input"]["customer"], "b");
    // Pending orders were observed in each state: they settled between exports.
    assert_eq!(
        rows.iter()
            .filter(|r| r["order_no"] == "Q-PENDING-2")
            .count(),
        3
    );
    assert!(
        ws.path("inbox/.partial.csv").exists(),
        "hidden files are left alone"
    );
    assert!(notes.has("STOPPING=1"));
    let _ = daemon.stderr.take();
}

/// A restart resumes the queue at its saved offset (no line read twice, nothing
/// exported twice), and a truncated queue file is read again from its start.
#[tokio::test(flavor = "multi_thread")]
async fn restart_resumes_queue_offset_and_handles_truncation() {
    let (server, ws) = daemon_workspace().await;
    let first: Vec<String> = numbered("PAID", 5);
    append(&ws, "queue.txt", &format!("{}\n", first.join("\n")));
    let mut daemon = start_daemon(&ws, None);
    wait_for("first batch exported", || latest(&ws.rows()).len() == 5).await;
    sigterm(&daemon);
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));

    let second: Vec<String> = (0..3).map(|i| format!("R-PAID-{i}")).collect();
    let appended = format!("{}\n", second.join("\n"));
    append(&ws, "queue.txt", &appended);
    // `status` shows what the next ingest will read.
    let size = std::fs::metadata(ws.path("queue.txt")).unwrap().len();
    let queue = &queue_files(&ws).await[0];
    assert_eq!(queue["path"], "queue.txt");
    assert_eq!(queue["file"], "current");
    assert_eq!(queue["size"], size);
    assert_eq!(queue["offset"], size - appended.len() as u64);
    assert_eq!(queue["unread_bytes"], appended.len() as u64);
    let mut daemon = start_daemon(&ws, None);
    wait_for("second batch exported", || latest(&ws.rows()).len() == 8).await;
    // Each order was fetched once: the restart did not re-read the first lines.
    assert_eq!(server.counters().snapshot().payprotocol_detail_requests, 8);

    // Truncate and write fewer bytes than the saved offset: read from the start.
    std::fs::write(ws.path("queue.txt"), "T-PAID-x\n").unwrap();
    wait_for("truncated queue read", || {
        latest(&ws.rows()).contains_key("T-PAID-x")
    })
    .await;
    sigterm(&daemon);
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    assert_eq!(rows.len(), 9);
    assert_eq!(server.counters().snapshot().payprotocol_detail_requests, 9);
}

/// A queue file rewritten in place while the daemon was down (same inode, new
/// lines, more bytes than the saved offset: `copytruncate` and new appends) is
/// read from its start: no new line is skipped for sitting below the old offset.
#[tokio::test(flavor = "multi_thread")]
async fn queue_rewritten_in_place_is_read_from_its_start() {
    let first = format!("{}\n", numbered("PAID", 3).join("\n"));
    let (server, ws) = queue_read_then_stopped(&first, 3).await;

    let queue = ws.path("queue.txt");
    let (inode, saved_offset) = {
        let m = std::fs::metadata(&queue).unwrap();
        (m.ino(), m.len())
    };
    let fresh: Vec<String> = (0..6).map(|i| format!("W-PAID-{i}")).collect();
    let text = format!("{}\n", fresh.join("\n"));
    assert!(text.len() as u64 > saved_offset);
    std::fs::write(&queue, text).unwrap();
    assert_eq!(std::fs::metadata(&queue).unwrap().ino(), inode);

    run_until_exported(
        &server,
        &ws,
        9,
        "queue file was truncated or rewritten in place",
    )
    .await;
    let latest = latest(&ws.rows());
    for order in &fresh {
        assert!(latest.contains_key(order.as_str()), "{order} was skipped");
    }
}

/// logrotate's `copytruncate` while the daemon is down: the lines written before
/// the copy are read from the copy (found by its first bytes), then the truncated
/// file from its start, though it has grown past the old offset again.
#[tokio::test(flavor = "multi_thread")]
async fn queue_copytruncated_while_down_loses_no_line() {
    let (server, ws) = queue_read_then_stopped("A-PAID-1\nA-PAID-2\n", 2).await;

    append(&ws, "queue.txt", "B-PAID-1\nB-PAID-2\n");
    std::fs::copy(ws.path("queue.txt"), ws.path("queue.txt.1")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(ws.path("queue.txt"))
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&ws, "queue.txt", "C-PAID-1\nC-PAID-2\nC-PAID-3\n");
    run_until_exported(&server, &ws, 7, "queue file was rotated; reading the rest").await;
}

/// logrotate's `compress` without `delaycompress` while the daemon is down: the
/// rotated file is only there gzip-compressed, and its unread lines are read from
/// the compressed copy before the new file.
#[tokio::test(flavor = "multi_thread")]
async fn queue_rotated_and_compressed_while_down_loses_no_line() {
    let (server, ws) = queue_read_then_stopped("A-PAID-1\nA-PAID-2\n", 2).await;

    append(&ws, "queue.txt", "B-PAID-1\nbad line\nB-PAID-2\n");
    rotate_compressed(&ws, "queue.txt.1.gz");
    append(&ws, "queue.txt", "C-PAID-1\n");

    run_until_exported(&server, &ws, 5, "rotated and compressed").await;
    // The bad line is rejected with its line number in the rotated file. The
    // queue path is relative in the config; the rotated file is named beside it.
    let rejects = rejected_rows(&ws);
    assert!(
        rejects
            .iter()
            .any(|l| l.starts_with("queue.txt.1.gz,4,") && l.ends_with(",bad line")),
        "{rejects:?}"
    );
}

/// The rejected lines of a queue file and of an inbox file survive a crash right
/// after the ingest committed past them (the queue offset saved, the inbox file
/// moved to `done/`): they were synced to the rejects file first, and the next
/// start publishes it. They are not read, nor rejected, again.
#[tokio::test(flavor = "multi_thread")]
async fn rejects_survive_a_crash_after_the_ingest_commit() {
    let (_server, ws) = daemon_workspace().await;
    let leftovers = |ws: &Workspace| -> usize {
        ws.out_files()
            .iter()
            .filter(|f| f.starts_with(".rejects-"))
            .count()
    };
    let crash = |ws: &Workspace| {
        let child = start_daemon_with(ws, None, &[("PAYSYNC_FAILPOINT", "after-ingest-commit")]);
        async move {
            let out = child.wait_with_output().await.unwrap();
            assert_eq!(out.status.signal(), Some(9), "{}", stderr(&out));
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    let queue_reject = "queue.txt,2,order number contains whitespace,bad line";
    let inbox_reject = "inbox/a.csv,3,order number is empty,\",empty\"";

    // Dies right after saving the queue offset past the bad line.
    append(&ws, "queue.txt", "Q-PAID-1\nbad line\nQ-PAID-2\n");
    crash(&ws).await;
    assert_eq!(leftovers(&ws), 1, "{:?}", ws.out_files());
    assert!(rejected_rows(&ws).is_empty(), "{:?}", ws.out_files());

    // The next start publishes them, then dies right after moving the inbox file.
    ws.write("inbox/a.csv", "order_no,note\nI-PAID-1,x\n,empty\n");
    let log = crash(&ws).await;
    assert!(log.contains("published the rejects"), "{log}");
    assert!(ws.path("inbox/done/a.csv").exists());
    assert_eq!(rejected_rows(&ws), vec![queue_reject]);
    assert_eq!(leftovers(&ws), 1, "{:?}", ws.out_files());

    // A clean start publishes the inbox file's; nothing is read twice.
    let daemon = start_daemon(&ws, None);
    wait_for("3 orders exported", || latest(&ws.rows()).len() == 3).await;
    let log = stop_by_sigterm(daemon).await;
    assert!(log.contains("published the rejects"), "{log}");
    assert_eq!(rejected_rows(&ws), vec![inbox_reject, queue_reject]);
    assert_eq!(leftovers(&ws), 0, "{:?}", ws.out_files());
    assert_no_duplicates(&ws.rows());
}

/// With `metrics.bearer_token_file`, a scrape needs `Authorization: Bearer` with
/// that token (401 otherwise); the token is in no log line. A token file that
/// cannot be read stops the daemon at start, naming the key.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_with_a_bearer_token() {
    let (server, ws) = daemon_workspace().await;
    let port = unused_port();
    let token = "mEtRiCs-7f3a91c2d4";
    let metrics_cfg = format!(
        "{DAEMON}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nbearer_token_file = \"metrics-token\"\n"
    );
    ws.config(&server.payprotocol_base_url(), SECRET, &metrics_cfg);

    let out = ws
        .command(&["daemon", "--config", "config.toml"])
        .output()
        .await
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("metrics.bearer_token_file"), "{err}");

    ws.write("metrics-token", &format!("{token}\n"));
    append(&ws, "queue.txt", "Q-PAID-1\n");
    let daemon = start_daemon_with(&ws, None, &[("RUST_LOG", "paysync=trace")]);
    wait_for("first line exported", || latest(&ws.rows()).len() == 1).await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let client = reqwest::Client::new();
    let scrape = |auth: Option<String>| {
        let mut req = client.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let (status, body) = scrape(None).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("paysync_"), "{body}");
    assert_eq!(scrape(Some("Bearer wrong".into())).await.0, 401);
    let (status, body) = scrape(Some(format!("Bearer {token}"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("paysync_requests_total "), "{body}");
    let log = stop_by_sigterm(daemon).await;
    assert!(log.contains("metrics endpoint listening"), "{log}");
    assert!(!log.contains(token), "the token leaked into the log");
}

/// GET `/metrics` over https on 127.0.0.1:`port` as a client trusting the test CA,
/// with `Authorization: Bearer <token>` if given: the status and the body.
async fn https_scrape(port: u16, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let ca = include_bytes!("fixtures/test-ca.pem");
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // The server closes after the response; how it closes (with or without TLS
    // close_notify) does not matter here.
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    (status, response)
}

/// `metrics.tls_cert_file` / `tls_key_file`: the endpoint speaks https only. Half
/// a pair, a certificate file without certificates, a key file without a key and
/// a key that is not the certificate's are each exit 2 naming the key (and never
/// showing the key). Served: a client trusting the test CA gets 401 without the
/// token and 200 with it, plain http gets no answer, and a client that connects
/// and says nothing holds up no one.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_over_https() {
    let (server, ws) = daemon_workspace().await;
    let port = unused_port();
    let token = "tls-mEtRiCs-58c1e0";
    ws.write("metrics-token", &format!("{token}\n"));
    let key_pem = include_str!("fixtures/localhost-key.pem");
    ws.write("cert.pem", include_str!("fixtures/localhost-cert.pem"));
    ws.write("key.pem", key_pem);
    ws.write(
        "other-key.pem",
        include_str!("fixtures/self-signed-key.pem"),
    );
    let config = |tls: &str| {
        let metrics = format!(
            "{DAEMON}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nbearer_token_file = \"metrics-token\"\n{tls}"
        );
        ws.config(&server.payprotocol_base_url(), SECRET, &metrics);
    };
    let key_line = key_pem.lines().nth(1).unwrap();
    for (tls, key, says) in [
        (
            "tls_cert_file = \"cert.pem\"\n",
            "metrics.tls_key_file",
            "is required",
        ),
        (
            "tls_key_file = \"key.pem\"\n",
            "metrics.tls_cert_file",
            "is required",
        ),
        (
            "tls_cert_file = \"key.pem\"\ntls_key_file = \"key.pem\"\n",
            "metrics.tls_cert_file",
            "holds no PEM certificate",
        ),
        (
            "tls_cert_file = \"cert.pem\"\ntls_key_file = \"cert.pem\"\n",
            "metrics.tls_key_file",
            "no usable PEM private key",
        ),
        (
            "tls_cert_file = \"cert.pem\"\ntls_key_file = \"other-key.pem\"\n",
            "metrics.tls_key_file",
            "cannot be used with the certificate",
        ),
    ] {
        config(tls);
        for command in ["validate", "daemon"] {
            let out = ws
                .command(&[command, "--config", "config.toml"])
                .output()
                .await
                .unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{command} {tls}: {err}");
            assert!(
                err.contains(key) && err.contains(says),
                "{command} {tls}: {err}"
            );
            assert!(err.contains("config.toml"), "{err}");
            assert!(!err.contains(key_line), "the key leaked: {err}");
        }
    }

    config("tls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"\n");
    append(&ws, "queue.txt", "Q-PAID-1\n");
    let daemon = start_daemon_with(&ws, None, &[("RUST_LOG", "paysync=trace")]);
    wait_for("first line exported", || latest(&ws.rows()).len() == 1).await;
    // Holds a connection open without a handshake for the rest of the test.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let scrape = |token| {
        let scraped = https_scrape(port, token);
        async move {
            tokio::time::timeout(Duration::from_secs(30), scraped)
                .await
                .expect("the scrape was held up")
        }
    };
    let (status, body) = scrape(None).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("paysync_"), "{body}");
    let (status, body) = scrape(Some(token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("paysync_requests_total "), "{body}");
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await;
    assert!(plain.is_err(), "plain http was answered: {plain:?}");
    let log = stop_by_sigterm(daemon).await;
    assert!(log.contains("\"https\":true"), "{log}");
    assert!(!log.contains(token), "the token leaked into the log");
    assert!(!log.contains(key_line), "the key leaked into the log");
}

/// logrotate's `olddir`: rotated queue files moved to `input.rotated_dir` (here
/// relative to the queue file's directory), renamed or compressed, still have
/// their unread lines read.
#[tokio::test(flavor = "multi_thread")]
async fn queue_rotated_into_another_directory_loses_no_line() {
    let (server, ws) = queue_read_then_stopped("A-PAID-1\nA-PAID-2\n", 2).await;
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        &DAEMON.replace("[input]\n", "[input]\nrotated_dir = \"old\"\n"),
    );
    std::fs::create_dir(ws.path("old")).unwrap();

    append(&ws, "queue.txt", "B-PAID-1\nB-PAID-2\n");
    std::fs::rename(ws.path("queue.txt"), ws.path("old/queue.txt.1")).unwrap();
    append(&ws, "queue.txt", "C-PAID-1\n");
    run_until_exported(&server, &ws, 5, "queue file was rotated; reading the rest").await;

    append(&ws, "queue.txt", "C-PAID-2\nbad line\n");
    rotate_compressed(&ws, "old/queue.txt.1.gz");
    append(&ws, "queue.txt", "D-PAID-1\n");
    run_until_exported(&server, &ws, 7, "rotated and compressed").await;
    assert_eq!(
        rejected_rows(&ws),
        vec!["old/queue.txt.1.gz,3,order number contains whitespace,bad line"]
    );
}

/// A crash in the middle of reading a compressed rotated file resumes after the
/// last batch registered: no line of it is read, or rejected, twice.
#[tokio::test(flavor = "multi_thread")]
async fn compressed_tail_resumes_after_a_crash() {
    let (_server, ws) = queue_read_then_stopped("A-PAID-1\nA-PAID-2\n", 2).await;
    // More lines than one ingest batch (1,000), most of them rejected.
    let tail: Vec<String> = (1..=1200)
        .map(|i| {
            if i % 100 == 0 {
                format!("B-PAID-{i}")
            } else {
                format!("bad {i}")
            }
        })
        .collect();
    append(&ws, "queue.txt", &format!("{}\n", tail.join("\n")));
    rotate_compressed(&ws, "queue.txt.1.gz");
    append(&ws, "queue.txt", "C-PAID-1\n");

    // Dies right after the first batch of the compressed tail is registered.
    let crashed = start_daemon_with(&ws, None, &[("PAYSYNC_FAILPOINT", "after-ingest-commit")])
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));

    let daemon = start_daemon(&ws, None);
    wait_for("15 orders exported", || latest(&ws.rows()).len() == 15).await;
    let log = stop_by_sigterm(daemon).await;
    assert!(log.contains("rotated and compressed"), "{log}");
    assert_no_duplicates(&ws.rows());
    let rejected = rejected_rows(&ws);
    let mut expected: Vec<String> = (1..=1200)
        .filter(|i| i % 100 != 0)
        .map(|i| {
            format!(
                "queue.txt.1.gz,{},order number contains whitespace,bad {i}",
                i + 2
            )
        })
        .collect();
    expected.sort();
    assert_eq!(rejected.len(), expected.len());
    assert_eq!(rejected, expected);
}

/// A queue file emptied in place is reported once, not again at every ingest
/// while it stays empty, and the lines written to it later are read from its start.
#[tokio::test(flavor = "multi_thread")]
async fn emptied_queue_is_reported_once() {
    use tokio::io::AsyncBufReadExt;
    let (server, ws) = daemon_workspace().await;
    append(&ws, "queue.txt", "A-PAID-1\nA-PAID-2\n");
    let mut daemon = start_daemon_with(&ws, None, &[("RUST_LOG", "paysync=debug")]);
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = log.clone();
        let mut lines = tokio::io::BufReader::new(daemon.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Some(line) = lines.next_line().await.unwrap() {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    wait_for("first lines exported", || latest(&ws.rows()).len() == 2).await;

    std::fs::OpenOptions::new()
        .write(true)
        .open(ws.path("queue.txt"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let warning = "queue file was truncated or rewritten in place";
    wait_for("the emptied file noticed", || {
        log.lock().unwrap().contains(warning)
    })
    .await;
    let seen = log.lock().unwrap().len();
    wait_for("two more ingests of the empty file", || {
        log.lock().unwrap()[seen..]
            .matches("ingest found nothing new")
            .count()
            >= 2
    })
    .await;
    append(&ws, "queue.txt", "B-PAID-1\n");
    wait_for("the new line exported", || latest(&ws.rows()).len() == 3).await;
    sigterm(&daemon);
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
    reader.await.unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert_no_duplicates(&ws.rows());
    assert_eq!(server.counters().snapshot().payprotocol_detail_requests, 3);
}

/// A second signal ends the daemon at once, even with slow requests in flight;
/// the state stays usable and a later run finishes the work.
#[tokio::test(flavor = "multi_thread")]
async fn second_signal_exits_at_once_without_corrupting_state() {
    let server = mock(MockOptions {
        latency: Duration::from_secs(5),
        ..MockOptions::default()
    })
    .await;
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("inbox")).unwrap();
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        &format!("{DAEMON}\n[fetch]\ntimeout = \"20s\"\n"),
    );
    append(
        &ws,
        "queue.txt",
        &format!("{}\n", numbered("PAID", 4).join("\n")),
    );
    let mut daemon = start_daemon(&ws, None);
    let counters = server.counters();
    wait_for("requests in flight", || {
        counters.snapshot().total_requests >= 2
    })
    .await;
    sigterm(&daemon);
    tokio::time::sleep(Duration::from_millis(200)).await;
    sigterm(&daemon);
    let status = tokio::time::timeout(Duration::from_secs(3), daemon.wait())
        .await
        .expect("second signal exits at once")
        .unwrap();
    assert_eq!(status.code(), Some(143), "{status:?} {:?}", status.signal());
    server.shutdown().await;

    let fast = mock(MockOptions::default()).await;
    ws.config(&fast.payprotocol_base_url(), SECRET, DAEMON);
    let out = ws.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(latest(&ws.rows()).len(), 4);
}

/// A SIGTERM that arrives while the daemon is still starting (its first ingest is
/// stalled 2.5 s by the `slow-ingest` delay point, so the signal lands inside that
/// window whatever the machine's speed) is handled, never fatal: the daemon finishes
/// starting, stops cleanly with 0, and a later run finishes the work.
#[tokio::test(flavor = "multi_thread")]
async fn signal_while_starting_stops_cleanly() {
    let (_server, ws) = daemon_workspace().await;
    append(
        &ws,
        "queue.txt",
        &format!("{}\n", numbered("PAID", 3).join("\n")),
    );
    let daemon = start_daemon_with(&ws, None, &[("PAYSYNC_FAILPOINT", "slow-ingest")]);
    // The state's lock file exists once the state is open, which is after the
    // signal handlers are installed and before the first ingest.
    wait_for("state opened", || ws.path("state.db.lock").exists()).await;
    let err = stop_by_sigterm(daemon).await;
    assert!(err.contains("shutting down"), "{err}");

    let out = ws.run(&[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = ws.rows();
    assert_no_duplicates(&rows);
    assert_eq!(latest(&rows).len(), 3);
}

/// Like a systemd timer with `Persistent=true`: an export that fell due while the
/// daemon was down runs once at start, before the daemon reports ready.
#[tokio::test(flavor = "multi_thread")]
async fn export_missed_while_down_runs_at_start() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    // A yearly export: it would not fire during the test by itself.
    let daemon_cfg = "[schedule]\nexport = \"0 0 0 1 1 *\"\n";
    ws.config(&server.payprotocol_base_url(), SECRET, daemon_cfg);
    ws.write("a.csv", &orders_csv(&numbered("PAID", 3)));
    let out = ws.run(&["--input", "a.csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A second run dies after recording polls: rows wait in state, unexported.
    ws.write("b.csv", &orders_csv(&numbered("PAID-B", 3)));
    let crashed = ws
        .run_command(&["--input", "b.csv"])
        .env(paysync::failpoint::ENV, "after-first-record")
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9));
    // The last export was long ago: the yearly export fell due since.
    let db = rusqlite::Connection::open(ws.path("state.db")).unwrap();
    db.execute("UPDATE batches SET committed_at = 1577836800000", [])
        .unwrap();
    drop(db);
    let manifests = |ws: &Workspace| {
        ws.out_files()
            .iter()
            .filter(|f| f.ends_with(".manifest.json"))
            .count()
    };
    assert_eq!(manifests(&ws), 1);

    let notes = Notifications::listen(&ws);
    let mut daemon = start_daemon(&ws, Some(&notes));
    wait_for("READY=1", || notes.has("READY=1")).await;
    assert_eq!(manifests(&ws), 2, "exported at start: {:?}", ws.out_files());
    // It holds rows the crashed run recorded but never exported.
    assert!(
        ws.rows()
            .iter()
            .any(|r| r["order_no"].as_str().unwrap().starts_with("T-PAID-B-")),
        "{:?}",
        ws.rows()
    );
    sigterm(&daemon);
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
    assert_no_duplicates(&ws.rows());
}

/// A queue file rotated while the daemon is down: the lines appended to the old
/// file after the last ingest are read from the rotated file (found beside it by
/// its inode), then the new file from its start; each order is fetched once. When
/// the rotated file is gone too, the daemon says that its tail was not read.
#[tokio::test(flavor = "multi_thread")]
async fn queue_rotated_while_down_loses_no_line() {
    let (server, ws) = queue_read_then_stopped("A-PAID-1\nA-PAID-2\n", 2).await;

    // Down: two more lines, then logrotate's rename and a new file.
    append(&ws, "queue.txt", "B-PAID-1\nB-PAID-2\n");
    std::fs::rename(ws.path("queue.txt"), ws.path("queue.txt.1")).unwrap();
    append(&ws, "queue.txt", "C-PAID-1\n");
    let queue = &queue_files(&ws).await[0];
    assert_eq!(queue["file"], "replaced");
    assert_eq!(queue["unread_bytes"], "C-PAID-1\n".len());
    let daemon = start_daemon(&ws, None);
    wait_for("old tail and new file exported", || {
        latest(&ws.rows()).len() == 5
    })
    .await;
    // Lines appended to the new file later are read from where it was left.
    append(&ws, "queue.txt", "C-PAID-2\n");
    wait_for("new line exported", || latest(&ws.rows()).len() == 6).await;
    let err = stop_by_sigterm(daemon).await;
    assert!(
        err.contains("queue file was rotated; reading the rest"),
        "{err}"
    );
    assert_eq!(server.counters().snapshot().payprotocol_detail_requests, 6);

    // Down again: a line for the old file, then it is rotated and deleted.
    // (The new file is created before the old one is deleted, so that it cannot
    // reuse the old inode.)
    append(&ws, "queue.txt", "D-PAID-lost\n");
    std::fs::rename(ws.path("queue.txt"), ws.path("queue.txt.2")).unwrap();
    append(&ws, "queue.txt", "E-PAID-1\n");
    std::fs::remove_file(ws.path("queue.txt.2")).unwrap();
    run_until_exported(&server, &ws, 7, "old file is not in its directory any more").await;
    assert!(!latest(&ws.rows()).contains_key("D-PAID-lost"));
}

/// A job never overlaps a still-running instance of itself: while an inbox file is
/// being ingested (each turn stalled 2.5 s by the `slow-ingest` delay point, so
/// this does not depend on how fast ingest is), the next ingest turns are skipped,
/// and every order is registered once.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_ingest_is_not_started_again() {
    let server = mock(MockOptions::default()).await;
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("inbox")).unwrap();
    ws.config(
        &server.payprotocol_base_url(),
        SECRET,
        &format!("{DAEMON}\n[fetch]\nrate_limit = 5.0\nburst = 1\n"),
    );
    let notes = Notifications::listen(&ws);
    let daemon = start_daemon_with(&ws, Some(&notes), &[("PAYSYNC_FAILPOINT", "slow-ingest")]);
    wait_for("READY=1", || notes.has("READY=1")).await;
    ws.write("big.tmp", &orders_csv(&numbered("PAID", 5_000)));
    std::fs::rename(ws.path("big.tmp"), ws.path("inbox/big.csv")).unwrap();
    wait_for("inbox file ingested", || {
        ws.path("inbox/done/big.csv").exists()
    })
    .await;
    let err = stop_by_sigterm(daemon).await;
    assert!(
        err.contains("ingest still running; skipping this turn"),
        "{err}"
    );
    let out = ws
        .paysync(&["status", "--config", "config.toml", "--json"])
        .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = v["by_status"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["orders"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 5_000, "{v}");
}
