//! The task registry: each task in its own file with its Celery name, typed arguments, retry
//! policy and time limits, and one dispatch table. A task returns `Result<Value, TaskError>`;
//! the worker alone decides what a failure becomes (`worker::decide`).

pub mod analyse_audio;
mod blink;
pub mod build_memory;
pub mod debug;
pub mod echo;
pub mod generate_answer;
pub mod reembed_user;
pub mod send_push;
pub mod send_verification_email;
pub mod transcribe_audio;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use orbit_pipeline::retry::Backoff;
use orbit_pipeline::Retryable;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::celery::result::ExceptionInfo;
use crate::config::{PushConfig, SmtpConfig, TaskBlocks, TranscriptionConfig};
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

/// The longest time limit a message's header may ask for: a day is far past any task here, and
/// a bound keeps `1e300` seconds from overflowing the clock.
pub const MAX_HEADER_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// A header's limit in seconds as a duration: not finite, zero or negative (no limit is not ours
/// to grant) is no override; past `MAX_HEADER_LIMIT` is that.
fn header_limit(secs: Option<f64>) -> Option<Duration> {
    let secs = secs.filter(|s| s.is_finite() && *s > 0.0)?;
    Some(
        Duration::try_from_secs_f64(secs)
            .unwrap_or(MAX_HEADER_LIMIT)
            .min(MAX_HEADER_LIMIT),
    )
}

impl TimeLimits {
    /// The message's `timelimit` header `[hard, soft]` overrides the task's own, each part alone
    /// (`header_limit` says which values count).
    pub fn with_overrides(self, hard: Option<f64>, soft: Option<f64>) -> TimeLimits {
        let hard = header_limit(hard).unwrap_or(self.hard);
        let soft = header_limit(soft).unwrap_or(self.soft);
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
    /// else the shared backoff (`orbit_pipeline::retry::Backoff`).
    pub fn delay(&self, retries: u32, hint: Option<Duration>) -> Duration {
        if let Some(h) = hint {
            return h;
        }
        Backoff {
            base: self.base_delay,
            max: self.max_delay,
        }
        .delay(retries)
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
    /// `revoke(terminate=True)` by remote control.
    Revoked,
}

type AbortFn = Box<dyn FnOnce(AbortReason) -> BoxFuture<'static, ()> + Send>;

/// What a task wants written if the worker abandons it (hard limit, shutdown). The worker runs
/// it itself after dropping the task's future, inside the task's tracked future, so the write
/// lands before the process exits.
#[derive(Clone, Default)]
pub struct AbortHook(Arc<std::sync::Mutex<Option<AbortFn>>>);

impl AbortHook {
    pub fn set<F>(&self, f: F)
    where
        F: FnOnce(AbortReason) -> BoxFuture<'static, ()> + Send + 'static,
    {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(Box::new(f));
        }
    }

    /// The task reached its own ending: nothing to write for it any more.
    pub fn clear(&self) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = None;
        }
    }

    pub fn take(&self) -> Option<AbortFn> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }
}

/// Which task-only settings block a task needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    None,
    Push,
    Smtp,
    Transcription,
}

/// A task's own settings block, as the worker hands it over: nothing of any other task's.
#[derive(Debug, Clone)]
pub enum TaskConfig {
    None,
    Push(Arc<PushConfig>),
    Smtp(Arc<SmtpConfig>),
    Transcription(Arc<TranscriptionConfig>),
}

impl TaskConfig {
    /// The block `b` out of every block: the worker's one place of choosing.
    pub fn of(blocks: &TaskBlocks, b: Block) -> TaskConfig {
        match b {
            Block::None => TaskConfig::None,
            Block::Push => TaskConfig::Push(blocks.push.clone()),
            Block::Smtp => TaskConfig::Smtp(blocks.smtp.clone()),
            Block::Transcription => TaskConfig::Transcription(blocks.transcription.clone()),
        }
    }
}

/// What a handler gets: its call, the soft-limit (and shutdown) token, shared services, and its
/// own settings block.
pub struct TaskContext {
    pub call: Call,
    pub cancel: CancellationToken,
    pub services: Arc<Services>,
    pub config: TaskConfig,
    /// The task's retry limit: `is_last_attempt` for tasks that must write a final record.
    pub max_retries: u32,
    pub on_abort: AbortHook,
    /// What the task tells of itself while it runs (a build's progress): `inspect active`
    /// shows it in the task's request.
    pub info: TaskInfo,
}

