//! The bundled mock payment server: both providers' endpoints on one listener, with
//! their auth rules, deterministic per-order behaviour and optional faults. `demo`,
//! the tests and the benchmarks run against it (in-process via [`MockServer::start`],
//! or as `paysync mock-server` via [`serve_until`] and [`MockArgs`]).
//!
//! - [`MockOptions`]: credentials, rate limit, faults, latency, lifecycle lengths.
//! - [`MockServer`]: a running server: its address, base URLs, counters, shutdown.
//! - [`Counters`], [`CountersSnapshot`]: what the server saw (also `GET /__mock/stats`).
//! - [`MockArgs`]: the `paysync mock-server` flags.
//! - `scenario`: which lifecycle an order number follows; `faults`: rate limit and
//!   fault injection; `payprotocol`, `genauth`: the two providers' handlers.
//!
//! # Endpoints
//! | endpoint | provider |
//! |---|---|
//! | `GET /api/mer/payment/detail?outTradeNo=..[&outPaymentNo=..]` | PayProtocol (signed) |
//! | `GET /api/mer/conf/list/currency[?chainId=..]` | PayProtocol (signed) |
//! | `POST /api/v3/get-management-token` | GenAuth |
//! | `GET /api/v3/get-order-pay-detail?orderNo=..` | GenAuth (bearer token + user-pool header) |
//! | `GET /__mock/stats` | the [`CountersSnapshot`] as JSON (not counted) |
//!
//! # Behaviour by order number
//! If the order number contains one of these markers (case-insensitive; checked in
//! this order) the order follows that row; otherwise the row is picked by the
//! 64-bit FNV-1a hash of the order number (`% 100`, share in the last column), so
//! a file of random-looking numbers gets a realistic mix. `n` counts the order's
//! *answered* detail requests (faulted, throttled and unauthorized answers do not
//! advance it); P = `pending_polls` (default 2), C = `confirm_polls` (default 1).
//!
//! | marker | PayProtocol `paymentStatus` | GenAuth `payStatus` | unmarked share |
//! |---|---|---|---|
//! | `NOTFOUND` | HTTP 404 `{code:404}` | statusCode 404 (+ apiCode, requestId) | 3 % |
//! | `NODATA` | code 200, `"data": null` | statusCode 200, `"data": null` | - |
//! | `BADREQ` | HTTP 400 `{code:400}` | statusCode 400, apiCode as a string | - |
//! | `UNKNOWN` | 7 | `"9"` | - |
//! | `NEVER` | 1 forever | `"1"` forever | - |
//! | `PENDING` | 1 for P polls, 2 for C polls, then 0 | `"1"` for P polls, then `"3"` | 15 % |
//! | `CONFIRM` | 2 for C polls, then 0 | `"1"` for C polls, then `"3"` | 7 % |
//! | `PARTIAL` | 3 forever | `"3"` | 3 % |
//! | `FAILED` | 4 | `"4"` (cancelled) | 4 % |
//! | `REFUND` | 5 | `"4"` (cancelled) | 3 % |
//! | `EXPIRED` | 4 | `"5"` | 2 % |
//! | `BIG` | 0, ETH on chain 2, settlementAmount `123456789012345678901234` (> 2^64) | `"3"`, paidAmount `123456789012345678.9` | - |
//! | `PAID` | 0 | `"3"` or `"2"` (by hash) | 63 % |
//!
//! Amounts, times, hashes and addresses are derived from the same hash, so every
//! answer for an order is the same apart from its status. Unmarked paid PayProtocol
//! orders settle in TRON USDT (75 %), TRX (10 %), ETH-chain USDC (10 %) or chain-3
//! USDT with 18 decimals (5 %). Pending orders omit the paid fields; failed,
//! expired and unknown ones send them as `null`.
//!
//! # Faults
//! Checked in this order for each request: the rate limit (over it: PayProtocol
//! HTTP 429 with `Retry-After` per [`RetryAfterMode`], GenAuth HTTP 200 with
//! statusCode 429), then auth (PayProtocol HTTP 401, GenAuth statusCode 401), then
//! faults. A share `fault_share` of orders (chosen by hash with `seed`) fails its
//! first `max_consecutive_faults` detail attempts with a kind from `fault_kinds`,
//! then succeeds; `random_fault_rate` faults any request at random (seeded).
//! See [`FaultKind`] for what each fault looks like on the wire.

mod args;
mod counters;
mod faults;
mod genauth;
mod payprotocol;
mod scenario;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use args::MockArgs;
pub use counters::{Counters, CountersSnapshot};

