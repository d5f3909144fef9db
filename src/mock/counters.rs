//! What the mock server saw: request counters ([`Counters`], [`CountersSnapshot`]),
//! the busiest one-second window ([`Window`]) and per-order state ([`Orders`]).
//!
//! Everything here is updated from every request, so it is atomics or short
//! critical sections on `std::sync::Mutex` (never held across an await); the order
//! table is sharded so concurrent requests for different orders rarely contend.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::scenario::fnv1a;

/// Request counters of one mock server. Read them with [`Counters::snapshot`] (or
/// `GET /__mock/stats`), and per order with [`Counters::polls_of`].
#[derive(Debug)]
pub struct Counters {
    pub(crate) payprotocol_detail_requests: AtomicU64,
    pub(crate) payprotocol_currency_requests: AtomicU64,
    pub(crate) genauth_token_requests: AtomicU64,
    pub(crate) genauth_detail_requests: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) throttled: AtomicU64,
    pub(crate) faults_injected: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) total_requests: AtomicU64,
    pub(crate) http2_requests: AtomicU64,
    pub(crate) window: Window,
    pub(crate) orders: Orders,
}

/// A point-in-time copy of [`Counters`], as served by `GET /__mock/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersSnapshot {
    /// `GET /api/mer/payment/detail` requests received (any outcome).
    pub payprotocol_detail_requests: u64,
    /// `GET /api/mer/conf/list/currency` requests received.
    pub payprotocol_currency_requests: u64,
    /// `POST /api/v3/get-management-token` requests received.
    pub genauth_token_requests: u64,
    /// `GET /api/v3/get-order-pay-detail` requests received.
    pub genauth_detail_requests: u64,
    /// Requests answered as unauthorized (PayProtocol HTTP 401, GenAuth statusCode 401).
    pub unauthorized: u64,
    /// Requests answered as throttled (rate limit or the `Throttle429` fault).
    pub throttled: u64,
    /// Requests answered with an injected fault (order faults and random faults).
    pub faults_injected: u64,
    /// Detail requests answered normally (these advance order lifecycles).
    pub answered: u64,
    /// Every request to a provider endpoint (not `/__mock/stats`).
    pub total_requests: u64,
    /// Of those, the ones that came over HTTP/2 (h2c, or h2 chosen through ALPN).
    #[serde(default)]
    pub http2_requests: u64,
    /// Most requests that arrived within any one-second sliding window.
    pub max_requests_in_any_1s_window: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            payprotocol_detail_requests: AtomicU64::new(0),
            payprotocol_currency_requests: AtomicU64::new(0),
            genauth_token_requests: AtomicU64::new(0),
            genauth_detail_requests: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            faults_injected: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            total_requests: AtomicU64::new(0),
            http2_requests: AtomicU64::new(0),
            window: Window::new(WINDOW_CAP),
            orders: Orders::new(),
        }
    }
}

/// Most arrivals the one-second window remembers; a busier second reads as this many.
const WINDOW_CAP: usize = 1 << 18;

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// Copies every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            payprotocol_detail_requests: g(&self.payprotocol_detail_requests),
            payprotocol_currency_requests: g(&self.payprotocol_currency_requests),
            genauth_token_requests: g(&self.genauth_token_requests),
            genauth_detail_requests: g(&self.genauth_detail_requests),
            unauthorized: g(&self.unauthorized),
            throttled: g(&self.throttled),
            faults_injected: g(&self.faults_injected),
            answered: g(&self.answered),
            total_requests: g(&self.total_requests),
            http2_requests: g(&self.http2_requests),
            max_requests_in_any_1s_window: self.window.max(),
        }
    }

    /// Detail requests received for `order_no` (both providers, any outcome:
    /// answered, faulted, throttled or unauthorized).
    pub fn polls_of(&self, order_no: &str) -> u32 {
        self.orders.read(order_no, |s| s.received)
    }

    /// Detail requests for `order_no` answered normally (both providers): the polls
    /// that advance its lifecycle.
    pub fn answered_of(&self, order_no: &str) -> u32 {
        self.orders.read(order_no, |s| s.answered)
    }

    /// Records one request arriving at a provider endpoint.
    pub(crate) fn arrival(&self) {
        bump(&self.total_requests);
        self.window.record();
    }
}

/// The busiest one-second sliding window over request arrival times: a bounded
/// queue of the arrivals of the last second.
#[derive(Debug)]
pub(crate) struct Window {
    start: Instant,
    cap: usize,
    inner: Mutex<WindowInner>,
}

#[derive(Debug, Default)]
struct WindowInner {
    /// Arrival times (ns since `start`) within the last second, oldest first.
    times: VecDeque<u64>,
    max: u64,
}

const SECOND_NS: u64 = 1_000_000_000;