/// A running task's own account of itself, shared with the worker's inventory.
#[derive(Clone, Default)]
pub struct TaskInfo(Arc<std::sync::Mutex<Option<Value>>>);

impl TaskInfo {
    pub fn set(&self, v: Value) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(v);
        }
    }

    pub fn get(&self) -> Option<Value> {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

/// A task-only settings block, as `TaskContext::own_block` takes it out of the task's config.
pub trait OwnBlock {
    fn from_config(c: &TaskConfig) -> Option<&Self>;
}

impl OwnBlock for PushConfig {
    fn from_config(c: &TaskConfig) -> Option<&Self> {
        match c {
            TaskConfig::Push(b) => Some(b),
            _ => None,
        }
    }
}

impl OwnBlock for SmtpConfig {
    fn from_config(c: &TaskConfig) -> Option<&Self> {
        match c {
            TaskConfig::Smtp(b) => Some(b),
            _ => None,
        }
    }
}

impl OwnBlock for TranscriptionConfig {
    fn from_config(c: &TaskConfig) -> Option<&Self> {
        match c {
            TaskConfig::Transcription(b) => Some(b),
            _ => None,
        }
    }
}

impl TaskContext {
    /// This task's own settings block; a task registered with another block fails as
    /// misconfigured instead of panicking.
    pub fn own_block<T: OwnBlock>(&self, r: Raises) -> Result<&T, TaskError> {
        T::from_config(&self.config).ok_or_else(|| {
            r.permanent(
                "ConfigError",
                format!("{} was not given its settings block", r.task),
            )
        })
    }

    /// No retry follows this run, whatever it returns.
    pub fn is_last_attempt(&self) -> bool {
        self.call.retries >= self.max_retries
    }
}

/// How a task failed. The worker turns it into a result: FAILURE, or a retry while the task's
/// policy allows one.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskError {
    /// Will fail the same way again.
    Permanent(ExceptionInfo),
    /// Worth another attempt, after `after` when the failing service asked for a wait.
    Retry {
        error: ExceptionInfo,
        after: Option<Duration>,
    },
    /// The arguments do not fit the task: Python's `TypeError`, never retried.
    BadArgs(ExceptionInfo),
}

impl TaskError {
    pub fn exception(&self) -> &ExceptionInfo {
        match self {
            TaskError::Permanent(e) | TaskError::BadArgs(e) => e,
            TaskError::Retry { error, .. } => error,
        }
    }

    /// The message the exception carries, for records and logs.
    pub fn message(&self) -> String {
        let e = self.exception();
        e.exc_message
            .first()
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| e.exc_type.clone())
    }
}

pub type TaskResult = Result<Value, TaskError>;

/// Where a task's exceptions come from: their Python module and the task's name.
#[derive(Debug, Clone, Copy)]
pub struct Raises {
    pub module: &'static str,
    pub task: &'static str,
}

impl Raises {
    pub fn permanent(self, kind: &str, msg: impl std::fmt::Display) -> TaskError {
        TaskError::Permanent(ExceptionInfo::raised(
            kind,
            self.module,
            &msg.to_string(),
            self.task,
        ))
    }

    pub fn retry(
        self,
        kind: &str,
        msg: impl std::fmt::Display,
        after: Option<Duration>,
    ) -> TaskError {
        TaskError::Retry {
            error: ExceptionInfo::raised(kind, self.module, &msg.to_string(), self.task),
            after,
        }
    }

    /// A retry when `e` says another try may help (with its hint), else permanent.
    pub fn error<E: Retryable + std::fmt::Display>(self, kind: &str, e: &E) -> TaskError {
        if e.is_retryable() {
            self.retry(kind, e, e.retry_after())
        } else {
            self.permanent(kind, e)
        }
    }
}

pub type Handler = fn(TaskContext) -> BoxFuture<'static, TaskResult>;

pub struct TaskDef {
    pub name: &'static str,
    pub retry: RetryPolicy,
    pub limits: TimeLimits,
    /// The task-only settings block it is given.
    pub block: Block,
    pub run: Handler,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("task {0} is registered twice")]
    Duplicate(&'static str),
}

/// The dispatch table.
pub struct Registry {
    tasks: HashMap<&'static str, &'static TaskDef>,
}