/// Default PayProtocol API key of the mock.
pub const DEFAULT_API_KEY: &str = "demo-key";
/// Default PayProtocol API secret of the mock.
pub const DEFAULT_API_SECRET: &str = "demo-secret";
/// Default GenAuth access key id of the mock.
pub const DEFAULT_ACCESS_KEY_ID: &str = "demo-access-key-id";
/// Default GenAuth access key secret of the mock.
pub const DEFAULT_ACCESS_KEY_SECRET: &str = "demo-access-key-secret";
/// Default GenAuth user pool id (the `scoped_userpool_id` claim). The `~` and `?`
/// fall on byte positions that make the base64url JWT payload contain `-` and `_`,
/// so a client decoding it with the standard alphabet fails visibly.
pub const DEFAULT_USERPOOL_ID: &str = "~mo?ck-userpool";
/// Default address of `paysync mock-server`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How long [`MockServer::shutdown`] waits for open connections before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a throttled PayProtocol answer states when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RetryAfterMode {
    /// `Retry-After: <seconds>`, the wait rounded up (at least 1).
    #[default]
    Seconds,
    /// `Retry-After: <HTTP date>` of the moment the limit allows a request again.
    HttpDate,
    /// `Retry-After: 0`.
    Zero,
    /// No `Retry-After` header.
    Absent,
}

/// A fault the server can inject, and how it looks on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// PayProtocol: HTTP 500 with a JSON error; GenAuth: HTTP 200 with statusCode 500.
    Status500,
    /// PayProtocol: HTTP 502 with a JSON error; GenAuth: HTTP 502 with a text body.
    Status502,
    /// HTTP 503 with a JSON error (both).
    Status503,
    /// HTTP 502 with an HTML page (a proxy error), both.
    Html502,
    /// HTTP 200 with a truncated JSON body.
    Malformed,
    /// The connection is dropped after part of the body was sent.
    Reset,
    /// The answer (HTTP 504) comes after `slow_delay`, longer than a client timeout.
    Slow,
    /// HTTP 200 with a 2 MiB JSON body.
    TooLarge,
    /// HTTP 200 with an 8 MiB JSON body sent chunked, without `Content-Length`, so
    /// a client learns its size only while reading it.
    LargeChunked,
    /// PayProtocol: HTTP 429 (with `Retry-After` per mode, 1 s); GenAuth: statusCode 429.
    Throttle429,
}

impl FaultKind {
    /// Every kind, in the order of their flag names.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Status500,
        FaultKind::Status502,
        FaultKind::Status503,
        FaultKind::Html502,
        FaultKind::Malformed,
        FaultKind::Reset,
        FaultKind::Slow,
        FaultKind::TooLarge,
        FaultKind::LargeChunked,
        FaultKind::Throttle429,
    ];

    /// The flag name: `500`, `502`, `503`, `html`, `malformed`, `reset`, `slow`,
    /// `large`, `large-chunked`, `429`.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Status500 => "500",
            FaultKind::Status502 => "502",
            FaultKind::Status503 => "503",
            FaultKind::Html502 => "html",
            FaultKind::Malformed => "malformed",
            FaultKind::Reset => "reset",
            FaultKind::Slow => "slow",
            FaultKind::TooLarge => "large",
            FaultKind::LargeChunked => "large-chunked",
            FaultKind::Throttle429 => "429",
        }
    }
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown fault kind {s:?} (expected one of {})",
                    names.join(",")
                )
            })
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the mock behaves. [`Default`] is a well-behaved server with the demo credentials.
#[derive(Debug, Clone)]
pub struct MockOptions {
    pub payprotocol_api_key: String,
    pub payprotocol_api_secret: String,
    pub genauth_access_key_id: String,
    pub genauth_access_key_secret: String,
    /// Lifetime of GenAuth management tokens, seconds.
    pub genauth_expires_in: u64,
    /// The `scoped_userpool_id` claim, and the user-pool header value required.
    pub genauth_userpool_id: String,
    /// Requests per second over all provider endpoints (a bucket of one second's
    /// worth, at least 1). `None`, zero, negative or non-finite: no limit.
    pub rate_limit: Option<f64>,
    pub retry_after: RetryAfterMode,
    /// Share (0..=1) of orders whose first detail attempts fail.
    pub fault_share: f64,
    /// Fault kinds to pick from (by seeded hash); empty disables faults.
    pub fault_kinds: Vec<FaultKind>,
    /// How many attempts in a row a faulted order fails before it succeeds.
    pub max_consecutive_faults: u32,
    /// Share (0..=1) of all requests faulted at random (seeded), on top of order faults.
    pub random_fault_rate: f64,
    pub seed: u64,
    /// Added to every answer.
    pub latency: Duration,
    /// How long the `Slow` fault waits before answering.
    pub slow_delay: Duration,
    /// Answered polls a `PENDING` order stays pending.
    pub pending_polls: u32,
    /// Answered polls an order stays in block confirmation.
    pub confirm_polls: u32,
    /// PayProtocol: reject timestamps more than 60 s from the server clock.
    pub clock_skew_rejects: bool,
}

