//! The retry decision: one pure function, [`classify`], from an attempt's result to
//! what happens next, with the backoff it implies.
//!
//! | result | action |
//! |---|---|
//! | success, not found | done |
//! | auth rejected | abort the run |
//! | refused (4xx, business error) | give up: error row |
//! | 429 / throttled | retry after max(Retry-After, backoff, base), pausing all workers |
//! | 5xx, timeout, transport, malformed, too large | retry after backoff (or Retry-After) |
//! | any retryable, attempts used up | give up: error row |

use std::time::Duration;

use crate::model::PayDetail;
use crate::provider::FetchError;

/// Default `fetch.max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 6;
/// Default first backoff step (`fetch.backoff_base`).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Default backoff cap (`fetch.backoff_max`).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How often and how patiently to retry one fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The result is final (a detail, or not found).
    Done,
    /// Try again after `after`; `pause_all` holds every worker, not only this one.
    Retry { after: Duration, pause_all: bool },
    /// Stop retrying this order: it gets an `error` row.
    GiveUp,
    /// Stop the whole run (credentials rejected).
    Abort,
}

impl RetryPolicy {
    /// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^(n-1))]`,
    /// `jitter` in `[0, 1)` choosing the point.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        cap.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Decides what follows attempt number `attempt` (1-based) that produced `result`.
pub fn classify(
    result: &Result<PayDetail, FetchError>,
    attempt: u32,
    policy: &RetryPolicy,
    jitter: f64,
) -> Action {
    let err = match result {
        Ok(_) | Err(FetchError::NotFound) => return Action::Done,
        Err(e) => e,
    };
    let (retry_after, pause_all) = match err {
        FetchError::Auth(_) => return Action::Abort,
        FetchError::Rejected(_) => return Action::GiveUp,
        FetchError::NotFound => return Action::Done,
        FetchError::Throttled { retry_after, .. } => (*retry_after, true),
        FetchError::Server { retry_after, .. } => (*retry_after, false),
        FetchError::Timeout(_)
        | FetchError::Transport(_)
        | FetchError::Malformed { .. }
        | FetchError::TooLarge { .. } => (None, false),
    };
    if attempt >= policy.max_attempts {
        return Action::GiveUp;
    }
    let backoff = policy.backoff(attempt, jitter);
    let after = if pause_all {
        // Throttled: never sooner than the base step, so `Retry-After: 0` cannot
        // turn into a storm.
        backoff
            .max(retry_after.unwrap_or_default())
            .max(policy.backoff_base)
    } else {
        backoff.max(retry_after.unwrap_or_default())
    };
    Action::Retry { after, pause_all }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PayStatus;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }

    fn retry(ms: u64, pause_all: bool) -> Action {
        Action::Retry {
            after: Duration::from_millis(ms),
            pause_all,
        }
    }

    /// The decision table, with jitter fixed at 1.0 (the full backoff step).
    #[test]
    fn decision_table() {
        let ok = Ok(PayDetail::new("0", PayStatus::Paid));
        let server = |ra: Option<u64>| {
            Err(FetchError::Server {
                status: 503,
                retry_after: ra.map(Duration::from_secs),
                detail: "x".into(),
            })
        };
        let throttled = |ra: Option<u64>| {
            Err(FetchError::Throttled {
                code: 429,
                retry_after: ra.map(Duration::from_secs),
            })
        };
        let cases: Vec<(Result<PayDetail, FetchError>, u32, Action)> = vec![
            (ok, 1, Action::Done),
            (Err(FetchError::NotFound), 1, Action::Done),
            (Err(FetchError::Auth("401".into())), 1, Action::Abort),
            (Err(FetchError::Rejected("400".into())), 1, Action::GiveUp),
            (server(None), 1, retry(100, false)),
            (server(None), 2, retry(200, false)),
            (server(None), 3, retry(400, false)),
            (server(None), 4, Action::GiveUp),
            (server(Some(2)), 1, retry(2000, false)),
            (
                Err(FetchError::Timeout(Duration::from_secs(1))),
                1,
                retry(100, false),
            ),
            (
                Err(FetchError::Transport("reset".into())),
                2,
                retry(200, false),
            ),
            (
                Err(FetchError::Malformed {
                    status: 200,
                    detail: "eof".into(),
                }),
                1,
                retry(100, false),
            ),
            (
                Err(FetchError::TooLarge { limit: 10 }),
                1,
                retry(100, false),
            ),
            (throttled(None), 1, retry(100, true)),
            (throttled(Some(0)), 1, retry(100, true)),
            (throttled(Some(3)), 1, retry(3000, true)),
            (throttled(Some(3)), 4, Action::GiveUp),
        ];
        for (result, attempt, want) in cases {
            assert_eq!(
                classify(&result, attempt, &policy(), 1.0),
                want,
                "{result:?} attempt {attempt}"
            );
        }
    }

