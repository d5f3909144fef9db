//! Rate limiting for provider calls: a GCRA limiter (governor) admitting
//! `fetch.rate_limit` requests per second with `fetch.burst`, and a pause gate that a
//! throttling answer closes for every worker at once.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

/// Admission control shared by every request of a run or daemon.
pub struct Limiter {
    gcra: DefaultDirectRateLimiter,
    /// While in the future, no request is sent (set after a 429).
    paused_until: Mutex<Option<Instant>>,
}

impl Limiter {
    /// `rate` requests per second (may be fractional, must be positive), `burst`
    /// requests at once at most.
    pub fn new(rate: f64, burst: u32) -> Self {
        let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(burst);
        Self {
            gcra: RateLimiter::direct(quota),
            paused_until: Mutex::new(None),
        }
    }

    /// Waits until the pause gate is open and the limiter admits one request.
    pub async fn acquire(&self) {
        loop {
            if let Some(until) = self.paused_until() {
                tokio::time::sleep_until(until).await;
                continue;
            }
            self.gcra.until_ready().await;
            // A pause may have begun while we waited for a cell: honour it too.
            if self.paused_until().is_none() {
                return;
            }
        }
    }

    /// Closes the gate for every worker for at least `d` from now.
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut g = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none_or(|cur| cur < until) {
            *g = Some(until);
        }
    }

    /// The end of the current pause, if one is in force.
    fn paused_until(&self) -> Option<Instant> {
        let mut g = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            Some(t) if t > Instant::now() => Some(t),
            Some(_) => {
                *g = None;
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pause holds every acquirer until it ends; later, shorter pauses do not
    /// shorten it.
    #[tokio::test(start_paused = true)]
    async fn pause_blocks_all_until_it_ends() {
        let l = std::sync::Arc::new(Limiter::new(1000.0, 10));
        l.pause_for(Duration::from_secs(5));
        l.pause_for(Duration::from_secs(1));
        let start = Instant::now();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    l.acquire().await;
                    Instant::now()
                })
            })
            .collect();
        for t in tasks {
            let at = t.await.unwrap();
            assert!(at - start >= Duration::from_secs(5), "{:?}", at - start);
        }
    }

    /// Without a pause, acquiring within the burst does not wait.
    #[tokio::test(start_paused = true)]
    async fn open_gate_admits_burst() {
        let l = Limiter::new(1.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            l.acquire().await;
        }
        assert_eq!(Instant::now(), start);
    }
}
