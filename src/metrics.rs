//! Daemon metrics in the Prometheus text format, served on `metrics.listen`
//! (off by default): request counters from the transport, orders by status and
//! tracking state, the oldest unsettled order's age, rows waiting for export, the
//! bytes of each queue file not read yet, and the last export time. The format is a
//! handful of lines, written directly. With a bearer token configured
//! (`metrics.bearer_token_*`), a scrape without `Authorization: Bearer <token>` is
//! answered 401. With a certificate and key (`metrics.tls_*_file`) it is served
//! over https only ([`crate::tls_server`]).

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::fetch::Stats;
use crate::state::{StateStore, StatusReport};

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub stats: Arc<Stats>,
    pub store: Arc<dyn StateStore>,
}

/// Renders the exposition text for a status report and the request counters.
pub fn render(
    stats: &Stats,
    report: &StatusReport,
    last_export: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    counter(
        "paysync_requests_total",
        "HTTP requests sent to the provider (token and currency calls included).",
        &[("", Stats::get(&stats.requests))],
    );
    counter(
        "paysync_request_failures_total",
        "Failed attempts by class.",
        &[
            ("{class=\"throttled\"}", Stats::get(&stats.throttled)),
            ("{class=\"timeout\"}", Stats::get(&stats.timeouts)),
            ("{class=\"transport\"}", Stats::get(&stats.transport_errors)),
            ("{class=\"server\"}", Stats::get(&stats.server_errors)),
            ("{class=\"malformed\"}", Stats::get(&stats.malformed)),
        ],
    );
    counter(
        "paysync_throttled_total",
        "Throttling answers (HTTP 429 or a 429 code in the body).",
        &[("", Stats::get(&stats.throttled))],
    );
    counter(
        "paysync_retries_total",
        "Attempts that were retried.",
        &[("", Stats::get(&stats.retries))],
    );
    let _ = writeln!(
        out,
        "# HELP paysync_orders Orders in the state store by status and tracking.\n# TYPE paysync_orders gauge"
    );
    for c in &report.by_status {
        let _ = writeln!(
            out,
            "paysync_orders{{status=\"{}\",tracking=\"{}\"}} {}",
            c.status, c.tracking, c.orders
        );
    }
    let age = report
        .oldest_unsettled
        .as_ref()
        .map(|o| (now - o.first_seen_at).num_milliseconds().max(0) as f64 / 1000.0)
        .unwrap_or(0.0);
    let _ = writeln!(
        out,
        "# HELP paysync_oldest_unsettled_age_seconds Age of the oldest order still tracked (0 if none).\n# TYPE paysync_oldest_unsettled_age_seconds gauge\npaysync_oldest_unsettled_age_seconds {age}"
    );
    let _ = writeln!(
        out,
        "# HELP paysync_unexported_rows Observation rows waiting for the next export.\n# TYPE paysync_unexported_rows gauge\npaysync_unexported_rows {}",
        report.unexported_rows
    );
    let _ = writeln!(
        out,
        "# HELP paysync_queue_unread_bytes Bytes of each queue file the next ingest will read (all of a replaced file).\n# TYPE paysync_queue_unread_bytes gauge"
    );
    for q in &report.queue_positions {
        let b = crate::input::queue_backlog(&q.path, &q.identity, q.offset);
        let _ = writeln!(
            out,
            "paysync_queue_unread_bytes{{path=\"{}\",file=\"{}\"}} {}",
            label_value(&b.path),
            b.file.as_str(),
            b.unread_bytes
        );
    }
    let last = last_export
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
        .unwrap_or(0.0);
    let _ = writeln!(
        out,
        "# HELP paysync_last_export_timestamp_seconds Unix time of the last committed export (0 if none).\n# TYPE paysync_last_export_timestamp_seconds gauge\npaysync_last_export_timestamp_seconds {last}"
    );
    out
}