    /// Full jitter spreads delays over [0, cap]; the cap doubles up to backoff_max.
    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = policy();
        assert_eq!(p.backoff(1, 0.0), Duration::ZERO);
        assert_eq!(p.backoff(1, 0.5), Duration::from_millis(50));
        assert_eq!(p.backoff(5, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(100, 1.0), Duration::from_secs(1));
    }

    /// A throttling answer with `Retry-After: 0` still waits at least the base step,
    /// even when the jitter draws zero.
    #[test]
    fn retry_after_zero_is_not_a_storm() {
        let r = Err(FetchError::Throttled {
            code: 429,
            retry_after: Some(Duration::ZERO),
        });
        assert_eq!(classify(&r, 1, &policy(), 0.0), retry(100, true));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_policy() -> impl Strategy<Value = RetryPolicy> {
            (1u32..10, 1u64..5_000, 0u64..120_000).prop_map(|(max_attempts, base, extra)| {
                RetryPolicy {
                    max_attempts,
                    backoff_base: Duration::from_millis(base),
                    backoff_max: Duration::from_millis(base + extra),
                }
            })
        }

        /// Every failure class, with any `Retry-After` up to the clamp.
        fn any_error() -> impl Strategy<Value = FetchError> {
            let ra = proptest::option::of((0u64..=300).prop_map(Duration::from_secs));
            prop_oneof![
                ra.clone().prop_map(|retry_after| FetchError::Throttled {
                    code: 429,
                    retry_after
                }),
                (500u16..600, ra).prop_map(|(status, retry_after)| FetchError::Server {
                    status,
                    retry_after,
                    detail: String::new(),
                }),
                Just(FetchError::Timeout(Duration::from_secs(10))),
                Just(FetchError::Transport("reset".into())),
                Just(FetchError::Malformed {
                    status: 200,
                    detail: String::new()
                }),
                Just(FetchError::TooLarge { limit: 1 }),
                Just(FetchError::Auth("401".into())),
                Just(FetchError::NotFound),
                Just(FetchError::Rejected("400".into())),
            ]
        }

        proptest! {
            /// For any policy, attempt and jitter: auth stops the run, not found is
            /// done, a refusal gives up; everything else is retried until the
            /// attempts are used up, never sooner than `Retry-After`, never later
            /// than the larger of the cap and `Retry-After`, and throttling waits
            /// at least the base step and pauses every worker.
            #[test]
            fn decisions_follow_the_table(
                policy in any_policy(),
                err in any_error(),
                attempt in 1u32..20,
                jitter in 0.0f64..=1.0,
            ) {
                let action = classify(&Err(err.clone()), attempt, &policy, jitter);
                let retry_after = match &err {
                    FetchError::Auth(_) => return { prop_assert_eq!(action, Action::Abort); Ok(()) },
                    FetchError::NotFound => return { prop_assert_eq!(action, Action::Done); Ok(()) },
                    FetchError::Rejected(_) => return { prop_assert_eq!(action, Action::GiveUp); Ok(()) },
                    FetchError::Throttled { retry_after, .. } | FetchError::Server { retry_after, .. } => {
                        retry_after.unwrap_or_default()
                    }
                    _ => Duration::ZERO,
                };
                if attempt >= policy.max_attempts {
                    prop_assert_eq!(action, Action::GiveUp);
                    return Ok(());
                }
                let Action::Retry { after, pause_all } = action else {
                    return Err(TestCaseError::fail(format!("{err:?}: {action:?}")));
                };
                let throttled = matches!(err, FetchError::Throttled { .. });
                prop_assert_eq!(pause_all, throttled);
                prop_assert!(after >= retry_after);
                prop_assert!(after <= policy.backoff_max.max(retry_after));
                if throttled {
                    prop_assert!(after >= policy.backoff_base);
                }
            }

            /// The backoff grows with the jitter draw and stays within
            /// `[0, min(max, base * 2^(attempt-1))]`.
            #[test]
            fn backoff_is_bounded_and_monotone(
                policy in any_policy(),
                attempt in 1u32..100,
                a in 0.0f64..=1.0,
                b in 0.0f64..=1.0,
            ) {
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                let cap = policy
                    .backoff_base
                    .saturating_mul(2u32.saturating_pow(attempt - 1))
                    .min(policy.backoff_max);
                prop_assert!(policy.backoff(attempt, lo) <= policy.backoff(attempt, hi));
                prop_assert!(policy.backoff(attempt, hi) <= cap);
                prop_assert_eq!(policy.backoff(attempt, 1.0), cap);
            }

            /// A success is done at any attempt.
            #[test]
            fn success_is_done(policy in any_policy(), attempt in 1u32..20, jitter in 0.0f64..=1.0) {
                let ok = Ok(PayDetail::new("0", PayStatus::Paid));
                prop_assert_eq!(classify(&ok, attempt, &policy, jitter), Action::Done);
            }
        }
    }
}
