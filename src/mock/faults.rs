//! Trouble the mock server makes on purpose: the server-side rate limit
//! ([`Bucket`], `Retry-After`), the decision which request gets a fault
//! ([`Shared::fault_for`]), and the answers both providers give for the faults that
//! look the same on either ([`common_fault`]).

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::counters::{Family, bump};
use super::scenario::{fnv1a, mix, unit};
use super::{FaultKind, RetryAfterMode, Shared};

/// A token bucket holding at most one second's worth of requests (at least one).
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: f64, now: Instant) -> Bucket {
        let capacity = rate.max(1.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is available (nothing is taken).
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// The `Retry-After` value for a wait of `wait` in `mode` at `now`.
pub(crate) fn retry_after_value(
    mode: RetryAfterMode,
    wait: Duration,
    now: std::time::SystemTime,
) -> Option<HeaderValue> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    match mode {
        RetryAfterMode::Seconds => Some(HeaderValue::from(secs.max(1))),
        RetryAfterMode::HttpDate => {
            // HTTP dates have whole seconds: round up so the date is never early.
            let at = now + Duration::from_secs(secs.max(1));
            HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
        }
        RetryAfterMode::Zero => Some(HeaderValue::from_static("0")),
        RetryAfterMode::Absent => None,
    }
}

/// Salt of the random-fault draws, so they differ from order-fault draws.
const RANDOM_SALT: u64 = 0x7261_6e64_6f6d;

impl Shared {
    /// Applies the rate limit to one request: `Err(wait)` when it is over the limit.
    pub(crate) fn over_limit(&self) -> Option<Duration> {
        let limiter = self.limiter.as_ref()?;
        let now = self.clock.now();
        let mut b = limiter.lock().unwrap_or_else(|e| e.into_inner());
        b.take(now).err()
    }

    /// The `Retry-After` header for a throttled answer, per the configured mode.
    pub(crate) fn retry_after(&self, wait: Duration) -> Option<HeaderValue> {
        retry_after_value(self.opts.retry_after, wait, self.clock.system_now())
    }

    /// Whether an order of this number is one of the faulted share.
    pub(crate) fn order_is_faulted(&self, order_no: &str) -> bool {
        let h = mix(self.opts.seed, fnv1a(order_no.as_bytes()));
        unit(h) < self.opts.fault_share
    }

    /// Decides whether this request gets a fault, after it passed the rate limit
    /// and auth. A detail request (`order` given) counts as an attempt of that
    /// order: a faulted order fails attempts 1..=`max_consecutive_faults`. Any
    /// request may also draw a random fault. Counts the fault when there is one.
    pub(crate) fn fault_for(&self, family: Family, order: Option<&str>) -> Option<FaultKind> {
        let kinds = &self.opts.fault_kinds;
        if kinds.is_empty() {
            return None;
        }
        let mut fault = None;
        if let Some(order_no) = order {
            let attempt = self.counters.orders.update(family, order_no, |s| {
                s.attempts += 1;
                s.attempts
            });
            if attempt <= self.opts.max_consecutive_faults && self.order_is_faulted(order_no) {
                let h = mix(
                    mix(self.opts.seed, fnv1a(order_no.as_bytes())),
                    u64::from(attempt),
                );
                fault = Some(kinds[(h % kinds.len() as u64) as usize]);
            }
        }
        if fault.is_none() && self.opts.random_fault_rate > 0.0 {
            let h = mix(self.opts.seed ^ RANDOM_SALT, self.next_seq());
            if unit(h) < self.opts.random_fault_rate {
                fault = Some(kinds[(mix(h, 1) % kinds.len() as u64) as usize]);
            }
        }
        if let Some(kind) = fault {
            bump(&self.counters.faults_injected);
            if kind == FaultKind::Throttle429 {
                bump(&self.counters.throttled);
            }
        }
        fault
    }
}

/// What the `Malformed` fault sends: JSON cut off in the middle.
const TRUNCATED_JSON: &str =
    r#"{"code":200,"msg":"success","statusCode":200,"data":{"outTradeNo":"#;

/// What the `Html502` fault sends, as a proxy in front of the API would.
const HTML_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// Size of the `TooLarge` fault body.
pub(crate) const LARGE_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A valid JSON object of [`LARGE_BODY_BYTES`] bytes.
pub(crate) fn large_body() -> Bytes {
    let head = br#"{"code":200,"msg":"success","statusCode":200,"data":{"padding":""#;
    let tail = br#""}}"#;
    let mut v = Vec::with_capacity(LARGE_BODY_BYTES);
    v.extend_from_slice(head);
    v.resize(LARGE_BODY_BYTES - tail.len(), b'x');
    v.extend_from_slice(tail);
    Bytes::from(v)
}

/// The answer to a fault that looks the same for both providers; `None` for the
/// kinds each provider answers its own way (5xx codes, throttling).
pub(crate) async fn common_fault(s: &Shared, kind: FaultKind) -> Option<Response> {
    let json = [(CONTENT_TYPE, "application/json")];
    Some(match kind {
        FaultKind::Html502 => (
            StatusCode::BAD_GATEWAY,
            [(CONTENT_TYPE, "text/html")],
            HTML_502,
        )
            .into_response(),
        FaultKind::Malformed => (StatusCode::OK, json, TRUNCATED_JSON).into_response(),
        FaultKind::TooLarge => (StatusCode::OK, json, s.large_body.clone()).into_response(),
        FaultKind::LargeChunked => chunked_large_response(),
        FaultKind::Slow => {
            s.pause(s.opts.slow_delay).await;
            (
                StatusCode::GATEWAY_TIMEOUT,
                [(CONTENT_TYPE, "text/plain")],
                "upstream timed out",
            )
                .into_response()
        }
        FaultKind::Reset => reset_response(),
        FaultKind::Status500
        | FaultKind::Status502
        | FaultKind::Status503
        | FaultKind::Throttle429 => return None,
    })
}

/// Size of the `LargeChunked` fault body.
pub(crate) const CHUNKED_BODY_BYTES: usize = 8 * 1024 * 1024;

/// HTTP 200 with a JSON body of [`CHUNKED_BODY_BYTES`] in 64 KiB chunks and no
/// `Content-Length`: only reading tells how big it is. The chunks are produced
/// as they are sent, and stop when the client hangs up.
fn chunked_large_response() -> Response {
    use futures::StreamExt;
    const CHUNK: usize = 64 * 1024;
    let head =
        Bytes::from_static(br#"{"code":200,"msg":"success","statusCode":200,"data":{"padding":""#);
    let tail = Bytes::from_static(br#""}}"#);
    let pad = CHUNKED_BODY_BYTES - head.len() - tail.len();
    let filler = Bytes::from(vec![b'x'; CHUNK]);
    let middle = futures::stream::iter((0..pad.div_ceil(CHUNK)).map(move |i| {
        let n = CHUNK.min(pad - i * CHUNK);
        filler.slice(..n)
    }));
    let body = futures::stream::once(async { head })
        .chain(middle)
        .chain(futures::stream::once(async { tail }))
        .map(Ok::<Bytes, std::io::Error>);
    (
        StatusCode::OK,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        Body::from_stream(body),
    )
        .into_response()
}

/// HTTP 200 announcing a 4 KiB JSON body; the connection drops after 64 bytes.
/// The error comes one scheduler turn after the first chunk, so hyper has flushed
/// the headers and the chunk by then: the client sees the break mid-body.
fn reset_response() -> Response {
    use futures::StreamExt;
    let first =
        Bytes::from_static(&br#"{"code":200,"msg":"success","statusCode":200,"data":{"outTra"#[..]);
    let head = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(first) });
    let reset = futures::stream::once(async {
        tokio::task::yield_now().await;
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "mock: connection reset fault",
        ))
    });
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (CONTENT_LENGTH, HeaderValue::from(4096u32)),
        ],
        Body::from_stream(head.chain(reset)),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket allows one second's worth at once, then refills at the rate and
    /// says how long to wait.
    #[test]
    fn bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2.0, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        assert_eq!(b.take(t0), Err(Duration::from_millis(500)));
        assert!(b.take(t0 + Duration::from_millis(500)).is_ok());
        // A slow rate still allows one request at once.
        let mut slow = Bucket::new(0.1, t0);
        assert!(slow.take(t0).is_ok());
        assert_eq!(slow.take(t0), Err(Duration::from_secs(10)));
    }

    /// Each Retry-After mode, with the wait rounded up to whole seconds.
    #[test]
    fn retry_after_modes() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = |m, w| retry_after_value(m, w, now).map(|h| h.to_str().unwrap_or("?").to_owned());
        assert_eq!(
            v(RetryAfterMode::Seconds, Duration::from_millis(1200)).as_deref(),
            Some("2")
        );
        assert_eq!(
            v(RetryAfterMode::Seconds, Duration::from_millis(10)).as_deref(),
            Some("1")
        );
        assert_eq!(
            v(RetryAfterMode::HttpDate, Duration::from_millis(1200)).as_deref(),
            Some("Tue, 14 Nov 2023 22:13:22 GMT")
        );
        assert_eq!(
            v(RetryAfterMode::Zero, Duration::from_secs(5)).as_deref(),
            Some("0")
        );
        assert_eq!(v(RetryAfterMode::Absent, Duration::from_secs(5)), None);
    }

    /// The large body is exactly 2 MiB of valid JSON.
    #[test]
    fn large_body_is_json() {
        let b = large_body();
        assert_eq!(b.len(), LARGE_BODY_BYTES);
        assert!(serde_json::from_slice::<serde_json::Value>(&b).is_ok());
    }
}
