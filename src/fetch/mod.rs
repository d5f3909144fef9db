//! Fetching pay details under the provider's limits: the shared HTTP [`Transport`]
//! (rate limiter, pause gate, timeout, body cap), the retry loop [`fetch_order`], and
//! the request counters in [`Stats`].
//!
//! - `client`: the pooled HTTP client (hyper, rustls, environment proxies) and [`Request`].
//! - `endpoint`: a provider's base URL parsed once, and request URIs built from it.
//! - `ratelimit`: GCRA limiter plus the "pause every worker" gate used after a 429.
//! - `retry`: the one decision function that says retry, give up, or stop the run.

pub mod client;
pub mod endpoint;
pub mod ratelimit;
pub mod retry;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, RETRY_AFTER};
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::model::PayDetail;
use crate::provider::{FetchError, OrderRef, PayProvider, Provider};
pub use client::{BuildError, ClientOptions, ExtraRoots, HttpClient, Request};
pub use endpoint::{Endpoint, InvalidEndpoint};
pub use ratelimit::Limiter;
pub use retry::{Action, RetryPolicy};

/// Longest `Retry-After` paysync honours; a larger value is clamped to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Request counters for the end-of-run summary and metrics. Cheap to update from
/// every worker.
#[derive(Debug, Default)]
pub struct Stats {
    /// HTTP requests sent (every provider call, token and currency calls included).
    pub requests: AtomicU64,
    /// Attempts that were retried.
    pub retries: AtomicU64,
    /// Throttling answers (HTTP 429 or a 429 code in the body).
    pub throttled: AtomicU64,
    /// Failed attempts by class: timeouts, transport errors, 5xx, malformed bodies.
    pub timeouts: AtomicU64,
    pub transport_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub malformed: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn record_failure(&self, e: &FetchError) {
        match e {
            FetchError::Throttled { .. } => Self::bump(&self.throttled),
            FetchError::Timeout(_) => Self::bump(&self.timeouts),
            FetchError::Transport(_) => Self::bump(&self.transport_errors),
            FetchError::Server { .. } => Self::bump(&self.server_errors),
            FetchError::Malformed { .. } | FetchError::TooLarge { .. } => {
                Self::bump(&self.malformed)
            }
            FetchError::Auth(_) | FetchError::NotFound | FetchError::Rejected(_) => {}
        }
    }
}

/// An HTTP answer read in full (up to the body cap).
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// `Retry-After`, already turned into a delay from now (clamped to [`MAX_RETRY_AFTER`]).
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// The one way providers talk HTTP: waits for the limiter before every request,
/// applies the timeout to the whole exchange, and caps the body size.
#[derive(Clone)]
pub struct Transport {
    client: HttpClient,
    limiter: Arc<Limiter>,
    timeout: Duration,
    max_body: usize,
    stats: Arc<Stats>,
}

impl Transport {
    /// A transport whose client uses the proxies the environment names, set up as
    /// `options` say.
    pub fn new(
        limiter: Arc<Limiter>,
        timeout: Duration,
        max_body: usize,
        stats: Arc<Stats>,
        options: &ClientOptions,
    ) -> Result<Self, BuildError> {
        Ok(Self::with_client(
            HttpClient::new(options)?,
            limiter,
            timeout,
            max_body,
            stats,
        ))
    }

    /// A transport sending through `client` (tests pass one without proxies).
    pub fn with_client(
        client: HttpClient,
        limiter: Arc<Limiter>,
        timeout: Duration,
        max_body: usize,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            client,
            limiter,
            timeout,
            max_body,
            stats,
        }
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Sends one request after the limiter admits it, and reads the whole body.
    /// Requests whose content goes stale while waiting (signatures with a timestamp,
    /// access tokens) are built after [`Transport::admit`] and sent with
    /// [`Transport::send_admitted`] instead.
    pub async fn send(&self, request: Request) -> Result<RawResponse, FetchError> {
        self.admit().await;
        self.send_admitted(request).await
    }

    /// Waits until the limiter (and any pause) admits one request.
    pub async fn admit(&self) {
        self.limiter.acquire().await;
    }

    /// Sends a request already admitted by [`Transport::admit`].
    pub async fn send_admitted(&self, request: Request) -> Result<RawResponse, FetchError> {
        Stats::bump(&self.stats.requests);
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(self.timeout)),
        }
    }

    async fn exchange(&self, request: Request) -> Result<RawResponse, FetchError> {
        let resp = self
            .client
            .send(request)
            .await
            .map_err(|e| self.transport_error(&e))?;
        let (head, mut body) = resp.into_parts();
        let status = head.status.as_u16();
        let retry_after = if head.headers.contains_key(RETRY_AFTER) {
            parse_retry_after(&head.headers, SystemTime::now())
        } else {
            None
        };
        // A declared length over the cap is refused before reading.
        if body.size_hint().lower() > self.max_body as u64 {
            return Err(FetchError::TooLarge {
                limit: self.max_body,
            });
        }
        // Most answers arrive as one chunk: kept as is, without a copy.
        let mut first: Option<Bytes> = None;
        let mut more = BytesMut::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.transport_error(&e))?;
            // Trailers carry nothing paysync reads.
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            len += chunk.len();
            if len > self.max_body {
                return Err(FetchError::TooLarge {
                    limit: self.max_body,
                });
            }
            match first.take() {
                None if more.is_empty() => first = Some(chunk),
                None => more.extend_from_slice(&chunk),
                Some(head) => {
                    more.reserve(len);
                    more.extend_from_slice(&head);
                    more.extend_from_slice(&chunk);
                }
            }
        }
        let body = first.unwrap_or_else(|| more.freeze());
        Ok(RawResponse {
            status,
            retry_after,
            body,
        })
    }
}