impl Window {
    pub(crate) fn new(cap: usize) -> Window {
        Window {
            start: Instant::now(),
            cap: cap.max(1),
            inner: Mutex::new(WindowInner::default()),
        }
    }

    /// Records an arrival now.
    pub(crate) fn record(&self) {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Taken under the lock so the queue stays ordered.
        let now = self.start.elapsed().as_nanos() as u64;
        Self::push(&mut w, self.cap, now);
    }

    /// Records an arrival at `now_ns` (nanoseconds, never decreasing).
    #[cfg(test)]
    pub(crate) fn record_at(&self, now_ns: u64) {
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::push(&mut w, self.cap, now_ns);
    }

    fn push(w: &mut WindowInner, cap: usize, now: u64) {
        while w.times.front().is_some_and(|&t| t + SECOND_NS <= now) {
            w.times.pop_front();
        }
        if w.times.len() >= cap {
            w.times.pop_front();
        }
        w.times.push_back(now);
        w.max = w.max.max(w.times.len() as u64);
    }

    pub(crate) fn max(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).max
    }
}

/// Which provider a request was for: an order's state is kept per provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    PayProtocol = 0,
    GenAuth = 1,
}

/// One order's counters at one provider.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OrderState {
    /// Detail requests received, any outcome.
    pub received: u32,
    /// Detail requests that passed the rate limit and auth (fault decisions count these).
    pub attempts: u32,
    /// Detail requests answered normally: the lifecycle position.
    pub answered: u32,
}

impl std::ops::Add for OrderState {
    type Output = OrderState;
    fn add(self, o: OrderState) -> OrderState {
        OrderState {
            received: self.received + o.received,
            attempts: self.attempts + o.attempts,
            answered: self.answered + o.answered,
        }
    }
}

const SHARDS: usize = 64;

/// One shard of the order table: order number -> state per [`Family`].
type Shard = Mutex<HashMap<String, [OrderState; 2]>>;

/// Per-order state, sharded by order-number hash.
#[derive(Debug)]
pub(crate) struct Orders {
    shards: Box<[Shard]>,
}

impl Orders {
    fn new() -> Orders {
        Orders {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, order_no: &str) -> &Shard {
        &self.shards[(fnv1a(order_no.as_bytes()) % SHARDS as u64) as usize]
    }

    /// Runs `f` on the order's state at `family` (created on first use) and returns
    /// its result; the shard lock is held only for `f`.
    pub(crate) fn update<R>(
        &self,
        family: Family,
        order_no: &str,
        f: impl FnOnce(&mut OrderState) -> R,
    ) -> R {
        let mut map = self
            .shard(order_no)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let states = match map.get_mut(order_no) {
            Some(s) => s,
            None => map.entry(order_no.to_owned()).or_default(),
        };
        f(&mut states[family as usize])
    }

    /// Reads a field of the order's state summed over both providers (0 if unseen).
    fn read(&self, order_no: &str, f: impl FnOnce(OrderState) -> u32) -> u32 {
        let map = self
            .shard(order_no)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let [a, b] = map.get(order_no).copied().unwrap_or_default();
        f(a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window counts the busiest second, sliding (not in fixed buckets), and
    /// forgets arrivals older than a second.
    #[test]
    fn sliding_window_max() {
        let w = Window::new(1000);
        let ms = 1_000_000;
        // Arrivals at 0, 0.5, 0.9, 1.5 and 1.6 s: the windows ending at 0.9 s and at
        // 1.6 s hold 3 each; no one-second window holds 4.
        for t in [0, 500 * ms, 900 * ms, 1500 * ms, 1600 * ms] {
            w.record_at(t);
        }
        assert_eq!(w.max(), 3);
        // A burst of 5 within 10 ms, much later.
        for i in 0..5 {
            w.record_at(10_000 * ms + i * 2 * ms);
        }
        assert_eq!(w.max(), 5);
        // Exactly one second apart does not share a window.
        let w = Window::new(1000);
        w.record_at(0);
        w.record_at(1000 * ms);
        assert_eq!(w.max(), 1);
    }

    /// The window never holds more than its cap.
    #[test]
    fn window_is_bounded() {
        let w = Window::new(4);
        for i in 0..100 {
            w.record_at(i);
        }
        assert_eq!(w.max(), 4);
    }

    /// Order state is per provider, and `polls_of` sums both providers.
    #[test]
    fn order_state_per_family() {
        let c = Counters::default();
        c.orders
            .update(Family::PayProtocol, "A", |s| s.received += 1);
        c.orders.update(Family::GenAuth, "A", |s| {
            s.received += 2;
            s.answered += 1;
        });
        assert_eq!(c.polls_of("A"), 3);
        assert_eq!(c.answered_of("A"), 1);
        assert_eq!(c.polls_of("B"), 0);
    }
}
