//! `orbit.debug.*`: diagnostic tasks that sleep, fail or retry on request, registered only with
//! `--debug-tasks`; the wire tests and operators use them to exercise the worker's promises.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;

use super::{bind, RetryPolicy, TaskContext, TaskDef, TaskError, TaskResult, DEFAULT_LIMITS};
use crate::celery::result::ExceptionInfo;

pub static TASKS: [&TaskDef; 3] = [&SLEEP, &FAIL, &FLAKY];

/// `orbit.debug.sleep(seconds, ignore_cancel=False)`: returns how long it slept and whether its
/// cancellation fired; with `ignore_cancel` it stays asleep like a task stuck in a call.
pub static SLEEP: TaskDef = TaskDef {
    name: "orbit.debug.sleep",
    retry: RetryPolicy::NONE,
    limits: DEFAULT_LIMITS,
    block: super::Block::None,
    run: |ctx| Box::pin(sleep(ctx)),
};

#[derive(Deserialize)]
struct SleepArgs {
    seconds: f64,
    #[serde(default)]
    ignore_cancel: bool,
}

async fn sleep(ctx: TaskContext) -> TaskResult {
    let a: SleepArgs = bind(&ctx.call, &["seconds", "ignore_cancel"])?;
    let started = Instant::now();
    let nap = tokio::time::sleep(Duration::from_secs_f64(a.seconds.clamp(0.0, 86_400.0)));
    let cancelled = if a.ignore_cancel {
        nap.await;
        ctx.cancel.is_cancelled()
    } else {
        tokio::select! {
            _ = nap => false,
            _ = ctx.cancel.cancelled() => true,
        }
    };
    Ok(json!({
        "slept": started.elapsed().as_secs_f64(),
        "cancelled": cancelled,
    }))
}

/// `orbit.debug.fail(exc_type, message, exc_module="builtins")`: raises that exception.
pub static FAIL: TaskDef = TaskDef {
    name: "orbit.debug.fail",
    retry: RetryPolicy::NONE,
    limits: DEFAULT_LIMITS,
    block: super::Block::None,
    run: |ctx| Box::pin(fail(ctx)),
};

#[derive(Deserialize)]
struct FailArgs {
    exc_type: String,
    message: String,
    exc_module: Option<String>,
}

async fn fail(ctx: TaskContext) -> TaskResult {
    let a: FailArgs = bind(&ctx.call, &["exc_type", "message", "exc_module"])?;
    Err(TaskError::Permanent(ExceptionInfo::raised(
        &a.exc_type,
        a.exc_module.as_deref().unwrap_or("builtins"),
        &a.message,
        &ctx.call.name,
    )))
}

/// `orbit.debug.flaky(failures, countdown=None)`: asks for a retry until it has been retried
/// `failures` times, then returns the number of retries.
pub static FLAKY: TaskDef = TaskDef {
    name: "orbit.debug.flaky",
    retry: RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(10),
    },
    limits: DEFAULT_LIMITS,
    block: super::Block::None,
    run: |ctx| Box::pin(flaky(ctx)),
};

#[derive(Deserialize)]
struct FlakyArgs {
    failures: u32,
    countdown: Option<f64>,
}

async fn flaky(ctx: TaskContext) -> TaskResult {
    let a: FlakyArgs = bind(&ctx.call, &["failures", "countdown"])?;
    if ctx.call.retries >= a.failures {
        return Ok(json!({"retries": ctx.call.retries}));
    }
    Err(TaskError::Retry {
        error: ExceptionInfo::raised(
            "KeyError",
            "builtins",
            &format!("flaky attempt {}", ctx.call.retries),
            &ctx.call.name,
        ),
        after: a
            .countdown
            .and_then(|c| Duration::try_from_secs_f64(c.max(0.0)).ok()),
    })
}