/// Default token lifetime, seconds (as the real GenAuth).
pub const DEFAULT_EXPIRES_IN: u64 = 7200;
/// Default number of failing attempts of a faulted order.
pub const DEFAULT_MAX_CONSECUTIVE_FAULTS: u32 = 2;
/// Default `Slow` fault delay.
pub const DEFAULT_SLOW_DELAY: Duration = Duration::from_secs(30);
/// Default answered polls in pending.
pub const DEFAULT_PENDING_POLLS: u32 = 2;
/// Default answered polls in block confirmation.
pub const DEFAULT_CONFIRM_POLLS: u32 = 1;
/// Default fault kinds: the cheap, realistic ones (not `slow` or `large`).
pub const DEFAULT_FAULT_KINDS: [FaultKind; 6] = [
    FaultKind::Status500,
    FaultKind::Status503,
    FaultKind::Html502,
    FaultKind::Malformed,
    FaultKind::Reset,
    FaultKind::Throttle429,
];
/// The largest skew between a PayProtocol timestamp and the server clock.
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            payprotocol_api_key: DEFAULT_API_KEY.into(),
            payprotocol_api_secret: DEFAULT_API_SECRET.into(),
            genauth_access_key_id: DEFAULT_ACCESS_KEY_ID.into(),
            genauth_access_key_secret: DEFAULT_ACCESS_KEY_SECRET.into(),
            genauth_expires_in: DEFAULT_EXPIRES_IN,
            genauth_userpool_id: DEFAULT_USERPOOL_ID.into(),
            rate_limit: None,
            retry_after: RetryAfterMode::Seconds,
            fault_share: 0.0,
            fault_kinds: DEFAULT_FAULT_KINDS.to_vec(),
            max_consecutive_faults: DEFAULT_MAX_CONSECUTIVE_FAULTS,
            random_fault_rate: 0.0,
            seed: 0,
            latency: Duration::ZERO,
            slow_delay: DEFAULT_SLOW_DELAY,
            pending_polls: DEFAULT_PENDING_POLLS,
            confirm_polls: DEFAULT_CONFIRM_POLLS,
            clock_skew_rejects: true,
        }
    }
}

/// A running mock server. Dropping it stops the server too (without waiting).
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `listen` (use port 0 for any free port) and serves in a background task.
    pub async fn start(listen: SocketAddr, opts: MockOptions) -> std::io::Result<MockServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let listener = listener.tap_io(|tcp| {
            // Small request/answer pairs: do not let Nagle delay them.
            let _ = tcp.set_nodelay(true);
        });
        Self::start_on(listener, opts)
    }

    /// Serves on `listener` (HTTP/1.1, and HTTP/2 when a client opens with its
    /// preface) in a background task. Tests pass a TLS listener to serve https.
    pub fn start_on<L>(listener: L, opts: MockOptions) -> std::io::Result<MockServer>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts));
        let app = router(shared.clone());
        let stop = shared.cancel.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(error = %e, "mock server stopped with an error");
            }
        });
        Ok(MockServer {
            addr,
            shared,
            task: Some(task),
        })
    }

    /// The bound address (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PayProtocol `base_url`: `http://ADDR/api/mer`.
    pub fn payprotocol_base_url(&self) -> String {
        format!("http://{}/api/mer", self.addr)
    }

    /// GenAuth host: `http://ADDR`.
    pub fn genauth_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The live counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.counters.clone()
    }

    /// Detail requests received for `order_no` (see [`Counters::polls_of`]).
    pub fn polls_of(&self, order_no: &str) -> u32 {
        self.shared.counters.polls_of(order_no)
    }

    /// Every GenAuth management token issued so far and not yet swept out, so tests
    /// can check that no token value leaks into logs or files.
    pub fn issued_tokens(&self) -> Vec<String> {
        let tokens = self.shared.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens.keys().cloned().collect()
    }

    /// Moves the server's clock forward (token expiry, PayProtocol timestamp check,
    /// rate-limit refill), so tests can expire tokens without sleeping.
    pub fn advance_clock(&self, by: Duration) {
        self.shared.clock.advance(by);
    }

    /// Stops accepting, ends waits of in-flight `Slow`/latency answers, and waits
    /// (up to a few seconds) for open connections to finish.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// Runs the mock server on `listen` until `shutdown` completes: over https with
