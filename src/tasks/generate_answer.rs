//! `orbitpilot.generate_answer(user_id, question, top_k=8)`: answers from the user's own memory.
//! The answer JSON is the Celery result and is also cached under `op_ask:{task_id}` for the Ask
//! page, for as long as the result lives.

use std::time::Duration;

use serde::Deserialize;

use super::{bind, RetryPolicy, TaskContext, TaskDef, TaskOutcome, TimeLimits};
use crate::answer::{answer, AnswerError, Question};
use crate::cache::{Cache, ASK_TTL};
use crate::celery::result::ExceptionInfo;

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

const EXC_MODULE: &str = "orbitpilot.errors";

async fn run(ctx: TaskContext) -> TaskOutcome {
    let args: Args = match bind(&ctx.call, PARAMS) {
        Ok(a) => a,
        Err(e) => return TaskOutcome::Failure(e),
    };
    let sv = &ctx.services;
    let fail = |kind: &str, msg: &str| {
        TaskOutcome::Failure(ExceptionInfo::raised(kind, EXC_MODULE, msg, NAME))
    };
    let q = Question {
        user_id: args.user_id,
        question: &args.question,
        top_k: args.top_k,
        task_id: &ctx.call.id,
    };
    let a = tokio::select! {
        a = answer(sv, q) => a,
        _ = ctx.cancel.cancelled() => return TaskOutcome::Failure(ExceptionInfo::raised(
            "SoftTimeLimitExceeded", "billiard.exceptions",
            "the answer was not ready within the soft time limit", NAME)),
    };
    match a {
        Ok(a) => {
            let v = match serde_json::to_value(&a) {
                Ok(v) => v,
                Err(e) => return fail("AnswerError", &e.to_string()),
            };
            // The Ask page polls this key; without it the answer is lost to the user, so a
            // cache that is down is worth a retry.
            if let Err(e) = sv
                .cache
                .set(&Cache::ask_key(&ctx.call.id), &v, ASK_TTL)
                .await
            {
                let error = ExceptionInfo::raised("CacheError", EXC_MODULE, &e.to_string(), NAME);
                return if e.is_retryable() {
                    TaskOutcome::Retry { error, after: None }
                } else {
                    TaskOutcome::Failure(error)
                };
            }
            TaskOutcome::Success(v)
        }
        Err(AnswerError::BadRequest(m)) => {
            TaskOutcome::Failure(ExceptionInfo::raised("ValueError", "builtins", &m, NAME))
        }
        Err(e @ AnswerError::UnknownUser(_)) => fail("UserNotFound", &e.to_string()),
        Err(AnswerError::Config(m)) => fail("ConfigError", &m),
        Err(AnswerError::Upstream {
            message,
            retryable: true,
            retry_after,
        }) => TaskOutcome::Retry {
            error: ExceptionInfo::raised("AnswerError", EXC_MODULE, &message, NAME),
            after: retry_after,
        },
        Err(AnswerError::Upstream { message, .. }) => fail("AnswerError", &message),
    }
}