/// A label value in the exposition format: backslash, quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The endpoint's state: what a scrape reads, and the SHA-256 of the bearer token
/// it must present, if any (compared as digests, so the comparison's timing says
/// nothing of the token).
#[derive(Clone)]
struct Endpoint {
    sources: Sources,
    token: Option<[u8; 32]>,
}

/// Whether `headers` carry `Authorization: Bearer <token>` for the token whose
/// digest is `want`.
fn authorized(headers: &HeaderMap, want: &[u8; 32]) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| Sha256::digest(token.trim().as_bytes())[..] == want[..])
}

async fn scrape(State(endpoint): State<Endpoint>, headers: HeaderMap) -> Response {
    if let Some(want) = &endpoint.token
        && !authorized(&headers, want)
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"paysync\"")],
            "a bearer token is required\n",
        )
            .into_response();
    }
    let src = endpoint.sources;
    let store = src.store.clone();
    let report = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::state::StateError>((store.status_report(0)?, store.last_commit_at()?))
    })
    .await;
    match report {
        Ok(Ok((report, last))) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(&src.stats, &report, last, chrono::Utc::now()),
        )
            .into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "state store unavailable\n").into_response(),
    }
}

/// Serves `/metrics` on `addr` until `shutdown` resolves; with `token`, only to
/// scrapers that send it as a bearer token; with `tls`, over https only.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    token: Option<SecretString>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let token: Option<[u8; 32]> =
        token.map(|t| Sha256::digest(t.expose_secret().trim().as_bytes()).into());
    tracing::info!(%addr, bearer_token = token.is_some(), https = tls.is_some(), "metrics endpoint listening");
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Endpoint { sources, token });
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(config) => {
            axum::serve(crate::tls_server::TlsListener::new(listener, config), app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::QueuePosition;

    /// Only `Authorization: Bearer <the token>` passes (surrounding blanks in the
    /// token are not part of it, as in a token file's last line).
    #[test]
    fn bearer_token_check() {
        let want: [u8; 32] = Sha256::digest(b"s3cret-token").into();
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            authorized(&h, &want)
        };
        assert!(!authorized(&HeaderMap::new(), &want));
        assert!(with("Bearer s3cret-token"));
        assert!(with("Bearer s3cret-token "));
        assert!(!with("Bearer s3cret-tokeN"));
        assert!(!with("Bearer s3cret-toke"));
        assert!(!with("Basic s3cret-token"));
        assert!(!with("s3cret-token"));
        assert!(!with("Bearer "));
    }

    /// Queue files are reported with escaped label values; one that is not there
    /// any more reads as missing with nothing to read.
    #[test]
    fn queue_backlog_lines() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("q \"1\"\\x.txt");
        std::fs::write(&odd, b"A1\nA2\n").unwrap();
        let file = std::fs::File::open(&odd).unwrap();
        let meta = file.metadata().unwrap();
        let identity = crate::input::queue_identity(&file, &meta, 3).unwrap();
        let report = StatusReport {
            provider: None,
            by_status: Vec::new(),
            oldest_unsettled: None,
            unexported_rows: 0,
            last_runs: Vec::new(),
            queue_positions: vec![
                QueuePosition {
                    path: odd.display().to_string(),
                    identity,
                    offset: 3,
                },
                QueuePosition {
                    path: dir.path().join("gone.txt").display().to_string(),
                    identity: "1:2".into(),
                    offset: 9,
                },
            ],
        };
        let text = render(&Stats::default(), &report, None, chrono::Utc::now());
        let dir = dir.path().display();
        assert!(
            text.contains(&format!(
                "paysync_queue_unread_bytes{{path=\"{dir}/q \\\"1\\\"\\\\x.txt\",file=\"current\"}} 3\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "paysync_queue_unread_bytes{{path=\"{dir}/gone.txt\",file=\"missing\"}} 0\n"
            )),
            "{text}"
        );
    }
}