impl Registry {
    /// The production tasks, plus the `orbit.debug.*` diagnostics when asked for.
    pub fn new(debug_tasks: bool) -> Result<Registry, RegistryError> {
        let mut defs: Vec<&'static TaskDef> = vec![
            &echo::TASK,
            &build_memory::TASK,
            &generate_answer::TASK,
            &send_push::TASK,
            &send_verification_email::TASK,
            &transcribe_audio::TASK,
            &analyse_audio::TASK,
            &reembed_user::TASK,
        ];
        if debug_tasks {
            defs.extend(debug::TASKS);
        }
        Registry::of(defs)
    }

    /// A table of `defs`; two tasks of one name are refused (one would silently shadow the other).
    pub fn of(defs: Vec<&'static TaskDef>) -> Result<Registry, RegistryError> {
        let mut tasks = HashMap::new();
        for d in defs {
            if tasks.insert(d.name, d).is_some() {
                return Err(RegistryError::Duplicate(d.name));
            }
        }
        Ok(Registry { tasks })
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
pub fn bind<T: DeserializeOwned>(call: &Call, params: &[&str]) -> Result<T, TaskError> {
    let type_error = |msg: String| {
        TaskError::BadArgs(ExceptionInfo::raised(
            "TypeError",
            "builtins",
            &msg,
            &call.name,
        ))
    };
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
        assert!(
            matches!(&e, TaskError::BadArgs(x) if x.exc_type == "TypeError"),
            "{e:?}"
        );
        let e = bind::<A>(&call(json!([1]), json!({"user_id": 1})), &p).unwrap_err();
        assert!(e.message().contains("multiple values"));
        let e = bind::<A>(&call(json!(["x"]), json!({})), &p).unwrap_err();
        assert!(e.message().contains("bad arguments"));
    }

    #[test]
    fn each_task_is_given_its_own_settings_block_and_no_other() {
        let (_, blocks) = crate::config::Settings::from_vars(&crate::config::Table(&[]))
            .unwrap()
            .split();
        let r = Registry::new(true).unwrap();
        for name in r.names() {
            let def = r.get(name).unwrap();
            let given = TaskConfig::of(&blocks, def.block);
            let want = match name {
                send_push::NAME => "push",
                send_verification_email::NAME => "smtp",
                transcribe_audio::NAME => "transcription",
                _ => "none",
            };
            let got = match given {
                TaskConfig::None => "none",
                TaskConfig::Push(_) => "push",
                TaskConfig::Smtp(_) => "smtp",
                TaskConfig::Transcription(_) => "transcription",
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn the_registry_refuses_a_name_twice() {
        assert!(Registry::new(true).is_ok());
        let e = Registry::of(vec![&echo::TASK, &build_memory::TASK, &echo::TASK]).err();
        assert!(
            matches!(e, Some(RegistryError::Duplicate("orbit.echo"))),
            "{e:?}"
        );
    }

    #[test]
    fn errors_become_retries_only_when_retryable() {
        let r = Raises {
            module: "m",
            task: "t",
        };
        let http = |s| {
            orbit_pipeline::http_call::CallError::from_status(s, "{}", Some(Duration::from_secs(7)))
        };
        assert!(
            matches!(r.error("E", &http(503)), TaskError::Retry { after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(matches!(r.error("E", &http(400)), TaskError::Permanent(_)));
        assert!(matches!(r.error("E", &http(501)), TaskError::Permanent(_)));
    }

    #[test]
    fn header_limits_never_panic_and_stay_bounded() {
        let d = DEFAULT_LIMITS;
        let day = MAX_HEADER_LIMIT;
        // (hard, soft) from the header, the limits that apply
        let cases: &[(Option<f64>, Option<f64>, Duration, Duration)] = &[
            (None, None, d.soft, d.hard),
            (
                Some(10.0),
                Some(5.0),
                Duration::from_secs(5),
                Duration::from_secs(10),
            ),
            (Some(1e300), None, d.soft, day),
            (Some(1e19), Some(1e19), day, day),
            (Some(f64::INFINITY), Some(f64::NAN), d.soft, d.hard),
            (Some(-1.0), Some(0.0), d.soft, d.hard),
            (
                Some(f64::MIN_POSITIVE),
                None,
                Duration::ZERO,
                Duration::ZERO,
            ),
        ];
        for &(hard, soft, want_soft, want_hard) in cases {
            let l = d.with_overrides(hard, soft);
            assert_eq!(
                (l.soft, l.hard),
                (want_soft, want_hard),
                "{hard:?} {soft:?}"
            );
            // The clock can take it.
            let _ = std::time::Instant::now() + l.hard;
        }
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
