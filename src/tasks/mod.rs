//! The task registry: each task in its own file with its Celery name, typed arguments, retry
//! policy and time limits, and one dispatch table.

pub mod analyse_audio;
mod blink;
pub mod build_memory;
pub mod debug;
pub mod echo;
pub mod generate_answer;
pub mod send_push;
pub mod send_verification_email;
pub mod transcribe_audio;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::celery::result::ExceptionInfo;
use crate::services::Services;

/// Celery's defaults in the app's settings: soft 270 s, hard 300 s.
pub const DEFAULT_LIMITS: TimeLimits = TimeLimits {
    soft: Duration::from_secs(270),
    hard: Duration::from_secs(300),
};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeLimits {
    /// The task's cancellation token fires: it may clean up and return.
    pub soft: Duration,
    /// The task is abandoned and fails with `TimeLimitExceeded`.
    pub hard: Duration,
}

impl TimeLimits {
    /// The message's `timelimit` header `[hard, soft]` overrides the task's own, each part alone.
    pub fn with_overrides(self, hard: Option<f64>, soft: Option<f64>) -> TimeLimits {
        let hard = hard.map(Duration::from_secs_f64).unwrap_or(self.hard);
        let soft = soft.map(Duration::from_secs_f64).unwrap_or(self.soft);
        TimeLimits {
            soft: soft.min(hard),
            hard,
        }
    }
}

/// How often and how late a task is tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    /// The first delay; each retry doubles it, up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    pub const NONE: RetryPolicy = RetryPolicy {
        max_retries: 0,
        base_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
    };

    /// The delay before retry number `retries + 1`: a server's `retry-after` when it gave one,
    /// else exponential backoff with full jitter over its upper half (never a thundering herd,
    /// never much shorter than planned).
    pub fn delay(&self, retries: u32, hint: Option<Duration>) -> Duration {
        if let Some(h) = hint {
            return h;
        }
        let exp = self
            .base_delay
            .saturating_mul(1u32 << retries.min(16))
            .min(self.max_delay);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        exp.mul_f64(jitter)
    }
}

/// One task call as the handler sees it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The Celery task id: the key of what a task writes for the app (`op_ask:{id}`).
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: u32,
}

/// Why the worker abandoned a running task (its future is dropped, so it cannot see it itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    HardTimeLimit,
    Shutdown,
}

/// What a handler gets: its call, the soft-limit (and shutdown) token, and shared services.
pub struct TaskContext {
    pub call: Call,
    pub cancel: CancellationToken,
    pub services: Arc<Services>,
    /// Set just before the worker drops the task's future; read by drop guards.
    pub aborted: Arc<std::sync::OnceLock<AbortReason>>,
}

/// How a task ends.
#[derive(Debug)]
pub enum TaskOutcome {
    Success(Value),
    /// Try again later; `after` is a delay the failing service asked for.
    Retry {
        error: ExceptionInfo,
        after: Option<Duration>,
    },
    Failure(ExceptionInfo),
}

pub type Handler = fn(TaskContext) -> BoxFuture<'static, TaskOutcome>;

pub struct TaskDef {
    pub name: &'static str,
    pub retry: RetryPolicy,
    pub limits: TimeLimits,
    pub run: Handler,
}

/// The dispatch table.
pub struct Registry {
    tasks: HashMap<&'static str, &'static TaskDef>,
}

impl Registry {
    /// The production tasks, plus the `orbit.debug.*` diagnostics when asked for.
    pub fn new(debug_tasks: bool) -> Registry {
        let mut defs: Vec<&'static TaskDef> = vec![
            &echo::TASK,
            &build_memory::TASK,
            &generate_answer::TASK,
            &send_push::TASK,
            &send_verification_email::TASK,
            &transcribe_audio::TASK,
            &analyse_audio::TASK,
        ];
        if debug_tasks {
            defs.extend(debug::TASKS);
        }
        Registry {
            tasks: defs.into_iter().map(|d| (d.name, d)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&'static TaskDef> {
        self.tasks.get(name).copied()
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.tasks.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Binds positional and keyword arguments to named parameters as Python would, then into the
/// task's typed arguments. A mismatch is the `TypeError` a Python task would raise.
pub fn bind<T: DeserializeOwned>(call: &Call, params: &[&str]) -> Result<T, ExceptionInfo> {
    let type_error = |msg: String| ExceptionInfo::raised("TypeError", "builtins", &msg, &call.name);
    if call.args.len() > params.len() {
        return Err(type_error(format!(
            "{}() takes {} positional arguments but {} were given",
            call.name,
            params.len(),
            call.args.len()
        )));
    }
    let mut m = Map::new();
    for (p, v) in params.iter().zip(&call.args) {
        m.insert((*p).to_string(), v.clone());
    }
    for (k, v) in &call.kwargs {
        if !params.contains(&k.as_str()) {
            return Err(type_error(format!(
                "{}() got an unexpected keyword argument '{k}'",
                call.name
            )));
        }
        if m.insert(k.clone(), v.clone()).is_some() {
            return Err(type_error(format!(
                "{}() got multiple values for argument '{k}'",
                call.name
            )));
        }
    }
    serde_json::from_value(Value::Object(m))
        .map_err(|e| type_error(format!("{}(): bad arguments: {e}", call.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize, Debug, PartialEq)]
    struct A {
        user_id: i64,
        build_id: Option<i64>,
    }

    fn call(args: Value, kwargs: Value) -> Call {
        Call {
            id: "x".into(),
            name: "t".into(),
            args: serde_json::from_value(args).unwrap(),
            kwargs: serde_json::from_value(kwargs).unwrap(),
            retries: 0,
        }
    }

    #[test]
    fn binds_like_python() {
        let p = ["user_id", "build_id"];
        let a: A = bind(&call(json!([7]), json!({})), &p).unwrap();
        assert_eq!(
            a,
            A {
                user_id: 7,
                build_id: None
            }
        );
        let a: A = bind(&call(json!([]), json!({"user_id": 7, "build_id": 9})), &p).unwrap();
        assert_eq!(a.build_id, Some(9));
        let e = bind::<A>(&call(json!([1, 2, 3]), json!({})), &p).unwrap_err();
        assert_eq!(e.exc_type, "TypeError");
        let e = bind::<A>(&call(json!([1]), json!({"user_id": 1})), &p).unwrap_err();
        assert!(e.exc_message[0]
            .as_str()
            .unwrap()
            .contains("multiple values"));
        let e = bind::<A>(&call(json!(["x"]), json!({})), &p).unwrap_err();
        assert!(e.exc_message[0].as_str().unwrap().contains("bad arguments"));
    }

    #[test]
    fn limits_and_backoff() {
        let l = DEFAULT_LIMITS.with_overrides(Some(10.0), None);
        assert_eq!(l.hard, Duration::from_secs(10));
        assert_eq!(l.soft, Duration::from_secs(10), "soft never exceeds hard");
        let p = RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(5),
        };
        for r in 0..5 {
            let d = p.delay(r, None);
            assert!(d <= Duration::from_secs(5) && d >= Duration::from_millis(1000));
        }
        assert_eq!(
            p.delay(0, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
    }
}
