//! Whether a failure is worth another try (`Retryable`, decided by each error enum) apart from
//! how it is tried again (`Backoff`, one formula for the call layer and the task layer alike).

use std::time::Duration;

/// Decides *whether*: an error says if trying again may help and when the other side asked us
/// to come back. *How* is the layer's own policy.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
    /// The service's own hint (`retry-after`, `x-ratelimit-reset-*`), when it gave one.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// Exponential backoff with jitter over the upper half: `base · 2ⁿ`, capped at `max`, then
/// scaled by a random factor in [0.5, 1]. Never a thundering herd, never much shorter than
/// planned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after `failures` failed attempts (0 for the first retry).
    pub fn delay(&self, failures: u32) -> Duration {
        self.ceiling(failures)
            .mul_f64(rand::random_range(0.5..=1.0))
    }

    /// The delay before jitter: `base · 2ⁿ` capped at `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << failures.min(16))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_over_the_upper_half() {
        let b = Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(5),
        };
        let table = [(0, 2), (1, 4), (2, 5), (3, 5), (40, 5)];
        for (failures, secs) in table {
            let top = Duration::from_secs(secs);
            assert_eq!(b.ceiling(failures), top, "failures {failures}");
            for _ in 0..50 {
                let d = b.delay(failures);
                assert!(d <= top && d >= top / 2, "failures {failures}: {d:?}");
            }
        }
        let zero = Backoff {
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(zero.delay(3), Duration::ZERO);
    }
}
