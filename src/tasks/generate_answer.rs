//! `orbitpilot.generate_answer(user_id, question, top_k=8)`: answers from the user's own memory.
//! The answer JSON is the Celery result and is also cached under `op_ask:{task_id}` for the Ask
//! page, for as long as the result lives.

use std::time::Duration;

use serde::Deserialize;

use super::{bind, Raises, RetryPolicy, TaskContext, TaskDef, TaskResult, TimeLimits};
use crate::answer::{answer, AnswerError, Question};
use crate::cache::{Cache, ASK_TTL};

pub const NAME: &str = "orbitpilot.generate_answer";
const PARAMS: &[&str] = &["user_id", "question", "top_k"];

/// A user is waiting on the Ask page: two quick retries, then an honest failure.
pub static TASK: TaskDef = TaskDef {
    name: NAME,
    retry: RetryPolicy {
        max_retries: 2,
        base_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(20),
    },
    limits: TimeLimits {
        soft: Duration::from_secs(120),
        hard: Duration::from_secs(150),
    },
    block: super::Block::None,
    run: |ctx| Box::pin(run(ctx)),
};

fn default_top_k() -> usize {
    8
}

#[derive(Deserialize)]
struct Args {
    user_id: i64,
    question: String,
    #[serde(default = "default_top_k")]
    top_k: usize,
}

const RAISES: Raises = Raises {
    module: "orbitpilot.errors",
    task: NAME,
};

async fn run(ctx: TaskContext) -> TaskResult {
    let args: Args = bind(&ctx.call, PARAMS)?;
    let sv = &ctx.services;
    let q = Question {
        user_id: args.user_id,
        question: &args.question,
        top_k: args.top_k,
        task_id: &ctx.call.id,
        mode: None,
    };
    let a = tokio::select! {
        a = answer(sv, q) => a,
        _ = ctx.cancel.cancelled() => return Err(Raises { module: "billiard.exceptions", task: NAME }
            .permanent("SoftTimeLimitExceeded", "the answer was not ready within the soft time limit")),
    };
    let a = a.map_err(|e| match e {
        AnswerError::BadRequest(m) => Raises {
            module: "builtins",
            task: NAME,
        }
        .permanent("ValueError", m),
        e @ AnswerError::UnknownUser(_) => RAISES.permanent("UserNotFound", e),
        AnswerError::Config(m) => RAISES.permanent("ConfigError", m),
        AnswerError::Upstream {
            message,
            retryable: true,
            retry_after,
        } => RAISES.retry("AnswerError", message, retry_after),
        AnswerError::Upstream { message, .. } => RAISES.permanent("AnswerError", message),
    })?;
    let v = serde_json::to_value(&a).map_err(|e| RAISES.permanent("AnswerError", e))?;
    // The Ask page polls this key; without it the answer is lost to the user, so a cache that
    // is down is worth a retry.
    sv.cache
        .set(&Cache::ask_key(&ctx.call.id), &v, ASK_TTL)
        .await
        .map_err(|e| RAISES.error("CacheError", &e))?;
    Ok(v)
}
