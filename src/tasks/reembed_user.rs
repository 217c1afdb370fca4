//! `orbitpilot.reembed_user(run_id, user_id)`: one user of a `reembed --via-queue` run, on any
//! worker of the fleet: built into the run's new store version with the run's model, then
//! checkpointed in the run log (a redelivered or repeated message finds the checkpoint and does
//! nothing). The command that published the run follows the checkpoints and switches.

use serde::Deserialize;
use serde_json::json;

use super::{bind, Raises, RetryPolicy, TaskContext, TaskDef, TaskResult, DEFAULT_LIMITS};

pub const NAME: &str = "orbitpilot.reembed_user";

pub static TASK: TaskDef = TaskDef {
    name: NAME,
    // As a build: the provider or the store may be down for a while.
    retry: RetryPolicy {
        max_retries: 3,
        base_delay: std::time::Duration::from_secs(10),
        max_delay: std::time::Duration::from_secs(300),
    },
    limits: DEFAULT_LIMITS,
    block: super::Block::None,
    run: |ctx| Box::pin(run(ctx)),
};

const RAISES: Raises = Raises {
    module: "orbitpilot.tasks",
    task: NAME,
};

#[derive(Deserialize)]
struct Args {
    run_id: String,
    user_id: i64,
}

async fn run(ctx: TaskContext) -> TaskResult {
    let a: Args = bind(&ctx.call, &["run_id", "user_id"])?;
    let failed = |e: anyhow::Error| {
        let msg = format!("{e:#}");
        // A missing run or a model the worker cannot run needs a human; the rest may pass.
        if msg.contains("no reembed run") || msg.contains("cannot embed with") {
            RAISES.permanent("ReembedError", msg)
        } else {
            RAISES.retry("ReembedError", msg, None)
        }
    };
    let out = crate::reembed::reembed_one(&ctx.services, &a.run_id, a.user_id, &ctx.cancel)
        .await
        .map_err(failed)?;
    Ok(json!(out))
}
