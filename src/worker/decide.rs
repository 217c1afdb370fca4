//! The decision for one finished message: what its task's ending becomes, as a pure function of
//! the ending, the retries so far and the task's policy. The worker alone applies the retry
//! limit here; tasks only say whether a failure is worth another try.

use std::time::Duration;

use serde_json::Value;

use crate::celery::result::ExceptionInfo;
use crate::tasks::{RetryPolicy, TaskError, TaskResult};

/// How a running task ended, as the worker saw it.
#[derive(Debug)]
pub enum Ending {
    Finished(TaskResult),
    /// Stopped at its hard time limit (`limit` long).
    HardLimit(Duration),
    /// Given up at a warm shutdown after the grace period.
    Abandoned,
    /// Stopped by `revoke(terminate=True)`.
    Terminated,
}

#[derive(Debug, PartialEq)]
pub enum Decision {
    /// SUCCESS stored, message acked.
    Succeed(Value),
    /// FAILURE stored, message acked.
    Fail(ExceptionInfo),
    /// RETRY stored, the task re-published with `retries + 1` after the hint or the backoff.
    Retry {
        error: ExceptionInfo,
        hint: Option<Duration>,
    },
    /// Put back on its queue, untouched: another worker runs it.
    GiveBack,
    /// REVOKED (`terminated`) stored, message acked: nobody runs it again.
    Revoked,
}

impl Decision {
    /// The task's state for metrics and logs.
    pub fn state(&self) -> &'static str {
        match self {
            Decision::Succeed(_) => "succeeded",
            Decision::Fail(_) => "failed",
            Decision::Retry { .. } => "retried",
            Decision::GiveBack => "abandoned",
            Decision::Revoked => "revoked",
        }
    }
}

pub fn decide(ending: Ending, retries: u32, policy: &RetryPolicy) -> Decision {
    match ending {
        Ending::Abandoned => Decision::GiveBack,
        Ending::Terminated => Decision::Revoked,
        Ending::HardLimit(limit) => {
            Decision::Fail(ExceptionInfo::time_limit_exceeded(limit.as_secs_f64()))
        }
        Ending::Finished(Ok(v)) => Decision::Succeed(v),
        Ending::Finished(Err(TaskError::Permanent(e) | TaskError::BadArgs(e))) => Decision::Fail(e),
        Ending::Finished(Err(TaskError::Retry { error, .. })) if retries >= policy.max_retries => {
            Decision::Fail(error)
        }
        Ending::Finished(Err(TaskError::Retry { error, after })) => {
            Decision::Retry { error, hint: after }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn exc(t: &str) -> ExceptionInfo {
        ExceptionInfo::raised(t, "m", "x", "task")
    }

    #[test]
    fn table() {
        let policy = RetryPolicy {
            max_retries: 2,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(4),
        };
        let retry = |after| {
            Ending::Finished(Err(TaskError::Retry {
                error: exc("E"),
                after,
            }))
        };
        let hint = Some(Duration::from_secs(9));
        let table: Vec<(Ending, u32, Decision)> = vec![
            (
                Ending::Finished(Ok(json!(1))),
                0,
                Decision::Succeed(json!(1)),
            ),
            (
                Ending::Finished(Ok(json!(1))),
                5,
                Decision::Succeed(json!(1)),
            ),
            (
                Ending::Finished(Err(TaskError::Permanent(exc("P")))),
                0,
                Decision::Fail(exc("P")),
            ),
            (
                Ending::Finished(Err(TaskError::BadArgs(exc("TypeError")))),
                0,
                Decision::Fail(exc("TypeError")),
            ),
            (
                retry(None),
                0,
                Decision::Retry {
                    error: exc("E"),
                    hint: None,
                },
            ),
            (
                retry(hint),
                1,
                Decision::Retry {
                    error: exc("E"),
                    hint,
                },
            ),
            // The limit: the last attempt's retryable failure is final.
            (retry(hint), 2, Decision::Fail(exc("E"))),
            (retry(None), 7, Decision::Fail(exc("E"))),
            (
                Ending::HardLimit(Duration::from_secs(300)),
                0,
                Decision::Fail(ExceptionInfo::time_limit_exceeded(300.0)),
            ),
            (Ending::Abandoned, 0, Decision::GiveBack),
            (Ending::Abandoned, 9, Decision::GiveBack),
            // Terminated is final, whatever retries remain.
            (Ending::Terminated, 0, Decision::Revoked),
        ];
        for (i, (ending, retries, want)) in table.into_iter().enumerate() {
            assert_eq!(decide(ending, retries, &policy), want, "row {i}");
        }
        // A task without retries never retries.
        assert!(matches!(
            decide(retry(None), 0, &RetryPolicy::NONE),
            Decision::Fail(_)
        ));
    }
}