/// `tls` (see [`crate::tls_server`]), else plain http. `on_bound` gets the bound
/// address (the real port when `listen` asks for port 0) before the first
/// request can be answered; `paysync mock-server` prints it.
pub async fn serve_until(
    listen: SocketAddr,
    opts: MockOptions,
    tls: Option<Arc<rustls::ServerConfig>>,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let server = match tls {
        Some(config) => {
            let tcp = tokio::net::TcpListener::bind(listen).await?;
            MockServer::start_on(crate::tls_server::TlsListener::new(tcp, config), opts)?
        }
        None => MockServer::start(listen, opts).await?,
    };
    on_bound(server.addr());
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/mer/payment/detail", get(payprotocol::detail))
        .route("/api/mer/conf/list/currency", get(payprotocol::currency))
        .route("/api/v3/get-management-token", post(genauth::token))
        .route("/api/v3/get-order-pay-detail", get(genauth::detail))
        .route("/__mock/stats", get(stats))
        .fallback(unknown_endpoint)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            count_http2,
        ))
        .with_state(shared)
}

/// Counts the provider requests that came over HTTP/2 (`/__mock/stats` aside).
async fn count_http2(
    State(s): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.version() == axum::http::Version::HTTP_2 && req.uri().path() != "/__mock/stats" {
        counters::bump(&s.counters.http2_requests);
    }
    next.run(req).await
}

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &s.counters.snapshot())
}

async fn unknown_endpoint(State(s): State<Arc<Shared>>) -> Response {
    s.counters.arrival();
    json_response(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"code": 404, "msg": "no such endpoint"}),
    )
}

/// A JSON answer.
pub(crate) fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response()
}

/// The value of query parameter `name`, form-decoded, from a raw query string.
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The server's clock: real time plus an offset tests can advance.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    offset_ns: AtomicU64,
}

impl Clock {
    fn offset(&self) -> Duration {
        Duration::from_nanos(self.offset_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn now(&self) -> Instant {
        Instant::now() + self.offset()
    }

    pub(crate) fn system_now(&self) -> SystemTime {
        SystemTime::now() + self.offset()
    }

    /// Unix seconds now.
    pub(crate) fn unix_secs(&self) -> i64 {
        self.system_now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// State shared by every handler of one server.
pub(crate) struct Shared {
    pub(crate) opts: MockOptions,
    pub(crate) counters: Arc<Counters>,
    pub(crate) clock: Clock,
    /// The server-side rate limit, if any.
    pub(crate) limiter: Option<Mutex<faults::Bucket>>,
    /// Issued GenAuth tokens and when they expire (server clock).
    pub(crate) tokens: RwLock<HashMap<String, Instant>>,
    /// A counter for ids and random draws (request ids, jti, random faults).
    pub(crate) seq: AtomicU64,
    /// The body of the `TooLarge` fault, built once.
    pub(crate) large_body: Bytes,
    /// Cancelled on shutdown: ends the server and any waits in handlers.
    pub(crate) cancel: CancellationToken,
}

impl Shared {
    fn new(opts: MockOptions) -> Shared {
        let limiter = opts
            .rate_limit
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(|rate| Mutex::new(faults::Bucket::new(rate, Instant::now())));
        Shared {
            opts,
            counters: Arc::new(Counters::default()),
            clock: Clock::default(),
            limiter,
            tokens: RwLock::new(HashMap::new()),
            seq: AtomicU64::new(0),
            large_body: faults::large_body(),
            cancel: CancellationToken::new(),
        }
    }

    /// The next value of the shared sequence.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// A request id for error bodies (32 hex digits, unique per server).
    pub(crate) fn request_id(&self) -> String {
        let n = self.next_seq();
        format!(
            "{:016x}{:016x}",
            scenario::mix(self.opts.seed, n),
            scenario::mix(n, 0x5eed)
        )
    }

    /// Waits `d` unless the server shuts down first; false if it was cut short.
    pub(crate) async fn pause(&self, d: Duration) -> bool {
        if d.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// The configured latency, added to every provider answer.
    pub(crate) async fn latency(&self) {
        self.pause(self.opts.latency).await;
    }
}
