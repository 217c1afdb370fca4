//! What the two Blink tasks share: their exceptions, loading a recording's row, and the one
//! place a failed step's status column is written (`on_failure`). A step's own code writes
//! `processing` when it starts and `completed` with its results.

use std::future::Future;

use super::{Raises, TaskContext, TaskError, TaskResult};
use crate::db::{BlinkAudio, BlinkStep, Db};

pub const EXC_MODULE: &str = "blink.errors";

/// The exceptions of a step of `task`.
pub const fn raises(task: &'static str) -> Raises {
    Raises {
        module: EXC_MODULE,
        task,
    }
}

/// Runs `work` under the soft limit; a failure is recorded on the recording before it goes up.
pub async fn run_step(
    ctx: &TaskContext,
    task: &'static str,
    step: BlinkStep,
    audio_id: i64,
    work: impl Future<Output = TaskResult>,
) -> TaskResult {
    let r = tokio::select! {
        r = work => r,
        _ = ctx.cancel.cancelled() => Err(raises(task).permanent(
            "SoftTimeLimitExceeded",
            format!("the {} did not finish within its time limit", step.noun()),
        )),
    };
    if let Err(e) = &r {
        on_failure(ctx, step, audio_id, e).await;
    }
    r
}

/// The status column after a failed attempt: `processing` with the reason while a retry
/// follows, `failed` when none does.
pub async fn on_failure(ctx: &TaskContext, step: BlinkStep, audio_id: i64, e: &TaskError) {
    let (status, message) = match e {
        TaskError::Retry { .. } if !ctx.is_last_attempt() => (
            "processing",
            format!(
                "attempt {} failed, retrying: {}",
                ctx.call.retries + 1,
                e.message()
            ),
        ),
        _ => ("failed", e.message()),
    };
    // A record that does not exist updates no row; without a database there is none to write.
    if let Some(db) = &ctx.services.db {
        if let Err(err) = db.set_blink_status(audio_id, step, status, &message).await {
            tracing::error!(error = %err, audio_id, "cannot record the Blink {} status", step.noun());
        }
    }
}

/// The recording's row: a missing row is permanent, a database error is worth another attempt.
pub async fn load_audio(
    db: &Db,
    r: Raises,
    kind: &str,
    audio_id: i64,
) -> Result<BlinkAudio, TaskError> {
    match db.blink_audio(audio_id).await {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(r.permanent(
            "AudioNotFound",
            format!("Blink audio {audio_id} does not exist"),
        )),
        Err(e) => Err(r.retry(kind, e, None)),
    }
}