impl Transport {
    /// [`transport_error`], with a hint when HTTP/2 was spoken without asking.
    fn transport_error(&self, e: &(dyn std::error::Error + 'static)) -> FetchError {
        let err = transport_error(e);
        if self.client.http2_prior_knowledge() {
            with_prior_knowledge_hint(err)
        } else {
            err
        }
    }
}

/// Points at `fetch.http2_prior_knowledge` in a transport error that speaking
/// HTTP/2 to a server that does not speak it causes: an HTTP/2 protocol error
/// (the server answered in HTTP/1.1), a request the server cut off (it closed on
/// the preface), or no protocol in common through ALPN.
fn with_prior_knowledge_hint(err: FetchError) -> FetchError {
    const SIGNS: [&str; 3] = ["http2 error", "(SendRequest)", "NoApplicationProtocol"];
    match err {
        FetchError::Transport(mut msg) if SIGNS.iter().any(|s| msg.contains(s)) => {
            msg.push_str(" (fetch.http2_prior_knowledge is set: does the server speak HTTP/2?)");
            FetchError::Transport(msg)
        }
        other => other,
    }
}

/// A client or body error as a [`FetchError`]: the error and its sources, one after
/// the other. None of them names the URL (it can carry order numbers of other systems'
/// choosing) or a header. A socket timeout anywhere in the chain is a timeout.
fn transport_error(e: &(dyn std::error::Error + 'static)) -> FetchError {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return FetchError::Timeout(Duration::ZERO);
        }
        let text = s.to_string();
        // Some wrappers repeat their source's message.
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    FetchError::Transport(msg)
}

/// Reads `Retry-After` as delay-seconds or an HTTP date, relative to `now`.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// The result of fetching one order with retries.
#[derive(Debug, Clone)]
pub struct Polled {
    pub result: Result<PayDetail, FetchError>,
    /// HTTP attempts made for this order in this fetch (1 or more).
    pub attempts: u32,
}

/// Fetches one order, retrying as [`retry::classify`] decides. A throttling answer
/// pauses every worker (through the shared limiter), not just this one.
pub async fn fetch_order(
    provider: &Provider,
    limiter: &Limiter,
    policy: &RetryPolicy,
    stats: &Stats,
    order: &OrderRef,
) -> Polled {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = provider.fetch_detail(order).await;
        if let Err(e) = &result {
            stats.record_failure(e);
        }
        match retry::classify(&result, attempts, policy, rand::random::<f64>()) {
            Action::Done | Action::GiveUp | Action::Abort => return Polled { result, attempts },
            Action::Retry { after, pause_all } => {
                Stats::bump(&stats.retries);
                tracing::debug!(order = %order.order_no, attempt = attempts, delay = ?after, error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(), "retrying");
                if pause_all {
                    limiter.pause_for(after);
                } else {
                    tokio::time::sleep(after).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    /// The prior-knowledge hint goes on the errors that speaking HTTP/2 to an
    /// HTTP/1.1 server causes, and on no other.
    #[test]
    fn prior_knowledge_hint() {
        let hinted = |msg: &str| match with_prior_knowledge_hint(FetchError::Transport(msg.into()))
        {
            FetchError::Transport(m) => m.ends_with("does the server speak HTTP/2?)"),
            other => panic!("{other:?}"),
        };
        assert!(hinted(
            "client error (SendRequest): http2 error: connection error detected: frame with invalid size"
        ));
        assert!(hinted(
            "client error (SendRequest): connection error: stream closed because of a broken pipe"
        ));
        assert!(hinted(
            "client error (Connect): received fatal alert: NoApplicationProtocol"
        ));
        assert!(!hinted(
            "client error (Connect): tcp connect error: Connection refused"
        ));
        assert!(matches!(
            with_prior_knowledge_hint(FetchError::Timeout(Duration::ZERO)),
            FetchError::Timeout(_)
        ));
    }

    /// A client error becomes its message and its sources' messages, once each; a
    /// socket timeout anywhere in the chain is a timeout.
    #[test]
    fn transport_errors_keep_their_chain() {
        #[derive(Debug)]
        struct Wrap(&'static str, std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.1)
            }
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = refused.to_string();
        assert_eq!(
            transport_error(&Wrap("client error (Connect)", refused)),
            FetchError::Transport(format!("client error (Connect): {text}"))
        );
        let repeated = std::io::Error::other("connection reset");
        assert_eq!(
            transport_error(&Wrap("connection reset", repeated)),
            FetchError::Transport("connection reset".into())
        );
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(
            transport_error(&Wrap("client error (Connect)", timed_out)),
            FetchError::Timeout(Duration::ZERO)
        );
    }

    /// Retry-After as seconds, as an HTTP date (past dates mean now), clamped, or
    /// unreadable (ignored).
    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let parse = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            parse_retry_after(&h, now)
        };
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("99999"), Some(MAX_RETRY_AFTER));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse(&later), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse(&earlier), Some(Duration::ZERO));
        assert_eq!(parse("soon"), None);
        assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
    }
}
