//! Settlement rules: whether an order is settled, when to poll it next, and when
//! tracking stops at its deadline. Pure functions of the status, the order's age and
//! its poll count, so the schedule is tested without clocks.
//!
//! - [`Schedule`]: the `settle.*` settings the rules need.
//! - [`decide`]: the tracking state and next poll time after a poll.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::model::{PayStatus, Tracking};

/// The re-poll schedule and the settled/unsettled split.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// First re-poll delay.
    pub poll_interval: Duration,
    /// Each further re-poll waits this factor longer ...
    pub backoff_factor: f64,
    /// ... up to this.
    pub max_poll_interval: Duration,
    /// Re-poll delay while in block confirmation.
    pub confirming_interval: Duration,
    /// Tracking stops this long after the order was first seen.
    pub max_wait: Duration,
    /// Statuses that are not final.
    pub unsettled: BTreeSet<PayStatus>,
}

impl Schedule {
    /// Whether `status` ends tracking. `error` never does (it is retried later);
    /// `not_found` always does.
    pub fn is_final(&self, status: PayStatus) -> bool {
        match status {
            PayStatus::Error => false,
            PayStatus::NotFound => true,
            s => !self.unsettled.contains(&s),
        }
    }

    /// The delay before the next poll, after `polls` polls (1 after the first).
    pub fn interval(&self, status: PayStatus, polls: u32) -> Duration {
        if status == PayStatus::Confirming {
            return self.confirming_interval.min(self.max_poll_interval);
        }
        let exp = polls.saturating_sub(1).min(64) as i32;
        let secs = self.poll_interval.as_secs_f64() * self.backoff_factor.powi(exp);
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max_poll_interval)
            .min(self.max_poll_interval)
    }

    /// When tracking an order first seen at `first_seen` stops.
    pub fn deadline(&self, first_seen: DateTime<Utc>) -> DateTime<Utc> {
        first_seen + to_delta(self.max_wait)
    }
}

fn to_delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// After a poll at `now` found `status` (the order's `polls`-th poll): settled,
/// polled again at the returned time, or stopped at its deadline. The next poll is
/// never later than the deadline, so the last observation is taken at it.
pub fn decide(
    schedule: &Schedule,
    status: PayStatus,
    first_seen: DateTime<Utc>,
    now: DateTime<Utc>,
    polls: u32,
) -> (Tracking, Option<DateTime<Utc>>) {
    if schedule.is_final(status) {
        return (Tracking::Settled, None);
    }
    let deadline = schedule.deadline(first_seen);
    if now >= deadline {
        return (Tracking::Deadline, None);
    }
    let next = (now + to_delta(schedule.interval(status, polls))).min(deadline);
    (Tracking::Polling, Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            poll_interval: Duration::from_secs(60),
            backoff_factor: 2.0,
            max_poll_interval: Duration::from_secs(600),
            confirming_interval: Duration::from_secs(15),
            max_wait: Duration::from_secs(3600),
            unsettled: [
                PayStatus::Pending,
                PayStatus::Confirming,
                PayStatus::PartiallyPaid,
            ]
            .into(),
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc()
    }

    /// Final statuses settle at once; errors and unsettled statuses keep polling.
    #[test]
    fn final_and_unsettled_statuses() {
        let s = schedule();
        for st in [
            PayStatus::Paid,
            PayStatus::Failed,
            PayStatus::Cancelled,
            PayStatus::Expired,
            PayStatus::Refunded,
            PayStatus::NotFound,
            PayStatus::Unknown,
        ] {
            assert_eq!(
                decide(&s, st, t0(), t0(), 1),
                (Tracking::Settled, None),
                "{st}"
            );
        }
        for st in [
            PayStatus::Pending,
            PayStatus::Confirming,
            PayStatus::PartiallyPaid,
            PayStatus::Error,
        ] {
            assert_eq!(decide(&s, st, t0(), t0(), 1).0, Tracking::Polling, "{st}");
        }
        // Partially paid can be configured as final.
        let mut s2 = schedule();
        s2.unsettled.remove(&PayStatus::PartiallyPaid);
        assert_eq!(
            decide(&s2, PayStatus::PartiallyPaid, t0(), t0(), 1).0,
            Tracking::Settled
        );
    }

    /// Re-polls back off by the factor up to the cap; confirmation polls are quick.
    #[test]
    fn backoff_schedule() {
        let s = schedule();
        let secs: Vec<u64> = (1..=6)
            .map(|n| s.interval(PayStatus::Pending, n).as_secs())
            .collect();
        assert_eq!(secs, [60, 120, 240, 480, 600, 600]);
        assert_eq!(
            s.interval(PayStatus::Confirming, 5),
            Duration::from_secs(15)
        );
        let (_, next) = decide(&s, PayStatus::Pending, t0(), t0(), 1);
        assert_eq!(next, Some(t0() + TimeDelta::seconds(60)));
    }

    /// The last poll is scheduled at the deadline, and a poll at or after it stops
    /// tracking with a deadline row.
    #[test]
    fn deadline_caps_schedule_and_stops_tracking() {
        let s = schedule();
        let late = t0() + TimeDelta::seconds(3590);
        assert_eq!(
            decide(&s, PayStatus::Pending, t0(), late, 9),
            (Tracking::Polling, Some(t0() + TimeDelta::seconds(3600)))
        );
        let at = t0() + TimeDelta::seconds(3600);
        assert_eq!(
            decide(&s, PayStatus::Pending, t0(), at, 10),
            (Tracking::Deadline, None)
        );
        assert_eq!(
            decide(&s, PayStatus::Error, t0(), at, 10),
            (Tracking::Deadline, None)
        );
        // A final status at the deadline is still settled.
        assert_eq!(
            decide(&s, PayStatus::Paid, t0(), at, 10),
            (Tracking::Settled, None)
        );
    }

    /// Huge factors or poll counts do not overflow.
    #[test]
    fn no_overflow() {
        let mut s = schedule();
        s.backoff_factor = 10.0;
        assert_eq!(
            s.interval(PayStatus::Pending, u32::MAX),
            s.max_poll_interval
        );
    }
}
