//! `orbit.echo`: returns its arguments; for smoke tests and throughput benchmarks.

use serde_json::json;

use super::{RetryPolicy, TaskContext, TaskDef, TaskResult, DEFAULT_LIMITS};

pub const NAME: &str = "orbit.echo";

pub static TASK: TaskDef = TaskDef {
    name: NAME,
    retry: RetryPolicy::NONE,
    limits: DEFAULT_LIMITS,
    block: super::Block::None,
    run: |ctx| Box::pin(run(ctx)),
};

async fn run(ctx: TaskContext) -> TaskResult {
    Ok(json!({"args": ctx.call.args, "kwargs": ctx.call.kwargs}))
}
